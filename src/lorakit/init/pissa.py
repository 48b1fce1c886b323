"""PiSSA: principal singular values and singular vectors adaptation (Meng et al., arXiv:2404.02948).

The adapter starts on the principal part of the frozen weight. With the thin SVD
W0 = U S Vᵀ (W0: (d_out, d_in)) and the top r triplets,

    A = diag(√(S_r / s)) V_rᵀ   (r, d_in),     B = U_r diag(√(S_r / s))   (d_out, r),
    so s·B A = U_r S_r V_rᵀ, the best rank-r approximation of W0 (Eckart–Young),

as PEFT's `init_lora_weights="pissa"` (s = α/r; α defaults to r, so s = 1). The paper then
trains on the residual W_res = W0 − s·B A. lorakit never edits the base weight, so the residual
lives in the adapter instead, with a frozen copy (A0, B0) of the initial factors:

    h = W0 x + s·B A x − s·B0 A0 x,      ΔW = s·(B A − B0 A0)   (rank ≤ 2r)

which equals W_res x + s·B A x exactly, starts at the base output (B = B0, A = A0), and is
PEFT's "convert PiSSA to LoRA" form. A0, B0 are persistent buffers, saved with the adapter
(an SVD is not bit-reproducible across machines and `svd="lowrank"` is randomised).
Trainable parameters per module: r·(d_in + d_out), r = min(r, d_out, d_in).
`to_lora()` is exact at rank 2r: A' = [A; −A0], B' = [B, B0].

PiSSA is data-free: injection is the initialisation; there is no `data_init`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.registry import register_method
from lorakit.init._shared import OffsetLowRank, check_number, check_svd_args, svd


@dataclass
class PissaConfig(AdapterConfig):
    """r: rank (capped at min(d_out, d_in) per module); alpha: s = α/r (None: α = r, s = 1;
    the factors absorb 1/s, so s·B0A0 is always the top-r part of W0); dropout on the adapter
    input; svd: "lowrank" (torch.svd_lowrank with niter subspace iterations: PEFT's
    "pissa_niter_4", the paper's fast SVD; ~20x faster than "full" on SmolLM2's matrices, which
    matters because the SVD also runs when an adapter is loaded) or "full" (exact).
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    svd: str = "lowrank"
    niter: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if self.alpha is not None:
            check_number("alpha", self.alpha)
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_svd_args(self.svd, self.niter)


def pissa_factors(w: torch.Tensor, r: int, scale: float, method: str = "full", niter: int = 4):
    """(A (r, d_in), B (d_out, r)) with scale·B A = the top-r SVD part of w (float32)."""
    u, s, vh = svd(w, r, method, niter)
    root = (s[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None]


@register_method("pissa", PissaConfig, paper="arXiv:2404.02948")
class Pissa(OffsetLowRank):
    """PiSSA: h = W0 x + s·(B A − B0 A0) x with A, B from the top-r SVD of W0 (output == base at init)."""

    test_config: ClassVar[dict] = {"r": 4}

    def __init__(self, spec: LayerSpec, cfg: PissaConfig):
        super().__init__()
        r = min(cfg.r, spec.out_features, spec.in_features)
        scale = (cfg.alpha if cfg.alpha is not None else r) / r
        self._build(spec, r, scale, cfg.dropout)
        with torch.no_grad():
            a, b = pissa_factors(spec.weight().detach(), r, scale, cfg.svd, cfg.niter)
        self.set_factors(a, b)
