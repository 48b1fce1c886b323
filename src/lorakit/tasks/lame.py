"""LAME: Laplacian Adjusted Maximum-likelihood Estimation (Boudiaf et al., CVPR 2022,
"Parameter-free Online Test-time Adaptation", arXiv:2201.05718).

Test-time adaptation that touches no parameter: it corrects a classifier's output
probabilities over one batch so that examples close in feature space agree. For a batch of
n examples with probabilities p (n, K) and features f (n, D), LAME minimises over the
assignments z (rows on the probability simplex)

    E(z) = Σ_i KL(z_i ‖ p_i) − ½ Σ_ij w_ij z_iᵀ z_j                                  (1)

with an affinity W (n, n) between the L2-normalised features. The concave-convex procedure
(linearise the concave Laplacian term at the current z, minimise the convex rest exactly)
gives the bound-optimisation update, iterated from z⁰ = p:

    z_i ← softmax(log p_i + Σ_j w_ij z_j)      i.e.  z ← softmax(log p + W z)        (2)

until max |zⁿ⁺¹ − zⁿ| ≤ tol or max_iter steps. At a fixed point (2) holds with equality.
For a symmetric positive semi-definite W (e.g. the linear affinity) every step of (2) lowers
(1); kNN affinities are neither symmetric nor PSD, and the paper (like its code) uses them
anyway. With W = 0 (no neighbours) z = p: LAME never changes a prediction it has no
evidence against — the "conservative" property the paper is built around.

Affinities (as in the reference code, github.com/fiveai/LAME, src/adaptation/lame.py):
    knn:    w_ij = 1 if j is one of the `knn` nearest neighbours of i (Euclidean, j ≠ i)
    rbf:    w_ij = exp(−‖f_i − f_j‖² / 2σ²), σ = mean over i of the distance from f_i to its
            `knn`-th nearest point counting f_i itself (so the (knn−1)-th other point)
    linear: w_ij = f_iᵀ f_j
`force_symmetry` replaces W by (W + Wᵀ)/2. Defaults: kNN with k = 5 (the reference's best k),
100 iterations at most.

    z = lame(probs, feats)                       # (n, K) adapted probabilities
    stream = LameStream(LameConfig(knn=5))
    for z in stream.run(batches): ...            # batches of (probs, feats[, labels])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from lorakit.core.adapter import check_positive_int
from lorakit.errors import ConfigError

AFFINITIES = ("knn", "rbf", "linear")
PROB_ATOL = 1e-3  # how far a row of `probs` may sum from 1 (fp16 softmax outputs drift ~1e-3)


@dataclass
class LameConfig:
    """affinity: "knn", "rbf" or "linear"; knn: neighbours for "knn" (and the σ of "rbf");
    max_iter / tol: stop after max_iter updates or when no entry of z moves more than tol;
    force_symmetry: use (W + Wᵀ)/2; normalize: L2-normalise features first (the paper does);
    eps: floor on p inside log p (the reference adds 1e-10).
    """

    affinity: str = "knn"
    knn: int = 5
    max_iter: int = 100
    tol: float = 1e-6
    force_symmetry: bool = False
    normalize: bool = True
    eps: float = 1e-10

    def __post_init__(self) -> None:
        if self.affinity not in AFFINITIES:
            raise ConfigError(f"affinity must be one of {AFFINITIES}, got {self.affinity!r}")
        check_positive_int("knn", self.knn)
        check_positive_int("max_iter", self.max_iter)
        for name in ("tol", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")


@dataclass
class LameSolution:
    z: torch.Tensor  # (n, K) adapted probabilities
    iterations: int  # updates (2) applied
    converged: bool  # max |Δz| ≤ tol reached before max_iter


# -- affinities ----------------------------------------------------------------------------
def affinity_matrix(features: torch.Tensor, kind: str = "knn", knn: int = 5) -> torch.Tensor:
    """(n, D) features -> (n, n) affinity W of the given kind (see the module docstring)."""
    n = features.shape[0]
    if kind == "linear":
        return features @ features.T
    dist = torch.cdist(features, features)  # (n, n) Euclidean
    if kind == "knn":
        k = min(knn, n - 1)  # a batch of one has no neighbour: W = 0
        w = torch.zeros(n, n, dtype=features.dtype, device=features.device)
        if k > 0:
            # the reference drops column 0 of topk(k+1) as "self"; masking the diagonal
            # instead stays right when two examples have identical features
            idx = dist.fill_diagonal_(float("inf")).topk(k, dim=-1, largest=False).indices  # (n, k)
            w.scatter_(1, idx, 1.0)
        return w
    if kind == "rbf":
        kth = dist.topk(min(knn, n), dim=-1, largest=False).values[:, -1]  # (n,), self included
        sigma = kth.mean().clamp_min(1e-12)  # identical features: σ = 0 -> all affinities 1
        return torch.exp(-dist.pow(2) / (2 * sigma**2))
    raise ConfigError(f"affinity must be one of {AFFINITIES}, got {kind!r}")


# -- the optimisation ----------------------------------------------------------------------
def lame_energy(z: torch.Tensor, log_p: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Objective (1): Σ_i KL(z_i ‖ p_i) − ½ Σ_ij w_ij z_iᵀ z_j (a scalar)."""
    kl = (z * (torch.log(z.clamp_min(1e-30)) - log_p)).sum()
    return kl - 0.5 * (z * (kernel @ z)).sum()


def laplacian_optimization(log_p: torch.Tensor, kernel: torch.Tensor, max_iter: int = 100,
                           tol: float = 1e-6) -> LameSolution:
    """Iterate z ← softmax(log p + W z) from z = p. log_p: (n, K), kernel: (n, n)."""
    z = log_p.softmax(-1)  # (n, K)
    for it in range(1, max_iter + 1):
        new = (log_p + kernel @ z).softmax(-1)
        delta = (new - z).abs().max().item() if z.numel() else 0.0
        z = new
        if delta <= tol:
            return LameSolution(z, it, True)
    return LameSolution(z, max_iter, False)


def _check_inputs(probs, features, kernel) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a 2-D (n, K) tensor of probabilities, got {shape}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point probabilities, got dtype {probs.dtype}")
    if not torch.isfinite(probs).all():
        raise ValueError("probs contains NaN or inf")
    if (probs < 0).any():
        raise ValueError(f"probs must be non-negative (probabilities, not logits); min is {probs.min().item():.4g}")
    sums = probs.sum(-1)
    bad = (sums - 1).abs() > PROB_ATOL
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"probs row {i} sums to {sums[i].item():.4g}, not 1: pass probabilities "
                         "(softmax of the logits), not logits")
    n = probs.shape[0]
    if kernel is not None:
        if features is not None:
            raise ValueError("pass either features or a precomputed kernel, not both")
        if not isinstance(kernel, torch.Tensor) or tuple(kernel.shape) != (n, n):
            shape = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
            raise ValueError(f"kernel must be an (n, n) = ({n}, {n}) tensor, got {shape}")
        if not torch.isfinite(kernel).all():
            raise ValueError("kernel contains NaN or inf")
        return
    if features is None:
        raise ValueError("LAME needs features (n, D) to build the affinity, or a precomputed kernel")
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != n:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a 2-D (n, D) tensor with n = {n} rows (one per row of probs), got {shape}")
    if not features.is_floating_point() or not torch.isfinite(features).all():
        raise ValueError("features must be finite floating-point values")


def lame_solve(probs: torch.Tensor, features: torch.Tensor | None = None, config: LameConfig | None = None,
               kernel: torch.Tensor | None = None) -> LameSolution:
    """LAME on one batch, with the iteration count. See `lame`."""
    cfg = config or LameConfig()
    _check_inputs(probs, features, kernel)
    work = probs.dtype if probs.dtype in (torch.float32, torch.float64) else torch.float32
    log_p = torch.log(probs.to(work).clamp_min(cfg.eps))  # (n, K)
    if kernel is None:
        f = features.to(work)
        if cfg.normalize:
            f = torch.nn.functional.normalize(f, p=2, dim=-1)
        kernel = affinity_matrix(f, cfg.affinity, cfg.knn)  # (n, n)
    kernel = kernel.to(device=log_p.device, dtype=work)
    if cfg.force_symmetry:
        kernel = 0.5 * (kernel + kernel.T)
    sol = laplacian_optimization(log_p, kernel, cfg.max_iter, cfg.tol)
    sol.z = sol.z.to(probs.dtype)
    return sol


def lame(probs: torch.Tensor, features: torch.Tensor | None = None, config: LameConfig | None = None,
         kernel: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """Adapted probabilities z (n, K) for one batch.

    probs: (n, K) classifier probabilities (rows sum to 1); features: (n, D) the penultimate
    features (or pass a precomputed `kernel` (n, n) instead); config or keyword overrides of
    `LameConfig` (e.g. `lame(p, f, knn=3)`).
    """
    if kw:
        if config is not None:
            raise ConfigError("pass either a LameConfig or keyword settings, not both")
        config = LameConfig(**kw)
    return lame_solve(probs, features, config, kernel).z


class LameStream:
    """Online LAME over a stream of batches: each batch is adapted on its own (LAME keeps no
    state between batches, which is what makes it safe under any shift); the stream records
    iteration counts and, when labels come with the batches, accuracy before and after.

        stream = LameStream()
        for z in stream.run(((p, f, y) for p, f, y in batches)): ...
        stream.accuracy()  # {"base": ..., "lame": ...}
    """

    def __init__(self, config: LameConfig | None = None, **kw):
        if kw and config is not None:
            raise ConfigError("pass either a LameConfig or keyword settings, not both")
        self.config = config or LameConfig(**kw)
        self.batches = 0
        self.examples = 0
        self.iterations: list[int] = []
        self.unconverged = 0
        self._labelled = self._base_correct = self._lame_correct = 0

    def step(self, probs: torch.Tensor, features: torch.Tensor,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        """Adapt one batch; returns z (n, K)."""
        sol = lame_solve(probs, features, self.config)
        if labels is not None:
            labels = torch.as_tensor(labels, device=probs.device)
            if labels.shape != probs.shape[:1]:
                raise ValueError(f"labels must have shape ({probs.shape[0]},), got {tuple(labels.shape)}")
            self._labelled += len(labels)
            self._base_correct += int((probs.argmax(-1) == labels).sum())
            self._lame_correct += int((sol.z.argmax(-1) == labels).sum())
        self.batches += 1
        self.examples += probs.shape[0]
        self.iterations.append(sol.iterations)
        self.unconverged += not sol.converged
        return sol.z

    __call__ = step

    def run(self, stream: Iterable) -> Iterator[torch.Tensor]:
        """Yield z for each (probs, features) or (probs, features, labels) item of `stream`."""
        for i, item in enumerate(stream):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise ValueError(f"stream item {i} must be (probs, features) or (probs, features, labels)")
            yield self.step(*item)

    def accuracy(self) -> dict[str, float] | None:
        """{"base": accuracy of argmax p, "lame": of argmax z} over labelled batches (None if none)."""
        if not self._labelled:
            return None
        return {"base": self._base_correct / self._labelled, "lame": self._lame_correct / self._labelled}
