"""LESS: selecting influential data for targeted instruction tuning (Xia et al., arXiv:2402.04333).

Pick the training examples whose (Adam-preconditioned) LoRA gradient points the same way as
the gradient of a few target-task examples. Four steps, as in the authors' code
(github.com/princeton-nlp/LESS, ``less/data_selection/``):

1. Warm-up (``warmup_lora``): train a LoRA for N epochs on a random ``warmup_fraction`` of the
   training pool with AdamW; after epoch i keep the LoRA weights θ_i, the Adam moments
   (m_i, v_i, step t_i) and η̄_i, the mean learning rate of that epoch.
2. Gradient features (``collect_features``), per checkpoint i, over the LoRA parameters only
   (D of them), per example z, with the loss ℓ = mean next-token cross entropy over the
   example's label tokens:

       g = ∇_θ ℓ(z; θ_i)                                   (D,)  torch.func: vmap(grad(·))
       training examples — the Adam update direction LESS calls Γ(z, θ_i):
           m' = β1 m_i + (1 − β1) g,   v' = β2 v_i + (1 − β2) g²
           m̂ = m' / (1 − β1^(t_i+1)),  v̂ = v' / (1 − β2^(t_i+1))
           Γ = m̂ / (√v̂ + ε)                               (the step torch's AdamW would take)
       target examples — the plain SGD gradient g.

3. Random projection and normalisation (``RademacherProjector``): φ = P̃ᵀx / ‖P̃ᵀx‖ with
   P̃ (D, d) iid ±1/√d (Rademacher), d = 8192 by default, generated from a seed block by block
   (never all of P at once unless it fits a small cache). Johnson–Lindenstrauss (Achlioptas'
   tail bound for Rademacher entries + polarisation): for any n vectors, with probability
   ≥ 1 − δ every pair satisfies

       |⟨P̃ᵀu, P̃ᵀv⟩ − ⟨u, v⟩| ≤ ε ‖u‖ ‖v‖   when   d ≥ 6 ln(2n(n−1)/δ) / ε²   (ε ≤ 1/2),

   i.e. d ≥ C·log(n/δ)/ε² with C = 18 (``jl_epsilon`` returns that ε for given n, d, δ).
   Features go to an on-disk datastore (``FeatureWriter`` / ``FeatureStore``: safetensors
   shards + a JSON index, written as the data streams by, resumable, read lazily).

4. Scores and selection (``less_scores``, ``top_fraction``): with target examples grouped
   into subtasks G_1..G_K (default: each target example its own group),

       Inf(z) = max_k (1/|G_k|) Σ_{z'∈G_k} Σ_i w_i ⟨φ_i(z), φ'_i(z')⟩,   w_i = η̄_i / Σ_j η̄_j

   and the top ``fraction`` (5%) of the pool by Inf is selected; ties are broken by a seeded
   permutation, so the selection is a function of (data, seed).

``select`` runs all four steps; ``run_select(SelectConfig)`` is the file-to-file entry point
for a ``lorakit select`` CLI verb.

Deviations from the reference code, and why:
- Γ uses the bias-corrected moments with ε outside the root (the paper's equation, and
  exactly torch's AdamW step); the reference script uses m'/√(v' + ε) without bias
  correction. The two differ by a global factor √(1−β2^t)/(1−β1^t) (irrelevant after
  normalisation) and by where ε enters (negligible unless v' ~ ε).
- Per-example gradients come from ``torch.func.vmap(grad(...))`` over a batch instead of a
  backward per example (the reference comments that it "never made it work"). Examples are
  right-padded without an attention mask: exact for causal LMs, whose real tokens never
  attend to later (padding) positions; so this module is for decoder-only causal LMs.
- The projection is a CPU/CUDA chunked Rademacher sketch of our own (trak's CudaProjector
  needs a GPU and its ``fast_jl`` kernel); P is defined by (seed, D, d, generator device) and
  does not depend on batch or chunk sizes. Features are stored normalised, in float16 by
  default like the reference (``dtype="float32"`` to keep full precision).
- The warm-up loop is a small explicit AdamW loop (linear schedule with 3% warm-up, gradient
  clipping at 1, like the HF Trainer the authors use) rather than ``lorakit.train``: train()
  reads packed text blocks from its own data sources and does not hand back the optimizer,
  and LESS needs per-example (padded, prompt-masked) batches and the Adam moments per epoch.
- Defaults follow the paper (r=128, α=512, dropout 0.1 on q/k/v/o, lr 2e-5, 4 epochs, 5%
  warm-up data, d=8192, top 5%) except the warm-up batch size (16, not 128: CPU-sized).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.adapter import check_positive_int, check_range
from lorakit.errors import ConfigError

IGNORE_INDEX = -100
FEATURE_FORMAT = "lorakit-less-features"
BLOCK_ROWS = 1024  # rows of P generated together; part of P's definition (seeds are per block)

Example = dict[str, torch.Tensor]


# ==== configuration ==============================================================================
@dataclass
class LessConfig:
    """LESS hyper-parameters (paper defaults unless noted).

    fraction: share of the training pool to select (top 5%).
    warmup_fraction: share of the pool the warm-up LoRA trains on (random, seeded).
    epochs / lr / batch_size / warmup_ratio / weight_decay / max_grad_norm: the warm-up AdamW run
        (one checkpoint per epoch); batch_size 16 instead of the paper's 128 (CPU-sized).
    r / alpha / lora_dropout / target_modules: the warm-up LoRA (targets as ``AdapterConfig.target``;
        the default q/k/v/o names are Llama's — pass e.g. ["c_attn"] for GPT-2, or "all-linear").
    proj_dim: d of the random projection.
    seed: subset, LoRA init, batch order, projection and tie-breaking.
    grad_batch_size: examples per vmap(grad) call.
    shard_size: rows per datastore shard (and at most per projection call).
    buffer_mb: memory for full-size gradients waiting to be projected.
    dtype: stored feature dtype, "float16" (as the reference) or "float32".
    checkpoint_weights: one weight per checkpoint; None = mean learning rate of each epoch.
    """

    fraction: float = 0.05
    warmup_fraction: float = 0.05
    epochs: int = 4
    lr: float = 2e-5
    batch_size: int = 16
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    r: int = 128
    alpha: float = 512.0
    lora_dropout: float = 0.1
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    proj_dim: int = 8192
    seed: int = 0
    grad_batch_size: int = 8
    shard_size: int = 1024
    buffer_mb: float = 1024.0
    dtype: str = "float16"
    checkpoint_weights: list[float] | None = None

    def __post_init__(self) -> None:
        _check_fraction("fraction", self.fraction)
        _check_fraction("warmup_fraction", self.warmup_fraction)
        t = self.target_modules
        if not (isinstance(t, str) and t) and not (
                isinstance(t, (list, tuple)) and t and all(isinstance(x, str) and x for x in t)):
            raise ConfigError(f"target_modules must be 'all-linear', a regex or a non-empty list of module names, "
                              f"got {t!r}")
        for name in ("epochs", "batch_size", "r", "proj_dim", "grad_batch_size", "shard_size"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "alpha", "buffer_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, (int, float)) \
                or self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.checkpoint_weights is not None:
            _check_weights(self.checkpoint_weights, None)

    def lora_config(self):
        from lorakit.methods.lora import LoraConfig

        t = self.target_modules
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.lora_dropout,
                          target=t if isinstance(t, str) else list(t))


_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _check_weights(weights: Sequence[float], n: int | None) -> list[float]:
    w = [float(x) for x in weights]
    if n is not None and len(w) != n:
        raise ConfigError(f"checkpoint_weights has {len(w)} entries for {n} checkpoints")
    if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"checkpoint_weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return [x / sum(w) for x in w]  # renormalised, as the reference's matching.py does


# ==== examples ===================================================================================
def encode_examples(tokenizer, items: Sequence[Any], max_length: int = 512) -> list[Example]:
    """Tokenise items into causal-LM examples whose loss covers only the response.

    An item is a string (every token is trained), a ``(prompt, response)`` pair, or a JSON
    record: ``{"prompt", "response"|"completion"}``, ``{"text"}``, Alpaca
    ``{"instruction", "input"?, "output"}`` (prompt = template up to "### Response:"), or
    ``{"messages": [...]}`` (response = the last message's content onwards). Like the
    reference (open-instruct's encoding), the full text is tokenised once (with the
    tokenizer's special tokens, plus eos) and the first len(tokenise(prompt)) labels are set
    to -100; the example is truncated to ``max_length`` tokens.

    Returns:
        A list of ``{"input_ids": (T,), "labels": (T,)}`` LongTensors.
    """
    check_positive_int("max_length", max_length)
    eos = tokenizer.eos_token_id
    out = []
    for i, item in enumerate(items):
        prompt, response = prompt_response(item, tokenizer, where=f"item {i}")
        ids = list(tokenizer(prompt + response, add_special_tokens=True)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        n_prompt = len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else 0
        ids = ids[:max_length]
        labels = list(ids)
        labels[: min(n_prompt, len(ids))] = [IGNORE_INDEX] * min(n_prompt, len(ids))
        out.append({"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)})
    return out


def prompt_response(item: Any, tokenizer=None, where: str = "item") -> tuple[str, str]:
    """(prompt, response) of one item; see ``encode_examples`` for the accepted forms."""
    from lorakit.data.text import ALPACA_INPUT_TEMPLATE, ALPACA_TEMPLATE, render_chat

    if isinstance(item, str):
        return "", item
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item):
        return item[0], item[1]
    if isinstance(item, dict):
        if isinstance(item.get("prompt"), str):
            resp = item.get("response", item.get("completion"))
            if isinstance(resp, str):
                return item["prompt"], resp
        if isinstance(item.get("text"), str):
            return "", item["text"]
        if isinstance(item.get("instruction"), str) and isinstance(item.get("output"), str):
            extra = item.get("input") or ""
            template = ALPACA_INPUT_TEMPLATE if str(extra).strip() else ALPACA_TEMPLATE
            return template.format(instruction=item["instruction"], input=extra, output=""), item["output"]
        msgs = item.get("messages")
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   for m in msgs):
            full = render_chat(msgs, tokenizer)
            # the prompt is what the conversation renders to up to the last message's turn header;
            # search its content only after that (a short reply such as "e" also occurs inside
            # role markers like "<|im_end|>")
            if tokenizer is not None and getattr(tokenizer, "chat_template", None) and len(msgs) > 1:
                gen = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
                if full.startswith(gen) and full[len(gen):].startswith(msgs[-1]["content"]):
                    return gen, full[len(gen):]
            if full.endswith(msgs[-1]["content"]):  # the plain layout ends with the content
                cut = len(full) - len(msgs[-1]["content"])
            else:
                head = render_chat(msgs[:-1], tokenizer) if len(msgs) > 1 else ""
                cut = full.find(msgs[-1]["content"], len(head) if full.startswith(head) else 0)
            return (full[:cut], full[cut:]) if cut >= 0 else ("", full)
    raise ConfigError(
        f"{where}: expected a string, a (prompt, response) pair, or a record with 'prompt'+'response', 'text', "
        f"'instruction'+'output' or 'messages'; got {type(item).__name__}"
        + (f" with keys {sorted(item)}" if isinstance(item, dict) else "")
    )


def _example(item: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (T,), labels (T,)) of a dataset item; right padding (attention_mask) is cut off."""
    if not isinstance(item, dict) or "input_ids" not in item:
        raise ConfigError(f"{where}: expected a dict with 'input_ids' (and optionally 'labels', "
                          f"'attention_mask'), got {type(item).__name__}")
    ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
    labels = torch.as_tensor(item.get("labels", ids), dtype=torch.long)
    if ids.dim() != 1 or labels.shape != ids.shape:
        raise ConfigError(f"{where}: LESS needs causal-LM examples with 1-D input_ids and labels of the same "
                          f"shape, got {tuple(ids.shape)} and {tuple(labels.shape)}")
    if "attention_mask" in item:
        mask = torch.as_tensor(item["attention_mask"]).bool()
        n = int(mask.sum())
        if not bool(mask[:n].all()):
            raise ConfigError(f"{where}: only right-padded examples are supported (attention_mask 1...1 0...0)")
        ids, labels = ids[:n], labels[:n]
    if len(ids) == 0:
        raise ConfigError(f"{where}: empty example")
    return ids, labels


def collate(examples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids (pad 0), labels (-100), attention_mask, all (B, T)."""
    t = max(len(ids) for ids, _ in examples)
    b = len(examples)
    input_ids = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(ids)] = lab
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def response_nll(model: nn.Module, encoded: Sequence[dict], batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ NLL in nats over the label tokens, number of label tokens) per example of
    ``encode_examples`` output: float64 (n,) and int64 (n,), batched with right padding."""
    check_positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    sums, counts = [], []
    for b0 in range(0, len(encoded), batch_size):
        batch = collate([(e["input_ids"], e["labels"]) for e in encoded[b0:b0 + batch_size]])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(device)
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
        sums.append(nll.sum(1).cpu())
        counts.append((target != IGNORE_INDEX).sum(1).cpu())
    return torch.cat(sums).double(), torch.cat(counts)


# ==== the LoRA parameters and their per-example gradients ========================================
def lora_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Model-level name -> parameter of adapter ``adapter_name``, in ``named_parameters`` order."""
    from lorakit.core.inject import adapter_modules

    mods = adapter_modules(model, adapter_name)
    if not mods:
        raise ConfigError(f"model has no adapter named {adapter_name!r}; inject one (warmup_lora does)")
    ids = {id(p) for m in mods.values() for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def example_loss(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ONE example (T,) with the adapter weights ``params``;
    the same value as ``model(input_ids[None], labels=labels[None]).loss`` (right padding
    with label -100 does not change it for a causal LM)."""
    from torch.func import functional_call

    logits = functional_call(model, params, args=(), kwargs={"input_ids": input_ids[None]}).logits[0]
    target = labels[1:]
    ce = nn.functional.cross_entropy(logits[:-1].float(), target.clamp_min(0), reduction="none")
    keep = (target != IGNORE_INDEX).to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)  # no label tokens: loss 0, gradient 0


def per_example_grads(model: nn.Module, params: dict[str, torch.Tensor],
                      batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """∇_θ ℓ(z_b; θ) for every row b of a right-padded batch, flattened: (B, D), D = Σ numel.

    θ are the tensors in ``params`` (model parameter names -> values; the rest of the model
    is used as is). One ``vmap(grad(example_loss))`` call; sdpa attention is run with its
    math backend, which has batching rules (the fused CPU kernels fall back to a loop).
    """
    from torch.func import grad, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = next(iter(params.values())).device
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    fn = vmap(grad(lambda p, i, lab: example_loss(model, p, i, lab)), in_dims=(None, 0, 0))
    with sdpa_kernel(SDPBackend.MATH):
        grads = fn({n: t.detach() for n, t in params.items()}, ids, labels)
    return torch.cat([grads[n].reshape(len(ids), -1).float() for n in params], dim=1)


def adam_direction(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """Γ = m̂/(√v̂ + ε) after one more Adam step with gradient g (each row of ``grads``).

    grads: (B, D); exp_avg, exp_avg_sq: (D,) Adam moments after ``step`` steps. Returns (B, D):
    exactly −Δθ/lr of torch's Adam/AdamW step (without weight decay) from that state.
    """
    b1, b2 = betas
    t = step + 1
    m = b1 * exp_avg + (1 - b1) * grads
    v = b2 * exp_avg_sq + (1 - b2) * grads.square()
    return (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)


# ==== warm-up ====================================================================================
@dataclass
class LessCheckpoint:
    """LoRA weights and AdamW state after one warm-up epoch; ``lr`` = mean lr of that epoch."""

    name: str
    step: int
    lr: float
    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    adam_step: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the weights and moments: identifies the checkpoint in store metadata."""
        h = hashlib.sha256()
        for part in (self.weights, self.exp_avg, self.exp_avg_sq):
            for n in sorted(part):
                h.update(n.encode())
                h.update(part[n].detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def flat_state(self, names: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [n for n in names if n not in self.exp_avg]
        if missing:
            raise ConfigError(f"checkpoint {self.name!r} has no Adam state for {missing[:3]} "
                              f"(and {max(0, len(missing) - 3)} more): was it warmed up on this adapter?")
        return tuple(torch.cat([d[n].reshape(-1).float() for n in names]).to(device)
                     for d in (self.exp_avg, self.exp_avg_sq))


@dataclass
class WarmupResult:
    """The warm-up run: the trained subset (dataset positions) and one checkpoint per epoch."""

    adapter_name: str
    subset: list[int]
    checkpoints: list[LessCheckpoint]
    losses: list[float]
    settings: dict = field(default_factory=dict)  # what produced it (compared when select() resumes)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as safetensors (weights, moments) + JSON (everything else); no pickles."""
        from safetensors.torch import save_file

        from lorakit.fsutil import atomic_dir

        path = Path(path)
        with atomic_dir(path) as tmp:
            info = {"adapter_name": self.adapter_name, "subset": self.subset, "losses": self.losses,
                    "settings": self.settings, "checkpoints": []}
            for k, c in enumerate(self.checkpoints):
                tensors = {f"weight/{n}": t.contiguous() for n, t in c.weights.items()}
                tensors |= {f"exp_avg/{n}": t.contiguous() for n, t in c.exp_avg.items()}
                tensors |= {f"exp_avg_sq/{n}": t.contiguous() for n, t in c.exp_avg_sq.items()}
                save_file(tensors, str(tmp / f"checkpoint-{k}.safetensors"))
                info["checkpoints"].append({"name": c.name, "step": c.step, "lr": c.lr, "adam_step": c.adam_step,
                                            "betas": list(c.betas), "eps": c.eps})
            (tmp / "warmup.json").write_text(json.dumps(info, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> WarmupResult:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "warmup.json").is_file():
            raise ConfigError(f"{path} holds no warmup.json (write it with WarmupResult.save)")
        info = json.loads((path / "warmup.json").read_text())
        ckpts = []
        for k, c in enumerate(info["checkpoints"]):
            t = load_file(str(path / f"checkpoint-{k}.safetensors"))
            w, m, v = (_strip(t, pre) for pre in ("weight/", "exp_avg/", "exp_avg_sq/"))
            ckpts.append(LessCheckpoint(c["name"], c["step"], c["lr"], w, m, v, c["adam_step"], tuple(c["betas"]),
                                        c["eps"]))
        return cls(info["adapter_name"], info["subset"], ckpts, info["losses"], info.get("settings", {}))


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)}


def warmup_subset(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` of range(n) (at least one), in increasing order."""
    k = max(1, round(fraction * n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def warmup_lora(model: nn.Module, dataset: Sequence, fraction: float = 0.05, *, config: LessConfig | None = None,
                lora=None, adapter_name: str = "less", progress: bool = False) -> WarmupResult:
    """Inject a LoRA named ``adapter_name`` and train it on a random ``fraction`` of ``dataset``.

    An explicit AdamW loop (see the module docstring for why not ``lorakit.train``): per
    epoch a seeded shuffle, right-padded batches, token-mean loss, clipping, a linear
    schedule with ``warmup_ratio`` warm-up (as HF's Trainer). After each epoch the LoRA
    weights and the AdamW moments are copied into a ``LessCheckpoint``. The adapter stays on
    the model with the last epoch's weights; the model's train/eval mode is restored.

    Args:
        model: a causal LM (decoder-only) without an adapter named ``adapter_name``.
        dataset: a sequence of examples (``encode_examples`` output, train.BlockDataset, ...).
        fraction: share of ``dataset`` to train on.
        config: epochs, lr, batch size, schedule, LoRA hyper-parameters and seed.
        lora: an AdapterConfig overriding ``config``'s r/alpha/dropout/target_modules.
    """
    import lorakit

    cfg = config or LessConfig()
    _check_fraction("fraction", fraction)
    n = len(dataset)
    if n == 0:
        raise ConfigError("warm-up needs a non-empty dataset")
    subset = warmup_subset(n, fraction, cfg.seed)
    examples = [_example(dataset[i], f"dataset[{i}]") for i in subset]
    device = next(model.parameters()).device
    # LoRA init and dropout draw from the global RNG: seed it, and restore it afterwards
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        lorakit.inject(model, lora if lora is not None else cfg.lora_config(), name=adapter_name)
        ckpts, losses = _warmup_loop(model, lora_parameters(model, adapter_name), examples, cfg, device, progress)
    return WarmupResult(adapter_name, subset, ckpts, losses, _warmup_settings(cfg, fraction, n, lora))


WARMUP_KEYS = ("epochs", "lr", "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "r", "alpha",
               "lora_dropout", "target_modules", "seed")


def _warmup_settings(cfg: LessConfig, fraction: float, n: int, lora) -> dict:
    out = {k: getattr(cfg, k) for k in WARMUP_KEYS} | {"fraction": fraction, "n": n}
    if lora is not None:
        out["lora"] = lora.to_dict()
    return json.loads(json.dumps(out))


def _warmup_loop(model: nn.Module, params: dict[str, nn.Parameter], examples: list, cfg: LessConfig,
                 device: torch.device, progress: bool) -> tuple[list[LessCheckpoint], list[float]]:
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    warm = math.ceil(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(  # transformers.get_linear_schedule_with_warmup
        opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    was_training = model.training
    model.train()
    ckpts, losses, step = [], [], 0
    try:
        bar = tqdm(total=total, desc="LESS warm-up", disable=not progress)
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(examples), generator=g).tolist()
            lrs = []
            for s in range(0, len(order), cfg.batch_size):
                chunk = [examples[j] for j in order[s:s + cfg.batch_size]]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                loss = model(**batch).loss  # mean over the batch's label tokens, as HF's Trainer
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
            ckpts.append(_checkpoint(f"epoch-{epoch + 1}", step, sum(lrs) / len(lrs), params, opt))
        bar.close()
    finally:
        model.train(was_training)
    return ckpts, losses


def _checkpoint(name: str, step: int, lr: float, params: dict[str, nn.Parameter], opt) -> LessCheckpoint:
    state = {n: opt.state[p] for n, p in params.items()}
    group = opt.param_groups[0]
    return LessCheckpoint(
        name=name, step=step, lr=lr,
        weights={n: p.detach().cpu().clone() for n, p in params.items()},
        exp_avg={n: s["exp_avg"].detach().cpu().clone() for n, s in state.items()},
        exp_avg_sq={n: s["exp_avg_sq"].detach().cpu().clone() for n, s in state.items()},
        adam_step=int(next(iter(state.values()))["step"]), betas=tuple(group["betas"]), eps=group["eps"])


# ==== random projection ==========================================================================
def jl_epsilon(n: int, d: int, delta: float) -> float:
    """ε such that, with probability ≥ 1 − δ, a ±1/√d projection to d dimensions keeps every
    pairwise inner product of n vectors within ε‖u‖‖v‖: ε = √(6 ln(2n(n−1)/δ)/d).

    Derivation: Achlioptas (2003) bounds each tail of ‖P̃ᵀx‖² for a unit x by
    exp(−d(ε²/4 − ε³/6)) ≤ exp(−dε²/6) for ε ≤ 1/2; polarisation ⟨u,v⟩ = (‖u+v‖² − ‖u−v‖²)/4
    turns (1±ε) norms of the n(n−1) vectors u_i ± u_j (unit u) into an inner-product error
    ≤ ε; a union bound gives δ = 2n(n−1)·exp(−dε²/6). Only meaningful when the result ≤ 1/2.
    """
    if n < 2 or d < 1 or not 0 < delta < 1:
        raise ConfigError(f"jl_epsilon needs n >= 2, d >= 1 and 0 < delta < 1, got n={n}, d={d}, delta={delta}")
    return math.sqrt(6.0 * math.log(2.0 * n * (n - 1) / delta) / d)


def _block_seed(seed: int, block: int) -> int:
    digest = hashlib.sha256(f"lorakit-rademacher:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RademacherProjector:
    """x (n, D) -> x P̃ (n, d) with P̃[i, j] iid ±1/√d, so E⟨P̃ᵀu, P̃ᵀv⟩ = ⟨u, v⟩.

    Rows of P̃ are generated in blocks of ``BLOCK_ROWS`` from a generator seeded by
    sha256(seed, block index), so P̃ is a function of (seed, D, d, generator device) alone —
    the same whatever the batch sizes — and only one (BLOCK_ROWS, d) block exists at a time.
    When all of P̃ takes at most ``cache_bytes`` it is kept after first use.
    Generation runs on ``device`` (CUDA generators are fast, but give another P̃ than the
    CPU one: stores record ``rng`` and are only compared with stores of the same rng).
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, seed: int = 0, device: str | torch.device = "cpu",
                 cache_bytes: int = 2**28):
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        self.in_dim, self.out_dim, self.seed = in_dim, out_dim, seed
        self.device = torch.device(device)
        self.n_blocks = math.ceil(in_dim / BLOCK_ROWS)
        self._cache: list[torch.Tensor] | None = [] if in_dim * out_dim * 4 <= cache_bytes else None

    @property
    def rng(self) -> str:
        return self.device.type

    def block(self, b: int) -> torch.Tensor:
        """Rows [b·BLOCK_ROWS, (b+1)·BLOCK_ROWS) of P̃: (rows, d) float32."""
        if self._cache is not None and b < len(self._cache):
            return self._cache[b]
        rows = min(BLOCK_ROWS, self.in_dim - b * BLOCK_ROWS)
        g = torch.Generator(device=self.device).manual_seed(_block_seed(self.seed, b))
        p = torch.randint(0, 2, (rows, self.out_dim), generator=g, device=self.device, dtype=torch.float32)
        p = p.mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(self.out_dim))
        if self._cache is not None and b == len(self._cache):
            self._cache.append(p)
        return p

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, d), float32, on the projector's device."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected (n, {self.in_dim}) inputs, got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        out = torch.zeros(x.shape[0], self.out_dim, device=self.device)
        for b in range(self.n_blocks):
            out.addmm_(x[:, b * BLOCK_ROWS:(b + 1) * BLOCK_ROWS], self.block(b))
        return out

    def matrix(self) -> torch.Tensor:
        """All of P̃ (D, d): for tests and small D only."""
        return torch.cat([self.block(b) for b in range(self.n_blocks)])


# ==== datastore ==================================================================================
class FeatureStore:
    """A read-only feature datastore: ``index.json`` + ``shard-NNNNN.safetensors`` files.

    Each shard holds ``features`` (rows, d), ``indices`` (rows,) int64 (dataset positions) and
    ``norms`` (rows,) float32 (norms before normalisation). Only the index is read on open;
    rows are sliced out of their shard files (safetensors ``get_slice``) when asked for.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "index.json"
        if not index.is_file():
            raise ConfigError(f"{self.path} is not a feature store (no index.json)")
        info = json.loads(index.read_text())
        if info.get("format") != FEATURE_FORMAT:
            raise ConfigError(f"{index}: format {info.get('format')!r}, expected {FEATURE_FORMAT!r}")
        self.info = info
        self.dim: int = info["dim"]
        self.meta: dict = info["meta"]
        self.complete: bool = info["complete"]
        self.shards: list[dict] = info["shards"]
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["rows"])

    def __len__(self) -> int:
        return self._starts[-1]

    def _rows(self, k: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, features) of rows [lo, hi) of shard k; reads only those rows from disk."""
        from safetensors import safe_open

        file = self.path / self.shards[k]["file"]
        if not file.is_file():
            raise ConfigError(f"{file} is missing: the feature store {self.path} is damaged")
        with safe_open(str(file), framework="pt") as f:
            feats = f.get_slice("features")
            if tuple(feats.get_shape()) != (self.shards[k]["rows"], self.dim):
                raise ConfigError(f"{file}: features {tuple(feats.get_shape())}, index says "
                                  f"({self.shards[k]['rows']}, {self.dim})")
            return f.get_slice("indices")[lo:hi], feats[lo:hi].float()

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (n,), features (n, d) float32) of rows [start, stop), reading only those rows."""
        start, stop = max(0, start), min(len(self), stop)
        idx, feats = [], []
        for k in range(len(self.shards)):
            a, b = self._starts[k], self._starts[k + 1]
            if b <= start or a >= stop:
                continue
            i, f = self._rows(k, max(start, a) - a, min(stop, b) - a)
            idx.append(i)
            feats.append(f)
        if not feats:
            return torch.empty(0, dtype=torch.long), torch.empty(0, self.dim)
        return torch.cat(idx), torch.cat(feats)

    def iter_blocks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first row, indices, features) per shard, or per ``rows`` rows."""
        if rows is None:
            for k in range(len(self.shards)):
                yield (self._starts[k], *self._rows(k, 0, self.shards[k]["rows"]))
            return
        check_positive_int("rows", rows)
        for a in range(0, len(self), rows):
            yield (a, *self.read(a, a + rows))

    def features(self) -> torch.Tensor:
        """All features (n, d) float32 — loads the whole store."""
        return self.read(0, len(self))[1]

    def indices(self) -> torch.Tensor:
        return self.read(0, len(self))[0]


class FeatureWriter:
    """Append features to a datastore shard by shard; every shard write is followed by an
    atomic rewrite of ``index.json``, so an interrupted run leaves a valid prefix that
    ``resume=True`` continues (same ``meta`` required) and ``resume=False`` replaces."""

    def __init__(self, path: str | os.PathLike, dim: int, meta: dict, dtype: str = "float16",
                 shard_size: int = 1024, resume: bool = True):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.path, self.dim, self.meta, self.dtype = Path(path), dim, json.loads(json.dumps(meta)), dtype
        self.shard_size = check_positive_int("shard_size", shard_size)
        self.shards: list[dict] = []
        self.count = 0
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if (self.path / "index.json").is_file():
            old = FeatureStore(self.path)
            same = old.dim == dim and old.meta == self.meta and old.info.get("dtype") == dtype
            if resume and not same:
                diff = sorted(k for k in set(old.meta) | set(self.meta) if old.meta.get(k) != self.meta.get(k))
                raise ConfigError(f"{self.path} holds features of another run (differs in {diff or ['dim/dtype']}); "
                                  "pass resume=False to overwrite it or use another directory")
            if resume:
                self.shards, self.count = list(old.shards), len(old)
            else:
                for f in self.path.glob("shard-*.safetensors"):
                    f.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_index(complete=False)

    def add(self, indices: torch.Tensor, features: torch.Tensor, norms: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim or not len(indices) == len(features) == len(norms):
            raise ValueError(f"expected indices (n,), features (n, {self.dim}), norms (n,); got "
                             f"{tuple(indices.shape)}, {tuple(features.shape)}, {tuple(norms.shape)}")
        self._buf.append((indices.long().cpu(), features.to(_DTYPES[self.dtype]).cpu(), norms.float().cpu()))
        while sum(len(b[0]) for b in self._buf) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        from safetensors.torch import save_file

        idx, feats, norms = (torch.cat(parts) for parts in zip(*self._buf))
        rows = min(rows, len(idx))
        if rows == 0:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        tmp = self.path / f".{name}.tmp"
        save_file({"indices": idx[:rows].contiguous(), "features": feats[:rows].contiguous(),
                   "norms": norms[:rows].contiguous()}, str(tmp))
        os.replace(tmp, self.path / name)
        self.shards.append({"file": name, "rows": rows})
        self.count += rows
        self._buf = [(idx[rows:], feats[rows:], norms[rows:])] if rows < len(idx) else []
        self._write_index(complete=False)

    def _write_index(self, complete: bool) -> None:
        info = {"format": FEATURE_FORMAT, "version": 1, "dim": self.dim, "dtype": self.dtype, "count": self.count,
                "complete": complete, "meta": self.meta, "shards": self.shards}
        tmp = self.path / ".index.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, self.path / "index.json")

    def close(self, complete: bool = True) -> FeatureStore:
        """Write what is buffered as a last (short) shard; mark the store complete."""
        if self._buf:
            self._flush(sum(len(b[0]) for b in self._buf))
        self._write_index(complete=complete)
        return FeatureStore(self.path)


# ==== gradient features ==========================================================================
KINDS = ("adam", "sgd")


def collect_features(model: nn.Module, dataset: Sequence, path: str | os.PathLike, *, adapter_name: str = "less",
                     kind: str = "sgd", checkpoint: LessCheckpoint | None = None, proj_dim: int = 8192, seed: int = 0,
                     grad_batch_size: int = 8, shard_size: int = 1024, dtype: str = "float16", resume: bool = True,
                     buffer_mb: float = 1024.0, progress: bool = False) -> FeatureStore:
    """Projected, normalised LoRA gradient features of every example, streamed to ``path``.

    kind="adam": the Adam update direction Γ from ``checkpoint``'s moments (training pool);
    kind="sgd": the plain gradient (target examples). With a ``checkpoint`` its LoRA weights
    are loaded into the adapter for the computation and the previous weights put back after.
    The dataset is read ``grad_batch_size`` examples at a time; full-size gradients are
    projected once ``shard_size`` rows or ``buffer_mb`` MiB of them are pending (each
    projection call regenerates P̃ unless it is cached, so larger buffers amortise that), and
    features are written every ``shard_size`` rows: the data never has to fit in memory; a store interrupted half-way is
    continued from its last complete shard (``resume=True``). Resuming checks the store's
    metadata (kind, checkpoint fingerprint, projection, LoRA layout, dataset length) but not
    the examples themselves: resume only over the same data.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "adam" and checkpoint is None:
        raise ConfigError("kind='adam' needs the warm-up checkpoint whose Adam moments precondition the gradients")
    check_positive_int("grad_batch_size", grad_batch_size)
    if isinstance(buffer_mb, bool) or not isinstance(buffer_mb, (int, float)) or not buffer_mb > 0:
        raise ConfigError(f"buffer_mb must be a positive number, got {buffer_mb!r}")
    params = lora_parameters(model, adapter_name)
    names = list(params)
    grad_dim = sum(p.numel() for p in params.values())
    device = next(iter(params.values())).device
    proj = RademacherProjector(grad_dim, proj_dim, seed, device=device)
    layout = hashlib.sha256(json.dumps([[n, list(p.shape)] for n, p in params.items()]).encode()).hexdigest()[:16]
    meta = {"kind": kind, "checkpoint": checkpoint.name if checkpoint else None,
            "checkpoint_sha": checkpoint.fingerprint() if checkpoint else None, "seed": seed, "rng": proj.rng,
            "grad_dim": grad_dim, "layout": layout, "n": len(dataset)}
    writer = FeatureWriter(path, proj_dim, meta, dtype=dtype, shard_size=shard_size, resume=resume)
    if writer.count >= len(dataset):
        return writer.close()
    saved = {n: p.detach().clone() for n, p in params.items()} if checkpoint is not None else None
    if checkpoint is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(checkpoint.weights[n].to(p.device, p.dtype))
        if kind == "adam":
            m, v = checkpoint.flat_state(names, device)
    was_training = model.training
    model.eval()  # dropout off: the gradient of the deterministic loss
    try:
        from tqdm.auto import tqdm

        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        bar = tqdm(total=len(dataset), initial=writer.count, desc=f"LESS {kind} features", disable=not progress)
        for start in range(writer.count, len(dataset), grad_batch_size):
            pos = list(range(start, min(start + grad_batch_size, len(dataset))))
            batch = collate([_example(dataset[i], f"dataset[{i}]") for i in pos])
            g = per_example_grads(model, params, batch)  # (B, D)
            if kind == "adam":
                g = adam_direction(g, m, v, checkpoint.adam_step, checkpoint.betas, checkpoint.eps)
            pending.append((torch.tensor(pos), g))
            rows = sum(len(p[0]) for p in pending)
            if rows >= shard_size or rows * grad_dim * 4 >= buffer_mb * 2**20 or pos[-1] == len(dataset) - 1:
                idx, full = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
                z = proj.project(full)  # one pass over P̃ per buffer
                norms = z.norm(dim=1)
                writer.add(idx, z / norms.clamp_min(1e-12)[:, None], norms)
                pending = []
            bar.update(len(pos))
        bar.close()
    finally:
        model.train(was_training)
        if saved is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
    return writer.close()


# ==== scores and selection =======================================================================
def _groups(target_groups: Sequence | None, m: int) -> tuple[torch.Tensor, list]:
    """(m, K) averaging matrix over target groups (identity without groups) and group names."""
    if target_groups is None:
        return torch.eye(m), list(range(m))
    if len(target_groups) != m:
        raise ConfigError(f"target_groups has {len(target_groups)} entries for {m} target examples")
    names = list(dict.fromkeys(target_groups))
    a = torch.zeros(m, len(names))
    for j, gname in enumerate(target_groups):
        a[j, names.index(gname)] = 1.0
    return a / a.sum(0, keepdim=True), names


def less_scores(train: Sequence[FeatureStore], target: Sequence[FeatureStore], weights: Sequence[float] | None = None,
                target_groups: Sequence | None = None, block_rows: int = 4096) -> torch.Tensor:
    """Inf(z) = max_k mean_{z'∈G_k} Σ_i w_i ⟨φ_i(z), φ'_i(z')⟩ for every training row: (n,).

    ``train[i]`` / ``target[i]`` are the stores of checkpoint i (features normalised, so the
    inner products are cosines); ``weights`` default to uniform and are renormalised to sum
    to 1. The training stores are streamed ``block_rows`` rows at a time.
    """
    if not train or len(train) != len(target):
        raise ConfigError(f"need one training and one target store per checkpoint, got {len(train)} and {len(target)}")
    w = _check_weights(weights if weights is not None else [1.0] * len(train), len(train))
    n, m = len(train[0]), len(target[0])
    for i, (a, b) in enumerate(zip(train, target)):
        if not (a.complete and b.complete):
            raise ConfigError(f"checkpoint {i}: feature store {a.path if not a.complete else b.path} is incomplete; "
                              "finish it with collect_features(..., resume=True)")
        if len(a) != n or len(b) != m:
            raise ConfigError(f"checkpoint {i}: {len(a)} training / {len(b)} target rows, expected {n} / {m}")
        same = ("seed", "rng", "grad_dim", "layout")
        if a.dim != b.dim or any(a.meta.get(k) != b.meta.get(k) for k in same):
            raise ConfigError(f"checkpoint {i}: {a.path} and {b.path} were not projected alike "
                              f"(dim/{'/'.join(same)} differ): their features cannot be compared")
    avg, _ = _groups(target_groups, m)
    targets = [t.features() for t in target]  # (m, d) each: the target set is small
    scores = torch.empty(n)
    for a in range(0, n, block_rows):
        s = sum(wi * (tr.read(a, a + block_rows)[1] @ tg.T) for wi, tr, tg in zip(w, train, targets))  # (rows, m)
        scores[a:a + block_rows] = (s @ avg).max(dim=1).values
    return scores


def top_fraction(scores: torch.Tensor, fraction: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Positions of the top ``round(fraction·n)`` (≥ 1) scores, best first.

    Equal scores are ordered by a seeded random permutation (not by position, which would
    favour the start of the pool), so the result depends only on (scores, fraction, seed).
    NaN scores rank last.
    """
    _check_fraction("fraction", fraction)
    if scores.dim() != 1 or len(scores) == 0:
        raise ConfigError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    k = max(1, round(fraction * len(scores)))
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    s = torch.nan_to_num(scores.double()[perm], nan=-math.inf)
    order = torch.sort(s, descending=True, stable=True).indices
    return perm[order[:k]]


@dataclass
class LessSelection:
    """Selected dataset positions (best first), every example's score, and the warm-up run."""

    indices: torch.Tensor
    scores: torch.Tensor
    warmup: WarmupResult
    work_dir: Path


def select(model: nn.Module, train_data: Sequence, target_data: Sequence, config: LessConfig | None = None, *,
           work_dir: str | os.PathLike, warmup: WarmupResult | None = None, target_groups: Sequence | None = None,
           lora=None, resume: bool = True, progress: bool = False) -> LessSelection:
    """LESS end to end: warm up a LoRA, collect features per checkpoint, score, select.

    Args:
        model: a causal LM; it is left as found (a warm-up adapter this call adds is removed).
        train_data / target_data: sequences of examples (see ``encode_examples``).
        config: hyper-parameters (``LessConfig()`` defaults: the paper's).
        work_dir: feature stores go to ``work_dir/<checkpoint>/{train,target}``, the warm-up
            run to ``work_dir/warmup``, the scores to ``work_dir/scores.safetensors`` and the
            selection to ``work_dir/selection.json``.
        warmup: an earlier ``warmup_lora`` result whose adapter is still on ``model``
            (skips the warm-up).
        target_groups: one label per target example (e.g. its subtask): scores average within
            a group and take the max over groups; default: max over target examples.
        lora: AdapterConfig for the warm-up LoRA, overriding config's r/alpha/targets.
        resume: continue interrupted feature stores in ``work_dir``.
    """
    from safetensors.torch import save_file

    import lorakit

    cfg = config or LessConfig()
    if len(train_data) == 0 or len(target_data) == 0:
        raise ConfigError(f"need training and target examples, got {len(train_data)} and {len(target_data)}")
    work = Path(work_dir)
    own = warmup is None
    names_before = set(lorakit.adapter_names(model))
    try:
        if own:
            wpath = work / "warmup"
            if resume and (wpath / "warmup.json").is_file():
                warmup = WarmupResult.load(wpath)
                want = _warmup_settings(cfg, cfg.warmup_fraction, len(train_data), lora)
                if warmup.settings != want:
                    diff = sorted(k for k in set(want) | set(warmup.settings) if want.get(k) != warmup.settings.get(k))
                    raise ConfigError(f"{wpath} holds a warm-up run with other settings ({diff}); "
                                      "pass resume=False or use another work_dir")
                lorakit.inject(model, lora if lora is not None else cfg.lora_config(), name=warmup.adapter_name)
            else:
                warmup = warmup_lora(model, train_data, cfg.warmup_fraction, config=cfg, lora=lora, progress=progress)
                warmup.save(wpath)
        train_stores, target_stores = [], []
        for c in warmup.checkpoints:
            kw = {"adapter_name": warmup.adapter_name, "checkpoint": c, "proj_dim": cfg.proj_dim, "seed": cfg.seed,
                      "grad_batch_size": cfg.grad_batch_size, "shard_size": cfg.shard_size, "dtype": cfg.dtype,
                      "resume": resume, "progress": progress}
            train_stores.append(collect_features(model, train_data, work / c.name / "train", kind="adam", **kw))
            target_stores.append(collect_features(model, target_data, work / c.name / "target", kind="sgd", **kw))
        weights = cfg.checkpoint_weights if cfg.checkpoint_weights is not None else [c.lr for c in warmup.checkpoints]
        scores = less_scores(train_stores, target_stores, weights, target_groups)
        indices = top_fraction(scores, cfg.fraction, cfg.seed)
    finally:
        for name in set(lorakit.adapter_names(model)) - names_before:  # the warm-up adapter this call added
            lorakit.delete(model, name)
    save_file({"scores": scores.contiguous()}, str(work / "scores.safetensors"))
    info = {"method": "less", "paper": "arXiv:2402.04333", "config": dataclasses.asdict(cfg),
            "checkpoints": [{"name": c.name, "step": c.step, "lr": c.lr} for c in warmup.checkpoints],
            "n_train": len(train_data), "n_target": len(target_data),
            "selected": indices.tolist(), "selected_scores": scores[indices].tolist()}
    (work / "selection.json").write_text(json.dumps(info, indent=1) + "\n")
    return LessSelection(indices, scores, warmup, work)


# ==== file-to-file entry point (for a `lorakit select` verb) =====================================
@dataclass
class SelectConfig(LessConfig):
    """``LessConfig`` plus where things are. train / target: .jsonl (records as in
    ``encode_examples``) or plain text (one example per paragraph); output: the selected
    training records as JSONL, best first; group_field: a target-record field naming its
    subtask (scores average within a subtask and take the max over subtasks)."""

    model: str = "smollm2-135m"
    train: str = ""
    target: str = ""
    output: str = "runs/less/selected.jsonl"
    work_dir: str = "runs/less"
    max_length: int = 512
    group_field: str | None = None
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("train", "target"):
            p = getattr(self, name)
            if not p or not Path(p).exists():
                raise ConfigError(f"{name} must name an existing .jsonl or text file, got {p!r}")
        check_positive_int("max_length", self.max_length)


def read_records(path: str | os.PathLike) -> list[Any]:
    """The records of a .jsonl/.json file (one JSON value per line), or {"text"} per paragraph."""
    from lorakit.data.text import JSONL_SUFFIXES, load_texts, read_jsonl

    path = Path(path)
    if path.suffix not in JSONL_SUFFIXES:
        return [{"text": t} for t in load_texts(path)]
    return [rec for _, rec in read_jsonl(path)]


def run_select(cfg: SelectConfig) -> LessSelection:
    """Load the model, read and encode both files, run ``select``, write the selected records."""
    from lorakit.models import load_model

    model, tokenizer = load_model(cfg.model)
    train_records, target_records = read_records(cfg.train), read_records(cfg.target)
    groups = None
    if cfg.group_field is not None:
        missing = [i for i, r in enumerate(target_records) if not isinstance(r, dict) or cfg.group_field not in r]
        if missing:
            raise ConfigError(f"{cfg.target}: records {missing[:5]} have no field {cfg.group_field!r}")
        groups = [str(r[cfg.group_field]) for r in target_records]
    train = encode_examples(tokenizer, train_records, cfg.max_length)
    target = encode_examples(tokenizer, target_records, cfg.max_length)
    less_cfg = LessConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(LessConfig)})
    result = select(model, train, target, less_cfg, work_dir=cfg.work_dir, target_groups=groups,
                    resume=cfg.resume, progress=cfg.progress)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(train_records[i], ensure_ascii=False) + "\n" for i in result.indices.tolist()))
    os.replace(tmp, out)
    return result


__all__ = [
    "FeatureStore",
    "FeatureWriter",
    "LessCheckpoint",
    "LessConfig",
    "LessSelection",
    "RademacherProjector",
    "SelectConfig",
    "WarmupResult",
    "adam_direction",
    "collate",
    "collect_features",
    "encode_examples",
    "example_loss",
    "jl_epsilon",
    "less_scores",
    "lora_parameters",
    "per_example_grads",
    "prompt_response",
    "read_records",
    "response_nll",
    "run_select",
    "select",
    "top_fraction",
    "warmup_lora",
    "warmup_subset",
]
