"""Non-IID client splits for federated simulations.

`dirichlet_split` is the label-skew partition of Hsu et al. (arXiv:1909.06335), the usual
benchmark for heterogeneous clients: for each class c, its samples (shuffled) are divided
among K clients in proportions q_c ~ Dir(α · 1_K). Small α: each client sees a few
classes; large α: close to IID.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lorakit.errors import ConfigError

__all__ = ["dirichlet_split"]


def dirichlet_split(labels, n_clients: int, alpha: float, seed: int = 0, min_size: int = 0,
                    max_tries: int = 100) -> list[list[int]]:
    """Split sample indices 0..N-1 among `n_clients` by label with Dirichlet(α) proportions.

    Every index goes to exactly one client; each client's list is sorted. Deterministic for a
    given seed. With `min_size`, the draw is repeated (up to `max_tries` times) until every
    client has at least that many samples.
    """
    if torch.is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ConfigError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients <= 0:
        raise ConfigError(f"n_clients must be a positive integer, got {n_clients!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive finite number, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ConfigError(f"min_size must be a non-negative integer, got {min_size!r}")
    if min_size * n_clients > labels.size:
        raise ConfigError(f"cannot give {n_clients} clients {min_size} samples each from {labels.size} samples")

    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            q = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = np.floor(np.cumsum(q)[:-1] * idx.size).astype(int)  # monotone, in [0, n_c]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split in {max_tries} tries gave every client >= {min_size} samples; "
        "raise alpha or lower min_size"
    )
