"""Attach adapters to any `transformers` (or plain PyTorch) model, and manage them by name.

Target matching follows PEFT so configs carry over:
- "all-linear": every nn.Linear / GPT-2 Conv1D except the output head (lm_head / the
  module tied to the output embeddings) and anything in `modules_to_save`;
- a list of names: a module matches when its path equals the name or ends with "." + name;
- a string without regex characters: the same as a one-element list;
- any other string: a regular expression that must fully match the module path.

Methods that insert new modules (`supports = ("insert",)`) attach to *sites* instead: the
method names roles (`INSERT_ROLES`), `find_sites` resolves them per architecture (Llama family,
GPT-2, BERT family) and `target` selects blocks ("all", or a block path / list / regex such as
r"model\\.layers\\.(0|1)"). Sites are driven by forward hooks (`InsertSite`), never by replacing
modules, so they combine freely with LoRA-style adapters on the same model.

Injection is all-or-nothing: every adapter is built first, and the model is only modified
once all of them exist, so a bad config leaves the model untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.adapter import INSERT_ROLES, AdapterConfig, check_adapter_name
from lorakit.core.layer import AdaptedLayer, InsertSite, Site, SiteHook, wrapper_for
from lorakit.core.registry import method_for_config
from lorakit.core.shared import SharedParameters
from lorakit.errors import AdapterError, ConfigError

_REGEX_CHARS = set("^$*+?()[]{}|\\")
_HEAD_NAMES = ("lm_head", "embed_out", "output_projection", "score", "classifier", "qa_outputs")


@dataclass
class LorakitState:
    """Per-model bookkeeping, stored as `model.lorakit`."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def state(model: nn.Module) -> LorakitState:
    st = getattr(model, "lorakit", None)
    if st is None:
        st = LorakitState()
        # object.__setattr__: keep it out of nn.Module's parameter/module tracking
        object.__setattr__(model, "lorakit", st)
    return st


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def adapter_modules(model: nn.Module, name: str = "default", cls: type | None = None,
                    label: str | None = None) -> dict[str, nn.Module]:
    """Module path -> adapter `name` on that layer (only instances of `cls` when given).

    With `cls`, a model without such an adapter is an error naming the method (`label`).
    """
    mods = {p: layer.adapters[name] for p, layer in adapted_layers(model).items()
            if name in layer.adapters and (cls is None or isinstance(layer.adapters[name], cls))}
    if cls is not None and not mods:
        raise AdapterError(f"model has no {label or getattr(cls, 'method', cls.__name__)} adapter named {name!r}")
    return mods


def check_not_merged(model: nn.Module, name: str) -> None:
    """Raise if adapter `name` is folded into base weights (its shape/rank must not change then)."""
    merged = [p for p, layer in adapted_layers(model).items() if name in layer.merged]
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into {merged[0]} (and {len(merged) - 1} more); unmerge first")


def prune_adapter(model: nn.Module, name: str, modules: dict[str, nn.Module], full_rank: int) -> dict[str, int]:
    """Call `prune_()` on each module of adapter `name` and record the per-module ranks that
    differ from `full_rank` in the stored config's `ranks`, so save -> load rebuilds them."""
    check_not_merged(model, name)
    new = {p: m.prune_() for p, m in modules.items()}
    st = state(model)
    st.configs[name] = dataclasses.replace(
        st.configs[name], ranks={p: k for p, k in sorted(new.items()) if k != full_rank})
    return new


# -- target matching -------------------------------------------------------------------
def output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for n, m in model.named_modules():
        if (head is not None and m is head) or n.split(".")[-1] in _HEAD_NAMES:
            names.add(n)
    return names


def name_matches(path: str, names) -> bool:
    """PEFT's rule for a list of names: the path equals a name or ends with "." + name."""
    return any(path == k or path.endswith("." + k) for k in names)


def modules_to_save_paths(model: nn.Module, config: AdapterConfig) -> list[str]:
    keep = config.modules_to_save or []
    return [n for n, _ in model.named_modules() if n and name_matches(n, keep)]


def _base_of(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, AdaptedLayer) else m


def match_targets(paths: list[str], target, heads=(), exclude=()) -> list[str]:
    """The `paths` that `target` selects, by the rules in this module's docstring.

    "all-linear" takes every path except the output `heads` and `exclude` (the caller passes
    only linear paths); a list or a plain name matches by suffix; anything else is a regex.
    """
    if target == "all-linear":
        return [n for n in paths if n not in heads and not name_matches(n, exclude)]
    if isinstance(target, (list, tuple)) or not (_REGEX_CHARS & set(target)):
        return [n for n in paths if name_matches(n, [target] if isinstance(target, str) else target)]
    try:
        rx = re.compile(target)
    except re.error as e:
        raise ConfigError(f"target {target!r} is not a valid regular expression: {e}") from None
    return [n for n in paths if rx.fullmatch(n)]


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module paths the config's `target` selects (errors if none match)."""
    target = config.target
    wrappers = tuple(n + "." for n in adapted_layers(model))
    candidates = [
        n for n, m in model.named_modules()
        if wrapper_for(_base_of(m)) is not None and not n.startswith(wrappers)
    ]  # never wrap the inside of a wrapper
    pool = candidates
    if target == "all-linear":
        pool = [n for n in candidates if wrapper_for(_base_of(model.get_submodule(n))).kind == "linear"]
    chosen = match_targets(pool, target, heads=output_head_names(model), exclude=config.modules_to_save or [])
    if not chosen:
        leaves = sorted({n.split(".")[-1] for n in candidates})
        raise ConfigError(
            f"target {target!r} matched no adaptable module; adaptable module names in this model: {leaves}"
        )
    return chosen


# -- insertion sites ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    """Where the insertion roles sit in one architecture family's transformer blocks."""

    name: str
    layers: str  # path of the block list inside the backbone
    has: tuple[str, ...]  # attributes every block has
    roles: dict  # role -> (path inside the block, hook mode)
    embed: str  # path of the embedding-output module inside the backbone


_FAMILIES = (
    # Llama, Mistral, Qwen2, Gemma, SmolLM2 (pre-LN; blocks return the residual stream)
    _Family("llama", "layers", ("self_attn", "mlp", "post_attention_layernorm"),
            {"attn_output": ("self_attn", "output"), "ffn_output": ("mlp", "output"),
             "ffn_residual": ("", "output")}, embed="embed_tokens"),
    # GPT-2 (pre-LN; token + position embeddings meet in `drop`)
    _Family("gpt2", "h", ("attn", "mlp", "ln_1", "ln_2"),
            {"attn_output": ("attn", "output"), "ffn_output": ("mlp", "output"),
             "ffn_residual": ("", "output")}, embed="drop"),
    # BERT, mBERT, RoBERTa, XLM-R (post-LN: sub-layer outputs meet the residual inside LayerNorm)
    _Family("bert", "encoder.layer", ("attention", "intermediate", "output"),
            {"attn_output": ("attention.output.dropout", "output"), "ffn_output": ("output.dropout", "output"),
             "ffn_residual": ("output.LayerNorm", "norm")}, embed="embeddings"),
)


def _find_blocks(model: nn.Module) -> tuple[_Family, str, list[str]]:
    """(family, backbone path, block paths) of the model's transformer blocks."""
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for fam in _FAMILIES:
            if (path == fam.layers or path.endswith("." + fam.layers)) and all(
                    all(hasattr(block, a) for a in fam.has) for block in module):
                found.append((fam, path[: -len(fam.layers)].rstrip("."), [f"{path}.{i}" for i in range(len(module))]))
    if len(found) != 1:
        what = "no transformer blocks of a known family" if not found else \
            f"{len(found)} block lists ({', '.join(f[0].name + ' at ' + (f[1] or '<root>') for f in found)})"
        raise ConfigError(
            f"cannot place inserted adapters in {type(model).__name__}: found {what}; supported: "
            "Llama family (model.layers[i].self_attn/mlp), GPT-2 (transformer.h[i].attn/mlp), "
            "BERT family (encoder.layer[i].attention/output)")
    return found[0]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _module_path(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def find_sites(model: nn.Module, roles, target="all") -> dict[str, Site]:
    """Holder path -> `Site` for each requested role in each selected block (+ the embeddings).

    `target` selects blocks: "all", or a block path / list of paths (suffix match, e.g.
    ["layers.0", "layers.1"]) / regex (full match, e.g. r"model\\.layers\\.[0-5]"). The "embed"
    role is not block-bound and is always placed when requested.
    """
    roles = tuple(roles)
    bad = [r for r in roles if r not in INSERT_ROLES]
    if bad or not roles:
        raise ConfigError(f"insert roles must be a non-empty subset of {INSERT_ROLES}, got {roles}")
    fam, backbone, blocks = _find_blocks(model)
    chosen = blocks if target == "all" else match_targets(blocks, target)
    if not chosen and any(r != "embed" for r in roles):
        raise ConfigError(f"target {target!r} matched no transformer block; blocks are {blocks[:3]} ... "
                          f"({len(blocks)} in all), or use 'all'")
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    first = next((p for p in model.get_submodule(blocks[0]).parameters() if p.is_floating_point()), None)
    if not isinstance(d, int) or first is None:
        raise ConfigError(f"cannot determine the hidden size of {type(model).__name__} (config.hidden_size)")
    sites: dict[str, Site] = {}
    for role in roles:
        if role == "embed":
            hooks = [SiteHook(_join(backbone, fam.embed), "output")]
            get_out = getattr(model, "get_output_embeddings", None)
            head = _module_path(model, get_out() if callable(get_out) else None)
            if head is not None:  # an LM head: the same adapter runs again on the head's input
                hooks.append(SiteHook(head, "input", "delta_head"))
            site_list = [Site(role, tuple(hooks), d, first.dtype, first.device)]
        else:
            sub, mode = fam.roles[role]
            site_list = [Site(role, (SiteHook(_join(b, sub), mode),), d, first.dtype, first.device) for b in chosen]
        for site in site_list:
            model.get_submodule(site.hooks[0].path)  # every hooked module must exist
            sites[site.path] = site
    return sites


def _attach_site(model: nn.Module, site: Site) -> InsertSite:
    """The holder of `site`, created and hooked if it does not exist yet."""
    owner = model.get_submodule(site.hooks[0].path)
    holder = getattr(owner, site.attr, None)
    if isinstance(holder, InsertSite):
        return holder
    holder = InsertSite(site).train(owner.training)
    owner.add_module(site.attr, holder)
    for i, hk in enumerate(site.hooks):
        holder.hook(model.get_submodule(hk.path), i)
    return holder


def _detach_site(model: nn.Module, holder: InsertSite) -> None:
    for hk in holder.site.hooks:
        holder.unhook(model.get_submodule(hk.path))
    delattr(model.get_submodule(holder.site.hooks[0].path), holder.site.attr)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` (wrap or unwrap a layer); insertion sites hooked on the old module
    (e.g. an LM head or embedding that a LoRA now wraps) move to the new one, holder included."""
    old = model.get_submodule(path)
    sites = [s for s in adapted_layers(model).values() if isinstance(s, InsertSite)]
    moved = [(s, i) for s in sites for i, hk in enumerate(s.site.hooks) if hk.path == path]
    for s, _ in moved:
        s.unhook(old)
    for attr, child in list(old.named_children()):
        if isinstance(child, InsertSite):
            delattr(old, attr)
            new.add_module(attr, child)
    _set_submodule(model, path, new)
    for s, i in moved:
        s.hook(new, i)


# -- inject / eject ----------------------------------------------------------------------
@dataclass
class InjectionPlan:
    """Adapters built for every target but not yet attached (see `apply_plan`)."""

    name: str
    config: AdapterConfig
    adapters: dict[str, nn.Module]  # module path -> adapter (holder path for insert sites)
    sites: dict[str, Site] = field(default_factory=dict)  # holder path -> site, insert methods only
    # module path -> the new wrapper the adapter was planned with (its spec reads that wrapper's
    # state, e.g. `pristine_weight`), for targets not wrapped yet
    wrappers: dict[str, AdaptedLayer] = field(default_factory=dict)


def plan_injection(model: nn.Module, config: AdapterConfig, name: str = "default") -> InjectionPlan:
    """Build (but do not attach) one adapter per target module. Raises before any change.

    All adapters of the plan get one `SharedParameters` pool (`LayerSpec.shared`) for the
    tensors a method shares across layers.
    """
    check_adapter_name(name)
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"expected an AdapterConfig, got {type(config).__name__}")
    spec = method_for_config(config)
    if name in state(model).configs:
        raise AdapterError(f"adapter {name!r} already exists on this model; delete it first or pick another name")
    for k in config.modules_to_save or []:
        if not any(name_matches(n, [k]) for n, _ in model.named_modules()):
            raise ConfigError(f"modules_to_save entry {k!r} matches no module in the model")
    if "insert" in spec.adapter_cls.supports:
        return _plan_sites(model, config, name, spec)
    adapters, wrappers = {}, {}
    pool = SharedParameters()  # tensors this adapter's layers share (see lorakit.core.shared)
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        base = _base_of(module)
        if isinstance(module, AdaptedLayer):
            wrapper = module
        else:
            wrapper = wrappers[path] = wrapper_for(base)(base)
        lspec = dataclasses.replace(wrapper.spec(path), shared=pool)
        if lspec.kind not in spec.adapter_cls.supports:
            raise ConfigError(f"method {spec.name!r} cannot adapt {lspec.kind} layer {path!r}")
        adapter = spec.adapter_cls(lspec, config)
        if getattr(adapter, "needs_w0", False) and wrapper.merged and wrapper._w0 is None:
            raise AdapterError(f"{path}: adapters {wrapper.merged} are merged into this layer and no copy of its "
                               f"original weight was kept; unmerge them before adding {spec.name!r} adapter "
                               f"{name!r}, whose update depends on W0")
        adapter.train(base.training)  # a fresh nn.Module is in train mode; follow the model
        adapters[path] = adapter.to(device=lspec.device)
    return InjectionPlan(name, config, adapters, wrappers=wrappers)


def _plan_sites(model: nn.Module, config: AdapterConfig, name: str, spec) -> InjectionPlan:
    roles = spec.adapter_cls.insert_roles(config)
    sites = find_sites(model, roles, config.target)
    adapters = {}
    pool = SharedParameters()
    for hpath, site in sites.items():
        existing = getattr(model.get_submodule(site.hooks[0].path), site.attr, None)
        if existing is not None and not (isinstance(existing, InsertSite) and existing.site.hooks == site.hooks):
            raise AdapterError(f"{hpath} already exists and is not a matching insertion site")
        adapter = spec.adapter_cls(dataclasses.replace(InsertSite(site).spec(hpath), shared=pool), config)
        adapter.train(model.get_submodule(site.hooks[0].path).training)
        adapters[hpath] = adapter.to(device=site.device)
    return InjectionPlan(name, config, adapters, sites)


def apply_plan(model: nn.Module, plan: InjectionPlan, activate: bool = True) -> nn.Module:
    """Attach planned adapters (cannot fail half-way: all checks happened in planning)."""
    for path, adapter in plan.adapters.items():
        if path in plan.sites:
            module = _attach_site(model, plan.sites[path])
        else:
            module = model.get_submodule(path)
            if not isinstance(module, AdaptedLayer):
                planned = plan.wrappers.get(path)
                wrapper = planned if planned is not None and planned.base is module else wrapper_for(module)(module)
                module = wrapper.train(module.training)
                _replace_module(model, path, module)
        module.adapters[plan.name] = adapter
    st = state(model)
    st.configs[plan.name] = plan.config
    if activate:
        activate_adapters(model, st.active + [plan.name])
    _freeze_base(model, plan.adapters.values())
    return model


def inject(model: nn.Module, config: AdapterConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Attach a new adapter `name` (method given by the config's class) to `model` in place.

    The adapter is added to the active set (several active adapters add their outputs).
    Afterwards only adapter parameters (and `modules_to_save`) require grad.
    """
    return apply_plan(model, plan_injection(model, config, name), activate=activate)


def _freeze_base(model: nn.Module, new_adapters) -> None:
    """Base parameters off, the new adapters on; other adapters keep their state."""
    adapter_params = {id(p) for layer in adapted_layers(model).values() for p in layer.adapters.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    for adapter in new_adapters:
        adapter.requires_grad_(True)
    for cfg in state(model).configs.values():
        for path in modules_to_save_paths(model, cfg):
            model.get_submodule(path).requires_grad_(True)


def upcast_trainable(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Cast every trainable bf16/fp16 parameter to `dtype` in place (the adapter's master weights
    over a half-precision base; train under torch.autocast). Returns how many were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def adapter_names(model: nn.Module) -> list[str]:
    return list(state(model).configs)


def _check_known(model: nn.Module, names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = state(model).configs
    for n in names:
        if n not in known:
            raise AdapterError(f"unknown adapter {n!r}; this model has {sorted(known) or 'no adapters'}")
    return names


def activate_adapters(model: nn.Module, names) -> None:
    """Make exactly `names` active (their outputs add)."""
    names = list(dict.fromkeys(_check_known(model, names)))
    for layer in adapted_layers(model).values():
        layer.active = [n for n in names if n in layer.adapters]
    state(model).active = names


def deactivate_adapters(model: nn.Module, names=None) -> None:
    """Deactivate `names` (all when None). Merged adapters must be unmerged first."""
    st = state(model)
    names = st.active if names is None else _check_known(model, names)
    merged = {n for layer in adapted_layers(model).values() for n in layer.merged}
    if merged & set(names):
        raise AdapterError(f"adapters {sorted(merged & set(names))} are merged into the base weights; unmerge first")
    activate_adapters(model, [n for n in st.active if n not in names])


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; wrappers left with no adapter give their base layer back."""
    _check_known(model, name)
    deactivate_adapters(model, [name])
    for path, layer in adapted_layers(model).items():
        if name in layer.adapters:
            del layer.adapters[name]
        if len(layer.adapters) == 0:
            if isinstance(layer, InsertSite):
                _detach_site(model, layer)
            else:
                _replace_module(model, path, layer.base)
    del state(model).configs[name]


def eject(model: nn.Module, keep_merged: bool = False) -> nn.Module:
    """Remove every adapter, leaving the original modules in place.

    Merged adapters are unmerged first, unless `keep_merged=True`: then their updates stay
    in the base weights (a plain model for `save_pretrained`, e.g. `lorakit export`).
    """
    for layer in adapted_layers(model).values():
        if keep_merged:
            layer.merged.clear()
        else:
            layer.unmerge()
    for name in list(state(model).configs):
        delete_adapter(model, name)
    return model


# -- merge -------------------------------------------------------------------------------
def merge(model: nn.Module, names=None) -> nn.Module:
    """Fold the given (default: active) adapters into the base weights. Idempotent."""
    names = state(model).active if names is None else _check_known(model, names)
    layers = list(adapted_layers(model).values())
    quantized = [layer for layer in layers if getattr(getattr(layer, "base", None), "lorakit_quantized", False)
                 and any(n in layer.adapters for n in names)]
    if quantized:  # checked up front: never leave the model half merged
        quantized[0].merge(names)  # raises the explanatory AdapterError
    declared = [layer.adapters[n] for layer in layers if not isinstance(layer, InsertSite) for n in names
                if n in layer.adapters and n not in layer.merged and getattr(layer.adapters[n], "mergeable", True) is False]
    if declared:  # methods without a weight update (mergeable = False): their own explanation, before any change
        declared[0].delta_weight()
        raise AdapterError(f"method {declared[0].method!r} has no weight update: it cannot be merged into the base "
                           "weights; keep it unmerged")
    inserted = sorted({n for layer in layers if isinstance(layer, InsertSite) for n in names if n in layer.adapters})
    if inserted:
        configs = state(model).configs
        raise AdapterError(
            f"adapter {inserted[0]!r} (method {configs[inserted[0]].method!r}) inserts nonlinear modules into the "
            "network; it cannot be merged into the base weights. Keep it unmerged (outputs are the same), "
            "or merge only the linear adapters: lorakit.merge(model, names=[...])")
    for layer in layers:
        layer.merge(names)
    return model


def unmerge(model: nn.Module, names=None) -> nn.Module:
    """Undo `merge` (for the given adapters, default all). Idempotent."""
    names = None if names is None else _check_known(model, names)
    for layer in adapted_layers(model).values():
        layer.unmerge(names)
    return model


# -- per-row routing ---------------------------------------------------------------------
@contextlib.contextmanager
def route(model: nn.Module, adapter_ids, names=None):
    """Within the block, row i of every batch uses adapter `names[adapter_ids[i]]` only.

    `adapter_ids` is a (batch,) integer tensor or list; -1 means "base model only".
    `names` defaults to the model's adapters in insertion order.

        with lorakit.route(model, [0, 1, -1], names=["fr", "de"]):
            logits = model(input_ids).logits  # row 0 via "fr", row 1 via "de", row 2 plain
    """
    names = adapter_names(model) if names is None else _check_known(model, names)
    ids = torch.as_tensor(adapter_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"adapter_ids must be 1-D (batch,), got shape {tuple(ids.shape)}")
    if len(ids) and (ids.max() >= len(names) or ids.min() < -1):
        raise AdapterError(f"adapter_ids must lie in [-1, {len(names) - 1}] for names {names}, got {ids.tolist()}")
    layers = list(adapted_layers(model).values())
    for layer in layers:
        layer.route = (ids, names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.route = None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
