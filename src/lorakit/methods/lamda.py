"""LaMDA: spectrally decomposed low-dimensional adaptation (Azizi et al., arXiv:2406.12832).

    h = W0 x + s · B S A x,    s = α / r
    A: (r, d_in)   frozen projection (PMA): top-r right singular vectors of W0 (a_init="svd")
                   or seeded Kaiming-uniform noise (a_init="random"); a buffer, never trained
    S: (r, r)      trainable low-dimensional square matrix, Kaiming-uniform (nn.Linear's init,
                   as in the reference code)
    B: (d_out, r)  trainable projection (PMB), zeros (so the adapter starts at the base output),
                   progressively frozen column by column during early training

Freeze schedule (PMB): after optimizer step t, n(t) = ⌊η · r · min(t, T) / T⌋ columns of B are
frozen (η = `freeze_fraction` = 0.3, T = `freeze_steps`), so ⌊η r⌋ columns are frozen from step
T on. Columns freeze least important first: with a_init="svd" column j of B pairs with the j-th
singular direction of W0, so the columns of the *smallest* singular values go first (fixed
order r-1, r-2, ...); with a_init="random" there is no spectrum, so the unfrozen column with the
smallest norm ‖B[:, j]‖ at freezing time goes first.

A frozen column is copied into the persistent buffer `lora_B_frozen` and the forward uses
B_eff = where(frozen, lora_B_frozen, lora_B): the column then gets no gradient and its value is
bit-identical whatever the optimizer (momentum, weight decay) does to the parameter; the
callback also writes the frozen values back into `lora_B` after each step.

Memory: A is a buffer (no gradient, no optimizer state, and autograd keeps no input copy for
A's weight gradient); trainable parameters per module are r² + d_out·r (LoRA: r·(d_in + d_out)).
With a_init="svd", A is recomputed from W0 at construction (non-persistent, sign-fixed SVD) and
never saved; with a_init="random" it is regenerated from (seed, module path).

Inside `lorakit.train.train` (or any Trainer given `Lamda.trainer_callbacks(...)`) the schedule
runs from a TrainerCallback; in a custom loop call `lamda_step(model, step)` after each
optimizer step (step = number of optimizer steps taken so far).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.inject import adapter_modules, state
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError

A_INITS = ("svd", "random")


@dataclass
class LamdaConfig(AdapterConfig):
    """r: rank; alpha: scale numerator (s = α/r, as the reference's LoRA path);
    a_init: "svd" (A = top-r right singular vectors of W0) or "random" (seeded Kaiming-uniform);
    freeze_fraction: η, the fraction of B's columns frozen by step `freeze_steps` (T);
    seed: seed of the random A (per-module seeds derive from it and the module path).
    """

    r: int = 8
    alpha: float = 16.0
    a_init: str = "svd"
    freeze_fraction: float = 0.3
    freeze_steps: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.a_init not in A_INITS:
            raise ConfigError(f"a_init must be one of {A_INITS}, got {self.a_init!r}")
        check_range("freeze_fraction", self.freeze_fraction, 0.0, 1.0, hi_open=False)
        check_positive_int("freeze_steps", self.freeze_steps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


def _derive_seed(*parts) -> int:
    """A stable 63-bit seed (blake2b, not Python's salted hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def svd_projection(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), σ (r,)): top-r right singular vectors of w (d_out, d_in), descending σ.

    Each row's sign is fixed (largest-magnitude entry positive) so that recomputing A from the
    same W0 on load gives the same A on any device/LAPACK.
    """
    _, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    a = vh[:r]  # (r, d_in)
    idx = a.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(a.gather(1, idx))
    sign[sign == 0] = 1
    return a * sign, s[:r]


def frozen_count(step: int, r: int, fraction: float, steps: int) -> int:
    """n(t) = ⌊η r min(t, T) / T⌋: columns of B frozen after `step` optimizer steps."""
    t = min(max(int(step), 0), steps)
    # integer-exact floor of η r t / T (avoid 0.3*10 = 2.9999...)
    return min(r, math.floor(round(fraction * r * t / steps, 9)))


@register_method("lamda", LamdaConfig, paper="arXiv:2406.12832")
class Lamda(nn.Module):
    """LaMDA: h = W0 x + (α/r) B S A x, A frozen (SVD of W0 / random), S trained, B progressively frozen."""

    zero_init = True
    supports = ("linear",)

    def __init__(self, spec: LayerSpec, cfg: LamdaConfig):
        super().__init__()
        self.spec = spec
        r, d_in, d_out = cfg.r, spec.in_features, spec.out_features
        if cfg.a_init == "svd" and r > min(d_in, d_out):
            raise ConfigError(
                f"r={r} exceeds min(d_out, d_in)={min(d_in, d_out)} of {spec.name}: "
                "a_init='svd' takes r singular vectors of W0; lower r or use a_init='random'"
            )
        self.r = r
        self.scale = cfg.alpha / r
        self.a_init = cfg.a_init
        kw = {"dtype": spec.dtype, "device": spec.device}
        if cfg.a_init == "svd":
            a, sigma = svd_projection(spec.weight(), r)
            self.register_buffer("sigma", sigma.to(spec.device), persistent=False)  # (r,) descending
        else:
            g = torch.Generator().manual_seed(_derive_seed(cfg.seed, spec.name, "lamda_A"))
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) bound, as nn.Linear / PEFT's A
            a = torch.empty(r, d_in).uniform_(-bound, bound, generator=g)
            self.sigma = None
        # PMA: frozen, recomputable from W0 (svd) or the seed (random) -> never saved
        self.register_buffer("lora_A", a.to(**kw), persistent=False)  # (r, d_in)
        self.lora_S = nn.Parameter(torch.empty(r, r, **kw))  # (r, r)
        nn.init.kaiming_uniform_(self.lora_S, a=math.sqrt(5))  # nn.Linear(r, r) init, as the reference
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **kw))  # (d_out, r): zero -> output == base
        # freezing state is training progress: saved with the adapter
        self.register_buffer("lora_frozen", torch.zeros(r, dtype=torch.bool, device=spec.device))  # (r,)
        self.register_buffer("lora_B_frozen", torch.zeros(d_out, r, **kw))  # (d_out, r)

    # -- the update -----------------------------------------------------------------------
    def effective_B(self) -> torch.Tensor:
        """(d_out, r): B with frozen columns taken from the frozen snapshot (no gradient there)."""
        return torch.where(self.lora_frozen, self.lora_B_frozen, self.lora_B)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # (..., d_in) -> (..., r) -> (..., r) -> (..., d_out); ΔW is never formed
        h = F.linear(x.to(self.lora_S.dtype), self.lora_A)
        return F.linear(F.linear(h, self.lora_S), self.effective_B()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.effective_B() @ self.lora_S @ self.lora_A) * self.scale  # (d_out, d_in)

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact: ΔW = s · B (S A), so A' = S A (r, d_in), B' = B; lower ranks by SVD truncation."""
        a = (self.lora_S @ self.lora_A).detach()
        b = self.effective_B().detach()
        if rank is not None and rank < self.r:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
            return a, b, self.scale
        return a.clone(), b.clone(), self.scale

    # -- progressive freezing of B ------------------------------------------------------------
    def num_frozen(self) -> int:
        return int(self.lora_frozen.sum())

    def freeze_order(self) -> list[int]:
        """Unfrozen columns of B, first to freeze first (smallest σ, or smallest ‖B[:, j]‖)."""
        free = [j for j in range(self.r) if not bool(self.lora_frozen[j])]
        if self.a_init == "svd":
            return sorted(free, key=lambda j: (float(self.sigma[j]), -j))
        norms = self.lora_B.detach().float().norm(dim=0)
        return sorted(free, key=lambda j: (float(norms[j]), -j))

    @torch.no_grad()
    def freeze_to(self, n: int) -> list[int]:
        """Freeze columns until `n` are frozen (never unfreezes); returns the newly frozen ones."""
        n = min(int(n), self.r)
        new = self.freeze_order()[: max(0, n - self.num_frozen())]
        if new:
            cols = torch.tensor(new, device=self.lora_B.device)
            self.lora_B_frozen[:, cols] = self.lora_B[:, cols]
            self.lora_frozen[cols] = True
        return new

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the frozen columns back into the parameter (undo optimizer drift, e.g. momentum)."""
        self.lora_B.copy_(self.effective_B())

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: LamdaConfig) -> list:
        """One callback running the B-freezing schedule for every LaMDA module of `name`."""
        return [freeze_scheduler(model, name)]


# -- model-level helpers ------------------------------------------------------------------
def lamda_modules(model: nn.Module, name: str = "default") -> dict[str, Lamda]:
    """Module path -> LaMDA adapter `name`; errors if the model has no such adapter."""
    return adapter_modules(model, name, Lamda, "LaMDA")


def lamda_step(model: nn.Module, step: int, name: str = "default") -> int:
    """Apply the schedule after `step` optimizer steps (custom loops); returns n frozen per module."""
    cfg = state(model).configs[name]
    n = frozen_count(step, cfg.r, cfg.freeze_fraction, cfg.freeze_steps)
    for m in lamda_modules(model, name).values():
        m.freeze_to(n)
        m.restore_frozen()
    return n


def freeze_scheduler(model: nn.Module, name: str = "default"):
    """A TrainerCallback calling `lamda_step(model, global_step)` after every optimizer step."""
    from transformers import TrainerCallback

    lamda_modules(model, name)  # fail early if there is no LaMDA adapter

    class LamdaFreezeScheduler(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            lamda_step(model, state.global_step, name)  # resumed runs: catch up with the schedule

        def on_step_end(self, args, state, control, **kwargs):
            lamda_step(model, state.global_step, name)

    return LamdaFreezeScheduler()
