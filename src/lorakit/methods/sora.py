"""SoRA: sparse low-rank adaptation with a gated rank (Ding et al., arXiv:2310.18168).

    h = W0 x + s · B (g ⊙ (A x)),   A: (r, d_in) Kaiming-uniform,  B: (d_out, r) zeros,
    g: (r,) gate ~ N(0, 1) (the authors' code: torch.randn),  s = α / r

After every optimizer step the gate takes a proximal step for the L1 penalty λ‖g‖₁
(soft thresholding, the update of the paper's Eq. 5):

    g ← sign(g) · max(|g| − η λ, 0)        η: the learning rate just used for g

so gates reach exactly zero and stay there unless the gradient pushes them out again.
Ranks whose gate is zero contribute nothing; `prune(model)` deletes them from A, B and g,
turning each module into a smaller plain LoRA (`to_lora` is exact: A' = g ⊙ A rows, B' = B).

Per-module ranks after pruning live in the config field `ranks` ({module path: rank}),
not in a tensor: `lorakit.load` builds every adapter from the config *before* it reads
the tensors and checks their shapes, so the shapes must be known from the config alone.

Inside `lorakit.train.train` (or any Trainer given `Sora.trainer_callbacks(...)`) the
proximal step runs in `on_optimizer_step`, i.e. right after `optimizer.step()` and before
the scheduler changes the learning rate. In a custom loop call
`sora_proximal_step(model, lr)` after each `optimizer.step()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range, keep_ranks_
from lorakit.core.inject import adapter_modules, prune_adapter, state
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError

GATE_INITS = ("normal", "ones")


def check_gate_fields(cfg, ranks_key: str) -> None:
    """Validate the fields gated methods share: sparse_lambda, lr_scaled, dropout and `ranks`
    (a mapping `ranks_key` -> rank in [0, r]); used by SoRA and S2-LoRA."""
    lam = cfg.sparse_lambda
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0 or math.isinf(lam):
        raise ConfigError(f"sparse_lambda must be a finite number >= 0, got {lam!r}")
    if not isinstance(cfg.lr_scaled, bool):
        raise ConfigError(f"lr_scaled must be true or false, got {cfg.lr_scaled!r}")
    check_range("dropout", cfg.dropout, 0.0, 1.0)
    if not isinstance(cfg.ranks, dict):
        raise ConfigError(f"ranks must be a mapping of {ranks_key} to rank, got {cfg.ranks!r}")
    for k, v in cfg.ranks.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= cfg.r:
            raise ConfigError(f"ranks[{k!r}] must be an integer between 0 and r={cfg.r}, got {v!r}")


@dataclass
class SoraConfig(AdapterConfig):
    """r: initial (largest) rank; alpha: scale numerator (s = α/r, kept after pruning);
    sparse_lambda: λ of the L1 penalty on the gates (0 = plain gated LoRA, no sparsity);
    lr_scaled: threshold η·λ per step (paper, Eq. 5) or, if False, λ per step (the
    authors' main GLUE scripts, λ ≈ 3e-4); gate_init: "normal" (reference code) or "ones";
    dropout on the adapter input; ranks: per-module ranks after `prune` ({path: rank},
    written by `prune`, read by `load`; modules not listed have rank r).
    """

    r: int = 8
    alpha: float = 16.0
    sparse_lambda: float = 1e-3
    lr_scaled: bool = True
    gate_init: str = "normal"
    dropout: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        check_gate_fields(self, "module path")
        if self.gate_init not in GATE_INITS:
            raise ConfigError(f"gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")

    def threshold(self, lr: float) -> float:
        """How far one proximal step moves each gate towards 0."""
        return self.sparse_lambda * lr if self.lr_scaled else self.sparse_lambda


@register_method("sora", SoraConfig, paper="arXiv:2310.18168")
class Sora(nn.Module):
    """SoRA: h = W0 x + (α/r) B (g ⊙ A x) with an L1-sparsified gate g; zero-gate ranks are pruned."""

    zero_init = True
    supports = ("linear",)

    def __init__(self, spec: LayerSpec, cfg: SoraConfig):
        super().__init__()
        self.spec = spec
        self.r = cfg.r  # the configured rank: the scale α/r does not change when ranks are pruned
        self.scale = cfg.alpha / cfg.r
        k = cfg.ranks.get(spec.name, cfg.r)  # this module's rank (< r after pruning)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.lora_A = nn.Parameter(torch.empty(k, spec.in_features, **kw))  # (k, d_in)
        self.lora_B = nn.Parameter(torch.zeros(spec.out_features, k, **kw))  # (d_out, k)
        self.gate = nn.Parameter(torch.empty(k, **kw))  # (k,)
        if k > 0:
            # as the authors' LowRankLinear (TsinghuaC3I/SoRA src/lora.py): loralib init + randn gate
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if cfg.gate_init == "normal":
                nn.init.normal_(self.gate)
            else:
                nn.init.ones_(self.gate)
        self._active_cache: tuple | None = None

    @property
    def rank(self) -> int:
        """Current number of ranks held (r, or fewer after pruning)."""
        return self.gate.shape[0]

    def _active(self) -> torch.Tensor | None:
        """Indices of non-zero gates, or None when every gate is non-zero (cached per gate version)."""
        g = self.gate
        key = (g._version, g.data_ptr(), g.shape[0])
        if self._active_cache is None or self._active_cache[0] != key:
            nz = g.detach() != 0
            idx = None if bool(nz.all()) else nz.nonzero().squeeze(1)
            self._active_cache = (key, idx)
        return self._active_cache[1]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b, g = self.lora_A, self.lora_B, self.gate  # (k, d_in), (d_out, k), (k,)
        if not (torch.is_grad_enabled() and g.requires_grad):
            # Inference: compute with the non-zero-gate ranks only — exactly the matmul shapes
            # the pruned module runs, so pruning leaves outputs bit-identical. (Training needs
            # all ranks: a zero gate's gradient is what can bring it back.)
            idx = self._active()
            if idx is not None:
                a, b, g = a.index_select(0, idx), b.index_select(1, idx), g.index_select(0, idx)
        # (..., d_in) -> (..., k) -> gate -> (..., d_out); ΔW is never formed
        h = F.linear(self.dropout(x.to(a.dtype)), a) * g
        return F.linear(h, b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return ((self.lora_B * self.gate) @ self.lora_A) * self.scale  # (d_out, d_in) — merge/export only

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact LoRA of the non-zero-gate ranks: A' = g ⊙ A (rows), B' = B; SVD-truncated to `rank`."""
        nz = (self.gate.detach() != 0).nonzero().squeeze(1)
        a = self.gate.detach()[nz, None] * self.lora_A.detach()[nz]  # (k', d_in)
        b = self.lora_B.detach()[:, nz].clone()  # (d_out, k')
        if a.shape[0] == 0:  # every gate is zero: ΔW = 0, as a rank-1 LoRA of zeros
            return a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1), self.scale
        if rank is not None and rank < a.shape[0]:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, self.scale

    @torch.no_grad()
    def proximal_step_(self, threshold: float) -> None:
        """g ← sign(g) · max(|g| − threshold, 0), in place."""
        g = self.gate
        g.copy_(g.sign() * (g.abs() - threshold).clamp_min(0))

    @torch.no_grad()
    def prune_(self) -> int:
        """Drop the zero-gate ranks from A, B and g (new, smaller parameters). Returns the new rank."""
        keep = (self.gate != 0).nonzero().squeeze(1)
        if keep.numel() == self.rank:
            return self.rank
        keep_ranks_(self, keep, {"lora_A": 0, "lora_B": 1, "gate": 0})
        self._active_cache = None
        return self.rank

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: SoraConfig) -> list:
        """One callback applying the proximal gate step after every optimizer step."""
        return [proximal_callback(model, name)]


# -- model-level helpers ------------------------------------------------------------------
def sora_modules(model: nn.Module, name: str = "default") -> dict[str, Sora]:
    """Module path -> SoRA adapter `name`; errors if the model has no such SoRA adapter."""
    return adapter_modules(model, name, Sora, "SoRA")


def sora_proximal_step(model: nn.Module, lr: float, name: str = "default") -> int:
    """Apply the L1 proximal step to every gate of adapter `name` after `optimizer.step()`.

    `lr` is the learning rate the optimizer just used for the gates. Returns the number of
    non-zero gates left (the adapter's total active rank).
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ConfigError(f"lr must be a number >= 0, got {lr!r}")
    mods = sora_modules(model, name)
    t = state(model).configs[name].threshold(float(lr))
    for m in mods.values():
        m.proximal_step_(t)
    return _total_active(mods.values())


def active_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Module path -> number of non-zero gates (the rank the module would keep after pruning)."""
    return {p: int((m.gate != 0).sum()) for p, m in sora_modules(model, name).items()}


def _total_active(mods) -> int:
    return int(sum(int((m.gate != 0).sum()) for m in mods))


def prune(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Remove zero-gate ranks of adapter `name` in place; returns {module path: new rank}.

    Outputs are unchanged bit for bit (inference already skips zero-gate ranks). The stored
    config's `ranks` records the new per-module ranks so that save -> load rebuilds them.
    Call it after training: the optimizer would still hold the old, larger parameters.
    """
    return prune_adapter(model, name, sora_modules(model, name), state(model).configs[name].r)


def proximal_callback(model: nn.Module, name: str = "default"):
    """A TrainerCallback running the proximal gate step right after each `optimizer.step()`."""
    from transformers import TrainerCallback

    mods = list(sora_modules(model, name).values())
    cfg = state(model).configs[name]

    class SoraProximalStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            # η = the learning rate of the gate's param group for the step just taken (the
            # scheduler only moves it after this event)
            lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
            for m in mods:
                lr = lrs.get(id(m.gate))
                if lr is not None:  # a gate the optimizer does not train stays as it is
                    m.proximal_step_(cfg.threshold(float(lr)))

    return SoraProximalStep()
