"""Adapt-∞ lite (arXiv:2410.10636): skill clusters of gradient features, SemDeDup pruning,
budgets and per-skill sampling."""

import pytest
import torch

import lorakit
from lorakit.data.adapt_inf import (
    AdaptInfConfig,
    adapt_inf_select,
    ccs_sample,
    cluster_budgets,
    hist_entropy,
    kmeans,
    redundancy,
    semdedup,
)
from lorakit.data.less import collect_features
from lorakit.errors import ConfigError
from lorakit.methods.lora import LoraConfig
from tests.conftest import randomize, tiny_llama


def _blobs(sizes=(30, 20, 12, 6), d=16, noise=0.15, seed=0):
    """Unit vectors around len(sizes) random directions; returns (x, planted labels)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(len(sizes), d, generator=g), dim=1)
    x = torch.cat([dirs[k] + noise * torch.randn(s, d, generator=g) for k, s in enumerate(sizes)])
    perm = torch.randperm(len(x), generator=g)
    labels = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    return torch.nn.functional.normalize(x, dim=1)[perm], labels[perm]


def _same_partition(a, b):
    pairs = {(int(i), int(j)) for i, j in zip(a, b)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_planted_skills_deterministically():
    x, truth = _blobs()
    labels, centers, inertia = kmeans(x, 4, seed=0)
    assert _same_partition(labels, truth)
    assert centers.shape == (4, 16)
    ref = sum(((x[labels == k] - x[labels == k].mean(0)) ** 2).sum() for k in range(4))
    assert inertia == pytest.approx(float(ref), rel=1e-5)
    again = kmeans(x, 4, seed=0)
    assert torch.equal(again[0], labels) and torch.equal(again[1], centers)
    with pytest.raises(ConfigError, match="n >= k=100"):
        kmeans(x, 100)


def test_kmeans_matches_sklearn_inertia():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x, _ = _blobs(sizes=(40, 25, 25, 10, 10), noise=0.4, seed=3)
    ours = kmeans(x, 5, seed=0)[2]
    theirs = sklearn_cluster.KMeans(5, n_init=10, random_state=0).fit(x.double().numpy()).inertia_
    assert ours <= theirs * 1.02


def test_cluster_budgets_water_fill_and_sum_exactly():
    assert cluster_budgets([2, 10, 50], 30) == [2, 10, 18]  # 10 each; 2 < 10, then 10 < 14
    assert cluster_budgets([2, 40, 50], 31) == [2, 14, 15]  # the remainder goes to the largest
    assert cluster_budgets([20, 20, 20], 7) == [3, 2, 2]
    assert cluster_budgets([1, 2, 3], 100) == [1, 2, 3]  # never more than a cluster holds
    for sizes, b in [([5, 0, 9, 30], 17), ([3] * 7, 20), ([100, 1], 50)]:
        out = cluster_budgets(sizes, b)
        assert sum(out) == min(b, sum(sizes)) and all(0 <= o <= s for o, s in zip(out, sizes))
    with pytest.raises(ConfigError, match="budget must be an integer"):
        cluster_budgets([3], -1)


def test_semdedup_prunes_near_duplicates_first():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(10, 32, generator=g), dim=1)
    dups = base[:4] + 1e-3 * torch.randn(4, 32, generator=g)  # later near-copies of 0..3
    x = torch.cat([base, dups])
    m = redundancy(x)
    assert m[0] == -float("inf") and (m[10:] > 0.99).all() and (m[:10] < 0.9).all()
    full = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    ref = torch.stack([full[:j, j].max() for j in range(1, 14)])
    torch.testing.assert_close(redundancy(x, chunk=3)[1:], ref)  # chunking does not change M
    labels = torch.zeros(14, dtype=torch.long)
    assert semdedup(x, labels, [10]).tolist() == list(range(10))  # every duplicate is pruned


def test_entropy_picks_the_spread_out_score_and_ccs_covers_the_range():
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(200, generator=g)
    spiky = torch.zeros(200)
    spiky[:3] = torch.tensor([5.0, -5.0, 9.0])
    assert hist_entropy(spread) > hist_entropy(spiky) + 2
    assert hist_entropy(torch.ones(5)) == 0.0
    picked = ccs_sample(spread, 20, bins=10, seed=0)
    assert len(picked) == 20 == len(set(picked.tolist()))
    lo, hi = spread.quantile(0.05), spread.quantile(0.95)
    hist = torch.histc(spread[picked], bins=10, min=float(lo), max=float(hi))
    assert (hist >= 1).all()  # every score bin is covered (lowest-k would sit in the first)
    assert torch.equal(picked, ccs_sample(spread, 20, bins=10, seed=0))
    assert len(ccs_sample(torch.zeros(30), 12, seed=1)) == 12  # tops up when bins are empty


def test_adapt_inf_select_per_skill():
    x, truth = _blobs(sizes=(60, 30, 10), seed=1)
    n = len(x)
    res = adapt_inf_select(x, config=AdaptInfConfig(n_clusters=3, fraction=0.3))
    assert len(res.indices) == 30 and _same_partition(res.labels, truth)
    # budgets 10 / 10 / 10: the rare skill is not drowned by the common one
    assert torch.bincount(truth[res.indices], minlength=3).tolist() == [10, 10, 10]
    g = torch.Generator().manual_seed(2)
    scores = {"flat": torch.zeros(n), "loss": torch.rand(n, generator=g)}
    scores["flat"][0] = 1.0
    cfg = AdaptInfConfig(n_clusters=3, prune_fraction=0.5, fraction=0.2, sampler="lowest")
    res2 = adapt_inf_select(x, scores, cfg)
    assert len(res2.pool) == 50 and len(res2.indices) == 20
    assert set(res2.indices.tolist()) <= set(res2.pool.tolist())
    assert res2.scorer == ["loss"] * 3  # the spread-out score wins everywhere
    assert torch.equal(adapt_inf_select(x, scores, cfg).indices, res2.indices)
    with pytest.raises(ConfigError, match="has 3 values for 100"):
        adapt_inf_select(x, {"s": torch.zeros(3)}, cfg)
    with pytest.raises(ConfigError, match="exceeds the number of examples"):
        adapt_inf_select(x[:2], config=AdaptInfConfig(n_clusters=3))


def test_adapt_inf_on_less_gradient_features(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target=["q_proj", "v_proj"]), name="less")
    randomize(model, "less", seed=1)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1 + 64 * (i % 2), 64 + 64 * (i % 2), (8,), generator=g)} for i in range(24)]
    store = collect_features(model, data, tmp_path / "f", proj_dim=128, grad_batch_size=12, shard_size=12,
                             dtype="float32")
    res = adapt_inf_select(store, config=AdaptInfConfig(n_clusters=2, fraction=0.25))
    assert len(res.indices) == 6 and res.labels.shape == (24,)
    assert torch.equal(adapt_inf_select(store, config=AdaptInfConfig(n_clusters=2, fraction=0.25)).indices,
                       res.indices)


def test_config_validation():
    for bad, match in [({"n_clusters": 0}, "n_clusters"), ({"fraction": 0}, "fraction must be in"),
                       ({"prune_fraction": 0.01, "fraction": 0.1}, "prune_fraction"),
                       ({"sampler": "best"}, "sampler must be one of"), ({"tol": -1.0}, "tol")]:
        with pytest.raises(ConfigError, match=match):
            AdaptInfConfig(**bad)
