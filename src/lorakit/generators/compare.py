"""Held-out comparison of adapter generators (the numbers `benchmarks/beyond.py` reports).

For every held-out task (never seen by a generator) the eval loss of
    base                the model without adapter
    trained_lora        a LoRA fine-tuned on that task's own train rows (the target to approach)
    mean_lora           the average of the training tasks' LoRAs (a task-agnostic LoRA: what a
                        generator that ignores the context would give)
    icm_lora            the LoRA ICM-LoRA's CVAE generates from the task's context
    generative_adapter  the LoRA GenerativeAdapter generates from the task's context
and `gap_closed[m] = (base − m) / (base − trained_lora)` (1 = as good as training on the task).

On the tiny synthetic family (tests/generators) it takes ~15 s. On a real model, e.g.
SmolLM2-135M with BBC topics as the groups of a document-mixture family (not run in tests):

    from lorakit.data.classify import bbc_news
    from lorakit.models import load_model
    model, tok = load_model("smollm2-135m")
    texts, labels, names = bbc_news("train")
    groups = {n: [t for t, y in zip(texts, labels) if y == i] for i, n in enumerate(names)}
    tasks = text_mixture_tasks(groups, tok, n_tasks=28, seq_len=64, concentration=0.5)
    result = compare_on_heldout(model, tasks[:24], tasks[24:], TaskLoraConfig(r=2, steps=60, lr=2e-3),
                                IcmLoraConfig(latent_dim=64, steps=500), GenerativeAdapterConfig(r=8, steps=200))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.generators.family import Task, TaskLoraConfig, eval_loss, eval_with_state, train_task_loras
from lorakit.generators.generative_adapter import GenerativeAdapterConfig, train_generative_adapter
from lorakit.generators.icm_lora import IcmLoraConfig, train_icm_lora

METHODS = ("icm_lora", "generative_adapter")


def compare_on_heldout(model: nn.Module, train_tasks: Sequence[Task], heldout_tasks: Sequence[Task],
                       task_lora: TaskLoraConfig | None = None, icm: IcmLoraConfig | None = None,
                       ga: GenerativeAdapterConfig | None = None,
                       methods: Sequence[str] = METHODS) -> dict:
    """Train the generators on `train_tasks`, evaluate everything on `heldout_tasks`.

    Returns {"loss": {method: mean held-out loss}, "gap_closed": {...}, "per_task": [...],
    "seconds": {...}, "train_losses": {...}, "configs": {...}} (JSON-ready).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown generator method(s) {unknown}; choose from {METHODS}")
    if not train_tasks or not heldout_tasks:
        raise ConfigError("compare_on_heldout needs at least one training and one held-out task")
    task_lora, icm, ga = task_lora or TaskLoraConfig(), icm or IcmLoraConfig(), ga or GenerativeAdapterConfig()
    seconds: dict[str, float] = {}
    per_task = [{"task": t.name, "base": eval_loss(model, t.eval)} for t in heldout_tasks]
    for row, t in zip(per_task, heldout_tasks):
        if "entropy" in t.info:
            row["optimal"] = t.info["entropy"]

    t0 = time.perf_counter()
    train_samples = train_task_loras(model, train_tasks, task_lora)
    seconds["task_loras_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    held_samples = train_task_loras(model, heldout_tasks, task_lora)
    seconds["task_loras_heldout"] = time.perf_counter() - t0
    finals = [s[-1] for s in train_samples]
    mean_lora = {k: torch.stack([f[k] for f in finals]).mean(0) for k in finals[0]}
    for row, t, s in zip(per_task, heldout_tasks, held_samples):
        row["trained_lora"] = eval_with_state(model, t, task_lora, s[-1])
        row["mean_lora"] = eval_with_state(model, t, task_lora, mean_lora)

    train_losses: dict[str, list[float]] = {}
    if "icm_lora" in methods:
        t0 = time.perf_counter()
        gen = train_icm_lora(model, train_tasks, icm, task_lora, samples=train_samples)
        seconds["icm_lora_train"] = time.perf_counter() - t0
        train_losses["icm_lora"] = gen.recon_losses
        t0 = time.perf_counter()
        for row, t in zip(per_task, heldout_tasks):
            row["icm_lora"] = eval_with_state(model, t, task_lora, gen.generate_state(model, t.context))
        seconds["icm_lora_generate_and_eval"] = time.perf_counter() - t0
    if "generative_adapter" in methods:
        t0 = time.perf_counter()
        gen_ga = train_generative_adapter(model, train_tasks, ga)
        seconds["generative_adapter_train"] = time.perf_counter() - t0
        train_losses["generative_adapter"] = gen_ga.losses
        t0 = time.perf_counter()
        for row, t in zip(per_task, heldout_tasks):
            row["generative_adapter"] = eval_with_state(model, t, gen_ga.lora_config(),
                                                        gen_ga.generate_state(model, t.context))
        seconds["generative_adapter_generate_and_eval"] = time.perf_counter() - t0

    keys = [k for k in per_task[0] if k != "task"]
    loss = {k: sum(r[k] for r in per_task) / len(per_task) for k in keys}
    gap = loss["base"] - loss["trained_lora"]
    gap_closed = {k: (loss["base"] - loss[k]) / gap if gap != 0 else float("nan")
                  for k in keys if k not in ("base", "optimal")}
    return {"n_train_tasks": len(train_tasks), "n_heldout_tasks": len(heldout_tasks), "loss": loss,
            "gap_closed": gap_closed, "per_task": per_task, "seconds": seconds,
            "train_losses": {k: [v[0], v[-1]] for k, v in train_losses.items()},
            "configs": {"task_lora": asdict(task_lora), "icm_lora": asdict(icm), "generative_adapter": asdict(ga)}}


__all__ = ["METHODS", "compare_on_heldout"]
