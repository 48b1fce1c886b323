"""S2-LoRA: Sparsely Shared LoRA (Liu, Qin, Peng, Lee, arXiv:2309.11756; Whisper, child speech).

The two low-rank factors are shared by every adapted weight of a *group*; each weight keeps
only its own vector of rank coefficients λ_l (AdaLoRA's diagonal Λ), made sparse by an L1
penalty:

    h_l = W0_l x + s · B_g diag(λ_l) A_g x,    s = α / r
    A_g: (r, d_in)  ~ N(0, 0.02)   shared by all weights l of group g   (share = "ab" or "a")
    B_g: (d_out, r) ~ N(0, 0.02)   shared likewise                      (share = "ab" or "b")
    λ_l: (r,)        zeros          one per adapted weight              => ΔW_l = 0 at init

(the init is AdaLoRA's: random factors, zero coefficients, so every λ_l gets a gradient
from the first step). After every optimizer step the coefficients take the proximal step of
the penalty γ Σ_l ‖λ_l‖₁, i.e. soft thresholding (SoRA's update, arXiv:2310.18168):

    λ_l ← sign(λ_l) · max(|λ_l| − η γ, 0)     η: the learning rate just used for λ_l
                                              (γ per step with lr_scaled=False)

so coefficients reach exactly zero: each weight ends up using a sparse subset of the shared
rank-one directions B_g[:, i] A_g[i] (its "rank distribution").

Groups (who shares with whom), `share_by`:
- "shape" (default, the paper's "globally shared"): all targets of the same (d_out, d_in),
  e.g. every q/k/v/out projection of Whisper's encoder self-attention, decoder self-attention
  and cross-attention share one A and one B; fc1 (4d × d) and fc2 (d × 4d) get their own pair.
- "role": the same module path up to the layer index ("model.decoder.layers.*.encoder_attn.q_proj"):
  e.g. q_proj of all decoder layers share, but not with v_proj or with the encoder's q_proj.
Sharing never crosses adapters: each `inject`/`load` has its own shared tensors.

Trainable numbers (share = "ab"), against LoRA at the same r:

    S2-LoRA: Σ_groups r·(d_in + d_out) + Σ_weights r          LoRA: Σ_weights r·(d_in + d_out)

(share = "a": B_l per weight, Σ_groups r·d_in + Σ_weights r·(d_out + 1); "b" symmetric).

Implementation: this is SoRA's gated update h = W0 x + s·B (g ⊙ A x) with g = λ and the
factors taken from the injection's shared pool (`lorakit.core.shared`): the class extends
`Sora` and reuses its forward (which at inference skips zero coefficients, so pruning is
bit-identical), ΔW, `to_lora`, proximal step and Trainer callback. Shared A/B are one
`nn.Parameter` held by every layer of the group: gradients of all layers accumulate into it,
optimizers see it once, files store it once ("…lorakit_shared.<group>.lora_A").

`prune(model)` removes rank i of a group when λ_l[i] = 0 for *every* weight of the group (a
direction some weight still uses must stay in the shared factors); per-group ranks go to the
config field `ranks` ({group: rank}) so `lorakit.load` rebuilds the smaller shapes.

Deviations (documented choices; the paper's code is not public):
- The sparsity constraint is applied as a proximal L1 step (exact zeros, which pruning and
  the rank-distribution analysis need) rather than as an L1 term in the loss (whose
  subgradient steps leave values oscillating around zero). Same objective.
- Grouping by shape is our reading of "globally shared" for weights of different shapes;
  "role" is offered for finer sharing.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.adapter import AdapterConfig, LayerSpec, check_positive_int, keep_ranks_
from lorakit.core.inject import adapter_modules, check_not_merged, state
from lorakit.core.registry import register_method
from lorakit.core.shared import check_key, set_shared, share_parameter, shared_names
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.sora import Sora, check_gate_fields, sora_proximal_step

SHARES = ("ab", "a", "b")
SHARE_BY = ("shape", "role")
INIT_STD = 0.02  # AdaLoRA (PEFT AdaLoraLayer): A, B ~ N(0, 0.02), coefficients 0


@dataclass
class S2LoraConfig(AdapterConfig):
    """r: rank of the shared factors; alpha: scale numerator (s = α/r, kept after pruning);
    sparse_lambda: γ of the L1 penalty on the coefficients (0 = no sparsity);
    lr_scaled: threshold η·γ per step (proximal step) or, if False, γ per step;
    share: which factors are shared, "ab" (paper), "a" or "b" (the other one per weight);
    share_by: grouping, "shape" (same (d_out, d_in)) or "role" (same module path up to the
    layer index, and same shape); dropout on the adapter input;
    ranks: per-group ranks after `prune` ({group: rank}, written by `prune`, read by `load`).
    """

    r: int = 8
    alpha: float = 16.0
    sparse_lambda: float = 1e-3
    lr_scaled: bool = True
    share: str = "ab"
    share_by: str = "shape"
    dropout: float = 0.0
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        check_gate_fields(self, "group")
        if self.share not in SHARES:
            raise ConfigError(f"share must be one of {SHARES}, got {self.share!r}")
        if self.share_by not in SHARE_BY:
            raise ConfigError(f"share_by must be one of {SHARE_BY}, got {self.share_by!r}")
        for k in self.ranks:
            check_key(k)

    def threshold(self, lr: float) -> float:
        """How far one proximal step moves each coefficient towards 0 (SoRA's rule)."""
        return self.sparse_lambda * lr if self.lr_scaled else self.sparse_lambda


def group_of(spec: LayerSpec, share_by: str) -> str:
    """The sharing group of a target: "<d_out>x<d_in>" or "<path with layer indices as *>.<d_out>x<d_in>"."""
    shape = f"{spec.out_features}x{spec.in_features}"
    if share_by == "shape":
        return shape
    role = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", spec.name)  # model.layers.3.q_proj -> model.layers.*.q_proj
    return f"{role}.{shape}"


@register_method("s2lora", S2LoraConfig, paper="arXiv:2309.11756")
class S2Lora(Sora):
    """S2-LoRA: h = W0 x + (α/r) B_g diag(λ_l) A_g x, A_g/B_g shared across layers, λ_l L1-sparse."""

    zero_init = True
    supports = ("linear",)

    def __init__(self, spec: LayerSpec, cfg: S2LoraConfig):
        nn.Module.__init__(self)  # Sora's parameters are per layer; ours come from the pool
        self.spec = dataclasses.replace(spec, shared=None)  # keep no pool: it would pin replaced tensors
        self.group = group_of(spec, cfg.share_by)
        self.r = cfg.r  # the configured rank: the scale α/r does not change when ranks are pruned
        self.scale = cfg.alpha / cfg.r
        k = cfg.ranks.get(self.group, cfg.r)  # this group's rank (< r after pruning)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}

        def normal(*shape: int):
            return lambda: torch.randn(*shape, **kw) * INIT_STD

        for attr, shape, shared in (("lora_A", (k, spec.in_features), "a" in cfg.share),   # A_g: (k, d_in)
                                    ("lora_B", (spec.out_features, k), "b" in cfg.share)):  # B_g: (d_out, k)
            if shared:
                share_parameter(self, attr, spec.shared, f"{self.group}.{attr}", normal(*shape))
            else:
                setattr(self, attr, nn.Parameter(normal(*shape)()))
        self.gate = nn.Parameter(torch.zeros(k, **kw))  # λ_l: (k,)
        self._active_cache = None

    @torch.no_grad()
    def prune_(self) -> int:
        raise AdapterError("S2-LoRA ranks are shared by a whole group of layers: prune with "
                          "lorakit.methods.s2lora.prune(model, name), not layer by layer")


# -- model-level helpers ------------------------------------------------------------------
def s2lora_modules(model: nn.Module, name: str = "default") -> dict[str, S2Lora]:
    """Module path -> S2-LoRA adapter `name`; errors if the model has no such adapter."""
    return adapter_modules(model, name, S2Lora, "S2-LoRA")


def groups(model: nn.Module, name: str = "default") -> dict[str, list[str]]:
    """Group -> module paths of its members (the layers sharing that group's factors)."""
    out: dict[str, list[str]] = defaultdict(list)
    for p, m in s2lora_modules(model, name).items():
        out[m.group].append(p)
    return dict(out)


def s2lora_proximal_step(model: nn.Module, lr: float, name: str = "default") -> int:
    """The L1 proximal step on every coefficient of adapter `name`, after `optimizer.step()`.

    `lr` is the learning rate just used for the coefficients. Returns the number of non-zero
    coefficients left (Σ_l ‖λ_l‖₀).
    """
    s2lora_modules(model, name)  # an error here names S2-LoRA
    return sora_proximal_step(model, lr, name)


def active_ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Module path -> number of non-zero coefficients (ranks that weight uses)."""
    return {p: int((m.gate != 0).sum()) for p, m in s2lora_modules(model, name).items()}


@torch.no_grad()
def prune(model: nn.Module, name: str = "default") -> dict[str, int]:
    """Drop every rank that no member of its group uses (λ_l[i] = 0 for all l in the group).

    Shrinks the shared A_g, B_g (one new tensor, again shared by the whole group) and every
    λ_l; returns {group: new rank}. Outputs are unchanged bit for bit (inference already skips
    zero coefficients). The config's `ranks` records the new per-group ranks so that
    save -> load rebuilds them. Call it after training: an optimizer still holds the old tensors.
    """
    mods = s2lora_modules(model, name)
    check_not_merged(model, name)
    members: dict[str, list[S2Lora]] = defaultdict(list)
    for m in mods.values():
        members[m.group].append(m)
    new: dict[str, int] = {}
    for group, ms in members.items():
        keep = torch.stack([m.gate != 0 for m in ms]).any(0).nonzero().squeeze(1)
        new[group] = keep.numel()
        if keep.numel() == ms[0].rank:
            continue
        for attr, dim in (("lora_A", 0), ("lora_B", 1)):
            if attr in shared_names(ms[0]):
                old = getattr(ms[0], attr)
                set_shared(ms, attr, nn.Parameter(old.index_select(dim, keep).contiguous(),
                                                  requires_grad=old.requires_grad))
            else:
                for m in ms:
                    keep_ranks_(m, keep, {attr: dim})
        for m in ms:
            keep_ranks_(m, keep, {"gate": 0})
            m._active_cache = None
    st = state(model)
    cfg = st.configs[name]
    st.configs[name] = dataclasses.replace(cfg, ranks={g: k for g, k in sorted(new.items()) if k != cfg.r})
    return new


def parameter_count(model: nn.Module, name: str = "default") -> int:
    """Trainable numbers of adapter `name`, each shared tensor counted once (the formula above)."""
    seen = {id(p): p.numel() for m in s2lora_modules(model, name).values() for p in m.parameters()}
    return sum(seen.values())
