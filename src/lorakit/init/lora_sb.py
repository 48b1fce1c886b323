"""LoRA-SB: initialisation using update approximation (Ponkshe, Singhal et al., arXiv:2411.19557).

LoRA-XS's architecture — frozen B, A and a trainable r × r matrix R between them — initialised
from the first step of full fine-tuning. With G = Σ_b ∂L_b/∂W0 over the first `init_batches`
batches, the first full-FT update is approximated as

    ΔW_1 ≈ −η·sign(G)   (update="adam": Adam's first step; the authors' code)
    ΔW_1 ≈ −η·G / n     (update="sgd")

and its truncated SVD ΔW_1 ≈ U_r S_r V_rᵀ gives

    B = U_r (d_out, r, frozen),   R0 = S_r (r × r diagonal),   A = V_rᵀ (r, d_in, frozen)
    h = W0 x + B (R − R0_off) A x,      ΔW = B (R − R0_off) A,   s = 1 (no scale to tune)

R starts at R0. start="base" (default): R0_off = R0, a frozen offset, so the output equals the
base at init like every other lorakit init. start="update" (the paper's formulation): R0_off = 0,
so the model starts at W0 + U_r S_r V_rᵀ, the best rank-r approximation of the first full-FT
step. ΔW is affine in R (B, A frozen), so the offset shifts where training starts and nothing
else (besides where weight decay pulls R). In the authors' code η is the learning rate of the
first warm-up step, lr / (warmup_ratio · loader steps) ≈ 1e-4 / (0.02 · 16.7k) ≈ 3e-7 with the
defaults of train_arithmetic.py, so their start is the base model up to ~1e-7 and the two starts
nearly coincide; `init_lr` defaults to 1e-6. (With
η = 1e-4, start="update" moves SmolLM2-135M's logits by up to 31: a full Adam step on every
weight.) What carries the data either way is the subspace (U_r, V_r).

Trainable parameters per module: exactly r² (R), r = min(r, d_out, d_in). B, A and R0_off are
persistent buffers (they come from data and are saved with the adapter). Before `data_init`
(e.g. when the contract suite injects without data) B, A are the top-r singular vectors of W0
(LoRA-XS) and R = R0_off = 0, so the output equals the base. `to_lora()` is exact at rank r:
A' = (R − R0_off) A, B' = B, scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int
from lorakit.core.inject import state
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError
from lorakit.init._shared import (
    adapter_layers,
    check_number,
    check_svd_args,
    estimate_gradients,
    svd,
    take_batches,
)

UPDATES = ("adam", "sgd")
STARTS = ("update", "base")


@dataclass
class LoraSBConfig(AdapterConfig):
    """r: rank of the frozen bases (r² trainable parameters per module); init_batches: batches
    whose gradients form the update approximation; update: "adam" (−η·sign(G), the authors'
    code) or "sgd" (−η·mean gradient); init_lr: η of that first step (the reference uses the
    learning rate of its first warm-up step); start: "base" (begin at the base output, R0 kept
    as a frozen offset) or "update" (the paper: begin at W0 + the approximated first step);
    svd: "lowrank" (torch.svd_lowrank) or "full"; niter: iterations for "lowrank".
    """

    r: int = 16
    init_batches: int = 8
    update: str = "adam"
    init_lr: float = 1e-6
    start: str = "base"
    svd: str = "lowrank"
    niter: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_int("init_batches", self.init_batches)
        if self.update not in UPDATES:
            raise ConfigError(f"update must be one of {UPDATES}, got {self.update!r}")
        check_number("init_lr", self.init_lr)
        if self.start not in STARTS:
            raise ConfigError(f"start must be one of {STARTS}, got {self.start!r}")
        check_svd_args(self.svd, self.niter)


def first_update(grad_mean: torch.Tensor, cfg: LoraSBConfig) -> torch.Tensor:
    """The approximated first full fine-tuning update ΔW_1 (d_out, d_in) from the mean gradient."""
    if cfg.update == "adam":  # Adam's first step is −η·m/√v = −η·sign(g) (bias-corrected, ε → 0)
        return -cfg.init_lr * torch.sign(grad_mean)
    return -cfg.init_lr * grad_mean


@register_method("lora_sb", LoraSBConfig, paper="arXiv:2411.19557")
class LoraSB(nn.Module):
    """LoRA-SB: h = W0 x + B (R − R0) A x; B, A frozen from the SVD of the first-step update, R (r × r) trains."""

    zero_init = True  # output == base when built, and after data_init with start="base"
    supports = ("linear",)
    test_config: ClassVar[dict] = {"r": 4}

    def __init__(self, spec: LayerSpec, cfg: LoraSBConfig):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        r = self.r = min(cfg.r, spec.out_features, spec.in_features)
        kw = {"dtype": spec.dtype, "device": spec.device}
        with torch.no_grad():  # LoRA-XS bases until data arrives
            u, _, vh = svd(spec.weight().detach(), r, cfg.svd, cfg.niter)
        self.register_buffer("lora_B", u[:, :r].to(**kw).contiguous())  # (d_out, r), persistent
        self.register_buffer("lora_A", vh[:r].to(**kw).contiguous())  # (r, d_in), persistent
        self.register_buffer("lora_R0", torch.zeros(r, r, **kw))  # (r, r) frozen offset, persistent
        self.lora_R = nn.Parameter(torch.zeros(r, r, **kw))  # (r, r): the only trainable tensor

    @torch.no_grad()
    def init_from_update(self, update: torch.Tensor) -> None:
        """B, A ← top-r singular vectors of the update (d_out, d_in); R ← diag(S_r)."""
        u, s, vh = svd(update, self.r, self.cfg.svd, self.cfg.niter)
        self.lora_B.copy_(u[:, : self.r])
        self.lora_A.copy_(vh[: self.r])
        self.lora_R.copy_(torch.diag(s[: self.r]))
        self.lora_R0.copy_(self.lora_R if self.cfg.start == "base" else torch.zeros_like(self.lora_R))

    def core(self) -> torch.Tensor:
        return self.lora_R - self.lora_R0  # (r, r); exactly 0 while R = R0

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # (..., d_in) -> (..., r) -> (..., r) -> (..., d_out); ΔW is never formed
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        return F.linear(F.linear(h, self.core()), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ self.core() @ self.lora_A  # (d_out, d_in) — merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        a = (self.core() @ self.lora_A).detach()  # (r, d_in)
        b = self.lora_B.detach().clone()  # (d_out, r)
        if rank is not None and rank < self.r:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, 1.0

    @classmethod
    def data_init(cls, model: nn.Module, name: str, config: LoraSBConfig, batches) -> None:
        """Approximate the first full-FT step from `config.init_batches` batches; set B, R, A per layer."""
        grads = estimate_gradients(model, name, take_batches(batches, config.init_batches))
        for path, layer in adapter_layers(model, name).items():
            layer.adapters[name].init_from_update(first_update(grads.pop(path), config))


def init_lora_sb(model: nn.Module, batches, name: str = "default") -> nn.Module:
    """LoRA-SB initialisation of the injected adapter `name` for a custom training loop.

    `batches`: an iterable of batch dicts (input_ids, labels, ...) or a callable n -> batches.
    """
    cfg = state(model).configs.get(name)
    if not isinstance(cfg, LoraSBConfig):
        raise ConfigError(f"adapter {name!r} is not a LoRA-SB adapter (config: {type(cfg).__name__})")
    LoraSB.data_init(model, name, cfg, batches)
    return model
