"""Sequential bottleneck adapters (Pfeiffer, Houlsby), as evaluated for low-resource languages
in "Small Models, Big Impact" (Gurgurov et al., arXiv:2502.10140), which trains them with
AdapterHub's `SeqBnConfig` / `DoubleSeqBnConfig`. Architectures: Houlsby et al. (arXiv:1902.00751),
Pfeiffer et al. (arXiv:2005.00247). Defaults and placement follow AdapterHub (`adapters`).

One adapter at a site with hidden size d (m = max(1, ⌊d / reduction_factor⌋) hidden units):

    f(u) = s · dropout(W_up φ(W_down u + b_down) + b_up)     W_down: (m, d), W_up: (d, m)
    h ← h + f(u)                                             2·d·m + m + d parameters

Placement (`variant`), see `lorakit.core.adapter.INSERT_ROLES`:
  seq_bn (Pfeiffer; AdapterHub original_ln_before=True, residual_before_ln=True): one adapter
    per block after the FFN. The adapter reads the FFN's residual sum and its output joins the
    FFN output before the block's residual add + LayerNorm:
        post-LN (BERT):          y = LN(s + f(LN(s))),   s = FFN(x) + x
        pre-LN (Llama, GPT-2):   y = z + f(z),           z = x + FFN(LN(x))  (the block output)
  double_seq_bn (Houlsby; original_ln_before=False): adapters after the attention and after the
    FFN sub-layer, on the sub-layer output g before its residual add:  g ← g + f(g).

Init "zero" (default): W_down Kaiming-uniform (a=√5), b_down = W_up = b_up = 0, so f ≡ 0 and the
model starts exactly at the base (AdapterHub's "mam_adapter" init). "bert": AdapterHub's default,
N(0, 0.02) weights and zero biases (starts near, not at, the base).

Nonlinear (φ): cannot be merged into base weights or exported as LoRA; the core refuses both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_range
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError

#: variant -> insertion roles (AdapterHub: seq_bn = output_adapter only; double_seq_bn = mh_adapter + output_adapter)
VARIANTS = {"seq_bn": ("ffn_residual",), "double_seq_bn": ("attn_output", "ffn_output")}
#: AdapterHub's default non-linearity per variant
DEFAULT_ACTIVATION = {"seq_bn": "relu", "double_seq_bn": "swish"}
ACTIVATIONS = {
    "relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
    "leakyrelu": F.leaky_relu,
}
INITS = ("zero", "bert")


def bottleneck_size(d: int, reduction_factor: float) -> int:
    """m = ⌊d / reduction_factor⌋, at least 1 (AdapterHub's down_sample)."""
    return max(1, int(d // reduction_factor))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class BottleneckConfig(AdapterConfig):
    """target: transformer blocks that get adapters: "all", a block path / list (suffix match,
        e.g. ["layers.0"]) or a regex (e.g. r"model\\.layers\\.[0-5]");
    variant: "seq_bn" (Pfeiffer, after the FFN) or "double_seq_bn" (Houlsby, after attention and FFN);
    reduction_factor: m = ⌊d / reduction_factor⌋ hidden units (AdapterHub default 16);
    non_linearity: φ, one of ACTIVATIONS; None = the variant's AdapterHub default (relu / swish);
    init: "zero" (starts at the base) or "bert" (AdapterHub's N(0, 0.02));
    scaling: s, multiplies the adapter output; dropout: on the adapter output.
    """

    target: str | list[str] = "all"
    variant: str = "seq_bn"
    reduction_factor: float = 16
    non_linearity: str | None = None
    init: str = "zero"
    scaling: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if not _is_number(self.reduction_factor) or self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if self.non_linearity is not None and self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity must be one of {sorted(ACTIVATIONS)} or None, got {self.non_linearity!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if not _is_number(self.scaling) or self.scaling == 0:
            raise ConfigError(f"scaling must be a non-zero number, got {self.scaling!r}")
        check_range("dropout", self.dropout, 0.0, 1.0)

    @property
    def activation(self) -> str:
        return self.non_linearity or DEFAULT_ACTIVATION[self.variant]

    @property
    def roles(self) -> tuple[str, ...]:
        return VARIANTS[self.variant]


def init_linear_(layer: nn.Linear, init: str, zero: bool = False) -> None:
    """AdapterHub's initialisers. "zero" init: Kaiming-uniform weight (a=√5) and zero bias, or
    all zeros with zero=True (the output projection). "bert": N(0, 0.02) weight, zero bias."""
    with torch.no_grad():
        if init == "bert":
            layer.weight.normal_(0.0, 0.02)
        elif zero:
            layer.weight.zero_()
        else:
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
        layer.bias.zero_()


def activate(name: str, x: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS[name](x)


@register_method("bottleneck", BottleneckConfig, paper="arXiv:2502.10140")
class Bottleneck(nn.Module):
    """Sequential bottleneck adapter: h ← h + s·(W_up φ(W_down u + b_down) + b_up), after the FFN
    (seq_bn, Pfeiffer) or after attention and FFN (double_seq_bn, Houlsby)."""

    zero_init = True
    supports = ("insert",)

    def __init__(self, spec: LayerSpec, cfg: BottleneckConfig):
        super().__init__()
        self.spec = spec
        d = spec.in_features
        m = bottleneck_size(d, cfg.reduction_factor)
        self.act = cfg.activation
        self.scaling = float(cfg.scaling)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = dict(dtype=spec.dtype, device=spec.device)
        self.adapter_down = nn.Linear(d, m, **kw)  # (m, d) + (m,)
        self.adapter_up = nn.Linear(m, d, **kw)  # (d, m) + (d,)
        init_linear_(self.adapter_down, cfg.init)
        init_linear_(self.adapter_up, cfg.init, zero=True)

    @classmethod
    def insert_roles(cls, config: BottleneckConfig) -> tuple[str, ...]:
        return config.roles

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # (..., d) -> (..., m) -> (..., d)
        u = x.to(self.adapter_down.weight.dtype)
        return self.dropout(self.adapter_up(activate(self.act, self.adapter_down(u))) * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        raise ConfigError("a bottleneck adapter is nonlinear (φ between its projections): it has no weight delta")
