"""GenerativeAdapter: map a context to a LoRA in one forward pass (Chen et al., "Generative
Adapter: Contextualizing Language Models in Parameters with A Single Forward Pass",
arXiv:2411.05877).

The frozen base model reads the context once; for every adapted linear layer W0 (d_out, d_in)
in transformer block l, a small generator turns the context's hidden states at the input of
block l, h_1..h_N (d each, all context tokens), into a low-rank update:

    ĥ_t = RMSNorm_γ(h_t)                               (d,)       learned gain γ
    S   = Σ_t (A₂ ĥ_t)(A₃ ĥ_t)ᵀ                        (R1, R2)   outer products, accumulated
    Ŝ   = Φ(S)       svd:       U Vᵀ  where S = U Σ Vᵀ  (orthogonal "polar" factor; default)
                     frobenius: S / ‖S‖_F
                     spectral:  S / σ_max(S)
    ΔW  = (α / R2) · B Ŝᵀ A₁                          (d_out, d_in), rank ≤ min(R1, R2)

with trainable A₁ (R1, d_in), A₂ (R1, d), A₃ (R2, d), B (d_out, R2) per layer (B = 0 at init,
so a fresh generator emits ΔW = 0). S is a sum over tokens, so the context is consumed in one
pass (and could be streamed: S accumulates). The output is a plain LoRA of rank R2:

    A = Ŝᵀ A₁ (R2, d_in),  B (d_out, R2),  scale α / R2

`generate_adapter` injects exactly that as a lorakit "lora" adapter, so it saves, loads,
merges, serves and exports to PEFT like any other LoRA.

Training (the paper's self-supervised objectives) is end to end through the frozen model:
for a context c and a continuation y of the same task,
    L = w_c · CE(y | ΔW(c)) + w_r · CE(c | ΔW(c))        completion + reconstruction
summed over a few training tasks per step; only the generator's parameters learn.

Checked against the authors' code lineage (fastlora/model.py in EnronMusk/generative-adapter,
`FastLoraLinear`): `_kv_mapping_matrix` computes ss = (A2 ĥ)ᵀ(A3 ĥ) over masked context tokens,
`_normalize` applies frobenius / spectral / svd (U Vᵀ from a low-rank SVD), and `to_lora_weights`
returns lora_a = ssᵀ A1, lora_b = B with scaling α / r. Its hidden states are each decoder
layer's input (`FastLoraDecoderLayer`), RMS-normalised with a learned gain; A1, A2, A3 are
Kaiming-normal and B zeros. Deviations: one context segment per task (the reference also
merges several segments causally during pretraining); the SVD normalisation uses an exact
SVD with the stable polar-factor gradient (below) instead of svd_lowrank plus the
reference's "reset to zero when singular values are close" heuristic; the base model's
hidden states are computed with all adapters off.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

import lorakit
from lorakit.core.adapter import check_finite_nonneg, check_positive_int
from lorakit.core.inject import plan_injection
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.fsutil import atomic_dir
from lorakit.generators.family import (
    Task,
    hidden_states,
    inject_generated,
    inject_seeded,
    only_active,
)
from lorakit.methods.lora import LoraConfig

NORMS = ("svd", "frobenius", "spectral")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")
CONFIG_FILE = "generator_config.json"
WEIGHTS_FILE = "generator.safetensors"


@dataclass
class GenerativeAdapterConfig:
    """target: the linear layers that get a generated update (lorakit target syntax);
    r: rank R2 of the generated LoRA; inter_size: R1 (None = r); alpha: scale numerator (α/R2);
    norm: Φ, one of NORMS; eps: floor in the norms and the polar gradient.
    Training: steps, lr, weight_decay (AdamW), tasks_per_step, batch_size (continuation rows
    per task per step), completion_weight / recon_weight (w_c, w_r), seed (init and sampling).
    Defaults follow the reference config (r 32 → 16 here for small models, α = 2r).
    """

    target: str | list[str] = "all-linear"
    r: int = 16
    inter_size: int | None = None
    alpha: float = 32.0
    norm: str = "svd"
    eps: float = 1e-6
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.0
    tasks_per_step: int = 4
    batch_size: int = 8
    completion_weight: float = 1.0
    recon_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("r", "steps", "tasks_per_step", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.inter_size is not None:
            check_positive_int("inter_size", self.inter_size)
        for name in ("alpha", "lr", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("weight_decay", "completion_weight", "recon_weight"):
            check_finite_nonneg(name, getattr(self, name))
        if self.completion_weight == 0 and self.recon_weight == 0:
            raise ConfigError("completion_weight and recon_weight are both 0: the generator would learn nothing")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        LoraConfig(r=self.r, target=self.target)  # validates target

    @property
    def r1(self) -> int:
        return self.inter_size or self.r

    def lora_config(self, paths: Sequence[str]) -> LoraConfig:
        """The plain LoRA the generator emits: rank R2, scale α/R2, exactly `paths`."""
        return LoraConfig(r=self.r, alpha=float(self.alpha), target=list(paths))


# -- pure math ------------------------------------------------------------------------------
class _Polar(torch.autograd.Function):
    """P = U Vᵀ for M = U Σ Vᵀ (thin SVD, (..., m, n)), with the polar factor's own gradient.

    With X = Uᵀ dM V, dP = U Ω Vᵀ + (I − UUᵀ) dM V Σ⁻¹ Vᵀ (m > n; the transpose for m < n),
    Ω_ij = (X_ij − X_ji)/(σ_i + σ_j). Only σ_i + σ_j appears (not σ_i² − σ_j² as in the
    gradients of U and V separately), so equal singular values are harmless.
    """

    @staticmethod
    def forward(ctx, m: torch.Tensor, eps: float) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (.., m, k), (.., k), (.., k, n)
        ctx.save_for_backward(u, s, vh)
        ctx.eps = eps
        return u @ vh

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, s, vh = ctx.saved_tensors
        v = vh.mT
        gt = u.mT @ grad @ v  # (.., k, k)
        k = (gt - gt.mT) / (s[..., :, None] + s[..., None, :]).clamp_min(ctx.eps)
        out = u @ k @ vh
        sinv = 1.0 / s.clamp_min(ctx.eps)
        rows, cols = grad.shape[-2:]
        if rows > s.shape[-1]:  # tall: the part of grad outside U's column span
            out = out + ((grad - u @ (u.mT @ grad)) @ v) * sinv[..., None, :] @ vh
        if cols > s.shape[-1]:  # wide: the part outside V's row span
            out = out + u @ (sinv[..., :, None] * (u.mT @ (grad - (grad @ v) @ vh)))
        return out, None


def polar(m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of m (..., p, q), differentiable."""
    return _Polar.apply(m, eps)


def normalize_state(s: torch.Tensor, norm: str, eps: float = 1e-6) -> torch.Tensor:
    """Φ(S) of the module docstring, for S (..., R1, R2)."""
    w = s if s.dtype in (torch.float32, torch.float64) else s.float()  # no SVD in half precision
    if norm == "svd":
        return polar(w, eps).to(s.dtype)
    if norm == "frobenius":
        return (w * torch.rsqrt(w.pow(2).sum((-2, -1), keepdim=True) + eps)).to(s.dtype)
    if norm == "spectral":
        return (w / (torch.linalg.matrix_norm(w, ord=2)[..., None, None] + eps)).to(s.dtype)
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")


def rms_norm(h: torch.Tensor, gain: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * gain


def accumulate_state(h: torch.Tensor, a2: torch.Tensor, a3: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """S = Σ_t (A₂ h_t)(A₃ h_t)ᵀ over all tokens of h (n, T, d) where mask (n, T) is 1.
    a2 (R1, d), a3 (R2, d) -> S (R1, R2)."""
    k = h @ a2.T  # (n, T, R1)
    v = h @ a3.T  # (n, T, R2)
    if mask is not None:
        k = k * mask[..., None].to(k.dtype)
    return torch.einsum("ntr,nts->rs", k, v)


# -- the generator ----------------------------------------------------------------------------
class LayerGenerator(nn.Module):
    """The context-to-LoRA map of one linear layer (parameters of the module docstring)."""

    def __init__(self, d_in: int, d_out: int, d_hidden: int, r1: int, r2: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d_hidden))  # γ of the RMSNorm on context states
        self.a1 = nn.Parameter(torch.empty(r1, d_in))  # (R1, d_in)
        self.a2 = nn.Parameter(torch.empty(r1, d_hidden))  # (R1, d)
        self.a3 = nn.Parameter(torch.empty(r2, d_hidden))  # (R2, d)
        self.b = nn.Parameter(torch.zeros(d_out, r2))  # (d_out, R2): zero -> ΔW = 0 at init
        for p in (self.a1, self.a2, self.a3):  # the reference's kaiming_normal_(fan_in, a=√5)
            nn.init.kaiming_normal_(p, a=math.sqrt(5), mode="fan_in")

    def state(self, h: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
        """S (R1, R2) from context states h (n, T, d)."""
        return accumulate_state(rms_norm(h, self.gain, eps), self.a2, self.a3, mask)

    def factors(self, s_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A = Ŝᵀ A₁ (R2, d_in), B (d_out, R2)) from the normalised state Ŝ (R1, R2)."""
        return s_hat.T @ self.a1, self.b


def _key(path: str) -> str:
    return path.replace(".", "__")


class GenerativeAdapter(nn.Module):
    """A context-to-LoRA generator for the target layers of one base model (see module doc).

        gen = train_generative_adapter(model, train_tasks, GenerativeAdapterConfig(r=8))
        gen.generate_adapter(model, context_ids, name="task")   # a plain lorakit LoRA
    """

    def __init__(self, model: nn.Module, config: GenerativeAdapterConfig):
        super().__init__()
        self.config = config
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ConfigError(f"{type(model).__name__} has no config.hidden_size; GenerativeAdapter needs a "
                              "transformers model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            plan = plan_injection(model, LoraConfig(r=1, target=config.target), name="_ga_probe")
            self.paths: list[str] = sorted(plan.adapters)
            self.blocks: dict[str, int] = {}
            self.dims: dict[str, tuple[int, int]] = {}
            layers = {}
            for path in self.paths:
                spec = plan.adapters[path].spec
                if spec.kind != "linear":
                    raise ConfigError(f"GenerativeAdapter generates updates of linear layers; target {path!r} is "
                                      f"a {spec.kind} layer")
                m = _BLOCK_RE.search(path + ".")
                if m is None:
                    raise ConfigError(f"target {path!r} is not inside a numbered transformer block "
                                      "(…layers.<i>.…); GenerativeAdapter reads the context states at the block input")
                self.blocks[path] = int(m.group(1))
                self.dims[path] = (spec.in_features, spec.out_features)
                layers[_key(path)] = LayerGenerator(spec.in_features, spec.out_features, hidden,
                                                    config.r1, config.r)
        self.hidden_size = hidden
        self.layers = nn.ModuleDict(layers)
        self.losses: list[float] = []  # training history (per step)

    def forward(self, states: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer LoRA factors {path: (A (R2, d_in), B (d_out, R2))} from the context's
        hidden states (as returned by `lorakit.generators.family.hidden_states`)."""
        out = {}
        for path in self.paths:
            i = self.blocks[path]
            if i >= len(states) - 1:
                raise ConfigError(f"{path} is in block {i} but only {len(states) - 1} blocks' states were given")
            gen = self.layers[_key(path)]
            h = states[i].to(gen.a1.device, gen.a1.dtype)
            s = gen.state(h, None if mask is None else mask.to(h.device), self.config.eps)
            out[path] = gen.factors(normalize_state(s, self.config.norm, self.config.eps))
        return out

    def lora_config(self) -> LoraConfig:
        return self.config.lora_config(self.paths)

    @torch.no_grad()
    def generate_state(self, model: nn.Module, context: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One forward pass of the base model over `context` (n, T) -> the generated LoRA's
        tensors, keyed "<module path>.lora_A.weight" / ".lora_B.weight" (lorakit's names).
        Padding (attention_mask 0) contributes nothing to S."""
        self._check_model(model)
        out = {}
        states = hidden_states(model, context, attention_mask)
        for path, (a, b) in self(states, attention_mask).items():
            out[f"{path}.lora_A.weight"] = a.detach().float().cpu()
            out[f"{path}.lora_B.weight"] = b.detach().float().cpu()
        return out

    def generate_adapter(self, model: nn.Module, context: torch.Tensor, name: str = "generated",
                         activate: bool = True, attention_mask: torch.Tensor | None = None) -> nn.Module:
        """Inject the LoRA generated from `context` into `model` as adapter `name` (a normal
        lorakit "lora" adapter: `lorakit.save`, `load`, `merge`, PEFT export all apply)."""
        tensors = self.generate_state(model, context, attention_mask)
        return inject_generated(model, self.lora_config(), name, self.config.seed, tensors, activate)

    def _check_model(self, model: nn.Module) -> None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden != self.hidden_size:
            raise ConfigError(f"this generator was built for hidden size {self.hidden_size}, the model has {hidden}")
        names = {n for n, _ in model.named_modules()}
        missing = [p for p in self.paths if p not in names]
        if missing:
            raise ConfigError(f"the model has no module {missing[0]!r} (and {len(missing) - 1} more) that this "
                              "generator was built for")

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write generator_config.json + generator.safetensors (atomically)."""
        meta = {"generator": "generative_adapter", "paper": "arXiv:2411.05877", "config": asdict(self.config),
                "paths": self.paths, "hidden_size": self.hidden_size,
                "dims": {p: list(d) for p, d in self.dims.items()}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(Path(path)) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            save_file(tensors, str(tmp / WEIGHTS_FILE))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> GenerativeAdapter:
        """Rebuild a saved generator for `model` (which must have the same target layers)."""
        meta = _read_meta(Path(path), "generative_adapter")
        from lorakit.config import from_dict

        gen = cls(model, from_dict(GenerativeAdapterConfig, meta["config"], where=str(Path(path) / CONFIG_FILE)))
        if gen.paths != meta["paths"]:
            raise AdapterFileError(f"{path}: generator targets {meta['paths'][:3]}… but this model matches "
                                   f"{gen.paths[:3]}…")
        _load_tensors(gen, Path(path))
        return gen.eval()


def _read_meta(path: Path, kind: str) -> dict:
    f = path / CONFIG_FILE
    if not f.is_file():
        raise AdapterFileError(f"{f} is missing: not a saved adapter generator")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("generator") != kind:
        raise AdapterFileError(f"{f} holds a {meta.get('generator') if isinstance(meta, dict) else '?'!r} "
                               f"generator, expected {kind!r}")
    return meta


def _load_tensors(module: nn.Module, path: Path) -> None:
    f = path / WEIGHTS_FILE
    if not f.is_file():
        raise AdapterFileError(f"{f} is missing")
    tensors = load_file(str(f))
    expected = module.state_dict()
    if set(tensors) != set(expected):
        raise AdapterFileError(f"{f}: tensors differ from the generator's (missing "
                               f"{sorted(set(expected) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(expected))[:3]})")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise AdapterFileError(f"{f}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    module.load_state_dict(tensors)


# -- training ---------------------------------------------------------------------------------
def train_generative_adapter(model: nn.Module, tasks: Sequence[Task],
                             config: GenerativeAdapterConfig | None = None) -> GenerativeAdapter:
    """Train a GenerativeAdapter on `tasks` (completion + reconstruction losses through the
    frozen `model`); returns it in eval mode with its per-step losses in `.losses`."""
    config = config or GenerativeAdapterConfig()
    if not tasks:
        raise ConfigError("train_generative_adapter needs at least one task")
    gen = GenerativeAdapter(model, config).to(next(model.parameters()).device)
    states = [hidden_states(model, t.context) for t in tasks]  # the base is frozen: one pass per task
    tmp = "_ga_train"
    inject_seeded(model, gen.lora_config(), tmp, config.seed)
    names = {p: (f"{p}.adapters.{tmp}.lora_A.weight", f"{p}.adapters.{tmp}.lora_B.weight") for p in gen.paths}
    opt = torch.optim.AdamW(gen.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    k = min(config.tasks_per_step, len(tasks))
    device = next(model.parameters()).device

    def task_loss(i: int) -> torch.Tensor:
        factors = gen(states[i])
        params = {n: t for p, (a, b) in factors.items() for n, t in zip(names[p], (a, b))}
        loss = torch.zeros((), device=device)
        if config.completion_weight:
            rows = torch.randint(tasks[i].train.shape[0], (config.batch_size,), generator=g)
            ids = tasks[i].train[rows].to(device)
            loss = loss + config.completion_weight * functional_call(
                model, params, (), {"input_ids": ids, "labels": ids}).loss
        if config.recon_weight:
            ids = tasks[i].context.to(device)
            loss = loss + config.recon_weight * functional_call(
                model, params, (), {"input_ids": ids, "labels": ids}).loss
        return loss

    gen.train()
    try:
        with only_active(model, tmp):
            for _ in range(config.steps):
                chosen = torch.randperm(len(tasks), generator=g)[:k].tolist()
                opt.zero_grad(set_to_none=True)
                loss = sum(task_loss(i) for i in chosen) / k
                loss.backward()
                opt.step()
                gen.losses.append(float(loss.detach()))
    finally:
        lorakit.delete(model, tmp)
    return gen.eval()


__all__ = [
    "NORMS", "GenerativeAdapter", "GenerativeAdapterConfig", "LayerGenerator", "accumulate_state",
    "normalize_state", "polar", "rms_norm", "train_generative_adapter",
]
