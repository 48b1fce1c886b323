"""LAE: Learning–Accumulation–Ensemble continual learning with any lorakit adapter
(Gao et al., ICCV 2023, arXiv:2303.10070; reference code github.com/gqk/LAE, main.py).

Two adapters of the same method and config live on one model (named "online" and "offline"),
sharing the classification head (a `modules_to_save` module of the adapter config):

- Learning: the online adapter θ_on and the head are trained on the current task t with a
  cross-entropy over that task's classes C_t only,

      L = CE(z[:, C_t], index of y in C_t)        (z: (batch, classes) logits, online active)

  so the head rows of other classes get no gradient. For every task after the first the
  online adapter is frozen for the first `freeze_epochs` epochs (3 of 5 in the paper's
  configs), so the new classes' randomly initialised head rows settle before the adapter moves
  (the paper's adaptation-speed calibration of the learning step).
- Accumulation: the offline adapter starts as a copy of θ_on when the second task starts and,
  after every optimizer step from then on, takes the momentum (EMA) update of timm's
  ModelEmaV2 that the reference code uses

      θ_off ← α · θ_off + (1 − α) · θ_on,      α = momentum = 0.9999

- Ensemble: at inference both experts run (offline-only and online-only forwards) and

      p = max(softmax(z_on), softmax(z_off))    elementwise over the classes seen so far,

  the prediction is argmax p (combine="logits": the max of the logits instead). During the
  first task there is no offline expert yet and p = softmax(z_on).

    lae = LAE(model, LoraConfig(r=4, modules_to_save=["classifier"]))
    result = run_task_sequence(model, tasks, strategy=lae, epochs=5)
    probs = lae.predict(model, batch)

Not reproduced: the reference's learnable output scale of its own PET modules (lorakit
adapters keep their method's fixed scale) and its several-EMA variant (num_emas > 1).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.continual import Strategy, TaskInfo, model_inputs
from lorakit.core.adapter import AdapterConfig, check_adapter_name
from lorakit.core.inject import (
    activate_adapters,
    adapter_modules,
    apply_plan,
    check_not_merged,
    plan_injection,
    state,
)
from lorakit.errors import AdapterError, ConfigError

COMBINES = ("prob", "logits")


@dataclass
class LaeConfig:
    """momentum: EMA decay α of the offline adapter (reference ema_decay = 0.9999);
    freeze_epochs: epochs at the start of each task after the first with the online adapter
    frozen (reference num_freeze_epochs = 3 of num_epochs = 5; 0 = never frozen);
    combine: ensemble by the max of softmax probabilities ("prob", reference) or of logits;
    online / offline: the two adapter names."""

    momentum: float = 0.9999
    freeze_epochs: int = 3
    combine: str = "prob"
    online: str = "online"
    offline: str = "offline"

    def __post_init__(self) -> None:
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0:
            raise ConfigError(f"momentum must be a number in [0, 1], got {m!r}")
        f = self.freeze_epochs
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ConfigError(f"freeze_epochs must be an integer >= 0, got {f!r}")
        if self.combine not in COMBINES:
            raise ConfigError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        check_adapter_name(self.online)
        check_adapter_name(self.offline)
        if self.online == self.offline:
            raise ConfigError(f"online and offline adapters need different names, got {self.online!r} twice")


# -- the math on two named adapters ---------------------------------------------------------------
def param_pairs(model: nn.Module, online: str = "online", offline: str = "offline") -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(offline, online) parameter pairs, matched by layer and name; errors on any mismatch."""
    on = adapter_modules(model, online)
    off = adapter_modules(model, offline)
    if not on or not off:
        missing = online if not on else offline
        raise AdapterError(f"model has no adapter named {missing!r}; LAE needs adapters {online!r} and {offline!r}")
    if set(on) != set(off):
        diff = sorted(set(on) ^ set(off))
        raise AdapterError(f"adapters {online!r} and {offline!r} sit on different layers (e.g. {diff[0]!r})")
    pairs = []
    for path in on:
        p_on, p_off = dict(on[path].named_parameters()), dict(off[path].named_parameters())
        if p_on.keys() != p_off.keys():
            raise AdapterError(f"{path}: adapters {online!r} and {offline!r} have different parameters "
                               f"({sorted(p_on)} vs {sorted(p_off)}); use the same method and config")
        for k, a in p_on.items():
            if a.shape != p_off[k].shape:
                raise AdapterError(f"{path}.{k}: {online!r} has shape {tuple(a.shape)} but {offline!r} has "
                                   f"{tuple(p_off[k].shape)}; use the same method and config")
            pairs.append((p_off[k], a))
    return pairs


@torch.no_grad()
def ema_update_(model: nn.Module, momentum: float, online: str = "online", offline: str = "offline",
                pairs: list | None = None) -> None:
    """θ_off ← α·θ_off + (1 − α)·θ_on for every parameter of the two adapters (in place).

    α = 0 copies the online adapter; α = 1 leaves the offline one unchanged.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"momentum must be a number in [0, 1], got {momentum!r}")
    for p_off, p_on in pairs if pairs is not None else param_pairs(model, online, offline):
        p_off.copy_(momentum * p_off + (1.0 - momentum) * p_on)


@contextlib.contextmanager
def only_adapter(model: nn.Module, name: str):
    """Within the block exactly adapter `name` is active; the previous active set comes back."""
    before = list(state(model).active)
    activate_adapters(model, [name])
    try:
        yield model
    finally:
        activate_adapters(model, before)


def _masked(logits: torch.Tensor, classes) -> torch.Tensor:
    """Logits with every class outside `classes` at -inf (None: all classes)."""
    if classes is None:
        return logits
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[list(classes)] = True
    return logits.masked_fill(~keep, -math.inf)


@torch.no_grad()
def ensemble_predict(model: nn.Module, inputs: dict[str, Any], online: str = "online", offline: str | None = "offline",
                     combine: str = "prob", classes=None) -> torch.Tensor:
    """(batch, classes) ensemble scores: the elementwise max over the online and offline experts
    of softmax(z) ("prob") or z ("logits"), with classes outside `classes` excluded (prob 0 /
    logit -inf). `offline=None`: the online expert alone (no offline adapter yet)."""
    if combine not in COMBINES:
        raise ConfigError(f"combine must be one of {COMBINES}, got {combine!r}")
    names = (online, offline) if offline is not None else (online,)
    for name in names:
        check_not_merged(model, name)  # a merged expert would leak into the other's forward
    inputs = model_inputs(inputs)
    scores = []
    for name in names:
        with only_adapter(model, name):
            z = _masked(model(**inputs).logits, classes)  # (batch, classes)
        scores.append(z.softmax(dim=-1) if combine == "prob" else z)
    return scores[0] if len(scores) == 1 else torch.maximum(scores[0], scores[1])


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, classes) -> torch.Tensor:
    """CE over the task's classes only: CE(z[:, C], position of y in C)."""
    if labels.dim() != 1 or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ConfigError(f"LAE needs (batch, classes) logits and (batch,) integer labels, got "
                          f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)  # (|C|,)
    if int(idx.max()) >= logits.shape[-1]:
        raise ConfigError(f"label {int(idx.max())} is outside the model's {logits.shape[-1]} classes")
    pos = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    pos[idx] = torch.arange(idx.numel(), device=logits.device)
    target = pos[labels]  # labels are in C by construction (C = the task's labels)
    return F.cross_entropy(logits.index_select(1, idx), target)


# -- the strategy ------------------------------------------------------------------------------
class LAE(Strategy):
    """LAE for `lorakit.continual.run_task_sequence` (see the module docstring).

    `LAE(model, adapter_config)` injects the online (active, trainable) and offline (inactive,
    frozen) adapters; `LAE(model)` uses two that the model already has.
    """

    def __init__(self, model: nn.Module, adapter_config: AdapterConfig | None = None, config: LaeConfig | None = None):
        self.config = config or LaeConfig()
        on, off = self.config.online, self.config.offline
        if adapter_config is not None:
            if not isinstance(adapter_config, AdapterConfig):
                raise ConfigError(f"adapter_config must be an AdapterConfig, got {type(adapter_config).__name__}")
            plans = [plan_injection(model, adapter_config, name) for name in (on, off)]  # all checks first
            for plan in plans:
                apply_plan(model, plan, activate=False)
        self._pairs = param_pairs(model, on, off)  # also checks both exist and match
        for m in adapter_modules(model, off).values():  # the offline adapter never trains by gradient
            m.requires_grad_(False)
        activate_adapters(model, [on])
        self.offline_ready = False  # the offline expert exists from the second task on
        self.seen: set[int] = set()

    # hooks ---------------------------------------------------------------------------------------
    def _online_params(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for m in adapter_modules(model, self.config.online).values() for p in m.parameters()]

    def start_task(self, model: nn.Module, task: TaskInfo) -> None:
        if task.classes is None:
            raise ConfigError(f"LAE needs classification tasks (one integer label per example); task {task.index} is not")
        if task.index > 0 and self.config.freeze_epochs >= task.epochs:
            raise ConfigError(f"freeze_epochs={self.config.freeze_epochs} must be < epochs={task.epochs}: "
                              "the online adapter would never train after the first task")
        self._pairs = param_pairs(model, self.config.online, self.config.offline)
        if task.index > 0 and not self.offline_ready:
            ema_update_(model, 0.0, pairs=self._pairs)  # the offline expert starts as a copy
            self.offline_ready = True
        self.seen.update(task.classes)
        activate_adapters(model, [self.config.online])

    def parameters(self, model: nn.Module, task: TaskInfo) -> list[nn.Parameter]:
        """The online adapter (even while frozen: it joins the optimizer when unfrozen) and
        everything else that trains (the head); never the offline adapter."""
        offline = {id(p_off) for p_off, _ in self._pairs}
        params = {id(p): p for p in self._online_params(model)}
        for p in model.parameters():
            if p.requires_grad and id(p) not in offline:
                params.setdefault(id(p), p)
        return list(params.values())

    def start_epoch(self, model: nn.Module, task: TaskInfo, epoch: int) -> None:
        if task.index == 0 or self.config.freeze_epochs == 0:
            return
        frozen = epoch < self.config.freeze_epochs
        for p in self._online_params(model):
            p.requires_grad_(not frozen)

    def loss(self, model: nn.Module, batch: dict[str, Any], task: TaskInfo) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits
        return task_cross_entropy(logits, batch["labels"], task.classes)

    def after_step(self, model: nn.Module, optimizer, step: int, task: TaskInfo) -> None:
        if self.offline_ready:
            ema_update_(model, self.config.momentum, pairs=self._pairs)

    def end_task(self, model: nn.Module, task: TaskInfo) -> None:
        for p in self._online_params(model):
            p.requires_grad_(True)

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        c = self.config
        return ensemble_predict(model, batch, c.online, c.offline if self.offline_ready else None,
                                c.combine, sorted(self.seen) if self.seen else None)

    def eval_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        raise ConfigError("LAE's ensemble is a classifier: evaluate it with metric='accuracy'")
