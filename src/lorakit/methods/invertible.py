"""Invertible bottleneck adapters ("seq_bn_inv"), the second architecture of "Small Models, Big
Impact" (Gurgurov et al., arXiv:2502.10140; AdapterHub's `SeqBnInvConfig`): sequential
bottleneck adapters (see `bottleneck.py`) plus an invertible adapter (MAD-X, Pfeiffer et al.,
arXiv:2005.00052) — a NICE coupling block (Dinh et al., arXiv:1410.8516) on the embedding
output, and its exact inverse on the LM head's input, so that input and output embeddings
(tied in most LMs) see mirrored transformations.

NICE coupling on x = [x1, x2], x1 the first d1 = ⌊d/2⌋ features, x2 the other d2 = d − d1:

    forward:  y1 = x1 + F(x2),     y2 = x2 + G(y1)
    inverse:  x2 = y2 − G(y1),     x1 = y1 − F(x2)        (exact for any F, G)

    F: Linear(d2 → ⌊d2/rf⌋) → φ → Linear(→ d1),   G: Linear(d1 → ⌊d1/rf⌋) → φ → Linear(→ d2)

with rf = inv_reduction_factor (AdapterHub default 2) and φ the bottleneck's non-linearity.
Placement as AdapterHub: the embedding output entering the first block (Llama: embed_tokens;
GPT-2: after token + position embeddings and dropout; BERT: the BertEmbeddings output); the
inverse runs on the input of `model.get_output_embeddings()` when the model has one (no LM
head, e.g. sequence classification: the forward coupling only).

Init "zero" (default) zeroes the output layer of F and G: the coupling starts as the identity
and the model exactly at the base. AdapterHub instead initialises F and G with N(0, 0.02)
("bert", also available), which starts near but not at the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.adapter import LayerSpec
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError
from lorakit.methods.bottleneck import Bottleneck, BottleneckConfig, _is_number, activate, init_linear_


@dataclass
class SeqBnInvConfig(BottleneckConfig):
    """BottleneckConfig fields (variant "seq_bn" = AdapterHub SeqBnInvConfig, "double_seq_bn" =
    DoubleSeqBnInvConfig) plus inv_reduction_factor: hidden width of the coupling subnetworks
    F and G is ⌊(d/2) / inv_reduction_factor⌋."""

    inv_reduction_factor: float = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_number(self.inv_reduction_factor) or self.inv_reduction_factor <= 0:
            raise ConfigError(f"inv_reduction_factor must be a positive number, got {self.inv_reduction_factor!r}")


class _Subnet(nn.Module):
    """Linear(d_in → d_in/rf) → φ → Linear(→ d_out): a coupling block's F or G."""

    def __init__(self, d_in: int, d_out: int, rf: float, act: str, init: str, **kw):
        super().__init__()
        hidden = int(d_in // rf)
        if hidden < 1:
            raise ConfigError(f"inv_reduction_factor={rf} leaves no hidden unit for a coupling half of size {d_in}")
        self.act = act
        self.down = nn.Linear(d_in, hidden, **kw)  # (hidden, d_in)
        self.up = nn.Linear(hidden, d_out, **kw)  # (d_out, hidden)
        if init == "bert":
            init_linear_(self.down, init)
            init_linear_(self.up, init)
        else:  # PyTorch's default down projection; zero output layer: F = G = 0, the identity coupling
            init_linear_(self.up, init, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(activate(self.act, self.down(x)))


class NiceCoupling(nn.Module):
    """Additive coupling: forward(x) and inverse(y) with inverse(forward(x)) = x (to rounding)."""

    def __init__(self, d: int, rf: float, act: str, init: str, **kw):
        super().__init__()
        if d < 2:
            raise ConfigError(f"a coupling block needs at least 2 features, got d={d}")
        self.d1 = d // 2
        self.F = _Subnet(d - self.d1, self.d1, rf, act, init, **kw)  # x2 -> shift of x1
        self.G = _Subnet(self.d1, d - self.d1, rf, act, init, **kw)  # y1 -> shift of x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : self.d1], x[..., self.d1 :]
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[..., : self.d1], y[..., self.d1 :]
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat([x1, x2], dim=-1)


@register_method("seq_bn_inv", SeqBnInvConfig, paper="arXiv:2502.10140")
class SeqBnInv(nn.Module):
    """Invertible bottleneck: NICE coupling on the embeddings (inverse before the LM head) plus
    sequential bottleneck adapters in the blocks."""

    zero_init = True
    supports = ("insert",)

    def __init__(self, spec: LayerSpec, cfg: SeqBnInvConfig):
        super().__init__()
        self.spec = spec
        if spec.role == "embed":
            self.inv = NiceCoupling(spec.in_features, cfg.inv_reduction_factor, cfg.activation, cfg.init,
                                    dtype=spec.dtype, device=spec.device)
        else:
            self.bn = Bottleneck(spec, cfg)

    @classmethod
    def insert_roles(cls, config: SeqBnInvConfig) -> tuple[str, ...]:
        return ("embed", *config.roles)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.spec.role != "embed":
            return self.bn.delta(x, base_out)
        u = x.to(self.inv.F.down.weight.dtype)
        return self.inv(u) - u  # embeddings -> coupled embeddings

    def delta_head(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        u = x.to(self.inv.F.down.weight.dtype)
        return self.inv.inverse(u) - u  # final hidden state -> inverse coupling -> LM head

    def delta_weight(self) -> torch.Tensor:
        raise ConfigError("an invertible bottleneck adapter is nonlinear: it has no weight delta")
