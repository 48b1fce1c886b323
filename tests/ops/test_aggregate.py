"""Aggregation of client LoRA factors (FLoRA arXiv:2409.05976, FedAvg) and sparse uploads (CELLM)."""

import math

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.ops.aggregate import (
    AggregationError,
    SparseUpdate,
    bytes_of,
    cross_terms,
    densify,
    fedavg_delta,
    fedavg_factors,
    flora_stack,
    normalize_weights,
    topk_sparsify,
    truncate_global,
)

D_OUT, D_IN = 24, 16


def clients(ranks, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, D_IN, generator=g, dtype=dtype) for r in ranks]
    Bs = [torch.randn(D_OUT, r, generator=g, dtype=dtype) for r in ranks]
    return As, Bs


def exact_average(As, Bs, p):
    return sum(pk * (b @ a) for pk, a, b in zip(p, As, Bs))


# -- METHODS.md check: FLoRA's stacked BA = Σ p_k B_k A_k exactly, heterogeneous ranks ----------------
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_flora_stack_is_exact_for_heterogeneous_ranks(dtype, tol):
    As, Bs = clients([2, 4, 8], dtype=dtype)
    w = [10.0, 30.0, 60.0]  # unnormalised, e.g. dataset sizes
    p = [0.1, 0.3, 0.6]
    a, b = flora_stack(As, Bs, w)
    assert a.shape == (14, D_IN) and b.shape == (D_OUT, 14)
    want = exact_average(As, Bs, p)
    assert torch.allclose(b @ a, want, atol=tol * want.abs().max().item(), rtol=0)
    assert torch.allclose(fedavg_delta(As, Bs, w), want, atol=tol * want.abs().max().item(), rtol=0)
    # the weight sits on A (as in the reference code); B is the plain concatenation
    assert torch.equal(b[:, 2:6], Bs[1])
    assert torch.allclose(a[2:6], 0.3 * As[1])


def test_flora_stack_default_weights_are_uniform():
    As, Bs = clients([1, 3])
    a, b = flora_stack(As, Bs)
    assert torch.allclose(b @ a, exact_average(As, Bs, [0.5, 0.5]))


# -- METHODS.md check: FedAvg of A and B separately is not exact; the difference is the cross terms ---
def test_fedavg_of_factors_differs_by_exactly_the_cross_terms():
    As, Bs = clients([4, 4, 4], seed=3)
    p = [0.2, 0.5, 0.3]
    a, b = fedavg_factors(As, Bs, p)
    assert torch.allclose(a, sum(pk * ak for pk, ak in zip(p, As)))
    fedavg_product = b @ a
    flora_a, flora_b = flora_stack(As, Bs, p)
    difference = fedavg_product - flora_b @ flora_a

    # cross terms computed independently, entry by entry: Σ_i Σ_j p_i p_j (B_i A_j) − Σ_k p_k (B_k A_k)
    expected = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            expected += p[i] * p[j] * torch.einsum("or,ri->oi", Bs[i], As[j])
        expected -= p[i] * torch.einsum("or,ri->oi", Bs[i], As[i])
    assert torch.allclose(difference, expected, atol=1e-10)
    assert torch.allclose(cross_terms(As, Bs, p), expected, atol=1e-10)
    assert expected.abs().max() > 1e-2  # ... and they are not small: FedAvg of factors is biased


def test_cross_terms_vanish_for_identical_clients():
    As, Bs = clients([3])
    assert cross_terms(As * 3, Bs * 3, [1, 2, 3]).abs().max() < 1e-12


def test_fedavg_factors_rejects_unequal_ranks_unless_padding():
    As, Bs = clients([2, 4])
    with pytest.raises(AggregationError, match="equal client ranks.*flora_stack"):
        fedavg_factors(As, Bs)
    a, b = fedavg_factors(As, Bs, [1, 1], pad=True)
    assert a.shape == (4, D_IN) and b.shape == (D_OUT, 4)
    assert torch.allclose(a[2:], 0.5 * As[1][2:])  # only the rank-4 client fills directions 3..4
    assert torch.allclose(a[:2], 0.5 * (As[0] + As[1][:2]))
    with pytest.raises(AggregationError, match="equal client ranks"):
        cross_terms(As, Bs)


@pytest.mark.parametrize("As, Bs, msg", [
    ([torch.zeros(2, D_IN)], [torch.zeros(D_OUT, 3)], "rank mismatch"),
    ([torch.zeros(2, D_IN), torch.zeros(2, D_IN + 1)], [torch.zeros(D_OUT, 2)] * 2, "same layer"),
    ([torch.zeros(2, D_IN)], [], "1 A factors but 0 B"),
    ([], [], "no client updates"),
    ([torch.zeros(2, D_IN, 1)], [torch.zeros(D_OUT, 2)], "2-D"),
])
def test_bad_factors_raise(As, Bs, msg):
    with pytest.raises(AggregationError, match=msg):
        flora_stack(As, Bs)


@pytest.mark.parametrize("w, msg", [([1.0], "1 client weights for 2"), ([1.0, -1.0], ">= 0"),
                                    ([0.0, 0.0], "not all zero"), ([1.0, float("nan")], "finite")])
def test_bad_weights_raise(w, msg):
    with pytest.raises(AggregationError, match=msg):
        normalize_weights(w, 2)
    assert issubclass(AggregationError, LorakitError) and issubclass(AggregationError, ValueError)


# -- truncate_global ---------------------------------------------------------------------------------
def test_truncate_global_is_the_best_rank_r_approximation():
    As, Bs = clients([2, 4, 8])
    a, b = flora_stack(As, Bs)
    dense = b @ a
    a4, b4 = truncate_global(a, b, 4)
    assert a4.shape == (4, D_IN) and b4.shape == (D_OUT, 4)
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(b4 @ a4, best, atol=1e-5)  # ops.lowrank computes the SVD in fp32
    # rank >= rank of BA: exact, zero-padded to the requested shape
    a20, b20 = truncate_global(a, b, 20)
    assert a20.shape == (20, D_IN) and b20.shape == (D_OUT, 20)
    assert torch.allclose(b20 @ a20, dense, atol=1e-5)
    assert (a20[14:] == 0).all() and (b20[:, 14:] == 0).all()
    with pytest.raises(AggregationError, match="positive integer"):
        truncate_global(a, b, 0)
    with pytest.raises(AggregationError, match=r"expected A \(r, d_in\)"):
        truncate_global(a, b.T, 2)


# -- CELLM: top-k sparse uploads with error feedback ------------------------------------------------
def test_topk_keeps_the_largest_entries_and_the_residual_holds_the_rest():
    u = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    s, e = topk_sparsify(u, 0.3)  # ceil(0.3 * 6) = 2 entries
    assert s.nnz == 2 and s.shape == (2, 3)
    assert s.indices.tolist() == [1, 3]  # ascending flat positions of -5.0 and 3.0
    assert torch.equal(s.to_dense() + e, u)
    assert torch.equal(e, torch.tensor([[0.1, 0.0, 0.2], [0.0, 0.0, -0.3]]))
    s2, e2 = topk_sparsify(torch.zeros(2, 3), 0.1, e)  # the residual is sent next time
    assert s2.indices.tolist() == [5] and torch.allclose(s2.values, torch.tensor([-0.3]))
    assert torch.equal(s2.to_dense() + e2, e)
    one, _ = topk_sparsify(u, 1e-9)  # at least one entry is always sent
    assert one.nnz == 1


def test_sparse_with_error_feedback_converges_to_the_dense_sum():
    # METHODS.md/CELLM check: what the server accumulates approaches what dense uploads give.
    g = torch.Generator().manual_seed(0)
    shape = (32, 16)
    mean = torch.randn(shape, generator=g)  # a consistent update direction, plus noise each round
    dense_sum = torch.zeros(shape)
    sent_ef = torch.zeros(shape)
    sent_plain = torch.zeros(shape)
    residual = None
    rel = {}
    for t in range(1, 201):
        u = mean + 0.5 * torch.randn(shape, generator=g)
        dense_sum += u
        s, residual = topk_sparsify(u, 0.05, residual)
        sent_ef += s.to_dense()
        sent_plain += topk_sparsify(u, 0.05)[0].to_dense()  # no error feedback
        # nothing is lost, only delayed: Σ sent + residual == Σ updates
        assert torch.allclose(sent_ef + residual, dense_sum, atol=1e-3)
        if t in (10, 50, 200):
            rel[t] = float((sent_ef - dense_sum).norm() / dense_sum.norm())
    assert rel[200] < rel[50] < rel[10]
    assert rel[200] < 0.1
    # without error feedback the small coordinates are never sent: the error does not shrink
    assert float((sent_plain - dense_sum).norm() / dense_sum.norm()) > 0.5


def test_bytes_dense_vs_sparse():
    u = torch.randn(100, 10)
    assert bytes_of(u) == 1000 * 4
    assert bytes_of(u.half()) == 1000 * 2
    s, _ = topk_sparsify(u, 0.1)
    assert bytes_of(s) == 100 * (4 + 4)  # fp32 value + uint32 index
    assert bytes_of({"a": (u, s), "b": [None]}) == 4000 + 800
    assert bytes_of(s) < bytes_of(u)
    with pytest.raises(TypeError, match="cannot size"):
        bytes_of(1.5)


def test_sparse_update_validation_and_densify():
    u = torch.randn(4, 5)
    s, _ = topk_sparsify(u, 0.5)
    tree = densify({"x": (s, u)})
    assert torch.equal(tree["x"][0], s.to_dense()) and tree["x"][1] is u
    with pytest.raises(AggregationError, match="out of range"):
        SparseUpdate(torch.tensor([20]), torch.tensor([1.0]), (4, 5)).to_dense()
    with pytest.raises(AggregationError, match="2 indices but 1 values"):
        SparseUpdate(torch.tensor([0, 1]), torch.tensor([1.0]), (4, 5)).to_dense()
    with pytest.raises(AggregationError, match=r"k_fraction must be in \(0, 1\]"):
        topk_sparsify(u, 0.0)
    with pytest.raises(AggregationError, match="residual shape"):
        topk_sparsify(u, 0.5, torch.zeros(5, 4))
    assert math.prod(s.shape) == 20
