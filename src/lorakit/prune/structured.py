"""Structured pruning of Llama-style decoders: remove attention heads and MLP channels by index.

Each decoder layer ℓ has GQA attention (q/k/v/o_proj; n_h query heads of size d_h sharing
n_kv key/value heads, G = n_h / n_kv query heads per KV group) and a SwiGLU MLP
(gate/up/down_proj, d_ff channels). A `StructuredPruning` lists what each layer keeps,
as indices into the *original* model:

    heads ℓ:    kept query heads H_ℓ. KV head g is kept iff some kept query head lies in its
                group {g·G, …, (g+1)·G − 1}; every kept group must keep the same number G'
                of query heads (grouped attention must stay regular). Removing whole groups
                (G' = G) is what LoRAM and LoRAPrune do; per-head removal with G' < G is allowed.
                q_proj  rows ← kept heads     W_q: (n_h·d_h, d)   → (|H_ℓ|·d_h, d)
                k/v_proj rows ← kept KV heads W_k: (n_kv·d_h, d)  → (n_kv'·d_h, d)
                o_proj  cols ← kept heads     W_o: (d, n_h·d_h)   → (d, |H_ℓ|·d_h)
    channels ℓ: kept MLP channels C_ℓ.
                gate/up_proj rows ← C_ℓ       (d_ff, d) → (|C_ℓ|, d)
                down_proj   cols ← C_ℓ        (d, d_ff) → (d, |C_ℓ|)

Removal is exact: a head reaches the residual stream only through its o_proj columns and an
MLP channel silu(gate)·up only through its down_proj column, so the pruned model equals the
full model with those head / channel outputs zeroed. The hidden size is never pruned:
embeddings, norms and the LM head are untouched.

Layers may end up with different sizes, which a `LlamaConfig` cannot express. The config is
left as it was (original sizes); the modules, their `in/out_features`, the attention's
`num_key_value_groups` and the MLP's `intermediate_size` are edited in place, so the stock HF
forward (eager and SDPA, with a DynamicCache for `generate`) runs unchanged. `save_pruned`
writes `save_pretrained` output plus the kept indices in a JSON sidecar (`pruning.json`),
which `load_pruned` uses to rebuild the smaller model. No pickles anywhere. A fixed-shape
`StaticCache` (sized from the config) does not fit a pruned model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, LorakitError

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
SIDECAR = "pruning.json"
FORMAT_VERSION = 1


class PrunedModelFileError(LorakitError, OSError):
    """A pruned-model directory is missing files or does not match its pruning sidecar."""


# -- finding the decoder layers -------------------------------------------------------------
def _plain(module: nn.Module) -> nn.Module:
    """The base layer of a lorakit wrapper (AdaptedLinear), else the module itself."""
    from lorakit.core.layer import AdaptedLayer

    return module.base if isinstance(module, AdaptedLayer) else module


def _is_llama_layer(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (attn is not None and mlp is not None and all(hasattr(attn, p) for p in ATTN_PROJ)
            and all(hasattr(mlp, p) for p in MLP_PROJ) and hasattr(attn, "head_dim"))


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the Llama-style decoder layers, e.g. ("model.layers", ...)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(_is_llama_layer(x) for x in m):
            return name, m
    raise ConfigError(
        f"{type(model).__name__} has no Llama-style decoder layers: structured pruning needs a "
        f"ModuleList of layers with self_attn.{{{','.join(ATTN_PROJ)}}} and mlp.{{{','.join(MLP_PROJ)}}}"
    )


# -- what is kept ----------------------------------------------------------------------------
@dataclass(frozen=True)
class KeptIndices:
    """Rows (outputs) and columns (inputs) of one linear layer that survive pruning, as indices
    into the original weight (out_features, in_features); None = all kept."""

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    out_features: int
    in_features: int


def _check_indices(what: str, idx: Any, n: int) -> list[int]:
    if not isinstance(idx, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ConfigError(f"{what} must be a list of integers, got {idx!r}")
    idx = list(idx)
    if not idx:
        raise ConfigError(f"{what} keeps nothing; keep at least one")
    if idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
        raise ConfigError(f"{what} must be sorted, unique and in [0, {n}), got {idx}")
    return idx


@dataclass
class StructuredPruning:
    """Kept attention heads and MLP channels per decoder layer (indices into the original model).

    layers_path: where the decoder layers live ("model.layers"). num_layers / hidden_size /
    num_heads / num_kv_heads / head_dim / intermediate_size: the original geometry. heads: layer -> kept query heads; channels:
    layer -> kept MLP channels. A layer missing from a dict is not pruned there.
    """

    layers_path: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    heads: dict[int, list[int]] = field(default_factory=dict)
    channels: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module) -> StructuredPruning:
        """An empty plan (nothing pruned) with the geometry of an unpruned `model`."""
        path, layers = find_decoder_layers(model)
        attn, mlp = layers[0].self_attn, layers[0].mlp
        hd = int(attn.head_dim)
        geo = (_plain(attn.q_proj).out_features // hd, _plain(attn.k_proj).out_features // hd,
               _plain(mlp.gate_proj).out_features)
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            found = (_plain(a.q_proj).out_features // hd, _plain(a.k_proj).out_features // hd,
                     _plain(m.gate_proj).out_features)
            if found != geo:
                raise ConfigError(f"layer {i} has (heads, kv heads, channels) = {found} but layer 0 has {geo}: "
                                  "the model is already pruned; pass its StructuredPruning instead")
        if geo[0] % geo[1]:
            raise ConfigError(f"{geo[0]} query heads are not a multiple of {geo[1]} KV heads")
        return cls(path, len(layers), _plain(attn.q_proj).in_features, geo[0], geo[1], hd, geo[2])

    @classmethod
    def from_groups(cls, base: StructuredPruning, groups: dict[int, list[int]],
                    channels: dict[int, list[int]]) -> StructuredPruning:
        """A plan that keeps whole KV groups (`groups`: layer -> kept KV heads) and `channels`."""
        g = base.group_size
        heads = {int(i): [h for k in kv for h in range(k * g, (k + 1) * g)] for i, kv in groups.items()}
        out = cls(base.layers_path, base.num_layers, base.hidden_size, base.num_heads, base.num_kv_heads,
                  base.head_dim, base.intermediate_size, heads, {int(i): list(c) for i, c in channels.items()})
        out.validate()
        return out

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    # -- queries -----------------------------------------------------------------------------
    def kept_heads(self, layer: int) -> list[int]:
        return self.heads.get(layer, list(range(self.num_heads)))

    def kept_kv_heads(self, layer: int) -> list[int]:
        return sorted({h // self.group_size for h in self.kept_heads(layer)})

    def kept_channels(self, layer: int) -> list[int]:
        return self.channels.get(layer, list(range(self.intermediate_size)))

    def removed(self) -> dict[str, int]:
        """Totals over all layers: removed query heads, KV heads and MLP channels."""
        L = range(self.num_layers)
        return {"heads": sum(self.num_heads - len(self.kept_heads(i)) for i in L),
                "kv_heads": sum(self.num_kv_heads - len(self.kept_kv_heads(i)) for i in L),
                "channels": sum(self.intermediate_size - len(self.kept_channels(i)) for i in L)}

    def validate(self) -> StructuredPruning:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for what, d, n in (("heads", self.heads, self.num_heads), ("channels", self.channels, self.intermediate_size)):
            for layer, idx in d.items():
                if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
                    raise ConfigError(f"{what}: layer {layer!r} is not in [0, {self.num_layers})")
                _check_indices(f"{what}[{layer}]", idx, n)
        for layer in self.heads:
            per_group: dict[int, int] = {}
            for h in self.heads[layer]:
                per_group[h // self.group_size] = per_group.get(h // self.group_size, 0) + 1
            if len(set(per_group.values())) > 1:
                raise ConfigError(
                    f"heads[{layer}] keeps {per_group} query heads per KV group; every kept group must keep the "
                    "same number (grouped-query attention repeats each KV head equally)")
        return self

    def module_indices(self) -> dict[str, KeptIndices]:
        """Module path -> KeptIndices for every linear layer that pruning changes."""
        hd, d = self.head_dim, self.hidden_size
        out: dict[str, KeptIndices] = {}

        def expand(units: list[int]) -> torch.Tensor:  # unit index -> its d_h rows/cols
            return (torch.tensor(units)[:, None] * hd + torch.arange(hd)).reshape(-1)

        for i in range(self.num_layers):
            p = f"{self.layers_path}.{i}" if self.layers_path else str(i)
            if i in self.heads:
                q, kv = expand(self.kept_heads(i)), expand(self.kept_kv_heads(i))
                nq, nkv = self.num_heads * hd, self.num_kv_heads * hd
                out[f"{p}.self_attn.q_proj"] = KeptIndices(q, None, nq, d)
                out[f"{p}.self_attn.k_proj"] = KeptIndices(kv, None, nkv, d)
                out[f"{p}.self_attn.v_proj"] = KeptIndices(kv, None, nkv, d)
                out[f"{p}.self_attn.o_proj"] = KeptIndices(None, q, d, nq)
            if i in self.channels:
                c, n = torch.tensor(self.kept_channels(i)), self.intermediate_size
                out[f"{p}.mlp.gate_proj"] = KeptIndices(c, None, n, d)
                out[f"{p}.mlp.up_proj"] = KeptIndices(c, None, n, d)
                out[f"{p}.mlp.down_proj"] = KeptIndices(None, c, d, n)
        return out

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "layers_path": self.layers_path, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size,
                "heads": {str(k): v for k, v in sorted(self.heads.items())},
                "channels": {str(k): v for k, v in sorted(self.channels.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredPruning:
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"pruning format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        try:
            heads = {int(k): v for k, v in data.pop("heads", {}).items()}
            channels = {int(k): v for k, v in data.pop("channels", {}).items()}
            out = cls(**data, heads=heads, channels=channels)
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"malformed pruning description: {e}") from None
        return out.validate()


# -- pruning a model -----------------------------------------------------------------------
def keep_top(scores: torch.Tensor, n_keep: int) -> list[int]:
    """Sorted indices of the `n_keep` largest scores (ties: the lower index wins)."""
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    return sorted(order[:n_keep].tolist())


def _slice_linear_(linear: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Replace weight (and bias) by index-selected copies; update in/out_features."""
    w = linear.weight
    new = w
    if rows is not None:
        new = new.index_select(0, rows.to(w.device))
    if cols is not None:
        new = new.index_select(1, cols.to(w.device))
    linear.weight = nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)
    if rows is not None and getattr(linear, "bias", None) is not None:
        b = linear.bias
        linear.bias = nn.Parameter(b.index_select(0, rows.to(b.device)).contiguous(), requires_grad=b.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def prune_structured(model: nn.Module, pruning: StructuredPruning) -> dict[str, KeptIndices]:
    """Physically remove the heads / channels that `pruning` drops, in place.

    The model must be unpruned (its shapes equal `pruning`'s original geometry) and carry no
    lorakit adapters on the affected layers (merge + `lorakit.eject(keep_merged=True)` first,
    or prune before injecting). Everything is checked before anything changes.
    Returns the kept-index map per module (module path -> KeptIndices).
    """
    from lorakit.core.layer import AdaptedLayer

    pruning.validate()
    path, layers = find_decoder_layers(model)
    if path != pruning.layers_path or len(layers) != pruning.num_layers:
        raise ConfigError(f"pruning is for {pruning.num_layers} layers at {pruning.layers_path!r}, "
                          f"the model has {len(layers)} at {path!r}")
    kept = pruning.module_indices()
    for mpath, k in kept.items():
        m = model.get_submodule(mpath)
        if isinstance(m, AdaptedLayer):
            raise ConfigError(f"{mpath} carries lorakit adapters; prune the plain model (merge and "
                              "lorakit.eject(model, keep_merged=True) first, or prune before injecting)")
        expect = (k.out_features, k.in_features)
        if tuple(m.weight.shape) != expect:
            raise ConfigError(f"{mpath} has weight {tuple(m.weight.shape)}, expected the unpruned {expect}: "
                              "prune an unpruned model (indices refer to the original sizes)")
    with torch.no_grad():
        for mpath, k in kept.items():
            _slice_linear_(model.get_submodule(mpath), k.rows, k.cols)
    for i, layer in enumerate(layers):
        if i in pruning.heads:
            attn = layer.self_attn
            n_q, n_kv = len(pruning.kept_heads(i)), len(pruning.kept_kv_heads(i))
            attn.num_key_value_groups = n_q // n_kv  # read by eager/SDPA attention (repeat_kv)
            for attr, v in (("num_heads", n_q), ("num_key_value_heads", n_kv), ("num_attention_heads", n_q)):
                if hasattr(attn, attr):  # older transformers versions keep these on the module
                    setattr(attn, attr, v)
        if i in pruning.channels and hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = len(pruning.kept_channels(i))
    object.__setattr__(model, "lorakit_pruning", pruning)  # plain attribute: what this model kept
    return kept


# -- files --------------------------------------------------------------------------------
def save_pruned(model: nn.Module, path: str | os.PathLike, pruning: StructuredPruning, tokenizer=None) -> Path:
    """`save_pretrained` (safetensors) of a pruned model plus `pruning.json`, written atomically.

    The config.json keeps the original sizes (a LlamaConfig cannot hold per-layer sizes), so
    plain `from_pretrained` refuses the smaller tensors; use `load_pruned(path)`.
    """
    from lorakit.core.inject import adapted_layers
    from lorakit.fsutil import atomic_dir

    if adapted_layers(model):
        raise ConfigError("the model still carries lorakit adapters; merge and lorakit.eject(model, keep_merged=True) "
                          "first, or save the adapter with lorakit.save")
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(pruning.to_dict(), indent=1) + "\n")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(str(path / s)))
        return out
    if any(path.glob("*.bin")):
        raise PrunedModelFileError(f"{path} holds pickled .bin weights; lorakit never unpickles files")
    raise PrunedModelFileError(f"{path} has no model.safetensors (or sharded index)")


def load_pruned(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Rebuild a model written by `save_pruned`: build the architecture from config.json with
    empty (meta) weights, cut it to the sidecar's sizes, then load the saved tensors."""
    import transformers
    from accelerate import init_empty_weights

    path = Path(path)
    sidecar = path / SIDECAR
    if not sidecar.is_file():
        raise PrunedModelFileError(f"{sidecar} is missing: not a pruned model written by save_pruned")
    try:
        pruning = StructuredPruning.from_dict(json.loads(sidecar.read_text()))
    except json.JSONDecodeError as e:
        raise PrunedModelFileError(f"{sidecar} is not valid JSON: {e}") from None
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights(include_buffers=False):  # no full-size allocation; buffers (rope) stay real
        model = cls._from_config(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    prune_structured(model, pruning)
    state = _read_state_dict(path)
    expected = model.state_dict()
    for k, t in state.items():
        if k not in expected:
            raise PrunedModelFileError(f"{path}: unexpected tensor {k!r}")
        if tuple(t.shape) != tuple(expected[k].shape):
            raise PrunedModelFileError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, "
                                       f"{SIDECAR} implies {tuple(expected[k].shape)}")
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    model.tie_weights()  # tied LM heads are not in the file
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise PrunedModelFileError(f"{path}: missing tensors {sorted(set(missing) & set(still_meta))[:5] or still_meta[:5]}")
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


__all__ = [
    "KeptIndices",
    "PrunedModelFileError",
    "StructuredPruning",
    "find_decoder_layers",
    "keep_top",
    "load_pruned",
    "prune_structured",
    "save_pruned",
]
