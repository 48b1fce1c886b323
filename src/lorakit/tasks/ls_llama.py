"""Label-supervised adaptation of decoder LMs: LS-LLaMA and LS-unLLaMA (Li et al.,
"Label Supervised LLaMA Finetuning", arXiv:2310.01208).

Instead of generating a label as text, put a linear label head on the decoder's final hidden
states and train with cross-entropy on the labels (the decoder itself through an adapter,
LoRA in the paper; the head fully):

    h = Decoder(x)                                   (b, t, d)  final-layer states (after norm)
    sequence:  logits_i = W · h_i,last              (b, K)     last non-pad token of row i
               (or W · mean of the non-pad states, `pooling="mean"`, the reference
               LS-unLLaMA script's default)
    token:     logits_it = W · dropout(h_it) + c     (b, t, K)  every token
    loss = CE(logits, y)                             token labels −100 (and pad positions) ignored

LS-unLLaMA removes the causal mask: every token attends to every non-pad token of its row,
which the paper finds best for token classification (NER). We switch it on through
transformers' own switch, `config.is_causal = False` (documented in TransformersKwargs as
"use decoder Attention modules as encoders"): `merge_with_config_defaults` passes it to every
attention call and `create_causal_mask` then builds a bidirectional, padding-only mask. The
attention modules' `is_causal` attribute is cleared too, so code that reads the module flag
(custom attention functions) agrees. Unlike the reference code, which replaces the whole mask
by zeros, the padding mask is kept: real tokens never attend to pads. Weights are untouched.

Heads follow the reference code (github.com/4AI/LS-LLaMA, modeling_llama.py): sequence head
without bias, token head with bias and dropout 0.1; both are named `score`, so lorakit's
`all-linear` target skips them and `modules_to_save=["score"]` (added for seq-cls by
`lorakit.train`, or by `with_label_head`) trains and saves them with the adapter.

    model = build_ls_model("smollm2-135m", num_labels=5)              # LS-LLaMA
    model = build_ls_model(lm, num_labels=9, task="token", unmask=True)  # LS-unLLaMA, NER
    lorakit.inject(model, with_label_head(LoraConfig(r=12, alpha=32, target="all-linear")))
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

from lorakit.core.adapter import AdapterConfig, check_positive_int
from lorakit.errors import ConfigError

TASKS = ("seq", "token")
POOLINGS = ("last", "mean")
HEAD = "score"
IGNORE_INDEX = -100


def set_unmasked(decoder: nn.Module, unmask: bool = True) -> nn.Module:
    """Make a transformers decoder attend bidirectionally (unmask=True) or causally again."""
    modules = [m for m in decoder.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not modules:
        raise ConfigError(
            f"unmask: {type(decoder).__name__} has no attention module with an `is_causal` flag; "
            "LS-unLLaMA needs a transformers decoder (Llama, Mistral, Qwen2, Gemma, ...)"
        )
    decoder.config.is_causal = not unmask  # the mask builder and every attention call read this
    for m in modules:
        m.is_causal = not unmask  # for attention code that reads the module flag
    return decoder


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(b, t) bool mask of real tokens -> (b,) index of each row's rightmost real token.

    Works for left and right padding alike. Raises on a row without any real token.
    """
    if not bool(mask.any(-1).all()):
        row = int((~mask.any(-1)).nonzero()[0])
        raise ValueError(f"row {row} of the batch has no non-pad token to classify")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.long()).argmax(-1)


class _LabelSupervised(nn.Module):
    """A decoder (reused, not copied) + a linear label head `score`."""

    main_input_name = "input_ids"

    def __init__(self, decoder: nn.Module, num_labels: int, bias: bool, dropout: float):
        super().__init__()
        self.model = decoder
        self.config = decoder.config
        p = next(decoder.parameters())
        hidden = self.config.get_text_config().hidden_size
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden, num_labels, bias=bias, device=p.device, dtype=p.dtype)
        # transformers' _init_weights for a new head: N(0, initializer_range), zero bias
        std = getattr(self.config.get_text_config(), "initializer_range", None) or 0.02
        nn.init.normal_(self.score.weight, std=std)
        if bias:
            nn.init.zeros_(self.score.bias)
        self.num_labels = num_labels

    @property
    def unmasked(self) -> bool:
        """Whether the decoder attends bidirectionally (LS-unLLaMA)."""
        return getattr(self.config, "is_causal", True) is False

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def _token_mask(self, input_ids, attention_mask, shape) -> torch.Tensor:
        """(b, t) bool: real tokens, from attention_mask, else pad_token_id, else all."""
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
                raise ValueError(f"attention_mask must be a 2-D (batch, seq) = {tuple(shape)} padding mask, "
                                 f"got {tuple(attention_mask.shape)}")
            return attention_mask.bool()
        pad = self.config.get_text_config().pad_token_id
        if input_ids is not None and pad is not None:
            return input_ids != pad
        device = input_ids.device if input_ids is not None else self.score.weight.device
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)

    def _hidden(self, input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states):
        kw = {} if output_hidden_states is None else {"output_hidden_states": output_hidden_states}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, use_cache=False, **kw)


class LSForSequenceClassification(_LabelSupervised):
    """LS-LLaMA sequence classifier: logits = W h_last (or W mean(h)) -> (batch, num_labels)."""

    def __init__(self, decoder: nn.Module, num_labels: int, pooling: str = "last", dropout: float = 0.0):
        super().__init__(decoder, num_labels, bias=False, dropout=dropout)
        self.pooling = pooling

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, inputs_embeds=None,
                output_hidden_states=None) -> SequenceClassifierOutput:
        out = self._hidden(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        h = out.last_hidden_state  # (b, t, d)
        mask = self._token_mask(input_ids, attention_mask, h.shape[:2])  # (b, t)
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)]  # (b, d)
        else:
            last_token_index(mask)  # same empty-row check
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1)  # (b, d)
        logits = self.score(self.dropout(pooled))  # (b, K)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:1]:
                raise ValueError(f"labels must have shape (batch,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).long())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class LSForTokenClassification(_LabelSupervised):
    """LS-(un)LLaMA token classifier: logits = W dropout(h) + c -> (batch, seq, num_labels)."""

    def __init__(self, decoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__(decoder, num_labels, bias=True, dropout=dropout)

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, inputs_embeds=None,
                output_hidden_states=None) -> TokenClassifierOutput:
        out = self._hidden(input_ids, attention_mask, position_ids, inputs_embeds, output_hidden_states)
        h = out.last_hidden_state  # (b, t, d)
        logits = self.score(self.dropout(h))  # (b, t, K)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape (batch, seq) = {tuple(logits.shape[:2])}, "
                                 f"got {tuple(labels.shape)}")
            labels = labels.to(logits.device).long()
            if attention_mask is not None:  # never learn from padding, whatever the collator wrote there
                labels = labels.masked_fill(~self._token_mask(input_ids, attention_mask, labels.shape), IGNORE_INDEX)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


def _decoder_of(model_name_or_model) -> tuple[nn.Module, str | None]:
    """(decoder, model id) from an alias / local directory or a transformers model instance."""
    if isinstance(model_name_or_model, str):
        from lorakit.models import load_model

        decoder, tokenizer = load_model(model_name_or_model, task="base")
        if decoder.config.pad_token_id is None:
            decoder.config.pad_token_id = tokenizer.pad_token_id
        return decoder, getattr(decoder, "lorakit_model_id", model_name_or_model)
    if isinstance(model_name_or_model, _LabelSupervised):
        raise ConfigError("the model already has a label head; pass its decoder (`model.model`) to rebuild")
    if not isinstance(model_name_or_model, nn.Module) or not hasattr(model_name_or_model, "config"):
        raise ConfigError(f"expected a model alias, a local model directory or a transformers model, "
                          f"got {type(model_name_or_model).__name__}")
    decoder = getattr(model_name_or_model, "base_model", model_name_or_model)  # drop an LM / task head
    return decoder, getattr(model_name_or_model, "lorakit_model_id", None)


def build_ls_model(model_name_or_model, num_labels: int, task: str = "seq", unmask: bool = False,
                   pooling: str = "last", dropout: float | None = None,
                   id2label: dict[int, str] | None = None) -> LSForSequenceClassification | LSForTokenClassification:
    """A decoder LM with a label head, ready for `lorakit.inject` / `lorakit.train`.

    model_name_or_model: an alias (`smollm2-135m`), a local HF directory, or a loaded
        transformers model (e.g. `LlamaForCausalLM`; its decoder is reused in place, its LM
        head dropped); task: "seq" (one label per sequence) or "token" (one per token);
    unmask: bidirectional attention (LS-unLLaMA); pooling: "last" non-pad token or "mean"
        over non-pad tokens ("seq" only); dropout before the head (default 0 for "seq", 0.1
        for "token" as in the reference); id2label: optional label names.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    check_positive_int("num_labels", num_labels)
    if num_labels < 2:
        raise ConfigError(f"num_labels must be at least 2 for a classifier, got {num_labels}")
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if task == "token" and pooling != "last":
        raise ConfigError(f"pooling={pooling!r} applies to task='seq' only; a token classifier labels every token")
    if not isinstance(unmask, bool):
        raise ConfigError(f"unmask must be True or False, got {unmask!r}")
    dropout = (0.1 if task == "token" else 0.0) if dropout is None else dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if id2label is not None and sorted(id2label) != list(range(num_labels)):
        raise ConfigError(f"id2label must name labels 0..{num_labels - 1}, got keys {sorted(id2label)}")

    decoder, model_id = _decoder_of(model_name_or_model)
    if unmask or getattr(decoder.config, "is_causal", True) is False:
        set_unmasked(decoder, unmask)  # unmask=False always means causal, even for a reused decoder
    decoder.config.num_labels = num_labels
    if id2label is not None:
        decoder.config.id2label = dict(id2label)
        decoder.config.label2id = {v: k for k, v in id2label.items()}
    if task == "seq":
        model = LSForSequenceClassification(decoder, num_labels, pooling=pooling, dropout=dropout)
    else:
        model = LSForTokenClassification(decoder, num_labels, dropout=dropout)
    if model_id:
        model.lorakit_model_id = model_id
    model.train(decoder.training)
    return model


def with_label_head(config: AdapterConfig) -> AdapterConfig:
    """`config` with the label head `score` in modules_to_save (trained fully, saved with the adapter)."""
    keep = list(config.modules_to_save or [])
    return config if HEAD in keep else dataclasses.replace(config, modules_to_save=[*keep, HEAD])
