"""AdaLoRA: adaptive budget allocation over SVD-shaped triplets (Zhang et al., arXiv:2303.10512).

The update is kept in SVD form, one triplet (P[:, i], λ_i, Q[i]) per rank:

    h = W0 x + s · P Λ Q x,   Q = lora_A: (r, d_in) ~ N(0, 0.02),  Λ = diag(lora_E), lora_E: (r, 1) zeros,
                              P = lora_B: (d_out, r) ~ N(0, 0.02),  s = α / r_init

(the init and the fixed scale α / r_init are PEFT's `AdaLoraLayer`; PEFT divides by
r_init + 1e-5, we by r_init). Λ starts at 0, so the adapter starts as the base model.

Rank allocation (the `RankAllocator`, run right after each `optimizer.step()`):

    I(w)  = |w · ∂L/∂w|                                   sensitivity of every entry of P, Λ, Q
    Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|     smoothed sensitivity, uncertainty
    s(w)  = Ī(w) · Ū(w)
    S_i   = s(λ_i) + mean_j s(Q[i, j]) + mean_k s(P[k, i])  importance of triplet i

and a global budget b(t) on the number of triplets (summed over all adapted modules):

    b(t) = r_init·n                                      t ≤ tinit
         = ⌊(r_init·n − r_target·n)(1 − (t−tinit)/(T−tfinal−tinit))³ + r_target·n⌋   otherwise
         = r_target·n                                    t > T − tfinal

Every deltaT steps of the middle phase the triplets whose S_i is among the r_init·n − b(t)
smallest (ties included) get λ_i = 0 (masked; they can be revived by later gradients until
the next allocation). At t = T − tfinal the final allocation is made, the importance
statistics are dropped, and for the remaining steps the final mask is re-applied after
every step — all as PEFT's `AdaLoraModel.update_and_allocate`.

Orthogonality regulariser (added to the loss with weight `orth_reg_weight`):

    R = mean over all adapted P, Q of  ‖PᵀP − I‖_F  and  ‖QQᵀ − I‖_F

as PEFT and the authors' code compute it (the paper writes squared norms summed; the code,
which we match, takes the plain Frobenius norm averaged over the matrices). lorakit's loss
is computed inside the Trainer, which a callback cannot change, so the AdaLoRA callback adds
∂(w·R)/∂θ to the gradients in `on_pre_optimizer_step` — the same update as adding w·R to the
loss (R does not depend on the batch; Trainer divides the loss by the accumulation steps, so
PEFT's per-micro-batch R also contributes w·∂R/∂θ once). One difference: Trainer clips the
gradient norm *before* `on_pre_optimizer_step`, so with `max_grad_norm` the R gradient is not
clipped (PEFT clips the sum).

After training (`on_train_end`, once the final allocation was made) the masked triplets are
pruned: each module keeps only its non-zero λ, the per-module ranks go to the config field
`ranks` ({module path: rank}) so `lorakit.load` rebuilds the smaller shapes from the config,
and the scale stays α / r_init, so outputs are unchanged. In a custom loop:

    loss = model(**batch).loss + cfg.orth_reg_weight * orth_regularizer(model)
    loss.backward(); opt.step(); allocator.update_and_allocate(step); opt.zero_grad()
    ...; prune(model)

with `allocator = RankAllocator(model)` (or use `add_orth_grad_` instead of the loss term).
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
    check_nonneg_int,
    check_positive_int,
    check_range,
    keep_ranks_,
)
from lorakit.core.inject import adapter_modules, prune_adapter, state
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError


@dataclass
class AdaLoraConfig(AdapterConfig):
    """init_r: starting rank of every module; target_r: average rank per module at the end
    (total budget target_r · n_modules); alpha: scale numerator (s = α / init_r, fixed);
    dropout on the adapter input; tinit: warm-up steps without masking; tfinal: final steps
    with the allocation frozen; deltaT: steps between allocations; beta1/beta2: EMA factors
    of sensitivity / uncertainty; orth_reg_weight: weight of the orthogonality regulariser;
    total_step: T, the number of optimizer steps (None: taken from the Trainer's max_steps);
    ranks: per-module ranks after pruning ({path: rank}, written by `prune`, read by `load`).
    Defaults are PEFT's AdaLoraConfig (lora_alpha 8, init_r 12, target_r 8).
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("init_r", self.init_r)
        check_positive_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r must be <= init_r={self.init_r}, got {self.target_r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_nonneg_int("tinit", self.tinit)
        check_nonneg_int("tfinal", self.tfinal)
        check_positive_int("deltaT", self.deltaT)
        for b in ("beta1", "beta2"):
            v = getattr(self, b)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"{b} must be in (0, 1), got {v!r}")
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or math.isinf(w):
            raise ConfigError(f"orth_reg_weight must be a finite number >= 0, got {w!r}")
        if self.total_step is not None:
            check_positive_int("total_step", self.total_step)
            check_schedule(self.tinit, self.tfinal, self.total_step)
        if not isinstance(self.ranks, dict):
            raise ConfigError(f"ranks must be a mapping of module path to rank, got {self.ranks!r}")
        for k, v in self.ranks.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= self.init_r:
                raise ConfigError(f"ranks[{k!r}] must be an integer between 0 and init_r={self.init_r}, got {v!r}")


def check_schedule(tinit: int, tfinal: int, total_step: int) -> None:
    """The budget must have a decreasing phase: tinit + tfinal < total_step (PEFT's rule)."""
    if tinit + tfinal >= total_step:
        raise ConfigError(
            f"tinit + tfinal must be < total_step (there must be a budgeting phase), got "
            f"tinit={tinit}, tfinal={tfinal}, total_step={total_step}"
        )


@register_method("adalora", AdaLoraConfig, paper="arXiv:2303.10512")
class AdaLora(nn.Module):
    """AdaLoRA: h = W0 x + (α/r_init) P diag(λ) Q x; a global importance schedule zeroes λ's."""

    zero_init = True
    supports = ("linear",)
    test_config: ClassVar[dict] = {"init_r": 4, "target_r": 2, "total_step": 10}

    def __init__(self, spec: LayerSpec, cfg: AdaLoraConfig):
        super().__init__()
        self.spec = spec
        self.r = cfg.init_r
        self.scale = cfg.alpha / cfg.init_r  # fixed: pruning / masking never rescales
        k = cfg.ranks.get(spec.name, cfg.init_r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        # PEFT AdaLoraLayer.reset_lora_parameters: A, B ~ N(0, 0.02), E = 0
        self.lora_A = nn.Parameter(torch.randn(k, spec.in_features, **kw) * 0.02)  # Q: (k, d_in)
        self.lora_E = nn.Parameter(torch.zeros(k, 1, **kw))  # λ: (k, 1)
        self.lora_B = nn.Parameter(torch.randn(spec.out_features, k, **kw) * 0.02)  # P: (d_out, k)

    @property
    def rank(self) -> int:
        """Triplets held (init_r, or fewer after pruning)."""
        return self.lora_E.shape[0]

    def active_rank(self) -> int:
        """Triplets with λ ≠ 0."""
        return int((self.lora_E.detach() != 0).sum())

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a = self.lora_A * self.lora_E  # (k, d_in): Λ Q
        # (..., d_in) -> (..., k) -> (..., d_out); ΔW is never formed
        return F.linear(F.linear(self.dropout(x.to(a.dtype)), a), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale  # (d_out, d_in), merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact LoRA of the non-zero triplets: A' = Λ Q (rows), B' = P; SVD-truncated to `rank`."""
        nz = (self.lora_E.detach().view(-1) != 0).nonzero().squeeze(1)
        a = (self.lora_A.detach() * self.lora_E.detach())[nz]  # (k', d_in)
        b = self.lora_B.detach()[:, nz].clone()  # (d_out, k')
        if a.shape[0] == 0:  # ΔW = 0, as a rank-1 LoRA of zeros
            return a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1), self.scale
        if rank is not None and rank < a.shape[0]:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, self.scale

    @torch.no_grad()
    def prune_(self) -> int:
        """Drop the triplets with λ = 0 (new, smaller parameters). Returns the new rank."""
        keep = (self.lora_E.view(-1) != 0).nonzero().squeeze(1)
        if keep.numel() == self.rank:
            return self.rank
        keep_ranks_(self, keep, {"lora_A": 0, "lora_E": 0, "lora_B": 1})
        return self.rank

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: AdaLoraConfig) -> list:
        """One callback: orthogonality gradient before, rank allocation after each optimizer step."""
        return [adalora_callback(model, name)]


# -- model-level helpers ------------------------------------------------------------------
def adalora_modules(model: nn.Module, name: str = "default") -> dict[str, AdaLora]:
    """Module path -> AdaLoRA adapter `name`; errors if the model has no such AdaLoRA adapter."""
    return adapter_modules(model, name, AdaLora, "AdaLoRA")


def orth_regularizer(model: nn.Module, name: str = "default") -> torch.Tensor:
    """R = mean over the adapter's P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F (PEFT/authors' form; differentiable)."""
    terms = []
    for m in adalora_modules(model, name).values():
        for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):  # (k, k) each
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    return torch.stack(terms).mean()


def add_orth_grad_(model: nn.Module, weight: float, name: str = "default") -> None:
    """grad += ∂(weight · R)/∂θ for every P, Q of adapter `name` (≡ adding weight·R to the loss)."""
    if weight == 0:
        return
    mods = adalora_modules(model, name).values()
    params = [p for m in mods for p in (m.lora_A, m.lora_B) if p.requires_grad]
    if not params:
        return
    with torch.enable_grad():
        grads = torch.autograd.grad(weight * orth_regularizer(model, name), params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


def rank_pattern(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Module path -> number of triplets with λ ≠ 0."""
    return {p: m.active_rank() for p, m in adalora_modules(model, name).items()}


def prune(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Remove the λ = 0 triplets of adapter `name` in place; returns {module path: new rank}.

    Outputs are unchanged (a zero λ contributes nothing; the scale stays α / init_r). The
    stored config's `ranks` records the new shapes so that save -> load rebuilds them. Call
    it after training: the optimizer would still hold the old, larger parameters.
    """
    return prune_adapter(model, name, adalora_modules(model, name), state(model).configs[name].init_r)


class RankAllocator:
    """PEFT's RankAllocator + AdaLoraModel.update_and_allocate for one lorakit adapter.

    Call `update_and_allocate(step)` after each `optimizer.step()` and before `zero_grad()`
    (the gradients are read), with `step` counting optimizer steps from 0.
    """

    def __init__(self, model: nn.Module, name: str = "default", total_step: int | None = None):
        self.mods = adalora_modules(model, name)
        cfg = state(model).configs[name]
        self.cfg = cfg
        self.total_step = total_step if total_step is not None else cfg.total_step
        if self.total_step is None:
            raise ConfigError("AdaLoRA needs total_step (the number of optimizer steps) to schedule the budget")
        check_positive_int("total_step", self.total_step)
        check_schedule(cfg.tinit, cfg.tfinal, self.total_step)
        self.init_bgt = sum(m.rank for m in self.mods.values())
        self.target_bgt = cfg.target_r * len(self.mods)
        self.rank_pattern: dict[str, list[bool]] | None = None  # last allocation, PEFT's form
        self.finalized = False
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget b(step), whether this step masks) — PEFT's cubic schedule."""
        c, total = self.cfg, self.total_step
        if step <= c.tinit:
            return self.init_bgt, False
        if step > total - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (total - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul**3 + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """EMA of the sensitivity |θ ∇θ| and of its uncertainty |I − Ī| for every P, λ, Q entry."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for path, m in self.mods.items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                p = getattr(m, pname)
                if p.grad is None:
                    raise RuntimeError(f"AdaLoRA allocation needs gradients: {path}.{pname} has none "
                                       "(call update_and_allocate after backward, before zero_grad)")
                key = (path, pname)
                ipt = (p * p.grad).abs()
                ema = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                ema = b1 * ema + (1 - b1) * ipt
                self.exp_avg_ipt[key] = ema
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - ema).abs()

    def _score(self, path: str, pname: str) -> torch.Tensor:
        key = (path, pname)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Module path -> S (k,): s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)."""
        return {path: (self._score(path, "lora_E").view(-1) + self._score(path, "lora_A").mean(dim=1)
                       + self._score(path, "lora_B").mean(dim=0))
                for path in self.mods}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ of the init_bgt − budget least important triplets (ties at the threshold too)."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:  # nothing to cut (PEFT's kthvalue would fail on k = 0)
            return {p: (m.lora_E.view(-1) != 0).tolist() for p, m in self.mods.items()}
        threshold = torch.kthvalue(torch.cat([s.float().view(-1) for s in scores.values()]), k=k)[0].item()
        pattern = {}
        for path, m in self.mods.items():
            drop = scores[path].view(-1, 1) <= threshold  # (k, 1)
            m.lora_E.masked_fill_(drop, 0.0)
            pattern[path] = (~drop).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for path, m in self.mods.items():
            keep = torch.tensor(pattern[path], dtype=torch.bool, device=m.lora_E.device).view(-1, 1)
            m.lora_E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, step: int) -> tuple[int, dict[str, list[bool]] | None]:
        """One allocation step (PEFT's AdaLoraModel.update_and_allocate). Returns (budget, pattern or None)."""
        final = self.total_step - self.cfg.tfinal
        budget, mask = self.budget_schedule(step)
        if step < final:
            self.update_ipt()
            if not mask:
                return budget, None
            self.rank_pattern = self.mask_to_budget(budget)
            return budget, self.rank_pattern
        if step == final:  # the final allocation: fixed from here on
            self.rank_pattern = self.mask_to_budget(budget)
            self.finalized = True
            self.reset_ipt()
            return budget, self.rank_pattern
        if self.rank_pattern is not None:  # keep the final mask: revived λ's go back to 0
            self.apply_pattern(self.rank_pattern)
        return budget, self.rank_pattern


def adalora_callback(model: nn.Module, name: str = "default"):
    """TrainerCallback: orthogonality gradient before, `RankAllocator` after each optimizer step;
    at the end of training (after the final allocation) prune the masked triplets."""
    from transformers import TrainerCallback

    adalora_modules(model, name)  # fail early on a model without the adapter

    class AdaLoraAllocation(TrainerCallback):
        def __init__(self):
            self.allocator: RankAllocator | None = None

        def on_train_begin(self, args, state_, control, **kwargs):
            cfg = state(model).configs[name]
            total = cfg.total_step if cfg.total_step is not None else state_.max_steps
            if self.allocator is None:
                self.allocator = RankAllocator(model, name, total_step=total)

        def on_pre_optimizer_step(self, args, state_, control, **kwargs):
            add_orth_grad_(model, state(model).configs[name].orth_reg_weight, name)

        def on_optimizer_step(self, args, state_, control, **kwargs):
            # state_.global_step is the 0-based index of the step just taken (incremented after)
            self.allocator.update_and_allocate(state_.global_step)

        def on_train_end(self, args, state_, control, **kwargs):
            if self.allocator is not None and self.allocator.finalized:
                prune(model, name)

    return AdaLoraAllocation()
