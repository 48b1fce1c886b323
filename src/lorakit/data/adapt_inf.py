"""Adapt-∞ (lite): skill clusters of gradient features, cluster-wise redundancy pruning and
per-skill budgeted selection (Maharana, Yoon, Chen, Bansal, arXiv:2410.10636).

Follows ``data_selection/adapt-inf.py`` of the authors' code (github.com/adymaharana/adapt-inf)
on features φ_j (e.g. the projected LoRA gradients of ``lorakit.data.less``), n examples:

1. Pseudo-skills: k-means on the L2-normalised φ (greedy k-means++ seeding, Lloyd
   iterations, best of ``n_init`` restarts):
       c(j) = argmin_k ‖φ_j − μ_k‖²,   μ_k = mean{φ_j : c(j) = k}.
2. Cluster budgets for a total B (``cluster_budgets``): B/K per cluster; a cluster smaller
   than its share keeps all of its members and the surplus is spread over the others
   (water-filling, smallest clusters first), so rare skills keep what they have.
3. Redundancy pruning, SemDeDup-style (``redundancy``, ``semdedup``): within cluster k, with
   its members in dataset order,
       M_j = max_{i<j, c(i)=c(j)=k} ⟨φ_i, φ_j⟩,
   the similarity of j to its closest earlier member; the budget_k members with the smallest
   M_j are kept (the "permanent pruning" that keeps the pool from growing).
4. Selection (optional, with importance scores s): per cluster choose, from a pool of scoring
   functions, the one whose z-normalised histogram (50 bins on [−4, 4]) has the largest
   entropy (the paper's multi-way pool, ``hist_entropy``), then draw the cluster's budget by
   coverage-centric sampling (``ccs_sample``: equal quotas over equal-width score bins
   between the 5th and 95th percentile) or take the lowest / highest scores.
   Without scores the pruned subset of step 3, sized to the selection budget, is the result.

Lite means: no Image-Grounding score (it needs images) and no lifelong bookkeeping across
rounds (call it per round with the pool you keep). Deviations from the reference code:
- k-means is our own seeded torch implementation (greedy k-means++ on a sample of at most
  ``init_sample`` points, then full-batch Lloyd) rather than sklearn's MiniBatchKMeans:
  scikit-learn is not a lorakit dependency, and this one is deterministic given the seed.
- Budgets sum exactly to B (the reference rounds each share up and may overshoot).
- The entropy histogram spans [−4, 4] in z-units (the reference builds bins from the raw
  standard deviation but fills them with z-scores).
- CCS tops the draw up from the 5%/95% outliers when the central bins hold fewer than the
  budget, so the selection has exactly the asked size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorakit.core.adapter import check_positive_int
from lorakit.errors import ConfigError

SAMPLERS = ("ccs", "lowest", "highest", "random")


@dataclass
class AdaptInfConfig:
    """n_clusters: K pseudo-skills; prune_fraction: share of the pool kept by redundancy pruning
    (None: no separate pruning step); fraction: share of the pool selected; sampler: "ccs",
    "lowest", "highest" or "random" (used when scores are given); bins: CCS and entropy bins;
    iters / tol: Lloyd iterations and relative inertia tolerance; init_sample: k-means++ sample;
    n_init: k-means restarts (the best inertia is kept)."""

    n_clusters: int = 10
    prune_fraction: float | None = None
    fraction: float = 0.05
    sampler: str = "ccs"
    bins: int = 50
    seed: int = 0
    iters: int = 100
    tol: float = 1e-6
    init_sample: int = 10000
    n_init: int = 4

    def __post_init__(self) -> None:
        for name in ("n_clusters", "bins", "iters", "init_sample", "n_init"):
            check_positive_int(name, getattr(self, name))
        for name in ("fraction", "prune_fraction"):
            v = getattr(self, name)
            if v is None and name == "prune_fraction":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {v!r}")
        if self.prune_fraction is not None and self.prune_fraction < self.fraction:
            raise ConfigError(f"prune_fraction ({self.prune_fraction}) must be >= fraction ({self.fraction}): "
                              "the selection is drawn from the pruned pool")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or self.tol < 0:
            raise ConfigError(f"tol must be >= 0, got {self.tol!r}")


# -- 1. k-means ----------------------------------------------------------------------------------
def _sq_dists(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """‖x_j − c_k‖² (n, k), computed in row chunks."""
    cn = c.square().sum(1)
    out = torch.empty(len(x), len(c), dtype=x.dtype)
    for a in range(0, len(x), chunk):
        xb = x[a:a + chunk]
        out[a:a + chunk] = (xb.square().sum(1, keepdim=True) - 2 * xb @ c.T + cn).clamp_min(0)
    return out


def _kmeans_pp(sample: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): each new center is the best of 2 + ⌊ln k⌋
    candidates drawn with probability ∝ squared distance to the nearest chosen center."""
    trials = 2 + int(math.log(k))
    first = sample[int(torch.randint(len(sample), (1,), generator=g))]
    centers = [first]
    d2 = _sq_dists(sample, first[None])[:, 0]
    for _ in range(1, k):
        probs = d2 if d2.sum() > 0 else torch.ones_like(d2)
        cand = torch.multinomial(probs, trials, replacement=True, generator=g)
        new_d2 = torch.minimum(d2[:, None], _sq_dists(sample, sample[cand]))  # (n, trials)
        best = int(new_d2.sum(0).argmin())
        centers.append(sample[cand[best]])
        d2 = new_d2[:, best]
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100, tol: float = 1e-6,
           init_sample: int = 10000, n_init: int = 4) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means from ``n_init`` greedy k-means++ seedings; the lowest inertia wins.
    Deterministic given ``seed``.

    Returns (labels (n,) int64, centers (k, d), inertia Σ_j ‖x_j − μ_c(j)‖²). An empty cluster
    is re-seeded with the point farthest from its center.
    """
    check_positive_int("k", k)
    check_positive_int("n_init", n_init)
    if x.dim() != 2 or len(x) < k:
        raise ConfigError(f"k-means needs an (n, d) tensor with n >= k={k}, got shape {tuple(x.shape)}")
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        sample = x if len(x) <= init_sample else x[torch.randperm(len(x), generator=g)[:init_sample]]
        run = _lloyd(x, _kmeans_pp(sample, k, g), iters, tol)
        if best is None or run[2] < best[2]:
            best = run
    labels, mu, inertia = best
    return labels, mu.float(), inertia


def _lloyd(x: torch.Tensor, mu: torch.Tensor, iters: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    k = len(mu)
    prev = math.inf
    for _ in range(iters):
        dist = _sq_dists(x, mu)
        labels = dist.argmin(1)
        inertia = float(dist.gather(1, labels[:, None]).sum())
        counts = torch.bincount(labels, minlength=k)
        mu = torch.zeros_like(mu).index_add_(0, labels, x) / counts.clamp_min(1)[:, None].to(x.dtype)
        served = dist.gather(1, labels[:, None])[:, 0]
        for e in (counts == 0).nonzero().flatten().tolist():  # empty: take the worst-served point
            far = int(served.argmax())
            mu[e], served[far] = x[far], -1.0
        if prev - inertia <= tol * max(inertia, 1e-12):
            break
        prev = inertia
    dist = _sq_dists(x, mu)
    labels = dist.argmin(1)
    return labels, mu, float(dist.gather(1, labels[:, None]).sum())


# -- 2. budgets ----------------------------------------------------------------------------------
def cluster_budgets(sizes: list[int], budget: int) -> list[int]:
    """Split ``budget`` over clusters: equal shares, clusters below their share keep everything
    and the rest is re-split over the larger ones. Sums exactly to min(budget, Σ sizes)."""
    if any(s < 0 for s in sizes) or not sizes:
        raise ConfigError(f"cluster sizes must be a non-empty list of counts >= 0, got {sizes}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"budget must be an integer >= 0, got {budget!r}")
    remaining = min(budget, sum(sizes))
    out = [0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))  # smallest first
    left = list(order)
    while left and sizes[left[0]] * len(left) < remaining:  # smaller than its (real) share
        i = left.pop(0)
        out[i] = sizes[i]
        remaining -= sizes[i]
    if left:
        base, extra = divmod(remaining, len(left))
        for rank, i in enumerate(sorted(left, key=lambda i: (-sizes[i], i))):  # +1 to the largest
            out[i] = base + (1 if rank < extra else 0)
    return out


# -- 3. redundancy pruning -----------------------------------------------------------------------
def redundancy(x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """M_j = max_{i<j} ⟨x̂_i, x̂_j⟩ over unit rows x̂ (−inf for the first row): (n,).

    Computed in column chunks, so memory is O(n · chunk) rather than O(n²).
    """
    x = torch.nn.functional.normalize(x.float(), dim=1)
    m = torch.full((len(x),), -math.inf)
    for a in range(0, len(x), chunk):
        b = min(a + chunk, len(x))
        sim = x[:b] @ x[a:b].T  # (b, b - a): rows i < b, columns j in [a, b)
        i = torch.arange(b)[:, None]
        j = torch.arange(a, b)[None, :]
        sim = sim.masked_fill(i >= j, -math.inf)
        m[a:b] = sim.max(0).values
    return m


def semdedup(x: torch.Tensor, labels: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Per cluster k keep the ``keep[k]`` least redundant members (smallest M_j, ties by
    position); returns the kept positions in increasing order."""
    kept = []
    for k, budget in enumerate(keep):
        members = (labels == k).nonzero().flatten()
        if budget <= 0 or len(members) == 0:
            continue
        m = redundancy(x[members])
        order = torch.sort(m, stable=True).indices  # stable: equal M keeps the earlier member first
        kept.append(members[order[:budget]])
    return torch.sort(torch.cat(kept)).values if kept else torch.empty(0, dtype=torch.long)


# -- 4. scoring-function choice and sampling -----------------------------------------------------
def hist_entropy(scores: torch.Tensor, bins: int = 50) -> float:
    """Shannon entropy (bits) of the histogram of z-scored ``scores`` over [−4, 4] in ``bins``
    bins: high for scores that spread the samples out, low for a spike plus outliers."""
    s = torch.nan_to_num(scores.double())
    if len(s) < 2 or s.std() == 0:
        return 0.0
    z = (s - s.mean()) / s.std()
    z = z[z.abs() <= 4]  # beyond ±4σ: outside every bin, as in the reference
    counts = torch.histc(z, bins=bins, min=-4, max=4)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def ccs_sample(scores: torch.Tensor, budget: int, bins: int = 50, seed: int = 0) -> torch.Tensor:
    """Coverage-centric sampling: split [5th, 95th] percentile of ``scores`` into ``bins``
    equal-width bins and, from the highest bin down, draw ceil(remaining / bins left) at
    random from each (all of a bin that holds fewer); top up from the outliers if short.
    Returns ``min(budget, n)`` positions."""
    n = len(scores)
    budget = min(budget, n)
    if budget <= 0:
        return torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    s = torch.nan_to_num(scores.double())
    srt = torch.sort(s).values
    low, high = float(srt[int(n * 0.05)]), float(srt[min(n - 1, int(n * 0.95))])
    width = (high - low) / bins
    chosen, remaining = [], budget
    right = high
    for b in range(bins):
        left = low if b == bins - 1 else right - width
        inside = ((s > left) & (s <= right)) if b < bins - 1 else ((s >= left) & (s <= right))
        cand = inside.nonzero().flatten()
        quota = math.ceil(remaining / (bins - b))
        take = cand if len(cand) <= quota else cand[torch.randperm(len(cand), generator=g)[:quota]]
        chosen.append(take)
        remaining -= len(take)
        right = left
        if remaining <= 0:
            break
    picked = torch.unique(torch.cat(chosen))[:budget] if chosen else torch.empty(0, dtype=torch.long)
    if len(picked) < budget:  # outliers (beyond the 5th/95th percentile) fill what is missing
        rest = torch.ones(n, dtype=torch.bool)
        rest[picked] = False
        others = rest.nonzero().flatten()
        picked = torch.cat([picked, others[torch.randperm(len(others), generator=g)[:budget - len(picked)]]])
    return torch.sort(picked).values


def _sample(scores: torch.Tensor, budget: int, sampler: str, bins: int, seed: int) -> torch.Tensor:
    if sampler == "ccs":
        return ccs_sample(scores, budget, bins, seed)
    if sampler == "random":
        return torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))[:budget]
    order = torch.sort(torch.nan_to_num(scores.double()), descending=sampler == "highest", stable=True).indices
    return order[:budget]


# -- the whole pipeline ----------------------------------------------------------------------------
@dataclass
class AdaptInfSelection:
    """indices: selected positions (increasing); labels: skill cluster of every example;
    pool: positions kept by redundancy pruning; scorer: the scoring function chosen per cluster."""

    indices: torch.Tensor
    labels: torch.Tensor
    centers: torch.Tensor
    pool: torch.Tensor
    scorer: list[str | None]


def adapt_inf_select(features, scores: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                     config: AdaptInfConfig | None = None) -> AdaptInfSelection:
    """Cluster ``features`` into skills, prune redundancy per cluster, select per cluster.

    Args:
        features: (n, d) tensor, or a ``lorakit.data.less.FeatureStore`` (loaded into memory).
        scores: optional importance scores, (n,) or a dict name -> (n,) (a pool of scoring
            functions; the most spread-out one is chosen per cluster). Without scores the
            selection keeps the least redundant members of each cluster.
        config: ``AdaptInfConfig``.
    """
    cfg = config or AdaptInfConfig()
    x = features.features() if hasattr(features, "features") else torch.as_tensor(features)
    if x.dim() != 2 or len(x) == 0:
        raise ConfigError(f"features must be a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    n = len(x)
    if cfg.n_clusters > n:
        raise ConfigError(f"n_clusters={cfg.n_clusters} exceeds the number of examples ({n})")
    pool_scores = _score_pool(scores, n)
    x = torch.nn.functional.normalize(x.float(), dim=1)  # the reference clusters unit vectors
    labels, centers, _ = kmeans(x, cfg.n_clusters, cfg.seed, cfg.iters, cfg.tol, cfg.init_sample, cfg.n_init)
    k = cfg.n_clusters
    sizes = torch.bincount(labels, minlength=k).tolist()
    budget = max(1, round(cfg.fraction * n))
    pool = torch.arange(n)
    if cfg.prune_fraction is not None:
        pool = semdedup(x, labels, cluster_budgets(sizes, max(budget, round(cfg.prune_fraction * n))))
    if pool_scores is None:  # the least redundant members per cluster (a prefix of the pruning order)
        selected = semdedup(x, labels, cluster_budgets(sizes, budget))
        return AdaptInfSelection(selected, labels, centers, pool, [None] * k)
    pool_labels = labels[pool]
    per_cluster = cluster_budgets(torch.bincount(pool_labels, minlength=k).tolist(), budget)
    chosen, scorer = [], []
    for c in range(k):
        members = pool[pool_labels == c]
        if per_cluster[c] == 0 or len(members) == 0:
            scorer.append(None)
            continue
        name = max(pool_scores, key=lambda s: (hist_entropy(pool_scores[s][members], cfg.bins), s))
        scorer.append(name)
        picked = _sample(pool_scores[name][members], per_cluster[c], cfg.sampler, cfg.bins, cfg.seed + c)
        chosen.append(members[picked])
    indices = torch.sort(torch.cat(chosen)).values
    return AdaptInfSelection(indices, labels, centers, pool, scorer)


def _score_pool(scores, n: int) -> dict[str, torch.Tensor] | None:
    if scores is None:
        return None
    pool = dict(scores) if isinstance(scores, Mapping) else {"score": scores}
    if not pool:
        raise ConfigError("scores is an empty dict; pass None to select by redundancy alone")
    out = {}
    for name, s in pool.items():
        s = torch.as_tensor(s).flatten().double()
        if len(s) != n:
            raise ConfigError(f"scores[{name!r}] has {len(s)} values for {n} examples")
        out[str(name)] = s
    return out


__all__ = [
    "AdaptInfConfig",
    "AdaptInfSelection",
    "adapt_inf_select",
    "ccs_sample",
    "cluster_budgets",
    "hist_entropy",
    "kmeans",
    "redundancy",
    "semdedup",
]
