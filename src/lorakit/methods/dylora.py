"""DyLoRA: LoRA trained for a whole range of ranks at once (Valipour et al., arXiv:2210.07558).

The factors are nested: the rank-b model is the first b rows of A and first b columns of B,

    h = W0 x + (α / b) · B[:, :b] A[:b] x,     A: (r, d_in) Kaiming-uniform,  B: (d_out, r) zeros

Training: every optimizer step draws b ~ U{min_rank..r} (one b shared by all layers of the
adapter) and trains the rank-b truncation, so the leading rows/columns learn the most
important directions (nested dropout, "ordered representation"). mode="frozen" is the
paper's cheaper variant: only row/column b gets a gradient, rows 1..b-1 are detached.
Evaluation: the rank is `eval_rank` (default r) and can be changed at any time after
training with `set_rank(model, k)` — no retraining, no SVD. `to_lora(k)` returns exactly
the rank-k DyLoRA model (A[:k], B[:, :k], α/k), not an approximation.

Inside `lorakit.train.train` (or any Trainer given `Dylora.trainer_callbacks(...)`) the
per-step b comes from a TrainerCallback seeded by the Trainer's seed and the step number,
so runs and resumed runs draw the same ranks. In a custom loop call
`set_train_rank(model, b)` before each step; a module in train mode with no b set uses r.
Under no_grad / inference_mode (and in eval mode) the served rank `eval_rank` is used.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.inject import adapter_modules, check_not_merged, state
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError

MODES = ("full", "frozen")


@dataclass
class DyLoraConfig(AdapterConfig):
    """r: largest rank; min_rank: smallest rank sampled in training (b ~ U{min_rank..r});
    alpha: scale numerator (scale α/b at rank b); dropout on the adapter input;
    mode: "full" (rows 1..b all train) or "frozen" (only row/column b trains);
    eval_rank: rank used outside training (None = r); change it later with `set_rank`.
    """

    r: int = 8
    alpha: float = 16.0
    min_rank: int = 1
    dropout: float = 0.0
    mode: str = "full"
    eval_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_int("min_rank", self.min_rank)
        if self.min_rank > self.r:
            raise ConfigError(f"min_rank must be <= r={self.r}, got {self.min_rank}")
        if self.eval_rank is not None:
            check_positive_int("eval_rank", self.eval_rank)
            if self.eval_rank > self.r:
                raise ConfigError(f"eval_rank must be between 1 and r={self.r}, got {self.eval_rank}")
        check_range("dropout", self.dropout, 0.0, 1.0)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")


@register_method("dylora", DyLoraConfig, paper="arXiv:2210.07558")
class Dylora(nn.Module):
    """DyLoRA: h = W0 x + (α/b) B[:, :b] A[:b] x, b sampled per step in training, chosen at eval."""

    zero_init = True
    supports = ("linear",)

    def __init__(self, spec: LayerSpec, cfg: DyLoraConfig):
        super().__init__()
        self.spec = spec
        self.r = cfg.r
        self.alpha = float(cfg.alpha)
        self.frozen = cfg.mode == "frozen"
        self.eval_rank = cfg.eval_rank or cfg.r
        self.train_rank: int | None = None  # set each step by the rank sampler
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.lora_A = nn.Linear(spec.in_features, cfg.r, bias=False, **kw)  # (r, d_in)
        self.lora_B = nn.Linear(cfg.r, spec.out_features, bias=False, **kw)  # (d_out, r)
        # LoRA's init (the DyLoRA reference builds on loralib): A Kaiming-uniform, B zeros
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def rank(self) -> int:
        """The rank the next forward uses: the sampled b (r if none) in training, eval_rank otherwise.

        "Training" is train mode *with autograd on*: under no_grad / inference_mode the
        served eval_rank is used even if the module was left in train mode (adapters
        injected into an eval-mode model start in train mode, nn.Module's default).
        """
        if self.training and torch.is_grad_enabled():
            return self.train_rank if self.train_rank is not None else self.r
        return self.eval_rank

    def scale(self, b: int) -> float:
        return self.alpha / b

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        b = self.rank()
        a, bm = self.lora_A.weight, self.lora_B.weight  # (r, d_in), (d_out, r)
        if self.frozen and b > 1 and self.training and torch.is_grad_enabled():
            # only the b-th row of A / column of B learns; the leading ones are kept as they are
            a = torch.cat([a[: b - 1].detach(), a[b - 1 : b]], dim=0)  # (b, d_in)
            bm = torch.cat([bm[:, : b - 1].detach(), bm[:, b - 1 : b]], dim=1)  # (d_out, b)
        else:
            a, bm = a[:b], bm[:, :b]
        # (..., d_in) -> (..., b) -> (..., d_out); ΔW is never formed
        h = F.linear(self.dropout(x.to(a.dtype)), a)
        return F.linear(h, bm) * self.scale(b)

    def delta_weight(self) -> torch.Tensor:
        b = self.eval_rank  # merge/unmerge are explicit and independent of train()/eval()
        return (self.lora_B.weight[:, :b] @ self.lora_A.weight[:b]) * self.scale(b)  # (d_out, d_in)

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The rank-k DyLoRA model exactly: (A[:k], B[:, :k], α/k); k = eval_rank by default."""
        k = self.eval_rank if rank is None else min(int(rank), self.r)
        if k <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        a = self.lora_A.weight[:k].detach().clone()
        b = self.lora_B.weight[:, :k].detach().clone()
        return a, b, self.scale(k)

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: DyLoraConfig) -> list:
        """One callback drawing b each optimizer step for every DyLoRA module of `name`."""
        return [rank_sampler(model, name)]


# -- model-level helpers ------------------------------------------------------------------
def dylora_modules(model: nn.Module, name: str = "default") -> dict[str, Dylora]:
    """Module path -> DyLoRA adapter `name`; errors if the model has no such DyLoRA adapter."""
    return adapter_modules(model, name, Dylora, "DyLoRA")


def set_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Serve adapter `name` at rank `rank` from now on (eval mode, merge, export, save).

    The stored config's `eval_rank` changes too, so `lorakit.save` records the choice.
    Refused while the adapter is merged: unmerge must subtract the update that was added.
    """
    mods = dylora_modules(model, name)
    r = next(iter(mods.values())).r
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
        raise ConfigError(f"rank must be an integer between 1 and r={r}, got {rank!r}")
    check_not_merged(model, name)
    for m in mods.values():
        m.eval_rank = rank
    st = state(model)
    st.configs[name] = dataclasses.replace(st.configs[name], eval_rank=rank)


def set_train_rank(model: nn.Module, rank: int | None, name: str = "default") -> None:
    """Rank b for the next training forward(s) of adapter `name` (None: full rank r)."""
    mods = dylora_modules(model, name)
    r = next(iter(mods.values())).r
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r):
        raise ConfigError(f"train rank must be an integer between 1 and r={r} or None, got {rank!r}")
    for m in mods.values():
        m.train_rank = rank


def sample_rank(seed: int, step: int, min_rank: int, r: int) -> int:
    """b ~ U{min_rank..r}, a pure function of (seed, step): reruns and resumes draw the same b."""
    # string seeds go through SHA-512 in `random`, independent of PYTHONHASHSEED
    return random.Random(f"dylora:{seed}:{step}").randint(min_rank, r)


def rank_sampler(model: nn.Module, name: str = "default"):
    """A TrainerCallback setting b = sample_rank(args.seed, global_step, ...) at each step begin."""
    from transformers import TrainerCallback

    mods = list(dylora_modules(model, name).values())
    cfg = state(model).configs[name]

    class DyLoraRankSampler(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            # one b per optimizer step (all micro-batches of a gradient-accumulation cycle)
            b = sample_rank(args.seed, state.global_step, cfg.min_rank, cfg.r)
            for m in mods:
                m.train_rank = b

        def on_train_end(self, args, state, control, **kwargs):
            for m in mods:  # a model left in train mode must not keep the last sampled b
                m.train_rank = None

    return DyLoraRankSampler()
