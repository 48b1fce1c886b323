"""lorakit.ops.merge: exact concatenation, SVD truncation without dense products, TIES / DARE /
magnitude pruning against independent NumPy references, model soups, argument errors."""

import itertools

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lorakit.errors import ConfigError
from lorakit.ops import merge as M


def rand_factors(ranks, d_out=12, d_in=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for r in ranks]


def dense_sum(factors, weights):
    return sum(w * (b @ a) for (a, b), w in zip(factors, weights))


# -- exact methods ----------------------------------------------------------------------
@pytest.mark.parametrize("fn", [M.cat, M.task_arithmetic])
def test_cat_is_the_exact_weighted_sum(fn):
    f = rand_factors([2, 3, 5])
    w = [0.5, -1.5, 2.0]  # a negative weight subtracts
    a, b = fn(f, w)
    assert a.shape == (10, 10) and b.shape == (12, 10)  # rank Σ r_i = 10
    torch.testing.assert_close(b @ a, dense_sum(f, w), rtol=0, atol=1e-5)


def test_linear_is_the_weighted_average():
    f = rand_factors([2, 4])
    a, b = M.linear(f, [1.0, 3.0])
    torch.testing.assert_close(b @ a, dense_sum(f, [0.25, 0.75]), rtol=0, atol=1e-5)


# -- svd ------------------------------------------------------------------------------------
def test_svd_error_decreases_with_rank_and_is_eckart_young():
    f = rand_factors([3, 4, 2], d_out=16, d_in=14)
    w = [1.0, 0.7, -0.4]
    target = dense_sum(f, w)
    sigma = torch.linalg.svdvals(target)
    errors = []
    for k in range(1, 10):
        a, b = M.svd(f, w, k)
        assert a.shape[0] == b.shape[1] == k
        err = torch.linalg.norm(b @ a - target).item()
        # the best rank-k error is √(Σ_{i>k} σ_i²) (Eckart–Young)
        assert err == pytest.approx(sigma[k:].square().sum().sqrt().item(), abs=1e-4)
        errors.append(err)
    assert all(e2 <= e1 + 1e-6 for e1, e2 in itertools.pairwise(errors))
    assert errors[0] > errors[4] > 1e-2 and errors[-1] < 1e-4  # rank Σ r_i = 9 is exact


class _RecordShapes(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_svd_never_forms_the_dense_product():
    d_out, d_in = 300, 200
    f = rand_factors([4, 4], d_out=d_out, d_in=d_in)
    with _RecordShapes() as rec:
        a, b = M.svd(f, [1.0, 1.0], 6)
    assert (d_out, d_in) not in rec.shapes and rec.shapes  # every intermediate is low-rank
    target = dense_sum(f, [1.0, 1.0])
    ref = torch.linalg.svd(target)
    torch.testing.assert_close(b @ a, (ref.U[:, :6] * ref.S[:6]) @ ref.Vh[:6], rtol=0, atol=1e-3)


def test_svd_rank_above_the_available_rank_is_exact():
    f = rand_factors([2, 1])
    a, b = M.svd(f, [1.0, 2.0], 50)
    assert a.shape[0] == 3
    torch.testing.assert_close(b @ a, dense_sum(f, [1.0, 2.0]), rtol=0, atol=1e-4)


# -- independent NumPy references -------------------------------------------------------
def np_trim(t, density):
    flat = t.reshape(-1).copy()
    k = int(density * flat.size)
    order = np.argsort(-np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(t.shape)


def np_disjoint(tvs, weights, sign_method="total"):
    tvs = np.stack(tvs)
    votes = tvs.sum(0) if sign_method == "total" else np.sign(tvs).sum(0)
    elected = np.where(votes >= 0, 1.0, -1.0)
    out = np.zeros(tvs.shape[1:])
    for idx in np.ndindex(*tvs.shape[1:]):  # the paper's per-parameter definition, one entry at a time
        agree = [i for i in range(len(tvs)) if np.sign(tvs[i][idx]) == elected[idx]]
        if agree:
            out[idx] = sum(weights[i] * tvs[i][idx] for i in agree) / len(agree)
    return out


def np_ties(deltas, weights, density, sign_method="total"):
    return np_disjoint([np_trim(d, density) for d in deltas], weights, sign_method)


def deltas_of(f):
    return [(b @ a).double().numpy() for a, b in f]


@pytest.mark.parametrize("density,sign", [(0.3, "total"), (0.5, "frequency"), (1.0, "total")])
def test_ties_matches_the_reference(density, sign):
    f = rand_factors([2, 3, 4], d_out=8, d_in=6)
    w = [1.0, 0.5, 0.8]
    ref = np_ties(deltas_of(f), w, density, sign)
    dense = M.ties_dense(M.dense(f), w, density, sign)
    np.testing.assert_allclose(dense.numpy(), ref, atol=1e-5)
    a, b = M.ties(f, w, density, rank=6, majority_sign=sign)  # rank min(d_out, d_in): no truncation
    np.testing.assert_allclose((b @ a).numpy(), ref, atol=1e-4)
    a4, b4 = M.ties(f, w, density, rank=4, majority_sign=sign)  # truncated: the best rank-4 part of it
    u, s, vh = np.linalg.svd(ref)
    np.testing.assert_allclose((b4 @ a4).numpy(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-4)


def test_magnitude_prune_matches_the_reference():
    f = rand_factors([2, 2], d_out=7, d_in=9)
    w = [0.6, -1.2]
    ref = sum(wi * np_trim(d, 0.25) for d, wi in zip(deltas_of(f), w))
    np.testing.assert_allclose(M.magnitude_prune_dense(M.dense(f), w, 0.25).numpy(), ref, atol=1e-5)
    kept = M.magnitude_mask(M.dense(f)[0], 0.25)
    assert int((kept != 0).sum()) == int(0.25 * 63)
    a, b = M.magnitude_prune(f, w, 0.25, rank=7)
    np.testing.assert_allclose((b @ a).numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("variant", ["linear", "ties"])
def test_dare_matches_the_reference(variant):
    f = rand_factors([3, 2], d_out=8, d_in=6)
    w, density = [1.0, 0.5], 0.4
    # the reference draws its own masks from a generator with the same seed, in the same order
    g = torch.Generator().manual_seed(7)
    masks = [torch.bernoulli(torch.full((8, 6), density), generator=g).double().numpy() for _ in f]
    rescaled = [d * m / density for d, m in zip(deltas_of(f), masks)]
    ref = sum(wi * r for wi, r in zip(w, rescaled)) if variant == "linear" else np_disjoint(rescaled, w)
    a, b = M.dare(f, w, density, rank=6, variant=variant, seed=7)
    np.testing.assert_allclose((b @ a).numpy(), ref, atol=1e-4)
    a2, b2 = M.dare(f, w, density, rank=6, variant=variant, seed=7)  # seeded: reproducible
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=0, atol=0)
    a3, b3 = M.dare(f, w, density, rank=6, variant=variant, seed=8)
    assert not torch.allclose(b3 @ a3, b @ a)


def test_dare_drop_keeps_density_and_is_unbiased():
    t = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    out = M.dare_drop(t, 0.3, g)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(out[kept], t[kept] / 0.3)  # survivors rescaled by 1 / (1 − p)
    mean = torch.stack([M.dare_drop(t, 0.3, g) for _ in range(400)]).mean(0)
    assert (mean - t).abs().mean() < 0.1 * t.abs().mean()  # E[drop(t)] = t
    torch.testing.assert_close(M.dare_drop(t, 1.0, g), t)  # density 1: nothing dropped


def test_dare_density_one_is_task_arithmetic():
    f = rand_factors([2, 3])
    a, b = M.dare(f, [1.0, 2.0], 1.0, rank=10)
    torch.testing.assert_close(b @ a, dense_sum(f, [1.0, 2.0]), rtol=0, atol=1e-4)


def test_combine_dispatches_and_defaults_rank_to_max_r():
    f = rand_factors([2, 3])
    for method, kw in [("svd", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                       ("magnitude_prune", {"density": 0.5})]:
        a, b = M.combine(method, f, [1.0, 1.0], **kw)
        assert a.shape[0] == b.shape[1] == 3, method  # PEFT's default: max r_i
    a, b = M.combine("cat", f, [1.0, 1.0])
    assert a.shape[0] == 5


# -- soups -----------------------------------------------------------------------------------
def test_soup_is_the_weighted_average_of_weights():
    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(3, 4, generator=g), "h": torch.randn(2, generator=g).half(),
            "ids": torch.arange(5)} for _ in range(3)]
    out = M.soup(sds)
    torch.testing.assert_close(out["w"], sum(sd["w"] for sd in sds) / 3)
    assert out["h"].dtype == torch.float16 and torch.equal(out["ids"], torch.arange(5))
    out = M.soup(sds, [1.0, 0.0, 3.0])
    torch.testing.assert_close(out["w"], (sds[0]["w"] + 3 * sds[2]["w"]) / 4)


def test_soup_errors():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ConfigError, match="different keys"):
        M.soup([a, {"v": torch.zeros(2)}])
    with pytest.raises(ConfigError, match="shape"):
        M.soup([a, {"w": torch.zeros(3)}])
    with pytest.raises(ConfigError, match="2 weights for 1"):
        M.soup([a], [1.0, 2.0])
    with pytest.raises(ConfigError, match="sum to 0"):
        M.soup([a, a], [1.0, -1.0])
    with pytest.raises(ConfigError, match="non-floating"):
        M.soup([{"i": torch.tensor([1])}, {"i": torch.tensor([2])}])
    with pytest.raises(ConfigError, match="at least one"):
        M.soup([])


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"method": "mean"}, "unknown merge method 'mean'"),
    ({"weights": [1.0]}, "got 1 weights for 2 adapters"),
    ({"weights": [1.0, float("nan")]}, "finite"),
    ({"method": "svd", "rank": 0}, "rank must be a positive integer, got 0"),
    ({"method": "svd", "rank": -2}, "rank must be a positive integer"),
    ({"method": "cat", "rank": 4}, "exact .* takes no rank"),
    ({"method": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
    ({"method": "dare_linear", "density": 1.5}, r"density must be in \(0, 1\]"),
    ({"method": "ties"}, "needs density"),
    ({"method": "svd", "density": 0.5}, "density only applies"),
    ({"method": "linear", "weights": [1.0, -1.0]}, "sum to 0"),
    ({"method": "ties", "density": 0.5, "majority_sign": "max"}, "majority_sign"),
])
def test_argument_errors(kwargs, match):
    f = rand_factors([2, 2])
    kw = {"method": "cat", "weights": [1.0, 1.0]} | kwargs
    with pytest.raises(ConfigError, match=match):
        M.combine(kw.pop("method"), f, kw.pop("weights"), **kw)
