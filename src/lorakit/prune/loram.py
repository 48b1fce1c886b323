"""LoRAM — train small, infer large (Zhang et al., arXiv:2502.13533; reference code:
github.com/junzhang-zj/LoRAM, `3_recovered_low_rank_matrix_generation.py`).

LoRA's training memory is dominated by the frozen base. LoRAM trains the adapter on a
structurally pruned copy of the base and then *recovers* it to the full model's shapes:

    1. prune    W_P = W0[rows_ℓ, cols_ℓ]      remove KV groups (heads) and MLP channels per layer
    2. train    h = W_P x + s·B_P A_P x        any lorakit adapter, injected into the small model
    3. recover  B[rows] = B_P, B[¬rows] = 0    (q/k/v/gate/up_proj: pruned output rows)
                A[:, cols] = A_P, A[:, ¬cols] = 0   (o/down_proj: pruned input columns)
                so ΔW[rows, cols] = ΔW_P and ΔW = 0 on every pruned row / column
    4. infer    h = W0 x + s·B A x             the full model with the recovered adapter

Recovery works on the adapter's parameters generically: every parameter dimension of the
pruned adapter that differs from the same parameter on the full model must equal the kept
rows (d_out side) or kept columns (d_in side) of that layer and is scattered back with zeros
— the reference's default "zeroA" recovery. For plain LoRA that is exactly the scatter above.
Updates that read W0 or are not laid out along d_in/d_out (e.g. Hydra's sequential branch
B_s A_s W0 on o_proj/down_proj, whose W0 has the pruned columns) cannot be recovered this
way; `recover` detects that by probing both adapters with random inputs and raises instead
of returning a wrong adapter.

Pruning criteria (structured): "random" (seeded; the paper's LoRAM-Rand) or "magnitude"
(squared L2 norm of each unit's weights over its whole group: q,k,v rows and o_proj columns of
a KV group; gate/up rows and the down_proj column of a channel — LLM-Pruner's L2 group
importance). In each pruned layer ⌊n·ratio⌋ of the n KV groups and of the d_ff channels go.

Not implemented: LoRAM-Stru's gradient-based (Taylor) LLM-Pruner criterion (the reference
repo ships only the pruned indices, not the pruning run), the non-structured variants
(LoRAM-Semi 2:4, LoRAM-Unst via SparseGPT; their recovery is the identity on shapes), the
"normA" recovery (random instead of zero columns in A), and the publisher-side alignment
(continual pre-training of the pruned model — `lorakit.train` with method="full" on it).

    full, tok = lorakit.models.load_model("smollm2-135m")
    small, pruning = loram.prune(full, LoramConfig(ratio=0.5, criterion="random"))
    train(TrainConfig(...), adapter={"r": 8}, model=small, tokenizer=tok)   # or any loop
    loram.recover(small, full, pruning)     # full model now carries the adapter "default"
    lorakit.save(full, "out/loram")
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.adapter import check_range
from lorakit.core.inject import (
    adapter_modules,
    apply_plan,
    check_not_merged,
    modules_to_save_paths,
    plan_injection,
    state,
)
from lorakit.errors import AdapterError, ConfigError
from lorakit.prune.structured import (
    KeptIndices,
    StructuredPruning,
    _plain,
    find_decoder_layers,
    keep_top,
    prune_structured,
)

CRITERIA = ("random", "magnitude")


@dataclass
class LoramConfig:
    """ratio: fraction of KV groups and of MLP channels removed in each pruned layer, [0, 1).
    criterion: "random" or "magnitude". layers: decoder layers to prune (None = all; the
    reference keeps the first 4 and last 2 of LLaMA-3.1-70B's 80 layers unpruned).
    prune_attention / prune_mlp: which units to remove. seed: for criterion="random".
    """

    ratio: float = 0.5
    criterion: str = "random"
    layers: list[int] | None = None
    prune_attention: bool = True
    prune_mlp: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0)
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        self.layers = check_layers(self.layers)
        if not (self.prune_attention or self.prune_mlp):
            raise ConfigError("prune_attention and prune_mlp are both False: nothing to prune")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


def check_layers(layers) -> list[int] | None:
    if layers is None:
        return None
    if (not isinstance(layers, (list, tuple)) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            or len(set(layers)) != len(layers)):
        raise ConfigError(f"layers must be a non-empty list of distinct non-negative layer indices, got {layers!r}")
    return sorted(layers)


def n_removed(n: int, ratio: float) -> int:
    """⌊n·ratio⌋ units removed out of n (at least one is always kept)."""
    return min(n - 1, int(n * ratio + 1e-9))


# -- choosing what to prune ------------------------------------------------------------------
def _group_scores(layer: nn.Module, geo: StructuredPruning) -> torch.Tensor:
    """(n_kv,) squared L2 norm of each KV group's weights: q/k/v rows and o_proj columns."""
    a, hd, g = layer.self_attn, geo.head_dim, geo.group_size
    q = _plain(a.q_proj).weight.float().pow(2).sum(1).view(geo.num_kv_heads, -1).sum(1)  # rows of g·d_h
    k = _plain(a.k_proj).weight.float().pow(2).sum(1).view(geo.num_kv_heads, hd).sum(1)
    v = _plain(a.v_proj).weight.float().pow(2).sum(1).view(geo.num_kv_heads, hd).sum(1)
    o = _plain(a.o_proj).weight.float().pow(2).sum(0).view(geo.num_kv_heads, g * hd).sum(1)
    return q + k + v + o


def _channel_scores(layer: nn.Module) -> torch.Tensor:
    """(d_ff,) squared L2 norm of gate/up rows plus the down_proj column of each channel."""
    m = layer.mlp
    return (_plain(m.gate_proj).weight.float().pow(2).sum(1) + _plain(m.up_proj).weight.float().pow(2).sum(1)
            + _plain(m.down_proj).weight.float().pow(2).sum(0))


@torch.no_grad()
def plan(model: nn.Module, config: LoramConfig) -> StructuredPruning:
    """Which KV groups / MLP channels each layer keeps, by `config.criterion`."""
    geo = StructuredPruning.for_model(model)
    _, layers = find_decoder_layers(model)
    chosen = config.layers if config.layers is not None else list(range(geo.num_layers))
    if chosen[-1] >= geo.num_layers:
        raise ConfigError(f"layers {chosen} out of range for a model with {geo.num_layers} decoder layers")
    gen = torch.Generator().manual_seed(config.seed)
    groups, channels = {}, {}
    for i in chosen:
        if config.prune_attention:
            s = torch.rand(geo.num_kv_heads, generator=gen) if config.criterion == "random" else _group_scores(layers[i], geo)
            groups[i] = keep_top(s, geo.num_kv_heads - n_removed(geo.num_kv_heads, config.ratio))
        if config.prune_mlp:
            n = geo.intermediate_size
            s = torch.rand(n, generator=gen) if config.criterion == "random" else _channel_scores(layers[i])
            channels[i] = keep_top(s, n - n_removed(n, config.ratio))
    return StructuredPruning.from_groups(geo, groups, channels)


def prune(model: nn.Module, config: LoramConfig, inplace: bool = False) -> tuple[nn.Module, StructuredPruning]:
    """(pruned model, pruning). The full model is left intact unless `inplace=True` (then
    reload it for `recover`). The pruned model remembers its pruning (`lorakit_pruning`)."""
    pruning = plan(model, config)
    small = model if inplace else copy.deepcopy(model)
    prune_structured(small, pruning)
    return small, pruning


# -- recovery --------------------------------------------------------------------------------
def _scatter(t: torch.Tensor, full_shape: torch.Size, kept: KeptIndices, where: str) -> torch.Tensor:
    """Place `t` into zeros of `full_shape` along each dimension whose size differs."""
    out = t
    for d, (n_p, n_f) in enumerate(zip(t.shape, full_shape)):
        if n_p == n_f:
            continue
        if kept.rows is not None and n_p == len(kept.rows) and n_f == kept.out_features:
            idx = kept.rows
        elif kept.cols is not None and n_p == len(kept.cols) and n_f == kept.in_features:
            idx = kept.cols
        else:
            raise ConfigError(f"{where}: dimension {d} has size {n_p} on the pruned model and {n_f} on the full "
                              "model, which is neither the layer's kept output rows nor its kept input columns; "
                              "this method's parameters cannot be recovered by scattering")
        shape = list(out.shape)
        shape[d] = n_f
        out = torch.zeros(shape, dtype=t.dtype, device=t.device).index_copy_(d, idx.to(t.device), out)
    return out


@torch.no_grad()
def _probe(path: str, small_adapter: nn.Module, small_base: nn.Module, full_adapter: nn.Module,
           full_base: nn.Module, kept: KeptIndices) -> None:
    """Check ΔW x = scatter(ΔW_P x[cols]) on random inputs without forming ΔW."""
    modes = (small_adapter.training, full_adapter.training)
    small_adapter.eval(), full_adapter.eval()
    try:
        w = full_base.weight
        x = torch.randn(4, kept.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        xp = x[:, kept.cols.to(x.device)] if kept.cols is not None else x
        got = full_adapter.delta(x, full_base(x)).float()
        want_p = small_adapter.delta(xp, small_base(xp)).float()
    finally:
        small_adapter.train(modes[0]), full_adapter.train(modes[1])
    want = torch.zeros_like(got)
    want[:, kept.rows.to(got.device) if kept.rows is not None else slice(None)] = want_p
    tol = 1e-5 * max(1.0, want.abs().max().item())
    if not torch.allclose(got, want, rtol=1e-4, atol=tol):
        raise ConfigError(
            f"{path}: the recovered adapter does not reproduce the pruned one on kept rows/columns (max error "
            f"{(got - want).abs().max().item():.3g}); this method's update depends on W0 or is not laid out "
            "along d_in/d_out, so LoRAM's zero-scatter recovery does not apply to it")


@torch.no_grad()
def _check_base(path: str, small_base: nn.Module, full_base: nn.Module, kept: KeptIndices) -> None:
    if getattr(small_base, "lorakit_quantized", False) or getattr(full_base, "lorakit_quantized", False):
        return  # QLoRAM: a quantized small base differs from the full one by design
    w = full_base.weight
    if kept.rows is not None:
        w = w.index_select(0, kept.rows.to(w.device))
    if kept.cols is not None:
        w = w.index_select(1, kept.cols.to(w.device))
    p = small_base.weight
    if p.shape != w.shape or not torch.allclose(p.float(), w.to(p.dtype).float().to(p.device)):
        raise ConfigError(f"{path}: the pruned model's base weight is not the full model's weight at the kept "
                          "indices (another base, or a data-aware init such as PiSSA/LoRA-GA moved W0); "
                          "recovering onto this full model would be wrong")


def recover(pruned_model: nn.Module, full_model: nn.Module, pruning: StructuredPruning | None = None,
            name: str = "default", trainable: bool = False, check: bool = True) -> nn.Module:
    """Attach adapter `name` of `pruned_model`, recovered to full shapes, to `full_model`.

    The full model gets the same adapter config (so `lorakit.save` writes a normal adapter for
    it); its parameters are the pruned ones scattered back with zeros on pruned rows/columns.
    `check` verifies that the pruned base is a slice of the full one and probes every pruned
    layer (ΔW x on kept rows equals the trained pruned adapter, zero elsewhere). Nothing on
    `full_model` changes unless every layer recovers. Returns `full_model`.
    """
    pruning = pruning or getattr(pruned_model, "lorakit_pruning", None)
    if pruning is None:
        raise ConfigError("pass the StructuredPruning that produced pruned_model (it carries no lorakit_pruning)")
    st = state(pruned_model)
    if name not in st.configs:
        raise AdapterError(f"pruned model has no adapter {name!r}; it has {sorted(st.configs) or 'none'}")
    check_not_merged(pruned_model, name)
    cfg = st.configs[name]
    new = plan_injection(full_model, cfg, name)  # raises (model untouched) if `name` exists there
    small = adapter_modules(pruned_model, name)
    if sorted(small) != sorted(new.adapters):
        raise ConfigError(f"adapter {name!r} covers different modules on the pruned and the full model "
                          f"({sorted(set(small) ^ set(new.adapters))[:4]})")
    kept_map = pruning.module_indices()
    for path, full_adapter in new.adapters.items():
        sd_small, sd_full = small[path].state_dict(), full_adapter.state_dict()
        kept = kept_map.get(path)
        out = {}
        for k, t in sd_small.items():
            if t.shape == sd_full[k].shape:
                out[k] = t.clone()
            elif kept is None:
                raise ConfigError(f"{path}.{k}: shape {tuple(t.shape)} differs from the full model's "
                                  f"{tuple(sd_full[k].shape)} but pruning did not change this layer")
            else:
                out[k] = _scatter(t, sd_full[k].shape, kept, f"{path}.{k}")
        full_adapter.load_state_dict(out, strict=True)
        if check and kept is not None:
            small_base = _plain(pruned_model.get_submodule(path))
            full_base = _plain(full_model.get_submodule(path))
            _check_base(path, small_base, full_base, kept)
            _probe(path, small[path], small_base, full_adapter, full_base, kept)
    saved = {p: pruned_model.get_submodule(p).state_dict() for p in modules_to_save_paths(pruned_model, cfg)}
    for p, sd in saved.items():
        target = full_model.get_submodule(p).state_dict()
        bad = [k for k in sd if k not in target or target[k].shape != sd[k].shape]
        if bad:
            raise ConfigError(f"modules_to_save {p!r}: {bad[0]} does not fit the full model (pruned dimension?)")
    apply_plan(full_model, new)
    with torch.no_grad():
        for p, sd in saved.items():
            full_model.get_submodule(p).load_state_dict(sd)
    if not trainable:
        for a in new.adapters.values():
            a.requires_grad_(False)
    return full_model


__all__ = ["LoramConfig", "n_removed", "plan", "prune", "recover"]
