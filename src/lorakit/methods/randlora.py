"""RandLoRA: full-rank updates from scaled shared random low-rank bases
(Albert et al., arXiv:2502.00987).

With d_min = min(d_in, d_out), d_max = max(d_in, d_out) and N = ⌈d_min / r⌉ bases:

    ΔWᵗ = s · Σ_{n<N} L_n Λ_n S Γ_n                         (d_max, d_min)
    L_n: (d_max, r), S: (r, d_min)     frozen random, std 1, shared by every layer of the
                                       same (d_min, d_max) and regenerated from the seed;
                                       one S for all n (the paper's shared A; PEFT too), or
                                       N distinct S_n with shared_a=False (reference code)
    Λ_n = diag(λ_n), λ: (N, r)         trainable, init 0      => ΔW = 0 at init
    Γ_n = diag(γ_n), γ: (N, d_min)     trainable, init 1/d_max
    ΔW = ΔWᵗ if d_in = d_min (trainables on the input side) else ΔWᵗᵀ;  s = α / r

The sum of N rank-r terms reaches rank min(N·r, d_min) = d_min: a full-rank update with
N·(r + d_min) ≈ d_min²/r trainable numbers per layer (fewer for larger r). The trainable
diagonals sit on the smaller dimension, as in the reference code and PEFT's `randlora`.
With a shared S the rank comes from the Γ_n differing: while all γ_n are equal (at init)
Σ_n L_n Λ_n S Γ = (Σ_n L_n Λ_n) S Γ has rank ≤ r, and it grows as training separates them.

Forward without forming ΔW: the scaled small-side basis Ŝ = λ ⊙ S ⊙ γ (N·r, d_min) is
formed once per call (weight-sized: the method is full-rank, so there is no smaller form),
then  x ↦ x Ŝᵀ Lᵀ  (d_in = d_min)  or  x ↦ x L Ŝ  (d_in = d_max), with L = [L_0 … L_{N-1}]
(d_max, N·r). A custom autograd function gives ∂λ, ∂γ from S without also keeping λ ⊙ S;
the matmul still keeps Ŝ for backward (one weight-sized tensor per layer, as in PEFT).
Training and unmerged inference cost about two dense matmuls of the layer's size; merge
(`lorakit.merge`) to serve at the base model's cost.

Deviations (documented choices):
- Bases are shared per (d_min, d_max) shape, not sliced from one model-wide maximum as in
  PEFT: an adapter only sees its own layer, and the slicing would make a layer's bases
  depend on which *other* layers are targeted. Every layer of a shape uses the same tensor
  (one copy per device and dtype, held by a weak cache), like PEFT's shared buffers.
- Bases are generated on the CPU from a `torch.Generator` (uniform, or the paper's sparse
  ternary variant) and normalised to std 1 as in the reference `gen_mats`, so a saved
  adapter (λ, γ only) reproduces on any device.
- s = alpha / r without the reference code's extra ×10 (PEFT's convention; PEFT's default
  alpha = 20·r is ours too).
- Basis n, column i of L is paired with row i of S and λ_{n,i}, exactly as in the equation
  (PEFT's flattening pairs L's (n, i) with a different (i', n') of the scaled S — an
  equally random but different pairing; its files are not interchangeable with ours).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError


@dataclass
class RandLoraConfig(AdapterConfig):
    """r: rank of each random basis (N = ⌈d_min/r⌉ bases; larger r = fewer trainables);
    alpha: scale numerator (s = alpha / r); seed: random-basis seed;
    sparse: ternary bases {-1, 0, +1} with probabilities 1/6, 2/3, 1/6 (the paper's sparse
    variant) instead of uniform; shared_a: one small-side basis S for all N terms (paper,
    PEFT) or N distinct ones (more memory, rank ≥ r from the start);
    dropout on the adapter input.
    """

    r: int = 32
    alpha: float = 640.0
    seed: int = 0
    sparse: bool = False
    shared_a: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        for name in ("sparse", "shared_a"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_range("dropout", self.dropout, 0.0, 1.0)


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from its parts (blake2b; never Python's salted `hash()`)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def num_bases(d_min: int, r: int) -> int:
    """N = ⌈d_min / r⌉: enough rank-r terms to reach full rank d_min."""
    return -(-d_min // r)


def param_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable numbers of one RandLoRA layer: N·r (λ) + N·d_min (γ)."""
    d_min = min(d_in, d_out)
    return num_bases(d_min, r) * (r + d_min)


def generate_bases(seed: int, d_min: int, d_max: int, r: int, sparse: bool,
                   shared_a: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (1 or N, r, d_min), L (N, r, d_max)) float32 on the CPU, each normalised to std 1."""
    n = num_bases(d_min, r)
    out = []
    for part, d, count in (("S", d_min, 1 if shared_a else n), ("L", d_max, n)):
        g = torch.Generator().manual_seed(derive_seed("randlora", seed, d_min, d_max, r, sparse, part, count))
        u = torch.rand((count, r, d), generator=g)
        if sparse:  # reference gen_mats_sparse: -1 below 1/6, +1 above 5/6, else 0
            t = torch.zeros_like(u)
            t[u < 1 / 6] = -1.0
            t[u > 5 / 6] = 1.0
        else:
            t = u * 2 - 1
        out.append(t / t.std())
    return out[0], out[1]


# (seed, d_min, d_max, r, sparse, shared_a, part, device, dtype) -> tensor. Adapters hold the
# strong refs, so layers of one shape share one copy, freed with the last adapter using it.
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_bases(key: tuple, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    ks, kl = (*key, "S", str(device), dtype), (*key, "L", str(device), dtype)
    s, l_ = _SHARED.get(ks), _SHARED.get(kl)
    if s is None or l_ is None:
        s, l_ = (t.to(device=device, dtype=dtype) for t in generate_bases(*key))
        _SHARED[ks], _SHARED[kl] = s, l_
    return s, l_


class _ScaleBasis(torch.autograd.Function):
    """Ŝ = λ[:, :, None] · S · γ[:, None, :]  (N, r, d_min); S (1 or N, r, d_min) frozen.

    Plain autograd would keep λ ⊙ S (a weight-sized tensor) per layer for backward.
    """

    @staticmethod
    def forward(ctx, basis, lam, gam):
        ctx.save_for_backward(basis, lam, gam)
        return lam[:, :, None] * basis * gam[:, None, :]

    @staticmethod
    def backward(ctx, grad):
        basis, lam, gam = ctx.saved_tensors
        gs = grad * basis  # (N, r, d_min)
        g_lam = torch.einsum("nij,nj->ni", gs, gam) if ctx.needs_input_grad[1] else None
        g_gam = torch.einsum("nij,ni->nj", gs, lam) if ctx.needs_input_grad[2] else None
        return None, g_lam, g_gam


@register_method("randlora", RandLoraConfig, paper="arXiv:2502.00987")
class RandLora(nn.Module):
    """RandLoRA: ΔW = s·Σ_n L_n Λ_n S Γ_n, full rank from shared random bases."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"r": 8, "alpha": 160.0}  # tiny models: d_min = 32 -> N = 4

    def __init__(self, spec: LayerSpec, cfg: RandLoraConfig):
        super().__init__()
        self.spec = spec
        d_in, d_out = spec.in_features, spec.out_features
        self.d_min, self.d_max = min(d_in, d_out), max(d_in, d_out)
        self.small_in = d_in == self.d_min  # trainables on the input side
        self.r = cfg.r
        self.n = num_bases(self.d_min, cfg.r)
        self.scale = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._key = (cfg.seed, self.d_min, self.d_max, cfg.r, cfg.sparse, cfg.shared_a)
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.randlora_lambda = nn.Parameter(torch.zeros(self.n, cfg.r, **kw))  # λ (N, r)
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.d_min), 1.0 / self.d_max, **kw))  # γ (N, d_min)
        self._bases = shared_bases(self._key, spec.device, spec.dtype)  # plain attribute: never saved

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S (1 or N, r, d_min), L (N, r, d_max)) on the parameters' device and dtype."""
        p = self.randlora_lambda
        s, l_ = self._bases
        if s.device != p.device or s.dtype != p.dtype:  # model moved or cast since construction
            self._bases = s, l_ = shared_bases(self._key, p.device, p.dtype)
        return s, l_

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ŝ (N·r, d_min), L (d_max, N·r)) with ΔWᵗ = s · L Ŝ."""
        s, l_ = self.bases()
        s_hat = _ScaleBasis.apply(s, self.randlora_lambda, self.randlora_gamma).reshape(-1, self.d_min)
        return s_hat, l_.reshape(-1, self.d_max).T

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        s_hat, l_ = self.factors()
        x = self.dropout(x.to(s_hat.dtype))
        if self.small_in:  # (..., d_min) -> (..., N·r) -> (..., d_max)
            return (x @ s_hat.T) @ l_.T * self.scale
        return (x @ l_) @ s_hat * self.scale  # (..., d_max) -> (..., N·r) -> (..., d_min)

    def delta_weight(self) -> torch.Tensor:
        s_hat, l_ = self.factors()
        w = l_ @ s_hat * self.scale  # (d_max, d_min) — merge/export only
        return w if self.small_in else w.T

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact factors of rank N·r for rank=None; else the best rank-`rank` approximation
        (truncated SVD, Eckart–Young: Frobenius error = √(Σ_{i>rank} σ_i²))."""
        with torch.no_grad():
            s_hat, l_ = self.factors()
            a, b = (s_hat, l_) if self.small_in else (l_.T, s_hat.T)  # A (N·r, d_in), B (d_out, N·r)
            if rank is not None and rank < a.shape[0]:
                from lorakit.ops.lowrank import truncate

                a, b = truncate(a, b, rank)
            return a.detach().clone(), b.detach().clone(), self.scale
