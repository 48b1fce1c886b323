"""Every adapter method in lorakit, side by side at a matched parameter budget, on two real tasks.

What is run
-----------
Each row trains one method through ``lorakit.train.train`` -- the path ``lorakit train`` takes,
so rank schedules run as TrainerCallbacks, data-aware inits (LoRA-GA, LoRA-SB, EVA) see the
run's first batches, SoRA/CoDyRA take their proximal steps after each optimizer step and
AdaLoRA/IncreLoRA/TriAdaptLoRA allocate ranks on their schedules, exactly as for a user -- on

    bbc        MiniLM-L6 (22.7M) sequence classification, BBC News 5 classes: batch 16, 128
               tokens, 40 steps, lr 1e-3 (the classifier head trains in full for every
               method, as `lorakit train --task seq-cls` does); metric: test accuracy (426)
    chichewa   SmolLM2-135M causal LM on the Chichewa Bible: batch 4 x 128-token blocks,
               40 steps, lr 1e-3; metric: bits per byte on the held-out books (all 10 chapters,
               256-token windows)

The run lengths are set by the cost of ~30 rows x 2 tasks on 2 CPU cores (``--steps-bbc``,
``--steps-lm``, ``--batch-bbc``, ``--batch-lm`` change them). BBC batches stay >= 16: EVA's
incremental PCA needs r*rho = 16 rows per batch at MiniLM's pooler, which sees one token per
article.

AdamW, 10 warm-up steps, cosine decay, grad-norm clip 1, seed 0: every row sees the same
batches in the same order. Full fine-tuning (``full``) trains every weight at lr 1e-4 (bbc) /
5e-5 (chichewa) -- 1e-3 diverges for full-parameter training.

Measured per (method, task)
---------------------------
trainable_params    after training: what the stored adapter holds (rank-adaptive methods after
                    pruning; the seq-cls head included); ``trainable_params_train`` is what the
                    optimizer held (pre-allocated slots of IncreLoRA/TriAdaptLoRA, AdaLoRA's init_r)
adapter_bytes       size of the saved adapter directory (config JSON + safetensors; rank-adaptive
                    adapters after their ``prune``, which is how they are meant to be stored;
                    for ``full`` the saved model weights)
metric              accuracy (bbc, higher is better) / held-out bits per byte (chichewa, lower)
steps_to_lora_loss  first step at which the method's smoothed training loss (trailing mean of 10
                    steps) reaches LoRA's final smoothed loss, and the ratio to LoRA's own such
                    step (None: not reached in the run). The init papers claim ratios <= 0.5
                    for LoRA-GA and LoRA-SB.
step_time_s         median wall time of one optimizer step (forward, backward, callbacks, AdamW),
                    first step excluded; ``step_time_ratio`` = / LoRA's in the same run
peak_rss_mb         ru_maxrss of the child process at the end of training (model load, data,
                    data-aware init and training); ``train_peak_rss_mb`` is the peak of the
                    training steps alone (VmHWM reset when training begins)
ranks               final per-module ranks where the method has them (LoRA, DyLoRA: its maximum
                    rank; SoRA/CoDyRA/S2-LoRA: non-zero gates; AdaLoRA/IncreLoRA/TriAdaptLoRA:
                    their rank patterns; EVA: its data-chosen ranks)

Matched budget
--------------
The reference is LoRA with r = 8, alpha = 16 on "all-linear". Every method whose parameter
count is set by a size hyper-parameter gets the grid value whose trainable count (measured by
injecting into the real model, no training, in a child process; cached in the JSON) is nearest
to LoRA's in log ratio. The grids (``ROWS``) are scanned in order of increasing count:

    hydra (r: parallel + sequential branch = 2x LoRA per rank -> r = 4), lamda (r: B and S
    train, A is frozen -> r ~ 16), bone (block size r), lora_sb (r, r^2 per module -> r ~ 100),
    s2lora (r of the shared factors -> r ~ 70 / ~380), bottleneck / mosa_bn / seq_bn_inv
    (reduction factor), mola / meteora / master_asr (rank of each expert / bank module, with
    their expert counts fixed), smora (r, top_k = max(1, r // 8): the paper's 8-of-64 ratio)

Fixed by construction: dylora, pissa, lora_ga, eva, mosa (r = 8: same count as LoRA); sora,
codyra (start at r = 8 and only shrink); adalora (init_r 12 -> average final rank 8, PEFT's
1.5 ratio), increlora / triadaptlora (budget = 8 x modules, grown from rank 1 into 16 slots):
their *final* count equals LoRA's. Not scaled by a rank, their own count reported: nola (256 +
256 coefficients per module, the low end of the paper's k = 256..1024: lorakit regenerates the
bases in every forward, and k = 1024 makes a SmolLM2 step 11x LoRA's on CPU, 3x at 256),
randlora (r 32), loldu (r 64). Two extra rows show a method in its intended small regime next
to its matched one: s2lora_r8 and lora_sb_r16 (the LoRA-SB paper's default).

Run-length-dependent settings (so the schedules act within a short run): adalora tinit / tfinal
= 10% / 20% of the steps; lamda freezes 30% of B's columns by the last step; sora uses an
absolute proximal threshold lambda = 0.5 / steps per step (total shrinkage 0.5, what the authors'
lambda = 3e-4 gives over ~1.7k steps; lorakit's default lr-scaled 1e-3 * lr would move a gate
by ~1e-5 in a 40-step run and prune nothing). CoDyRA's own schedule is already relative to
the run length (dense half, then a staircase to kappa_max).

ALLoRA is an optimizer, not an adapter: its row is LoRA (no dropout, no scale) trained with
``optim="allora"``. Not run (see ``SKIPPED``): LAE / continual learning are task-sequence
procedures, not adapters.
MeteoRA runs, but trained from scratch as a top-2 mixture of 4 LoRAs without task labels: the
paper composes pre-trained task LoRAs, which these single-task runs do not have.

How
---
Each (method, task) runs in a fresh child process (same script, ``--child``), so peak RSS is
that run's alone and a crash becomes an error row instead of ending the benchmark. The child
copies every weight into process memory before training (the VM evicts idle memory-mapped
pages, which makes single steps jump ~10x) and runs under tcmalloc when installed, as
``lorakit train`` does. Results are written after every run; a rerun skips the (method, task)
pairs already done with the same settings (``--fresh`` starts over). One LoRA run is repeated
at the end of each task (``lora_repeat``) to show how much step times drifted during it; it is
never copied by ``--reuse``, so rows measured now have a LoRA step time from now to compare with
(the table's step × LoRA divides by the LoRA run of the row's own session).

Run (the full default, 29 rows + the LoRA repeat x 2 tasks: about 75 minutes on 2 quiet CPU cores):
    PYTHONPATH=src .venv/bin/python benchmarks/methods.py
    PYTHONPATH=src .venv/bin/python benchmarks/methods.py --methods lora,pissa,adalora --steps-bbc 4 --steps-lm 3
    ... --tasks bbc --methods lora,lora_ga,lora_sb --steps-bbc 80 --out /tmp/inits.json
    PYTHONPATH=src .venv/bin/python benchmarks/rank_adaptive.py          # issue 4's rows

Prints markdown tables (one per task) ready for the README and writes
benchmarks/results/methods.json -- top level: one key per task, {row: {trainable_params,
adapter_bytes, metric, steps_to_lora_loss_ratio, step_time_s, peak_rss_mb, ranks}} -- plus
``runs`` (everything measured, loss curves included), ``budgets`` and methods.png.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from _proc import log, release_and_reset_peak, vm_mb  # benchmarks/_proc.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SMOOTH = 10  # trailing window of the loss smoothing for "steps to LoRA's final loss"


# ============================================================================ what is run
@dataclass(frozen=True)
class Task:
    model: str
    hf_task: str  # lorakit TrainConfig.task
    data: str
    batch: int
    steps: int
    lr: float
    lr_full: float
    metric: str
    higher_is_better: bool
    title: str


TASKS = {
    "bbc": Task("minilm-l6", "seq-cls", "bbc-news", batch=16, steps=40, lr=1e-3, lr_full=1e-4,
                metric="accuracy", higher_is_better=True, title="BBC News, MiniLM-L6"),
    "chichewa": Task("smollm2-135m", "causal-lm", "chichewa", batch=4, steps=40, lr=1e-3, lr_full=5e-5,
                     metric="bits_per_byte", higher_is_better=False, title="Chichewa LM, SmolLM2-135M"),
}
MAX_LENGTH = 128  # bbc: tokens per article
BLOCK = 128  # chichewa: tokens per training block
EVAL_BLOCK = 256  # chichewa: evaluation window


@dataclass(frozen=True)
class Ctx:
    """What a row's hyper-parameters may depend on."""

    steps: int
    num_layers: int


RANKS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128,
         160, 192, 224, 256, 320, 384, 448, 512)
REDUCTION = (64, 48, 32, 24, 16, 12, 10, 8, 7, 6, 5, 4, 3, 2.5, 2, 1.5, 1)  # decreasing = more params


@dataclass(frozen=True)
class Row:
    """One benchmark row: a method and how its hyper-parameters are chosen.

    kw: fixed hyper-parameters (a dict, or a function of the run's Ctx).
    match: the hyper-parameter searched over `grid` (ordered by increasing parameter count)
        for the trainable count nearest to LoRA r=8's; `derived` adds kw that follow from it.
    count_kw: overrides used only while counting (skip a costly SVD init that does not change shapes).
    """

    method: str
    kw: dict | Callable[[Ctx], dict] = field(default_factory=dict)
    match: str | None = None
    grid: tuple = ()
    derived: Callable[[Any], dict] | None = None
    count_kw: dict = field(default_factory=dict)
    note: str = ""
    optim: str = "adamw"  # TrainConfig.optim (ALLoRA is LoRA trained with optim="allora")

    def fixed(self, ctx: Ctx) -> dict:
        return dict(self.kw(ctx) if callable(self.kw) else self.kw)


BLOCKS = r".*\.\d+\..*"  # MoLA places experts by layer number: only modules inside numbered blocks

ROWS: dict[str, Row] = {
    # -- reference ----------------------------------------------------------------------------
    "lora": Row("lora", {"r": 8, "alpha": 16.0}),
    # -- rank-adaptive (issue 4) ----------------------------------------------------------------
    "dylora": Row("dylora", {"r": 8, "alpha": 16.0}, note="served at its maximum rank 8"),
    "sora": Row("sora", lambda c: {"r": 8, "alpha": 16.0, "lr_scaled": False, "sparse_lambda": 0.5 / c.steps},
                note="r=8 shrinking; absolute lambda = 0.5/steps"),
    "adalora": Row("adalora", lambda c: {"init_r": 12, "target_r": 8, "tinit": c.steps // 10, "tfinal": c.steps // 5},
                   note="12 -> average 8"),
    "increlora": Row("increlora", {"init_r": 1, "target_r": 8, "max_r": 16}, note="1 -> budget 8 x modules"),
    "triadaptlora": Row("triadaptlora", {"init_r": 1, "target_r": 8, "max_r": 16}, note="1 -> budget 8 x modules"),
    "codyra": Row("codyra", {"r": 8}, note="r=8 shrinking (kappa schedule)"),
    "s2lora": Row("s2lora", {}, match="r", grid=RANKS, note="shared factors at LoRA's count"),
    "s2lora_r8": Row("s2lora", {"r": 8}, note="S2-LoRA at LoRA's rank (its own count)"),
    # -- structured / shared-basis (issue 5) ---------------------------------------------------
    "nola": Row("nola", {"num_basis_a": 256, "num_basis_b": 256}, note="own count (256+256 coefficients/module)"),
    "randlora": Row("randlora", {}, note="own count (r=32)"),
    "loldu": Row("loldu", {}, note="own count (r=64 diagonal)"),
    "bone": Row("bone", {}, match="r", grid=RANKS),
    "lamda": Row("lamda", lambda c: {"freeze_steps": c.steps}, match="r", grid=RANKS, count_kw={"a_init": "random"}),
    "hydra": Row("hydra", {}, match="r", grid=RANKS),
    "mosa": Row("mosa", {"r": 8, "groups": 4}),
    # -- data-aware initialisations -------------------------------------------------------------
    "allora": Row("lora", {"r": 8, "alpha": 8.0, "dropout": 0.0}, optim="allora",
                  note="LoRA without dropout or scale, ALLoRA row-adaptive steps (eta 1)"),
    "pissa": Row("pissa", {"r": 8}),
    "lora_ga": Row("lora_ga", {"r": 8}),
    "lora_sb": Row("lora_sb", {}, match="r", grid=RANKS, note="r^2 per module at LoRA's count"),
    "lora_sb_r16": Row("lora_sb", {"r": 16}, note="paper default r=16 (own count)"),
    "eva": Row("eva", {"r": 8}),
    # -- inserted modules -------------------------------------------------------------------------
    "bottleneck": Row("bottleneck", {}, match="reduction_factor", grid=REDUCTION),
    "mosa_bn": Row("mosa_bn", {"groups": 4}, match="reduction_factor", grid=REDUCTION),
    "seq_bn_inv": Row("seq_bn_inv", {}, match="reduction_factor", grid=REDUCTION),
    # -- mixtures -------------------------------------------------------------------------------
    "mola": Row("mola", lambda c: {"num_layers": c.num_layers, "target": BLOCKS}, match="r", grid=RANKS,
                note="2/4/6/8 experts, top-2"),
    "smora": Row("smora", {}, match="r", grid=RANKS, derived=lambda r: {"top_k": max(1, r // 8)},
                 note="top r/8 ranks per token"),
    "meteora": Row("meteora", {"num_experts": 4, "top_k": 2}, match="r", grid=RANKS,
                   note="from scratch, no task LoRAs"),
    "master_asr": Row("master_asr", {"num_modules": 8}, match="r", grid=RANKS, note="one task, 8-module bank"),
    # -- full fine-tuning -----------------------------------------------------------------------
    "full": Row("full", {}, note="all weights"),
}
ROWS["lora_repeat"] = ROWS["lora"]  # drift check: LoRA again at the end of each task

SKIPPED = {
    "lae": "LAE is a continual-learning procedure (online + EMA offline module over a task sequence)",
    "continual": "lorakit.continual runs task sequences; CoDyRA's adapter is benchmarked as 'codyra'",
}

FAMILIES = {
    "rank_adaptive": ["lora", "dylora", "sora", "adalora", "increlora", "triadaptlora", "codyra", "s2lora",
                      "s2lora_r8", "full"],
    "all": ["lora", "dylora", "sora", "adalora", "increlora", "triadaptlora", "codyra", "s2lora", "s2lora_r8",
            "nola", "randlora", "loldu", "bone", "lamda", "hydra", "mosa", "pissa", "lora_ga", "lora_sb",
            "lora_sb_r16", "eva", "bottleneck", "mosa_bn", "seq_bn_inv", "mola", "smora", "meteora",
            "master_asr", "full"],
}


def row_for(name: str) -> Row:
    """A listed row, or a default one for a method registered after this file was written."""
    if name in ROWS:
        return ROWS[name]
    return Row(name, {}, note="registered method without a budget rule: its defaults")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="all", choices=sorted(FAMILIES), help="default set of rows")
    p.add_argument("--methods", default=None, help="comma-separated rows (default: the family's)")
    p.add_argument("--tasks", default="bbc,chichewa", help=f"comma-separated subset of {list(TASKS)}")
    p.add_argument("--steps-bbc", type=int, default=TASKS["bbc"].steps)
    p.add_argument("--steps-lm", type=int, default=TASKS["chichewa"].steps)
    p.add_argument("--batch-bbc", type=int, default=TASKS["bbc"].batch)
    p.add_argument("--batch-lm", type=int, default=TASKS["chichewa"].batch)
    p.add_argument("--lr", type=float, default=None, help="adapter learning rate for every task (default: per task)")
    p.add_argument("--lr-override", default="", help="per-row learning rates, e.g. nola=1e-2,loldu=5e-3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-drift-check", action="store_true", help="skip the lora_repeat run at the end of a task")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="plumbing checks only: evaluate on the first N test articles / held-out chapters")
    p.add_argument("--timeout", type=int, default=1800, help="seconds before a child run is killed")
    p.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    p.add_argument("--reuse", type=Path, default=None,
                   help="another results JSON whose runs with identical settings are copied instead of rerun")
    p.add_argument("--out", type=Path, default=RESULTS / "methods.json", help="results JSON (a PNG beside it)")
    p.add_argument("--name", default=None, help="benchmark name written to the JSON (default: --out's stem)")
    # internal: one child job
    p.add_argument("--child", choices=["train", "budget"], help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--add-unlisted", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kw-json", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return a
    a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in a.tasks if t not in TASKS]
    if bad or not a.tasks:
        p.error(f"unknown tasks {bad}; choose from {list(TASKS)}")
    a.rows = [m.strip() for m in (a.methods or ",".join(FAMILIES[a.family])).split(",") if m.strip()]
    # "all" means every registered method: ones without a row here are found by the budget child
    a.add_unlisted = a.family == "all" and a.methods is None
    skipped = [m for m in a.rows if m in SKIPPED]
    if skipped:
        p.error(f"{skipped} cannot run here: " + "; ".join(f"{m}: {SKIPPED[m]}" for m in skipped))
    if len(set(a.rows)) != len(a.rows):
        p.error(f"--methods lists a row twice: {a.rows}")
    for s in (a.steps_bbc, a.steps_lm):
        if s < 2:
            p.error("need at least 2 steps per task (the first step is not timed)")
    if min(a.batch_bbc, a.batch_lm) < 1:
        p.error("batch sizes must be positive")
    try:
        a.lr_by_row = {k.strip(): float(v) for k, v in (x.split("=") for x in a.lr_override.split(",") if x.strip())}
    except ValueError:
        p.error(f"--lr-override wants row=lr pairs separated by commas, got {a.lr_override!r}")
    a.name = a.name or a.out.stem
    return a


def steps_for(a: argparse.Namespace, task: str) -> int:
    return a.steps_bbc if task == "bbc" else a.steps_lm


def batch_for(a: argparse.Namespace, task: str) -> int:
    return a.batch_bbc if task == "bbc" else a.batch_lm


def lr_for(a: argparse.Namespace, task: str, row: str) -> float:
    if row in a.lr_by_row:
        return a.lr_by_row[row]
    t = TASKS[task]
    if row_for(row).method == "full":
        return t.lr_full
    return a.lr if a.lr is not None else t.lr


# ============================================================================ the children
def quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized classifier" load report, etc.
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def load_task_model(task: Task, seed: int):
    """The task's model with every weight copied into anonymous process memory."""
    import torch

    from lorakit.data import bbc_news
    from lorakit.models import load_model

    torch.manual_seed(seed)
    kw = {"num_labels": len(bbc_news("train")[2])} if task.hf_task == "seq-cls" else {}
    model, tok = load_model(task.model, task=task.hf_task, **kw)
    with torch.no_grad():  # idle mmapped weight pages get evicted by the VM and re-read mid-run
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    if task.hf_task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def num_layers(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)


# -- budget child: trainable counts by injection, no training -------------------------------------
def count_trainable(model, method: str, kw: dict, hf_task: str) -> int:
    """Trainable parameters after injecting `method` with `kw` (the seq-cls head included);
    the model is left as it was (the adapter is deleted again)."""
    import lorakit
    from lorakit.core.inject import delete_adapter
    from lorakit.train import build_adapter_config

    if method == "full":
        return sum(p.numel() for p in model.parameters())
    cfg = build_adapter_config(method, kw, hf_task, model)
    lorakit.inject(model, cfg)
    try:
        # unique tensors: S2-LoRA's factors are one Parameter shared by many layers
        return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    finally:
        delete_adapter(model, "default")


def run_budget_child(a: argparse.Namespace) -> dict:
    """{row: {"kw", "trainable_params", "target", "ratio", "searched"}} for the rows of one task."""
    quiet_libraries()
    task = TASKS[a.task]
    model, _ = load_task_model(task, a.seed)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    ctx = Ctx(steps=a.steps, num_layers=num_layers(model))

    def count(method: str, kw: dict) -> int:
        n = count_trainable(model, method, kw, task.hf_task)
        for p in model.parameters():  # injection froze the base: undo for the next count
            p.requires_grad_(id(p) not in frozen)
        return n

    from lorakit.core.registry import list_methods

    covered = {row.method for row in ROWS.values()} | set(SKIPPED)
    unlisted = [s.name for s in list_methods() if s.name not in covered]
    target = count("lora", ROWS["lora"].fixed(ctx))
    out = {"_target": {"trainable_params": target, "what": "LoRA r=8, alpha=16, all-linear"},
           "_unlisted": unlisted}  # registered after this file was written: run with their defaults
    rows = [r for r in a.rows.split(",") if r]
    if a.add_unlisted:
        rows += [m for m in unlisted if m not in rows]
    for name in rows:
        row = row_for(name)
        t0 = time.perf_counter()
        kw = row.fixed(ctx)
        searched = []
        if row.match:
            best = None
            for v in row.grid:
                trial = {**kw, row.match: v, **(row.derived(v) if row.derived else {}), **row.count_kw}
                try:
                    n = count(row.method, trial)
                except Exception as e:  # noqa: BLE001 - an invalid grid value (e.g. a block size that does not divide)
                    searched.append([v, None, f"{type(e).__name__}: {e}"[:160]])
                    continue
                searched.append([v, n])
                gap = abs(math.log(n / target))
                if best is None or gap < best[0]:
                    best = (gap, v)
                if n >= target:  # the grid is ordered by count: later values only move away
                    break
            if best is None:
                out[name] = {"error": f"no valid {row.match} in the grid", "searched": searched}
                continue
            kw = {**kw, row.match: best[1], **(row.derived(best[1]) if row.derived else {})}
        try:
            n = count(row.method, {**kw, **row.count_kw})
        except Exception as e:  # noqa: BLE001 - reported as this row's error
            out[name] = {"error": f"{type(e).__name__}: {e}", "kw": kw}
            continue
        out[name] = {"method": row.method, "kw": kw, "trainable_params": n, "ratio": n / target,
                     "matched_on": row.match, "searched": searched, "note": row.note,
                     "seconds": round(time.perf_counter() - t0, 2)}
        log(f"[budget {a.task}] {name}: {kw} -> {n:,} trainable ({n / target:.2f}x LoRA)")
    return out


# -- train child ----------------------------------------------------------------------------------
def rank_extractor(method: str):
    """model -> {module path: rank}, or None for methods without a notion of per-module rank."""
    import importlib

    def module_attr(m):
        def f(model):
            from lorakit.core.inject import adapted_layers

            out = {}
            for path, layer in adapted_layers(model).items():
                ad = layer.adapters["default"]
                v = m(ad)
                if v is not None:
                    out[path] = int(v)
            return out
        return f

    if method in ("sora", "codyra"):
        return importlib.import_module("lorakit.methods.sora").active_ranks
    if method in ("s2lora", "adalora", "increlora", "triadaptlora"):
        mod = importlib.import_module(f"lorakit.methods.{method}")
        return getattr(mod, "active_ranks", None) or mod.rank_pattern
    if method == "dylora":
        return module_attr(lambda ad: ad.eval_rank)
    if method in ("lora", "eva"):
        # the rank each module holds (EVA's are chosen from the data): lora_A is (r, d_in)
        return module_attr(lambda ad: ad.lora_A.weight.shape[0])
    return None


# rank-adaptive adapters are stored pruned (AdaLoRA/IncreLoRA/TriAdaptLoRA prune themselves at the
# end of training once their schedule has finished; calling prune again is a no-op then)
PRUNERS = {m: f"lorakit.methods.{m}" for m in ("sora", "s2lora", "adalora", "increlora", "triadaptlora")}
PRUNERS["codyra"] = "lorakit.methods.sora"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def rank_summary(ranks: dict[str, int] | None) -> dict | None:
    if not ranks:
        return None
    v = list(ranks.values())
    return {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "total": sum(v), "modules": len(v)}


def run_train_child(a: argparse.Namespace) -> dict:
    import importlib
    import resource

    import torch
    from transformers import TrainerCallback

    import lorakit
    from lorakit.evaluate import evaluate_classifier, evaluate_lm
    from lorakit.train import TrainConfig, train

    quiet_libraries()
    task, row = TASKS[a.task], row_for(a.row)
    kw = json.loads(a.kw_json)
    res: dict[str, Any] = {"row": a.row, "task": a.task, "method": row.method, "kw": kw, "lr": a.child_lr,
                           "steps": a.steps, "batch": a.batch, "torch_threads": torch.get_num_threads(),
                           "allocator": "tcmalloc" if "tcmalloc" in Path("/proc/self/maps").read_text() else "system"}
    t0 = time.perf_counter()
    model, tok = load_task_model(task, a.seed)
    res["load_s"] = round(time.perf_counter() - t0, 2)

    class Clock(TrainerCallback):
        """Per-step wall time, train-phase peak RSS, and no mid-run checkpoints."""

        def __init__(self):
            self.times: list[float] = []
            self.t = 0.0
            self.began = None
            self.rss_begin = None
            self.train_peak = None
            self.reset = False

        def on_train_begin(self, args, state, control, **kw_):
            self.began = time.perf_counter()
            self.reset = release_and_reset_peak()
            self.rss_begin = vm_mb("VmRSS")

        def on_step_begin(self, args, state, control, **kw_):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw_):
            self.times.append(time.perf_counter() - self.t)
            control.should_save = False  # runs after the default flow callback: the benchmark never checkpoints
            n = len(self.times)
            if n == 1 or n % 20 == 0 or n == state.max_steps:
                log(f"[{a.task}/{a.row}] step {n}/{state.max_steps} {self.times[-1]:.2f}s")

        def on_train_end(self, args, state, control, **kw_):
            self.train_peak = vm_mb("VmHWM") if self.reset else None

    clock = Clock()
    lr = a.child_lr
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        cfg = TrainConfig(model=task.model, task=task.hf_task, data=task.data, method=row.method,
                          output_dir=str(Path(tmp) / "run"), block_size=BLOCK, batch_size=a.batch,
                          max_steps=a.steps, lr=lr, seed=a.seed, save_steps=a.steps, logging_steps=1,
                          max_length=MAX_LENGTH, progress=False, optim=row.optim)
        t1 = time.perf_counter()
        out = train(cfg, adapter=None if row.method == "full" else kw, model=model, tokenizer=tok,
                    callbacks=[clock])
        res["train_call_s"] = round(time.perf_counter() - t1, 2)
        res["setup_s"] = round(clock.began - t1, 2)  # data, injection, data-aware init
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["train_peak_rss_mb"] = clock.train_peak
        res["rss_train_begin_mb"] = clock.rss_begin
        model = out.model
        hist = out.log["history"]
        res["losses"] = [h["loss"] for h in hist if "loss" in h and "step" in h]
        res["loss_steps"] = [h["step"] for h in hist if "loss" in h and "step" in h]
        res["step_times_s"] = [round(t, 4) for t in clock.times]
        timed = clock.times[1:] or clock.times
        res["step_time_s"] = statistics.median(timed)
        res["trainable_params_train"] = out.log["trainable_parameters"]
        res["total_params"] = out.log["total_parameters"]
        res["adapter_bytes_unpruned"] = dir_bytes(out.adapter_dir)

        # -- the adapter as stored: rank-adaptive methods pruned, ranks read off it ----------
        ranks = None
        if row.method != "full":
            extract = rank_extractor(row.method)
            if extract is not None:
                ranks = extract(model)
            adapter_dir = out.adapter_dir
            if row.method in PRUNERS:
                importlib.import_module(PRUNERS[row.method]).prune(model)
                adapter_dir = lorakit.save(model, Path(tmp) / "pruned", base_model=task.model)
            res["adapter_bytes"] = dir_bytes(adapter_dir)
            res["trainable_params"] = sum(
                p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        else:  # the saved weights (the tokenizer files beside them are not the model)
            res["adapter_bytes"] = sum(f.stat().st_size for f in out.adapter_dir.glob("*.safetensors"))
            res["trainable_params"] = res["trainable_params_train"]
        res["ranks_per_module"] = ranks
        res["ranks"] = rank_summary(ranks)

    # -- evaluate -------------------------------------------------------------------------------
    t2 = time.perf_counter()
    model.eval()
    if task.hf_task == "seq-cls":
        from lorakit.data import bbc_news

        texts, labels, _ = bbc_news("test")
        if a.eval_limit:
            texts, labels = texts[: a.eval_limit], labels[: a.eval_limit]
        ev = evaluate_classifier(model, tok, texts, labels, batch_size=32, max_length=MAX_LENGTH)
    else:
        from lorakit.data import chichewa_split

        heldout = chichewa_split()[1]
        ev = evaluate_lm(model, tok, heldout[: a.eval_limit or None], block_size=EVAL_BLOCK, batch_size=4, progress=False)
    res["eval"] = ev
    res["metric"] = ev[task.metric]
    res["eval_s"] = round(time.perf_counter() - t2, 2)
    log(f"[{a.task}/{a.row}] {task.metric} {res['metric']:.4f}, {res['trainable_params']:,} trainable, "
        f"{res['step_time_s']:.3f} s/step, peak RSS {res['peak_rss_mb']:.0f} MB")
    return res


# ============================================================================ the parent
def machine_info() -> dict:
    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu,
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": ver("torch"), "transformers": ver("transformers")}


def child_env() -> dict:
    """The parent's environment, with src/ importable and tcmalloc preloaded as `lorakit train` does."""
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    sys.path.insert(0, src)
    from lorakit.allocator import tcmalloc_path  # torch-free import

    env.pop("LD_PRELOAD", None)
    if tcmalloc_path() and os.environ.get("LORAKIT_ALLOCATOR") != "system":
        env["LD_PRELOAD"] = tcmalloc_path()
    return env


def spawn(args: list[str], label: str, timeout: int) -> tuple[dict | None, str | None, list[str], float]:
    """Run this script as a child; (result, error, stderr tail, wall seconds). Its stderr streams through."""
    import threading

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--child-out", str(out)]
        tail: collections.deque[str] = collections.deque(maxlen=30)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())

        def pump() -> None:  # live progress; the tail is kept for error rows
            for line in proc.stderr:
                sys.stderr.write(line)
                tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        error = None
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            error = f"timeout after {timeout} s"
        reader.join(timeout=5)
        wall = time.perf_counter() - t0
        if error is None and (proc.returncode != 0 or not out.exists()):
            error = f"exit code {proc.returncode}"
        if error:
            log(f"[{label}] FAILED: {error}")
            return None, error, list(tail), wall
        return json.loads(out.read_text()), None, [], wall


def settings_key(a: argparse.Namespace, task: str, row: str) -> dict:
    """What a stored run must match to be reused on resume."""
    t = TASKS[task]
    return {"steps": steps_for(a, task), "batch": batch_for(a, task), "lr": lr_for(a, task, row), "seed": a.seed,
            "model": t.model, "max_length": MAX_LENGTH, "block": BLOCK, "eval_block": EVAL_BLOCK,
            "eval_limit": a.eval_limit}


def load_previous(path: Path | None, fresh: bool = False) -> dict:
    """{"runs", "budgets"} stored in a results JSON (empty when absent, unreadable or `fresh`)."""
    if fresh or path is None or not path.exists():
        return {"runs": {}, "budgets": {}}
    try:
        prev = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log(f"cannot read earlier results from {path} ({e}); not using them")
        return {"runs": {}, "budgets": {}}
    return {"runs": prev.get("runs", {}), "budgets": prev.get("budgets", {})}


def budgets_for(a: argparse.Namespace, task: str, rows: list[str], cache: dict) -> dict:
    """Per-row hyper-parameters for `task` (from the cache, else measured in a budget child)."""
    steps = steps_for(a, task)
    have = cache.setdefault(task, {})
    if have.get("_steps") != steps:  # run-length-dependent kw: measure again
        have.clear()
    need = [r for r in dict.fromkeys(rows) if r not in have or "error" in have[r]]
    if need or (a.add_unlisted and "_unlisted" not in have):
        log(f"== {task}: matching parameter budgets for {', '.join(need) or 'new methods'}")
        res, err, tail, wall = spawn(["--child", "budget", "--task", task, "--rows", ",".join(need),
                                      "--steps", str(steps), "--seed", str(a.seed)]
                                     + (["--add-unlisted"] if a.add_unlisted else []), f"budget {task}", a.timeout)
        if res is None:
            raise SystemExit(f"budget child for {task} failed ({err}):\n" + "\n".join(tail))
        have.update(res)
        have["_steps"] = steps
        log(f"   budgets measured in {wall:.0f} s")
    return have


def smooth(xs: list[float], k: int = SMOOTH) -> list[float]:
    """Trailing mean over the last k values (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def first_reach(run: dict, level: float) -> int | None:
    """First step whose smoothed loss is <= level, or None."""
    for step, v in zip(run["loss_steps"], smooth(run["losses"])):
        if v <= level:
            return step
    return None


def summarise(task: str, runs: dict[str, dict], rows: list[str]) -> dict:
    """{row: summary} for one task, ratios against its LoRA run."""
    lora = runs.get("lora")
    lora_ok = lora is not None and "error" not in lora and lora.get("losses")
    level = smooth(lora["losses"])[-1] if lora_ok else None
    lora_steps = first_reach(lora, level) if lora_ok else None
    # step times are compared within one measuring session: a row reused from another results
    # file against that file's LoRA, a row measured now against a LoRA measured now (lora or,
    # when lora itself was reused, the lora_repeat drift check)
    timers = [x for x in (lora, runs.get("lora_repeat")) if x is not None and "error" not in x]

    def time_ref(r: dict) -> dict | None:
        return next((x for x in timers if x.get("reused_from") == r.get("reused_from")), None)

    out = {}
    for name in rows:
        r = runs.get(name)
        if r is None:
            continue
        if "error" in r:
            out[name] = {"error": r["error"]}
            continue
        reach = first_reach(r, level) if level is not None and r.get("losses") else None
        ref = time_ref(r)
        out[name] = {
            "method": r["method"],
            "trainable_params": r["trainable_params"],
            "trainable_params_train": r["trainable_params_train"],
            "params_ratio": r["trainable_params"] / lora["trainable_params"] if lora_ok else None,
            "adapter_bytes": r["adapter_bytes"],
            "metric": r["metric"],
            "metric_name": TASKS[task].metric,
            "final_loss": smooth(r["losses"])[-1] if r.get("losses") else None,
            "steps_to_lora_loss": reach,
            "steps_to_lora_loss_ratio": reach / lora_steps if reach is not None and lora_steps else None,
            "step_time_s": r["step_time_s"],
            "step_time_ratio": r["step_time_s"] / ref["step_time_s"] if ref is not None else None,
            "reused_from": r.get("reused_from"),
            "setup_s": r["setup_s"],
            "peak_rss_mb": r["peak_rss_mb"],
            "train_peak_rss_mb": r.get("train_peak_rss_mb"),
            "ranks": r.get("ranks"),
            "kw": r["kw"],
            "lr": r["lr"],
        }
    if lora_ok:
        out["_reference"] = {"lora_final_smoothed_loss": level, "lora_steps_to_own_final_loss": lora_steps,
                             "smoothing": f"trailing mean of {SMOOTH} steps"}
    return out


def fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown_table(task: str, summary: dict, with_ranks: bool) -> str:
    t = TASKS[task]
    metric = "accuracy (%)" if t.metric == "accuracy" else "held-out bpb"
    head = (f"| method | trainable params | × LoRA | adapter size | {metric} | steps to LoRA's loss (× LoRA) | "
            f"step (s) | × LoRA | peak RSS (MB) |" + (" ranks: mean [min–max] |" if with_ranks else ""))
    lines = [f"**{t.title}**", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summary.items():
        if name.startswith("_"):
            continue
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error']} |" + " |" * (head.count("|") - 3))
            continue
        m = f"{s['metric'] * 100:.1f}" if t.metric == "accuracy" else f"{s['metric']:.3f}"
        reach = "not reached" if s["steps_to_lora_loss"] is None else \
            f"{s['steps_to_lora_loss']} ({s['steps_to_lora_loss_ratio']:.2f})"
        rk = ""
        if with_ranks:
            r = s.get("ranks")
            rk = " – |" if not r else f" {r['mean']:.1f} [{r['min']}–{r['max']}] |"

        def ratio(x):
            return "–" if x is None else f"{x:.2f}"

        mark = " †" if s.get("reused_from") else ""
        lines.append(f"| {name}{mark} | {fmt_params(s['trainable_params'])} | {ratio(s['params_ratio'])} | "
                     f"{fmt_bytes(s['adapter_bytes'])} | {m} | {reach} | {s['step_time_s']:.3f} | "
                     f"{ratio(s['step_time_ratio'])} | {s['peak_rss_mb']:.0f} |{rk}")
    reused = sorted({s["reused_from"] for s in summary.values() if s.get("reused_from")})
    if reused:
        note = (f"† reused from {', '.join(reused)} (same settings, measured in an earlier session): "
                "its step time × LoRA is against that session's LoRA run")
        lines += ["", note]
    return "\n".join(lines)


def plot(summaries: dict[str, dict], path: Path, title: str) -> None:
    """Per task, bars per row: metric, trainable params, step time (× LoRA, peak RSS written
    beside), steps to LoRA's final loss (× LoRA's). LoRA red, full fine-tuning grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows_of(task):
        return {k: v for k, v in summaries[task].items() if not k.startswith("_") and "error" not in v}

    tasks = [t for t in summaries if rows_of(t)]
    if not tasks:
        return
    n = max(len(rows_of(t)) for t in tasks)
    with_ranks = any(v.get("ranks") for t in tasks for v in rows_of(t).values())
    cols = 5 if with_ranks else 4
    fig, axes = plt.subplots(len(tasks), cols, figsize=(5 * cols, len(tasks) * (1.6 + 0.28 * n)), squeeze=False)
    for panels, task in zip(axes, tasks):
        ax_m, ax_p, ax_t, ax_s = panels[:4]
        t = TASKS[task]
        ok = rows_of(task)
        names = list(ok)
        colors = ["tab:red" if v["method"] == "lora" else "tab:gray" if v["method"] == "full" else "tab:blue"
                  for v in ok.values()]
        vals = [v["metric"] * (100 if t.metric == "accuracy" else 1) for v in ok.values()]
        ax_m.barh(names, vals, color=colors)
        lo, hi = min(vals), max(vals)
        ax_m.set_xlim(left=max(0.0, lo - 0.15 * (hi - lo) - (2 if t.metric == "accuracy" else 0.02)))
        ax_m.set(xlabel="test accuracy (%)" if t.metric == "accuracy" else "held-out bits/byte (lower is better)",
                 title=t.title)
        counts = [v["trainable_params"] for v in ok.values()]
        ax_p.barh(names, counts, color=colors)
        ax_p.set(xlabel="trainable parameters (stored adapter)", title="budget (LoRA r=8 in red)")
        if max(counts) > 20 * min(counts):
            ax_p.set_xscale("log")
        ratios = [v["step_time_ratio"] or 0 for v in ok.values()]
        ax_t.barh(names, ratios, color=colors)
        for i, v in enumerate(ok.values()):
            ax_t.text(ratios[i], i, f" {v['peak_rss_mb']:.0f} MB", va="center", fontsize=7)
        ax_t.axvline(1.0, color="k", lw=0.8)
        ax_t.set(xlabel="step time (× LoRA); peak RSS beside", title="cost")
        steps = [v["steps_to_lora_loss_ratio"] or 0 for v in ok.values()]
        ax_s.barh(names, steps, color=colors)
        for i, v in enumerate(ok.values()):
            if v["steps_to_lora_loss_ratio"] is None:
                ax_s.text(0.02, i, "not reached", va="center", fontsize=7)
        ax_s.axvline(1.0, color="k", lw=0.8)
        ax_s.axvline(0.5, color="k", lw=0.8, ls=":")
        ax_s.set(xlabel="steps to LoRA's final training loss (× LoRA's)", title="convergence")
        if with_ranks:
            ax_r = panels[4]
            rk = [v.get("ranks") or {} for v in ok.values()]
            mean = [r.get("mean", 0) for r in rk]
            err = [[m - r.get("min", m) for m, r in zip(mean, rk)], [r.get("max", m) - m for m, r in zip(mean, rk)]]
            ax_r.barh(names, mean, xerr=err, color=colors, capsize=2)
            ax_r.set(xlabel="final rank per module: mean, bars = min..max", title="ranks")
        for ax in panels:
            ax.invert_yaxis()
        for ax in panels[1:]:
            ax.set_yticklabels([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        res = run_train_child(a) if a.child == "train" else run_budget_child(a)
        a.child_out.write_text(json.dumps(res, default=float))
        return 0

    state = load_previous(a.out, a.fresh)
    runs, budgets = state["runs"], state["budgets"]
    donor = load_previous(a.reuse) if a.reuse and a.reuse.resolve() != a.out.resolve() else load_previous(None)
    for task, bud in donor["budgets"].items():  # budgets measured there with the same run length
        if task not in TASKS or bud.get("_steps") != steps_for(a, task):
            continue
        mine = budgets.setdefault(task, {})
        if mine.get("_steps") != bud["_steps"]:
            mine.clear()
        for k, v in bud.items():
            mine.setdefault(k, v)
    payload: dict[str, Any] = {}
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    def save() -> None:
        payload.clear()
        payload.update({"benchmark": a.name, "date": started, "machine": machine_info(),
                        "settings": {"family": a.family, "rows": a.rows, "tasks": a.tasks,
                                     "steps": {t: steps_for(a, t) for t in a.tasks},
                                     "batch": {t: batch_for(a, t) for t in a.tasks},
                                     "lr": {t: {r: lr_for(a, t, r) for r in a.rows} for t in a.tasks},
                                     "seed": a.seed, "max_length": MAX_LENGTH, "block": BLOCK,
                                     "eval_block": EVAL_BLOCK, "smoothing": SMOOTH},
                        "skipped": SKIPPED})
        for task in a.tasks:
            task_runs = {k.split("/", 1)[1]: v for k, v in runs.items() if k.startswith(task + "/")}
            payload[task] = summarise(task, task_runs, order(task))
        payload["budgets"] = budgets
        payload["runs"] = runs
        write_json(a.out, payload)

    def order(task: str) -> list[str]:
        rows = list(a.rows)
        if "lora" in rows and not a.no_drift_check and len(rows) > 3:
            rows.append("lora_repeat")
        return rows

    t_all = time.perf_counter()
    for task in a.tasks:
        bud = budgets_for(a, task, [r for r in order(task) if r != "lora_repeat"], budgets)
        new = [m for m in bud.get("_unlisted", []) if a.add_unlisted and m not in a.rows]
        if new:
            log(f"   registered methods without a row, run with their defaults: {new}")
            a.rows[-1:-1] = new  # before "full"
        rows = order(task)
        save()
        for name in rows:
            key = f"{task}/{name}"
            want = settings_key(a, task, name)
            prev = runs.get(key)
            if prev is not None and "error" not in prev and prev.get("settings") == want:
                log(f"== {key}: done before, skipped (--fresh reruns)")
                continue
            other = None if name == "lora_repeat" else donor["runs"].get(key)  # the drift check is measured now
            if other is not None and "error" not in other and other.get("settings") == want:
                log(f"== {key}: reused from {a.reuse} (same settings)")
                runs[key] = {**other, "reused_from": str(a.reuse)}
                save()
                continue
            b = bud.get("lora" if name == "lora_repeat" else name, {})
            if "error" in b:
                runs[key] = {"row": name, "task": task, "method": row_for(name).method,
                             "error": f"budget: {b['error']}", "settings": want}
                save()
                continue
            log(f"== {key}: {row_for(name).method} {b.get('kw', {})} lr {want['lr']}")
            res, err, tail, wall = spawn(
                ["--child", "train", "--task", task, "--row", name, "--kw-json", json.dumps(b.get("kw", {})),
                 "--steps", str(want["steps"]), "--batch", str(want["batch"]), "--child-lr", str(want["lr"]), "--seed", str(a.seed),
                 "--eval-limit", str(a.eval_limit)],
                key, a.timeout)
            if res is None:
                res = {"row": name, "task": task, "method": row_for(name).method, "error": err, "stderr_tail": tail}
            res["settings"] = want
            res["wall_s"] = round(wall, 1)
            runs[key] = res
            save()
            log(f"   {key}: {wall:.0f} s wall")
    save()
    total = time.perf_counter() - t_all

    with_ranks = a.family == "rank_adaptive" or any(
        (payload[t].get(r) or {}).get("ranks") for t in a.tasks for r in a.rows)
    for task in a.tasks:
        print()
        print(markdown_table(task, payload[task], with_ranks))
        ref = payload[task].get("_reference")
        if ref:
            print(f"\nLoRA's final training loss (trailing mean of {SMOOTH} steps) {ref['lora_final_smoothed_loss']:.4f}, "
                  f"first reached at step {ref['lora_steps_to_own_final_loss']}.")
        rep = payload[task].get("lora_repeat")
        lo = payload[task].get("lora")
        if not (rep and lo and "error" not in rep and "error" not in lo):
            continue
        if lo.get("reused_from") != rep.get("reused_from"):
            print(f"LoRA step time {lo['step_time_s']:.3f} s in {lo['reused_from'] or 'this run'}, "
                  f"{rep['step_time_s']:.3f} s at the end of {rep['reused_from'] or 'this run'} (different sessions: "
                  "not a drift measure).")
        else:
            print(f"Drift: LoRA step time {lo['step_time_s']:.3f} s first, {rep['step_time_s']:.3f} s at the end "
                  f"({rep['step_time_s'] / lo['step_time_s']:.2f}x).")
    walls = {k: v.get("wall_s") for k, v in runs.items() if any(k.startswith(t + "/") for t in a.tasks)}
    print(f"\nwall time per run (s): {json.dumps(walls)}")
    print(f"this invocation: {total:.0f} s")
    plot({t: payload[t] for t in a.tasks}, a.out.with_suffix(".png"),
         f"lorakit {a.name}: matched budgets (LoRA r=8), {', '.join(f'{t} {steps_for(a, t)} steps' for t in a.tasks)}")
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
