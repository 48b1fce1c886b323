"""CoDyRA: continual dynamic rank-selective LoRA (Lu et al., arXiv:2412.01004;
reference code github.com/Artificer-AI-Lab/CoDyRA, loralib/codyra.py + models/codyra.py).

A sequence of tasks is learned by one fresh gated LoRA per task (SoRA's gated rank, see
`lorakit.methods.sora`), each folded into the weights before the next task starts:

    task t:      h = W_{t-1} x + s · B_t (g_t ⊙ (A_t x)),
                 A_t: (r, d_in) Kaiming-uniform,  B_t: (d_out, r) zeros,  g_t: (r,) ~ N(0, 1),
                 s = α / r   (α = r = 16 by default: s = 1, the authors' lora_scaling = 1)
    next task:   W_t = W_{t-1} + s · B_t diag(g_t) A_t       then fresh A, B, g   (`next_task`)

Sparsity (the rank selection): after optimizer step k (0-based) of the K steps of a task the
gates take the L1 proximal step — soft thresholding, SoRA's `proximal_step_`:

    g ← sign(g) · max(|g| − κ_k, 0)           (κ_k · η_k when lr_scaled=True)

on the authors' schedule (`kappa_schedule`): no proximal step while k ≤ ρK (dense phase,
ρ = dense_fraction = 0.5); then κ climbs the staircase linspace(0, κ_max, n), n = lambda_steps
= 50, one stair every e = ⌊(K − ρK)/n⌋ steps (at least 1):

    κ_k = κ_max · min(n − 1, #{j ≤ k : j ≥ ρK, j mod e = 0}) / (n − 1)

Ranks whose gate is 0 add nothing: every module ends each task with its own, data-driven
rank, and because each update is folded into W the deployed model keeps the pretrained
architecture with no inference overhead. The adapter *is* a SoRA adapter (subclass): SoRA's
`prune`, `active_ranks` and `proximal_step_` work on it unchanged (pruning zero-gate ranks is
bit-identical).

Deviations from the reference code: its in-place gate update
(`g[g > κ] -= κ; g[g < -κ] += κ; g[|g| < κ] = 0`, the last line applied after the shift)
zeroes (all but |g| = κ of) every |g| < 2κ; here the exact proximal operator of κ‖g‖₁ (SoRA's) zeroes |g| ≤ κ.
For tasks shorter than ρK + n steps its stair length is 0 and κ stays 0; here it is ≥ 1.

The folded updates live in the base weights, not in the adapter file: keep the continual
model with `lorakit.eject(model)` + `save_pretrained` (the adapter saved by `lorakit.save`
holds only the current task's gated LoRA).

Training: `lorakit.continual.run_task_sequence(model, tasks, strategy=CodyraStrategy())`
runs the whole sequence; inside a `transformers.Trainer` (one task per `train()` call) the
callback from `Codyra.trainer_callbacks` applies the schedule from `state.global_step` and
`state.max_steps`; in a custom loop call `codyra_proximal_step(model, step, total, lr)`
after each `optimizer.step()` and `next_task(model)` between tasks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lorakit.continual import Strategy, TaskInfo
from lorakit.core.adapter import LayerSpec, check_range
from lorakit.core.inject import adapted_layers, adapter_modules, check_not_merged, state
from lorakit.core.registry import register_method
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.sora import Sora, SoraConfig, active_ranks


@dataclass
class CodyraConfig(SoraConfig):
    """SoRA's fields with the authors' CoDyRA defaults (runner_codyra.sh: rank 16, κ_max = 5e-3,
    absolute threshold) plus the sparsity schedule.

    sparse_lambda: κ_max, the last (largest) proximal threshold of each task;
    lr_scaled: threshold κ·η (SoRA's Eq. 5) instead of the authors' absolute κ;
    dense_fraction: fraction ρ of each task's steps trained without any proximal step;
    lambda_steps: number n of thresholds in linspace(0, κ_max, n) climbed after the dense phase.
    """

    r: int = 16
    alpha: float = 16.0
    sparse_lambda: float = 5e-3
    lr_scaled: bool = False
    dense_fraction: float = 0.5
    lambda_steps: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("dense_fraction", self.dense_fraction, 0.0, 1.0)
        n = self.lambda_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"lambda_steps must be an integer >= 2 (the staircase linspace(0, κ_max, n) "
                              f"starts at 0), got {n!r}")

    def step_threshold(self, step: int, total_steps: int, lr: float | None = None) -> float | None:
        """Threshold of the proximal step after optimizer step `step`, None in the dense phase."""
        kappa = kappa_schedule(step, total_steps, self.sparse_lambda, self.dense_fraction, self.lambda_steps)
        if kappa is None or not self.lr_scaled:
            return kappa
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ConfigError(f"lr_scaled=True needs the learning rate of the gates (a number >= 0), got {lr!r}")
        return kappa * float(lr)


def kappa_schedule(step: int, total_steps: int, kappa_max: float, dense_fraction: float = 0.5,
                   lambda_steps: int = 50) -> float | None:
    """κ after optimizer step `step` (0-based) of `total_steps`, or None during the dense phase.

    The authors' `train_model` loop: `dense_iters = ρK`, thresholds `linspace(0, κ_max, n)`, the
    index advancing at every step j ≥ ρK with j % e == 0, e = ⌊(K − ρK)/n⌋; the proximal step
    runs only when k > ρK. (There e = 0 — no sparsity at all — when K − ρK < n; here e ≥ 1.)
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < total_steps:
        raise ConfigError(f"step must be an integer in [0, {total_steps}), got {step!r}")
    dense = dense_fraction * total_steps
    if step <= dense:
        return None
    every = max(1, int((total_steps - dense) // lambda_steps))
    first = math.ceil(dense)
    stairs = step // every - (first - 1) // every  # #{j in [first, step] : j % every == 0}
    return kappa_max * min(lambda_steps - 1, stairs) / (lambda_steps - 1)


@register_method("codyra", CodyraConfig, paper="arXiv:2412.01004")
class Codyra(Sora):
    """CoDyRA: per-task gated LoRA h = W x + (α/r) B (g ⊙ A x) with scheduled L1 gate sparsity, folded into W per task."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"r": 4}

    def __init__(self, spec: LayerSpec, cfg: CodyraConfig):
        super().__init__(spec, cfg)
        self.gate_init = cfg.gate_init

    @torch.no_grad()
    def reset_(self) -> None:
        """Fresh factors for the next task at the full rank r (the authors' `increment_task`):
        A Kaiming-uniform, B zeros (so the layer output does not move), g ~ N(0, 1) (or ones)."""
        ref = self.lora_A
        kw = {"dtype": ref.dtype, "device": ref.device}
        trainable = self.gate.requires_grad
        a = torch.empty(self.r, self.spec.in_features, **kw)  # (r, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        g = torch.empty(self.r, **kw)  # (r,)
        if self.gate_init == "normal":
            nn.init.normal_(g)
        else:
            nn.init.ones_(g)
        self.lora_A = nn.Parameter(a, requires_grad=trainable)
        self.lora_B = nn.Parameter(torch.zeros(self.spec.out_features, self.r, **kw), requires_grad=trainable)
        self.gate = nn.Parameter(g, requires_grad=trainable)
        self._active_cache = None

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: CodyraConfig) -> list:
        """One callback applying the scheduled proximal gate step after every optimizer step."""
        return [codyra_callback(model, name)]


# -- model-level helpers ------------------------------------------------------------------------
def codyra_modules(model: nn.Module, name: str = "default") -> dict[str, Codyra]:
    """Module path -> CoDyRA adapter `name`; errors if the model has no such CoDyRA adapter."""
    return adapter_modules(model, name, Codyra, "CoDyRA")


def codyra_proximal_step(model: nn.Module, step: int, total_steps: int, lr: float | None = None,
                         name: str = "default") -> int:
    """The scheduled proximal gate step after optimizer step `step` of `total_steps`.

    `lr` (the gates' learning rate) is needed only with lr_scaled=True. Returns the number of
    non-zero gates left over all modules (the adapter's total active rank).
    """
    mods = codyra_modules(model, name)
    t = state(model).configs[name].step_threshold(step, total_steps, lr)
    if t is not None:
        for m in mods.values():
            m.proximal_step_(t)
    return sum(active_ranks(model, name).values())


@torch.no_grad()
def next_task(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Fold adapter `name`'s update into the base weights, W ← W + s·B diag(g) A, and draw
    fresh A, B, g at the full rank r for the next task. The model's output is unchanged
    (B restarts at zero). Returns {module path: rank that was folded (non-zero gates)}.

    The fold is permanent (it is not recorded as a merge: `lorakit.unmerge` cannot undo it).
    """
    mods = codyra_modules(model, name)
    check_not_merged(model, name)
    layers = {p: layer for p, layer in adapted_layers(model).items() if p in mods}
    quantized = [p for p, layer in layers.items() if getattr(layer.base, "lorakit_quantized", False)]
    if quantized:  # checked before any weight changes: never leave the model half folded
        raise AdapterError(f"cannot fold CoDyRA adapter {name!r} into quantized base layer {quantized[0]!r}; "
                           "CoDyRA needs a floating-point base")
    folded = active_ranks(model, name)
    for path, m in mods.items():
        w = layers[path].weight_view()  # (d_out, d_in); a transposed view for GPT-2 Conv1D
        w += m.delta_weight().to(w.dtype)
        m.reset_()
    st = state(model)
    st.configs[name] = dataclasses.replace(st.configs[name], ranks={})
    return folded


def _scheduled_step(mods, cfg: CodyraConfig, optimizer, step: int, total_steps: int) -> None:
    """Proximal step for each gate the optimizer trains, with its param group's learning rate
    (η of the step just taken: schedulers move it only after this)."""
    lrs = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    for m in mods:
        if id(m.gate) in lrs:  # a gate the optimizer does not train stays as it is
            t = cfg.step_threshold(step, total_steps, lrs[id(m.gate)])
            if t is not None:
                m.proximal_step_(t)


def codyra_callback(model: nn.Module, name: str = "default"):
    """A TrainerCallback running the scheduled proximal gate step after each `optimizer.step()`
    (step = state.global_step, the 0-based index of the step just taken; K = state.max_steps)."""
    from transformers import TrainerCallback

    mods = list(codyra_modules(model, name).values())
    cfg = state(model).configs[name]

    class CodyraProximalStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            _scheduled_step(mods, cfg, optimizer, state.global_step, state.max_steps)

    return CodyraProximalStep()


class CodyraStrategy(Strategy):
    """CoDyRA for `lorakit.continual.run_task_sequence`: the scheduled proximal step after each
    optimizer step, and before every task after the first the fold + fresh gates (`next_task`).

    ranks[i]: {module path: active rank} at the end of task i (what task i's update costs).
    """

    def __init__(self, name: str = "default"):
        self.name = name
        self.ranks: list[dict[str, int]] = []

    def start_task(self, model: nn.Module, task: TaskInfo) -> None:
        codyra_modules(model, self.name)  # fail before training on a model without the adapter
        if task.index > 0:
            next_task(model, self.name)

    def after_step(self, model: nn.Module, optimizer, step: int, task: TaskInfo) -> None:
        mods = codyra_modules(model, self.name).values()
        _scheduled_step(mods, state(model).configs[self.name], optimizer, step, task.steps)

    def end_task(self, model: nn.Module, task: TaskInfo) -> None:
        self.ranks.append(active_ranks(model, self.name))
