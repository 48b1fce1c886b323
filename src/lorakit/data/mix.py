"""Mixing several corpora (languages, domains) into one training set.

Temperature sampling (arXiv:2410.04579, "Upsample or Upweight?"): draw from source i with

    p_i = n_i^(1/T) / sum_j n_j^(1/T)

T = 1 samples in proportion to size, T -> inf uniformly; T > 1 upsamples the small
(low-resource) sources. The paper's "Cooldown" starts at a high T and lowers it during
training; ``temperature_weights`` is the building block for such a schedule.
"""

from __future__ import annotations

import math

import torch

from lorakit.errors import ConfigError


def temperature_weights(sizes: dict[str, int], T: float) -> dict[str, float]:
    """Sampling probabilities ``p_i ∝ n_i^(1/T)``, summing to 1 (sources of size 0 get 0).

    Raises:
        ConfigError: ``T <= 0``, a negative size, or all sizes 0.
    """
    if not T > 0:  # also catches NaN; T = inf is allowed and gives uniform weights
        raise ConfigError(f"temperature T must be > 0, got {T}")
    if any(n < 0 for n in sizes.values()):
        raise ConfigError(f"sizes must be >= 0, got {sizes}")
    if not any(n > 0 for n in sizes.values()):
        raise ConfigError(f"at least one source must be non-empty, got {sizes}")
    # work in log space: n^(1/T) overflows floats for large n and small T
    logs = {k: math.log(n) / T for k, n in sizes.items() if n > 0}
    top = max(logs.values())
    scores = {k: math.exp(logs[k] - top) if k in logs else 0.0 for k in sizes}
    total = sum(scores.values())
    return {k: s / total for k, s in scores.items()}


def mix_blocks(
    sources: dict[str, torch.Tensor],
    weights: dict[str, float],
    n: int,
    seed: int = 0,
) -> torch.Tensor:
    """Draw ``n`` blocks, choosing each block's source with probability ∝ ``weights``.

    Within a source, blocks are taken in a seeded random order without replacement, and a new
    random order starts once all are used (epoch-style), so a small source is repeated evenly
    rather than some blocks many times and others never. The result depends only on the
    arguments (sources are visited in sorted name order, not dict order).

    Args:
        sources: name -> LongTensor ``(n_blocks_i, block_size)``, the same ``block_size`` for all.
        weights: name -> non-negative weight; names must be in ``sources``; a source without a
            weight is not drawn. Weights need not sum to 1.
        n: number of blocks to return.
        seed: random seed.

    Returns:
        Tensor ``(n, block_size)`` of the sources' dtype, blocks interleaved in draw order.

    Raises:
        ConfigError: unknown or negative weights, all weights 0, an empty source with a positive
            weight, differing block sizes, or ``n < 0``.
    """
    names = sorted(name for name, w in weights.items() if _check_weight(name, w, sources) > 0)
    if not names:
        raise ConfigError(f"at least one weight must be > 0, got {weights}")
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    block_sizes = {sources[name].shape[-1] for name in names}
    if len(block_sizes) != 1:
        raise ConfigError(f"sources have different block sizes {sorted(block_sizes)}; pack them alike")
    for name in names:
        if sources[name].ndim != 2 or len(sources[name]) == 0:
            raise ConfigError(f"source {name!r} must be a non-empty (n_blocks, block_size) tensor")

    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor([float(weights[name]) for name in names], dtype=torch.float64)
    choice = torch.multinomial(probs, n, replacement=True, generator=gen) if n else torch.empty(0, dtype=torch.long)

    out = torch.empty((n, block_sizes.pop()), dtype=sources[names[0]].dtype)
    for i, name in enumerate(names):
        rows = (choice == i).nonzero().flatten()  # positions in the output taken from this source
        picks = _epoch_order(len(sources[name]), len(rows), gen)
        out[rows] = sources[name][picks]
    return out


def _check_weight(name: str, weight: float, sources: dict[str, torch.Tensor]) -> float:
    if name not in sources:
        raise ConfigError(f"weight for unknown source {name!r}; sources are {sorted(sources)}")
    if not weight >= 0 or math.isinf(weight):
        raise ConfigError(f"weight for {name!r} must be a finite number >= 0, got {weight}")
    return weight


def _epoch_order(size: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` indices into ``range(size)``: concatenated fresh permutations, cut to length."""
    epochs = -(-count // size)  # ceil
    if epochs == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.randperm(size, generator=gen) for _ in range(epochs)])[:count]
