"""Master-ASR: a shared bank of low-rank modules assembled per task / language
(Yu et al., ICML 2023, arXiv:2306.15686).

Every adapted layer holds a bank of M low-rank modules shared by all tasks, and every task t
(a language, in the paper) holds its own assembly logits a_t:

    w_t      = softmax(a_t)                                   dense assembly (top_k = 0), or
    w_t      = softmax over the top-k entries of a_t, 0 elsewhere   sparse assembly (top_k = k)
    ΔW_t     = s · Σ_m w_{t,m} B_m A_m                        A_m: (r, d_in) Kaiming-uniform,
    h        = W0 x + ΔW_t x                                  B_m: (d_out, r) zeros,  s = α / r

Freshly built, B = 0 (the layer output equals the base) and a_t = 0 (uniform weights).
Training all of it on several tasks at once (rows routed to their task, see `use_tasks`)
learns modules that are shared across tasks; a new low-resource task then learns *only* its
assembly logits a_t (M numbers per layer), optionally plus one new module, with the bank
frozen (`add_task`). That is the paper's low-resource tuning: tens of times fewer trainable
parameters than a LoRA, and no forgetting — the tasks that exist keep bit-identical outputs,
because their logits and modules do not change.

Task t may assemble only the first M_t ≤ M modules (`task_modules`): a module added for a
later task is invisible to the earlier ones, so adding it cannot change their outputs.

Which task a forward uses:
    the default task (config `task`, else tasks[0]; `set_task` changes it),
    `with use_tasks(model, "fr"):`                one task for the whole call,
    `with use_tasks(model, ["fr", "en", "fr"]):`  one task per batch row (names or indices).

Compute: one task is the rank-(k·r) LoRA [A_m]_{m∈S} stacked along the rank, with B_m scaled
by w_{t,m} (S: the modules with w > 0; k = M_t when dense); ΔW is never formed. Rows with
different tasks run as one stacked rank-(M·r) product whose rank blocks are scaled per row by
that row's w (`mola.mixture_delta`). `to_lora(task=t)` returns exactly these stacked factors,
so every task exports / merges / serves as a plain LoRA of rank k·r.

What could not be checked against the paper: its method section was not available here (only
the abstract; no reference code was found). The bank of low-rank modules, soft (softmax)
assembly per language and the low-resource step that trains only the assembly weights follow
METHODS.md and the abstract; the sparse top-k variant renormalises the softmax over the k
largest logits (the unchosen modules get no gradient, as in top-k mixtures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import (
    ADAPTER_NAME_RE,
    AdapterConfig,
    LayerSpec,
    check_nonneg_int,
    check_positive_int,
    check_range,
)
from lorakit.core.inject import adapter_modules, check_not_merged, state
from lorakit.core.registry import register_method
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.mola import check_number, mixture_delta


@dataclass
class MasterAsrConfig(AdapterConfig):
    """tasks: names of the tasks / languages (one assembly vector each); num_modules: M, the
    bank size per layer; r: rank of each module; alpha: s = α/r; top_k: 0 = dense softmax
    assembly over all modules, k ≥ 1 = sparse (softmax over the k largest logits); task: the
    task a plain forward uses (default tasks[0]); task_modules: {task: M_t}, a task that
    assembles only the first M_t modules (default all M; set by `add_task(new_module=True)`);
    trainable_tasks / trainable_modules: the tasks whose logits and the bank modules (indices)
    that train — None means all (set by `add_task` / `set_trainable`; survives save/load);
    dropout on the adapter input.
    """

    tasks: list[str] = field(default_factory=lambda: ["default"])
    num_modules: int = 8
    r: int = 4
    alpha: float = 8.0
    top_k: int = 0
    task: str | None = None
    task_modules: dict[str, int] = field(default_factory=dict)
    trainable_tasks: list[str] | None = None
    trainable_modules: list[int] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise ConfigError(f"tasks must be a non-empty list of task names, got {self.tasks!r}")
        self.tasks = list(self.tasks)
        for t in self.tasks:
            check_task_name(t)
        dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dup:
            raise ConfigError(f"tasks must be unique, {dup} appear more than once")
        check_positive_int("num_modules", self.num_modules)
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha)
        check_nonneg_int("top_k", self.top_k)
        if self.top_k > self.num_modules:
            raise ConfigError(f"top_k={self.top_k} exceeds num_modules={self.num_modules}; "
                              "use 0 (dense) or 1..num_modules")
        if self.task is not None and self.task not in self.tasks:
            raise ConfigError(f"task {self.task!r} is not one of tasks {self.tasks}")
        if not isinstance(self.task_modules, dict):
            raise ConfigError(f"task_modules must be a mapping {{task: number of modules}}, got {self.task_modules!r}")
        self.task_modules = dict(self.task_modules)
        for t, n in self.task_modules.items():
            if t not in self.tasks:
                raise ConfigError(f"task_modules names {t!r}, which is not one of tasks {self.tasks}")
            check_positive_int(f"task_modules[{t!r}]", n)
            if n > self.num_modules:
                raise ConfigError(f"task_modules[{t!r}]={n} exceeds num_modules={self.num_modules}")
        if self.trainable_tasks is not None:
            if isinstance(self.trainable_tasks, str) or not isinstance(self.trainable_tasks, (list, tuple)):
                raise ConfigError(f"trainable_tasks must be a list of task names or null (all), "
                                  f"got {self.trainable_tasks!r}")
            self.trainable_tasks = list(self.trainable_tasks)
            bad = [t for t in self.trainable_tasks if t not in self.tasks]
            if bad:
                raise ConfigError(f"trainable_tasks {bad} are not among tasks {self.tasks}")
        if self.trainable_modules is not None:
            if not isinstance(self.trainable_modules, (list, tuple)):
                raise ConfigError(f"trainable_modules must be a list of module indices or null (all), "
                                  f"got {self.trainable_modules!r}")
            self.trainable_modules = list(self.trainable_modules)
            bad = [i for i in self.trainable_modules
                   if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_modules]
            if bad:
                raise ConfigError(f"trainable_modules {bad} are not module indices in [0, {self.num_modules - 1}]")
        check_range("dropout", self.dropout, 0.0, 1.0)

    def modules_of(self, task: str) -> int:
        """M_t: how many bank modules (the first M_t) task `task` assembles."""
        return self.task_modules.get(task, self.num_modules)


def check_task_name(name) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
        raise ConfigError(f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


@register_method("master_asr", MasterAsrConfig, paper="arXiv:2306.15686")
class MasterAsr(nn.Module):
    """Master-ASR: h = W0 x + s · Σ_m w_{t,m} B_m A_m x, a shared module bank assembled per task t."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"num_modules": 3, "r": 2}

    def __init__(self, spec: LayerSpec, cfg: MasterAsrConfig):
        super().__init__()
        self.spec = spec
        self.scale = cfg.alpha / cfg.r
        self.r = cfg.r
        self.top_k = cfg.top_k
        self.tasks: list[str] = list(cfg.tasks)
        self.default_task = self.tasks.index(cfg.task) if cfg.task is not None else 0
        self.trainable_tasks = None if cfg.trainable_tasks is None else list(cfg.trainable_tasks)
        self.trainable_modules = None if cfg.trainable_modules is None else list(cfg.trainable_modules)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # one Parameter per module and per task, so that any of them can be frozen on its own
        # (an optimizer never touches a tensor without grad: frozen tasks stay bit-identical)
        self.lora_A = nn.ParameterList()  # M × (r, d_in)
        self.lora_B = nn.ParameterList()  # M × (d_out, r)
        for _ in range(cfg.num_modules):
            self._append_module()
        self.logits = nn.ParameterList(  # T × (M_t,), zeros: uniform assembly
            [nn.Parameter(torch.zeros(cfg.modules_of(t), dtype=spec.dtype, device=spec.device)) for t in self.tasks])
        self.call_task: int | None = None  # set by `use_tasks(model, task)`
        self.row_tasks: torch.Tensor | None = None  # (batch,) task indices, set by `use_tasks(model, [...])`
        self.requires_grad_(True)

    def _append_module(self) -> None:
        kw = {"dtype": self.spec.dtype, "device": self.spec.device}
        a = torch.empty(self.r, self.spec.in_features, **kw)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA's A (PEFT's default init)
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.spec.out_features, self.r, **kw)))

    # -- trainability ---------------------------------------------------------------------
    def requires_grad_(self, requires_grad: bool = True) -> MasterAsr:
        """As nn.Module's, except that only `trainable_tasks` / `trainable_modules` turn on."""
        super().requires_grad_(requires_grad)
        if requires_grad:
            for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
                on = self.trainable_modules is None or i in self.trainable_modules
                a.requires_grad_(on)
                b.requires_grad_(on)
            for t, p in zip(self.tasks, self.logits):
                p.requires_grad_(self.trainable_tasks is None or t in self.trainable_tasks)
        return self

    # -- assembly --------------------------------------------------------------------------
    def assembly(self, t: int) -> tuple[torch.Tensor, list[int]]:
        """(w_t (M_t,), the modules with w > 0): softmax of a_t, or of its top-k entries."""
        a = self.logits[t]
        if self.top_k == 0 or self.top_k >= a.shape[0]:
            return torch.softmax(a.float(), dim=0).to(a.dtype), list(range(a.shape[0]))
        top, idx = a.topk(self.top_k)
        w = torch.zeros_like(a).scatter(0, idx, torch.softmax(top.float(), dim=0).to(a.dtype))
        return w, sorted(idx.tolist())

    def task_weights(self, t: int) -> torch.Tensor:
        """w_t (M_t,): the assembly weights of task index t."""
        return self.assembly(t)[0]

    def task_factors(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (k·r, d_in), B (d_out, k·r)) with w_{t,m} folded into B: ΔW_t = s·B A, exactly."""
        w, chosen = self.assembly(t)
        a = torch.cat([self.lora_A[m] for m in chosen], 0)  # (k·r, d_in)
        b = torch.cat([self.lora_B[m] * w[m] for m in chosen], 1)  # (d_out, k·r)
        return a, b

    def weight_matrix(self) -> torch.Tensor:
        """(T, M): every task's weights, zero beyond its M_t modules."""
        n = len(self.lora_A)
        return torch.stack([F.pad(self.task_weights(t), (0, n - self.logits[t].shape[0]))
                            for t in range(len(self.tasks))])

    # -- forward ---------------------------------------------------------------------------
    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A[0].dtype))
        if self.row_tasks is None:  # one task for the whole batch: a rank-(k·r) LoRA
            a, b = self.task_factors(self.default_task if self.call_task is None else self.call_task)
            return F.linear(F.linear(x, a), b) * self.scale  # (..., d_in) -> (..., k·r) -> (..., d_out)
        ids = self.row_tasks.to(x.device)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"use_tasks gave {ids.shape[0]} row tasks but the batch has {x.shape[0]} rows "
                             "(per-row tasks cannot be combined with lorakit.route over this adapter)")
        lead = x.shape[:-1]
        gates = self.weight_matrix()[ids]  # (batch, M)
        gates = gates.view(ids.shape[0], *([1] * (len(lead) - 1)), -1).expand(*lead, -1).reshape(-1, gates.shape[-1])
        a = torch.stack(list(self.lora_A))  # (M, r, d_in)
        b = torch.stack(list(self.lora_B))  # (M, d_out, r)
        out = mixture_delta(x.reshape(-1, x.shape[-1]), a, b, gates) * self.scale  # (N, d_out)
        return out.reshape(*lead, self.spec.out_features)

    def _merge_task(self) -> int:
        if self.call_task is not None or self.row_tasks is not None:
            raise AdapterError("cannot merge or export a Master-ASR adapter inside use_tasks(...): "
                               "leave the block, or pick the task with set_task / to_lora(task=...)")
        return self.default_task

    def delta_weight(self) -> torch.Tensor:
        a, b = self.task_factors(self._merge_task())
        return (b @ a) * self.scale  # (d_out, d_in) — merge/export only, for the default task

    def to_lora(self, rank: int | None = None,
                task: str | int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) of task `task` (default: the default task): exact at rank k·r; `rank` below
        that gives the best rank-`rank` approximation."""
        t = self._merge_task() if task is None else task_index(self.tasks, task)
        a, b = self.task_factors(t)
        if rank is not None and rank < a.shape[0]:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a.detach(), b.detach(), rank)
            return a, b, self.scale
        return a.detach().clone(), b.detach().clone(), self.scale


def task_index(tasks: Sequence[str], task: str | int) -> int:
    if isinstance(task, bool) or not isinstance(task, (str, int)):
        raise ConfigError(f"a task is a name or an index, got {task!r}")
    if isinstance(task, int):
        if not 0 <= task < len(tasks):
            raise ConfigError(f"task index {task} is out of range for tasks {list(tasks)}")
        return task
    if task not in tasks:
        raise ConfigError(f"unknown task {task!r}; this adapter has tasks {list(tasks)}")
    return tasks.index(task)


# -- model-level API ----------------------------------------------------------------------------
def master_asr_modules(model: nn.Module, name: str = "default") -> dict[str, MasterAsr]:
    """Module path -> Master-ASR adapter `name`; errors if the model has none."""
    return adapter_modules(model, name, MasterAsr, "Master-ASR")


def _config(model: nn.Module, name: str) -> MasterAsrConfig:
    master_asr_modules(model, name)
    return state(model).configs[name]


@contextlib.contextmanager
def use_tasks(model: nn.Module, tasks, name: str = "default"):
    """Within the block, adapter `name` assembles for the given task(s).

    `tasks`: one task (name or index) for every row, or a sequence / 1-D tensor with one task
    per batch row:

        with use_tasks(model, ["en", "sw", "en"]):
            logits = model(input_ids).logits        # rows 0, 2 via "en", row 1 via "sw"
    """
    mods = list(master_asr_modules(model, name).values())
    check_not_merged(model, name)
    names = mods[0].tasks
    single = isinstance(tasks, (str, int)) and not isinstance(tasks, bool)
    if single:
        idx = task_index(names, tasks)
    else:
        seq = tasks.tolist() if torch.is_tensor(tasks) else list(tasks)
        if torch.is_tensor(tasks) and tasks.dim() != 1:
            raise ValueError(f"per-row tasks must be 1-D (batch,), got shape {tuple(tasks.shape)}")
        if not seq:
            raise ConfigError("use_tasks got an empty list of row tasks")
        ids = torch.tensor([task_index(names, t) for t in seq], dtype=torch.long)
    for m in mods:
        if single:
            m.call_task = idx
        else:
            m.row_tasks = ids
    try:
        yield model
    finally:
        for m in mods:
            m.call_task, m.row_tasks = None, None


def set_task(model: nn.Module, task: str, name: str = "default") -> None:
    """Make `task` the default of adapter `name` (kept in its config, so it survives save/load)."""
    cfg = _config(model, name)
    idx = task_index(cfg.tasks, task)
    check_not_merged(model, name)  # the merged ΔW is the old default task's
    state(model).configs[name] = dataclasses.replace(cfg, task=cfg.tasks[idx])
    for m in master_asr_modules(model, name).values():
        m.default_task = idx


def set_trainable(model: nn.Module, name: str = "default", tasks="all", modules="all") -> int:
    """Train only the assembly logits of `tasks` and the bank modules `modules` (indices);
    "all" for every one, [] for none. Recorded in the config. Returns the trainable count."""
    cfg = _config(model, name)
    t = None if tasks == "all" else list(tasks)
    mo = None if modules == "all" else list(modules)
    new = dataclasses.replace(cfg, trainable_tasks=t, trainable_modules=mo)  # validates
    mods = master_asr_modules(model, name)
    state(model).configs[name] = new
    for m in mods.values():
        m.trainable_tasks, m.trainable_modules = new.trainable_tasks, new.trainable_modules
        m.requires_grad_(True)
    return sum(p.numel() for m in mods.values() for p in m.parameters() if p.requires_grad)


def add_task(model: nn.Module, task: str, name: str = "default", new_module: bool = False,
             init_from: str | None = None, freeze_others: bool = True) -> int:
    """Add task / language `task` to adapter `name` and make it the one that trains.

    Every layer gets new assembly logits a_task (zeros: uniform over the bank, or a copy of
    `init_from`'s logits — start a new language from a related one); with `new_module` the bank
    of every layer also grows by one module (A Kaiming-uniform, B = 0) that only `task`
    assembles (earlier tasks keep M_t = the old M). With `freeze_others` (the low-resource
    setting) only a_task — and the new module — train; every other task keeps bit-identical
    outputs however long `task` trains. Returns the number of trainable parameters.
    """
    cfg = _config(model, name)
    check_task_name(task)
    if task in cfg.tasks:
        raise ConfigError(f"task {task!r} already exists in adapter {name!r} (tasks {cfg.tasks})")
    src = None if init_from is None else task_index(cfg.tasks, init_from)
    check_not_merged(model, name)
    m_old = cfg.num_modules
    m_new = m_old + 1 if new_module else m_old
    task_modules = dict(cfg.task_modules)
    if new_module:
        task_modules.update({t: m_old for t in cfg.tasks if t not in task_modules})
    added = [m_old] if new_module else []
    if freeze_others:
        trainable_tasks, trainable_modules = [task], added
    else:
        trainable_tasks = None if cfg.trainable_tasks is None else cfg.trainable_tasks + [task]
        trainable_modules = None if cfg.trainable_modules is None else cfg.trainable_modules + added
    new = dataclasses.replace(cfg, tasks=cfg.tasks + [task], num_modules=m_new, task_modules=task_modules,
                              trainable_tasks=trainable_tasks, trainable_modules=trainable_modules)  # validates
    mods = master_asr_modules(model, name)
    with torch.no_grad():  # nothing below can fail
        for m in mods.values():
            if new_module:
                m._append_module()
            logits = torch.zeros(m_new, dtype=m.spec.dtype, device=m.spec.device)
            if src is not None:
                a = m.logits[src].detach()
                logits[: a.shape[0]] = a
                logits[a.shape[0]:] = a.mean()  # a new module starts with an average share
            m.logits.append(nn.Parameter(logits))
            m.tasks = list(new.tasks)
            m.trainable_tasks, m.trainable_modules = new.trainable_tasks, new.trainable_modules
            m.requires_grad_(True)
    state(model).configs[name] = new
    return sum(p.numel() for m in mods.values() for p in m.parameters() if p.requires_grad)


def assembly_weights(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Module path -> (T, M) assembly weights (rows: tasks in config order): which modules each
    task uses — similar languages come to share modules."""
    with torch.no_grad():
        return {p: m.weight_matrix().detach().clone() for p, m in master_asr_modules(model, name).items()}


__all__ = [
    "MasterAsr",
    "MasterAsrConfig",
    "add_task",
    "assembly_weights",
    "master_asr_modules",
    "set_task",
    "set_trainable",
    "task_index",
    "use_tasks",
]
