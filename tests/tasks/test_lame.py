"""LAME (arXiv:2201.05718): conservative when it has no neighbours, fixes label-shift errors
of a biased classifier, converges to a fixed point of its update, errors on bad input."""

import itertools

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.tasks import (
    LameConfig,
    LameStream,
    affinity_matrix,
    lame,
    lame_energy,
    lame_solve,
    laplacian_optimization,
)


def batch(n=32, k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(n, k, generator=g).mul(2).softmax(-1)
    feats = torch.randn(n, d, generator=g)
    return probs, feats


def shifted_stream(n_batches=8, size=64, k=4, d=16, seed=0):
    """Label shift: each batch holds 2 of the 4 classes. Features cluster by class; the
    classifier is noisy and biased towards class 0 (a shifted source prior)."""
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.eye(k, d)
    bias = torch.tensor([1.5] + [0.0] * (k - 1))
    for _ in range(n_batches):
        present = torch.randperm(k, generator=g)[:2]
        y = present[torch.randint(0, 2, (size,), generator=g)]
        feats = means[y] + torch.randn(size, d, generator=g)
        logits = 2.0 * torch.nn.functional.one_hot(y, k) + torch.randn(size, k, generator=g) + bias
        yield logits.softmax(-1), feats, y


# -- conservative: no neighbours, no change ---------------------------------------------
def test_no_neighbours_leaves_predictions_unchanged():
    probs, feats = batch(n=1)
    assert torch.allclose(lame(probs, feats), probs, atol=1e-7)  # kNN in a batch of one: W = 0
    probs, _ = batch(n=16)
    z = lame(probs, kernel=torch.zeros(16, 16))
    assert torch.allclose(z, probs, atol=1e-7)
    sol = lame_solve(probs, kernel=torch.zeros(16, 16))
    assert sol.converged and sol.iterations == 1


def test_lame_changes_predictions_when_neighbours_agree():
    probs, feats = batch()
    z = lame(probs, feats)
    assert not torch.allclose(z, probs, atol=1e-3)
    assert torch.all(z >= 0) and torch.allclose(z.sum(-1), torch.ones(len(z)), atol=1e-6)


# -- the paper's claim: better accuracy under label shift ----------------------------------
@pytest.mark.parametrize("affinity", ["knn", "linear"])
def test_label_shift_stream_accuracy_improves(affinity):
    stream = LameStream(affinity=affinity)
    outs = list(stream.run(shifted_stream()))
    acc = stream.accuracy()
    assert len(outs) == stream.batches == 8 and stream.examples == 8 * 64
    assert acc["base"] < 0.75  # the classifier really is biased
    assert acc["lame"] > acc["base"] + 0.15, acc
    assert stream.unconverged == 0 and max(stream.iterations) < 100


# -- the math ------------------------------------------------------------------------------
@pytest.mark.parametrize("affinity", ["knn", "rbf", "linear"])
def test_fixed_point_satisfies_update(affinity):
    probs, feats = batch(seed=3)
    cfg = LameConfig(affinity=affinity, tol=1e-8, max_iter=500)
    sol = lame_solve(probs.double(), feats.double(), cfg)
    assert sol.converged
    f = torch.nn.functional.normalize(feats.double(), dim=-1)
    w = affinity_matrix(f, affinity, cfg.knn)
    rhs = (torch.log(probs.double().clamp_min(cfg.eps)) + w @ sol.z).softmax(-1)  # z = softmax(log p + W z)
    assert torch.allclose(sol.z, rhs, atol=1e-7)


def test_energy_decreases_monotonically_for_psd_affinity():
    # CCCP guarantee: with a symmetric PSD W (linear affinity) every update lowers E(z)
    probs, feats = batch(n=24, seed=5)
    f = torch.nn.functional.normalize(feats.double(), dim=-1)
    w = affinity_matrix(f, "linear")
    log_p = probs.double().log()
    energies = [lame_energy(probs.double(), log_p, w).item()]
    for steps in range(1, 15):
        energies.append(lame_energy(laplacian_optimization(log_p, w, max_iter=steps, tol=0).z, log_p, w).item())
    assert all(b <= a + 1e-10 for a, b in itertools.pairwise(energies)), energies
    assert energies[-1] < energies[0] - 1e-3


def test_affinities_follow_the_reference():
    feats = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    feats[3] = feats[7]  # identical features: self must still be excluded from kNN
    w = affinity_matrix(feats, "knn", knn=3)
    assert torch.equal(w.sum(-1), torch.full((10,), 3.0)) and torch.all(w.diag() == 0)
    assert w[3, 7] == 1 and w[7, 3] == 1
    assert torch.allclose(affinity_matrix(feats, "linear"), feats @ feats.T)
    dist = torch.cdist(feats, feats)
    sigma = dist.topk(3, largest=False).values[:, -1].mean()  # 3rd nearest counting self
    assert torch.allclose(affinity_matrix(feats, "rbf", knn=3), torch.exp(-dist**2 / (2 * sigma**2)))
    assert torch.equal(affinity_matrix(feats[:1], "knn"), torch.zeros(1, 1))


def test_force_symmetry_uses_symmetrised_knn():
    probs, feats = batch(seed=4)
    w = affinity_matrix(torch.nn.functional.normalize(feats, dim=-1), "knn", 5)
    assert not torch.equal(w, w.T)
    assert torch.allclose(lame(probs, feats, force_symmetry=True), lame(probs, kernel=(w + w.T) / 2), atol=1e-6)


def test_deterministic_and_dtype_preserving():
    probs, feats = batch(seed=2)
    assert torch.equal(lame(probs, feats), lame(probs, feats))
    a, b = LameStream(), LameStream()
    for x, y in zip(a.run(shifted_stream(2)), b.run(shifted_stream(2)), strict=True):
        assert torch.equal(x, y)
    assert lame(probs.double(), feats.double()).dtype == torch.float64
    z16 = lame(probs.half(), feats.half())
    assert z16.dtype == torch.float16 and torch.allclose(z16.float(), lame(probs, feats), atol=2e-3)


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("make, msg", [
    (lambda p, f: (p[0], f), r"2-D \(n, K\)"),
    (lambda p, f: ((p * 100).long(), f), "floating point"),
    (lambda p, f: (p.log(), f), "non-negative"),
    (lambda p, f: (p * 2, f), "row 0 sums to 2"),
    (lambda p, f: (torch.full_like(p, float("nan")), f), "NaN"),
    (lambda p, f: (p, f[:-1]), "n = 32 rows"),
    (lambda p, f: (p, f[0]), r"2-D \(n, D\)"),
    (lambda p, f: (p, None), "needs features"),
])
def test_bad_inputs(make, msg):
    probs, feats = batch()
    p, f = make(probs, feats)
    with pytest.raises(ValueError, match=msg):
        lame(p, f)


def test_bad_kernel():
    probs, feats = batch()
    with pytest.raises(ValueError, match=r"\(n, n\) = \(32, 32\)"):
        lame(probs, kernel=torch.zeros(31, 32))
    with pytest.raises(ValueError, match="not both"):
        lame(probs, feats, kernel=torch.zeros(32, 32))
    with pytest.raises(ValueError, match="NaN or inf"):
        lame(probs, kernel=torch.full((32, 32), float("inf")))


@pytest.mark.parametrize("kw, msg", [
    ({"affinity": "cosine"}, "affinity must be one of"),
    ({"knn": 0}, "knn must be a positive integer"),
    ({"max_iter": 2.5}, "max_iter must be a positive integer"),
    ({"tol": -1.0}, "tol must be a positive number"),
    ({"eps": 0}, "eps must be a positive number"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LameConfig(**kw)


def test_stream_errors_and_conflicting_settings():
    probs, feats = batch()
    with pytest.raises(ConfigError, match="not both"):
        lame(probs, feats, LameConfig(), knn=3)
    with pytest.raises(ConfigError, match="not both"):
        LameStream(LameConfig(), knn=3)
    stream = LameStream()
    assert stream.accuracy() is None
    with pytest.raises(ValueError, match="stream item 0"):
        list(stream.run([probs]))
    with pytest.raises(ValueError, match=r"labels must have shape \(32,\)"):
        stream.step(probs, feats, torch.zeros(31, dtype=torch.long))
    with pytest.raises(ConfigError, match="affinity must be one of"):
        affinity_matrix(feats, "cosine")
