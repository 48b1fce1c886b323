"""Merging low-rank updates and whole models (pure functions, no nn.Module state).

Every function here works on ONE module at a time. Its input is the list of that module's
LoRA factors from n adapters,

    factors = [(A_1 (r_1, d_in), B_1 (d_out, r_1)), ..., (A_n, B_n)],   ΔW_i = B_i A_i,

with each adapter's scale already folded into B_i, and one weight w_i per adapter. The output
is again a pair (A (r, d_in), B (d_out, r)) with ΔW = B A. An adapter that does not adapt a
module simply contributes ΔW_i = 0 there: leave it out of the list (`lorakit.compose`
does that).

    exact, rank Σ r_i (no d_out × d_in matrix is ever formed):
        task_arithmetic / cat   ΔW = Σ w_i ΔW_i                     (Ilharco et al., arXiv:2212.04089)
        linear                  ΔW = Σ (w_i / Σ_j w_j) ΔW_i          (weighted average)
    low-rank, via QR of the stacked factors (no d_out × d_in matrix either):
        svd                     ΔW = best rank-k approximation of Σ w_i ΔW_i
    elementwise on the dense ΔW_i, then truncated SVD to rank k:
        ties                    trim, elect sign, disjoint mean       (Yadav et al., arXiv:2306.01708)
        dare (linear / ties)    drop with p = 1 − density, rescale    (Yu et al., arXiv:2311.03099)
        magnitude_prune         keep the top-density magnitudes, Σ w_i
    whole models:
        soup                    θ = Σ w_i θ_i / Σ w_i                 (Wortsman et al., arXiv:2203.05482;
                                                                       SALSA's reference model, arXiv:2411.01798)

The elementwise methods follow PEFT's `peft.utils.merge_utils` definitions exactly (the
"*_svd" combination types of `add_weighted_adapter`): `density` is the fraction KEPT, the sign
is elected on the unweighted trimmed task vectors, and the disjoint mean divides the weighted
sum by the number of agreeing entries. DARE masks are drawn with `torch.bernoulli` from a
CPU generator in the order the caller passes tensors, so a seed reproduces a merge on any
device (and PEFT's own draws when its global RNG is seeded the same way just before them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorakit.errors import ConfigError
from lorakit.ops.lowrank import truncate

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]  # [(A_i (r_i, d_in), B_i (d_out, r_i))]

#: Methods that return the update exactly (output rank Σ r_i); `rank` does not apply.
EXACT_METHODS = ("linear", "task_arithmetic", "cat")
#: Methods that work on the dense ΔW_i and need `density` (fraction of entries kept).
SPARSIFYING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MERGE_METHODS = (*EXACT_METHODS, "svd", *SPARSIFYING_METHODS)
SIGN_METHODS = ("total", "frequency")


# -- argument checks (shared with lorakit.compose) -------------------------------------------
def check_merge_args(method: str, n: int, weights: Sequence[float] | None, rank: int | None = None,
                     density: float | None = None, majority_sign: str = "total") -> list[float]:
    """Validate merge arguments; returns the weights as floats (all 1.0 when None).

    Raises ConfigError naming what was received and what was expected.
    """
    if method not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {method!r}; expected one of {', '.join(MERGE_METHODS)}")
    if n < 1:
        raise ConfigError("nothing to merge: give at least one adapter")
    if weights is None:
        weights = [1.0] * n
    if isinstance(weights, (int, float)) or not isinstance(weights, Sequence):
        raise ConfigError(f"weights must be a list of {n} numbers, got {weights!r}")
    if len(weights) != n:
        raise ConfigError(f"got {len(weights)} weights for {n} adapters; give one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"weights must be finite numbers, got {list(weights)!r}")
    weights = [float(w) for w in weights]
    if method == "linear" and sum(weights) == 0:
        raise ConfigError(f"method 'linear' averages with weights w_i / Σ w, but the weights {weights} sum to 0; "
                          "use 'task_arithmetic' for an unnormalised sum")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        if method in EXACT_METHODS:
            raise ConfigError(f"method {method!r} is exact (output rank = Σ r_i) and takes no rank; "
                              f"use method='svd' to choose the rank (got rank={rank})")
    if method in SPARSIFYING_METHODS:
        if density is None:
            raise ConfigError(f"method {method!r} needs density, the fraction of entries kept, in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1] (fraction of entries kept), got {density!r}")
    elif density is not None:
        raise ConfigError(f"density only applies to {', '.join(SPARSIFYING_METHODS)}; "
                          f"method {method!r} got density={density!r}")
    if majority_sign not in SIGN_METHODS:
        raise ConfigError(f"majority_sign must be one of {SIGN_METHODS}, got {majority_sign!r}")
    return weights


def _work(t: torch.Tensor) -> torch.Tensor:
    """Compute in float32 (float64 stays float64): half-precision SVD/QR is not supported."""
    return t.double() if t.dtype == torch.float64 else t.float()


# -- exact combinations (concatenation along the rank) ---------------------------------------
def task_arithmetic(factors: Factors, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW = Σ_i w_i B_i A_i, exactly, as one LoRA of rank Σ r_i (Ilharco et al., arXiv:2212.04089).

    Concatenation along the rank:  A = [s_1 √|w_1| A_1; …; s_n √|w_n| A_n]  (Σr_i, d_in),
    B = [√|w_1| B_1, …, √|w_n| B_n]  (d_out, Σr_i), with s_i = sign(w_i) on the A side only
    (PEFT's convention), so B A = Σ_i w_i B_i A_i. The d_out × d_in product is never formed.
    """
    if len(factors) != len(weights):
        raise ConfigError(f"got {len(weights)} weights for {len(factors)} factor pairs")
    a_parts, b_parts = [], []
    for (a, b), w in zip(factors, weights):
        root = math.sqrt(abs(w))
        a_parts.append(a * (math.copysign(root, w)))  # (r_i, d_in)
        b_parts.append(b * root)  # (d_out, r_i)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def cat(factors: Factors, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "cat" combination: the same exact Σ w_i ΔW_i as `task_arithmetic` (rank Σ r_i)."""
    return task_arithmetic(factors, weights)


def linear(factors: Factors, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average ΔW = Σ_i (w_i / Σ_j w_j) ΔW_i, exact by concatenation (rank Σ r_i).

    (mergekit's "linear" with normalize=true. PEFT's "linear" instead averages A and B
    separately, which is not ΔW's average because of the cross terms B_i A_j.)
    """
    total = sum(weights)
    if total == 0:
        raise ConfigError(f"linear merge weights {list(weights)} sum to 0; cannot normalise")
    return task_arithmetic(factors, [w / total for w in weights])


# -- SVD of a weighted sum --------------------------------------------------------------
def svd(factors: Factors, weights: Sequence[float], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k approximation (Frobenius, Eckart–Young) of ΔW = Σ_i w_i B_i A_i.

    The concatenated factors give ΔW = B_cat A_cat exactly (rank R = Σ r_i); QR of B_cat and
    A_catᵀ reduces the SVD to an R × R core (`lorakit.ops.lowrank.truncate`), so no
    d_out × d_in matrix is formed. Output rank min(k, R, d_out, d_in); the split of the
    singular values is balanced: A = √S Vhᵀ, B = U √S.
    """
    _check_rank(rank)
    a, b = task_arithmetic([(_work(a), _work(b)) for a, b in factors], weights)
    return truncate(a, b, rank)


# -- dense, elementwise merges (TIES / DARE / magnitude pruning) ---------------------------
def dense(factors: Factors) -> list[torch.Tensor]:
    """ΔW_i = B_i A_i for each pair: list of (d_out, d_in) — only for elementwise methods."""
    return [_work(b) @ _work(a) for a, b in factors]


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density · numel⌋ largest |entries| (TIES' "trim" step; PEFT's
    `magnitude_based_pruning`). density ≥ 1 keeps everything."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def dare_drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop-and-rescale: m ~ Bernoulli(density) elementwise, t ⊙ m / density
    (drop probability p = 1 − density, rescale 1/(1 − p); PEFT's `random_pruning`).

    The mask is drawn on the CPU from `generator` (float32 probabilities, like PEFT for a
    float32 model), so a seed gives the same mask on every device. density ≥ 1 keeps all.
    """
    if density >= 1:
        return t
    probs = torch.full(tuple(t.shape), float(density), dtype=torch.float32)
    mask = torch.bernoulli(probs, generator=generator).to(device=t.device, dtype=t.dtype)
    return t * mask / density


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election over (n, ...) stacked task vectors: γ = sign(Σ_i τ_i) ("total",
    the paper's rule) or sign(Σ_i sign τ_i) ("frequency"); ties go to +. Returns the boolean
    mask sign(τ_i) == γ (pruned zeros never agree)."""
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = stacked.sign().sum(dim=0)
    else:
        raise ConfigError(f"majority_sign must be one of {SIGN_METHODS}, got {method!r}")
    majority = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == majority


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: Σ_i [agree_i] w_i τ_i / max(1, Σ_i [agree_i]) per entry."""
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(weighted.dtype)


def _weighted(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1)))


def ties_dense(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
               majority_sign: str = "total") -> torch.Tensor:
    """TIES-merging (Yadav et al., arXiv:2306.01708) of dense task vectors τ_i:

        τ̂_i = trim_density(τ_i)                      keep the top-density |entries| of each
        γ   = sign(Σ_i τ̂_i)                           elect a sign per entry
        τ   = Σ_{i: sign τ̂_i = γ} w_i τ̂_i / |{i: sign τ̂_i = γ}|   disjoint mean

    (w_i plays the paper's λ; PEFT's `merge_utils.ties`.)
    """
    stacked = torch.stack([magnitude_mask(t, density) for t in deltas])  # (n, ...)
    agree = elect_sign(stacked, majority_sign)
    return disjoint_mean(_weighted(stacked, weights), agree)


def dare_dense(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
               generator: torch.Generator, variant: str = "linear", majority_sign: str = "total") -> torch.Tensor:
    """DARE (Yu et al., arXiv:2311.03099): τ̃_i = m_i ⊙ τ_i / (1 − p), m_i ~ Bernoulli(1 − p),
    p = 1 − density; then "linear": Σ_i w_i τ̃_i, or "ties": TIES' sign election and disjoint
    mean on the τ̃_i (PEFT's `dare_linear` / `dare_ties`). Masks are drawn in list order."""
    if variant not in ("linear", "ties"):
        raise ConfigError(f"DARE variant must be 'linear' or 'ties', got {variant!r}")
    stacked = torch.stack([dare_drop(t, density, generator) for t in deltas])
    if variant == "linear":
        return _weighted(stacked, weights).sum(dim=0)
    return disjoint_mean(_weighted(stacked, weights), elect_sign(stacked, majority_sign))


def magnitude_prune_dense(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """Σ_i w_i trim_density(τ_i): magnitude pruning of each task vector, then task
    arithmetic (PEFT's `merge_utils.magnitude_prune`)."""
    return _weighted(torch.stack([magnitude_mask(t, density) for t in deltas]), weights).sum(dim=0)


def lowrank_from_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a dense (d_out, d_in) ΔW: A = √S_k Vh_k (k, d_in), B = U_k √S_k
    (d_out, k), k = min(rank, d_out, d_in) — the best rank-k approximation."""
    _check_rank(rank)
    u, s, vh = torch.linalg.svd(_work(delta), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None]


def ties(factors: Factors, weights: Sequence[float], density: float, rank: int,
         majority_sign: str = "total") -> tuple[torch.Tensor, torch.Tensor]:
    """TIES on the dense ΔW_i = B_i A_i (see `ties_dense`), then truncated SVD to `rank`
    (PEFT's combination_type="ties_svd")."""
    _check_density(density)
    return lowrank_from_dense(ties_dense(dense(factors), weights, density, majority_sign), rank)


def dare(factors: Factors, weights: Sequence[float], density: float, rank: int, variant: str = "linear",
         seed: int = 0, generator: torch.Generator | None = None,
         majority_sign: str = "total") -> tuple[torch.Tensor, torch.Tensor]:
    """DARE on the dense ΔW_i (see `dare_dense`), then truncated SVD to `rank` (PEFT's
    "dare_linear_svd" / "dare_ties_svd"). Pass one `generator` to continue a random stream
    across modules; otherwise a CPU generator seeded with `seed` is used."""
    _check_density(density)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    merged = dare_dense(dense(factors), weights, density, generator, variant, majority_sign)
    return lowrank_from_dense(merged, rank)


def magnitude_prune(factors: Factors, weights: Sequence[float], density: float,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude pruning on the dense ΔW_i (see `magnitude_prune_dense`), then truncated SVD
    to `rank` (PEFT's "magnitude_prune_svd")."""
    _check_density(density)
    return lowrank_from_dense(magnitude_prune_dense(dense(factors), weights, density), rank)


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")


def _check_density(density) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1] (fraction of entries kept), got {density!r}")


# -- one entry point ----------------------------------------------------------------------
def combine(method: str, factors: Factors, weights: Sequence[float], rank: int | None = None,
            density: float | None = None, generator: torch.Generator | None = None,
            majority_sign: str = "total") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one module's factors with `method` (one of MERGE_METHODS). For the non-exact
    methods `rank` defaults to max r_i (PEFT's default). Returns (A (r, d_in), B (d_out, r))."""
    weights = check_merge_args(method, len(factors), weights, rank, density, majority_sign)
    if method in EXACT_METHODS:
        return {"linear": linear, "task_arithmetic": task_arithmetic, "cat": cat}[method](factors, weights)
    rank = rank if rank is not None else max(a.shape[0] for a, _ in factors)
    if method == "svd":
        return svd(factors, weights, rank)
    if method == "ties":
        return ties(factors, weights, density, rank, majority_sign)
    if method == "magnitude_prune":
        return magnitude_prune(factors, weights, density, rank)
    variant = method.removeprefix("dare_")
    return dare(factors, weights, density, rank, variant=variant, generator=generator, majority_sign=majority_sign)


# -- whole models ------------------------------------------------------------------------
def soup(state_dicts: Sequence[dict[str, torch.Tensor]],
         weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Model soup: θ = Σ_i w_i θ_i / Σ_i w_i over full state dicts (uniform soup when
    weights is None; Wortsman et al., arXiv:2203.05482). SALSA (arXiv:2411.01798) uses such
    a soup of SFT models as the reference model.

    Floating tensors are averaged in float32 (float64 stays) and cast back to their dtype;
    non-floating tensors (step counters, position ids) must be equal in every model and
    are copied. All state dicts need the same keys and shapes.
    """
    if not state_dicts:
        raise ConfigError("soup needs at least one state dict")
    n = len(state_dicts)
    weights = [1.0] * n if weights is None else weights
    if len(weights) != n:
        raise ConfigError(f"got {len(weights)} weights for {n} state dicts")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {list(weights)!r}")
    total = float(sum(weights))
    if total == 0:
        raise ConfigError(f"soup weights {list(weights)} sum to 0; cannot normalise")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise ConfigError(f"state dict {i} has different keys from state dict 0 (e.g. {diff[:3]})")
    out = {}
    for k in keys:
        ts = [sd[k] for sd in state_dicts]
        for i, t in enumerate(ts[1:], 1):
            if t.shape != ts[0].shape:
                raise ConfigError(f"{k!r}: shape {tuple(t.shape)} in state dict {i}, {tuple(ts[0].shape)} in 0")
        if not ts[0].is_floating_point():
            if any(not torch.equal(t, ts[0]) for t in ts[1:]):
                raise ConfigError(f"{k!r} is a non-floating tensor that differs between models; cannot average it")
            out[k] = ts[0].clone()
            continue
        acc = sum(_work(t) * (w / total) for t, w in zip(ts, weights))
        out[k] = acc.to(ts[0].dtype)
    return out


__all__ = [
    "EXACT_METHODS",
    "MERGE_METHODS",
    "SPARSIFYING_METHODS",
    "cat",
    "check_merge_args",
    "combine",
    "dare",
    "dare_dense",
    "dare_drop",
    "dense",
    "disjoint_mean",
    "elect_sign",
    "linear",
    "lowrank_from_dense",
    "magnitude_mask",
    "magnitude_prune",
    "magnitude_prune_dense",
    "soup",
    "svd",
    "task_arithmetic",
    "ties",
    "ties_dense",
]
