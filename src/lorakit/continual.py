"""Continual learning: train one model on a sequence of tasks and measure what it forgets.

    R[i][j] = metric on task j after training on tasks 0..i        (tasks 0..T, R is (T+1)×(T+1))

    average accuracy   ACC = (1/(T+1)) Σ_j R[T][j]
    forgetting         F   = (1/T) Σ_{j<T} ( max_{i<T} R[i][j] − R[T][j] )   (Chaudhry et al., arXiv:1801.10112)
    backward transfer  BWT = (1/T) Σ_{j<T} ( R[T][j] − R[j][j] )            (Lopez-Paz & Ranzato, arXiv:1706.08840)

For metric="loss" (lower is better) the max becomes a min and both differences change sign,
so F > 0 always means "now worse than its best" and BWT < 0 "later tasks hurt earlier ones".
With a single task F = BWT = 0.

`run_task_sequence` is one plain loop (AdamW, a fresh optimizer per task, shuffled batches)
whose behaviour around steps and tasks comes from a `Strategy`:

- `Strategy()` (default): fine-tune whatever requires grad, task after task — the sequential
  fine-tuning baseline that forgets;
- `lorakit.methods.codyra.CodyraStrategy`: per-task gated LoRA with a sparsity schedule,
  folded into the base weights when the next task starts (CoDyRA, arXiv:2412.01004);
- `lorakit.compose.lae.LAE`: an online adapter trained per task, an EMA offline adapter and
  their ensemble at inference (LAE, arXiv:2303.10070).

A task is a map-style dataset (anything with `len` and indexing, e.g. a list) of dict examples
as the model's forward takes them plus "labels": one integer per example for classification
(metric="accuracy"), or whatever the model's own loss takes (metric="loss").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.core.adapter import check_positive_int
from lorakit.errors import ConfigError

METRICS = ("accuracy", "loss")


# -- metrics over the task matrix ---------------------------------------------------------------
def check_matrix(matrix) -> torch.Tensor:
    """R as a float64 (T+1, T+1) tensor; errors name the bad shape or value."""
    try:
        r = torch.as_tensor(matrix, dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"task matrix must be a square list of lists of numbers: {e}") from None
    if r.dim() != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ConfigError(f"task matrix R[i][j] must be square and non-empty (tasks × tasks), got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ConfigError(f"task matrix has non-finite entries: {r.tolist()}")
    return r


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def average_accuracy(matrix) -> float:
    """Mean over tasks of the metric after the last task: (1/(T+1)) Σ_j R[T][j]."""
    return float(check_matrix(matrix)[-1].mean())


def forgetting(matrix, higher_is_better: bool = True) -> float:
    """(1/T) Σ_{j<T} (max_{i<T} R[i][j] − R[T][j]); min and negated for a loss. 0 for one task."""
    r = check_matrix(matrix)
    t = r.shape[0] - 1
    if t == 0:
        return 0.0
    s = _sign(higher_is_better)
    best = (s * r[:t, :t]).max(dim=0).values  # (T,) best over rows i < T of each column j < T
    return float((best - s * r[t, :t]).mean())


def backward_transfer(matrix, higher_is_better: bool = True) -> float:
    """(1/T) Σ_{j<T} (R[T][j] − R[j][j]); negated for a loss. 0 for one task."""
    r = check_matrix(matrix)
    t = r.shape[0] - 1
    if t == 0:
        return 0.0
    return float(_sign(higher_is_better) * (r[t, :t] - r.diagonal()[:t]).mean())


@dataclass
class ContinualResult:
    """The task matrix of one run and the metrics derived from it.

    matrix[i][j]: metric on task j after training task i. train_loss[i]: mean training loss
    of the last epoch of task i.
    """

    matrix: list[list[float]]
    metric: str = "accuracy"
    train_loss: list[float] = field(default_factory=list)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"

    @property
    def average_accuracy(self) -> float:
        return average_accuracy(self.matrix)

    @property
    def forgetting(self) -> float:
        return forgetting(self.matrix, self.higher_is_better)

    @property
    def backward_transfer(self) -> float:
        return backward_transfer(self.matrix, self.higher_is_better)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"metric": self.metric, "matrix": self.matrix, "average": self.average_accuracy,
                "forgetting": self.forgetting, "backward_transfer": self.backward_transfer,
                "train_loss": self.train_loss}


# -- the strategy hooks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskInfo:
    """What a strategy learns about the task being trained.

    index: position in the sequence (0-based); classes: sorted integer labels of the task
    (None when labels are not one integer per example); epochs; steps: optimizer steps in total.
    """

    index: int
    classes: tuple[int, ...] | None
    epochs: int
    steps: int


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without its labels (what a forward for prediction takes)."""
    return {k: v for k, v in batch.items() if k != "labels"}


class Strategy:
    """Hooks `run_task_sequence` calls; this base class is plain sequential fine-tuning.

    Order per task: start_task → parameters (→ AdamW) → for each epoch: start_epoch, then per
    batch loss → backward → optimizer.step → after_step → zero_grad; then end_task, then the
    evaluation of every task through predict (accuracy) or eval_loss (loss).
    """

    def start_task(self, model: nn.Module, task: TaskInfo) -> None:
        """Before the optimizer for `task` is built."""

    def parameters(self, model: nn.Module, task: TaskInfo) -> list[nn.Parameter]:
        """What the task's optimizer updates (default: everything that requires grad now)."""
        return [p for p in model.parameters() if p.requires_grad]

    def start_epoch(self, model: nn.Module, task: TaskInfo, epoch: int) -> None:
        """Before the first batch of each epoch."""

    def loss(self, model: nn.Module, batch: dict[str, Any], task: TaskInfo) -> torch.Tensor:
        """Training loss of one batch (default: the model's own loss from "labels")."""
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:
            raise ConfigError(f"the model returned no loss for a batch with keys {sorted(batch)}; "
                              "examples need 'labels' the model's forward understands")
        return loss

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, task: TaskInfo) -> None:
        """Right after optimizer step `step` (0-based, < task.steps), before zero_grad."""

    def end_task(self, model: nn.Module, task: TaskInfo) -> None:
        """After the last step of `task`, before the evaluation."""

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(batch, classes) scores whose argmax is the prediction (default: the logits)."""
        return model(**model_inputs(batch)).logits

    def eval_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Mean loss of one evaluation batch (default: the model's own loss)."""
        return self.loss(model, batch, None)


# -- data helpers --------------------------------------------------------------------------------
def _check_tasks(tasks, what: str) -> list:
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ConfigError(f"{what} must be a non-empty list of datasets, got {type(tasks).__name__}")
    for i, ds in enumerate(tasks):
        try:
            n = len(ds)
        except TypeError:
            raise ConfigError(f"{what}[{i}] must be a map-style dataset with len(), got {type(ds).__name__}") from None
        if n == 0:
            raise ConfigError(f"{what}[{i}] is empty")
        first = ds[0]
        if not isinstance(first, dict) or "labels" not in first:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise ConfigError(f"{what}[{i}] examples must be dicts with a 'labels' entry, got {keys}")
    return list(tasks)


def task_classes(dataset) -> tuple[int, ...] | None:
    """Sorted distinct labels when every example has one integer label, else None."""
    seen = set()
    for i in range(len(dataset)):
        lab = dataset[i]["labels"]
        if isinstance(lab, torch.Tensor):
            if lab.numel() != 1 or lab.is_floating_point():
                return None
            lab = lab.item()
        if isinstance(lab, bool) or not isinstance(lab, int):
            return None
        seen.add(lab)
    return tuple(sorted(seen))


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_task(model: nn.Module, dataset, strategy: Strategy | None = None, metric: str = "accuracy",
                  batch_size: int = 32, collate_fn: Callable | None = None) -> float:
    """Accuracy (argmax of `strategy.predict` vs "labels") or mean loss of `model` on `dataset`."""
    strategy = strategy or Strategy()
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=collate_fn or torch.utils.data.default_collate)
    device, total, n = _device(model), 0.0, 0
    for batch in loader:
        batch = _to(batch, device)
        labels = batch["labels"]
        b = labels.shape[0]
        if metric == "accuracy":
            scores = strategy.predict(model, batch)
            if scores.dim() != 2 or labels.shape != (scores.shape[0],):
                raise ConfigError(f"metric='accuracy' needs (batch, classes) scores and (batch,) labels, got "
                                  f"{tuple(scores.shape)} and {tuple(labels.shape)}; use metric='loss' otherwise")
            total += float((scores.argmax(dim=-1) == labels).sum())
        else:
            total += float(strategy.eval_loss(model, batch)) * b
        n += b
    return total / n


# -- the loop --------------------------------------------------------------------------------------
def run_task_sequence(
    model: nn.Module,
    tasks: Sequence,
    *,
    eval_tasks: Sequence | None = None,
    strategy: Strategy | None = None,
    metric: str = "accuracy",
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    eval_batch_size: int = 32,
    collate_fn: Callable | None = None,
    seed: int = 0,
) -> ContinualResult:
    """Train `model` on `tasks` in order and evaluate every task after each one.

    Returns R[i][j] = metric on `eval_tasks[j]` (default: the training sets — pass held-out
    sets for real measurements) after training task i, with average / forgetting / BWT.
    Each task gets a fresh AdamW(lr, weight_decay) over `strategy.parameters(...)`, `epochs`
    passes of shuffled batches (order seeded by `seed` + task index), then `strategy.end_task`.
    The model's train/eval mode is restored at the end.
    """
    tasks = _check_tasks(tasks, "tasks")
    eval_tasks = tasks if eval_tasks is None else _check_tasks(eval_tasks, "eval_tasks")
    if len(eval_tasks) != len(tasks):
        raise ConfigError(f"eval_tasks has {len(eval_tasks)} datasets but tasks has {len(tasks)}")
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_positive_int("eval_batch_size", eval_batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    strategy = strategy or Strategy()
    collate = collate_fn or torch.utils.data.default_collate
    device, was_training = _device(model), model.training

    matrix, train_loss = [], []
    for i, dataset in enumerate(tasks):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(seed + i))
        info = TaskInfo(index=i, classes=task_classes(dataset), epochs=epochs, steps=epochs * len(loader))
        strategy.start_task(model, info)
        params = strategy.parameters(model, info)
        if not params:
            raise ConfigError(f"task {i}: nothing to train (no parameter requires grad; inject an adapter first)")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        model.train()
        step = 0
        for epoch in range(epochs):
            strategy.start_epoch(model, info, epoch)
            losses = []
            for batch in loader:
                loss = strategy.loss(model, _to(batch, device), info)
                loss.backward()
                optimizer.step()
                strategy.after_step(model, optimizer, step, info)
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                step += 1
        train_loss.append(sum(losses) / len(losses))
        strategy.end_task(model, info)
        model.eval()
        matrix.append([evaluate_task(model, ds, strategy, metric, eval_batch_size, collate) for ds in eval_tasks])
    model.train(was_training)
    return ContinualResult(matrix=matrix, metric=metric, train_loss=train_loss)
