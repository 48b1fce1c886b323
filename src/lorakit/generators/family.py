"""Task families for adapter generators, and what both generators share: task embeddings,
per-task LoRAs (the training set of ICM-LoRA and the "trained LoRA" reference), and losses.

A *task* is a set of fixed-length token sequences from one distribution, split into
    context (n_ctx, T):  what a generator sees (the task description / in-context examples)
    train   (n_tr, T):   what a per-task LoRA is fine-tuned on (and GenerativeAdapter's
                         completion targets during generator training)
    eval    (n_ev, T):   held-out sequences: the task loss reported for every method
All rows are full length (no padding), so losses are plain token-mean cross-entropies.

Two families ship here:

`mixture_tasks` (synthetic, any vocabulary: tiny random models in tests): K basis unigram
distributions p_k over disjoint token blocks; task τ draws weights w_τ ~ Dirichlet(a·1) and
every token of its sequences i.i.d. from p_τ = Σ_k w_τk p_k. The optimal loss of task τ is the
entropy H(p_τ); held-out tasks are new mixtures of the same bases, so a generator can only
beat the *mean* LoRA on them by reading the mixture off the context.

`text_mixture_tasks` (real corpora, e.g. BBC News topics or Bible books on SmolLM2-135M): the
same construction over groups of documents: each sequence is a window of a document whose
group was drawn from w_τ.

Why per-task LoRAs share one seed: LoRA factors are only defined up to B A = (B M)(M⁻¹ A), so
LoRAs trained from different initialisations are not comparable coordinate-wise. Training
every task's LoRA from the same initial (A₀, B₀ = 0) keeps them in one chart of LoRA space
(the reference trains each task's LoRA from PEFT's default seeded init for the same reason),
which is what lets a CVAE model them as vectors and makes their average meaningful.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import lorakit
from lorakit.core.adapter import check_positive_int
from lorakit.core.inject import adapted_layers, adapter_modules, state
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.lora import LoraConfig

POOLS = ("mean", "last")


@dataclass
class Task:
    """One task of a family: context / train / eval token ids, each (rows, T) int64."""

    name: str
    context: torch.Tensor
    train: torch.Tensor
    eval: torch.Tensor
    info: dict = field(default_factory=dict)  # e.g. {"weights": [...]}: how the task was made

    def __post_init__(self) -> None:
        for part in ("context", "train", "eval"):
            t = getattr(self, part)
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0 or t.shape[1] < 2 \
                    or t.dtype not in (torch.int64, torch.int32):
                raise ConfigError(f"task {self.name!r}: {part} must be a (rows >= 1, length >= 2) integer tensor "
                                  f"of token ids, got {getattr(t, 'shape', type(t).__name__)} "
                                  f"{getattr(t, 'dtype', '')}")
            setattr(self, part, t.long())


def _check_prob(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def mixture_tasks(n_tasks: int, vocab_size: int = 128, n_basis: int = 4, tokens_per_basis: int = 8,
                  seq_len: int = 16, n_context: int = 4, n_train: int = 32, n_eval: int = 16,
                  concentration: float = 1.0, first_token: int = 1, seed: int = 0) -> list[Task]:
    """`n_tasks` synthetic unigram-mixture tasks (see the module docstring).

    Basis k owns tokens [first_token + k·m, first_token + (k+1)·m), m = tokens_per_basis, with
    Zipf probabilities ∝ 1/(rank+1) in a seeded random order. `info` holds the weights w_τ,
    the mixture p_τ (vocab_size,) and its entropy (the task's optimal loss).
    """
    for name, v in (("n_tasks", n_tasks), ("vocab_size", vocab_size), ("n_basis", n_basis),
                    ("tokens_per_basis", tokens_per_basis), ("n_context", n_context),
                    ("n_train", n_train), ("n_eval", n_eval)):
        check_positive_int(name, v)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if isinstance(first_token, bool) or not isinstance(first_token, int) or first_token < 0:
        raise ConfigError(f"first_token must be an integer >= 0, got {first_token!r}")
    if first_token + n_basis * tokens_per_basis > vocab_size:
        raise ConfigError(f"n_basis·tokens_per_basis = {n_basis * tokens_per_basis} tokens from {first_token} "
                          f"do not fit in vocab_size={vocab_size}")
    concentration = _check_prob("concentration", concentration)
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, tokens_per_basis + 1, dtype=torch.float64)
    basis = torch.zeros(n_basis, vocab_size, dtype=torch.float64)  # (K, V) rows sum to 1
    for k in range(n_basis):
        lo = first_token + k * tokens_per_basis
        basis[k, lo: lo + tokens_per_basis] = (zipf / zipf.sum())[torch.randperm(tokens_per_basis, generator=g)]
    alpha = torch.full((n_basis,), concentration, dtype=torch.float64)
    tasks = []
    for i in range(n_tasks):
        gam = _gamma(alpha, g)  # Dirichlet(α·1) = normalised Gamma(α) draws, from our own generator
        w = gam / gam.sum()  # (K,)
        p = w @ basis  # (V,)
        rows = n_context + n_train + n_eval
        ids = torch.multinomial(p.float(), rows * seq_len, replacement=True, generator=g).view(rows, seq_len)
        ent = float(-(p[p > 0] * p[p > 0].log()).sum())
        tasks.append(Task(f"mix{i}", ids[:n_context], ids[n_context:n_context + n_train],
                          ids[n_context + n_train:],
                          {"weights": w.tolist(), "probs": p.float(), "entropy": ent}))
    return tasks


def _gamma(alpha: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) samples from a seeded generator (Marsaglia–Tsang, boosted for alpha < 1)."""
    out = torch.empty_like(alpha)
    for j, a in enumerate(alpha.tolist()):
        boost = a < 1.0
        d = (a + 1.0 if boost else a) - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        while True:
            x = float(torch.randn((), generator=g, dtype=torch.float64))
            v = (1.0 + c * x) ** 3
            u = float(torch.rand((), generator=g, dtype=torch.float64))
            if v > 0 and math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
                break
        s = d * v
        if boost:
            s *= float(torch.rand((), generator=g, dtype=torch.float64)) ** (1.0 / a)
        out[j] = s
    return out


def text_mixture_tasks(groups: Mapping[str, Sequence[str]], tokenizer, n_tasks: int, seq_len: int = 64,
                       n_context: int = 4, n_train: int = 32, n_eval: int = 16, concentration: float = 1.0,
                       seed: int = 0) -> list[Task]:
    """Tasks that mix groups of real documents (e.g. BBC topics, Bible books).

    Each group's documents are tokenized once (no special tokens); a sequence of task τ is a
    random `seq_len` window of a document from group g ~ w_τ (documents shorter than seq_len
    are skipped). `info` holds the weights by group name.
    """
    check_positive_int("n_tasks", n_tasks)
    for name, v in (("n_context", n_context), ("n_train", n_train), ("n_eval", n_eval)):
        check_positive_int(name, v)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    concentration = _check_prob("concentration", concentration)
    if not isinstance(groups, Mapping) or len(groups) < 2:
        raise ConfigError(f"groups must map at least 2 group names to lists of texts, got {type(groups).__name__}"
                          f" with {len(groups) if isinstance(groups, Mapping) else 0} groups")
    names = sorted(groups)
    docs: dict[str, list[list[int]]] = {}
    for name in names:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in groups[name]]
        docs[name] = [d for d in ids if len(d) >= seq_len]
        if not docs[name]:
            raise ConfigError(f"group {name!r} has no document of at least seq_len={seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    alpha = torch.full((len(names),), concentration, dtype=torch.float64)
    tasks = []
    for i in range(n_tasks):
        gam = _gamma(alpha, g)
        w = gam / gam.sum()
        rows = []
        for _ in range(n_context + n_train + n_eval):
            grp = names[int(torch.multinomial(w.float(), 1, generator=g))]
            doc = docs[grp][int(torch.randint(len(docs[grp]), (1,), generator=g))]
            start = int(torch.randint(len(doc) - seq_len + 1, (1,), generator=g))
            rows.append(doc[start: start + seq_len])
        ids = torch.tensor(rows, dtype=torch.long)
        tasks.append(Task(f"text{i}", ids[:n_context], ids[n_context:n_context + n_train],
                          ids[n_context + n_train:], {"weights": dict(zip(names, w.tolist()))}))
    return tasks


# -- running the base model ------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def base_only(model: nn.Module):
    """Inside the block the model runs without any of its adapters (none may be merged)."""
    merged = sorted({n for layer in adapted_layers(model).values() for n in layer.merged})
    if merged:
        raise AdapterError(f"adapters {merged} are merged into the base weights, so the base model cannot be run "
                           "alone; unmerge them first (lorakit.unmerge)")
    if not state(model).configs:
        yield model
        return
    names = lorakit.adapter_names(model)
    active = list(state(model).active)
    lorakit.activate(model, [])
    try:
        yield model
    finally:
        lorakit.activate(model, [n for n in active if n in names])


@torch.no_grad()
def hidden_states(model: nn.Module, ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One forward pass of the base model (adapters off): per-layer hidden states, each (n, T, d).

    Entry i is the input of transformer block i (entry 0: embeddings), the last one the final
    (normed) output, as transformers' `output_hidden_states` returns them. `attention_mask`
    (n, T) marks real tokens (1) and padding (0), as for the model itself.
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(_device(model))}
    with base_only(model):
        out = model(input_ids=ids.to(_device(model)), output_hidden_states=True, **kwargs)
    if getattr(out, "hidden_states", None) is None:
        raise ConfigError(f"{type(model).__name__} returned no hidden_states; adapter generators need a "
                          "transformers model that supports output_hidden_states=True")
    return tuple(h.float() for h in out.hidden_states)


def pool_states(h: torch.Tensor, pool: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(n, T, d) states of n context rows -> (d,): mean over rows of the row summary
    ("mean": mean over the row's tokens; "last": its last token's state, ICM-LoRA's choice).
    `mask` (n, T): 1 for real tokens; padded positions are skipped (left or right padding)."""
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    if mask is None:
        return h.mean(dim=(0, 1)) if pool == "mean" else h[:, -1].mean(0)
    m = mask.to(h.device, h.dtype)
    if (m.sum(1) == 0).any():
        raise ConfigError("attention_mask has a row without any real token")
    if pool == "mean":
        return ((h * m[..., None]).sum(1) / m.sum(1, keepdim=True)).mean(0)
    last = h.shape[1] - 1 - m.flip(1).argmax(1)  # (n,) position of each row's last real token
    return h[torch.arange(h.shape[0], device=h.device), last].mean(0)


def task_embedding(model: nn.Module, context: torch.Tensor, pool: str = "mean", layer: int = -1,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The task vector (d,): base-model hidden states of the context rows at `layer` (default
    the last, after the final norm), pooled per row (`pool_states`) and averaged over rows."""
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
    hs = hidden_states(model, context, attention_mask)
    if not -len(hs) <= layer < len(hs):
        raise ConfigError(f"layer {layer} is out of range for a model with {len(hs)} hidden-state entries")
    return pool_states(hs[layer], pool, attention_mask)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy of `model` on full-length rows `ids` (n, T)."""
    ids = ids.to(_device(model))
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def eval_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 64) -> float:
    """`lm_loss` over all rows of `ids`, in batches (equal-length rows: the mean of batch means,
    weighted by rows, is the token mean)."""
    total, n = 0.0, ids.shape[0]
    for i in range(0, n, batch_size):
        chunk = ids[i: i + batch_size]
        total += float(lm_loss(model, chunk)) * chunk.shape[0]
    return total / n


# -- per-task LoRAs ----------------------------------------------------------------------------
@dataclass
class TaskLoraConfig:
    """How each task's own LoRA is trained (ICM-LoRA's training set; the reference LoRA).

    r, alpha, target: the LoRA (every task uses the same, from the same seeded init);
    steps, lr, batch_size: Adam on the task's train rows; snapshots: how many parameter
    snapshots to keep per task, taken every `snapshot_every` steps up to the last step
    (ICM-LoRA's reference keeps the checkpoints of many epochs as samples of one task);
    seed: the LoRA init and the batch order.
    """

    r: int = 2
    alpha: float = 4.0
    target: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    snapshots: int = 5
    snapshot_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("r", "steps", "batch_size", "snapshots", "snapshot_every"):
            check_positive_int(name, getattr(self, name))
        _check_prob("alpha", self.alpha)
        _check_prob("lr", self.lr)
        if (self.snapshots - 1) * self.snapshot_every >= self.steps:
            raise ConfigError(f"snapshots={self.snapshots} every {self.snapshot_every} steps need more than "
                              f"{(self.snapshots - 1) * self.snapshot_every} steps, got steps={self.steps}")
        self.lora_config()  # validates target

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=float(self.alpha), target=self.target)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors as {"<module path>.<param>": tensor (cpu, float32 copy)}."""
    return {f"{p}.{k}": t.detach().float().cpu().clone()
            for p, a in adapter_modules(model, name).items() for k, t in a.state_dict().items()}


@torch.no_grad()
def set_adapter_state(model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` (keys as in `adapter_state`) into adapter `name`; every key must match."""
    mods = adapter_modules(model, name)
    expected = {f"{p}.{k}": t for p, a in mods.items() for k, t in a.state_dict().items()}
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ConfigError(f"adapter {name!r}: tensors do not match its parameters (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ConfigError(f"adapter {name!r}: {key} has shape {tuple(t.shape)}, expected "
                              f"{tuple(expected[key].shape)}")
        expected[key].copy_(t.to(expected[key].dtype))


@contextlib.contextmanager
def only_active(model: nn.Module, name: str):
    """Inside the block exactly adapter `name` is active; the previous active set comes back."""
    before = list(state(model).active)
    lorakit.activate(model, [name])
    try:
        yield model
    finally:
        lorakit.activate(model, [n for n in before if n in state(model).configs])


def inject_seeded(model: nn.Module, config: LoraConfig, name: str, seed: int) -> None:
    """Inject LoRA `name` with its random init drawn from `seed` (global RNG left untouched)."""
    devices = [_device(model)] if _device(model).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        lorakit.inject(model, config, name=name, activate=False)


def inject_generated(model: nn.Module, config: LoraConfig, name: str, seed: int,
                     tensors: Mapping[str, torch.Tensor], activate: bool = True) -> nn.Module:
    """Inject LoRA `name` (seeded init, then overwritten) holding the generated `tensors`; on a
    mismatch the adapter is removed again. With `activate` it joins the active adapters."""
    from lorakit.core.inject import state

    inject_seeded(model, config, name, seed)
    try:
        set_adapter_state(model, name, tensors)
    except ConfigError:
        lorakit.delete(model, name)
        raise
    if activate:
        lorakit.activate(model, list(dict.fromkeys(state(model).active + [name])))
    return model


def train_task_lora(model: nn.Module, task: Task, config: TaskLoraConfig,
                    name: str = "_task_lora") -> list[dict[str, torch.Tensor]]:
    """Fine-tune a LoRA on `task.train` and return its parameter snapshots (oldest first, the
    last one is the final LoRA). The model is left as it was (the adapter is deleted)."""
    inject_seeded(model, config.lora_config(), name, config.seed)
    snaps_at = {config.steps - i * config.snapshot_every for i in range(config.snapshots)}
    snaps: list[dict[str, torch.Tensor]] = []
    g = torch.Generator().manual_seed(config.seed)
    try:
        params = [p for a in adapter_modules(model, name).values() for p in a.parameters()]
        opt = torch.optim.Adam(params, lr=config.lr)
        with only_active(model, name):
            for step in range(1, config.steps + 1):
                rows = torch.randint(task.train.shape[0], (config.batch_size,), generator=g)
                opt.zero_grad(set_to_none=True)
                lm_loss(model, task.train[rows]).backward()
                opt.step()
                if step in snaps_at:
                    snaps.append(adapter_state(model, name))
    finally:
        lorakit.delete(model, name)
    return snaps


def train_task_loras(model: nn.Module, tasks: Sequence[Task], config: TaskLoraConfig) -> list[list[dict]]:
    """`train_task_lora` for every task (same seed: one shared init and batch order)."""
    return [train_task_lora(model, t, config) for t in tasks]


def eval_with_state(model: nn.Module, task: Task, config: TaskLoraConfig | LoraConfig,
                    tensors: Mapping[str, torch.Tensor], name: str = "_eval_lora") -> float:
    """Eval loss of `task` with a LoRA of `config` holding `tensors` (then removed)."""
    cfg = config.lora_config() if isinstance(config, TaskLoraConfig) else config
    lorakit.inject(model, cfg, name=name, activate=False)
    try:
        set_adapter_state(model, name, tensors)
        with only_active(model, name):
            return eval_loss(model, task.eval)
    finally:
        lorakit.delete(model, name)


__all__ = [
    "POOLS", "Task", "TaskLoraConfig", "adapter_state", "base_only", "eval_loss", "eval_with_state",
    "hidden_states", "inject_seeded", "lm_loss", "mixture_tasks", "only_active", "pool_states",
    "set_adapter_state", "task_embedding", "text_mixture_tasks", "train_task_lora", "train_task_loras",
]
