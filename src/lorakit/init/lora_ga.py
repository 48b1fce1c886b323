"""LoRA-GA: low-rank adaptation with gradient approximation (Wang et al., arXiv:2407.05000).

Initialise A, B so that the first step of LoRA moves ΔW along the best rank-2r approximation
of the full fine-tuning gradient. With G = (1/n) Σ_b ∂L_b/∂W0 (d_out, d_in), averaged over the
first `init_batches` training batches, and its SVD G = U S Vᵀ:

    A = ζ · Vᵀ[:r]         (r, d_in)      ("ArB2r", the reference default)
    B = ζ · U[:, r:2r]     (d_out, r)
    ζ = d_out^{1/4} / √γ   ("stable output" scale, γ = 16; ζ = 1 with scale="unit")

After one SGD step on A and B, Δ(s·B A) ∝ −(B Bᵀ G + G Aᵀ A)
= −ζ²·(U_{r:2r} S_{r:2r} V_{r:2r}ᵀ + U_{:r} S_{:r} V_{:r}ᵀ) = −ζ²·G_2r, the best rank-2r
approximation of G: the direction of the first full fine-tuning step. The paper keeps the
init output unchanged by W0 ← W0 − s·B A; lorakit keeps W0 and adds the same frozen offset
as PiSSA:

    h = W0 x + s·B A x − s·B0 A0 x,      ΔW = s·(B A − B0 A0),   s = α / r.

Index sets, ζ on both factors and the sign follow the authors' code (github.com/Outsider565/
LoRA-GA, peft/src/peft/tuners/lora/layer.py `lora_ga_init`: B = U[:, r:2r]·ζ, A = V[:r]·ζ, no
sign flip; the sign of B does not change the first step, as B Bᵀ is sign-free). Where 2r
exceeds min(d_out, d_in) the missing singular directions are left as zero columns of B.
A0, B0 are persistent buffers (saved: they come from data). Trainable parameters per module:
r·(d_in + d_out). Before `data_init` (e.g. when the contract suite injects without data) the
adapter is plain LoRA: Kaiming A, zero B, zero offset.

Gradient estimation switches requires_grad on for the target base weights only and restores
every flag afterwards (as PEFT's `preprocess_loraga`); `train()` calls `data_init`, custom
loops call `init_lora_ga(model, batches)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.inject import state
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError
from lorakit.init._shared import (
    OffsetLowRank,
    adapter_layers,
    check_number,
    check_svd_args,
    estimate_gradients,
    svd,
    take_batches,
)

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "unit")


@dataclass
class LoraGAConfig(AdapterConfig):
    """r: rank; alpha: s = α/r; dropout on the adapter input; init_batches: batches whose
    gradients are averaged (paper: 64; 8 here because CPUs are slow); direction: which singular
    vectors go to A and B ("ArB2r": A = V[:r], B = U[r:2r]; "A2rBr": A = V[r:2r], B = U[:r];
    "ArBr": alternating, B even / A odd indices); scale: "stable" (ζ = d_out^{1/4}/√γ) or
    "unit" (ζ = 1); gamma: γ; svd: "lowrank" (the reference's torch.svd_lowrank, q ≈ 4r) or "full"; niter: subspace
    iterations for "lowrank".
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init_batches: int = 8
    direction: str = "ArB2r"
    scale: str = "stable"
    gamma: float = 16.0
    svd: str = "lowrank"
    niter: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha)
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_positive_int("init_batches", self.init_batches)
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise ConfigError(f"scale must be one of {SCALES}, got {self.scale!r}")
        check_number("gamma", self.gamma)
        check_svd_args(self.svd, self.niter)


def split_indices(direction: str, r: int) -> tuple[list[int], list[int]]:
    """(indices of Vᵀ rows for A, indices of U columns for B) among the top 2r singular triplets."""
    if direction == "ArB2r":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(r))
    return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))  # "ArBr"


def lora_ga_factors(grad: torch.Tensor, r: int, cfg: LoraGAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) from the averaged gradient (d_out, d_in), before the scale s."""
    d_out, d_in = grad.shape
    u, _, vh = svd(grad, 2 * r, cfg.svd, cfg.niter)
    k = vh.shape[0]  # singular triplets available (min(d_out, d_in), or q for "lowrank")
    ia, ib = split_indices(cfg.direction, r)
    a = torch.zeros(r, d_in)
    b = torch.zeros(d_out, r)
    for row, i in enumerate(ia):
        if i < k:
            a[row] = vh[i]
    for col, i in enumerate(ib):
        if i < k:
            b[:, col] = u[:, i]
    zeta = d_out ** 0.25 / math.sqrt(cfg.gamma) if cfg.scale == "stable" else 1.0
    return a * zeta, b * zeta


@register_method("lora_ga", LoraGAConfig, paper="arXiv:2407.05000")
class LoraGA(OffsetLowRank):
    """LoRA-GA: h = W0 x + s·(B A − B0 A0) x with A, B from the SVD of the averaged full gradient."""

    test_config: ClassVar[dict] = {"r": 4}

    def __init__(self, spec: LayerSpec, cfg: LoraGAConfig):
        super().__init__()
        self.cfg = cfg
        self._build(spec, cfg.r, cfg.alpha / cfg.r, cfg.dropout)
        self.reset_random()

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """Set A, B (and the offset A0, B0) from this layer's averaged gradient (d_out, d_in)."""
        a, b = lora_ga_factors(grad, self.r, self.cfg)
        self.set_factors(a, b)

    @classmethod
    def data_init(cls, model: nn.Module, name: str, config: LoraGAConfig, batches) -> None:
        """Average the full gradients over `config.init_batches` batches and initialise every layer."""
        grads = estimate_gradients(model, name, take_batches(batches, config.init_batches))
        for path, layer in adapter_layers(model, name).items():
            layer.adapters[name].init_from_gradient(grads.pop(path))


def init_lora_ga(model: nn.Module, batches, name: str = "default") -> nn.Module:
    """LoRA-GA initialisation of the injected adapter `name` for a custom training loop.

    `batches`: an iterable of batch dicts (input_ids, labels, ...) or a callable n -> batches;
    the first `init_batches` (from the adapter's config) are used.
    """
    cfg = state(model).configs.get(name)
    if not isinstance(cfg, LoraGAConfig):
        raise ConfigError(f"adapter {name!r} is not a LoRA-GA adapter (config: {type(cfg).__name__})")
    LoraGA.data_init(model, name, cfg, batches)
    return model
