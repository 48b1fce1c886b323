"""Temperature Cooldown sampling and loss upweighting (arXiv:2410.04579)."""

import math
from itertools import pairwise

import pytest
import torch

from lorakit.data.mix import temperature_weights
from lorakit.data.sampling import (
    ScheduledMixDataset,
    ScheduledMixSampler,
    TemperatureSchedule,
    per_example_lm_loss,
    schedule_indices,
    upweight_weights,
    upweighted_lm_loss,
    upweighted_loss,
)
from lorakit.errors import ConfigError

SIZES = {"en": 10_000, "ny": 500, "sw": 100}
CHI2_DF2_999 = 13.816  # chi-square critical value, 2 degrees of freedom, p = 0.001


def chi2(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.6), (0.5, 0.5)])
def test_cooldown_is_monotone_from_t_start_to_t_end(shape, start, end):
    sch = TemperatureSchedule(total_steps=100, t_start=5.0, t_end=1.0, start=start, end=end, shape=shape)
    ts = [sch.temperature(s) for s in range(120)]
    assert ts[0] == 5.0 and ts[-1] == 1.0
    assert all(a >= b for a, b in pairwise(ts))
    assert all(t == 5.0 for t in ts[: int(start * 100)]) and all(t == 1.0 for t in ts[math.ceil(end * 100):])
    # as T falls the smallest source's share falls and the largest's rises
    ps = [sch.probabilities(SIZES, s) for s in range(100)]
    assert all(a["sw"] >= b["sw"] and a["en"] <= b["en"] for a, b in pairwise(ps))
    assert ps[0]["sw"] > 5 * ps[-1]["sw"]


def test_linear_and_cosine_midpoints():
    lin = TemperatureSchedule(total_steps=100, t_start=9.0, t_end=1.0)
    cos = TemperatureSchedule(total_steps=100, t_start=9.0, t_end=1.0, shape="cosine")
    assert lin.temperature(50) == pytest.approx(5.0) and lin.temperature(25) == pytest.approx(7.0)
    assert cos.temperature(50) == pytest.approx(5.0) and cos.temperature(25) > lin.temperature(25)
    step = TemperatureSchedule(total_steps=10, t_start=3.0, t_end=1.0, start=0.5, end=0.5)
    assert [step.temperature(s) for s in (0, 4, 5, 9)] == [3.0, 3.0, 1.0, 1.0]


def test_schedule_rejects_bad_values():
    for kwargs, match in [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "t_start": 0.0}, "t_start"),
        ({"total_steps": 10, "t_start": math.inf}, "t_start"),
        ({"total_steps": 10, "t_end": -1.0}, "t_end"),
        ({"total_steps": 10, "t_start": 1.0, "t_end": 5.0}, "lowers the temperature"),
        ({"total_steps": 10, "start": 0.8, "end": 0.2}, "start <= end"),
        ({"total_steps": 10, "end": 1.5}, "start <= end"),
        ({"total_steps": 10, "shape": "exp"}, "shape"),
    ]:
        with pytest.raises(ConfigError, match=match):
            TemperatureSchedule(**kwargs)
    with pytest.raises(ConfigError, match="step must be >= 0"):
        TemperatureSchedule(total_steps=10).temperature(-1)


# --------------------------------------------------------------------------- sampler


def test_empirical_frequencies_match_the_scheduled_probabilities_at_start_and_end():
    sch = TemperatureSchedule(total_steps=200, t_start=5.0, t_end=1.0, start=0.3, end=0.7)
    sources, _ = schedule_indices(SIZES, sch, examples_per_step=64, seed=0)
    per_step = sources.view(200, 64)
    for window, T in ((per_step[:60], 5.0), (per_step[140:], 1.0)):
        window = window.reshape(-1)
        counts = [int((window == i).sum()) for i in range(3)]
        probs = list(temperature_weights(SIZES, T).values())
        assert chi2(counts, probs) < CHI2_DF2_999, (T, counts, probs)
    # and the two windows differ clearly: the test can tell T=5 from T=1
    start = per_step[:60].reshape(-1)
    counts = [int((start == i).sum()) for i in range(3)]
    assert chi2(counts, list(temperature_weights(SIZES, 1.0).values())) > 100


def test_sampler_indices_are_valid_epoch_style_and_deterministic():
    sch = TemperatureSchedule(total_steps=50, t_start=10.0, t_end=2.0)
    sampler = ScheduledMixSampler(SIZES, sch, examples_per_step=32, seed=1)
    idx = list(sampler)
    assert len(idx) == len(sampler) == 50 * 32
    assert idx == list(sampler) == list(ScheduledMixSampler(SIZES, sch, 32, seed=1))
    assert idx != list(ScheduledMixSampler(SIZES, sch, 32, seed=2))
    offsets = {"en": 0, "ny": 10_000, "sw": 10_500}
    for i, (name, n) in enumerate(SIZES.items()):
        rows = [k - offsets[name] for k, s in zip(idx, sampler.sources.tolist()) if s == i]
        assert all(0 <= r < n for r in rows)
        # epoch-style: every example of a source is used floor(m/n) or ceil(m/n) times
        uses = torch.bincount(torch.tensor(rows), minlength=n)
        assert int(uses.max()) - int(uses.min()) <= 1
    # the small source is heavily repeated (upsampled), the large one is not
    sw = [k for k, s in zip(idx, sampler.sources.tolist()) if s == 2]
    assert len(sw) > 2 * SIZES["sw"]


def test_zero_size_sources_are_never_drawn():
    sch = TemperatureSchedule(total_steps=20, t_start=100.0, t_end=1.0)
    sources, _ = schedule_indices({"a": 50, "empty": 0, "b": 3}, sch, examples_per_step=16)
    assert 1 not in sources.tolist() and set(sources.tolist()) == {0, 2}


def test_sampler_and_dataset_reject_bad_input():
    sch = TemperatureSchedule(total_steps=5)
    with pytest.raises(ConfigError, match="examples_per_step"):
        schedule_indices(SIZES, sch, examples_per_step=0)
    with pytest.raises(ConfigError, match="num_steps"):
        schedule_indices(SIZES, sch, examples_per_step=4, num_steps=0)
    with pytest.raises(ConfigError, match="non-empty"):
        schedule_indices({"a": 0}, sch, examples_per_step=4)
    with pytest.raises(ConfigError, match="int >= 0"):
        schedule_indices({"a": -3}, sch, examples_per_step=4)
    with pytest.raises(ConfigError, match="mapping"):
        ScheduledMixSampler({}, sch, 4)
    with pytest.raises(ConfigError, match="mapping"):
        ScheduledMixDataset([], sch, 4)
    ds = ScheduledMixDataset({"a": [1, 2, 3]}, sch, 2, tag_source="src")
    with pytest.raises(ConfigError, match="dict examples"):
        list(ds)
    loader = torch.utils.data.DataLoader(ScheduledMixDataset({"a": [1, 2, 3]}, sch, 2), num_workers=2)
    with pytest.raises(Exception, match="replay"):
        list(loader)


def test_dataset_yields_the_sampler_stream():
    data = {name: [{"lang": name, "row": r} for r in range(n)] for name, n in {"a": 30, "b": 4}.items()}
    sch = TemperatureSchedule(total_steps=10, t_start=8.0, t_end=1.0)
    ds = ScheduledMixDataset(data, sch, examples_per_step=6, seed=3, tag_source="source_id")
    concat, sampler = ScheduledMixSampler.for_datasets(data, sch, examples_per_step=6, seed=3)
    got = list(ds)
    assert len(got) == len(ds) == 60
    assert [{k: v for k, v in ex.items() if k != "source_id"} for ex in got] == [concat[i] for i in sampler]
    assert all(ex["source_id"] == ["a", "b"].index(ex["lang"]) for ex in got)
    assert "source_id" not in data["a"][0]  # the source datasets are not modified


def test_hf_trainer_consumes_the_scheduled_stream(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tests.conftest import tiny_gpt2

    g = torch.Generator().manual_seed(0)
    data = {
        name: [{"input_ids": torch.randint(lo, lo + 60, (8,), generator=g), "src": i} for _ in range(n)]
        for i, (name, n, lo) in enumerate([("en", 200, 1), ("ny", 10, 64)])
    }
    sch = TemperatureSchedule(total_steps=3, t_start=20.0, t_end=1.0)
    ds = ScheduledMixDataset(data, sch, examples_per_step=8)  # batch 4 x accumulation 2
    seen = []

    def collate(examples):
        seen.extend(ex["src"] for ex in examples)
        ids = torch.stack([ex["input_ids"] for ex in examples])
        return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=ds, data_collator=collate).train()
    assert seen == ds.sources[:24].tolist()
    assert 0 < seen.count(1) < 24  # both languages were trained on


# --------------------------------------------------------------------------- upweighting


def test_upweighting_has_the_expected_loss_of_temperature_sampling():
    T = 3.0
    losses = {"en": 1.0, "ny": 4.0, "sw": 9.0}  # planted per-source losses
    p = temperature_weights(SIZES, T)
    w = upweight_weights(SIZES, T)
    q = {k: n / sum(SIZES.values()) for k, n in SIZES.items()}
    target = sum(p[k] * losses[k] for k in SIZES)
    # exactly: E_q[w L] = E_p[L] and E_q[w] = 1
    assert sum(q[k] * w[k] * losses[k] for k in SIZES) == pytest.approx(target, rel=1e-12)
    assert sum(q[k] * w[k] for k in SIZES) == pytest.approx(1.0, rel=1e-12)
    # in expectation over real draws: natural sampling + upweighting vs temperature sampling
    L = torch.tensor([losses[k] for k in SIZES], dtype=torch.float64)
    W = torch.tensor([w[k] for k in SIZES], dtype=torch.float64)
    natural, _ = schedule_indices(SIZES, TemperatureSchedule(400, t_start=1.0, t_end=1.0), 100, seed=0)
    tempered, _ = schedule_indices(SIZES, TemperatureSchedule(400, t_start=T, t_end=T), 100, seed=0)
    up = upweighted_loss(L[natural], natural, W)
    down = L[tempered].mean()
    assert float(up) == pytest.approx(target, rel=0.05)
    assert float(down) == pytest.approx(target, rel=0.02)
    assert w["sw"] > w["ny"] > 1 > w["en"] and upweight_weights({"a": 5, "b": 0}, T)["b"] == 0.0


def test_per_example_lm_loss_and_upweighted_lm_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[1, 3:] = -100
    labels[2, 1:] = -100  # no target token after the shift
    per = per_example_lm_loss(logits, labels)
    ref0 = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:])
    ref1 = torch.nn.functional.cross_entropy(logits[1, :2], labels[1, 1:3])
    assert torch.allclose(per, torch.stack([ref0, ref1, torch.tensor(0.0)]), atol=1e-6)
    weights = torch.tensor([0.5, 2.0])
    src = torch.tensor([1, 0, 1])
    got = upweighted_lm_loss(logits, labels, src, weights)
    assert torch.allclose(got, (2.0 * ref0 + 0.5 * ref1 + 0.0) / 3, atol=1e-6)
    with pytest.raises(ConfigError, match="index the 2 weights"):
        upweighted_loss(per, torch.tensor([0, 2, 1]), weights)
    with pytest.raises(ConfigError, match=r"\(batch,\)"):
        upweighted_loss(per, torch.tensor([0, 1]), weights)
    with pytest.raises(ConfigError, match=r"\(B, T, V\)"):
        per_example_lm_loss(logits[0], labels[0])
