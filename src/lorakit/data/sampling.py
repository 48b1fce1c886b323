"""Sampling several languages over training: temperature Cooldown vs loss upweighting
("Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets", Li, Xu, Tan,
Murray, Khashabi; arXiv:2410.04579).

Sources (languages) i = 1..K hold n_i examples; natural sampling draws source i with
q_i = n_i / N. Two ways to give the small sources more say:

    upsample  (Temperature Sampling)  draw source i with p_i(T) = n_i^(1/T) / sum_j n_j^(1/T)
    upweight  (Scalarization)         draw naturally (q) and weight each example's loss by
                                      w_i = p_i(T) / q_i

They have the same expected loss, E_{i~q}[w_i L_i] = sum_i q_i (p_i / q_i) L_i =
sum_i p_i L_i = E_{i~p}[L_i], hence the same full-batch gradient (and E_q[w] = 1, so the
loss keeps its scale); with SGD they differ in variance: upsampling estimates the gradient
with lower variance and converges faster but overfits the repeated small sources. The
paper's **Cooldown** gets both: start at a high temperature and lower it during training,

    T(s) = T_start                                        s <  s0
    T(s) = T_end + (T_start - T_end) * (1 - g(u))         s0 <= s < s1,  u = (s - s0) / (s1 - s0)
    T(s) = T_end                                          s >= s1

with s0 = start * total_steps, s1 = end * total_steps and g(u) = u ("linear"),
(1 - cos(pi u)) / 2 ("cosine"); ``start == end`` switches at once (a step). T(s) is
non-increasing, so the share of the smallest source never grows and that of the largest
never shrinks as training goes on. The sampling probabilities at step s are
``lorakit.data.mix.temperature_weights(sizes, T(s))``.

The schedule defaults (T 5 -> 1, cooling linearly over the whole run) are common choices,
not the paper's tuned values; set ``start``/``end`` to cool later or abruptly.

How to use it with ``transformers.Trainer`` (no Trainer subclass needed): wrap the sources in
``ScheduledMixDataset`` (an ``IterableDataset``) with ``examples_per_step`` = per-device batch
size x gradient accumulation x number of processes, the number of examples one optimizer
step consumes. Example k is drawn at step k // examples_per_step, so the schedule follows the
optimizer steps, and the stream is a pure function of the seed (resuming a checkpoint replays
it exactly). ``ScheduledMixSampler`` gives the same stream as indices into a
``ConcatDataset`` of the sources (for a plain DataLoader or a Trainer whose
``_get_train_sampler`` returns it). For upweighting, sample naturally (``T_start = T_end = 1``,
``tag_source`` set) and compute the loss with ``upweighted_lm_loss``.

Within a source, examples are taken in a seeded random order without replacement, and a new
order starts when all are used (epoch-style), so a small upsampled source is repeated evenly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import ConcatDataset, IterableDataset, Sampler

from lorakit.data.mix import temperature_weights
from lorakit.errors import ConfigError

__all__ = [
    "SHAPES",
    "ScheduledMixDataset",
    "ScheduledMixSampler",
    "TemperatureSchedule",
    "per_example_lm_loss",
    "schedule_indices",
    "upweight_weights",
    "upweighted_lm_loss",
    "upweighted_loss",
]

SHAPES = ("linear", "cosine")


@dataclass(frozen=True)
class TemperatureSchedule:
    """Cooldown: T goes from ``t_start`` down to ``t_end`` (see module docs).

    Attributes:
        total_steps: optimizer steps of the run (> 0).
        t_start: temperature at the start (> 0, finite; T = 1 is natural sampling).
        t_end: temperature at the end (0 < t_end <= t_start).
        start, end: fractions of ``total_steps`` where cooling begins and ends
            (0 <= start <= end <= 1; ``start == end`` is an abrupt switch).
        shape: ``"linear"`` or ``"cosine"`` interpolation between them.
    """

    total_steps: int
    t_start: float = 5.0
    t_end: float = 1.0
    start: float = 0.0
    end: float = 1.0
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ConfigError(f"total_steps must be a positive int, got {self.total_steps!r}")
        for name in ("t_start", "t_end"):
            t = getattr(self, name)
            if not isinstance(t, (int, float)) or not 0 < t < math.inf:
                raise ConfigError(f"{name} must be a finite temperature > 0, got {t!r}")
        if self.t_end > self.t_start:
            raise ConfigError(f"a cooldown lowers the temperature: t_end ({self.t_end}) must be <= "
                              f"t_start ({self.t_start})")
        if not 0 <= self.start <= self.end <= 1:
            raise ConfigError(f"need 0 <= start <= end <= 1, got start={self.start!r}, end={self.end!r}")
        if self.shape not in SHAPES:
            raise ConfigError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")

    def temperature(self, step: int) -> float:
        """T at optimizer step ``step`` (0-based; steps past the end keep ``t_end``)."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        s0, s1 = self.start * self.total_steps, self.end * self.total_steps
        if step < s0:
            return float(self.t_start)
        if step >= s1:
            return float(self.t_end)
        u = (step - s0) / (s1 - s0)
        g = u if self.shape == "linear" else (1 - math.cos(math.pi * u)) / 2
        return self.t_end + (self.t_start - self.t_end) * (1 - g)

    def probabilities(self, sizes: Mapping[str, int], step: int) -> dict[str, float]:
        """Sampling probabilities p_i(T(step)) of the sources."""
        return temperature_weights(dict(sizes), self.temperature(step))


def _check_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(sizes, Mapping) or not sizes:
        raise ConfigError(f"sizes must be a non-empty mapping source name -> number of examples, got {sizes!r}")
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"size of source {name!r} must be an int >= 0, got {n!r}")
    if not any(sizes.values()):
        raise ConfigError(f"at least one source must be non-empty, got {dict(sizes)}")
    return dict(sizes)


# --------------------------------------------------------------------------- upsampling (sampler)


def schedule_indices(
    sizes: Mapping[str, int],
    schedule: TemperatureSchedule,
    examples_per_step: int,
    num_steps: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The example stream of a temperature schedule.

    Args:
        sizes: source name -> number of examples, in the order of the concatenated dataset.
        schedule: the temperature schedule.
        examples_per_step: examples one optimizer step consumes (batch x accumulation x
            processes).
        num_steps: steps to draw (default ``schedule.total_steps``).
        seed: random seed; the stream depends on nothing else.

    Returns:
        ``(sources, indices)``: LongTensors ``(num_steps * examples_per_step,)``; example k comes
        from source ``sources[k]`` (position in ``sizes``) at row ``indices[k]`` of that source.
    """
    sizes = _check_sizes(sizes)
    if not isinstance(examples_per_step, int) or examples_per_step < 1:
        raise ConfigError(f"examples_per_step must be a positive int, got {examples_per_step!r}")
    num_steps = schedule.total_steps if num_steps is None else num_steps
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive int, got {num_steps!r}")
    names = list(sizes)
    gen = torch.Generator().manual_seed(seed)
    rows_by_t: dict[float, list[float]] = {}  # T is piecewise constant: compute each distinct T once
    table = []
    for s in range(num_steps):
        t = schedule.temperature(s)
        if t not in rows_by_t:
            p = temperature_weights(sizes, t)
            rows_by_t[t] = [p[n] for n in names]
        table.append(rows_by_t[t])
    probs = torch.tensor(table, dtype=torch.float64)  # (steps, K)
    cdf = probs.cumsum(1)
    u = torch.rand(num_steps, examples_per_step, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    # inverse CDF; right=True skips sources of probability 0 (flat stretches of the CDF)
    src = torch.searchsorted(cdf, u, right=True)
    last = torch.tensor([max(i for i, p in enumerate(row) if p > 0) for row in probs.tolist()])
    src = torch.minimum(src, last[:, None]).reshape(-1)  # u == cdf[-1] by rounding: the last real source
    rows = torch.empty_like(src)
    for i, name in enumerate(names):
        at = (src == i).nonzero().flatten()
        if len(at):
            rows[at] = _epoch_order(sizes[name], len(at), gen)
    return src, rows


def _epoch_order(size: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` rows of a source of ``size``: fresh random permutations, concatenated."""
    epochs = -(-count // size)
    return torch.cat([torch.randperm(size, generator=gen) for _ in range(epochs)])[:count]


class ScheduledMixSampler(Sampler[int]):
    """Indices into ``ConcatDataset(list(datasets.values()))`` following a temperature
    schedule (see ``schedule_indices``; ``sizes`` in the same order as the datasets).

    ``len(sampler) == num_steps * examples_per_step``; iterating twice gives the same order.
    ``sources`` holds the source position of each index, ``offsets`` the first global index
    of each source.
    """

    def __init__(self, sizes: Mapping[str, int], schedule: TemperatureSchedule, examples_per_step: int,
                 num_steps: int | None = None, seed: int = 0):
        self.sizes = _check_sizes(sizes)
        self.schedule = schedule
        self.sources, rows = schedule_indices(self.sizes, schedule, examples_per_step, num_steps, seed)
        self.offsets = torch.tensor([0, *list(self.sizes.values())[:-1]]).cumsum(0)
        self.indices = self.offsets[self.sources] + rows

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    @classmethod
    def for_datasets(cls, datasets: Mapping[str, object], schedule: TemperatureSchedule, examples_per_step: int,
                     num_steps: int | None = None, seed: int = 0) -> tuple[ConcatDataset, ScheduledMixSampler]:
        """``(ConcatDataset of the datasets, sampler over it)`` in one call."""
        sizes = {name: len(ds) for name, ds in datasets.items()}
        return ConcatDataset(list(datasets.values())), cls(sizes, schedule, examples_per_step, num_steps, seed)


class ScheduledMixDataset(IterableDataset):
    """An ``IterableDataset`` over several map-style datasets that follows a temperature
    schedule: usable as ``train_dataset`` of ``transformers.Trainer`` as it is.

    Args:
        datasets: source name -> dataset (``len`` and integer indexing).
        schedule: the temperature schedule.
        examples_per_step: per-device batch size x gradient accumulation x processes.
        num_steps: steps to draw (default ``schedule.total_steps``); ``len(self)`` is
            ``num_steps * examples_per_step``, so one Trainer epoch is exactly the schedule.
        seed: random seed.
        tag_source: if set, each example (a dict) is returned as a copy with this key holding
            the source position (an int) - e.g. ``"source_id"`` for ``upweighted_lm_loss``.

    Iterate with ``dataloader_num_workers=0``: several workers would each replay the stream.
    """

    def __init__(self, datasets: Mapping[str, object], schedule: TemperatureSchedule, examples_per_step: int,
                 num_steps: int | None = None, seed: int = 0, tag_source: str | None = None):
        if not isinstance(datasets, Mapping) or not datasets:
            raise ConfigError("datasets must be a non-empty mapping source name -> dataset")
        self.datasets = dict(datasets)
        self.names = list(self.datasets)
        sizes = {name: len(ds) for name, ds in self.datasets.items()}
        self.sources, self.rows = schedule_indices(sizes, schedule, examples_per_step, num_steps, seed)
        self.tag_source = tag_source

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ConfigError(f"ScheduledMixDataset was read by {info.num_workers} DataLoader workers, which would "
                              "each replay the whole stream; use num_workers=0 (or ScheduledMixSampler)")
        for s, r in zip(self.sources.tolist(), self.rows.tolist(), strict=True):
            ex = self.datasets[self.names[s]][r]
            if self.tag_source is not None:
                if not isinstance(ex, Mapping):
                    raise ConfigError(f"tag_source needs dict examples; source {self.names[s]!r} gave "
                                      f"{type(ex).__name__}")
                ex = {**ex, self.tag_source: s}
            yield ex


# --------------------------------------------------------------------------- upweighting (loss)


def upweight_weights(sizes: Mapping[str, int], T: float) -> dict[str, float]:
    """Per-example loss weights ``w_i = p_i(T) / q_i`` (q_i = n_i / N, natural sampling).

    Under natural sampling they give the expected loss of temperature-T sampling, and their
    expectation is 1. Empty sources get weight 0 (they are never drawn).
    """
    sizes = _check_sizes(sizes)
    p = temperature_weights(sizes, T)
    total = sum(sizes.values())
    return {k: (p[k] * total / n if n > 0 else 0.0) for k, n in sizes.items()}


def upweighted_loss(per_example: torch.Tensor, source_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_b w[source_b] * loss_b``: (B,) losses, (B,) source positions, (K,) weights -> scalar."""
    if per_example.ndim != 1 or source_ids.shape != per_example.shape:
        raise ConfigError(f"per_example and source_ids must both be (batch,), got {tuple(per_example.shape)} "
                          f"and {tuple(source_ids.shape)}")
    if source_ids.numel() and not 0 <= int(source_ids.min()) <= int(source_ids.max()) < len(weights):
        raise ConfigError(f"source_ids must index the {len(weights)} weights, got values in "
                          f"[{int(source_ids.min())}, {int(source_ids.max())}]")
    w = weights.to(device=per_example.device, dtype=per_example.dtype)[source_ids.long()]
    return (w * per_example).mean()


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence: (B, T, V) logits, (B, T) labels -> (B,).

    Labels are shifted by one as in transformers' causal LMs; a sequence with no target token
    gets loss 0.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ConfigError(f"logits must be (B, T, V) and labels (B, T), got {tuple(logits.shape)} "
                          f"and {tuple(labels.shape)}")
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                            ignore_index=ignore_index, reduction="none").view(lb.shape)
    n = (lb != ignore_index).sum(1)
    return tok.sum(1) / n.clamp(min=1)


def upweighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, source_ids: torch.Tensor,
                       weights: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Scalarization loss of a causal-LM batch: ``upweighted_loss(per_example_lm_loss(...))``.

    ``weights`` is the (K,) tensor of ``upweight_weights`` values in source order.
    """
    return upweighted_loss(per_example_lm_loss(logits, labels, ignore_index), source_ids, weights)
