"""TriAdaptLoRA: triangular adaptive low-rank adaptation (Liang, Wang, Zeng, arXiv:2501.08008).

A rank-growing LoRA whose r × r core is a full matrix, split into a lower and an upper
triangular part so that growing the rank only *adds* a row strip and a column strip:

    h = W0 x + (α / r) · B_r C_r A_r x,      C_r = tril(L_r) + triu(U_r)   (r, r)
        A = lora_A: (cap, d_in) ~ N(0, 0.02),  B = lora_B: (d_out, cap) ~ N(0, 0.02),
        L = lora_L, U = lora_U: (cap, cap) = 0       (X_r: the leading r rows/columns)

C = 0 at the start, so the adapter starts as the base model. Growing a module from r to r'
activates A's rows r..r'−1 and B's columns r..r'−1 (fresh N(0, 0.02) values) and, in C, the
new rows of L (lower strip C[r:r', :r']) and the new columns of U (upper strip C[:r, r:r'])
— both zero, so the learned C_r is kept and ΔW only rescales by r / r' (the scale is α / r with
the current r, as in the reference code's `scaling / ranknum`). Diagonal entries belong to both
parts (C_ii = L_ii + U_ii), as the reference's row and column blocks both cover the diagonal
block; with rank 1 both parts are in use.

Importance (cheap: no gradients, only at allocation steps) — the normalised Frobenius norm of
the core and its change since the last allocation:

    N_k = ‖C_k‖_F / g_k        (g_k: the module's rank groups, 1 + times it grew)
    S_k = N_k(t) − N_k(t_prev)

Adaptive threshold: at each allocation step t (tinit < t < T − tfinal, t % interval == 0)
while Σ r < b (b = budget, default target_r · n), with m = (t − tinit) / (T − tfinal − tinit)
and ℓ = b − Σ r the ranks left,

    n_t = ⌊ℓ · m⌋ ("linear")   or   ⌊exp(m · ln ℓ)⌋ = ⌊ℓ^m⌋ ("exponential"),   clamped to [1, n]

and the n_t modules with the highest S (the threshold is the n_t-th largest score) grow by
add_r ranks each (fewer where max_r or the budget would be passed: b is never exceeded).
Orthogonality regulariser on the live A_r, B_r (weight orth_reg_weight), as IncreLoRA's.

The triangular split, the ‖C‖_F / g importance, its difference between allocations and the
linear / exponential n_t follow a PEFT-style reference implementation of the paper
(`TriAdaptLoraLayer.compute_score`, `RankAllocator.compute_threshold`); we differ where it
cannot work or could overshoot: it zero-initialises B and C (every gradient is then zero; we
use N(0, 0.02) for A and B, C = 0), lets ties at the threshold and whole add_r steps pass the
budget (we cap), and uses T − tinit (we end the growth window at T − tfinal; tfinal = 0 is the
reference). The shared machinery — budget, schedule, pre-allocated slots with fresh-row Adam
restarts, pruning into the config's `ranks` — is IncreLoRA's `GrowthAllocator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import (
    AdapterConfig,
    LayerSpec,
    check_finite_nonneg,
    check_nonneg_int,
    check_positive_int,
    check_range,
    keep_ranks_,
)
from lorakit.core.inject import adapter_modules, prune_adapter, state
from lorakit.core.registry import register_method
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.adalora import check_schedule
from lorakit.methods.increlora import (
    GrowthAllocator,
    add_live_orth_grad_,
    check_growth_ranks,
    check_optional_positive_int,
    growth_callback,
    live_orth_penalty,
    resolve_budget,
)

GROWTH_MODELS = ("linear", "exponential")


@dataclass
class TriAdaptLoraConfig(AdapterConfig):
    """init_r: rank each module starts with; target_r: average final rank (budget target_r · n
    unless `budget` is given; the reference's reference_rank); max_r: slots pre-allocated per
    module; budget: total final rank; add_r: ranks added to a chosen module (None: max(1,
    target_r // 2), the reference's incre_rank_num table); growth: "linear" or "exponential"
    (the reference's "non-linear") number of modules grown per allocation; interval: steps
    between allocations; tinit / tfinal: steps without growth at the start / end; alpha: scale
    numerator (s = α / current rank); dropout on the adapter input; orth_reg_weight: weight of
    the orthogonality regulariser; total_step: T (None: the Trainer's max_steps); ranks:
    per-module ranks after pruning ({path: rank}, written by `prune`, read by `load`).
    Defaults are the reference config's (init_rank 1, reference_rank 8, incre_interval 1,
    orth_reg_weight 0.5, linear growth).
    """

    init_r: int = 1
    target_r: int = 8
    max_r: int = 16
    budget: int | None = None
    add_r: int | None = None
    growth: str = "linear"
    interval: int | None = 1
    tinit: int = 0
    tfinal: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_growth_ranks(self.init_r, self.target_r, self.max_r, self.ranks)
        check_optional_positive_int("budget", self.budget)
        check_optional_positive_int("add_r", self.add_r)
        if self.growth not in GROWTH_MODELS:
            raise ConfigError(f"growth must be one of {GROWTH_MODELS}, got {self.growth!r}")
        check_optional_positive_int("interval", self.interval)
        check_nonneg_int("tinit", self.tinit)
        check_nonneg_int("tfinal", self.tfinal)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_finite_nonneg("orth_reg_weight", self.orth_reg_weight)
        if self.total_step is not None:
            check_positive_int("total_step", self.total_step)
            check_schedule(self.tinit, self.tfinal, self.total_step)

    @property
    def ranks_per_step(self) -> int:
        return self.add_r if self.add_r is not None else max(1, self.target_r // 2)


@register_method("triadaptlora", TriAdaptLoraConfig, paper="arXiv:2501.08008")
class TriAdaptLora(nn.Module):
    """TriAdaptLoRA: h = W0 x + (α/r) B (tril(L) + triu(U)) A x with r grown by ‖C‖_F-change thresholds."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"init_r": 1, "target_r": 2, "max_r": 3}

    def __init__(self, spec: LayerSpec, cfg: TriAdaptLoraConfig):
        super().__init__()
        self.spec = spec
        self.alpha = float(cfg.alpha)
        pruned = spec.name in cfg.ranks
        cap = cfg.ranks.get(spec.name, cfg.max_r)  # slots held: max_r, or the final rank after pruning
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.lora_A = nn.Parameter(torch.randn(cap, spec.in_features, **kw) * 0.02)  # (cap, d_in)
        self.lora_B = nn.Parameter(torch.randn(spec.out_features, cap, **kw) * 0.02)  # (d_out, cap)
        self.lora_L = nn.Parameter(torch.zeros(cap, cap, **kw))  # lower-triangular part of C
        self.lora_U = nn.Parameter(torch.zeros(cap, cap, **kw))  # upper-triangular part of C
        r = cap if pruned else min(cfg.init_r, cap)
        # [rank r, rank groups g], saved with the adapter (r fixes the live shapes, g normalises ‖C‖)
        self.register_buffer("growth_state", torch.tensor([r, 1], dtype=torch.long, device=spec.device))
        self._set_mask(cap)
        self._cache: tuple | None = None

    def _set_mask(self, cap: int) -> None:
        mask = torch.ones(cap, cap, dtype=torch.bool, device=self.lora_L.device).tril()
        self.register_buffer("tril_mask", mask, persistent=False)  # lower incl. diagonal; .T: upper

    @property
    def rank(self) -> int:
        s = self.growth_state
        key = (s._version, s.data_ptr())
        if self._cache is None or self._cache[0] != key:
            r, g = s.tolist()
            if not 0 < r <= self.capacity or g < 1:
                raise AdapterError(f"{self.spec.name}: growth_state must hold 0 < rank <= {self.capacity} "
                                   f"and groups >= 1, got {[r, g]}")
            self._cache = (key, r, g)
        return self._cache[1]

    @property
    def groups(self) -> int:
        self.rank  # noqa: B018 - refreshes the cache
        return self._cache[2]

    @property
    def capacity(self) -> int:
        return self.lora_L.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def core(self) -> torch.Tensor:
        """C_r = tril(L_r) + triu(U_r): (r, r)."""
        r = self.rank
        lower = self.tril_mask[:r, :r]  # (r, r) bool; masks instead of torch.tril/triu, whose
        return self.lora_L[:r, :r] * lower + self.lora_U[:r, :r] * lower.T  # CPU backward is ~100x slower

    def live_qp(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rank
        return self.lora_A[:r], self.lora_B[:, :r]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.live_qp()  # (r, d_in), (d_out, r)
        ca = self.core() @ a  # (r, d_in): C_r A_r, an r × d_in product, ΔW is never formed
        return F.linear(F.linear(self.dropout(x.to(a.dtype)), ca), b) * self.scale  # (..., d_in) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.live_qp()
        return (b @ (self.core() @ a)) * self.scale  # (d_out, d_in), merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact LoRA: A' = C_r A_r, B' = B_r; SVD-truncated to `rank`."""
        a, b = self.live_qp()
        a, b = (self.core() @ a).detach().clone(), b.detach().clone()
        if rank is not None and rank < a.shape[0]:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, self.scale

    def normalized_norm(self) -> float:
        """N = ‖C_r‖_F / g."""
        return float(torch.linalg.matrix_norm(self.core().detach().float(), ord="fro")) / self.groups

    @torch.no_grad()
    def grow_(self, k: int) -> tuple[int, int]:
        """Rank r -> r + k: new A rows / B columns join, the new C strips start at 0. Returns (r, r + k)."""
        r = self.rank
        if not 0 < k <= self.capacity - r:
            raise AdapterError(f"{self.spec.name}: cannot grow rank {r} by {k} (capacity {self.capacity})")
        r2 = r + k
        self.lora_L[r:r2, :r2] = 0.0  # lower strip: new rows
        self.lora_U[:r2, r:r2] = 0.0  # upper strip: new columns
        self.growth_state += torch.tensor([k, 1], device=self.growth_state.device)
        return r, r2

    @torch.no_grad()
    def prune_(self) -> int:
        """Keep the leading r slots (new, smaller parameters). Returns r."""
        r = self.rank
        if r == self.capacity:
            return r
        keep = torch.arange(r, device=self.lora_A.device)
        keep_ranks_(self, keep, {"lora_A": 0, "lora_B": 1, "lora_L": 0, "lora_U": 0})
        keep_ranks_(self, keep, {"lora_L": 1, "lora_U": 1})
        self._set_mask(r)
        return r

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: TriAdaptLoraConfig) -> list:
        """Orthogonality gradient + snapshot before, growth after each optimizer step; prune at the end."""
        resolve_budget(config.budget, config.target_r, triadaptlora_modules(model, name))  # fail before training
        return [growth_callback(model, name, TriAdaptAllocator)]


# -- model-level helpers ----------------------------------------------------------------------
def triadaptlora_modules(model: nn.Module, name: str = "default") -> dict[str, TriAdaptLora]:
    return adapter_modules(model, name, TriAdaptLora, "TriAdaptLoRA")


def rank_pattern(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Module path -> rank r."""
    return {p: m.rank for p, m in triadaptlora_modules(model, name).items()}


def orth_regularizer(model: nn.Module, name: str = "default") -> torch.Tensor:
    return live_orth_penalty(triadaptlora_modules(model, name).values())


def add_orth_grad_(model: nn.Module, weight: float, name: str = "default") -> None:
    """grad += ∂(weight · R)/∂θ (≡ adding weight·R to the loss)."""
    add_live_orth_grad_(triadaptlora_modules(model, name).values(), weight)


def prune(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Drop the unused slots; records the ranks in the config's `ranks`. Outputs unchanged."""
    mods = triadaptlora_modules(model, name)
    return prune_adapter(model, name, mods, state(model).configs[name].max_r)


def n_to_grow(growth: str, step: int, tinit: int, end: int, left: int, n_modules: int) -> int:
    """n_t: how many modules grow at step t (the adaptive threshold is the n_t-th largest score)."""
    m = (step - tinit) / (end - tinit)
    n = int(left * m) if growth == "linear" else int(math.exp(m * math.log(left)))
    return min(max(n, 1), n_modules)


class TriAdaptAllocator(GrowthAllocator):
    """TriAdaptLoRA's RankAllocator: ‖C‖_F / g changes, linear / exponential thresholds."""

    def __init__(self, model: nn.Module, name: str = "default", total_step: int | None = None):
        super().__init__(model, name, triadaptlora_modules(model, name), total_step, "TriAdaptLoRA")
        # N at the last allocation (0 for a fresh adapter, C = 0, as the reference's init score)
        self.prev = {p: m.normalized_norm() for p, m in self.mods.items()}
        if self.total_rank() >= self.budget:
            self.finalize()

    def factors(self):
        return (m.live_qp() for m in self.mods.values())

    def scores(self) -> dict[str, float]:
        """S = N(t) − N(t_prev) for every module; t_prev becomes t."""
        now = {p: m.normalized_norm() for p, m in self.mods.items()}
        out = {p: now[p] - self.prev[p] for p in now}
        self.prev = now
        return out

    def n_to_grow(self, step: int, left: int) -> int:
        c = self.cfg
        return n_to_grow(c.growth, step, c.tinit, self.total_step - c.tfinal, left, len(self.mods))

    def grow(self, path: str, k: int, step: int, optimizer) -> None:
        m = self.mods[path]
        r, r2 = m.grow_(k)
        new = list(range(r, r2))
        for pname, dim in (("lora_A", 0), ("lora_B", 1), ("lora_L", 0), ("lora_U", 1)):
            self.rows.add(getattr(m, pname), dim, new, step, optimizer)
        # as the reference, `prev` keeps N with the old g: the grown module's next score also
        # carries the drop from ‖C‖/g to ‖C‖/(g + 1)
