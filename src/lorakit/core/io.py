"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, PEFT-compatible.

Layout of a saved adapter directory:
    adapter_config.json        PEFT's fields (plain LoRA loads in `peft.PeftModel`) plus a
                               "lorakit" section: method, full config, adapted modules,
                               base model id and a hash of its config
    adapter_model.safetensors  tensors named "base_model.model.<module path>.<param>",
                               e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
                               inserted adapters (bottleneck, invertible: no PEFT equivalent) use
                               their insertion site as the module path, e.g.
                               "base_model.model.model.layers.0.lorakit_ffn_residual.adapter_up.weight";
                               tensors shared across layers (`lorakit.core.shared`) are stored
                               once, as "base_model.model.lorakit_shared.<key>"; vocabulary rows
                               the adapter adds (below) as "base_model.model.lorakit_new_rows.<name>"
    tokenizer.json, ...        optional: the tokenizer saved with the adapter (`save(tokenizer=)`,
                               and always for an extended vocabulary); `load_tokenizer(dir)`

Vocabulary expansion (`lorakit.lang.vocab`): when the model gained embedding rows (it carries a
`VocabExtension` record: `resize_and_init`/`expand_vocabulary`, trans-tokenization,
`trainable_new_rows`) the adapter directory also holds ONLY the new rows - input embedding rows
>= n_old (+ those of an untied LM head and its bias), K x d instead of the 49k x d table - and the
extended tokenizer. `adapter_config.json` records them under "lorakit" -> "new_rows" (n_old,
n_new, tied) and "tokenizer" (file names and sha256). `load(base, dir)` on the ORIGINAL base
resizes its embeddings / head to n_old + n_new and fills the new rows, so outputs equal the
trained model's; a model whose vocabulary is neither n_old nor n_old + n_new rows is refused with
a message naming both. The recorded base-config hash is taken with vocab_size = n_old, so it
matches the original base. Such adapters are not loadable by PEFT (peft_type is null): PEFT
could not resize the base.

Writes are atomic: both files are written and fsynced into a hidden temporary directory
that is then renamed into place, so a process killed mid-save leaves either the old adapter
or the new one, never a mix. Loading validates everything before touching the model, and
never unpickles (`.bin` checkpoints are refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from lorakit.core.adapter import AdapterConfig
from lorakit.core.inject import (
    InjectionPlan,
    adapted_layers,
    adapter_modules,
    apply_plan,
    modules_to_save_paths,
    plan_injection,
    state,
)
from lorakit.core.layer import AdaptedConv1D, InsertSite
from lorakit.core.registry import get_method
from lorakit.core.shared import SHARED_PREFIX, shared_names
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.fsutil import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
NEW_ROWS_PREFIX = "lorakit_new_rows."  # file keys PREFIX + NEW_ROWS_PREFIX + input_embeddings, ...
FORMAT_VERSION = 1
_KEEP_ON_OVERWRITE = ("README.md",)  # files PEFT writes next to an adapter; carried over
# tokenizer files that may sit beside an adapter (saved by lorakit or by the user): never
# "foreign"; carried over on overwrite unless the new save writes its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


# -- saving ------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """File-ready tensors of adapter `name` (+ its modules_to_save), PEFT key names."""
    st = state(model)
    if name not in st.configs:
        raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(st.configs) or 'no adapters'}")
    out = {}
    shared: dict[str, tuple[torch.Tensor, str]] = {}  # shared key -> (tensor, first holder), stored once
    for path, layer in adapted_layers(model).items():
        if name in layer.adapters:
            adapter = layer.adapters[name]
            skeys = shared_names(adapter)
            for k, t in adapter.state_dict().items():
                if k in skeys:
                    _note_shared(shared, skeys[k], t, f"{path}.{k}")
                else:
                    out[f"{PREFIX}{path}.{k}"] = t.detach().cpu().contiguous().clone()
    for key, (t, _) in shared.items():
        out[f"{PREFIX}{SHARED_PREFIX}{key}"] = t.detach().cpu().contiguous().clone()
    for path in modules_to_save_paths(model, st.configs[name]):
        for k, t in model.get_submodule(path).state_dict().items():
            out[f"{PREFIX}{path}.{k}"] = t.detach().cpu().contiguous().clone()
    return out


def _note_shared(shared: dict, key: str, t: torch.Tensor, where: str) -> None:
    """Record shared tensor `key`; every later holder must have the same tensor (or values)."""
    if key not in shared:
        shared[key] = (t, where)
        return
    first, first_where = shared[key]
    same = first.data_ptr() == t.data_ptr() and first.shape == t.shape and first.stride() == t.stride()
    if not same and not (first.shape == t.shape and torch.equal(first, t)):
        raise AdapterError(f"shared tensor {key!r} differs between {first_where} and {where}; "
                           "layers that share a tensor must hold the same one")


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def _compact_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """Leaf names ("q_proj") when they select exactly `paths` (PEFT suffix rule), else full paths."""
    leaves = sorted({p.split(".")[-1] for p in paths})
    layers = {n for n, m in model.named_modules()}
    selected = {n for n in layers if n.split(".")[-1] in leaves and not _inside_wrapper(model, n)}
    return leaves if selected == set(paths) else sorted(paths)


def _inside_wrapper(model: nn.Module, path: str) -> bool:
    return any(path.startswith(w + ".") for w in adapted_layers(model))


def build_config_json(model: nn.Module, name: str, base_model: str | None = None) -> dict:
    from lorakit.models import config_hash, model_id

    cfg = state(model).configs[name]
    paths = list(adapter_modules(model, name))
    meta = {
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "config": {k: v for k, v in cfg.to_dict().items() if k != "method"},
        "adapted_modules": paths,
        "base_model": base_model or model_id(model),
        "base_config_hash": config_hash(model),
    }
    out: dict = {"peft_type": None, "task_type": _task_type(model), "base_model_name_or_path": meta["base_model"]}
    if cfg.method == "lora":  # plain LoRA: PEFT's own fields so peft.PeftModel loads it
        out.update(
            peft_type="LORA",
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            use_rslora=cfg.rslora,
            init_lora_weights=True if cfg.init == "kaiming" else "gaussian",
            bias="none",
            fan_in_fan_out=any(isinstance(adapted_layers(model)[p], AdaptedConv1D) for p in paths),
            target_modules=_compact_targets(model, paths),
            modules_to_save=cfg.modules_to_save,
            rank_pattern=dict(cfg.rank_pattern),
            alpha_pattern=dict(cfg.alpha_pattern),
            inference_mode=True,
        )
    out["lorakit"] = meta
    return out


def save(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    base_model: str | None = None,
    *,
    new_rows: bool | int | None = None,
    tokenizer=None,
) -> Path:
    """Write adapter `name` to directory `path` atomically. Returns the path.

    new_rows: store the vocabulary rows the model gained (see the module docstring).
        None (default): when the model carries a `VocabExtension` record (it was resized by
        `lorakit.lang` or has `trainable_new_rows`); True: require such rows; False: never (the
        adapter then belongs to the resized model as it is); an int: rows >= that id.
    tokenizer: a tokenizer to save in the directory. With new rows, the record's extended
        tokenizer is saved when none is given.
    """
    tensors = adapter_tensors(model, name)
    config = build_config_json(model, name, base_model)
    meta = config["lorakit"]
    ext = _rows_to_save(model, new_rows)
    tok_files: dict[str, bytes] = {}
    if ext is not None:
        from lorakit.lang.vocab import new_rows_state

        rows = new_rows_state(model, ext.n_old)
        del rows["new_rows.n_old"]
        rows = {k[len("new_rows."):]: t for k, t in rows.items()}
        n_new = rows["input_embeddings"].shape[0]
        tok = tokenizer if tokenizer is not None else ext.tokenizer
        if tok is not None:
            _check_tokenizer_fits(tok, ext.n_old, n_new)
            tok_files = _tokenizer_files(tok)
        else:
            tok_files = dict(ext.tokenizer_files or {})
        tensors.update({f"{PREFIX}{NEW_ROWS_PREFIX}{k}": t for k, t in rows.items()})
        meta["new_rows"] = {"n_old": ext.n_old, "n_new": n_new, "tied": "output_embeddings" not in rows,
                            "tensors": sorted(rows)}
        meta["base_config_hash"] = config_hash_at_vocab(model, ext.n_old)
        config["peft_type"] = None  # PEFT cannot resize the base: keep it from loading a partial adapter
    elif tokenizer is not None:
        tok_files = _tokenizer_files(tokenizer)
    if tok_files:
        meta["tokenizer"] = {"files": {f: hashlib.sha256(b).hexdigest() for f, b in sorted(tok_files.items())}}
    files = {
        CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=False) + "\n").encode(),
        WEIGHTS_NAME: st_save(tensors, metadata={"format": "pt", "lorakit_method": meta["method"]}),
        **tok_files,
    }
    return write_dir_atomic(Path(path), files)


def _rows_to_save(model: nn.Module, new_rows):
    """The `VocabExtension` whose rows `save` stores, or None."""
    from lorakit.lang.vocab import VocabExtension, embedding_rows, vocab_extension

    if new_rows is None or new_rows is False:
        return None if new_rows is False else vocab_extension(model)
    if new_rows is True:
        ext = vocab_extension(model)
        if ext is None:
            raise ConfigError("new_rows=True, but the model has no added vocabulary rows (extend it with "
                              "lorakit.lang.expand_vocabulary / resize_and_init, or pass the first new id)")
        return ext
    if isinstance(new_rows, int):
        rows = embedding_rows(model)
        if not 0 < new_rows < rows:
            raise ConfigError(f"new_rows={new_rows} must be the first new id, in (0, {rows}) "
                              f"(the embedding has {rows} rows)")
        known = vocab_extension(model)
        return VocabExtension(new_rows, known.tokenizer if known else None, known.tokenizer_files if known else None)
    raise ConfigError(f"new_rows must be None, True, False or the first new id (int), got {new_rows!r}")


def config_hash_at_vocab(model: nn.Module, vocab_size: int) -> str:
    """`config_hash` of the model's config with every `vocab_size` set to `vocab_size`: the
    hash of the base model before (or after) a vocabulary resize."""
    from lorakit.models import config_hash

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return config_hash(model)

    def fix(x):
        if isinstance(x, dict):
            return {k: (vocab_size if k == "vocab_size" and isinstance(v, int) else fix(v)) for k, v in x.items()}
        return x

    return config_hash(fix(config.to_dict()))


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    """File name -> bytes of `tokenizer.save_pretrained` (flat; only known tokenizer files)."""
    import tempfile

    save_pretrained = getattr(tokenizer, "save_pretrained", None)
    if not callable(save_pretrained):
        raise ConfigError(f"tokenizer must be a transformers tokenizer (save_pretrained), got {type(tokenizer).__name__}")
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(d)
        out = {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file() and p.name in TOKENIZER_FILES}
    if not out:
        raise ConfigError(f"{type(tokenizer).__name__}.save_pretrained wrote no tokenizer file lorakit knows "
                          f"({', '.join(TOKENIZER_FILES)})")
    return out


def _check_tokenizer_fits(tokenizer, n_old: int, n_new: int) -> None:
    """The extended tokenizer must use ids < n_old + n_new and at least one id >= n_old."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return
    ids = list(get_vocab().values())
    top = max(ids, default=-1)
    if top >= n_old + n_new or top < n_old:
        raise ConfigError(
            f"the tokenizer does not belong to these embedding rows: its largest id is {top}, but the model "
            f"adds rows {n_old}..{n_old + n_new - 1} to a {n_old}-row vocabulary (pass the extended tokenizer)")


def write_dir_atomic(path: Path, files: dict[str, bytes]) -> Path:
    """Replace directory `path` by one holding exactly `files` (+ kept extras), atomically.

    Kept extras: `README.md`, and tokenizer files unless `files` holds a tokenizer of its own.
    """
    path = Path(path)
    keep = _KEEP_ON_OVERWRITE if any(f in TOKENIZER_FILES for f in files) else (*_KEEP_ON_OVERWRITE, *TOKENIZER_FILES)
    if path.exists():
        if not path.is_dir():
            raise AdapterFileError(f"cannot save adapter to {path}: it exists and is not a directory")
        foreign = sorted(p.name for p in path.iterdir()
                         if p.name not in (*files, *_KEEP_ON_OVERWRITE, *TOKENIZER_FILES))
        if foreign:
            raise AdapterFileError(
                f"refusing to overwrite {path}: it holds files that are not part of an adapter {foreign}"
            )
    with atomic_dir(path) as tmp:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        for extra in keep:
            if (path / extra).is_file() and extra not in files:
                shutil.copy2(path / extra, tmp / extra)
    return path


# -- loading ------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict]:
    """Parse an adapter directory's config (lorakit- or PEFT-written).

    Returns (config, lorakit_meta); meta is {} for PEFT-written adapters.
    """
    path = Path(path)
    if not path.is_dir():
        hint = ""
        olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if olds:
            hint = f"; an interrupted save left the previous version at {olds[-1]} (rename it back)"
        raise AdapterFileError(f"adapter directory not found: {path}{hint}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterFileError(f"{cfg_file} is missing: not an adapter directory")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{cfg_file} must hold a JSON object, found {type(data).__name__}")
    try:
        if isinstance(data.get("lorakit"), dict):
            meta = data["lorakit"]
            spec = get_method(meta.get("method", ""))
            cfg_dict = meta.get("config", {})
            if not isinstance(cfg_dict, dict):
                raise ConfigError("'lorakit.config' must be an object")
            return spec.config_cls.from_dict(cfg_dict), meta
        return _config_from_peft(data), {}
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    except TypeError as e:  # wrong value types reaching a dataclass
        raise ConfigError(f"{cfg_file}: {e}") from None


def _config_from_peft(data: dict) -> AdapterConfig:
    from lorakit.methods.lora import LoraConfig

    ptype = data.get("peft_type")
    if ptype != "LORA":
        raise ConfigError(f"unsupported adapter type peft_type={ptype!r}; lorakit reads PEFT LoRA adapters")
    for key, ok in (("use_dora", False), ("layers_to_transform", None), ("layer_replication", None),
                    ("lora_bias", False), ("use_qalora", False)):
        if data.get(key, ok) not in (ok, None, False):
            raise ConfigError(f"PEFT option {key}={data[key]!r} is not supported by lorakit's LoRA")
    if data.get("bias", "none") != "none":
        raise ConfigError(f"PEFT option bias={data['bias']!r} is not supported (only 'none')")
    target = data.get("target_modules")
    if target is None:
        raise ConfigError("PEFT config has no target_modules")
    init = data.get("init_lora_weights", True)
    return LoraConfig(
        target=target if isinstance(target, str) else list(target),
        r=data.get("r", 8),
        alpha=data.get("lora_alpha", 8),
        dropout=data.get("lora_dropout", 0.0) or 0.0,
        rslora=bool(data.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "kaiming",
        modules_to_save=data.get("modules_to_save"),
        rank_pattern=data.get("rank_pattern") or {},
        alpha_pattern=data.get("alpha_pattern") or {},
    )


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an adapter's safetensors file, with errors that name the file."""
    path = Path(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():
        if any((path / n).exists() for n in ("adapter_model.bin", "pytorch_model.bin")):
            raise AdapterFileError(
                f"{path} holds a pickled .bin checkpoint; lorakit never unpickles files. "
                "Re-save it as safetensors (e.g. PeftModel.save_pretrained(..., safe_serialization=True))."
            )
        raise AdapterFileError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    activate: bool = True,
    trainable: bool = False,
    check_base: bool = True,
) -> nn.Module:
    """Attach the adapter saved at `path` (written by lorakit or PEFT) to `model`.

    Everything is validated before the model changes: on any error the model is untouched.
    `trainable=False` freezes the loaded adapter (for inference / composition); with
    `trainable=True` new vocabulary rows the adapter carries are trainable too
    (`lorakit.lang.trainable_new_rows`).

    An adapter with new vocabulary rows (module docstring) resizes the base's embeddings / LM
    head from n_old to n_old + n_new rows and fills them; its tokenizer comes from
    `load_tokenizer(path)`.
    """
    path = Path(path)
    cfg, meta = read_config(path)
    name = name or "default"
    nr = _new_rows_meta(meta, path)
    tensors = read_tensors(path)
    rows = _pop_rows(tensors, nr, path)
    resize = nr is not None and _check_rows(model, nr, rows, meta, path)
    if nr is not None and not resize:
        _check_shared_rows(model, nr, rows, name, path)
    tok_files = _read_tokenizer_files(path, meta) if nr is not None else {}
    if check_base and meta.get("base_config_hash"):
        from lorakit.models import config_hash

        found = config_hash_at_vocab(model, nr["n_old"]) if nr is not None else config_hash(model)
        if found != meta["base_config_hash"]:
            raise AdapterFileError(
                f"{path / CONFIG_NAME}: adapter was trained on base model {meta.get('base_model')!r} "
                f"(config hash {meta['base_config_hash'][:12]}), but this model's config hash is {found[:12]}; "
                "pass check_base=False to load anyway"
            )
    if resize:  # adapters on the embedding / LM head are planned on the resized model
        _resize_for_rows(model, nr)
    try:
        plan = plan_injection(model, cfg, name)
        if meta.get("adapted_modules") is not None and sorted(meta["adapted_modules"]) != sorted(plan.adapters):
            missing = sorted(set(meta["adapted_modules"]) - set(plan.adapters))
            extra = sorted(set(plan.adapters) - set(meta["adapted_modules"]))
            raise AdapterFileError(
                f"{path / CONFIG_NAME}: adapted modules differ from this model's matches "
                f"(in file only: {missing[:5]}, in model only: {extra[:5]})"
            )
        saved = _assign_tensors(model, plan, tensors, path / WEIGHTS_NAME)
        with torch.no_grad():
            for mpath, adapter in plan.adapters.items():
                adapter.load_state_dict(saved[mpath], strict=True)
    except BaseException:
        if resize:  # leave the model as it was: drop the rows again (old rows are untouched)
            from lorakit.lang.vocab import truncate_rows

            truncate_rows(model, nr["n_old"])
        raise
    apply_plan(model, plan, activate=activate)  # cannot fail from here on
    with torch.no_grad():
        for mpath, sd in saved.items():
            if mpath not in plan.adapters:  # modules_to_save
                model.get_submodule(mpath).load_state_dict(sd, strict=True)
    if nr is not None:
        from lorakit.lang.vocab import note_extension, put_new_rows

        put_new_rows(model, nr["n_old"], rows)
        note_extension(model, nr["n_old"], tokenizer_files=tok_files or None)
    if not trainable:
        for adapter in plan.adapters.values():
            adapter.requires_grad_(False)
    elif nr is not None:
        from lorakit.lang.vocab import trainable_new_rows

        trainable_new_rows(model, nr["n_old"])
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Copy saved tensors into the existing adapter `name` (e.g. resuming a checkpoint).

    New vocabulary rows in the file are copied into the (already resized) model too.
    """
    st = state(model)
    if name not in st.configs:
        raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(st.configs) or 'no adapters'}")
    path = Path(path)
    meta = read_config(path)[1] if (path / CONFIG_NAME).is_file() else {}
    nr = _new_rows_meta(meta, path)
    tensors = read_tensors(path)
    rows = _pop_rows(tensors, nr, path)
    if nr is not None and _check_rows(model, nr, rows, meta, path):
        raise AdapterFileError(f"{path}: the checkpoint holds {nr['n_new']} new vocabulary rows, but this model "
                               f"still has the base vocabulary of {nr['n_old']} rows; extend it first or use load()")
    existing = adapter_modules(model, name)
    plan = InjectionPlan(name, st.configs[name], existing)
    saved = _assign_tensors(model, plan, tensors, path / WEIGHTS_NAME)
    with torch.no_grad():
        for mpath, sd in saved.items():
            target = existing.get(mpath) or model.get_submodule(mpath)
            for k, t in sd.items():
                target.state_dict()[k].copy_(t)
    if nr is not None:
        from lorakit.lang.vocab import put_new_rows

        put_new_rows(model, nr["n_old"], rows)
    return model


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in adapter directory `path` (None when it holds none).

    Files recorded in `adapter_config.json` are checked against their sha256 first; for an
    adapter with new vocabulary rows the tokenizer must use exactly ids < n_old + n_new.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    _, meta = read_config(path)
    recorded = _read_tokenizer_files(path, meta)
    if not recorded and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: cannot load the tokenizer saved with the adapter: {e}") from None
    nr = _new_rows_meta(meta, path)
    if nr is not None:
        try:
            _check_tokenizer_fits(tok, nr["n_old"], nr["n_new"])
        except ConfigError as e:
            raise AdapterFileError(f"{path}: {e}") from None
    return tok


def _new_rows_meta(meta: dict, path: Path) -> dict | None:
    """The validated "new_rows" block of an adapter's lorakit metadata, or None."""
    nr = meta.get("new_rows")
    if nr is None:
        return None
    ok = isinstance(nr, dict) and all(
        isinstance(nr.get(k), int) and not isinstance(nr.get(k), bool) and nr[k] > 0 for k in ("n_old", "n_new"))
    if not ok:
        raise AdapterFileError(f"{path / CONFIG_NAME}: 'lorakit.new_rows' must hold positive ints n_old and n_new, "
                               f"found {nr!r}")
    return nr


def _pop_rows(tensors: dict, nr: dict | None, path: Path) -> dict[str, torch.Tensor]:
    """Remove the new-row tensors from `tensors` (a file without a "new_rows" record has none)."""
    prefix = PREFIX + NEW_ROWS_PREFIX
    rows = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
    if rows and nr is None:
        raise AdapterFileError(f"{path / WEIGHTS_NAME}: holds new vocabulary rows ({sorted(rows)}) but "
                               f"{CONFIG_NAME} has no 'lorakit.new_rows' record")
    return rows


def _check_rows(model: nn.Module, nr: dict, rows: dict, meta: dict, path: Path) -> bool:
    """Validate the saved rows against `model` (nothing changes); True when it must be resized."""
    from lorakit.lang.vocab import check_new_rows, embedding_rows

    n_old, n_new = nr["n_old"], nr["n_new"]
    file = path / WEIGHTS_NAME
    if "input_embeddings" not in rows:
        raise AdapterFileError(f"{file}: missing tensor {PREFIX}{NEW_ROWS_PREFIX}input_embeddings")
    if rows["input_embeddings"].shape[0] != n_new:
        raise AdapterFileError(f"{file}: {PREFIX}{NEW_ROWS_PREFIX}input_embeddings has "
                               f"{rows['input_embeddings'].shape[0]} rows, {CONFIG_NAME} says n_new={n_new}")
    try:
        have = embedding_rows(model)
    except ConfigError as e:
        raise AdapterFileError(f"{path}: the adapter adds vocabulary rows, but {e}") from None
    if have not in (n_old, n_old + n_new):
        raise AdapterFileError(
            f"{path}: wrong base vocabulary: the adapter extends a {n_old}-token vocabulary (base model "
            f"{meta.get('base_model')!r}) by {n_new} tokens, but this model's input embedding has {have} rows "
            f"(expected {n_old}, or {n_old + n_new} when already extended); load it onto the base model it was "
            "trained from")
    try:
        return check_new_rows(model, n_old, rows)
    except ConfigError as e:
        raise AdapterFileError(f"{file}: {e}") from None


def _check_shared_rows(model: nn.Module, nr: dict, rows: dict, name: str, path: Path) -> None:
    """Vocabulary rows belong to the model, not to one adapter: refuse to overwrite rows that
    other adapters on the model were trained with."""
    from lorakit.lang.vocab import new_rows_state

    others = sorted(n for n in state(model).configs if n != name)
    if not others:
        return
    current = new_rows_state(model, nr["n_old"])
    same = all(torch.equal(current[f"new_rows.{k}"], t.to(current[f"new_rows.{k}"].dtype)) for k, t in rows.items())
    if not same:
        raise AdapterFileError(
            f"{path}: this model already holds {nr['n_new']} new vocabulary rows that differ from the adapter's, "
            f"and adapters {others} use them; embedding rows are shared by every adapter of a model, so load this "
            "adapter onto a fresh copy of the base model")


def _resize_for_rows(model: nn.Module, nr: dict) -> None:
    from lorakit.lang.vocab import _embeddings, _resize

    try:
        emb, head, tied = _embeddings(model)
    except ConfigError as e:
        raise AdapterFileError(f"cannot add the adapter's {nr['n_new']} vocabulary rows: {e}") from None
    _resize(model, emb, head, tied, nr["n_old"] + nr["n_new"])


def _read_tokenizer_files(path: Path, meta: dict) -> dict[str, bytes]:
    """The tokenizer files recorded in `meta`, checked against their sha256."""
    rec = meta.get("tokenizer")
    if rec is None:
        return {}
    files = rec.get("files") if isinstance(rec, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise AdapterFileError(f"{path / CONFIG_NAME}: 'lorakit.tokenizer.files' must map file names to sha256 digests")
    out = {}
    for fname, digest in files.items():
        if fname not in TOKENIZER_FILES:
            raise AdapterFileError(f"{path / CONFIG_NAME}: {fname!r} is not a tokenizer file name lorakit writes")
        f = path / fname
        if not f.is_file():
            raise AdapterFileError(f"{f} is missing (the adapter was saved with its tokenizer)")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise AdapterFileError(f"{f} does not match the sha256 recorded in {CONFIG_NAME} (changed or corrupt)")
        out[fname] = data
    return out


def _assign_tensors(model, plan: InjectionPlan, tensors: dict, file: Path) -> dict[str, dict]:
    """Map file keys to planned adapters / modules_to_save; check names, shapes and dtypes.

    A shared tensor ("<PREFIX>lorakit_shared.<key>", stored once) goes to every adapter that
    holds `key` (`shared_names`); the returned per-module dicts are complete state dicts.
    """
    owners, users = {}, {}  # users: shared key -> [(module path, local name, expected tensor)]
    for p, a in plan.adapters.items():
        sd = a.state_dict()
        for local, skey in shared_names(a).items():
            users.setdefault(skey, []).append((p, local, sd.pop(local)))
        owners[p] = sd
    for p in modules_to_save_paths(model, plan.config):
        owners[p] = model.get_submodule(p).state_dict()
    by_len = sorted(owners, key=len, reverse=True)  # longest module path wins
    out: dict[str, dict] = {p: {} for p in owners}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if k.startswith(SHARED_PREFIX):
            skey = k[len(SHARED_PREFIX):]
            if skey not in users:
                raise AdapterFileError(f"{file}: unexpected shared tensor {key!r} (no adapter in the model uses it)")
            for p, local, expected in users[skey]:
                out[p][local] = _checked(t, expected, key, file)
            continue
        owner = next((p for p in by_len if k.startswith(p + ".")), None)
        local = k[len(owner) + 1:] if owner else None
        if owner is None or local not in owners[owner]:
            raise AdapterFileError(f"{file}: unexpected tensor {key!r} (no matching adapter parameter in the model)")
        out[owner][local] = _checked(t, owners[owner][local], key, file)
    for skey, holders in users.items():
        if any(local not in out[p] for p, local, _ in holders):
            raise AdapterFileError(f"{file}: missing shared tensor {PREFIX}{SHARED_PREFIX}{skey} "
                                   f"(used by {holders[0][0]} and {len(holders) - 1} more)")
    for p in owners:
        missing = sorted(set(owners[p]) - set(out[p]))
        if missing:
            raise AdapterFileError(f"{file}: missing tensor {PREFIX}{p}.{missing[0]} (and {len(missing) - 1} more)")
    return out


def _checked(t: torch.Tensor, expected: torch.Tensor, key: str, file: Path) -> torch.Tensor:
    """`t` in the expected dtype, after checking its shape, kind of dtype and finiteness."""
    if tuple(t.shape) != tuple(expected.shape):
        raise AdapterFileError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(expected.shape)}")
    if t.dtype.is_floating_point != expected.dtype.is_floating_point:
        raise AdapterFileError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected {expected.dtype}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise AdapterFileError(f"{file}: tensor {key!r} contains NaN or inf")
    return t.to(expected.dtype)


def export_peft(model: nn.Module, path: str | os.PathLike, name: str = "default", rank: int | None = None) -> Path:
    """Write adapter `name` of any method as a plain PEFT LoRA adapter via `to_lora(rank)`.

    Exact for methods whose update is low-rank (LoRA and its relatives); methods with a
    full-rank update are truncated to `rank` (best Frobenius approximation).
    """
    st = state(model)
    if name not in st.configs:
        raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(st.configs) or 'no adapters'}")
    inserted = [p for p, layer in adapted_layers(model).items() if isinstance(layer, InsertSite) and name in layer.adapters]
    if inserted:
        raise ConfigError(
            f"adapter {name!r} (method {st.configs[name].method!r}) inserts new nonlinear modules ({len(inserted)} "
            f"sites, e.g. {inserted[0]}); PEFT's LoRA format cannot express it. Save it with lorakit.save instead.")
    tensors, ranks, leaf_kinds = {}, {}, {}
    for p, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        if not hasattr(adapter, "to_lora"):
            raise ConfigError(f"method {st.configs[name].method!r} cannot be exported to LoRA (no to_lora)")
        a, b, scale = adapter.to_lora(rank)
        a, b = a.detach().float(), (b.detach() * scale).float()  # fold the scale into B
        if layer.kind == "embedding":  # PEFT stores the table update transposed
            tensors[f"{PREFIX}{p}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"{PREFIX}{p}.lora_embedding_B"] = a.T.contiguous()
        else:
            tensors[f"{PREFIX}{p}.lora_A.weight"] = a.contiguous()
            tensors[f"{PREFIX}{p}.lora_B.weight"] = b.contiguous()
        ranks[p] = a.shape[0]
        leaf_kinds[p] = isinstance(layer, AdaptedConv1D)
    r = max(ranks.values())
    # exact per-module ranks; alpha == r everywhere so PEFT's scale alpha/r is 1
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    cfg = {
        "peft_type": "LORA", "task_type": _task_type(model), "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "fan_in_fan_out": any(leaf_kinds.values()), "target_modules": sorted(ranks),
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": st.configs[name].modules_to_save,
        "base_model_name_or_path": None,
    }
    for mp in modules_to_save_paths(model, st.configs[name]):
        for k, t in model.get_submodule(mp).state_dict().items():
            tensors[f"{PREFIX}{mp}.{k}"] = t.detach().cpu().contiguous().clone()
    files = {CONFIG_NAME: (json.dumps(cfg, indent=2) + "\n").encode(), WEIGHTS_NAME: st_save(tensors, {"format": "pt"})}
    return write_dir_atomic(Path(path), files)


def adapter_info(path: str | os.PathLike) -> dict:
    """Summary of a saved adapter without a model: method, targets, ranks, parameter count."""
    cfg, meta = read_config(path)
    tensors = read_tensors(path)
    info = {
        "path": str(path),
        "method": cfg.method,
        "written_by": "lorakit" if meta else "peft",
        "target": cfg.target,
        "modules": len(meta.get("adapted_modules", []))
        or sum(k.endswith(("lora_A.weight", "lora_embedding_A")) for k in tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "bytes": int(sum(t.numel() * t.element_size() for t in tensors.values())),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "base_model": meta.get("base_model"),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("method",)},
    }
    if meta.get("new_rows"):
        nr = meta["new_rows"]
        info["new_rows"] = {k: nr.get(k) for k in ("n_old", "n_new", "tied")}
    if meta.get("tokenizer"):
        info["tokenizer"] = sorted(meta["tokenizer"].get("files", {}))
    return info


__all__ = ["adapter_info", "config_hash_at_vocab", "load", "load_tokenizer", "load_weights", "read_config",
           "read_tensors", "save", "write_dir_atomic"]
