"""GaLore: full-parameter training with Adam states in a low-rank gradient subspace
(Zhao et al., arXiv:2403.03507; reference: github.com/jiaweizzhao/GaLore, `galore_torch`).

For a 2-D weight W (m×n) with gradient G, every T steps (steps 0, T, 2T, ...) an orthonormal
basis is taken from the SVD of the *current* gradient, G = U S Vᵀ, on the smaller side
("std" projection, as in the reference):

    m ≤ n ("left"):   P = U[:, :r]  (m×r),   R = Pᵀ G  (r×n),   back(N) = P N   (m×n)
    m > n ("right"):  Q = Vᵀ[:r]   (r×n),   R = G Qᵀ  (m×r),   back(N) = N Q   (m×n)

Adam runs on R, so its two moments are r×max(m, n) instead of m×n:

    M ← β1 M + (1−β1) R,   V ← β2 V + (1−β2) R²,
    N = (M / (1−β1ᵗ)) / (√(V / (1−β2ᵗ)) + ε)                      (r×n or m×r)
    W ← W − η λ W − η α back(N)                                   (decoupled decay λ, scale α)

Optimizer state per projected weight: 2·r·max(m, n) moments + r·min(m, n) projector floats,
vs 2·m·n for AdamW. Moments are kept when the basis is refreshed (as in the reference).
Parameters that are not 2-D (or sit in a group with ``galore=False``) get plain AdamW.
With r = min(m, n) and P = I this is exactly `torch.optim.AdamW`.

Two deliberate differences from `galore_torch.GaLoreAdamW` (both follow torch.optim.AdamW,
so the non-projected path *is* AdamW; the effect is O(ε) and O(η²λ)): ε is added to
√(V̂) rather than to √V with the bias correction folded into the step size, and the
decoupled decay multiplies W before the update rather than after it. Default ε = 1e-8.

Layer-wise mode (`galore_per_layer`): each parameter gets its own optimizer, stepped from a
`register_post_accumulate_grad_hook` the moment its gradient is complete, and the gradient
is freed right away, so the full gradients of all layers never coexist (the reference's
`--optimizer galore_adamw8bit_per_layer`). No gradient accumulation or global-norm clipping
there: both need every gradient at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError

PROJ_TYPES = ("std", "reverse_std", "left", "right")


def _check_group(group: dict[str, Any]) -> None:
    for key in ("rank", "update_proj_gap"):
        v = group[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"GaLore {key} must be a positive integer, got {v!r}")
    if isinstance(group["scale"], bool) or not isinstance(group["scale"], (int, float)) or not group["scale"] > 0:
        raise ConfigError(f"GaLore scale must be a positive number, got {group['scale']!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ConfigError(f"GaLore proj_type must be one of {PROJ_TYPES}, got {group['proj_type']!r}")
    if not isinstance(group["lr"], (int, float)) or group["lr"] < 0:
        raise ConfigError(f"lr must be a non-negative number, got {group['lr']!r}")
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"betas must be in [0, 1), got {group['betas']!r}")
    if not group["eps"] >= 0 or not group["weight_decay"] >= 0:
        raise ConfigError(f"eps and weight_decay must be >= 0, got {group['eps']!r}, {group['weight_decay']!r}")


def projection_side(shape: torch.Size | tuple[int, int], proj_type: str = "std") -> str:
    """'left' (P: m×r, R = PᵀG) or 'right' (Q: r×n, R = G Qᵀ) for an m×n weight."""
    m, n = shape
    if proj_type == "std":  # project the smaller dimension: states r×max(m, n), projector r×min(m, n)
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def orthogonal_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-`rank` singular vectors of `grad` (m×n): U[:, :r] (m×r) for 'left', Vᵀ[:r] (r×n) for 'right'.

    The SVD runs in float32 whatever the parameter dtype (as in the reference).
    """
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = U[:, :rank] if side == "left" else Vh[:rank]
    return basis.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """(m×n) -> (r×n) for 'left', (m×r) for 'right'."""
    return basis.T @ grad if side == "left" else grad @ basis.T


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """(r×n) or (m×r) -> (m×n)."""
    return basis @ low if side == "left" else low @ basis


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose 2-D parameters keep their moments in a rank-r gradient subspace.

    Args:
        params: parameters or param groups. A group may set ``galore=False`` (plain AdamW) and
            override ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``; see
            `galore_param_groups` for the usual split (linear layers projected, rest AdamW).
        lr: learning rate η (default 1e-3).
        rank: r, clipped per weight to min(m, n) (default 128).
        update_proj_gap: T, steps between SVD refreshes of the projector (default 200).
        scale: α, multiplies the projected-back update (default 0.25).
        proj_type: "std" (project the smaller side), "reverse_std", "left", "right".
        betas, eps, weight_decay: as in torch.optim.AdamW (defaults (0.9, 0.999), 1e-8, 0).

    State per projected m×n parameter: ``exp_avg``/``exp_avg_sq`` (r×n or m×r), ``projector``
    (m×r or r×n), ``step`` (int).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "galore": True,
                    "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        lowrank = bool(group["galore"]) and p.dim() == 2
        if lowrank:
            side = projection_side(p.shape, group["proj_type"])
            if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
                state["projector"] = orthogonal_basis(grad, min(group["rank"], *p.shape), side)
            grad = project(grad, state["projector"], side)  # (r×n) or (m×r)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        step_size = lr / (1 - beta1 ** t)
        if lowrank:
            p.add_(project_back(exp_avg / denom, state["projector"], side), alpha=-step_size * group["scale"])
        else:
            p.addcdiv_(exp_avg, denom, value=-step_size)


# -- which parameters to project ----------------------------------------------------------------
def _is_linear(module: nn.Module) -> bool:
    # HF Conv1D (GPT-2) is a linear layer with a transposed 2-D weight
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def galore_param_groups(model: nn.Module, targets: list[str] | None = None) -> list[dict[str, Any]]:
    """Split the trainable parameters into a GaLore group and a plain-AdamW group.

    targets: None projects the weight of every linear layer except the output head (the
    reference projects attention and MLP weights only; embeddings, norms, biases and the LM
    head use AdamW); otherwise a list of substrings of module names, e.g. ["attn", "mlp"].
    Returns ``[{"params": [...], "galore": True}, {"params": [...], "galore": False}]``.
    """
    if targets is not None and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"targets must be a list of module-name substrings, got {targets!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen: set[int] = set()
    for name, module in model.named_modules():
        if not _is_linear(module) or module is head or module.weight.dim() != 2:
            continue
        if targets is not None and not any(t in name for t in targets):
            continue
        chosen.add(id(module.weight))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lowrank = [p for _, p in named if id(p) in chosen]
    if not lowrank:
        raise ConfigError(f"no trainable linear weight matches GaLore targets {targets!r}")
    rest = [p for _, p in named if id(p) not in chosen]
    return [{"params": lowrank, "galore": True}, {"params": rest, "galore": False}]


# -- layer-wise (fused backward) mode ------------------------------------------------------------
class LayerwiseGaLore:
    """One `GaLoreAdamW` per parameter, stepped inside backward; see `galore_per_layer`."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, targets: list[str] | None = None, **galore_kw: Any):
        self.lr = lr
        self.optimizers: dict[nn.Parameter, GaLoreAdamW] = {}
        for group in galore_param_groups(model, targets):
            for p in group["params"]:
                self.optimizers[p] = GaLoreAdamW([{"params": [p], "galore": group["galore"]}], lr=lr, **galore_kw)
        self.schedulers: dict[nn.Parameter, Any] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in self.optimizers]

    def _step_one(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self.optimizers[p].step()
        p.grad = None  # freed now: the next layer's gradient reuses the memory
        if p in self.schedulers:
            self.schedulers[p].step()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every per-parameter optimizer (for a hand-written schedule)."""
        for g in self.param_groups:
            g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: gradients are already freed inside backward (kept for loop compatibility)."""

    def step(self, closure=None) -> None:
        """No-op: the steps happen inside backward (kept for loop compatibility)."""

    def state_dict(self) -> dict[int, dict[str, Any]]:
        return {i: opt.state_dict() for i, opt in enumerate(self.optimizers.values())}

    def load_state_dict(self, state: dict[int, dict[str, Any]]) -> None:
        if len(state) != len(self.optimizers):
            raise ConfigError(f"layer-wise GaLore state has {len(state)} optimizers, expected {len(self.optimizers)}")
        for i, opt in enumerate(self.optimizers.values()):
            opt.load_state_dict(state[i])

    def set_schedule(self, name: str = "linear", num_training_steps: int | None = None,
                     num_warmup_steps: int = 0, **scheduler_kwargs: Any) -> None:
        """Attach a `transformers.get_scheduler` schedule to every per-parameter optimizer;
        each one steps right after its parameter's update (one step per backward)."""
        from transformers import get_scheduler

        self.schedulers = {p: get_scheduler(name, optimizer=opt, num_warmup_steps=num_warmup_steps,
                                            num_training_steps=num_training_steps,
                                            scheduler_specific_kwargs=scheduler_kwargs or None)
                           for p, opt in self.optimizers.items()}

    def trainer_optimizers(self, num_training_steps: int, scheduler: str = "linear", num_warmup_steps: int = 0,
                           **scheduler_kwargs: Any) -> tuple[torch.optim.Optimizer, Any]:
        """``(optimizer, lr_scheduler)`` for ``transformers.Trainer(optimizers=...)``: a no-op
        LayerWiseDummyOptimizer and a scheduler that only reports the per-parameter LR, while
        the real steps and schedules run in the backward hooks. Needs gradient_accumulation_steps=1
        (every backward is a step) and max_grad_norm=0 (gradients are gone before clipping).

        We attach the schedules ourselves: in transformers 5.x, Trainer builds its scheduler
        after accelerate has wrapped the optimizer, so `get_scheduler` no longer recognises the
        dummy and the per-parameter learning rates would silently stay constant (and its
        LayerWiseDummyScheduler fails under torch>=2.13's strict zip in LRScheduler.step)."""
        from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

        self.set_schedule(scheduler, num_training_steps, num_warmup_steps, **scheduler_kwargs)
        dummy = LayerWiseDummyOptimizer(optimizer_dict=self.optimizers, lr=self.lr)
        return dummy, _LayerwiseLRView(dummy, self)

    def remove(self) -> None:
        """Detach the hooks: backward no longer steps (or frees) anything."""
        for h in self._handles:
            h.remove()
        self._handles = []


class _LayerwiseLRView(torch.optim.lr_scheduler.LRScheduler):
    """Trainer-facing scheduler for layer-wise mode: stepping it changes nothing; it reports
    the learning rate of the per-parameter optimizers (their schedules step in backward)."""

    def __init__(self, dummy: torch.optim.Optimizer, layerwise: LayerwiseGaLore):
        self._layerwise = layerwise
        super().__init__(dummy)

    def get_lr(self) -> list[float]:
        return [self._layerwise.param_groups[0]["lr"]]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "_layerwise"}


def galore_per_layer(model: nn.Module, lr: float = 1e-3, targets: list[str] | None = None,
                     **galore_kw: Any) -> LayerwiseGaLore:
    """Train `model` with GaLore in layer-wise mode: ``loss.backward()`` alone updates the weights.

    Each trainable parameter gets a `GaLoreAdamW` (projected for the linear weights chosen by
    `galore_param_groups(model, targets)`, plain AdamW otherwise) stepped by a
    post-accumulate-grad hook, after which its gradient is set to None, so at most one full
    gradient is alive at any time. `galore_kw`: rank, update_proj_gap, scale, proj_type, betas,
    eps, weight_decay. Call `.remove()` on the result to detach.
    """
    return LayerwiseGaLore(model, lr=lr, targets=targets, **galore_kw)


def state_bytes(optimizer: Any) -> int:
    """Bytes held by tensors in an optimizer's state (moments, projectors, tensor step counters).

    Accepts a torch optimizer, an accelerate-wrapped one, a `LayerwiseGaLore` or a transformers
    LayerWiseDummyOptimizer.
    """
    if isinstance(optimizer, LayerwiseGaLore):
        opts = list(optimizer.optimizers.values())
    elif getattr(optimizer, "optimizer_dict", None) is not None:
        opts = list(optimizer.optimizer_dict.values())
    else:
        opts = [getattr(optimizer, "optimizer", optimizer)]
    return sum(t.numel() * t.element_size() for opt in opts for st in opt.state.values()
               for t in st.values() if isinstance(t, torch.Tensor))
