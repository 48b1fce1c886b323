"""NOLA: LoRA factors as linear combinations of frozen random bases
(Koohpayegani et al., arXiv:2310.02556).

    h = W0 x + s · B A x,        s = α_lora / r
    A = A0 + Σ_{i<k_A} α_i A_i   A0, A_i: (r, d_in)   frozen, regenerated from a seed
    B =      Σ_{j<k_B} β_j B_j   B_j:     (d_out, r)  frozen, regenerated from a seed
    A_i, B_j ~ U(-1, 1) / √k     A0 ~ Kaiming-uniform (nn.Linear's default init)
    trainable: α (k_A,), β (k_B,), both zero at init  =>  ΔW = 0 at init

Only the coefficients are trained and saved: k_A + k_B numbers per layer, whatever the
rank r or the layer width. The bases are a function of (config seed, module path, r, layer
shape) and are regenerated, never stored; so an adapter reproduces on any model whose
module paths match the ones it was trained on (which target matching requires anyway).

Deviations from the bare formula (both follow the authors' GPT-2/LLaMA code, where each
NOLA factor is a `NOLALinear` whose frozen Kaiming-initialised weight is added to the
generated combination and whose coefficients start at zero):
- the fixed offset A0. Without it α = β = 0 is a saddle: B = 0 gives α no gradient and
  A = 0 gives β none, so training never starts. With A0, step one is exactly LoRA's first
  step (A random, B zero) restricted to span{B_j}.
- α starts at 0 (not random): with A0 present the layer already has a random A.

Memory and compute. The k bases are never all held in memory: they are generated in chunks
of `CHUNK` (64) bases on the CPU from a `torch.Generator` seeded per (module, factor,
chunk), mixed into A or B, and dropped. A custom autograd function regenerates the same
chunks in backward to form ∂L/∂α_i = ⟨∂L/∂A, A_i⟩, so autograd keeps no basis alive.
Cost per training step and layer: 2 × (k_A·r·d_in + k_B·d_out·r) random numbers and
multiply-adds (forward + backward), on the CPU; that dominates the step for large k.
The CPU generator makes the bases, and therefore a saved adapter, identical on every
device (a CUDA generator draws a different stream, and its layout is not promised to be
stable across GPUs), at the price of host work and a host→device copy of each chunk.
When no gradient is needed (inference, `torch.no_grad`, frozen adapters) the formed A and B
(r·(d_in + d_out) numbers, a LoRA's size) are cached and reused until the coefficients'
values change, so serving costs what LoRA costs. Training recomputes them every forward.
The cache is keyed on the coefficient values, not on version counters (which miss writes
through `.data`, common in averaging/federated code); on a GPU that comparison is one host
sync per layer call — merge the adapter (or export it with `to_lora`) for fast serving.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError

#: Bases generated (and held) at once. Fixed, not a config field: the bases are seeded per
#: chunk, so the chunk size is part of the definition of the random basis.
CHUNK = 64


@dataclass
class NolaConfig(AdapterConfig):
    """r: rank of A, B; alpha: scale numerator (s = alpha / r);
    num_basis_a / num_basis_b: k_A, k_B (trainable numbers per layer = k_A + k_B);
    seed: random-basis seed (per-module seeds derive from it and the module path);
    dropout on the adapter input.
    """

    r: int = 8
    alpha: float = 16.0
    num_basis_a: int = 1024
    num_basis_b: int = 1024
    seed: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_int("num_basis_a", self.num_basis_a)
        check_positive_int("num_basis_b", self.num_basis_b)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        check_range("dropout", self.dropout, 0.0, 1.0)


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from its parts (blake2b; never Python's salted `hash()`)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def basis_chunk(seed: int, chunk: int, n: int, shape: tuple[int, int], k: int) -> torch.Tensor:
    """Bases chunk·CHUNK … chunk·CHUNK+n-1 of one factor: (n, *shape) ~ U(-1, 1)/√k, float32, CPU."""
    g = torch.Generator().manual_seed(derive_seed(seed, chunk))
    return (torch.rand((n, *shape), generator=g) * 2 - 1) / math.sqrt(k)


def _chunks(k: int):
    for c in range(math.ceil(k / CHUNK)):
        yield c, slice(c * CHUNK, min(k, (c + 1) * CHUNK))


class _Combine(torch.autograd.Function):
    """Σ_i coef_i · basis_i with bases regenerated chunk by chunk in forward *and* backward.

    (k,) -> shape. Saves only the coefficients, so at most CHUNK bases exist at any time.
    """

    @staticmethod
    def forward(ctx, coef, seed: int, shape: tuple[int, int]):
        k = coef.shape[0]
        out = torch.zeros(shape, device=coef.device, dtype=torch.float32)
        cf = coef.detach().float()
        for c, sl in _chunks(k):
            basis = basis_chunk(seed, c, sl.stop - sl.start, shape, k).to(coef.device)  # (n, *shape)
            out += torch.einsum("n,nij->ij", cf[sl], basis)
        ctx.seed, ctx.shape = seed, shape
        ctx.save_for_backward(coef)
        return out.to(coef.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (coef,) = ctx.saved_tensors
        k = coef.shape[0]
        grad = torch.empty(k, device=coef.device, dtype=torch.float32)
        g = grad_out.float()
        for c, sl in _chunks(k):
            basis = basis_chunk(ctx.seed, c, sl.stop - sl.start, ctx.shape, k).to(coef.device)
            grad[sl] = torch.einsum("ij,nij->n", g, basis)  # ∂L/∂coef_i = ⟨∂L/∂out, basis_i⟩
        return grad.to(coef.dtype), None, None


def kaiming_offset(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """A0: nn.Linear's default init (Kaiming-uniform, a=√5 -> U(±1/√fan_in)), float32, CPU."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


@register_method("nola", NolaConfig, paper="arXiv:2310.02556")
class Nola(nn.Module):
    """NOLA: h = W0 x + s·B A x, A = A0 + Σα_i A_i, B = Σβ_j B_j over seeded random bases."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"r": 4, "num_basis_a": 80, "num_basis_b": 72}  # > CHUNK: exercises 2 chunks

    def __init__(self, spec: LayerSpec, cfg: NolaConfig):
        super().__init__()
        self.spec = spec
        self.r = cfg.r
        self.scale = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # per-module, per-factor seeds: a pure function of the config seed and the module path
        self.seed_A0 = derive_seed(cfg.seed, spec.name, "A0")
        self.seed_A = derive_seed(cfg.seed, spec.name, "A")
        self.seed_B = derive_seed(cfg.seed, spec.name, "B")
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.coef_A = nn.Parameter(torch.zeros(cfg.num_basis_a, **kw))  # α (k_A,)
        self.coef_B = nn.Parameter(torch.zeros(cfg.num_basis_b, **kw))  # β (k_B,), 0 => ΔW = 0
        self._cache: tuple | None = None  # (key, A, B) for the no-grad path; never saved

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        d_in, d_out, r = self.spec.in_features, self.spec.out_features, self.r
        a0 = kaiming_offset(self.seed_A0, (r, d_in)).to(self.coef_A.device, self.coef_A.dtype)
        a = a0 + _Combine.apply(self.coef_A, self.seed_A, (r, d_in))  # (r, d_in)
        b = _Combine.apply(self.coef_B, self.seed_B, (d_out, r))  # (d_out, r)
        return a, b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)); cached while no gradient is needed."""
        ca, cb = self.coef_A, self.coef_B
        if torch.is_grad_enabled() and (ca.requires_grad or cb.requires_grad):
            self._cache = None  # about to train: the coefficients will change
            return self._build()
        # Key on the coefficient *values* (k_A + k_B numbers): version counters miss writes
        # through `.data`, and a stale A, B would silently serve the wrong adapter.
        c = self._cache
        if c is not None and c[0].device == ca.device and c[0].dtype == ca.dtype and c[1].dtype == cb.dtype \
                and torch.equal(c[0], ca) and torch.equal(c[1], cb):
            return c[2], c[3]
        with torch.no_grad():
            a, b = self._build()
            self._cache = (ca.detach().clone(), cb.detach().clone(), a, b)
        return a, b

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        # (..., d_in) -> (..., r) -> (..., d_out); ΔW is never formed
        return (self.dropout(x.to(a.dtype)) @ a.T) @ b.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scale  # (d_out, d_in) — merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        with torch.no_grad():
            a, b = self.factors()
        if rank is not None and rank < self.r:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a.detach().clone(), b.detach().clone(), self.scale
