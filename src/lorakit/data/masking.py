"""Self-evolution masked language modelling (Vega v2, Zhong et al., arXiv:2212.01853; the method
is described in full in "Self-Evolution Learning for Discriminative Language Model Pretraining",
arXiv:2305.15275, code: github.com/WHU-ZQH/SE4PLMs).

Random MLM masking treats every token alike. Self-evolution learning lets the model itself say
which tokens are worth learning, then regularises the targets with its own predictions:

1. Self-questioning (``score_tokens``): run the current model on the *unmasked* sequence x and
   score every token by its loss of reproducing itself,

       s_t = −log p_θ(x_t | x)                                            (B, T)

   A high s_t means an informative, under-learnt token (the reference code keeps tokens with
   s_t above a threshold). ``p_ref,t = p_θ(· | x)`` from the same pass is kept for step 3.

2. Masking (``select_informative`` + ``replace_selected``): per row, among the eligible tokens
   (not special, not padding, n of them) select the budget k = max(1, ⌊m·n + ½⌋) (m = 0.15)
   tokens with the largest s_t. With a ``loss_threshold`` τ only tokens with s_t > τ count as
   informative: the top k of them are taken, and when fewer than k exist the rest of the
   budget is filled by a seeded random choice among the other eligible tokens (as the
   reference data loader does). The selected tokens get BERT's replacement rule: 80% become
   [MASK], 10% a random non-special token, 10% stay unchanged; all of them are predicted.

3. Token-specific (rectified) label smoothing (``soft_targets``, ``self_evolution_loss``): the
   target of a selected position t is not the one-hot label but

       q_t = (1 − α)·onehot(x_t) + α·p_ref,t          (α = 0.1, p_ref detached)

   i.e. label smoothing towards the model's own distribution on the unmasked input instead of
   the uniform distribution; q_t sums to 1. The loss over the N selected positions is

       L = (1/N) Σ_t −Σ_v q_t,v log p_θ(v | x̃)
         = (1/N) Σ_t [(1 − α)·(−log p_θ(x_t | x̃)) + α·H(p_ref,t, p_θ(· | x̃))]

   with x̃ the masked input. The second line is how it is computed (no one-hot is formed).

Use with the Hugging Face Trainer: ``self_evolution(model, tokenizer)`` returns a thin wrapper
(``SelfEvolutionMLM``, whose ``forward`` computes L from the batch's ``ref_probs``) and the data
collator (``SelfEvolutionCollator``), which runs the scoring pass with the *current* weights
each time it builds a batch. Keep ``dataloader_num_workers=0`` (the default) so that the
collator sees the model being trained, not a stale copy in a worker process.

Differences from the reference code, and why:
- The paper scores the whole corpus once in a separate pass before training and masks every
  token above the threshold; here the scores are recomputed per batch with the current model
  (no offline pass, masks follow the model as it learns) and a fixed 15% budget is kept, so the
  amount of prediction per step matches standard MLM. ``loss_threshold`` restores the
  threshold rule inside that budget.
- The reference code masks hard tokens with [MASK] only; the 80/10/10 rule is BERT's default,
  kept so fine-tuned encoders see the same input statistics as in pretraining.
- The reference computes p_ref with a second forward at loss time; the scoring pass already
  produces it, so it is stored in the batch (``ref_probs``: only the selected rows, (N, V)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
_REF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SelfEvolutionConfig:
    """Hyper-parameters of self-evolution masking.

    Attributes:
        mask_prob: fraction m of eligible tokens selected per sequence (budget ⌊m·n + ½⌋, ≥ 1).
        mask_replace_prob: share of selected tokens replaced by [MASK] (BERT: 0.8).
        random_replace_prob: share replaced by a random non-special token (BERT: 0.1); the
            rest stay unchanged.
        alpha: weight α of the model's own distribution in the soft target (paper: 0.1).
        loss_threshold: τ; when set, only tokens with loss > τ count as informative and the
            remaining budget is filled at random (the reference's rule). None: pure top-k.
        seed: seed of the collator's random generator (replacements, random fill).
        ref_dtype: dtype of the stored reference distributions (``"float16"`` halves the
            batch's memory for large vocabularies).
    """

    mask_prob: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    alpha: float = 0.1
    loss_threshold: float | None = None
    seed: int = 0
    ref_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        for name in ("mask_replace_prob", "random_replace_prob", "alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9:
            raise ConfigError(
                f"mask_replace_prob + random_replace_prob must be <= 1, got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}"
            )
        if self.loss_threshold is not None and not math.isfinite(self.loss_threshold):
            raise ConfigError(f"loss_threshold must be a finite number or None, got {self.loss_threshold}")
        if self.ref_dtype not in _REF_DTYPES:
            raise ConfigError(f"ref_dtype must be one of {sorted(_REF_DTYPES)}, got {self.ref_dtype!r}")


# --------------------------------------------------------------------------- pure math


def mask_budget(n: int, mask_prob: float) -> int:
    """Tokens to select among ``n`` eligible ones: ⌊m·n + ½⌋, at least 1 when n ≥ 1."""
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(mask_prob * n + 0.5)))


def score_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-questioning pass: per-token loss of the unmasked sequence, and its logits.

    Runs ``model`` (a masked-LM: ``.logits`` of shape (B, T, V)) in eval mode without gradient
    and restores its train/eval mode afterwards.

    Returns:
        ``(scores, logits)``: scores (B, T) = −log p(x_t | x), float32; logits (B, T, V).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            logits = model(**kwargs).logits                          # (B, T, V)
    finally:
        model.train(was_training)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    scores = -log_probs.gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return scores, logits


def select_informative(
    scores: torch.Tensor,
    eligible: torch.Tensor,
    mask_prob: float = 0.15,
    loss_threshold: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per row, the ``mask_budget`` eligible positions with the largest scores.

    Args:
        scores: (B, T) informativeness (token loss); larger = more informative.
        eligible: (B, T) bool, positions that may be selected.
        mask_prob: budget fraction.
        loss_threshold: if set, only scores > threshold are informative; a row with fewer
            informative tokens than its budget is filled with random other eligible tokens.
        generator: randomness of that fill (only used with ``loss_threshold``).

    Returns:
        (B, T) bool. Ties are broken by position (stable sort), so the result is a function of
        the inputs (and the generator's state).
    """
    if scores.shape != eligible.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and eligible {tuple(eligible.shape)} must be equal (B, T)")
    selected = torch.zeros_like(eligible, dtype=torch.bool)
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float32)
    for row in range(scores.shape[0]):
        ok = eligible[row].cpu()
        k = mask_budget(int(ok.sum()), mask_prob)
        if k == 0:
            continue
        s = torch.where(ok, scores[row].float().cpu(), neg_inf)
        if loss_threshold is None:
            picks = torch.sort(s, descending=True, stable=True).indices[:k]
        else:
            hard = ok & (s > loss_threshold)
            ranked = torch.sort(torch.where(hard, s, neg_inf), descending=True, stable=True).indices
            picks = ranked[: min(k, int(hard.sum()))]
            missing = k - len(picks)
            if missing > 0:
                rest = (ok & ~hard).nonzero().flatten()
                order = torch.randperm(len(rest), generator=generator)[:missing]
                picks = torch.cat([picks, rest[order]])
        selected[row, picks.to(selected.device)] = True
    return selected


def replace_selected(
    input_ids: torch.Tensor,
    selected: torch.Tensor,
    mask_token_id: int,
    random_ids: torch.Tensor,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's replacement rule on the selected positions.

    Returns:
        ``(masked_ids, labels)``, both (B, T): the input with selected tokens replaced
        ([MASK] with probability ``mask_replace_prob``, a token drawn uniformly from
        ``random_ids`` with ``random_replace_prob``, else unchanged), and the original ids at
        selected positions with ``-100`` elsewhere.
    """
    if len(random_ids) == 0 and random_replace_prob > 0:
        raise ValueError("random replacement needs at least one non-special token id")
    u = torch.rand(input_ids.shape, generator=generator)                       # (B, T)
    to_mask = selected & (u < mask_replace_prob)
    to_random = selected & (u >= mask_replace_prob) & (u < mask_replace_prob + random_replace_prob)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    n_random = int(to_random.sum())
    if n_random:
        draws = torch.randint(len(random_ids), (n_random,), generator=generator)
        masked[to_random] = random_ids[draws].to(masked.dtype)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def soft_targets(labels: torch.Tensor, ref_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rectified smoothed labels q = (1 − α)·onehot(y) + α·p_ref.

    Args:
        labels: (N,) true token ids.
        ref_probs: (N, V) the model's distribution on the unmasked input.

    Returns:
        (N, V) float32, every row sums to 1 (when ``ref_probs`` rows do).
    """
    onehot = F.one_hot(labels, ref_probs.shape[-1]).float()
    return (1.0 - alpha) * onehot + alpha * ref_probs.float()


def self_evolution_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_probs: torch.Tensor | None,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Mean soft-label cross entropy over the positions with a label.

    Args:
        logits: (B, T, V) predictions on the masked input.
        labels: (B, T) true ids, ``-100`` where not predicted.
        ref_probs: (N, V), one row per labelled position in row-major order (as the collator
            stores them); None gives plain MLM cross entropy (α = 0).

    Returns:
        Scalar ``(1/N) Σ [(1 − α)·(−log p(y)) + α·(−Σ_v p_ref,v log p_v)]`` (0 when N = 0).
    """
    picked = labels != IGNORE_INDEX                                          # (B, T)
    n = int(picked.sum())
    if n == 0:
        return logits.sum() * 0.0  # keeps the graph so backward() still works
    log_probs = torch.log_softmax(logits[picked].float(), dim=-1)           # (N, V)
    y = labels[picked]
    nll = -log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)                # (N,)
    if ref_probs is None or alpha == 0.0:
        return nll.mean()
    if ref_probs.shape != log_probs.shape:
        raise ValueError(
            f"ref_probs has shape {tuple(ref_probs.shape)}, expected {tuple(log_probs.shape)} "
            "(one row per labelled position)"
        )
    cross = -(ref_probs.to(log_probs.dtype) * log_probs).sum(-1)            # (N,)
    return ((1.0 - alpha) * nll + alpha * cross).mean()


# --------------------------------------------------------------------------- HF integration


class SelfEvolutionCollator:
    """Data collator for self-evolution MLM (see the module docstring).

    Args:
        model: the masked-LM being trained (or a ``SelfEvolutionMLM`` around it); it scores
            each batch with its current weights.
        tokenizer: pads the features and names the [MASK] and special tokens.
        config: ``SelfEvolutionConfig``.
        max_length / pad_to_multiple_of: passed to ``tokenizer.pad``.

    ``__call__(features)`` takes a list of mappings with ``input_ids`` (and optionally
    ``attention_mask``, ``token_type_ids``, ``special_tokens_mask``) and returns tensors
    ``input_ids`` (masked), ``attention_mask``, ``labels`` (-100 where not predicted),
    ``ref_probs`` (N, V) and ``token_type_ids`` when given. Calls with the same seed on the same
    sequence of batches give the same result.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: SelfEvolutionConfig | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        self.config = config or SelfEvolutionConfig()
        self.model = model.model if isinstance(model, SelfEvolutionMLM) else model
        self.tokenizer = tokenizer
        if tokenizer.mask_token_id is None:
            raise ConfigError("the tokenizer has no mask token; self-evolution MLM needs one ([MASK])")
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab_size = _vocab_size(self.model)
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[self.special_ids[self.special_ids < vocab_size]] = False
        self.random_ids = keep.nonzero().flatten()  # random replacements are never special tokens

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        cfg = self.config
        given_special = [f.get("special_tokens_mask") for f in features]
        plain = [{k: _as_list(v) for k, v in f.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                 for f in features]
        batch = self.tokenizer.pad(plain, padding=True, max_length=self.max_length,
                                   pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        input_ids = batch["input_ids"].long()                                 # (B, T)
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        token_type_ids = batch.get("token_type_ids")

        eligible = (attention_mask > 0) & ~torch.isin(input_ids, self.special_ids)
        if any(s is not None for s in given_special):
            eligible &= ~_pad_rows(given_special, input_ids.shape, self.tokenizer.padding_side)

        device = _device(self.model)
        scores, logits = score_tokens(
            self.model, input_ids.to(device), attention_mask.to(device),
            None if token_type_ids is None else token_type_ids.to(device),
        )
        selected = select_informative(scores.cpu(), eligible, cfg.mask_prob, cfg.loss_threshold, self.generator)
        ref_probs = torch.softmax(logits[selected.to(device)].float(), dim=-1)  # (N, V)
        masked, labels = replace_selected(input_ids, selected, self.tokenizer.mask_token_id, self.random_ids,
                                          cfg.mask_replace_prob, cfg.random_replace_prob, self.generator)
        out = {
            "input_ids": masked,
            "attention_mask": attention_mask,
            "labels": labels,
            "ref_probs": ref_probs.to("cpu", _REF_DTYPES[cfg.ref_dtype]),
        }
        if token_type_ids is not None:
            out["token_type_ids"] = token_type_ids
        return out


class SelfEvolutionMLM(nn.Module):
    """A masked-LM whose loss is the self-evolution soft-label loss.

    ``forward(input_ids, attention_mask, token_type_ids, labels, ref_probs)`` runs the wrapped
    model and returns its output with ``loss = self_evolution_loss(logits, labels, ref_probs,
    alpha)``. The wrapped model is ``.model`` (inject adapters into it, save it).
    """

    def __init__(self, model: nn.Module, alpha: float = 0.1):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        self.model = model
        self.alpha = alpha

    @property
    def config(self):  # the Trainer reads model.config
        return self.model.config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ref_probs: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if labels is not None:
            out["loss"] = self_evolution_loss(out.logits, labels, ref_probs, self.alpha)
        return out


def self_evolution(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: SelfEvolutionConfig | None = None, **collator_kw: Any
) -> tuple[SelfEvolutionMLM, SelfEvolutionCollator]:
    """``(wrapped_model, collator)`` ready for ``transformers.Trainer(model=..., data_collator=...)``."""
    config = config or SelfEvolutionConfig()
    return SelfEvolutionMLM(model, config.alpha), SelfEvolutionCollator(model, tokenizer, config, **collator_kw)


# --------------------------------------------------------------------------- helpers


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise ConfigError("cannot tell the model's vocabulary size (no output embeddings, no config.vocab_size)")
    return int(size)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _pad_rows(rows: list[Any], shape: torch.Size, side: str) -> torch.Tensor:
    """Stack per-example 0/1 masks (None = all 0) into (B, T) bool, padded like the tokenizer."""
    out = torch.zeros(shape, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        values = torch.as_tensor(_as_list(row), dtype=torch.bool)[: shape[1]]
        if side == "left":
            out[i, shape[1] - len(values):] = values
        else:
            out[i, : len(values)] = values
    return out
