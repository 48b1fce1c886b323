"""MoLA: MoE-LoRA with layer-wise expert allocation (Gao et al., arXiv:2402.08562).

Every adapted linear layer holds E_l LoRA experts (rank r each) and a router; each token
goes to its top-k experts (k = 2 by default):

    p(x)  = softmax(W_g x)                              W_g: (E_l, d_in)  router, Kaiming-uniform
    S(x)  = top-k indices of p(x)
    w_e   = p_e / Σ_{j∈S} p_j  for e ∈ S, else 0          (renormalised over the chosen experts)
    h     = W0 x + s · Σ_e w_e B_e A_e x                 A: (E_l, r, d_in) Kaiming-uniform,
                                                          B: (E_l, d_out, r) zeros,  s = α / r

The number of experts E_l grows with depth. The layer index l is the first number in the
module path ("model.layers.7.self_attn.q_proj" -> 7); the `num_layers` layers are split into
len(counts) contiguous groups of equal size and group g gets counts[g] experts. Layouts
from the paper (four quarters of the layers): "inverted" 2/4/6/8 (MoLA-▽, its best, the
default), "triangle" 8/6/4/2 (MoLA-△), "square" 5/5/5/5 (MoLA-□), "hourglass" 8/2/2/8
(MoLA-⋈); or any explicit list of counts (one per group; len == num_layers: one per layer).

Load balancing: the Switch-Transformer auxiliary loss of the authors' code
(GCYZSL/MoLA src/mola_modeling_llama_hacked.py, `load_balancing_loss_func`), per router:

    f_e = (# of (token, slot) choices of e) / (N·k)     fraction of the top-k choices (no gradient)
    P_e = mean over the N tokens of p_e(x)
    L_aux = c · E_l · Σ_e f_e P_e                        c = aux_loss_coef (0.001 in their code)

summed over the adapted layers. lorakit's training loss is `model(**batch).loss` inside the
stock Trainer, which a method cannot change; so L_aux enters the *backward* instead: the
layer output passes through `AddAuxiliaryLoss` (identity in forward; in backward it hands
∂L_aux/∂L_aux = 1 to L_aux, whose graph reaches only the router). This is the mechanism of
DeepSeek-MoE's `AddAuxiliaryLoss` and Megatron-LM's `MoEAuxLossAutoScaler`: the gradients
are exactly those of `loss + Σ L_aux`, the graph is the forward's own (nothing is recomputed
or retained past backward), and it works under gradient checkpointing and in any loop.
Two differences from the reference: (1) the authors concatenate the router logits of all
adapted modules of one decoder layer before computing f and P (one term per layer); lorakit
takes one term per router, so with M adapted modules per layer each router's balancing
gradient is ≈M× the reference's — use aux_loss_coef = 0.001 / M to match it; (2) Trainer
divides the main loss by the gradient-accumulation steps n but not this term, so with
n micro-batches per step the effective coefficient is n·c.

The update depends on x through the routing, so there is no ΔW: `delta_weight` (merge)
raises instead of approximating, and there is no `to_lora` (LoRA export refuses). Serve MoLA
adapters unmerged.

Compute: the per-token top-k is a scatter of the weights w into an (N, E_l) gate matrix;
the experts run as one stacked rank-(E_l·r) LoRA whose rank blocks are scaled by the gates
(no Python loop over experts or tokens; unchosen experts are multiplied by 0 and get zero
gradient, exactly as if skipped).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, check_range
from lorakit.core.inject import adapter_modules
from lorakit.core.registry import register_method
from lorakit.errors import AdapterError, ConfigError

#: Paper layouts: experts per quarter of the layers, bottom to top.
LAYOUTS: dict[str, tuple[int, ...]] = {
    "inverted": (2, 4, 6, 8),
    "triangle": (8, 6, 4, 2),
    "square": (5, 5, 5, 5),
    "hourglass": (8, 2, 2, 8),
}
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


# -- shared math for routed mixtures (used by SMoRA and MeteoRA too) ------------------------------
class AddAuxiliaryLoss(torch.autograd.Function):
    """y = x in forward; in backward, x gets y's gradient and `aux` gets gradient 1.

    So `backward()` of any loss computed from y yields ∂(loss + aux)/∂θ: an auxiliary loss
    added without access to the loss (DeepSeek-MoE's AddAuxiliaryLoss, Megatron-LM's
    MoEAuxLossAutoScaler). `aux` must be a scalar; its graph is freed with the main one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.dtype, aux.device, aux.requires_grad)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device, needs = ctx.aux_meta
        return grad, (torch.ones((), dtype=dtype, device=device) if needs else None)


def add_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """`out`, unchanged, carrying `aux` into the backward pass (see `AddAuxiliaryLoss`)."""
    return AddAuxiliaryLoss.apply(out, aux)


def switch_balance_loss(probs: torch.Tensor, chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E · Σ_e f_e P_e for router probabilities `probs` (N, E) and top-k choices `chosen` (N, k).

    f_e: fraction of the N·k choices that went to e (no gradient); P_e: mean router probability.
    Equals 1 for perfectly uniform routing, E for a collapse onto one expert.
    """
    counts = torch.bincount(chosen.reshape(-1), minlength=n_experts).to(probs.dtype)
    f = counts / counts.sum().clamp_min(1)
    return n_experts * (f * probs.mean(0)).sum()


def mixture_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Σ_e gates[:, e] · B_e A_e x for every row of x, as one stacked low-rank product.

    x: (N, d_in), a: (E, r, d_in), b: (E, d_out, r), gates: (N, E) (zero where not routed)
    -> (N, d_out). ΔW is never formed; the rank blocks of the stacked (E·r)-rank LoRA are
    scaled per token by its gates.
    """
    n_exp, r, d_in = a.shape
    h = F.linear(x, a.reshape(n_exp * r, d_in))  # (N, E·r)
    h = (h.view(-1, n_exp, r) * gates.unsqueeze(-1)).reshape(-1, n_exp * r)
    return F.linear(h, b.permute(1, 0, 2).reshape(b.shape[1], n_exp * r))  # (N, d_out)


def layer_index(path: str) -> int | None:
    """The block number in a module path ("model.layers.7.mlp.up_proj" -> 7), or None."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def not_mergeable(method: str) -> AdapterError:
    return AdapterError(
        f"{method} routes every token to its own experts, so its update depends on the input: it "
        "cannot be merged into the base weights or exported as one LoRA. Keep it unmerged"
    )


def check_number(name: str, value, positive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ConfigError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return float(value)


# -- MoLA ---------------------------------------------------------------------------------------
@dataclass
class MolaConfig(AdapterConfig):
    """r: rank of every expert; alpha: s = α/r; top_k: experts per token; dropout on the adapter
    input; experts: a layout name ("inverted" 2/4/6/8, "triangle" 8/6/4/2, "square" 5/5/5/5,
    "hourglass" 8/2/2/8) or a list of expert counts, one per group of consecutive layers;
    num_layers: the model's number of blocks (required: it splits the layers into groups;
    `mola_config(model, ...)` fills it in); aux_loss_coef: c of the load-balancing loss
    (0 = off). Defaults are the authors' scripts (r 8, α 16, top-2, MoLA-▽, c 0.001).
    """

    r: int = 8
    alpha: float = 16.0
    top_k: int = 2
    dropout: float = 0.0
    experts: str | list[int] = "inverted"
    num_layers: int | None = None
    aux_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha)
        check_positive_int("top_k", self.top_k)
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_number("aux_loss_coef", self.aux_loss_coef, positive=False)
        if isinstance(self.experts, str):
            if self.experts not in LAYOUTS:
                raise ConfigError(f"experts must be a layout in {sorted(LAYOUTS)} or a list of counts, "
                                  f"got {self.experts!r}")
        elif isinstance(self.experts, (list, tuple)) and self.experts:
            # the CLI's "--experts 2,4,6,8" arrives as strings
            self.experts = [int(n) if isinstance(n, str) and n.strip().isdigit() else n for n in self.experts]
            for i, n in enumerate(self.experts):
                check_positive_int(f"experts[{i}]", n)
            self.experts = list(self.experts)
        else:
            raise ConfigError(f"experts must be a layout in {sorted(LAYOUTS)} or a non-empty list of counts, "
                              f"got {self.experts!r}")
        counts = self.counts()
        if self.top_k > min(counts):
            raise ConfigError(f"top_k={self.top_k} exceeds the number of experts of some layers "
                              f"(counts {list(counts)}); use top_k <= {min(counts)}")
        if self.num_layers is not None:
            check_positive_int("num_layers", self.num_layers)

    def counts(self) -> tuple[int, ...]:
        """Expert counts per group of layers, bottom to top."""
        return LAYOUTS[self.experts] if isinstance(self.experts, str) else tuple(self.experts)

    def experts_for(self, module_path: str) -> int:
        """E_l for one module: its layer's group (layer l of L is in group ⌊l·G/L⌋, its relative
        depth; with fewer layers than groups some groups go unused)."""
        if self.num_layers is None:
            raise ConfigError("MoLA needs num_layers (the model's number of blocks) to place its experts; "
                              "build the config with lorakit.methods.mola.mola_config(model, ...)")
        layer = layer_index(module_path)
        if layer is None:
            raise ConfigError(f"MoLA assigns experts by layer number, but module {module_path!r} has no layer "
                              "number in its path; restrict target to modules inside the numbered blocks")
        if layer >= self.num_layers:
            raise ConfigError(f"module {module_path!r} is in layer {layer}, but num_layers={self.num_layers}")
        counts = self.counts()
        return counts[layer * len(counts) // self.num_layers]


def mola_config(model: nn.Module, **kw) -> MolaConfig:
    """A MolaConfig with num_layers read from the model's config (num_hidden_layers / n_layer)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        raise ConfigError("cannot read the number of layers from model.config; pass num_layers=...")
    return MolaConfig(num_layers=int(n), **kw)


@register_method("mola", MolaConfig, paper="arXiv:2402.08562")
class Mola(nn.Module):
    """MoLA: h = W0 x + (α/r) Σ_{e ∈ top-k} w_e(x) B_e A_e x, with more experts in higher layers."""

    zero_init = True
    supports = ("linear",)
    mergeable: ClassVar[bool] = False  # routed per token: no ΔW exists
    # tiny models: 2 layers -> groups 0 and 2 of "inverted" (2 and 6 experts); only numbered blocks
    test_config: ClassVar[dict] = {"r": 2, "num_layers": 2, "target": r".*\.\d+\..*"}

    def __init__(self, spec: LayerSpec, cfg: MolaConfig):
        super().__init__()
        self.spec = spec
        self.n_experts = cfg.experts_for(spec.name)
        self.top_k = cfg.top_k
        self.scale = cfg.alpha / cfg.r
        self.aux_loss_coef = cfg.aux_loss_coef
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        e, r, d_in, d_out = self.n_experts, cfg.r, spec.in_features, spec.out_features
        self.router = nn.Parameter(torch.empty(e, d_in, **kw))  # (E, d_in)
        self.lora_A = nn.Parameter(torch.empty(e, r, d_in, **kw))  # (E, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(e, d_out, r, **kw))  # (E, d_out, r)
        # as the authors' reset_lora_parameters_MoE: Kaiming-uniform router and A, B = 0
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        for i in range(e):
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        self.last_counts: torch.Tensor | None = None  # (E,) top-k choices in the last forward
        self.last_aux_loss: torch.Tensor | None = None  # detached L_aux of the last training forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d_in) -> router probabilities p (N, E) float32, chosen (N, k), gates (N, E)."""
        logits = F.linear(x, self.router)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        w, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        w = w / w.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, chosen, w)  # (N, E)
        return probs, chosen, gates.to(x.dtype)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)  # (N, d_in)
        probs, chosen, gates = self.route(x2)
        self.last_counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts).detach()
        out = mixture_delta(self.dropout(x2), self.lora_A, self.lora_B, gates) * self.scale  # (N, d_out)
        if self.training and torch.is_grad_enabled() and self.aux_loss_coef > 0 and self.router.requires_grad:
            aux = self.aux_loss_coef * switch_balance_loss(probs, chosen, self.n_experts)
            self.last_aux_loss = aux.detach()
            out = add_aux_loss(out, aux)
        return out.reshape(*lead, out.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        raise not_mergeable("MoLA")


# -- model-level helpers ------------------------------------------------------------------------
def mola_modules(model: nn.Module, name: str = "default") -> dict[str, Mola]:
    """Module path -> MoLA adapter `name`; errors if the model has no such MoLA adapter."""
    return adapter_modules(model, name, Mola, "MoLA")


def expert_share(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Module path -> fraction of the last forward's top-k choices that went to each expert
    (for the modules of any routed method here: MoLA, SMoRA, MeteoRA)."""
    out = {}
    for path, m in modules.items():
        if m.last_counts is None:
            raise AdapterError(f"{path} has not routed any tokens yet; run a forward pass first")
        c = m.last_counts.float()
        out[path] = c / c.sum().clamp_min(1)
    return out


def aux_loss(modules: dict[str, nn.Module]) -> float:
    """Σ of the auxiliary losses of the last training forward (for logging; 0.0 if none)."""
    return float(sum(float(m.last_aux_loss) for m in modules.values() if m.last_aux_loss is not None))
