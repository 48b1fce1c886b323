"""EVA: explained variance adaptation (Paischer et al., arXiv:2410.07170).

A data-driven LoRA initialisation. Forward passes over the first `init_batches` training
batches feed each target layer's inputs x (tokens × d_in; padding and label-masked positions
dropped) to an incremental PCA. Then

    A = top-r_l right-singular vectors of the centred inputs   (r_l, d_in)
    B = 0                                                       (d_out, r_l)
    h = W0 x + s·B A x,   s = α / r  (adjust_scaling; α / r_l otherwise)

so the output equals the base at init, and A projects onto the directions in which the layer's
inputs vary most. The ranks r_l are redistributed across layers: every layer offers its first
round(ρ·r) components (ρ = 2: at most 2r per layer), all offers are ranked by explained
variance ratio (each layer's variance divided by that layer's total variance), and the top
r·n_layers win, so Σ r_l = r·n_layers, the budget of uniform rank r. A layer may get rank 0.
The incremental SVD stops for a layer once its needed components are stable: the cosine
similarity of each component with its value one batch earlier is ≥ τ (0.99); batches are
cycled until every layer is stable or `max_iters` forward passes have run.

The incremental PCA is scikit-learn's / PEFT's `IncrementalPCA.partial_fit` (exact mean and
variance updates; the SVD of [S·Vᵀ_prev; X − mean_batch; mean correction]; signs fixed so the
largest entry of each component is positive). Layers that receive the same input (q/k/v,
gate/up) share one PCA, as in PEFT's `get_eva_state_dict`.

The ranks are stored in the config (`ranks`: module path -> r_l), so saving writes them and
`lorakit.load` rebuilds every layer with its own shape before reading tensors. Before
`data_init` (e.g. when the contract suite injects without data) every layer is plain LoRA of
rank r: Kaiming A, zero B. Trainable parameters per module: r_l·(d_in + d_out).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.inject import state
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError
from lorakit.init._shared import (
    adapter_layers,
    check_number,
    check_svd_args,
    model_device,
    paused,
    seeded,
    take_batches,
    to_device,
)


@dataclass
class EvaConfig(AdapterConfig):
    """r: the average rank (budget r·n_layers); alpha: s = α/r; dropout on the adapter input;
    rho: a layer gets at most round(ρ·r) (≥ 1; 1 = no redistribution); tau: cosine-similarity
    threshold for stopping the incremental SVD; init_batches: distinct batches fed (cycled);
    max_iters: forward passes at most; whiten: divide A's rows by √(singular values);
    use_label_mask: drop positions whose label is -100 (and padding); adjust_scaling: keep
    s = α/r for every layer (PEFT's adjust_scaling_factors) instead of α/r_l; svd: "lowrank"
    (torch.svd_lowrank, PEFT's choice) or "full" for each incremental step; niter: its
    iterations; ranks: per-module ranks {module path: r_l}, written by data_init.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rho: float = 2.0
    tau: float = 0.99
    init_batches: int = 8
    max_iters: int = 32
    whiten: bool = False
    use_label_mask: bool = True
    adjust_scaling: bool = True
    svd: str = "lowrank"
    niter: int = 4
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha)
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_number("rho", self.rho, lo=1.0, lo_open=False)
        check_range("tau", self.tau, 0.0, 1.0, hi_open=False)
        check_positive_int("init_batches", self.init_batches)
        check_positive_int("max_iters", self.max_iters)
        check_svd_args(self.svd, self.niter)
        if not isinstance(self.ranks, dict):
            raise ConfigError(f"ranks must be a mapping {{module path: rank}}, got {self.ranks!r}")
        for k, v in self.ranks.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"ranks[{k!r}] must be a non-negative integer, got {v!r}")
        self.ranks = dict(self.ranks)


# -- incremental PCA -----------------------------------------------------------------------------
class IncrementalPCA:
    """Top-k principal components of a stream of (n, d) batches (scikit-learn's partial_fit).

    After each `partial_fit`: `components` (k, d), `singular_values` (k,) and
    `explained_variance_ratio` (k,) = S² / total sum of squared deviations of all data seen.
    """

    def __init__(self, n_components: int, method: str = "full", niter: int = 4, seed: int = 0):
        self.k, self.method, self.niter, self.seed = n_components, method, niter, seed
        self.n = 0
        self.mean: torch.Tensor | None = None  # (d,) float64
        self.m2: torch.Tensor | None = None  # (d,) float64, Σ (x − mean)²
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def _svd(self, m: torch.Tensor):
        q = 2 * self.k
        if self.method == "lowrank" and min(m.shape) > 3 * q:  # else the exact SVD is as cheap
            with seeded(m.device, self.seed):  # reproducible; the global RNG is left alone
                _, s, v = torch.svd_lowrank(m, q=q, niter=self.niter)
            return s, v.T
        _, s, vh = torch.linalg.svd(m, full_matrices=False)
        return s, vh

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> bool:
        """Update with a batch x (n, d). Returns False (and skips it) when n < k."""
        n, d = x.shape
        if n < self.k or self.k > d:
            return False
        x = x.float()
        xd = x.double()
        bmean = xd.mean(0)
        bm2 = (xd - bmean).square().sum(0)
        centred = x - bmean.float()
        if self.n == 0:
            mean, m2 = bmean, bm2
        else:  # Chan et al.'s pairwise update; the stacked matrix carries the old data
            total = self.n + n
            diff = bmean - self.mean
            mean = self.mean + diff * (n / total)
            m2 = self.m2 + bm2 + diff.square() * (self.n * n / total)
            correction = math.sqrt(self.n * n / total) * (self.mean - bmean)
            centred = torch.cat([self.singular_values[:, None] * self.components, centred, correction.float()[None]])
        s, vh = self._svd(centred)
        s, vh = s[: self.k], vh[: self.k]
        pivot = vh.abs().argmax(dim=1)  # sign convention: largest |entry| of each component > 0
        vh = vh * torch.sign(vh.gather(1, pivot[:, None]))
        self.n, self.mean, self.m2 = self.n + n, mean, m2
        self.components, self.singular_values = vh.contiguous(), s
        self.explained_variance_ratio = (s.double().square() / m2.sum().clamp_min(1e-30)).float()
        return True


def distribute_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Give the `budget` largest explained-variance ratios to their layers: {layer: rank}.

    ratios[layer] (descending within a layer) holds the components the layer may get, so every
    layer's rank is at most len(ratios[layer]); ties go to the earlier layer.
    """
    keys = [k for k, v in ratios.items() for _ in range(len(v))]
    if not keys:
        return {k: 0 for k in ratios}
    values = torch.cat([v.float().reshape(-1) for v in ratios.values()])
    order = torch.argsort(values, descending=True, stable=True)[:budget]
    counts = Counter(keys[i] for i in order.tolist())
    return {k: counts.get(k, 0) for k in ratios}


def _fingerprint(x: torch.Tensor) -> tuple:
    """A cheap, order-sensitive hash of a layer input, to find layers fed the same tensor values."""
    x = x.detach().double().reshape(-1, x.shape[-1])
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(x.shape[-1], generator=g, dtype=torch.float64).to(x.device)
    rows = torch.linspace(1.0, 2.0, x.shape[0], dtype=torch.float64, device=x.device)
    return tuple(x.shape), round(float((x @ probe * rows).sum()), 6), round(float(x.square().sum()), 6)


@register_method("eva", EvaConfig, paper="arXiv:2410.07170")
class Eva(nn.Module):
    """EVA: LoRA with A from the top principal components of each layer's inputs, B = 0, ranks by explained variance."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"r": 4}

    def __init__(self, spec: LayerSpec, cfg: EvaConfig):
        super().__init__()
        self.spec = spec
        self.r = r = cfg.ranks.get(spec.name, cfg.r)
        self.scale = cfg.alpha / cfg.r if cfg.adjust_scaling or r == 0 else cfg.alpha / r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        with warnings.catch_warnings():  # rank 0: torch warns that initialising an empty tensor is a no-op
            warnings.simplefilter("ignore", UserWarning)
            self.lora_A = nn.Linear(spec.in_features, r, bias=False, **kw)  # (r_l, d_in)
            self.lora_B = nn.Linear(r, spec.out_features, bias=False, **kw)  # (d_out, r_l)
        if r > 0:  # plain LoRA until data_init replaces A
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # (..., d_in) -> (..., r_l) -> (..., d_out); ΔW is never formed
        return self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (d_out, d_in) — merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact: (A, B, s). A rank-0 layer exports as an all-zero rank-1 pair (PEFT needs r ≥ 1)."""
        if self.r == 0:
            w = self.lora_A.weight
            return w.new_zeros(1, self.spec.in_features), w.new_zeros(self.spec.out_features, 1), self.scale
        a, b = self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone()
        if rank is not None and 0 < rank < self.r:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, self.scale

    @classmethod
    def data_init(cls, model: nn.Module, name: str, config: EvaConfig, batches) -> None:
        """Incremental PCA of every target layer's inputs; redistribute ranks; rebuild the adapters."""
        taken = take_batches(batches, config.init_batches)
        layers = adapter_layers(model, name)
        device = model_device(model)
        budget = config.r * len(layers)
        max_comp = {p: min(round(config.r * config.rho), layer.spec(p).in_features) for p, layer in layers.items()}
        current: dict = {"mask": None}

        def tokens(args) -> torch.Tensor:  # layer input -> (tokens, d_in), masked positions dropped
            x = args[0]
            mask = current["mask"]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                return x[mask].detach()
            return x.detach().reshape(-1, x.shape[-1])

        def run(batch) -> None:
            batch = to_device(batch, device)
            mask = batch.get("attention_mask")
            ids = batch.get("input_ids")
            mask = mask.bool() if mask is not None else (torch.ones_like(ids, dtype=torch.bool) if ids is not None else None)
            labels = batch.get("labels")
            if config.use_label_mask and mask is not None and labels is not None and labels.shape == mask.shape:
                mask = mask & (labels != -100)
            current["mask"] = mask
            model(**{k: v for k, v in batch.items() if k != "labels"})

        with paused(model, name, training=False), torch.no_grad():
            # 1. layers fed the same values (q/k/v, gate/up) share one PCA
            prints: dict[str, tuple] = {}

            def record(path):
                def hook(module, args, output):  # returns None: the output is left alone
                    prints.setdefault(path, _fingerprint(tokens(args)))
                return hook

            handles = [layer.register_forward_hook(record(p)) for p, layer in layers.items()]
            try:
                run(taken[0])
            finally:
                for h in handles:
                    h.remove()
            missing = sorted(set(layers) - set(prints))
            if missing:
                raise ConfigError(f"EVA: layers {missing[:3]} received no input in a forward pass; target other modules")
            first: dict[tuple, str] = {}
            leader = {p: first.setdefault(prints[p], p) for p in layers}
            members: dict[str, list[str]] = {}
            for p, lead in leader.items():
                members.setdefault(lead, []).append(p)
            for lead, group in members.items():
                for p in group:
                    max_comp[p] = max(max_comp[q] for q in group)
            pca = {lead: IncrementalPCA(max_comp[lead], config.svd, config.niter) for lead in members}
            converged = {lead: torch.zeros(max_comp[lead], dtype=torch.bool) for lead in members}

            def fit(lead):
                def hook(module, args, output):
                    prev = pca[lead].components
                    if pca[lead].partial_fit(tokens(args).float()) and prev is not None:
                        sim = torch.nn.functional.cosine_similarity(pca[lead].components, prev, dim=1)
                        converged[lead] = (sim >= config.tau).cpu()
                return hook

            # 2. incremental SVD until the components each layer needs are stable
            rank_dist = dict(max_comp)
            for it in range(config.max_iters):
                need = {lead: max(rank_dist[p] for p in group) for lead, group in members.items()}
                active = [lead for lead in members if not bool(converged[lead][: need[lead]].all())]
                if not active:
                    break
                handles = [layers[lead].register_forward_hook(fit(lead)) for lead in active]
                try:
                    run(taken[it % len(taken)])
                finally:
                    for h in handles:
                        h.remove()
                if it + 1 >= len(taken) and any(pca[lead].components is None for lead in members):
                    break  # a full pass over the batches left a layer unfitted: more passes cannot help
                if all(pca[lead].components is not None for lead in members):
                    rank_dist = distribute_ranks(
                        {p: pca[leader[p]].explained_variance_ratio[: max_comp[p]] for p in layers}, budget
                    )
            else:  # max_iters used up
                need = {lead: max(rank_dist[p] for p in group) for lead, group in members.items()}
                unstable = [lead for lead in members if not bool(converged[lead][: need[lead]].all())]
                if unstable:
                    warnings.warn(f"EVA: {len(unstable)} layer input(s) not converged to tau={config.tau} after "
                                  f"max_iters={config.max_iters} forward passes; using the current components")
        unfitted = sorted(lead for lead in members if pca[lead].components is None)
        if unfitted:
            raise ConfigError(
                f"EVA: layers {unfitted[:3]} never saw a batch with at least {max_comp[unfitted[0]]} tokens; "
                "use larger batches or a smaller r·rho"
            )

        # 3. rebuild every adapter with its rank; A = its leading components, B = 0
        ranks = {p: int(rank_dist[p]) for p in layers}
        new_cfg = state(model).configs[name]  # recorded in place: train()'s log and lorakit.save see it
        new_cfg.ranks = ranks
        config.ranks = dict(ranks)
        for p, layer in layers.items():
            old = layer.adapters[name]
            new = cls(layer.spec(p), new_cfg)
            fitted = pca[leader[p]]
            a = fitted.components[: ranks[p]]
            if config.whiten:
                a = a / fitted.singular_values[: ranks[p], None].clamp_min(1e-12).sqrt()
            with torch.no_grad():
                new.lora_A.weight.copy_(a.to(new.lora_A.weight.dtype))
            trainable = any(q.requires_grad for q in old.parameters())
            layer.adapters[name] = new.to(device=layer.spec(p).device).train(old.training).requires_grad_(trainable)


def init_eva(model: nn.Module, batches, name: str = "default") -> nn.Module:
    """EVA initialisation of the injected adapter `name` for a custom training loop.

    `batches`: an iterable of batch dicts (input_ids, attention_mask, labels, ...) or a callable
    n -> batches. Rebuilds the adapter's layers with the redistributed ranks (create the optimizer
    afterwards) and records them in the adapter's config (`ranks`).
    """
    cfg = state(model).configs.get(name)
    if not isinstance(cfg, EvaConfig):
        raise ConfigError(f"adapter {name!r} is not an EVA adapter (config: {type(cfg).__name__})")
    Eva.data_init(model, name, cfg, batches)
    return model
