"""Evaluation: perplexity, bits per byte, classification accuracy, tokenizer fertility.

Language-model metrics (``evaluate_lm``)
----------------------------------------
Each text is one document (or, with ``concat=True``, all texts joined by ``"\\n\\n"`` are
one document). A document is tokenised without special tokens, t_1..t_n, and a prefix
token t_0 is put in front: the tokenizer's BOS token, else its EOS token (the convention
of lm-evaluation-harness' rolling log-likelihood). Every text token t_1..t_n is then
*predicted exactly once*, so

    nll_nats      = - sum_{i=1..n} log p(t_i | context_i)      summed over all documents
    tokens        = n (summed over documents)
    bytes         = number of UTF-8 bytes of the documents
    perplexity    = exp(nll_nats / tokens)
    bits_per_byte = nll_nats / ln(2) / bytes

Bits per byte is the tokenizer-independent figure: it compares models with different
vocabularies (or an extended vocabulary) on the same text; perplexity does not.

Context windows: the sequence t_0..t_n is cut into windows of at most ``block_size``
tokens. With ``stride=None`` windows do not overlap in the tokens they predict: window j
predicts ``block_size - 1`` new tokens and its first token is the last token of window
j-1, used as context only (the first window starts at t_0). So each window's first token
is context, never a target, and no token is predicted twice or skipped. With
``stride=s < block_size - 1`` windows slide: each predicts ``s`` new tokens with
``block_size - s`` tokens of context (more context, lower perplexity, more compute).

Tokenizers with neither BOS nor EOS: t_1 cannot be predicted, so it becomes the prefix;
its bytes (up to the end of its character span, from the offset mapping when the
tokenizer is a fast one, else from decoding it) are excluded from ``bytes`` so that the
numerator and denominator of bits per byte cover the same text.

The loss is computed from the decoder's last hidden states with the chunked fused
LM-head cross entropy of ``lorakit.ops.loss`` (never materialising batch x block x vocab
logits) when the model is a plain ``*ForCausalLM`` (a ``base_model`` plus an
``nn.Linear`` output embedding); other models fall back to ``model(...).logits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.errors import ConfigError
from lorakit.ops.loss import chunked_linear_cross_entropy

__all__ = ["evaluate_lm", "evaluate_classifier", "fertility", "fused_head"]

_IGNORE = -100


def _check_texts(texts, what: str = "texts") -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ConfigError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{what} must contain only strings")
    return list(texts)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fused_head(model: nn.Module):
    """(decoder, weight, bias, softcap) when logits == head(decoder(...)) exactly, else None."""
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        return None  # not a causal LM (e.g. BertForMaskedLM: its logits are head(transform(h)), unshifted)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear) or not head.weight.dtype.is_floating_point:
        return None  # e.g. an adapter-wrapped or quantized LM head: let the model compute logits
    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        return None
    cfg = getattr(model, "config", None)
    # Models that rescale logits after the head (Cohere's logit_scale, Granite's
    # logits_scaling) are not a plain head(decoder(x)); use their own forward.
    for attr, neutral in (("logit_scale", 1.0), ("logits_scaling", 1.0)):
        value = getattr(cfg, attr, None)
        if value is not None and value != neutral:
            return None
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    return decoder, head.weight, head.bias, softcap


def _windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence s[0..n) whose targets are s[1..n): (start, end, first_target)."""
    out = []
    context = block_size - stride
    first = 1
    while first < n:
        end = min(first + stride, n)
        start = max(0, first - context)
        out.append((start, end, first))
        first = end
    return out


def _doc_ids(tokenizer, text: str, prefix: int | None) -> tuple[list[int], int]:
    """Token ids with the context prefix in front, and the UTF-8 bytes their targets cover."""
    n_bytes = len(text.encode("utf-8"))
    if prefix is not None:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return [prefix] + ids, n_bytes
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        first_end = offsets[0][1] if ids else 0
        skipped = len(text[:first_end].encode("utf-8"))
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers: no offsets
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        skipped = len(tokenizer.decode(ids[:1]).encode("utf-8")) if ids else 0
    return ids, max(0, n_bytes - skipped) if len(ids) > 1 else 0


def evaluate_lm(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    block_size: int = 512,
    batch_size: int = 4,
    stride: int | None = None,
    progress: bool = True,
    *,
    concat: bool = False,
    chunk_size: int = 1024,
) -> dict:
    """Perplexity and bits per byte of a causal LM on ``texts`` (see the module docstring).

    Args:
        model: a causal LM (``*ForCausalLM`` or anything returning ``.logits``).
        tokenizer: its tokenizer.
        texts: documents; each is evaluated on its own unless ``concat=True``.
        block_size: tokens per window (model input length), >= 2.
        batch_size: windows per forward pass; results do not depend on it.
        stride: new tokens predicted per window, 1..block_size-1; None = block_size - 1.
        progress: show a tqdm progress bar.
        concat: join the texts with "\\n\\n" into a single document.
        chunk_size: rows per chunk of the fused LM-head loss.

    Returns:
        {"nll_nats", "tokens", "bytes", "perplexity", "bits_per_byte"}.
    """
    texts = _check_texts(texts)
    if not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"block_size must be an int >= 2, got {block_size!r}")
    if stride is None:
        stride = block_size - 1
    if not isinstance(stride, int) or not 1 <= stride <= block_size - 1:
        raise ConfigError(f"stride must be an int in [1, block_size - 1 = {block_size - 1}], got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = getattr(model, "config", None)
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(max_pos, int) and block_size > max_pos:
        raise ConfigError(f"block_size {block_size} exceeds the model's {max_pos} positions")
    if concat:
        texts = ["\n\n".join(texts)]

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows: list[tuple[list[int], int]] = []  # (window ids, index of its first target)
    total_bytes = 0
    for text in texts:
        ids, n_bytes = _doc_ids(tokenizer, text, prefix)
        if len(ids) < 2:
            continue  # nothing to predict (empty text, or one token and no prefix)
        total_bytes += n_bytes
        for start, end, first in _windows(len(ids), block_size, stride):
            windows.append((ids[start:end], first - start))
    if not windows:
        raise ConfigError("no tokens to evaluate: every text is empty (or a single token and no BOS/EOS)")
    # Longest first: batches of similar lengths waste little padding.
    windows.sort(key=lambda w: len(w[0]), reverse=True)

    fused = fused_head(model)
    device = _model_device(model)
    pad_id = prefix if prefix is not None else 0  # any valid id: padded positions are masked out
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    batches = range(0, len(windows), batch_size)
    try:
        with torch.inference_mode():
            for b0 in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
                batch = windows[b0 : b0 + batch_size]
                width = len(batch[0][0])
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                targets = torch.full((len(batch), width), _IGNORE, dtype=torch.long)
                for row, (ids, first) in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention[row, : len(ids)] = 1
                    # position i predicts ids[i + 1]; only positions >= first - 1 are targets
                    targets[row, first - 1 : len(ids) - 1] = torch.tensor(ids[first:])
                    total_tokens += len(ids) - first
                input_ids, attention, targets = input_ids.to(device), attention.to(device), targets.to(device)
                if fused is not None:
                    decoder, weight, bias, softcap = fused
                    hidden = decoder(input_ids=input_ids, attention_mask=attention)[0]  # (B, T, d)
                    nll = chunked_linear_cross_entropy(
                        hidden, weight, targets, chunk_size=chunk_size, reduction="sum",
                        bias=bias, logit_softcap=softcap,
                    )
                else:
                    logits = model(input_ids=input_ids, attention_mask=attention).logits  # (B, T, V)
                    # One row at a time, so the fp32 upcast never copies the whole batch.
                    nll = sum(
                        F.cross_entropy(logits[r].float(), targets[r], ignore_index=_IGNORE, reduction="sum")
                        for r in range(logits.shape[0])
                    )
                total_nll += float(nll)
    finally:
        model.train(was_training)

    return {
        "nll_nats": total_nll,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "perplexity": math.exp(total_nll / total_tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else float("nan"),
    }


def evaluate_classifier(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    labels: Sequence[int | str],
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = False,
) -> dict:
    """Accuracy of an ``AutoModelForSequenceClassification`` model: {"accuracy", "n"}.

    ``labels`` are class indices, or class names mapped through ``model.config.label2id``.
    Texts are truncated to ``max_length`` tokens and right-padded with the model's
    ``config.pad_token_id`` (decoder classifiers pool the last non-pad token by that id),
    else the tokenizer's pad, else EOS token.
    """
    texts = _check_texts(texts)
    labels = list(labels)
    if len(labels) != len(texts):
        raise ConfigError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise ConfigError("evaluate_classifier needs at least one text")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = getattr(model, "config", None)
    label2id = getattr(cfg, "label2id", None) or {}
    targets = []
    for lab in labels:
        if isinstance(lab, str):
            if lab not in label2id:
                raise ConfigError(f"label {lab!r} is not one of the model's labels {sorted(label2id)}")
            lab = label2id[lab]
        targets.append(int(lab))

    pad_id = next(
        (i for i in (getattr(cfg, "pad_token_id", None), tokenizer.pad_token_id, tokenizer.eos_token_id)
         if i is not None),
        0,
    )
    device = _model_device(model)
    correct = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b0 in tqdm(range(0, len(texts), batch_size), desc="classify", disable=not progress):
                enc = tokenizer(texts[b0 : b0 + batch_size], truncation=True, max_length=max_length)
                width = max(len(ids) for ids in enc["input_ids"])
                inputs = {}
                for key, rows in enc.items():
                    fill = pad_id if key == "input_ids" else 0
                    t = torch.full((len(rows), width), fill, dtype=torch.long)
                    for r, row in enumerate(rows):
                        t[r, : len(row)] = torch.tensor(row, dtype=torch.long)
                    inputs[key] = t.to(device)
                pred = model(**inputs).logits.argmax(dim=-1).cpu()
                correct += int((pred == torch.tensor(targets[b0 : b0 + batch_size])).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(texts), "n": len(texts)}


def fertility(tokenizer, texts: list[str]) -> float:
    """Tokens per whitespace-separated word (no special tokens): lower = better fit to the language."""
    texts = _check_texts(texts)
    words = sum(len(t.split()) for t in texts)
    if words == 0:
        raise ConfigError("fertility needs at least one whitespace-separated word")
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    return tokens / words
