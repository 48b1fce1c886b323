"""Hydra: multi-head low-rank adaptation (Kim et al., arXiv:2309.06922).

A parallel LoRA branch on the layer input plus a sequential LoRA branch on the frozen
layer's output features, a learned linear combination of the pre-trained features:

    h = W0 x + b0 + s_p · B_p A_p x + s_s · B_s A_s (W0 x + b0)
    ΔW = s_p B_p A_p + s_s B_s A_s W0,  Δb = s_s B_s A_s b0     (merges exactly)

    A_p: (r, d_in), B_p: (d_out, r), A_s: (r_seq, d_out), B_s: (d_out, r_seq)
    A Kaiming-uniform, B zeros (reference NLU code), s_p = α/r, s_s = α/r_seq.

Differences from the reference code (github.com/extremebird/Hydra), and why:
- Like the reference, the sequential branch sees the layer output with its bias, W0 x + b0;
  the constant shift s_s B_s A_s b0 is `delta_bias()`, which merge() folds into the base
  bias. A plain LoRA cannot carry that shift, so `to_lora` (PEFT export, serving) refuses
  layers whose bias is non-zero rather than silently dropping it.
- The sequential branch is computed as B_s ((A_s W0) x) from W0 (`spec.w0()`) rather than
  from the `base_out` the layer passes in: `base_out` also contains other active adapters'
  deltas (and anything merged into the weight later), which would make the forward disagree
  with `delta_weight()`. A_s W0 is (r_seq, d_in), so per token this is as cheap as LoRA. No
  copy of W0 is kept while unmerged; once merged, the layer holds one snapshot of W0 shared by
  all its adapters (`needs_w0`), and unmerging everything restores W0 bit-exactly.
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
class HydraConfig(AdapterConfig):
    """r: rank of the parallel branch; r_seq: rank of the sequential branch (None: r);
    alpha: scale numerator, s_p = α/r and s_s = α/r_seq."""

    r: int = 8
    r_seq: int | None = None
    alpha: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if self.r_seq is not None:
            check_positive_int("r_seq", self.r_seq)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")


@register_method("hydra", HydraConfig, paper="arXiv:2309.06922")
class Hydra(nn.Module):
    """Hydra: h = W0 x + s_p B_p A_p x + s_s B_s A_s W0 x (parallel + sequential LoRA branches)."""

    zero_init = True
    supports = ("linear",)
    needs_w0 = True  # the sequential branch reads W0 and b0: the layer keeps them once merged (spec.w0)

    def __init__(self, spec: LayerSpec, cfg: HydraConfig):
        super().__init__()
        self.spec = spec
        d_out, d_in = spec.out_features, spec.in_features
        self.r, self.r_seq = cfg.r, cfg.r_seq or cfg.r
        self.scale_par, self.scale_seq = cfg.alpha / self.r, cfg.alpha / self.r_seq
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.par_A = nn.Linear(d_in, self.r, bias=False, **kw)  # A_p (r, d_in)
        self.par_B = nn.Linear(self.r, d_out, bias=False, **kw)  # B_p (d_out, r)
        self.seq_A = nn.Linear(d_out, self.r_seq, bias=False, **kw)  # A_s (r_seq, d_out)
        self.seq_B = nn.Linear(self.r_seq, d_out, bias=False, **kw)  # B_s (d_out, r_seq)
        for a, b in ((self.par_A, self.par_B), (self.seq_A, self.seq_B)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # reference `Hydra.__init__` (nlu)
            nn.init.zeros_(b.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches stacked: A (r + r_seq, d_in), B (d_out, r + r_seq), scales folded into B."""
        a = torch.cat([self.par_A.weight, self.seq_A.weight @ self.spec.w0().detach()])  # [A_p; A_s W0]
        b = torch.cat([self.par_B.weight * self.scale_par, self.seq_B.weight * self.scale_seq], dim=1)
        return a, b

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # (..., d_in) -> (..., r + r_seq) -> (..., d_out); ΔW is never formed
        a, b = self.factors()
        out = (x.to(a.dtype) @ a.T) @ b.T
        db = self.delta_bias()
        return out if db is None else out + db

    def delta_bias(self) -> torch.Tensor | None:
        """(d_out,): s_s B_s A_s b0, the sequential branch's response to the base bias."""
        b0 = self.spec.b0()
        if b0 is None:
            return None
        return self.seq_B.weight @ (self.seq_A.weight @ b0.detach()) * self.scale_seq

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return b @ a  # (d_out, d_in) — merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact at rank r + r_seq (the two branches stacked); SVD-truncated below that."""
        db = self.delta_bias()
        if db is not None and bool(db.abs().max() > 0):
            raise ConfigError(
                f"hydra adapter on {self.spec.name!r} shifts the layer bias (B_s A_s b0 ≠ 0), "
                "which a plain LoRA cannot represent; merge it into the model instead (lorakit export --format merged)"
            )
        a, b = (t.detach().clone() for t in self.factors())
        if rank is not None and rank < a.shape[0]:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, 1.0
