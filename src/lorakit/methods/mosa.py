"""MoSA, Mixture of Sparse Adapters ("Split & Merge", Zhang et al., arXiv:2312.02923).

Split: an adapter with m hidden units (LoRA: the r ranks; bottleneck: m = ⌊d/rf⌋ units) is cut
into K disjoint sub-adapters of m/K consecutive units: group k owns rows k·m/K … (k+1)·m/K − 1
of A (W_down, b_down) and the same columns of B (W_up). Every unit acts on its own (LoRA is
linear; φ is element-wise), so the full adapter is exactly the sum of its groups:

    "mosa" (LoRA):          ΔW x = s · Σ_k B_k A_k x              A_k: (r/K, d_in), B_k: (d_out, r/K)
    "mosa_bn" (bottleneck): f(u) = s · (Σ_k W_up,k φ(W_down,k u + b_down,k) + b_up)

Sparse training: at every optimizer step each adapted module activates one group k, drawn
uniformly from (seed, step, module path): reproducible, and a resumed run draws the same
groups. The forward then uses only that group, scaled by K (inverted-dropout scaling: the
expected training output equals the full adapter's):

    LoRA:        Δ = K · s · B_k A_k x
    bottleneck:  f_k(u) = s · (K · W_up,k φ(W_down,k u + b_down,k) + b_up)

The other groups are not in the graph: their gradients stay None, so no optimizer (Adam
moments, weight decay) moves them in that step. b_up is shared by all groups and trains
every step.

Merge: outside training (eval mode, no_grad, or no group drawn) every module runs the full
adapter, the concatenation of its groups; `merge_groups(model)` turns the MoSA adapter into
the plain adapter it equals ("lora" / "bottleneck" with the concatenated factors), and for
"mosa" `to_lora()` is exact, so it merges into W0 and exports to PEFT like any LoRA.

Inside `lorakit.train.train` (or any Trainer given `trainer_callbacks(...)`) a TrainerCallback
draws the groups at each step begin. In a custom loop call `set_step(model, step, seed)` before
each optimizer step (and `clear_groups(model)` after training).

Deviations from the reference code: it keeps K full-size copies with random element-wise masks
and averages them at the end, and draws separate experts for the down and up projection; here
the split is by hidden units (so a sub-adapter is a smaller adapter of the same kind, the merge
is an exact concatenation and storage equals one adapter), one group per module per step. The
paper's hierarchical sparse strategy is not implemented.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import LayerSpec, check_positive_int
from lorakit.core.inject import adapter_modules, apply_plan, check_not_merged, delete_adapter, plan_injection, state
from lorakit.core.registry import register_method
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.bottleneck import BottleneckConfig, activate, bottleneck_size, init_linear_
from lorakit.methods.lora import Lora, LoraConfig


def _check_groups(groups) -> int:
    return check_positive_int("groups", groups)


@dataclass
class MosaConfig(LoraConfig):
    """LoraConfig fields plus groups: K, the number of disjoint sub-adapters (r must be a multiple)."""

    groups: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_groups(self.groups)
        for where, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if r % self.groups:
                raise ConfigError(f"{where}={r} must be a multiple of groups={self.groups} (disjoint groups of r/K ranks)")

    def plain(self) -> LoraConfig:
        """The LoRA config of the merged adapter."""
        return LoraConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig) if f.init})


@dataclass
class MosaBnConfig(BottleneckConfig):
    """BottleneckConfig fields plus groups: K, the number of disjoint sub-adapters (the m hidden
    units, m = ⌊d / reduction_factor⌋, must be a multiple of K)."""

    groups: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_groups(self.groups)

    def plain(self) -> BottleneckConfig:
        """The bottleneck config of the merged adapter."""
        return BottleneckConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BottleneckConfig) if f.init})


class _Groups:
    """Group selection shared by both adapters: `train_group` is set per step by the sampler."""

    groups: int
    train_group: int | None
    training: bool

    def group(self) -> int | None:
        """The group the next forward uses; None = the full (merged) adapter.

        Only in train mode with autograd on: evaluation and no_grad always see the full adapter.
        """
        if self.training and torch.is_grad_enabled():
            return self.train_group
        return None


@register_method("mosa", MosaConfig, paper="arXiv:2312.02923")
class Mosa(_Groups, nn.Module):
    """MoSA on LoRA: r ranks in K disjoint groups, one random group trained per step (×K),
    merged back into the full LoRA h = W0 x + s·B A x."""

    zero_init = True
    supports = ("linear",)

    def __init__(self, spec: LayerSpec, cfg: MosaConfig):
        super().__init__()
        self.spec = spec
        r, alpha = cfg.rank_alpha(spec.name)
        self.r, self.groups = r, cfg.groups
        self.train_group = None
        self.scale = alpha / (math.sqrt(r) if cfg.rslora else r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = dict(dtype=spec.dtype, device=spec.device)
        a = torch.empty(r, spec.in_features, **kw)  # the full LoRA A, initialised as LoRA does, then split
        if cfg.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1.0 / r)
        g = r // cfg.groups
        self.lora_A = nn.ParameterList([nn.Parameter(a[k * g:(k + 1) * g].clone()) for k in range(cfg.groups)])  # K × (r/K, d_in)
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(spec.out_features, g, **kw))
                                        for _ in range(cfg.groups)])  # K × (d_out, r/K)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged adapter: (A (r, d_in), B (d_out, r)) = concatenation of the groups."""
        return torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_B), 1)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        k = self.group()
        if k is None:
            (a, b), s = self.factors(), self.scale
        else:  # sparse training: only group k is in the graph
            a, b, s = self.lora_A[k], self.lora_B[k], self.scale * self.groups
        # (..., d_in) -> (..., r or r/K) -> (..., d_out); ΔW is never formed
        return F.linear(F.linear(self.dropout(x.to(a.dtype)), a), b) * s

    # merged into the full LoRA (factors(), r, scale): ΔW and PEFT export exactly as LoRA's
    delta_weight = Lora.delta_weight
    to_lora = Lora.to_lora

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: MosaConfig) -> list:
        return [group_sampler(model, name)]


@register_method("mosa_bn", MosaBnConfig, paper="arXiv:2312.02923")
class MosaBn(_Groups, nn.Module):
    """MoSA on bottleneck adapters: m hidden units in K disjoint groups, one random group trained
    per step (×K), merged back into the full bottleneck h ← h + s·(W_up φ(W_down u + b_down) + b_up)."""

    zero_init = True
    supports = ("insert",)
    test_config: ClassVar[dict] = {"reduction_factor": 4}  # hidden 32: m = 8 units, 4 groups of 2

    def __init__(self, spec: LayerSpec, cfg: MosaBnConfig):
        super().__init__()
        self.spec = spec
        d = spec.in_features
        m = bottleneck_size(d, cfg.reduction_factor)
        if m % cfg.groups:
            raise ConfigError(f"mosa_bn: the bottleneck at {spec.name} has m = ⌊{d} / {cfg.reduction_factor}⌋ = {m} "
                              f"hidden units, not a multiple of groups={cfg.groups}; change reduction_factor or groups")
        self.groups, self.train_group = cfg.groups, None
        self.act, self.scaling = cfg.activation, float(cfg.scaling)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = dict(dtype=spec.dtype, device=spec.device)
        down, up = nn.Linear(d, m, **kw), nn.Linear(m, d, **kw)  # the full adapter, initialised as `bottleneck`
        init_linear_(down, cfg.init)
        init_linear_(up, cfg.init, zero=True)
        g = m // cfg.groups
        cut = [slice(k * g, (k + 1) * g) for k in range(cfg.groups)]
        self.down_weight = nn.ParameterList([nn.Parameter(down.weight.detach()[c].clone()) for c in cut])  # K × (m/K, d)
        self.down_bias = nn.ParameterList([nn.Parameter(down.bias.detach()[c].clone()) for c in cut])  # K × (m/K,)
        self.up_weight = nn.ParameterList([nn.Parameter(up.weight.detach()[:, c].clone()) for c in cut])  # K × (d, m/K)
        self.up_bias = nn.Parameter(up.bias.detach().clone())  # (d,): shared by all groups

    @classmethod
    def insert_roles(cls, config: MosaBnConfig) -> tuple[str, ...]:
        return config.roles

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The merged adapter as a `bottleneck` state dict: the groups concatenated."""
        return {"adapter_down.weight": torch.cat(list(self.down_weight), 0),
                "adapter_down.bias": torch.cat(list(self.down_bias), 0),
                "adapter_up.weight": torch.cat(list(self.up_weight), 1),
                "adapter_up.bias": self.up_bias}

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        k = self.group()
        if k is None:
            w = self.full_weights()
            wd, bd, wu, gain = w["adapter_down.weight"], w["adapter_down.bias"], w["adapter_up.weight"], 1.0
        else:  # sparse training: only group k's units (and the shared b_up) are in the graph
            wd, bd, wu, gain = self.down_weight[k], self.down_bias[k], self.up_weight[k], float(self.groups)
        # (..., d) -> (..., m or m/K) -> (..., d)
        hidden = activate(self.act, F.linear(x.to(wd.dtype), wd, bd))
        return self.dropout((F.linear(hidden, wu) * gain + self.up_bias) * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        raise ConfigError("a bottleneck adapter is nonlinear (φ between its projections): it has no weight delta")

    @classmethod
    def trainer_callbacks(cls, model: nn.Module, name: str, config: MosaBnConfig) -> list:
        return [group_sampler(model, name)]


# -- model-level helpers ------------------------------------------------------------------
def mosa_modules(model: nn.Module, name: str = "default") -> dict[str, Mosa | MosaBn]:
    """Module path -> MoSA adapter `name` (either kind); errors if the model has none."""
    return adapter_modules(model, name, (Mosa, MosaBn), "MoSA")


def sample_group(seed: int, step: int, path: str, groups: int) -> int:
    """k ~ U{0..groups-1}, a pure function of (seed, step, module path): reruns and resumes agree."""
    # string seeds go through SHA-512 in `random`, independent of PYTHONHASHSEED
    return random.Random(f"mosa:{seed}:{step}:{path}").randrange(groups)


def set_step(model: nn.Module, step: int, seed: int = 0, name: str = "default") -> dict[str, int]:
    """Draw the active group of every module of adapter `name` for optimizer step `step`."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step must be a non-negative integer, got {step!r}")
    drawn = {}
    for path, m in mosa_modules(model, name).items():
        m.train_group = drawn[path] = sample_group(seed, step, path, m.groups)
    return drawn


def clear_groups(model: nn.Module, name: str = "default") -> None:
    """Back to the full adapter in every forward (train mode included)."""
    for m in mosa_modules(model, name).values():
        m.train_group = None


def group_sampler(model: nn.Module, name: str = "default"):
    """A TrainerCallback calling `set_step(model, global_step, args.seed)` at each step begin."""
    from transformers import TrainerCallback

    mosa_modules(model, name)  # fail early when there is no such adapter

    class MosaGroupSampler(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            # one draw per optimizer step (all micro-batches of a gradient-accumulation cycle)
            set_step(model, state.global_step, args.seed, name)

        def on_train_end(self, args, state, control, **kwargs):
            clear_groups(model, name)  # a model left in train mode must not keep the last draw

    return MosaGroupSampler()


def merge_groups(model: nn.Module, name: str = "default", out_name: str | None = None) -> str:
    """Replace MoSA adapter `name` by the plain adapter it equals ("lora" for mosa, "bottleneck"
    for mosa_bn) holding the concatenated groups, under `out_name` (default: the same name).

    The result saves in the plain method's format (for "lora": PEFT's). Its active state is
    kept; it is trainable like a freshly injected adapter. On any error the model is unchanged.
    """
    mods = mosa_modules(model, name)
    check_not_merged(model, name)
    st = state(model)
    out = out_name or name
    if out != name and out in st.configs:
        raise AdapterError(f"adapter {out!r} already exists on this model; pick another out_name")
    cfg = st.configs[name]
    tmp = f"{name}__merge"[:64]
    plan = plan_injection(model, cfg.plain(), tmp)  # validates everything; the model is untouched
    if set(plan.adapters) != set(mods):
        raise AdapterError(f"internal error: merged adapter would cover {sorted(plan.adapters)[:3]}, "
                           f"MoSA covers {sorted(mods)[:3]}")
    with torch.no_grad():
        for path, new in plan.adapters.items():
            m = mods[path]
            if isinstance(m, Mosa):
                a, b = m.factors()
                new.lora_A.weight.copy_(a)
                new.lora_B.weight.copy_(b)
            else:
                new.load_state_dict(m.full_weights())
    was_active = name in st.active
    delete_adapter(model, name)
    plan.name = out
    apply_plan(model, plan, activate=was_active)
    return out
