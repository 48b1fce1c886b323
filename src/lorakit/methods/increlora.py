"""IncreLoRA: incremental rank allocation with advance learning (Zhang et al., arXiv:2308.12043).

The update has AdaLoRA's SVD-shaped triplets (P[:, i], λ_i, Q[i]), but the number of
triplets in use *grows* during training instead of being pruned:

    h = W0 x + (α / r) · P Λ̃ Q x
        Q = lora_A: (cap, d_in) ~ N(0, 0.02),  λ = lora_E: (cap, 1) = 0,  P = lora_B: (d_out, cap) ~ N(0, 0.02)

Every module pre-allocates cap = max_r slots (so the optimizer holds every parameter from the
first step and growing never rebuilds it). Slot i is, in the buffer `slot_state`:

    active    i < r        λ̃_i = λ_i, trained                      (counted by the budget)
    reserved  r ≤ i < n    λ̃_i = λ_res = advance_lambda (1e-5), frozen; Q[i], P[:, i] trained
    dormant   i ≥ n        not computed at all

Reserved triplets are the paper's "advance learning": the authors' `add_reserve_param` gives
each module add_r spare triplets with a fixed singular value 1e-5 whose P and Q train (Adam
makes their step size independent of that scale) while they contribute ~nothing; a module that
grows activates them (λ starts at 1e-5 and is trained from then on) and reserves the next
ones. The scale is α / r with r the *current* rank, as the authors' `scaling / ranknum`:
growing a module from r to r' multiplies its existing update by r / r'.

Module importance, per step (authors' `SVDLinear.backward_hook` + `RankAllocator.update_ipt`):

    I  = Σ_ij |ΔW_ij · ∂L/∂ΔW_ij| / √(d_out d_in),   ΔW = (α/r) P Λ̃ Q,   ∂L/∂ΔW = Σ_tokens g xᵀ
    Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|,   S = Ī · Ū

(∂L/∂ΔW is formed from the layer input x and output gradient g in a backward hook, only while
ranks can still grow — a d_out × d_in product per module and step, as the authors' hook; with
gradient accumulation the micro-batch scores are summed.)

Schedule, with b the total budget (default target_r · n over the n adapted modules): at every
optimizer step t with tinit < t < T − tfinal and t % interval == 0, while Σ r < b, the top_h
modules by S that still have free slots grow by add_r ranks each (fewer when that would pass
max_r or b — the budget is never exceeded). Growth ends at the first step t ≥ T − tfinal or as
soon as Σ r = b: reserved slots turn dormant (the authors zero their λ̃) and importance tracking
stops. interval=None spreads the ⌈(b − Σ r_init) / (top_h · add_r)⌉ rounds evenly over
(tinit, T − tfinal). At the end of training the dormant slots are pruned (`prune`) and the
per-module ranks go to the config field `ranks`, so `lorakit.load` rebuilds the final shapes.

Orthogonality regulariser (authors' `compute_orth_regu`, weight reg_orth_coef = 0.1):

    R = mean over modules of ‖Q_n Q_nᵀ − I‖_F and ‖P_nᵀ P_n − I‖_F    (n live slots: active + reserved)

added as a gradient before each optimizer step, exactly as lorakit's AdaLoRA does (a callback
cannot change Trainer's loss). The authors apply it to each ParameterList piece separately
(each added triplet alone: only a norm constraint); we take the live block as a whole, which is
the orthogonality the paper asks for.

Optimizer: rows that start training mid-run (a newly reserved triplet's P, Q; a newly
activated λ) would otherwise get Adam's bias correction of the whole tensor's step count, i.e.
up to ~6× larger first steps than the fresh parameter groups the authors add. `AdamRowRestart`
re-computes those rows' update as a fresh Adam/AdamW would (exactly, from the optimizer's own
moments). Not reproduced: the authors' per-group learning-rate "restart warmup" (a scheduler
change outside a method file).

Training with `lorakit.train` runs all of this through `IncreLora.trainer_callbacks`. In a
custom loop:

    alloc = IncreLoraAllocator(model, total_step=T)
    for t in range(T):
        model(**batch).loss.backward()
        alloc.optimizer_step(opt, t)    # orth. gradient, opt.step(), fresh-row fix, importance, growth
        opt.zero_grad()
    alloc.finish()                      # reserves off + prune; `rank_pattern(model)` gives the ranks
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

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

DORMANT, RESERVED, ACTIVE = 0, 1, 2


# -- config checks shared by the rank-growing methods ---------------------------------------
def check_optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        check_positive_int(name, value)


def check_growth_ranks(init_r: int, target_r: int, max_r: int, ranks: Any) -> None:
    """init_r ≤ target_r ≤ max_r, and pruned per-module ranks within [1, max_r]."""
    for n, v in (("init_r", init_r), ("target_r", target_r), ("max_r", max_r)):
        check_positive_int(n, v)
    if target_r < init_r:
        raise ConfigError(f"target_r must be >= init_r={init_r} (ranks only grow), got {target_r}")
    if max_r < target_r:
        raise ConfigError(f"max_r must be >= target_r={target_r} (and init_r={init_r}), got {max_r}")
    if not isinstance(ranks, dict):
        raise ConfigError(f"ranks must be a mapping of module path to rank, got {ranks!r}")
    for k, v in ranks.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= max_r:
            raise ConfigError(f"ranks[{k!r}] must be an integer between 1 and max_r={max_r}, got {v!r}")


def resolve_budget(budget: int | None, target_r: int, modules: dict[str, nn.Module]) -> int:
    """The total rank budget b (default target_r · n), checked against the modules' start and capacity."""
    n = len(modules)
    b = target_r * n if budget is None else budget
    start = sum(m.rank for m in modules.values())
    cap = sum(m.capacity for m in modules.values())
    if b < n:
        raise ConfigError(f"budget={b} is below the number of adapted modules ({n}): every module keeps at least one rank")
    if b < start:
        raise ConfigError(f"budget={b} is below the ranks the modules start with (Σ init_r = {start})")
    if b > cap:
        raise ConfigError(f"budget={b} exceeds the pre-allocated capacity Σ max_r = {cap}; raise max_r")
    return b


def growth_steps(tinit: int, tfinal: int, total_step: int, interval: int) -> range:
    """The steps t that may grow ranks: tinit < t < T − tfinal with t % interval == 0."""
    first = (tinit // interval + 1) * interval
    return range(first, total_step - tfinal, interval)


def pick_modules(scores: dict[str, float], room: dict[str, int], n: int, add_r: int, left: int) -> dict[str, int]:
    """{path: ranks to add}: the n highest-scoring modules with free slots (ties: path order), add_r
    each, capped by each module's room and by `left` in total — so the budget is never passed."""
    order = sorted((p for p in scores if room[p] > 0), key=lambda p: -scores[p])
    out: dict[str, int] = {}
    for p in order[:n]:
        k = min(add_r, room[p], left)
        if k <= 0:
            break
        out[p] = k
        left -= k
    return out


# -- orthogonality regulariser --------------------------------------------------------------
def orth_penalty(factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over the given (A (k, d_in), B (d_out, k)) of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (differentiable)."""
    terms = []
    for a, b in factors:
        for cov in (a @ a.T, b.T @ b):  # (k, k)
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms:
        raise AdapterError("no factors to regularise")
    return torch.stack(terms).mean()


def add_grad_(loss_fn: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> None:
    """p.grad += ∂loss/∂p for each of `params` (≡ having added loss_fn() to the training loss)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


# -- fresh Adam state for rows that start training mid-run ----------------------------------
def _adam_of(optimizer) -> torch.optim.Adam | None:
    """The torch Adam/AdamW inside `optimizer` (Trainer wraps it), or None for other optimizers."""
    o = optimizer
    for _ in range(4):
        if isinstance(o, torch.optim.Adam):  # AdamW subclasses Adam
            return o
        o = getattr(o, "optimizer", None)
        if o is None:
            return None
    return None


class AdamRowRestart:
    """Give slices of a parameter that start training at step t0 the update of a fresh Adam.

    Masked-then-grown ranks share their tensor's Adam step count t, so their bias correction
    would be 1/(1 − β^t) ≈ 1 instead of 1/(1 − β^k) for their own age k: early steps up to ~6×
    too large. `add` zeroes the slice's moments at birth; around every optimizer step,
    `snapshot` (before) and `apply` (after) replace the slice's new value by

        θ ← θ_before · (1 − lr·wd) − lr / (1 − β1^k) · m / (√(v / (1 − β2^k)) + ε)

    from the optimizer's own m, v (torch Adam/AdamW semantics; decoupled decay only for AdamW).
    Optimizers other than torch Adam/AdamW are left alone (SGD has no bias correction).
    """

    def __init__(self) -> None:
        # id(param) -> (param, dim, index (L,), birth step (L,)): slices along `dim`, one entry per tensor
        self.rows: dict[int, tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]] = {}
        self._before: dict[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return sum(e[2].numel() for e in self.rows.values())

    @torch.no_grad()
    def add(self, param: nn.Parameter, dim: int, index: list[int], born: int, optimizer=None) -> None:
        """Slices `index` of `param` along `dim` start training after optimizer step `born`."""
        if not index:
            return
        idx = torch.tensor(index, dtype=torch.long, device=param.device)
        opt = _adam_of(optimizer) if optimizer is not None else None
        st = opt.state.get(param) if opt is not None else None
        if st:
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in st:
                    st[key].index_fill_(dim, idx, 0.0)
        births = torch.full((len(index),), born, dtype=torch.long, device=param.device)
        if id(param) in self.rows:
            _, d, old_idx, old_born = self.rows[id(param)]
            if d != dim:
                raise ValueError(f"rows of one parameter must share a dimension, got {d} and {dim}")
            idx, births = torch.cat([old_idx, idx]), torch.cat([old_born, births])
        self.rows[id(param)] = (param, dim, idx, births)

    @torch.no_grad()
    def snapshot(self) -> None:
        self._before = {k: p.detach().index_select(d, i).clone() for k, (p, d, i, _) in self.rows.items()}

    @torch.no_grad()
    def apply(self, optimizer, step: int) -> None:
        """Re-do the update of every tracked slice for the optimizer step `step` just taken."""
        before, self._before = self._before, None
        opt = _adam_of(optimizer)
        if opt is None or before is None:
            return
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        for key, (p, dim, idx, born) in list(self.rows.items()):
            g, st, old = groups.get(id(p)), opt.state.get(p), before.get(key)
            if g is None or not st or "exp_avg" not in st or old is None or old.shape[dim] != idx.numel():
                continue
            b1, b2 = (float(b) for b in g["betas"])
            lr, eps, wd = float(g["lr"]), float(g["eps"]), float(g["weight_decay"])
            k = (step - born).clamp(min=1).double()  # optimizer steps since birth, this one included
            shape = [-1 if i == dim else 1 for i in range(p.dim())]
            bc1 = (1 - b1**k).view(shape).to(old.dtype)
            bc2 = (1 - b2**k).view(shape).to(old.dtype)
            m = st["exp_avg"].index_select(dim, idx)
            v = st["max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq"].index_select(dim, idx)
            new = old * (1 - lr * wd) if wd and g.get("decoupled_weight_decay", False) else old.clone()
            upd = m / (v.sqrt() / bc2.sqrt() + eps) * (lr / bc1)
            new = new + upd if g.get("maximize") else new - upd
            p.index_copy_(dim, idx, new.to(p.dtype))
            young = (b1**k > 1e-7) | (b2**k > 1e-7)  # afterwards fresh and shared corrections agree
            if not bool(young.all()):
                if bool(young.any()):
                    self.rows[key] = (p, dim, idx[young], born[young])
                else:
                    del self.rows[key]


# -- config -------------------------------------------------------------------------------
@dataclass
class IncreLoraConfig(AdapterConfig):
    """init_r: active rank each module starts with; target_r: average final rank (budget
    target_r · n unless `budget` is given); max_r: slots pre-allocated per module (the highest
    rank a module can reach); budget: total final rank over all modules; top_h: modules grown per
    allocation; add_r: ranks added to a chosen module (None: max(1, target_r // 2), the authors'
    table); interval: steps between allocations (None: spread the needed rounds over the growth
    window); tinit: warm-up steps without growth; tfinal: final steps without growth;
    advance_lambda: fixed λ of reserved triplets (0 disables advance learning); alpha: scale
    numerator (s = α / current rank); dropout on the adapter input; beta1/beta2: EMA factors of
    the importance and its uncertainty; orth_reg_weight: weight of the orthogonality
    regulariser; total_step: T (None: the Trainer's max_steps); ranks: per-module ranks after
    pruning ({path: rank}, written by `prune`, read by `load`).
    Defaults follow the authors' GLUE scripts (lora_r 1, target_rank 2, top_h 12, β 0.85,
    reg_orth_coef 0.1, lora_alpha 16).
    """

    init_r: int = 1
    target_r: int = 2
    max_r: int = 8
    budget: int | None = None
    top_h: int = 12
    add_r: int | None = None
    interval: int | None = None
    tinit: int = 0
    tfinal: int = 0
    advance_lambda: float = 1e-5
    alpha: float = 16.0
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_step: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_growth_ranks(self.init_r, self.target_r, self.max_r, self.ranks)
        check_optional_positive_int("budget", self.budget)
        check_positive_int("top_h", self.top_h)
        check_optional_positive_int("add_r", self.add_r)
        check_optional_positive_int("interval", self.interval)
        check_nonneg_int("tinit", self.tinit)
        check_nonneg_int("tfinal", self.tfinal)
        check_finite_nonneg("advance_lambda", self.advance_lambda)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        check_range("dropout", self.dropout, 0.0, 1.0)
        for b in ("beta1", "beta2"):
            v = getattr(self, b)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"{b} must be in (0, 1), got {v!r}")
        check_finite_nonneg("orth_reg_weight", self.orth_reg_weight)
        if self.total_step is not None:
            check_positive_int("total_step", self.total_step)
            check_schedule(self.tinit, self.tfinal, self.total_step)

    @property
    def ranks_per_step(self) -> int:
        """add_r as used: the given value, or the authors' {2: 1, 4: 2, 6: 3, 8: 4} = target_r // 2."""
        return self.add_r if self.add_r is not None else max(1, self.target_r // 2)


# -- the adapter ----------------------------------------------------------------------------
@register_method("increlora", IncreLoraConfig, paper="arXiv:2308.12043")
class IncreLora(nn.Module):
    """IncreLoRA: h = W0 x + (α/r) P Λ̃ Q x with r growing from init_r by module importance."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"init_r": 1, "target_r": 2, "max_r": 3}

    def __init__(self, spec: LayerSpec, cfg: IncreLoraConfig):
        super().__init__()
        self.spec = spec
        self.alpha = float(cfg.alpha)
        self.advance_lambda = float(cfg.advance_lambda)
        pruned = spec.name in cfg.ranks
        cap = cfg.ranks.get(spec.name, cfg.max_r)  # slots held: max_r, or the final rank after pruning
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        # authors' SVDLinear.reset_parameters / add_reserve_param: A, B ~ N(0, 0.02), E = 0
        self.lora_A = nn.Parameter(torch.randn(cap, spec.in_features, **kw) * 0.02)  # Q: (cap, d_in)
        self.lora_E = nn.Parameter(torch.zeros(cap, 1, **kw))  # λ: (cap, 1)
        self.lora_B = nn.Parameter(torch.randn(spec.out_features, cap, **kw) * 0.02)  # P: (d_out, cap)
        slots = torch.full((cap,), DORMANT, dtype=torch.int8, device=spec.device)
        slots[: cap if pruned else min(cfg.init_r, cap)] = ACTIVE
        self.register_buffer("slot_state", slots)  # (cap,) ACTIVE* RESERVED* DORMANT*, saved with the adapter
        self._cache: tuple | None = None
        self._track = False  # set by the allocator while ranks can grow
        self._ipt: torch.Tensor | None = None  # importance accumulated by the backward hook

    # -- slot bookkeeping ----------------------------------------------------------------
    def _slots(self) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """(n live slots, r active, active mask (n, 1), fixed λ of the rest (n, 1)), cached per buffer version."""
        s = self.slot_state
        key = (s._version, s.data_ptr(), s.shape[0])
        if self._cache is None or self._cache[0] != key:
            st = s.tolist()
            r, n = st.count(ACTIVE), st.count(ACTIVE) + st.count(RESERVED)
            if st != [ACTIVE] * r + [RESERVED] * (n - r) + [DORMANT] * (len(st) - n):
                raise AdapterError(f"{self.spec.name}: slot_state must be active, then reserved, then dormant; got {st}")
            live = s[:n].view(-1, 1)
            fixed = (live == RESERVED).to(self.lora_E.dtype) * self.advance_lambda
            self._cache = (key, (n, r, live == ACTIVE, fixed))
        return self._cache[1]

    @property
    def rank(self) -> int:
        """Active triplets r (what the budget counts)."""
        return self._slots()[1]

    @property
    def live(self) -> int:
        """Triplets computed: active + reserved."""
        return self._slots()[0]

    @property
    def capacity(self) -> int:
        """Slots held (max_r, or the final rank after pruning)."""
        return self.slot_state.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / max(self.rank, 1)

    def live_qp(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_n (n, d_in), P_n (d_out, n)) of the live slots, without Λ̃ (what the regulariser constrains)."""
        n = self.live
        return self.lora_A[:n], self.lora_B[:, :n]

    def _live_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Λ̃ Q (n, d_in), P (d_out, n)) of the live slots."""
        n, _, act, fixed = self._slots()
        lam = torch.where(act, self.lora_E[:n], fixed.to(self.lora_E.dtype))  # (n, 1); reserved λ frozen
        return self.lora_A[:n] * lam, self.lora_B[:, :n]

    # -- the update ----------------------------------------------------------------------
    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self._live_factors()  # (n, d_in), (d_out, n)
        xd = self.dropout(x.to(a.dtype))
        # (..., d_in) -> (..., n) -> (..., d_out); ΔW is never formed here
        out = F.linear(F.linear(xd, a), b) * self.scale
        if self._track and torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(self._importance_hook(xd))
        return out

    def _importance_hook(self, xd: torch.Tensor):
        def hook(g: torch.Tensor) -> None:
            # the authors' score on ΔW: Σ |ΔW ⊙ ∂L/∂ΔW| / √(d_out d_in), ∂L/∂ΔW = Σ_tokens g xᵀ
            with torch.no_grad():
                w = self.delta_weight().float()  # (d_out, d_in)
                gw = g.reshape(-1, g.shape[-1]).float().T @ xd.reshape(-1, xd.shape[-1]).float()
                score = (w * gw).abs().sum() / math.sqrt(w.numel())
                self._ipt = score if self._ipt is None else self._ipt + score

        return hook

    def delta_weight(self) -> torch.Tensor:
        a, b = self._live_factors()
        return (b @ a) * self.scale  # (d_out, d_in), merge/export/importance only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact LoRA of the live triplets: A' = Λ̃ Q (rows), B' = P; SVD-truncated to `rank`."""
        a, b = (t.detach().clone() for t in self._live_factors())
        if rank is not None and rank < a.shape[0]:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, self.scale

    # -- growth (called by the allocator) ---------------------------------------------------
    @torch.no_grad()
    def reserve_(self, add_r: int) -> list[int]:
        """Make the next slots reserved until min(add_r, free) are; returns the newly reserved slots."""
        n, r, _, _ = self._slots()
        want = min(r + add_r, self.capacity)
        new = list(range(n, want))
        if new:
            self.slot_state[n:want] = RESERVED
        return new

    @torch.no_grad()
    def activate_(self, k: int) -> list[int]:
        """Turn the first k reserved slots active (λ starts at advance_lambda); returns them."""
        n, r, _, _ = self._slots()
        if not 0 < k <= n - r:
            raise AdapterError(f"{self.spec.name}: cannot activate {k} triplets, {n - r} are reserved")
        self.lora_E[r:r + k] = self.advance_lambda  # the reserved λ carries over (authors' lora_E entry)
        self.slot_state[r:r + k] = ACTIVE
        return list(range(r, r + k))

    @torch.no_grad()
    def release_(self) -> None:
        """Reserved slots go dormant (they stop contributing); growth is over."""
        self.slot_state.masked_fill_(self.slot_state == RESERVED, DORMANT)

    @torch.no_grad()
    def prune_(self) -> int:
        """Keep only the active slots (new, smaller parameters). Returns the new rank."""
        n, r, _, _ = self._slots()
        if n > r:
            raise AdapterError(f"{self.spec.name}: release the reserved triplets before pruning")
        if r == self.capacity:
            return r
        keep = torch.arange(r, device=self.lora_E.device)
        keep_ranks_(self, keep, {"lora_A": 0, "lora_E": 0, "lora_B": 1})
        self.slot_state = self.slot_state[:r].clone()
        return r

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: IncreLoraConfig) -> list:
        """One callback: orthogonality gradient + snapshot before, growth after each optimizer
        step; reserves off and pruning at the end of training."""
        resolve_budget(config.budget, config.target_r, increlora_modules(model, name))  # fail before training
        return [growth_callback(model, name, IncreLoraAllocator)]


# -- model-level helpers ----------------------------------------------------------------------
def increlora_modules(model: nn.Module, name: str = "default") -> dict[str, IncreLora]:
    """Module path -> IncreLoRA adapter `name`; errors if the model has none."""
    return adapter_modules(model, name, IncreLora, "IncreLoRA")


def rank_pattern(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Module path -> active rank (the ranks a benchmark reports)."""
    return {p: m.rank for p, m in increlora_modules(model, name).items()}


def live_orth_penalty(mods: Iterable[nn.Module]) -> torch.Tensor:
    """R over the live triplets (`live_qp()`) of growing-rank modules (differentiable)."""
    return orth_penalty(m.live_qp() for m in mods)


def add_live_orth_grad_(mods: Iterable[nn.Module], weight: float) -> None:
    """grad += ∂(weight · R)/∂θ over the modules' lora_A / lora_B (≡ adding weight·R to the loss)."""
    if weight == 0:
        return
    mods = list(mods)
    add_grad_(lambda: weight * live_orth_penalty(mods), [p for m in mods for p in (m.lora_A, m.lora_B)])


def orth_regularizer(model: nn.Module, name: str = "default") -> torch.Tensor:
    """R over the live (active + reserved) triplets of every module (differentiable)."""
    return live_orth_penalty(increlora_modules(model, name).values())


def add_orth_grad_(model: nn.Module, weight: float, name: str = "default") -> None:
    """grad += ∂(weight · R)/∂θ (≡ adding weight·R to the loss)."""
    add_live_orth_grad_(increlora_modules(model, name).values(), weight)


def prune(model: nn.Module, name: str = "default") -> dict[str, int]:
    """End growth and keep only the active triplets; records the ranks in the config's `ranks`.

    Reserved triplets are switched off first (an output change of order advance_lambda; none
    once growth has ended). Call it after training: the optimizer holds the old parameters.
    """
    mods = increlora_modules(model, name)
    for m in mods.values():
        m.release_()
        m._track = False
    return prune_adapter(model, name, mods, state(model).configs[name].max_r)


# -- the growth driver (shared with TriAdaptLoRA) ---------------------------------------------
class GrowthAllocator:
    """Budget, schedule, optimizer hand-off and pruning of a rank-growing method.

    Subclasses give `scores()` (module importance), `n_to_grow(step, left)` and `grow(path, k,
    step, optimizer)`. Call `before_step()` before and `after_step(step, optimizer)` after every
    optimizer step (or `optimizer_step(opt, step)` for both), `step` counting from 0.
    """

    def __init__(self, model: nn.Module, name: str, modules: dict[str, nn.Module], total_step: int | None,
                 label: str):
        self.model, self.name, self.mods = model, name, modules
        cfg = state(model).configs[name]
        self.cfg = cfg
        self.total_step = total_step if total_step is not None else cfg.total_step
        if self.total_step is None:
            raise ConfigError(f"{label} needs total_step (the number of optimizer steps) to schedule growth")
        check_positive_int("total_step", self.total_step)
        check_schedule(cfg.tinit, cfg.tfinal, self.total_step)
        self.budget = resolve_budget(cfg.budget, cfg.target_r, modules)
        self.add_r = cfg.ranks_per_step
        self.interval = cfg.interval if cfg.interval is not None else self._auto_interval()
        if self.total_rank() < self.budget and not growth_steps(cfg.tinit, cfg.tfinal, self.total_step, self.interval):
            raise ConfigError(
                f"interval={self.interval} leaves no growth step t with tinit={cfg.tinit} < t < "
                f"total_step − tfinal = {self.total_step - cfg.tfinal} and t % interval == 0")
        self.rows = AdamRowRestart()
        self.finalized = False
        self.history: list[tuple[int, dict[str, int]]] = []  # (step, {path: ranks added})

    def _auto_interval(self) -> int:
        rounds = math.ceil(max(self.budget - self.total_rank(), 1) / (self.top_modules() * self.add_r))
        window = self.total_step - self.cfg.tfinal - self.cfg.tinit - 1
        return max(1, window // rounds)

    def top_modules(self) -> int:
        return len(self.mods)

    def total_rank(self) -> int:
        return sum(m.rank for m in self.mods.values())

    def ranks(self) -> dict[str, int]:
        return {p: m.rank for p, m in self.mods.items()}

    # -- hooks for the method --------------------------------------------------------------
    def factors(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def scores(self) -> dict[str, float]:
        raise NotImplementedError

    def n_to_grow(self, step: int, left: int) -> int:
        raise NotImplementedError

    def grow(self, path: str, k: int, step: int, optimizer) -> None:
        raise NotImplementedError

    def observe(self, step: int) -> None:
        """Per-step statistics (IncreLoRA's importance EMA)."""

    def finalize(self) -> None:
        self.finalized = True

    # -- per step --------------------------------------------------------------------------
    def add_orth_grad_(self) -> None:
        w = self.cfg.orth_reg_weight
        if w:
            add_grad_(lambda: w * orth_penalty(self.factors()),
                      [p for m in self.mods.values() for p in (m.lora_A, m.lora_B)])

    def before_step(self) -> None:
        self.rows.snapshot()

    def after_step(self, step: int, optimizer=None) -> dict[str, int]:
        """Fix the young rows' update, then (maybe) grow. Returns {path: ranks added} at this step."""
        if optimizer is not None:
            self.rows.apply(optimizer, step)
        else:
            self.rows._before = None
        if self.finalized:
            return {}
        if step >= self.total_step - self.cfg.tfinal:
            self.finalize()
            return {}
        self.observe(step)
        grown: dict[str, int] = {}
        c = self.cfg
        if step > c.tinit and step % self.interval == 0:
            left = self.budget - self.total_rank()
            if left > 0:
                scores = self.scores()
                room = {p: m.capacity - m.rank for p, m in self.mods.items()}
                grown = pick_modules(scores, room, self.n_to_grow(step, left), self.add_r, left)
                for p, k in grown.items():
                    self.grow(p, k, step, optimizer)
                self.history.append((step, grown))
        if self.total_rank() >= self.budget:
            self.finalize()
        return grown

    def optimizer_step(self, optimizer, step: int) -> dict[str, int]:
        """For custom loops, after backward: orthogonality gradient, snapshot, optimizer.step(), after_step."""
        self.add_orth_grad_()
        self.before_step()
        optimizer.step()
        return self.after_step(step, optimizer)

    def finish(self) -> dict[str, int]:
        """End of training: stop growth and prune the unused slots. Returns {path: final rank}."""
        self.finalize()
        return prune_adapter(self.model, self.name, self.mods, self.cfg.max_r)


class IncreLoraAllocator(GrowthAllocator):
    """IncreLoRA's RankAllocator: importance EMA, top-h growth from reserved triplets."""

    def __init__(self, model: nn.Module, name: str = "default", total_step: int | None = None):
        super().__init__(model, name, increlora_modules(model, name), total_step, "IncreLoRA")
        self.ema_ipt: dict[str, torch.Tensor] = {}
        self.ema_unc: dict[str, torch.Tensor] = {}
        if self.total_rank() >= self.budget:
            self.finalize()
            return
        for m in self.mods.values():  # reserved triplets from the start (authors: at global_step 0)
            m.reserve_(self.add_r)
            m._track = True

    def top_modules(self) -> int:
        return self.cfg.top_h

    def factors(self):
        return (m.live_qp() for m in self.mods.values())

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Ī, Ū ← EMA of this step's hook scores (all-reduced under torch.distributed)."""
        paths = list(self.mods)
        ref = next(iter(self.mods.values())).lora_A
        ipt = torch.stack([self.mods[p]._ipt if self.mods[p]._ipt is not None else ref.new_zeros((), dtype=torch.float32)
                           for p in paths]).float()
        for m in self.mods.values():
            m._ipt = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(ipt, op=torch.distributed.ReduceOp.AVG)  # same decision on every rank
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for p, i in zip(paths, ipt):
            e = b1 * self.ema_ipt.get(p, torch.zeros_like(i)) + (1 - b1) * i
            self.ema_ipt[p] = e
            self.ema_unc[p] = b2 * self.ema_unc.get(p, torch.zeros_like(i)) + (1 - b2) * (i - e).abs()

    def scores(self) -> dict[str, float]:
        """S = Ī · Ū per module (authors' calculate_score, metric 'ipt')."""
        return {p: float(self.ema_ipt[p] * self.ema_unc[p]) if p in self.ema_ipt else 0.0 for p in self.mods}

    def n_to_grow(self, step: int, left: int) -> int:
        return self.cfg.top_h

    def grow(self, path: str, k: int, step: int, optimizer) -> None:
        m = self.mods[path]
        on = m.activate_(k)
        self.rows.add(m.lora_E, 0, on, step, optimizer)  # λ trains from the next step on
        new = m.reserve_(self.add_r)
        for pname, dim in (("lora_A", 0), ("lora_B", 1)):
            self.rows.add(getattr(m, pname), dim, new, step, optimizer)

    def finalize(self) -> None:
        for m in self.mods.values():
            m.release_()
            m._track = False
            m._ipt = None
        self.finalized = True


def growth_callback(model: nn.Module, name: str, allocator_cls: type[GrowthAllocator]):
    """TrainerCallback driving `allocator_cls`: orthogonality gradient and snapshot before each
    optimizer step, growth after it, stop + prune at the end of training."""
    from transformers import TrainerCallback

    class RankGrowth(TrainerCallback):
        def __init__(self):
            self.allocator: GrowthAllocator | None = None

        def on_train_begin(self, args, state_, control, **kwargs):
            if self.allocator is None:
                cfg = state(model).configs[name]
                total = cfg.total_step if cfg.total_step is not None else state_.max_steps
                self.allocator = allocator_cls(model, name, total_step=total)

        def on_pre_optimizer_step(self, args, state_, control, **kwargs):
            self.allocator.add_orth_grad_()
            self.allocator.before_step()

        def on_optimizer_step(self, args, state_, control, optimizer=None, **kwargs):
            # state_.global_step is the 0-based index of the step just taken (incremented after)
            self.allocator.after_step(state_.global_step, optimizer)

        def on_train_end(self, args, state_, control, **kwargs):
            if self.allocator is not None:
                self.allocator.finish()

    return RankGrowth()

