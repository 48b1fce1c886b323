"""ALLoRA: adaptive per-row learning rate for LoRA factors (Huang & Balestriero, arXiv:2410.09692).

Before every step of the wrapped optimizer, the gradient of each row θ_i of every LoRA factor
matrix (lora_A (r, d_in) and lora_B (d_out, r), rows in nn.Linear weight layout = one output
unit each) is multiplied by a coefficient inversely proportional to the row's ℓ2 norm:

    g_i ← g_i / √(‖θ_i‖² + 1/η²)

A zero row (B at init) gets its gradient scaled by η, so B leaves 0 fast; large rows move
slowly (a norm-dependent, weight-decay-free regulariser). The coefficient depends only on the
parameters, so scaling the summed gradient equals scaling every per-sample gradient.

The paper's recipe is LoRA with *no dropout and no scaling* (α/r = 1): build the adapter with
`allora_lora_config(r, target=...)` (LoraConfig with alpha=r, dropout=0) and train it with

    opt = ALLoRA(model, eta=..., lr=1e-3)                   # AdamW on the trainable params
    opt = ALLoRA(torch.optim.SGD(params, lr=...), eta=..., model=model)   # wrap your own

Without a `model`, every 2-D parameter of the wrapped optimizer is treated as a factor; with a
model, only the lora_A / lora_B factors of adapter `name` (any LoRA-family method that names
its factors so, e.g. lora, dylora, lamda's B) are scaled and the rest pass through unchanged.

Limits: η → 0 gives the constant coefficient η, i.e. the plain optimizer with lr·η (plain Adam
exactly, up to eps, since Adam is invariant to a constant gradient scale); η → ∞ gives
normalised-row gradients g_i / ‖θ_i‖.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lorakit.errors import ConfigError

FACTOR_NAMES = ("lora_A", "lora_B")


def allora_scale(p: torch.Tensor, eta: float) -> torch.Tensor:
    """(rows, 1): 1 / √(‖p_i‖² + 1/η²) for each row p_i of a 2-D tensor."""
    norm2 = p.detach().float().pow(2).sum(dim=1, keepdim=True)
    return torch.rsqrt(norm2 + 1.0 / (eta * eta))


def factor_params(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The trainable lora_A / lora_B matrices of adapter `name` (nn.Linear weights or Parameters)."""
    from lorakit.core.inject import adapter_modules

    out = []
    for m in adapter_modules(model, name).values():
        for attr in FACTOR_NAMES:
            obj = getattr(m, attr, None)
            p = obj.weight if isinstance(obj, nn.Linear) else obj
            if isinstance(p, nn.Parameter) and p.requires_grad and p.dim() == 2:
                out.append(p)
    if not out:
        raise ConfigError(f"adapter {name!r} has no trainable lora_A / lora_B factor matrices for ALLoRA")
    return out


def allora_lora_config(r: int = 8, **kwargs):
    """The paper's LoRA: no dropout and no scaling (alpha = r, so α/r = 1)."""
    from lorakit.methods.lora import LoraConfig

    return LoraConfig(r=r, alpha=r, dropout=0.0, **kwargs)


class ALLoRA(torch.optim.Optimizer):
    """Optimizer wrapper: per-row gradient scaling 1/√(‖θ_i‖² + 1/η²) of LoRA factors, then the inner step.

    optimizer_or_params: a torch Optimizer to wrap, an nn.Module (its trainable parameters,
        factors found as lora_A/lora_B of adapter `name`), or an iterable of parameters / groups.
    eta: η > 0. Zero rows get their gradient scaled by η; the paper's hyper-parameter replacing
        LoRA's α and dropout (no paper default; tune like a learning-rate multiplier).
    model, name: where to find the factor matrices (default: all 2-D params of the optimizer).
    optimizer_cls, **optimizer_kwargs: inner optimizer built when params (or a model) are given
        (default AdamW).

    Like accelerate's AcceleratedOptimizer it subclasses Optimizer without calling its
    __init__: param_groups / state / state_dict are the inner optimizer's, so LR schedulers,
    `transformers.Trainer` and checkpoints see one ordinary optimizer.
    """

    def __init__(self, optimizer_or_params, eta: float = 1.0, model: nn.Module | None = None,
                 name: str = "default", optimizer_cls: type = torch.optim.AdamW, **optimizer_kwargs):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or not math.isfinite(eta):
            raise ConfigError(f"eta must be a positive finite number, got {eta!r}")
        if isinstance(optimizer_or_params, nn.Module):
            model = optimizer_or_params if model is None else model
            optimizer_or_params = [p for p in optimizer_or_params.parameters() if p.requires_grad]
        if isinstance(optimizer_or_params, torch.optim.Optimizer):
            if optimizer_kwargs:
                raise ConfigError(f"optimizer kwargs {sorted(optimizer_kwargs)} given with a ready optimizer")
            self.optimizer = optimizer_or_params
        elif isinstance(optimizer_or_params, Iterable):
            self.optimizer = optimizer_cls(optimizer_or_params, **optimizer_kwargs)
        else:
            raise ConfigError(f"ALLoRA wraps an optimizer, a model or parameters, got {type(optimizer_or_params).__name__}")
        self.eta = float(eta)
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        if model is not None:
            self.factors = [p for p in factor_params(model, name) if id(p) in in_opt]
            if not self.factors:
                raise ConfigError(f"none of adapter {name!r}'s lora_A / lora_B factors are in the optimizer")
        else:
            self.factors = [p for g in self.optimizer.param_groups for p in g["params"] if p.dim() == 2]

    # -- delegate the Optimizer interface to the inner optimizer ------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"ALLoRA(eta={self.eta}, factors={len(self.factors)}, optimizer={self.optimizer!r})"

    # -- the method ------------------------------------------------------------------------
    @torch.no_grad()
    def scale_gradients(self) -> None:
        """g_i ← g_i / √(‖θ_i‖² + 1/η²) for every row of every factor with a gradient."""
        for p in self.factors:
            if p.grad is not None:
                p.grad.mul_(allora_scale(p, self.eta).to(p.grad.dtype))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.scale_gradients()
        self.optimizer.step()
        return loss
