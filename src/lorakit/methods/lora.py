"""LoRA: low-rank adaptation (Hu et al., arXiv:2106.09685); rsLoRA scaling (arXiv:2312.03732).

    h = W0 x + s · B A x,   A: (r, d_in) Kaiming-uniform,  B: (d_out, r) zeros,
    s = α / r   (rsLoRA: s = α / √r)

For embeddings (PEFT convention): A: (r, num_embeddings) zeros, B: (dim, r) normal, and
    h = W0[ids] + s · (Aᵀ[ids]) Bᵀ.

The forward/backward never forms ΔW = B A (d_out × d_in): x is first projected to rank r,
which is what makes training cheap (see "Computational limits of LoRA" in METHODS.md).
Parameter names match PEFT's (`lora_A.weight`, `lora_embedding_A`) so files interoperate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.layer import embed
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError


@dataclass
class LoraConfig(AdapterConfig):
    """r: rank; alpha: scale numerator; dropout on the adapter input; rslora: s = α/√r;
    init: "kaiming" (PEFT default) or "gaussian" (A ~ N(0, 1/r)); bias: only "none";
    rank_pattern / alpha_pattern: per-module overrides {regex on module path suffix: value}.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        for k, v in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{k!r}]", v)
        check_range("dropout", self.dropout, 0.0, 1.0)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r} is not supported; lorakit LoRA trains no biases (bias='none')")

    def rank_alpha(self, module_path: str) -> tuple[int, float]:
        """(r, alpha) for one module, applying rank_pattern/alpha_pattern like PEFT."""
        return (_pattern(self.rank_pattern, module_path, self.r), _pattern(self.alpha_pattern, module_path, self.alpha))


def _pattern(patterns: dict, path: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@register_method("lora", LoraConfig, paper="arXiv:2106.09685")
class Lora(nn.Module):
    """LoRA: h = W0 x + (α/r) B A x with trainable low-rank A, B."""

    zero_init = True
    supports = ("linear", "embedding")

    def __init__(self, spec: LayerSpec, cfg: LoraConfig):
        super().__init__()
        self.spec = spec
        r, alpha = cfg.rank_alpha(spec.name)
        self.r = r
        self.scale = alpha / (math.sqrt(r) if cfg.rslora else r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = dict(dtype=spec.dtype, device=spec.device)
        if spec.kind == "embedding":
            self.lora_embedding_A = nn.Parameter(torch.empty(r, spec.in_features, **kw))  # (r, num_emb)
            self.lora_embedding_B = nn.Parameter(torch.empty(spec.out_features, r, **kw))  # (dim, r)
            a, b = self.lora_embedding_A, self.lora_embedding_B
            zero, rand = (a, b) if cfg.init == "kaiming" else (b, a)
            nn.init.zeros_(zero)
            nn.init.normal_(rand)
        else:
            self.lora_A = nn.Linear(spec.in_features, r, bias=False, **kw)  # (r, d_in)
            self.lora_B = nn.Linear(r, spec.out_features, bias=False, **kw)  # (d_out, r)
            if cfg.init == "kaiming":  # PEFT's reset_lora_parameters(init_lora_weights=True)
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            else:  # init_lora_weights="gaussian"
                nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            nn.init.zeros_(self.lora_B.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)) in the orientation of the base weight view."""
        if self.spec.kind == "embedding":
            # ΔW of the table (num_emb, dim) = Aᵀ Bᵀ: as "linear" d_out=num_emb, d_in=dim.
            return self.lora_embedding_B.T, self.lora_embedding_A.T
        return self.lora_A.weight, self.lora_B.weight

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.spec.kind == "embedding":
            # (..., ) ids -> (..., r) -> (..., dim)
            return embed(x, self.lora_embedding_A.T, self.spec) @ self.lora_embedding_B.T * self.scale
        # (..., d_in) -> (..., r) -> (..., d_out); ΔW is never formed. Under autocast the matmuls
        # pick their own dtype: an up-cast here would only add a saved copy of x per module.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scale  # (d_out, d_in) — merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self.factors()
        if rank is not None and rank < self.r:
            from lorakit.ops.lowrank import truncate  # SVD re-factorisation at a lower rank

            a, b = truncate(a, b, rank)
            return a, b, self.scale
        return a.detach().clone(), b.detach().clone(), self.scale
