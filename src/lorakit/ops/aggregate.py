"""Server-side aggregation of client LoRA factors, and sparse communication (pure functions).

Every function works on ONE module's factors from K clients:

    A_k: (r_k, d_in),  B_k: (d_out, r_k),  ΔW_k = B_k A_k   (the LoRA scale s_k folded into B_k)

and client weights p_k >= 0 (e.g. local dataset sizes), normalised here to Σ p_k = 1.

FedAvg of the factors (FedIT) averages A and B separately:

    Ā = Σ p_k A_k,  B̄ = Σ p_k B_k,   B̄ Ā = Σ_i Σ_j p_i p_j B_i A_j  ≠  Σ_k p_k B_k A_k

and so adds the cross terms  Σ_{i≠j} p_i p_j B_i A_j − Σ_k p_k (1 − p_k) B_k A_k  (`cross_terms`).

FLoRA (Wang et al., arXiv:2409.05976) stacks instead, along the rank axis:

    A = [p_1 A_1; …; p_K A_K]  (Σ r_k, d_in),   B = [B_1 … B_K]  (d_out, Σ r_k)
    B A = Σ_k B_k (p_k A_k) = Σ_k p_k ΔW_k      exactly, for any ranks r_k.

(The reference implementation, ATP-1010/FederatedLLM fed_utils/model_aggregation.py, also
weights A and concatenates A along dim 0 and B along dim 1.)

Sparse communication (CELLM, Vavekanand & Sam, arXiv:2407.20557 -- the id is not in the seed
abstract; it is the arXiv listing of that title): each client sends only the top-k entries
(by magnitude) of its update, and keeps what it did not send as a residual that is added to
its next update ("error feedback", Seide et al. 2014; Stich et al. 2018):

    acc_t = u_t + e_{t-1};   s_t = top_k(acc_t);   e_t = acc_t − s_t
    ⇒  Σ_{τ≤t} s_τ = Σ_{τ≤t} u_τ − e_t      (nothing is lost, only delayed)

`bytes_of` counts what goes on the wire: dense = numel · itemsize; sparse = nnz · (itemsize +
index bytes), flat indices as uint32 (uint64 for tensors of more than 2^32 entries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError

__all__ = [
    "AggregationError",
    "SparseUpdate",
    "bytes_of",
    "cross_terms",
    "densify",
    "fedavg_delta",
    "fedavg_factors",
    "flora_stack",
    "normalize_weights",
    "topk_sparsify",
    "truncate_global",
]


class AggregationError(LorakitError, ValueError):
    """Client factors that cannot be aggregated: mismatched shapes or ranks, bad weights."""


# -- checks ---------------------------------------------------------------------------------
def normalize_weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> list[float]:
    """p_k = w_k / Σ w; None gives uniform weights. Weights must be finite, >= 0, not all 0."""
    if n <= 0:
        raise AggregationError("nothing to aggregate: no client updates")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in (weights.tolist() if torch.is_tensor(weights) else weights)]
    if len(w) != n:
        raise AggregationError(f"got {len(w)} client weights for {n} client updates")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise AggregationError(f"client weights must be finite, >= 0 and not all zero, got {w}")
    total = sum(w)
    return [x / total for x in w]


def _check_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> None:
    if len(As) != len(Bs):
        raise AggregationError(f"got {len(As)} A factors but {len(Bs)} B factors")
    if not As:
        raise AggregationError("nothing to aggregate: no client updates")
    d_in, d_out = As[0].shape[-1], Bs[0].shape[0]
    for k, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2:
            raise AggregationError(f"client {k}: A and B must be 2-D, got A {tuple(a.shape)}, B {tuple(b.shape)}")
        if b.shape[1] != a.shape[0]:
            raise AggregationError(
                f"client {k}: rank mismatch between B {tuple(b.shape)} (d_out, r) and A {tuple(a.shape)} (r, d_in)"
            )
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise AggregationError(
                f"client {k}: update is {b.shape[0]}x{a.shape[1]} (d_out x d_in), "
                f"client 0's is {d_out}x{d_in}; all clients must adapt the same layer"
            )


def _pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = r - a.shape[0]
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])], 0), torch.cat([b, b.new_zeros(b.shape[0], extra)], 1)


# -- aggregation ----------------------------------------------------------------------------
def fedavg_factors(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights=None, pad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg of the factors separately (FedIT): (Σ p_k A_k (r, d_in), Σ p_k B_k (d_out, r)).

    Not exact: B̄Ā = Σ p_k ΔW_k + `cross_terms`. Ranks must be equal; with `pad=True` smaller
    ranks are zero-padded to the largest (rows of A, columns of B), the "Zero-Padding"
    baseline of the FLoRA paper (HetLoRA-style): padded directions average in as zeros, so a
    client of rank r only contributes to the first r directions.
    """
    _check_factors(As, Bs)
    ranks = [a.shape[0] for a in As]
    if len(set(ranks)) > 1:
        if not pad:
            raise AggregationError(
                f"fedavg_factors needs equal client ranks, got {ranks}; use flora_stack for heterogeneous "
                "ranks, or pad=True to zero-pad to the largest rank"
            )
        r = max(ranks)
        As, Bs = zip(*(_pad_rank(a, b, r) for a, b in zip(As, Bs)))
    p = normalize_weights(weights, len(As))
    a = sum(pk * ak for pk, ak in zip(p, As))
    b = sum(pk * bk for pk, bk in zip(p, Bs))
    return a, b


def flora_stack(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking: A = [p_1A_1; …; p_KA_K] (Σr_k, d_in), B = [B_1 … B_K] (d_out, Σr_k).

    B A = Σ p_k B_k A_k exactly, for any ranks. The weight goes on A (as in the reference
    code); putting it on B gives the same product.
    """
    _check_factors(As, Bs)
    p = normalize_weights(weights, len(As))
    a = torch.cat([pk * ak for pk, ak in zip(p, As)], dim=0)  # (Σ r_k, d_in)
    b = torch.cat(list(Bs), dim=1)  # (d_out, Σ r_k)
    return a, b


def fedavg_delta(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights=None) -> torch.Tensor:
    """The exact average update Σ p_k B_k A_k (d_out, d_in), one matmul over the stacked factors.

    Dense: for merging into the base weights only (keep `flora_stack`'s factors otherwise).
    """
    a, b = flora_stack(As, Bs, weights)
    return b @ a


def cross_terms(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights=None) -> torch.Tensor:
    """What FedAvg of the factors adds to the exact average: B̄Ā − Σ p_k B_k A_k  (d_out, d_in).

        = Σ_{i≠j} p_i p_j B_i A_j  −  Σ_k p_k (1 − p_k) B_k A_k

    (the off-diagonal products of mismatched clients, and the diagonal shrunk from p_k to
    p_k²). Equal ranks only, like `fedavg_factors` (B_i A_j needs r_i = r_j).
    """
    _check_factors(As, Bs)
    ranks = [a.shape[0] for a in As]
    if len(set(ranks)) > 1:
        raise AggregationError(f"cross terms need equal client ranks (B_i A_j), got {ranks}")
    p = normalize_weights(weights, len(As))
    out = Bs[0].new_zeros(Bs[0].shape[0], As[0].shape[1])
    for i, bi in enumerate(Bs):
        for j, aj in enumerate(As):
            coef = p[i] * p[j] if i != j else -p[i] * (1.0 - p[i])
            out = out + coef * (bi @ aj)
    return out


def truncate_global(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors (A' (rank, d_in), B' (d_out, rank)) of the global update B A.

    Truncated SVD from the factors (never forming d_out × d_in), singular values split as
    √σ on both sides (FlexLoRA-style redistribution of a global update to a client's rank).
    If B A has fewer than `rank` singular directions the result is zero-padded to exactly
    `rank` (zero rows of A, zero columns of B: B'A' is unchanged). Training from such
    factors would leave the padded directions dead (both gradients are 0), so a caller
    that trains from them should re-seed the zero rows of A.
    """
    from lorakit.ops.lowrank import truncate

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AggregationError(f"rank must be a positive integer, got {rank!r}")
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise AggregationError(f"expected A (r, d_in) and B (d_out, r), got A {tuple(a.shape)}, B {tuple(b.shape)}")
    a2, b2 = truncate(a, b, rank)
    return _pad_rank(a2, b2, rank)


# -- sparse communication -------------------------------------------------------------------
@dataclass(frozen=True)
class SparseUpdate:
    """A tensor sent as (flat index, value) pairs; the receiver knows `shape`.

    indices: (nnz,) int64, ascending flat positions in `shape`;  values: (nnz,)
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> torch.Tensor:
        numel = math.prod(self.shape)
        if self.indices.numel() != self.values.numel():
            raise AggregationError(f"sparse update has {self.indices.numel()} indices but {self.values.numel()} values")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= numel):
            raise AggregationError(f"sparse update index out of range for shape {self.shape}")
        out = self.values.new_zeros(numel)
        out[self.indices] = self.values
        return out.view(self.shape)


def densify(update):
    """SparseUpdate -> dense tensor; tensors, dicts, lists and tuples are walked recursively."""
    if isinstance(update, SparseUpdate):
        return update.to_dense()
    if isinstance(update, Mapping):
        return {k: densify(v) for k, v in update.items()}
    if isinstance(update, (list, tuple)):
        return type(update)(densify(v) for v in update)
    return update


def topk_sparsify(
    update: torch.Tensor, k_fraction: float, residual: torch.Tensor | None = None
) -> tuple[SparseUpdate, torch.Tensor]:
    """Top-k sparsification with error feedback: returns (sparse s_t, new residual e_t).

        acc = update + residual;  s = the ⌈k_fraction · numel⌉ entries of acc largest in |·|;
        e = acc − s     (so  s + e == update + residual  exactly)

    Pass the returned residual back in with the next update of the same tensor; None (the
    first call) means a zero residual. k_fraction must be in (0, 1]; at least one entry is
    always sent.
    """
    if isinstance(k_fraction, bool) or not isinstance(k_fraction, (int, float)) or not 0 < k_fraction <= 1:
        raise AggregationError(f"k_fraction must be in (0, 1], got {k_fraction!r}")
    if residual is not None and residual.shape != update.shape:
        raise AggregationError(f"residual shape {tuple(residual.shape)} != update shape {tuple(update.shape)}")
    acc = update.detach().clone() if residual is None else update.detach() + residual
    flat = acc.reshape(-1)
    k = max(1, min(flat.numel(), math.ceil(k_fraction * flat.numel())))
    idx = flat.abs().topk(k, sorted=False).indices.sort().values  # ascending: cheaper to encode
    values = flat[idx].clone()
    new_residual = flat.clone()
    new_residual[idx] = 0
    return SparseUpdate(idx, values, tuple(update.shape)), new_residual.view(update.shape)


def index_bytes(numel: int) -> int:
    """Bytes per flat index: uint32 up to 2^32 entries, else uint64."""
    return 4 if numel <= 2**32 else 8


def bytes_of(update) -> int:
    """Bytes on the wire: dense tensors numel · itemsize; SparseUpdate nnz · (itemsize + index).

    Dicts, lists and tuples are summed recursively; None counts 0. (Above ~50% density with
    fp32 values the sparse encoding costs more than the dense one.)
    """
    if update is None:
        return 0
    if isinstance(update, SparseUpdate):
        return update.nnz * (update.values.element_size() + index_bytes(math.prod(update.shape)))
    if torch.is_tensor(update):
        return update.numel() * update.element_size()
    if isinstance(update, Mapping):
        return sum(bytes_of(v) for v in update.values())
    if isinstance(update, (list, tuple)):
        return sum(bytes_of(v) for v in update)
    raise TypeError(f"bytes_of: cannot size an object of type {type(update).__name__}")
