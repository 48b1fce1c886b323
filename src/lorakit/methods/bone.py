"""Bone: block-affine adaptation (Kang, arXiv:2409.15371; in PEFT as MiSS, `MissConfig`).

W0 (d_out, d_in) is cut into r×r blocks W_ij (i: row block, j: column block). One trainable
r×r matrix β_i per row block is shared by all column blocks:

    variant "bat" (default, the paper's Block Affine Transformation):
        ΔW_ij = W_ij β_i + β_i          β: (d_out/r, r, r), zeros
    variant "miss" (PEFT's default MiSS "balance" form, no W0 in the update):
        ΔW[:, j·r + k] = β[k, :]         β: (r, d_out), zeros  (βᵀ tiled along d_in)

β starts at zero, so the output starts at the base output. Both variants have r·d_out
trainable parameters per module. The parameter is named `miss_block` with PEFT's layout, so
values carry over to and from `peft.MissConfig(init_weights="bat" | True)`.

"bat" guides β through the frozen weight ("Weight Guide"): ΔW depends on W0, read through
`spec.w0()` — the live weight while unmerged; once merged, the layer's single snapshot of W0
(`needs_w0`), shared by all its adapters, so unmerge subtracts the same ΔW and no adapter keeps
a private copy of W0. Its update is not low-rank, so `delta` forms ΔW once per
call (d_out·d_in·r flops, independent of the batch, as PEFT does) and `to_lora(rank)` is an
SVD truncation. It needs r to divide both d_out and d_in (as in PEFT). "miss" is rank ≤ r and
exact as LoRA; a d_in not divisible by r is handled like PEFT (the last block is partial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError

VARIANTS = ("bat", "miss")


@dataclass
class BoneConfig(AdapterConfig):
    """r: block size (PEFT default 64); variant: "bat" (ΔW_ij = W_ij β_i + β_i, the paper's
    Bone) or "miss" (ΔW = β tiled, PEFT's default MiSS)."""

    r: int = 64
    variant: str = "bat"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {self.variant!r}")


@register_method("bone", BoneConfig, paper="arXiv:2409.15371")
class Bone(nn.Module):
    """Bone / MiSS: block-shared update; "bat": ΔW_ij = W_ij β_i + β_i per r×r block."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"r": 8}  # divides every dimension of the tiny models (16, 32, 64, 96, 128)

    def __init__(self, spec: LayerSpec, cfg: BoneConfig):
        super().__init__()
        self.spec = spec
        r, variant = self.r, self.variant = cfg.r, cfg.variant
        d_out, d_in = spec.out_features, spec.in_features
        kw = {"dtype": spec.dtype, "device": spec.device}
        if variant == "bat":
            if d_out % r or d_in % r:
                raise ConfigError(
                    f"bone variant 'bat' needs r to divide both dimensions of {spec.name!r} "
                    f"(d_out={d_out}, d_in={d_in}), got r={r}; pick a common divisor or variant='miss'"
                )
            self.miss_block = nn.Parameter(torch.zeros(d_out // r, r, r, **kw))  # β_i (d_out/r, r, r)
            self.needs_w0 = True  # the update reads W0: the layer keeps W0 once it is merged (spec.w0)
        else:
            if r > d_in:
                raise ConfigError(f"bone r={r} exceeds d_in={d_in} of {spec.name!r}; use r <= {d_in}")
            self.miss_block = nn.Parameter(torch.zeros(r, d_out, **kw))  # β (r, d_out)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.miss_block.dtype)
        if self.variant == "bat":
            # (..., d_in) -> (..., d_out); full-rank update, formed once per call
            return F.linear(x, self.delta_weight())
        r, d_in = self.r, x.shape[-1]
        x = F.pad(x, (0, -d_in % r))  # zero-pad the partial last block
        # (..., n·r) -> (..., n, r) -> sum of blocks (..., r) -> (..., d_out)
        return x.reshape(*x.shape[:-1], -1, r).sum(-2) @ self.miss_block

    def delta_weight(self) -> torch.Tensor:
        d_out, d_in, r, beta = self.spec.out_features, self.spec.in_features, self.r, self.miss_block
        if self.variant == "miss":
            return beta.T.repeat(1, math.ceil(d_in / r))[:, :d_in]  # (d_out, d_in)
        # W (d_out, d_in) -> blocks [j, i] = W_ij: (d_in/r, d_out/r, r, r)
        blocks = self.spec.w0().detach().reshape(d_out // r, r, d_in // r, r).permute(2, 0, 1, 3)
        out = blocks @ beta + beta  # β_i broadcast over the column blocks j
        return out.permute(1, 2, 0, 3).reshape(d_out, d_in)

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """"miss": exact at rank r (A = tiled identity, B = βᵀ). "bat": SVD of ΔW, truncated to
        `rank` (all min(d_out, d_in) components, i.e. exact, when rank is None)."""
        if self.variant == "miss":
            d_in, r = self.spec.in_features, self.r
            a = torch.eye(r, dtype=self.miss_block.dtype, device=self.miss_block.device)
            a = a.repeat(1, math.ceil(d_in / r))[:, :d_in]  # (r, d_in)
            b = self.miss_block.detach().T.clone()  # (d_out, r)
            if rank is not None and rank < r:
                from lorakit.ops.lowrank import truncate

                a, b = truncate(a, b, rank)
            return a, b, 1.0
        dw = self.delta_weight().detach()
        u, s, vh = torch.linalg.svd(dw.float(), full_matrices=False)
        k = s.numel() if rank is None else min(rank, s.numel())
        root = s[:k].sqrt()
        return (root[:, None] * vh[:k]).to(dw.dtype), (u[:, :k] * root).to(dw.dtype), 1.0
