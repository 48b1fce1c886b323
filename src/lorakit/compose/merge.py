"""Merge several adapters into one plain LoRA adapter, and run mergekit-style YAML recipes.

    lorakit.load(model, "runs/fr/adapter", name="fr", activate=False)
    lorakit.load(model, "runs/de/adapter", name="de", activate=False)
    merge_adapters(model, ["fr", "de"], weights=[0.5, 0.5], method="ties", density=0.2, rank=16)
    lorakit.save(model, "out/fr-de", name="merged")

Any adapter method with `to_lora()` can be a source: each adapted layer contributes the
exact low-rank factors (A_i, s_i·B_i) of its update, and `lorakit.ops.merge` combines them
module by module (see that file for the equations). A module adapted by only some sources
merges just those (the others' ΔW is 0 there). The result is a plain LoRA (`LoraConfig`
with scale 1 in every module and per-module ranks in rank_pattern), so it saves in PEFT's
format, merges into the base weights, and serves like any other LoRA.

A recipe (YAML or JSON; keys are `MergeRecipe`'s fields, unknown keys are an error):

    base_model: smollm2-135m          # alias or local HF dir; default: the first adapter's base
    adapters:
      - {path: runs/fr/adapter, weight: 0.6}
      - {path: runs/de/adapter, weight: 0.4}
    method: ties                      # linear | task_arithmetic | cat | svd | ties |
                                      # dare_linear | dare_ties | magnitude_prune
    rank: 16                          # output rank (svd / ties / dare / magnitude_prune)
    density: 0.2                      # fraction of entries kept (ties / dare / magnitude_prune)
    seed: 0                           # DARE's drop masks
    output: out/fr-de
    format: peft                      # peft: a LoRA adapter dir | merged: a full HF model dir

Relative paths are relative to the current working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.config import from_dict, read_config_file
from lorakit.core.adapter import check_adapter_name
from lorakit.core.inject import (
    activate_adapters,
    adapted_layers,
    apply_plan,
    delete_adapter,
    modules_to_save_paths,
    plan_injection,
    state,
)
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.ops.merge import check_merge_args, combine

__all__ = ["AdapterEntry", "MergeRecipe", "load_recipe", "merge_adapters", "merged_factors", "run_recipe"]


# -- merging adapters on a model -------------------------------------------------------
def merge_adapters(
    model: nn.Module,
    names_or_paths: Sequence[str | os.PathLike] | str | os.PathLike,
    weights: Sequence[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    out_name: str = "merged",
    majority_sign: str = "total",
    activate: bool = True,
    trainable: bool = False,
) -> str:
    """Combine adapters into a new plain LoRA adapter `out_name` attached to `model`.

    Args:
        names_or_paths: adapters to merge, each the name of an adapter on `model` or the
            directory of a saved adapter (loaded for the merge, then removed again).
        weights: one weight per adapter (default: all 1.0). Negative weights subtract.
        method: one of `lorakit.ops.merge.MERGE_METHODS`:
            "cat" / "task_arithmetic": ΔW = Σ w_i ΔW_i exactly (rank Σ r_i per module);
            "linear": ΔW = Σ (w_i / Σ_j w_j) ΔW_i exactly (the sum runs over all adapters,
                also at modules that only some of them adapt);
            "svd": best rank-`rank` approximation of Σ w_i ΔW_i;
            "ties", "dare_linear", "dare_ties", "magnitude_prune": elementwise merges of the
                dense ΔW_i (PEFT's "*_svd" combination types), truncated to rank `rank`.
        rank: output rank for the non-exact methods (default per module: max r_i, as PEFT).
        density: fraction of entries kept, in (0, 1] (ties / dare_* / magnitude_prune).
        seed: seeds one CPU generator for DARE's masks, drawn module by module in model order.
        majority_sign: TIES sign election, "total" (sign of the sum) or "frequency".
        activate: make `out_name` the only active adapter (False: leave the active set alone).
        trainable: whether the merged adapter's parameters require grad.

    Returns `out_name`. On any error the model is left as it was.
    """
    sources = [names_or_paths] if isinstance(names_or_paths, (str, os.PathLike)) else list(names_or_paths)
    weights = check_merge_args(method, len(sources), weights, rank, density, majority_sign)
    check_adapter_name(out_name)
    st = state(model)
    if out_name in st.configs:
        raise AdapterError(f"adapter {out_name!r} already exists on this model; pick another out_name or delete it")
    merged_in_base = sorted({n for layer in adapted_layers(model).values() for n in layer.merged})
    if activate and merged_in_base:
        raise AdapterError(f"adapters {merged_in_base} are merged into the base weights; unmerge them first "
                           "(or pass activate=False)")
    names, loaded = _resolve_sources(model, sources)
    try:
        to_save = _modules_to_save(model, names)
        factors = merged_factors(model, names, weights, method, rank, density, seed, majority_sign)
        plan = plan_injection(model, _lora_config(factors, to_save), out_name)
        if set(plan.adapters) != set(factors):  # cannot happen: the targets are the exact paths
            raise AdapterError(f"internal error: planned modules {sorted(plan.adapters)} != {sorted(factors)}")
        with torch.no_grad():
            for path, adapter in plan.adapters.items():
                _copy_factors(adapter, *factors[path])
        apply_plan(model, plan, activate=False)
        for adapter in plan.adapters.values():
            adapter.requires_grad_(trainable)
    finally:
        for name in loaded:
            delete_adapter(model, name)
    if activate:
        activate_adapters(model, [out_name])
    return out_name


def merged_factors(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    majority_sign: str = "total",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A (r, d_in), B (d_out, r))} of the merge of adapters `names` on `model`
    (the math of `merge_adapters` without attaching anything; scale is folded into B)."""
    weights = check_merge_args(method, len(names), weights, rank, density, majority_sign)
    known = state(model).configs
    for n in names:
        if n not in known:
            raise AdapterError(f"unknown adapter {n!r}; this model has {sorted(known) or 'no adapters'}")
    if method == "linear":  # normalise over ALL adapters: a missing module is ΔW_i = 0, not absent
        total = sum(weights)
        weights, method = [w / total for w in weights], "task_arithmetic"
    generator = torch.Generator().manual_seed(seed)  # one stream over all modules (DARE)
    out = {}
    for path, layer in adapted_layers(model).items():
        present = [i for i, n in enumerate(names) if n in layer.adapters]
        if not present:
            continue
        pairs = []
        for i in present:
            adapter = layer.adapters[names[i]]
            if not hasattr(adapter, "to_lora"):
                raise ConfigError(f"adapter {names[i]!r} (method {known[names[i]].method!r}) has no to_lora(); "
                                  "it cannot be merged into a LoRA")
            with torch.no_grad():
                a, b, scale = adapter.to_lora()
            pairs.append((a.detach(), b.detach() * scale))  # fold the scale into B
        with torch.no_grad():
            a, b = combine(method, pairs, [weights[i] for i in present], rank, density, generator, majority_sign)
        out[path] = (a, b)
    if not out:
        raise AdapterError(f"adapters {list(names)} adapt no module of this model")
    return out


def _resolve_sources(model: nn.Module, sources: list) -> tuple[list[str], list[str]]:
    """Adapter names for `sources`; directories are loaded under temporary names (returned
    second, for removal). On error, whatever was loaded is removed again."""
    from lorakit.core.io import load

    known = state(model).configs
    names, loaded = [], []
    try:
        for i, src in enumerate(sources):
            if isinstance(src, str) and src in known:
                names.append(src)
                continue
            path = Path(src)
            if not path.is_dir():
                raise AdapterError(f"{str(src)!r} is neither an adapter on this model "
                                   f"({sorted(known) or 'none'}) nor an adapter directory")
            tmp = f"_merge_src{i}"
            while tmp in known:
                tmp += "_"
            load(model, path, name=tmp, activate=False, trainable=False)
            names.append(tmp)
            loaded.append(tmp)
    except BaseException:
        for n in loaded:
            delete_adapter(model, n)
        raise
    return names, loaded


def _modules_to_save(model: nn.Module, names: list[str]) -> list[str] | None:
    """Union of the sources' modules_to_save. Those modules live once in the model (the last
    loaded adapter's copy), so two sources that both train the same module cannot merge."""
    owner: dict[str, str] = {}
    keep: list[str] = []
    for n in names:
        cfg = state(model).configs[n]
        for p in modules_to_save_paths(model, cfg):
            if p in owner and owner[p] != n:
                raise ConfigError(f"adapters {owner[p]!r} and {n!r} both train module {p!r} fully "
                                  "(modules_to_save); such modules cannot be merged")
            owner[p] = n
        keep += [k for k in cfg.modules_to_save or [] if k not in keep]
    return keep or None


def _lora_config(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], modules_to_save):
    """A LoraConfig targeting exactly the merged modules, scale α/r = 1 everywhere, with the
    per-module ranks in rank_pattern / alpha_pattern (escaped full paths)."""
    from lorakit.methods.lora import LoraConfig

    ranks = {p: int(a.shape[0]) for p, (a, _) in factors.items()}
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    return LoraConfig(target=sorted(factors), r=r, alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                      modules_to_save=modules_to_save)


def _copy_factors(adapter: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Write ΔW = B A (weight-view orientation) into a fresh scale-1 `Lora` module."""
    if adapter.spec.kind == "embedding":  # Lora.factors(): A = lora_embedding_Bᵀ, B = lora_embedding_Aᵀ
        adapter.lora_embedding_A.copy_(b.T)
        adapter.lora_embedding_B.copy_(a.T)
    else:
        adapter.lora_A.weight.copy_(a)
        adapter.lora_B.weight.copy_(b)


# -- recipes ---------------------------------------------------------------------------
@dataclass
class AdapterEntry:
    """One recipe source: an adapter directory and its merge weight."""

    path: str
    weight: float = 1.0


@dataclass
class MergeRecipe:
    """A merge described in a file (mergekit style); see the module docstring for an example.

    adapters: [{path, weight}] (a bare path string means weight 1.0); output: where to write;
    base_model: model alias or local HF dir (default: the base recorded in the first adapter);
    method / rank / density / seed / majority_sign: as in `merge_adapters`;
    format: "peft" (a LoRA adapter dir, loads in lorakit and peft.PeftModel) or "merged"
    (the merged LoRA folded into the base weights, written with save_pretrained + tokenizer);
    task: how to load the base model ("causal-lm" or "seq-cls").
    """

    adapters: list[AdapterEntry]
    output: str
    base_model: str | None = None
    method: str = "cat"
    rank: int | None = None
    density: float | None = None
    seed: int = 0
    format: str = "peft"
    majority_sign: str = "total"
    task: str = "causal-lm"

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, list) or not self.adapters:
            raise ConfigError(f"adapters must be a non-empty list of {{path, weight}} entries, got {self.adapters!r}")
        entries = []
        for i, e in enumerate(self.adapters):
            if isinstance(e, AdapterEntry):
                entries.append(e)
            elif isinstance(e, (str, os.PathLike)):
                entries.append(AdapterEntry(path=str(e)))
            elif isinstance(e, Mapping):
                entries.append(from_dict(AdapterEntry, dict(e), where=f"adapters[{i}]"))
            else:
                raise ConfigError(f"adapters[{i}] must be a path or a {{path, weight}} mapping, got {e!r}")
            if not isinstance(entries[-1].path, (str, os.PathLike)) or not str(entries[-1].path):
                raise ConfigError(f"adapters[{i}].path must be a directory path, got {entries[-1].path!r}")
        self.adapters = entries
        if not isinstance(self.output, (str, os.PathLike)) or not str(self.output):
            raise ConfigError(f"output must be a directory path, got {self.output!r}")
        self.output = str(self.output)
        if self.format not in ("peft", "merged"):
            raise ConfigError(f"format must be 'peft' or 'merged', got {self.format!r}")
        if self.task not in ("causal-lm", "seq-cls"):
            raise ConfigError(f"task must be 'causal-lm' or 'seq-cls', got {self.task!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        check_merge_args(self.method, len(entries), [e.weight for e in entries], self.rank, self.density,
                         self.majority_sign)


def load_recipe(path: str | os.PathLike) -> MergeRecipe:
    """Read a YAML/JSON merge recipe; unknown or invalid keys raise ConfigError naming the file."""
    data = read_config_file(path)
    try:
        return from_dict(MergeRecipe, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def run_recipe(recipe: MergeRecipe | Mapping | str | os.PathLike) -> Path:
    """Load the base model and the recipe's adapters, merge them, write `recipe.output`.

    `recipe` is a MergeRecipe, a mapping of its fields, or the path of a YAML/JSON file.
    Returns the output directory.
    """
    import lorakit
    from lorakit.core.io import read_config, read_tensors
    from lorakit.models import load_model

    if isinstance(recipe, Mapping):
        recipe = from_dict(MergeRecipe, dict(recipe))
    elif not isinstance(recipe, MergeRecipe):
        recipe = load_recipe(recipe)
    paths = [Path(e.path) for e in recipe.adapters]
    for p in paths:
        read_config(p)  # fail on a missing/bad adapter before the (slow) model load
    base = recipe.base_model or read_config(paths[0])[1].get("base_model")
    if not base:
        raise ConfigError(f"the recipe has no base_model and {paths[0]} records none; add base_model")
    out = Path(recipe.output)
    if recipe.format == "merged":
        _check_model_output(out)
    num_labels = None
    if recipe.task == "seq-cls":  # the classification head's size comes from the adapter
        heads = [t for k, t in read_tensors(paths[0]).items() if k.endswith(("score.weight", "classifier.weight"))]
        num_labels = heads[0].shape[0] if heads else None
    model, tokenizer = load_model(base, task=recipe.task, num_labels=num_labels)
    name = "merged"
    merge_adapters(model, paths, [e.weight for e in recipe.adapters], method=recipe.method, rank=recipe.rank,
                   density=recipe.density, seed=recipe.seed, out_name=name, majority_sign=recipe.majority_sign)
    if recipe.format == "peft":
        return lorakit.save(model, out, name=name, base_model=base)
    from lorakit.fsutil import atomic_dir

    lorakit.merge(model, [name])
    lorakit.eject(model, keep_merged=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _check_model_output(out: Path) -> None:
    """A merged model replaces `out` whole: refuse unless it is absent, empty or a model dir."""
    if out.exists():
        if not out.is_dir():
            raise AdapterFileError(f"cannot write the merged model to {out}: it exists and is not a directory")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise AdapterFileError(f"refusing to overwrite {out}: it is not empty and holds no model (config.json)")

