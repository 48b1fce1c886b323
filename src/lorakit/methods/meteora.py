"""MeteoRA: many task LoRAs embedded in one model with a per-token gate (Xu et al., arXiv:2405.13053).

n task LoRAs are stacked in one tensor per adapted layer; a gate picks the top-k (k = 2) of
them for every token:

    z(x) = W_g x                                 W_g: (n, d_in) gate, Kaiming-uniform
    S(x) = top-k indices of z(x)
    w(x) = softmax(z_S(x))                       (k = 1: w = 1)
    h    = W0 x + Σ_{i∈S} w_i s_i B_i A_i x       A: (n, r, d_in), B: (n, d_out, r)

as the authors' `MoELinear` (NJUDeepEngine/meteora MoELoRA/layer.py: top-k of the raw gate
logits, softmax over the k chosen; every LoRA keeps its own scale s_i). Freshly built, A is
Kaiming-uniform, B = 0 and s_i = α/r; `from_adapters(model, [...])` instead fills A and B
from already-trained LoRA adapters (folding each one's scale into its B, zero-padding ranks
< r) and freezes them, so that only the gate trains — the paper's setting.

Gate training: given per-token task labels t (the index of the LoRA a token's task belongs
to), each gate adds the cross-entropy of its full logits (the reference `lora_gate_loss_func`)

    L_gate = c · CE(z(x), t)        c = gate_loss_coef (≈ 50, METHODS.md); labels -100 are ignored

summed over the adapted layers. Labels reach the layers through `task_labels(model, t)`
(a context manager) or, for a `model(**batch)` loop such as Trainer with a `task_ids`
column, through `accept_task_ids(model)` (a forward pre-hook that pops `task_ids` from the
model's kwargs). The loss enters the backward through `AddAuxiliaryLoss` (see mola.py): the
layer output is unchanged and `backward()` of the main loss yields ∂(loss + Σ L_gate)/∂θ.
Without labels the gate trains from the main loss alone.

Forward: the per-token top-k is a gather/scatter of gate weights into an (N, n) matrix that
scales the rank blocks of the stacked rank-(n·r) LoRA: one matmul down, one up, no Python
loop over experts or tokens. (The reference's torch path gathers A[S], B[S] per token and
runs a bmm — N·k·r·(d_in + d_out) copied weights; its Triton kernel avoids the copies. Ours
computes all n down-projections and multiplies the unchosen ones by 0: cost ∝ n·r, no copies.)

The update depends on x through the gate: `delta_weight` (merge) raises and there is no
`to_lora` (LoRA export refuses). To serve one task without the gate, use its original LoRA.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.inject import adapter_modules, apply_plan, plan_injection
from lorakit.core.registry import register_method
from lorakit.errors import ConfigError
from lorakit.methods.mola import add_aux_loss, check_number, mixture_delta, not_mergeable

IGNORE = -100


@dataclass
class MeteoraConfig(AdapterConfig):
    """num_experts: n task LoRAs; r: rank of each (the largest, when built from adapters);
    alpha: s = α/r for freshly built experts; top_k: LoRAs per token (2); gate_loss_coef: c
    of the task-id cross-entropy (used only when task labels are given); dropout on the
    adapter input; freeze_experts: A and B never train (set by `from_adapters`; survives
    save/load), only the gate does.
    """

    num_experts: int = 4
    r: int = 8
    alpha: float = 16.0
    top_k: int = 2
    gate_loss_coef: float = 50.0
    dropout: float = 0.0
    freeze_experts: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("r", self.r)
        check_positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; use top_k <= num_experts")
        check_number("alpha", self.alpha)
        check_number("gate_loss_coef", self.gate_loss_coef, positive=False)
        check_range("dropout", self.dropout, 0.0, 1.0)
        if not isinstance(self.freeze_experts, bool):
            raise ConfigError(f"freeze_experts must be true or false, got {self.freeze_experts!r}")


@register_method("meteora", MeteoraConfig, paper="arXiv:2405.13053")
class Meteora(nn.Module):
    """MeteoRA: h = W0 x + Σ_{i ∈ top-k gate(x)} w_i(x) s_i B_i A_i x over n stacked task LoRAs."""

    zero_init = True
    supports = ("linear",)
    mergeable: ClassVar[bool] = False  # routed per token: no ΔW exists
    test_config: ClassVar[dict] = {"num_experts": 3, "r": 2, "top_k": 2}

    def __init__(self, spec: LayerSpec, cfg: MeteoraConfig):
        super().__init__()
        self.spec = spec
        self.n_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.scale = cfg.alpha / cfg.r
        self.gate_loss_coef = cfg.gate_loss_coef
        self.freeze_experts = cfg.freeze_experts
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        n, r, d_in, d_out = cfg.num_experts, cfg.r, spec.in_features, spec.out_features
        self.gate = nn.Parameter(torch.empty(n, d_in, **kw))  # W_g: (n, d_in)
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in, **kw))  # (n, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(n, d_out, r, **kw))  # (n, d_out, r)
        # the reference's update_layer_post builds moe_gate/lora_A as nn.Linear: Kaiming-uniform
        nn.init.kaiming_uniform_(self.gate, a=math.sqrt(5))
        for i in range(n):
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        self.task_labels: torch.Tensor | None = None  # (batch,) or (batch, seq) while labels are set
        self.last_counts: torch.Tensor | None = None  # (n,) top-k choices in the last forward
        self.last_aux_loss: torch.Tensor | None = None  # detached L_gate of the last labelled forward
        self.requires_grad_(True)

    def requires_grad_(self, requires_grad: bool = True) -> Meteora:
        """As nn.Module's, except that frozen experts (freeze_experts) stay frozen."""
        super().requires_grad_(requires_grad)
        if self.freeze_experts:
            self.lora_A.requires_grad_(False)
            self.lora_B.requires_grad_(False)
        return self

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d_in) -> gate logits z (N, n), chosen LoRAs (N, k), gate weights (N, n)."""
        z = F.linear(x, self.gate)  # (N, n)
        top, chosen = z.topk(self.top_k, dim=-1)  # (N, k), of the raw logits
        w = torch.softmax(top.float(), dim=-1)  # k = 1: exactly 1
        gates = torch.zeros(z.shape, dtype=w.dtype, device=z.device).scatter(-1, chosen, w)
        return z, chosen, gates.to(x.dtype)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)  # (N, d_in)
        z, chosen, gates = self.route(x2)
        self.last_counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts).detach()
        out = mixture_delta(self.dropout(x2), self.lora_A, self.lora_B, gates) * self.scale  # (N, d_out)
        labels = self.task_labels
        if labels is not None and torch.is_grad_enabled() and self.gate.requires_grad and self.gate_loss_coef > 0:
            t = _token_labels(labels.to(x.device), lead)  # (N,)
            if bool((t != IGNORE).any()):
                ce = self.gate_loss_coef * F.cross_entropy(z.float(), t, ignore_index=IGNORE)
                self.last_aux_loss = ce.detach()
                out = add_aux_loss(out, ce)
        return out.reshape(*lead, self.spec.out_features)

    def delta_weight(self) -> torch.Tensor:
        raise not_mergeable("MeteoRA")


def _token_labels(labels: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Task labels (batch,) or (batch, seq) -> one per token of an input with leading shape `lead`."""
    if labels.dim() == 1 and len(lead) >= 1 and labels.shape[0] == lead[0]:
        return labels.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
    if tuple(labels.shape) == tuple(lead):
        return labels.reshape(-1)
    raise ValueError(f"task labels of shape {tuple(labels.shape)} do not fit the layer input's leading shape "
                     f"{tuple(lead)}: give one label per row (batch,) or per token (batch, seq)")


# -- model-level helpers ------------------------------------------------------------------------
def meteora_modules(model: nn.Module, name: str = "default") -> dict[str, Meteora]:
    """Module path -> MeteoRA adapter `name`; errors if the model has no such MeteoRA adapter."""
    return adapter_modules(model, name, Meteora, "MeteoRA")


def _check_labels(labels, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    t = torch.as_tensor(labels)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() not in (1, 2):
        raise ValueError(f"task labels must be integer tensors of shape (batch,) or (batch, seq), "
                         f"got dtype {t.dtype} shape {tuple(t.shape)}")
    t = t.long()
    valid = t[t != IGNORE]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n):
        raise ValueError(f"task labels must lie in [0, {n - 1}] (or be {IGNORE}), got values "
                         f"{sorted(set(valid.tolist()))[:8]}")
    return t


@contextlib.contextmanager
def task_labels(model: nn.Module, labels, name: str = "default"):
    """Within the block, every gate of adapter `name` adds c·CE(gate logits, labels) to the backward.

        with task_labels(model, task_ids):          # (batch,) or (batch, seq), -100 = ignore
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()                             # gradients of loss + Σ c·CE
    """
    mods = list(meteora_modules(model, name).values())
    t = _check_labels(labels, mods[0].n_experts)
    for m in mods:
        m.task_labels = t
    try:
        yield model
    finally:
        for m in mods:
            m.task_labels = None


def accept_task_ids(model: nn.Module, name: str = "default", key: str = "task_ids"):
    """Let `model(**batch)` take a `task_ids` entry: a forward pre-hook pops it and hands it to
    the gates of adapter `name` for that forward (no `task_ids`: no gate loss). Returns the
    hook handle (`.remove()` it to undo)."""
    mods = list(meteora_modules(model, name).values())

    def hook(module, args, kwargs):
        t = _check_labels(kwargs.pop(key, None), mods[0].n_experts)
        for m in mods:
            m.task_labels = t
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def gate_loss(model: nn.Module, name: str = "default") -> float:
    """Σ c·CE of the last labelled forward over the gates of adapter `name` (for logging)."""
    return float(sum(float(m.last_aux_loss) for m in meteora_modules(model, name).values()
                     if m.last_aux_loss is not None))


# -- building from trained LoRAs ------------------------------------------------------------------
def _read_lora_dir(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A saved LoRA adapter (lorakit or PEFT) -> {module path: (A, s·B)}."""
    from lorakit.core.io import PREFIX, read_config, read_tensors

    cfg, _ = read_config(path)
    if cfg.method != "lora":
        raise ConfigError(f"{path}: MeteoRA composes plain LoRA adapters, this one is {cfg.method!r} "
                          "(export it first with lorakit.core.io.export_peft)")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tensors = {k.removeprefix(PREFIX): t for k, t in read_tensors(path).items()}
    for key in tensors:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            what = "an embedding LoRA" if "lora_embedding" in key else "a non-LoRA tensor (modules_to_save?)"
            raise ConfigError(f"{path}: tensor {key!r} is {what}; MeteoRA stacks linear-layer LoRAs only")
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        mpath = key[: -len(".lora_A.weight")]
        b = tensors.get(f"{mpath}.lora_B.weight")
        if b is None:
            raise ConfigError(f"{path}: {mpath} has lora_A but no lora_B")
        r, alpha = cfg.rank_alpha(mpath)
        scale = alpha / (math.sqrt(r) if cfg.rslora else r)
        out[mpath] = (a, b * scale)
    if not out:
        raise ConfigError(f"{path}: no LoRA factors found")
    return out


def _read_factors(source, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(source, (str, os.PathLike)):
        return _read_lora_dir(source)
    if not isinstance(source, dict) or not source:
        raise ConfigError(f"source {i}: expected an adapter directory or a non-empty "
                          f"{{module path: (A, B[, scale])}} mapping, got {type(source).__name__}")
    out = {}
    for mpath, fac in source.items():
        if not isinstance(fac, (tuple, list)) or len(fac) not in (2, 3):
            raise ConfigError(f"source {i}, module {mpath!r}: expected (A, B) or (A, B, scale)")
        a, b = torch.as_tensor(fac[0]), torch.as_tensor(fac[1])
        scale = float(fac[2]) if len(fac) == 3 else 1.0
        out[mpath] = (a, b * scale)
    return out


def from_adapters(model: nn.Module, sources: list, name: str = "default", top_k: int = 2,
                  gate_loss_coef: float = 50.0, dropout: float = 0.0) -> nn.Module:
    """Embed trained LoRAs in `model` as one MeteoRA adapter `name`: expert i = sources[i].

    Each source is a saved LoRA adapter directory (lorakit or PEFT) or a mapping
    {module path: (A (r_i, d_in), B (d_out, r_i)[, scale])}. The adapter covers the union of
    their modules (a LoRA missing on a module is a zero expert there); ranks are zero-padded
    to the largest, scales folded into B (s = 1). The experts are frozen (freeze_experts, kept
    across save/load); only the gates train. All checks run before the model is changed.
    """
    if not isinstance(sources, (list, tuple)) or not sources:
        raise ConfigError("from_adapters needs a non-empty list of LoRA adapters")
    experts = [_read_factors(s, i) for i, s in enumerate(sources)]
    paths = sorted(set().union(*experts))
    r = max(a.shape[0] for e in experts for a, _ in e.values())
    cfg = MeteoraConfig(target=paths, num_experts=len(experts), r=r, alpha=float(r), top_k=top_k,
                        gate_loss_coef=gate_loss_coef, dropout=dropout, freeze_experts=True)
    plan = plan_injection(model, cfg, name)
    missing = [p for p in paths if p not in plan.adapters]
    if missing:
        raise ConfigError(f"LoRA modules {missing[:5]} are not adaptable linear layers of this model")
    with torch.no_grad():
        for mpath, m in plan.adapters.items():
            m.lora_A.zero_()
            for i, e in enumerate(experts):
                if mpath not in e:
                    continue
                a, b = e[mpath]
                ri, d_in, d_out = a.shape[0], m.spec.in_features, m.spec.out_features
                if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or tuple(b.shape) != (d_out, ri):
                    raise ConfigError(f"source {i}, module {mpath!r}: A {tuple(a.shape)} and B {tuple(b.shape)} "
                                      f"do not fit the layer: expected A (r, {d_in}) and B ({d_out}, r)")
                m.lora_A[i, :ri] = a.to(m.lora_A.dtype)
                m.lora_B[i, :, :ri] = b.to(m.lora_B.dtype)
    apply_plan(model, plan)  # cannot fail from here on; experts stay frozen (freeze_experts)
    return model
