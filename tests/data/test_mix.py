"""Seeded block mixing and temperature sampling weights (arXiv:2410.04579)."""

import math

import pytest
import torch

from lorakit.data import mix_blocks, temperature_weights
from lorakit.errors import ConfigError


def _source(offset: int, n_blocks: int, block: int = 4) -> torch.Tensor:
    """Blocks whose first value identifies source (offset) and block (row)."""
    return (offset + torch.arange(n_blocks)).unsqueeze(1).repeat(1, block)


SOURCES = {"en": _source(0, 100), "ny": _source(1000, 7)}


def test_mix_is_deterministic_and_seed_dependent():
    a = mix_blocks(SOURCES, {"en": 1.0, "ny": 1.0}, n=64, seed=3)
    b = mix_blocks(SOURCES, {"en": 1.0, "ny": 1.0}, n=64, seed=3)
    c = mix_blocks(SOURCES, {"en": 1.0, "ny": 1.0}, n=64, seed=4)
    assert a.shape == (64, 4) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mix_ignores_dict_order():
    reordered = {"ny": SOURCES["ny"], "en": SOURCES["en"]}
    assert torch.equal(
        mix_blocks(SOURCES, {"en": 2, "ny": 1}, 50, seed=0),
        mix_blocks(reordered, {"ny": 1, "en": 2}, 50, seed=0),
    )


def test_mix_proportions_follow_weights():
    out = mix_blocks(SOURCES, {"en": 3.0, "ny": 1.0}, n=20000, seed=0)
    frac_ny = (out[:, 0] >= 1000).double().mean().item()
    assert abs(frac_ny - 0.25) < 0.015  # binomial sd ~0.003


def test_mix_repeats_small_source_evenly():
    out = mix_blocks(SOURCES, {"ny": 1.0}, n=7 * 10 + 3, seed=1)
    counts = torch.bincount(out[:, 0] - 1000, minlength=7)
    assert counts.max() - counts.min() <= 1  # whole epochs, then part of one more
    assert torch.equal(out[:, 0].unsqueeze(1).expand(-1, 4), out)  # rows copied intact


def test_mix_zero_weight_and_missing_weight_not_drawn():
    out = mix_blocks(SOURCES, {"en": 0.0, "ny": 1.0}, n=200, seed=0)
    assert (out[:, 0] >= 1000).all()
    assert (mix_blocks(SOURCES, {"en": 1.0}, n=50, seed=0)[:, 0] < 1000).all()
    assert mix_blocks(SOURCES, {"en": 1.0}, n=0, seed=0).shape == (0, 4)


@pytest.mark.parametrize(
    "sources, weights, n, message",
    [
        (SOURCES, {"fr": 1.0}, 5, "unknown source 'fr'"),
        (SOURCES, {"en": -1.0}, 5, "must be a finite number >= 0"),
        (SOURCES, {"en": float("nan")}, 5, "must be a finite number >= 0"),
        (SOURCES, {"en": 0.0, "ny": 0.0}, 5, "at least one weight"),
        (SOURCES, {"en": 1.0}, -1, "n must be >= 0"),
        ({"a": _source(0, 3, 4), "b": _source(9, 3, 8)}, {"a": 1, "b": 1}, 5, "different block sizes"),
        ({"a": _source(0, 0)}, {"a": 1}, 5, "non-empty"),
    ],
)
def test_mix_errors(sources, weights, n, message):
    with pytest.raises(ConfigError, match=message):
        mix_blocks(sources, weights, n, seed=0)


def test_temperature_weights_math():
    sizes = {"en": 10000, "sw": 900, "ny": 100, "empty": 0}
    p1 = temperature_weights(sizes, T=1.0)
    assert p1["en"] == pytest.approx(10000 / 11000) and p1["empty"] == 0.0
    p2 = temperature_weights(sizes, T=2.0)  # sqrt: 100, 30, 10
    assert [p2[k] for k in ("en", "sw", "ny")] == pytest.approx([100 / 140, 30 / 140, 10 / 140])
    uniform = temperature_weights(sizes, T=math.inf)
    assert [uniform[k] for k in ("en", "sw", "ny")] == pytest.approx([1 / 3] * 3)
    for T in (0.5, 1.0, 3.0, 100.0):
        assert sum(temperature_weights(sizes, T).values()) == pytest.approx(1.0)
    # higher T always moves mass toward the smallest source
    assert p1["ny"] < p2["ny"] < temperature_weights(sizes, T=5.0)["ny"] < 1 / 3


def test_temperature_weights_no_overflow():
    p = temperature_weights({"big": 10**12, "small": 10}, T=0.05)  # n^(1/T) = 1e240 and beyond
    assert p["big"] == pytest.approx(1.0) and p["small"] >= 0.0


@pytest.mark.parametrize(
    "sizes, T, message",
    [
        ({"a": 1}, 0.0, "must be > 0"),
        ({"a": 1}, -2.0, "must be > 0"),
        ({"a": 1}, float("nan"), "must be > 0"),
        ({"a": -1}, 1.0, "sizes must be >= 0"),
        ({"a": 0}, 1.0, "non-empty"),
    ],
)
def test_temperature_weights_errors(sizes, T, message):
    with pytest.raises(ConfigError, match=message):
        temperature_weights(sizes, T)
