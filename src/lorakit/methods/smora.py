"""SMoRA: single-ranked mixture of experts LoRA — every rank is an expert (Zhao et al., arXiv:2501.15103).

One LoRA of rank r whose ranks are routed per token; only the top-k ranks are active:

    z(x)  = W_g x                                       W_g: (r, d_in) router, Kaiming-uniform
    S(x)  = top-k indices of z(x) + b                   b: (r,) balancing bias (selection only)
    G(x)  = k · softmax(z_S(x)) on S, 0 elsewhere       (r,) rank gates
    h     = W0 x + s · B diag(G(x)) A x                 A: (r, d_in) Kaiming-uniform,
                                                        B: (d_out, r) zeros,  s = α / r

The paper writes G(x) = Softmax(TopK(x W_g)); lorakit multiplies by k so that the active
gates average 1. It is the paper's update with α' = k·α, and it makes the METHODS.md check
exact: with k = r and a uniform router (all G = 1), SMoRA *is* plain LoRA B A.

Load balancing without an auxiliary loss (DeepSeek-V3 style, as the paper): the bias b only
changes which ranks are selected, never the gate values, and after every optimizer step

    b_i ← b_i + u · sign(c̄ − c_i)        c_i: tokens routed to rank i since the last step,
                                          c̄ = mean_i c_i,  u = bias_update_rate (1e-5)

so overloaded ranks become less likely to be chosen and idle ones more likely. b is a
persistent buffer (it is saved and loaded with the adapter; it gets no gradient). Inside
`lorakit.train.train` (or any Trainer given `Smora.trainer_callbacks(...)`) the update runs
in `on_optimizer_step`; the counts c accumulate over every training forward in between
(gradient accumulation included). In a custom loop call `smora_balance_step(model)` after
each `optimizer.step()`. Under DDP the loads are counted per process; DDP broadcasts rank 0's
buffers before each forward, so rank 0's loads steer the bias (DeepSeek-V3 counts globally).

The update depends on x through the routing: `delta_weight` (merge) raises instead of
approximating, and there is no `to_lora` (LoRA export refuses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.inject import adapter_modules
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError
from lorakit.methods.mola import check_number, not_mergeable


@dataclass
class SmoraConfig(AdapterConfig):
    """r: number of ranks (= experts); top_k: ranks active per token; alpha: s = α/r;
    bias_update_rate: u of the balancing-bias step (0 = no balancing); dropout on the adapter
    input. Defaults: the paper's 64 ranks with 8 active and u = 1e-5.
    """

    r: int = 64
    top_k: int = 8
    alpha: float = 16.0
    bias_update_rate: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_int("top_k", self.top_k)
        if self.top_k > self.r:
            raise ConfigError(f"top_k={self.top_k} exceeds the number of ranks r={self.r}; use top_k <= r")
        check_number("alpha", self.alpha)
        check_number("bias_update_rate", self.bias_update_rate, positive=False)
        check_range("dropout", self.dropout, 0.0, 1.0)


@register_method("smora", SmoraConfig, paper="arXiv:2501.15103")
class Smora(nn.Module):
    """SMoRA: h = W0 x + (α/r) B diag(G(x)) A x; a router picks the top-k of the r ranks per token."""

    zero_init = True
    supports = ("linear",)
    mergeable: ClassVar[bool] = False  # routed per token: no ΔW exists
    test_config: ClassVar[dict] = {"r": 4, "top_k": 2}

    def __init__(self, spec: LayerSpec, cfg: SmoraConfig):
        super().__init__()
        self.spec = spec
        self.r, self.top_k = cfg.r, cfg.top_k
        self.scale = cfg.alpha / cfg.r
        self.bias_update_rate = cfg.bias_update_rate
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.router = nn.Parameter(torch.empty(cfg.r, spec.in_features, **kw))  # W_g: (r, d_in)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, spec.in_features, **kw))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(spec.out_features, cfg.r, **kw))  # (d_out, r)
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's init (PEFT / loralib)
        self.register_buffer("router_bias", torch.zeros(cfg.r, dtype=torch.float32, device=spec.device))  # b
        # c: routed tokens per rank since the last balancing step (training forwards only)
        self.register_buffer("pending_load", torch.zeros(cfg.r, dtype=torch.float32, device=spec.device),
                             persistent=False)
        self.last_counts: torch.Tensor | None = None  # (r,) selections in the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, d_in) -> chosen ranks (N, k), gates G (N, r)."""
        z = F.linear(x, self.router).float()  # (N, r)
        chosen = (z.detach() + self.router_bias).topk(self.top_k, dim=-1).indices  # bias: selection only
        g = torch.softmax(z.gather(-1, chosen), dim=-1) * self.top_k  # (N, k)
        return chosen, torch.zeros_like(z).scatter(-1, chosen, g).to(x.dtype)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)  # (N, d_in)
        chosen, gates = self.route(x2)  # (N, k), (N, r)
        counts = torch.bincount(chosen.reshape(-1), minlength=self.r).detach()
        self.last_counts = counts
        if self.training:
            self.pending_load += counts.to(self.pending_load.dtype)
        # (N, d_in) -> (N, r) -> gate -> (N, d_out); ΔW is never formed
        h = F.linear(self.dropout(x2), self.lora_A) * gates
        return (F.linear(h, self.lora_B) * self.scale).reshape(*lead, self.spec.out_features)

    def delta_weight(self) -> torch.Tensor:
        raise not_mergeable("SMoRA")

    @torch.no_grad()
    def balance_step_(self, rate: float | None = None) -> None:
        """b ← b + u·sign(mean(c) − c) from the loads c since the last call; resets c."""
        u = self.bias_update_rate if rate is None else rate
        c = self.pending_load
        if c.sum() > 0 and u > 0:
            self.router_bias += u * torch.sign(c.mean() - c)
        c.zero_()

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: SmoraConfig) -> list:
        """One callback: the balancing-bias step right after every optimizer step."""
        return [balance_callback(model, name)]


# -- model-level helpers ------------------------------------------------------------------------
def smora_modules(model: nn.Module, name: str = "default") -> dict[str, Smora]:
    """Module path -> SMoRA adapter `name`; errors if the model has no such SMoRA adapter."""
    return adapter_modules(model, name, Smora, "SMoRA")


def smora_balance_step(model: nn.Module, name: str = "default") -> None:
    """Apply the bias update to every router of adapter `name` (call after `optimizer.step()`)."""
    for m in smora_modules(model, name).values():
        m.balance_step_()


def balance_callback(model: nn.Module, name: str = "default"):
    """A TrainerCallback running the balancing-bias step right after each `optimizer.step()`."""
    from transformers import TrainerCallback

    mods = list(smora_modules(model, name).values())

    class SmoraBiasBalancing(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            for m in mods:
                m.balance_step_()

    return SmoraBiasBalancing()
