"""LoLDU: low-rank adaptation via Lower-Diag-Upper decomposition (Shi et al., arXiv:2410.13618).

The frozen weight is factorised once with partially pivoted LU, W0 = P L D U (L unit lower,
U unit upper, D the pivots). The first r columns of P L and rows of U are frozen; only the
diagonal z (r,) and a scalar σ train:

    h = W0 x + P L_r diag(σ·z − σ0·z0) U_r x,     z0 = D_r (the first r pivots),  σ0 = α / r
    z ← z0, σ ← σ0 at init, so ΔW = 0 and the output equals the base output exactly.

This is the reference code's parameterisation (github.com/SKDDJ/LoLDU, `minloldu/loldu.py`)
written as an additive update: the reference overwrites the weight with the residual
W_res = W0 − σ0 P L_r diag(z0) U_r and adds σ P L_r diag(z) U_r; W_res + σ P L_r diag(z) U_r
= W0 + ΔW above. Keeping W0 untouched (and folding the residual into ΔW) is what lets the
adapter be merged, unmerged, routed per row and stacked like every other method.

Trainable parameters per module: r + 1 (z and σ; r only with `train_scale=False`), where
r = min(cfg.r, d_out, d_in). P L_r, U_r, z0 and σ0 are recomputed from W0 at construction
(non-persistent buffers), so a saved adapter holds only z and σ. The bases come from the
weights, not the config: load a LoLDU adapter only onto the base weights it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError


@dataclass
class LoLDUConfig(AdapterConfig):
    """r: number of leading LDU pivots kept per module (capped at min(d_out, d_in));
    alpha: σ0 = α / r, the initial scale (the reference's `lora_alpha`, default 1);
    train_scale: train σ as well as z (r + 1 parameters per module) or z only (r).
    """

    r: int = 64
    alpha: float = 1.0
    train_scale: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.train_scale, bool):
            raise ConfigError(f"train_scale must be true or false, got {self.train_scale!r}")


def ldu(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (m, n) = PL (m, k) · diag(D) (k,) · U (k, n), k = min(m, n), in float32.

    Returns (P L, D, U) with U scaled to a unit diagonal. A zero pivot (singular W) leaves
    its row of U unscaled instead of dividing by zero; that direction then carries no update.
    """
    p, lower, upper = torch.linalg.lu(w.float())  # P (m, m), L (m, k), U (k, n)
    d = torch.diagonal(upper).clone()  # (k,)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return p @ lower, d, upper / safe[:, None]


@register_method("loldu", LoLDUConfig, paper="arXiv:2410.13618")
class LoLDU(nn.Module):
    """LoLDU: h = W0 x + P L_r diag(σz − σ0z0) U_r x; trains only the diagonal z and the scale σ."""

    zero_init = True
    supports = ("linear",)

    def __init__(self, spec: LayerSpec, cfg: LoLDUConfig):
        super().__init__()
        self.spec = spec
        self.r = min(cfg.r, spec.out_features, spec.in_features)
        kw = {"dtype": spec.dtype, "device": spec.device}
        with torch.no_grad():
            pl, d, u = ldu(spec.weight().detach())
        r = self.r
        # Frozen, recomputed from W0 on every construction, so never saved.
        self.register_buffer("lower", pl[:, :r].to(**kw).contiguous(), persistent=False)  # P L_r (d_out, r)
        self.register_buffer("upper", u[:r].to(**kw).contiguous(), persistent=False)  # U_r (r, d_in)
        self.register_buffer("z0", d[:r].to(**kw), persistent=False)  # D_r (r,)
        self.register_buffer("scale0", torch.tensor(cfg.alpha / r, **kw), persistent=False)  # σ0 ()
        self.vector_z = nn.Parameter(self.z0.clone())  # z (r,), the reference's name
        if cfg.train_scale:
            self.scaling_factor = nn.Parameter(self.scale0.clone())  # σ ()
        else:
            self.register_buffer("scaling_factor", self.scale0.clone(), persistent=False)

    def coef(self) -> torch.Tensor:
        """(r,): σ·z − σ0·z0, exactly zero at init (same values, same operations)."""
        return self.scaling_factor * self.vector_z - self.scale0 * self.z0

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # (..., d_in) -> (..., r) -> (..., d_out); ΔW is never formed
        h = x.to(self.upper.dtype) @ self.upper.T
        return (h * self.coef()) @ self.lower.T

    def delta_weight(self) -> torch.Tensor:
        return (self.lower * self.coef()) @ self.upper  # (d_out, d_in) — merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact at rank r: A = diag(σz − σ0z0) U_r, B = P L_r, scale 1."""
        a = (self.coef()[:, None] * self.upper).detach()  # (r, d_in)
        b = self.lower.detach().clone()  # (d_out, r)
        if rank is not None and rank < self.r:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, 1.0
