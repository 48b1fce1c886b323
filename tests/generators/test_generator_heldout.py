"""Generators on held-out tasks of a synthetic family (the issue's "train on a family of small
tasks, test on held-out ones"): a generated LoRA beats the base model and the task-agnostic
mean LoRA, and approaches a LoRA trained on the task. Also the benchmark function's output."""

import json
import math

import pytest

from lorakit.errors import ConfigError
from lorakit.generators import compare_on_heldout
from tests.generators.conftest import family, sharp_llama


def test_generated_loras_beat_the_base_model_on_heldout_tasks(heldout):
    loss = heldout["loss"]
    assert heldout["n_train_tasks"] == 16 and heldout["n_heldout_tasks"] == 4
    assert loss["trained_lora"] < loss["base"] - 1.0  # the family is learnable by a LoRA
    for method in ("icm_lora", "generative_adapter"):
        assert loss[method] < loss["base"] - 0.5
        for row in heldout["per_task"]:  # on every held-out task, not just on average
            assert row[method] < row["base"]


def test_generated_loras_read_the_context(heldout):
    """Held-out tasks are new mixtures: only a generator that uses the context beats the average
    of the training LoRAs (what a context-blind generator would emit)."""
    gap = heldout["gap_closed"]
    assert gap["trained_lora"] == 1.0
    assert gap["icm_lora"] > gap["mean_lora"] + 0.1
    assert gap["generative_adapter"] > gap["mean_lora"] + 0.1
    assert gap["generative_adapter"] > 0.85  # approaches training on the task itself
    assert all(row["optimal"] < row["trained_lora"] for row in heldout["per_task"])  # nobody beats entropy


def test_result_is_json_ready_for_the_benchmark(heldout):
    back = json.loads(json.dumps(heldout))
    assert set(back["loss"]) == {"base", "optimal", "trained_lora", "mean_lora", "icm_lora", "generative_adapter"}
    assert all(math.isfinite(v) for v in back["loss"].values())
    assert {"icm_lora_train", "generative_adapter_train", "task_loras_train"} <= set(back["seconds"])
    first, last = back["train_losses"]["generative_adapter"]
    assert last < first


def test_compare_argument_errors():
    tasks = family(3)
    with pytest.raises(ConfigError, match="unknown generator method"):
        compare_on_heldout(sharp_llama(), tasks[:2], tasks[2:], methods=["hypernet"])
    with pytest.raises(ConfigError, match="at least one training and one held-out task"):
        compare_on_heldout(sharp_llama(), tasks, [])
