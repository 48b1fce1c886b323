"""LoRAPrune: structured pruning guided by LoRA gradients (Zhang et al., arXiv:2305.18403;
reference code: github.com/aim-uofa/LoRAPrune, `loraprune/utils.py` and `trainer.py`).

During LoRA training (h = W0 x + s·B A x), the gradient of the frozen W0 is never computed.
Its role in the first-order importance |∂L/∂W ⊙ W| is played by the LoRA-guided estimate

    Ĝ = G_B · A + B · G_A                        (G_A = ∂L/∂A, G_B = ∂L/∂B; (d_out, d_in))
    I = |Ĝ ⊙ (W0 + s·B A)|                       element importance of the merged weight

(`second_order=True` adds the reference code's −G_B·G_A term, from (B − G_B)(A − G_A) − BA.)
Since G_B = s·G_W Aᵀ and G_A = s·Bᵀ G_W for the merged-weight gradient G_W, Ĝ equals
s·(G_W AᵀA + B Bᵀ G_W): G_W projected onto the row space of A and the column space of B.

Structured units are KV groups (whole heads; one head per unit when n_kv = n_h) and MLP
channels. A unit's score sums I over its slice of every LoRA-adapted matrix in its group,
each matrix's unit vector normalised to unit L2 norm before summing (reference `norm=True`):

    attention group g: q_proj rows of its heads + k/v_proj rows of KV head g + o_proj columns
    MLP channel c:     gate/up_proj row c + down_proj column c

Scores are smoothed with an EMA, S ← β·S + (1 − β)·score (β = 0.9, S₀ = 0), at every
optimizer step. The sparsity follows the reference's cubic schedule over the T training
steps (warm-up fraction w, cool-down fraction c, target p):

    p_t = 0                                   t ≤ w·T
    p_t = p                                   t > T − c·T
    p_t = p + (0 − p)·(1 − (t − wT)/(T − (w + c)T))³    otherwise

Every `prune_every` steps (and as soon as p_t reaches p) each pruned layer drops its
lowest-scoring still-kept units until ⌊n·p_t⌋ of its n units are gone (local, per layer, as
the reference's `local_prune`; pruned units stay pruned). Pruned units are masked during
training: the inputs of o_proj / down_proj are zeroed on the pruned heads / channels, which
is exactly the physically pruned network (see `lorakit.prune.structured`). At the end the
LoRA is merged and the units are physically removed (`finalize`); `save_pruned` /
`load_pruned` store and rebuild the smaller model.

Differences from the reference: the target sparsity is always reached exactly (the
reference's loop stops pruning below the target once the cool-down begins), heads are pruned
by whole KV group so GQA models (Llama-3, SmolLM2) stay valid (the reference hard-codes 32
heads), the masks sit on o_proj/down_proj inputs instead of q/k/v/gate/up outputs (same
function, fewer hooks), and only the "lora" criterion is implemented (not "grad"/"magnitude").

    cb = LoraPruneCallback(LoraPruneConfig(sparsity=0.5))
    train(TrainConfig(...), adapter={"r": 8, "target": "all-linear"}, callbacks=[cb])
    pruning = cb.finalize(model)            # merged, physically smaller
    save_pruned(model, "out/pruned", pruning, tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from lorakit.core.adapter import check_positive_int, check_range
from lorakit.core.inject import adapter_modules, adapter_names, eject, merge
from lorakit.errors import ConfigError
from lorakit.prune.loram import check_layers, n_removed
from lorakit.prune.structured import ATTN_PROJ, MLP_PROJ, StructuredPruning, find_decoder_layers, prune_structured

STATE_FILE = "loraprune_state.safetensors"


@dataclass
class LoraPruneConfig:
    """sparsity: target fraction of KV groups and of MLP channels removed per pruned layer.
    prune_attention / prune_mlp: which units to prune. layers: decoder layers to prune (None =
    all; the reference skips the first ⌊0.1·L⌋ layers and the last one). beta: EMA factor of
    the importance (reference 0.9). prune_every: steps between pruning rounds (reference 10).
    warmup / cooldown: fractions of the steps at sparsity 0 / at the target (reference 0.1).
    second_order: include the reference code's −G_B·G_A term in Ĝ.
    """

    sparsity: float = 0.5
    prune_attention: bool = True
    prune_mlp: bool = True
    layers: list[int] | None = None
    beta: float = 0.9
    prune_every: int = 10
    warmup: float = 0.1
    cooldown: float = 0.1
    second_order: bool = False

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0)
        check_range("beta", self.beta, 0.0, 1.0)
        check_positive_int("prune_every", self.prune_every)
        check_range("warmup", self.warmup, 0.0, 1.0)
        check_range("cooldown", self.cooldown, 0.0, 1.0)
        if self.warmup + self.cooldown >= 1.0:
            raise ConfigError(f"warmup + cooldown must be < 1 (steps left to prune in), got "
                              f"{self.warmup} + {self.cooldown}")
        self.layers = check_layers(self.layers)
        if not (self.prune_attention or self.prune_mlp):
            raise ConfigError("prune_attention and prune_mlp are both False: nothing to prune")


# -- math -----------------------------------------------------------------------------------
def lora_weight_grad(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                     second_order: bool = False) -> torch.Tensor:
    """Ĝ = G_B A + B G_A (− G_B G_A): (d_out, r)(r, d_in) + (d_out, r)(r, d_in) -> (d_out, d_in)."""
    g = grad_B @ A + B @ grad_A
    return g - grad_B @ grad_A if second_order else g


def lora_importance(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, grad_A: torch.Tensor,
                    grad_B: torch.Tensor, second_order: bool = False) -> torch.Tensor:
    """I = |Ĝ ⊙ (W0 + s·B A)|, (d_out, d_in). Forms one dense matrix per layer, at scoring time only."""
    A, B, gA, gB = (t.float() for t in (A, B, grad_A, grad_B))
    return (lora_weight_grad(A, B, gA, gB, second_order) * (W0.float() + scale * (B @ A))).abs()


def cubic_sparsity(step: int, total: int, target: float, warmup: float = 0.1, cooldown: float = 0.1,
                   initial: float = 0.0) -> float:
    """The reference's `schedule_sparsity_ratio`: initial until warmup·T, then a cubic ramp,
    then the target for the last cooldown·T steps."""
    w, c = warmup * total, cooldown * total
    if step <= w:
        return initial
    if step > total - c:
        return target
    return target + (initial - target) * (1 - (step - w) / (total - w - c)) ** 3


def _normalise(s: torch.Tensor) -> torch.Tensor:
    return s / (torch.linalg.vector_norm(s) + 1e-8)


# -- the pruner -------------------------------------------------------------------------------
class LoraPrune:
    """Scores, masks and progressive pruning for one model carrying LoRA adapter `name`.

    Call `step(model, t, T)` after backward and before each optimizer step (the callback does);
    `finalize(model)` merges the LoRA and removes the pruned units physically.
    """

    def __init__(self, model: nn.Module, config: LoraPruneConfig, name: str = "default"):
        self.config, self.name = config, name
        self.geo = StructuredPruning.for_model(model)
        self.layers_path, _ = find_decoder_layers(model)
        self.layers = config.layers if config.layers is not None else list(range(self.geo.num_layers))
        if self.layers[-1] >= self.geo.num_layers:
            raise ConfigError(f"layers {self.layers} out of range for a model with {self.geo.num_layers} layers")
        self.modules = self._lora_modules(model)
        g = self.geo
        self.kept_groups = {i: torch.ones(g.num_kv_heads, dtype=torch.bool) for i in self.layers}
        self.kept_channels = {i: torch.ones(g.intermediate_size, dtype=torch.bool) for i in self.layers}
        self.score_groups = {i: torch.zeros(g.num_kv_heads) for i in self.layers}
        self.score_channels = {i: torch.zeros(g.intermediate_size) for i in self.layers}
        self.sparsity = 0.0  # the schedule value last pruned to
        self.history: list[tuple[int, float]] = []  # (step, sparsity) at each pruning round
        self.skipped = 0  # steps whose gradients were missing or not finite (no EMA update)
        self._hooks: list = []
        self._refresh_masks()

    def _lora_modules(self, model: nn.Module) -> dict[tuple[int, str], nn.Module]:
        """(layer, projection) -> LoRA adapter; checks every pruned group has at least one."""
        adapters = adapter_modules(model, self.name)
        out = {}
        for i in self.layers:
            for group, projs, on in (("self_attn", ATTN_PROJ, self.config.prune_attention),
                                     ("mlp", MLP_PROJ, self.config.prune_mlp)):
                if not on:
                    continue
                for p in projs:
                    a = adapters.get(f"{self.layers_path}.{i}.{group}.{p}")
                    if a is None:
                        continue
                    if not (hasattr(a, "factors") and hasattr(a, "scale")) or a.spec.kind != "linear":
                        raise ConfigError(f"LoRAPrune scores units from LoRA factors A, B; adapter {self.name!r} "
                                          f"on {self.layers_path}.{i}.{group}.{p} is a {type(a).__name__}")
                    if not all(t.requires_grad for t in a.factors()):
                        raise ConfigError(f"adapter {self.name!r} on {self.layers_path}.{i}.{group}.{p} is frozen: "
                                          "LoRAPrune needs the gradients of a LoRA that is being trained")
                    out[(i, p)] = a
                if not any((i, p) in out for p in projs):
                    raise ConfigError(
                        f"layer {i} has no LoRA adapter {self.name!r} on {group}.{{{','.join(projs)}}}: LoRAPrune "
                        f"scores {group} units from LoRA gradients; add them to the adapter's target or "
                        f"set prune_{'attention' if group == 'self_attn' else 'mlp'}=False")
        return out

    # -- masks ---------------------------------------------------------------------------------
    def _refresh_masks(self) -> None:
        """Input masks of o_proj (n_h·d_h,) and down_proj (d_ff,) per layer; None = nothing pruned."""
        g = self.geo
        self._mask = {}
        for i in self.layers:
            heads = self.kept_groups[i].repeat_interleave(g.group_size * g.head_dim)
            chans = self.kept_channels[i]
            self._mask[(i, 0)] = None if bool(heads.all()) else heads
            self._mask[(i, 1)] = None if bool(chans.all()) else chans
        self._on_device: dict = {}

    def _mask_for(self, i: int, which: int, x: torch.Tensor) -> torch.Tensor | None:
        m = self._mask[(i, which)]
        if m is None:
            return None
        key = (i, which, x.device, x.dtype)
        if key not in self._on_device:
            self._on_device[key] = m.to(device=x.device, dtype=x.dtype)
        return self._on_device[key]

    def install(self, model: nn.Module) -> None:
        """Mask pruned heads / channels with forward pre-hooks on o_proj and down_proj inputs."""
        self.remove_hooks()
        for i in self.layers:
            for proj, which in (("self_attn.o_proj", 0), ("mlp.down_proj", 1)):
                module = model.get_submodule(f"{self.layers_path}.{i}.{proj}")

                def hook(mod, args, i=i, which=which):
                    m = self._mask_for(i, which, args[0])
                    return None if m is None else (args[0] * m, *args[1:])

                self._hooks.append(module.register_forward_pre_hook(hook))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def unit_scores(self, model: nn.Module) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None:
        """This step's per-unit importance from the LoRA gradients (None if any is missing)."""
        g = self.geo
        groups = {i: torch.zeros(g.num_kv_heads) for i in self.layers}
        channels = {i: torch.zeros(g.intermediate_size) for i in self.layers}
        for (i, p), a in self.modules.items():
            A, B = a.factors()
            if A.grad is None or B.grad is None:
                return None
            W0 = a.spec.weight()
            imp = lora_importance(W0, A, B, a.scale, A.grad, B.grad, self.config.second_order)
            if not torch.isfinite(imp).all():
                return None  # an overflowed (fp16) step carries no information; the reference skips it too
            if p in ("q_proj", "k_proj", "v_proj"):
                s = imp.sum(1).view(g.num_kv_heads, -1).sum(1)   # rows -> heads -> KV groups
            elif p == "o_proj":
                s = imp.sum(0).view(g.num_kv_heads, -1).sum(1)   # columns -> heads -> KV groups
            elif p in ("gate_proj", "up_proj"):
                s = imp.sum(1)                                   # rows = channels
            else:  # down_proj
                s = imp.sum(0)                                   # columns = channels
            (groups if p in ATTN_PROJ else channels)[i] += _normalise(s).cpu()
        return groups, channels

    def accumulate(self, model: nn.Module) -> bool:
        """EMA update S ← β S + (1 − β) score. Returns False when this step had no usable grads."""
        scores = self.unit_scores(model)
        if scores is None:
            self.skipped += 1
            return False
        b = self.config.beta
        for i in self.layers:
            self.score_groups[i].mul_(b).add_(scores[0][i], alpha=1 - b)
            self.score_channels[i].mul_(b).add_(scores[1][i], alpha=1 - b)
        return True

    # -- pruning -------------------------------------------------------------------------------
    def prune_to(self, sparsity: float) -> None:
        """Per layer, drop the lowest-scoring kept units until ⌊n·sparsity⌋ are gone."""
        for i in self.layers:
            for on, kept, score in ((self.config.prune_attention, self.kept_groups[i], self.score_groups[i]),
                                    (self.config.prune_mlp, self.kept_channels[i], self.score_channels[i])):
                if not on:
                    continue
                extra = n_removed(len(kept), sparsity) - int((~kept).sum())
                if extra > 0:
                    candidates = torch.where(kept, score, torch.full_like(score, float("inf")))
                    drop = torch.argsort(candidates, stable=True)[:extra]
                    kept[drop] = False
        self.sparsity = max(self.sparsity, sparsity)
        self._refresh_masks()

    def step(self, model: nn.Module, step: int, total: int) -> float:
        """Score (EMA), then prune if the schedule says so. Returns the scheduled sparsity."""
        self.accumulate(model)
        c = self.config
        p = cubic_sparsity(step, total, c.sparsity, c.warmup, c.cooldown)
        if p > self.sparsity and (step % c.prune_every == 0 or p >= c.sparsity):
            self.prune_to(p)
            self.history.append((step, p))
        return p

    def pruning(self) -> StructuredPruning:
        groups = {i: torch.nonzero(k).squeeze(1).tolist() for i, k in self.kept_groups.items()
                  if self.config.prune_attention and not bool(k.all())}
        channels = {i: torch.nonzero(k).squeeze(1).tolist() for i, k in self.kept_channels.items()
                    if self.config.prune_mlp and not bool(k.all())}
        return StructuredPruning.from_groups(self.geo, groups, channels)

    def finalize(self, model: nn.Module) -> StructuredPruning:
        """Reach the target sparsity, merge the LoRA into W0, drop the adapter and remove the
        pruned units physically. Returns the pruning (for `save_pruned`)."""
        others = [n for n in adapter_names(model) if n != self.name]
        if others:
            raise ConfigError(f"finalize merges adapter {self.name!r} into the base; the model also carries "
                              f"{others}: delete or merge them first")
        self.prune_to(self.config.sparsity)
        pruning = self.pruning()
        self.remove_hooks()
        merge(model, [self.name])
        eject(model, keep_merged=True)
        prune_structured(model, pruning)
        return pruning

    # -- resumable state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"sparsity": torch.tensor(self.sparsity, dtype=torch.float64)}
        for i in self.layers:
            out[f"{i}.kept_groups"] = self.kept_groups[i].clone()
            out[f"{i}.kept_channels"] = self.kept_channels[i].clone()
            out[f"{i}.score_groups"] = self.score_groups[i].clone()
            out[f"{i}.score_channels"] = self.score_channels[i].clone()
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(sd) != expected:
            raise ConfigError(f"LoRAPrune state does not match this model/config (keys differ: "
                              f"{sorted(set(sd) ^ expected)[:4]})")
        for i in self.layers:
            for key, d in (("kept_groups", self.kept_groups), ("kept_channels", self.kept_channels),
                           ("score_groups", self.score_groups), ("score_channels", self.score_channels)):
                if sd[f"{i}.{key}"].shape != d[i].shape:
                    raise ConfigError(f"LoRAPrune state {i}.{key} has shape {tuple(sd[f'{i}.{key}'].shape)}, "
                                      f"expected {tuple(d[i].shape)}")
                d[i].copy_(sd[f"{i}.{key}"])
        self.sparsity = float(sd["sparsity"])
        self._refresh_masks()


class LoraPruneCallback(TrainerCallback):
    """Runs LoRAPrune inside any `transformers.Trainer` (so inside `lorakit.train`).

    on_train_begin builds the pruner on the (already adapted) model and installs the masks —
    restoring scores and masks from `checkpoint-<step>/loraprune_state.safetensors` when the run
    resumes; on_pre_optimizer_step scores and prunes; on_save writes that state next to the
    checkpoint; on_train_end brings the masks to the exact target. Afterwards call
    `finalize(model)` for the physically pruned, merged model.
    """

    def __init__(self, config: LoraPruneConfig | None = None, name: str = "default"):
        self.config = config or LoraPruneConfig()
        self.name = name
        self.pruner: LoraPrune | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.pruner is None:
            self.pruner = LoraPrune(model, self.config, self.name)
        if state.global_step > 0:
            from safetensors.torch import load_file

            f = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not f.is_file():
                raise ConfigError(f"resuming at step {state.global_step} but {f} is missing: the LoRAPrune "
                                  "masks and scores of that checkpoint are unknown")
            self.pruner.load_state_dict(load_file(str(f)))
        self.pruner.install(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.pruner.step(model, state.global_step, state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.pruner is not None:
            from safetensors.torch import save_file

            d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            d.mkdir(parents=True, exist_ok=True)
            save_file(self.pruner.state_dict(), str(d / STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.pruner is not None:
            self.pruner.prune_to(self.config.sparsity)

    def finalize(self, model: nn.Module) -> StructuredPruning:
        if self.pruner is None:
            raise ConfigError("LoraPruneCallback.finalize: training has not started (no pruner yet)")
        return self.pruner.finalize(model)


__all__ = [
    "LoraPrune",
    "LoraPruneCallback",
    "LoraPruneConfig",
    "cubic_sparsity",
    "lora_importance",
    "lora_weight_grad",
]
