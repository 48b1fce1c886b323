"""AdapterPool: adapters loaded on demand from a directory, held as plain LoRA factors.

S-LoRA (arXiv:2311.03285) keeps every adapter on host storage and only the ones that queued
or running requests need in memory. This pool is that host-side layer:

    directory/
      <name>/adapter_config.json + adapter_model.safetensors   (lorakit- or PEFT-written)

`get(name)` returns a `LoadedAdapter` whose `factors[path] = (A (r, d_in), B·s (d_out, r))`
for every adapted linear module, so that the served update is

    Δy = (x Aᵀ)(B·s)ᵀ          (the scale s is folded into B once, at load time)

Plain LoRA files are read directly (A, B, s from the config). Any other method is rebuilt on
the bound base model's layers and converted with its `to_lora(rank)` (exact where the update
is low-rank). The engine copies these factors into its stacked device slots; the pool never
does math on requests.

Memory: a byte budget over the factors held; least-recently-used adapters are evicted first;
pinned adapters are never evicted. Loading happens outside the pool lock and under a lock
per adapter, so a slow or failing load of one adapter never blocks requests for another.
`prefetch(names)` loads in background threads (the engine calls it when a request is queued).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.core.adapter import check_adapter_name
from lorakit.core.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_config, read_tensors
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, LorakitError

_VERSION = itertools.count(1)  # every load gets a new version: slots key on (name, version)


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter as plain LoRA factors, ready to be copied into serving slots.

    factors: module path -> (A (r, d_in), B·scale (d_out, r)); r may differ per module.
    rank: the largest r over modules (the engine pads every module to its rank group).
    """

    name: str
    method: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    nbytes: int
    base_model: str | None = None
    version: int = field(default_factory=lambda: next(_VERSION))


@dataclass(frozen=True)
class PoolStats:
    hits: int
    misses: int
    evictions: int
    failed_loads: int
    bytes: int
    budget_bytes: int
    adapters: tuple[str, ...]  # resident, least recently used first
    pinned: tuple[str, ...]


class AdapterPool:
    """Adapters of `directory`, loaded on demand under a byte budget with LRU eviction.

    directory: holds one sub-directory per adapter; the adapter's name is the directory name.
    budget_bytes: most bytes of factors held at once (pinned adapters included).
    model: the base model (optional here; `Engine` binds it). Needed to convert non-LoRA
        methods (their update may depend on W0) and to check adapters against the base
        (module names, shapes, base-config hash) before they enter the pool.
    dtype: dtype of the held factors (default: the bound model's dtype, else float32).
    convert_rank: rank passed to `to_lora` for non-LoRA methods (None: the method's exact rank).
    check_base: refuse adapters whose recorded base-config hash differs from the model's.
    loader_threads: background threads used by `prefetch`.
    """

    def __init__(
        self,
        directory,
        budget_bytes: int = 1 << 30,
        *,
        model: nn.Module | None = None,
        dtype: torch.dtype | None = None,
        convert_rank: int | None = None,
        check_base: bool = True,
        loader_threads: int = 2,
    ):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise AdapterFileError(f"adapter directory {self.directory} does not exist or is not a directory")
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ConfigError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
        if convert_rank is not None and (isinstance(convert_rank, bool) or not isinstance(convert_rank, int)
                                         or convert_rank <= 0):
            raise ConfigError(f"convert_rank must be a positive integer or None, got {convert_rank!r}")
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.convert_rank = convert_rank
        self.check_base = check_base
        self.model: nn.Module | None = None
        self._lock = threading.Lock()  # guards the fields below; never held during file IO
        self._loaded_cv = threading.Condition(self._lock)  # notified when a load finishes
        self._cache: OrderedDict[str, LoadedAdapter] = OrderedDict()  # LRU first
        self._pinned: set[str] = set()
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._failed = 0
        self._adapter_locks: dict[str, threading.Lock] = {}
        self._inflight: set[str] = set()
        self._errors: dict[str, LorakitError] = {}
        # Loader threads live only while there is something to load. A thread that has run
        # torch ops keeps an OpenMP team for as long as it lives, and on CPU an idle extra team
        # slowed every later op of the serving thread ~3x (measured: 90 -> 310 ms per decode
        # step); a thread that exits takes its team with it.
        self._max_loaders = max(1, loader_threads)
        self._queue: deque[str] = deque()
        self._loaders: set[threading.Thread] = set()
        self._closed = False
        if model is not None:
            self.bind(model)

    # -- names ---------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The directory of adapter `name`; rejects names that could leave `directory`."""
        check_adapter_name(name)  # no '/', '..', '.', absolute paths or empty names
        root = self.directory.resolve()
        path = (self.directory / name).resolve()
        if path.parent != root:  # e.g. a symlink that points elsewhere
            raise AdapterError(f"adapter {name!r} resolves to {path}, outside the adapter directory {root}")
        return path

    def available(self) -> list[str]:
        """Names of the adapter directories (with a config file) found in `directory`."""
        out = []
        for p in sorted(self.directory.iterdir()):
            if p.is_dir() and (p / CONFIG_NAME).is_file():
                try:
                    self.path_of(p.name)
                except LorakitError:
                    continue
                out.append(p.name)
        return out

    # -- binding -------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Attach the base model used for conversion and validation (done by `Engine`)."""
        if self.model is not None and self.model is not model:
            raise ConfigError("this AdapterPool is already bound to another model")
        self.model = model
        if self.dtype is None:
            p = next(model.parameters(), None)
            self.dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32

    # -- lookup --------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._cache

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def peek(self, name: str) -> LoadedAdapter | None:
        """The adapter if it is resident (a hit; marks it recently used), else None. Never blocks on IO."""
        with self._lock:
            got = self._cache.get(name)
            if got is not None:
                self._cache.move_to_end(name)
                self._hits += 1
            return got

    def get(self, name: str) -> LoadedAdapter:
        """The adapter, loading it (in this thread) when it is not resident."""
        got = self.peek(name)
        if got is not None:
            return got
        path = self.path_of(name)
        with self._adapter_lock(name):  # one load per adapter at a time; other adapters unaffected
            got = self.peek(name)  # another thread may have loaded it while we waited
            if got is not None:
                return got
            return self._load_and_admit(name, path)

    def state(self, name: str) -> str:
        """'ready' (resident), 'loading' (a prefetch is running), 'failed' (the last prefetch
        failed; see `take_error`) or 'absent'."""
        with self._lock:
            if name in self._cache:
                return "ready"
            if name in self._inflight:
                return "loading"
            return "failed" if name in self._errors else "absent"

    def take_error(self, name: str) -> LorakitError | None:
        """The error of the last failed prefetch of `name` (cleared: a later prefetch retries)."""
        with self._lock:
            return self._errors.pop(name, None)

    def prefetch(self, names) -> None:
        """Load `names` in background threads (names already resident or loading are skipped).

        Invalid names raise here; load errors are kept for `state`/`take_error`.
        """
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self.path_of(name)
        for name in dict.fromkeys(names):
            with self._lock:
                if name in self._cache or name in self._inflight:
                    continue
                self._inflight.add(name)
                self._errors.pop(name, None)
            self._submit(name)

    def wait_for_load(self, timeout: float) -> None:
        """Block until some load finishes (or `timeout` seconds pass)."""
        with self._loaded_cv:
            if self._inflight:
                self._loaded_cv.wait(timeout)

    # -- pinning / eviction --------------------------------------------------------------
    def pin(self, name: str) -> LoadedAdapter:
        """Load `name` and keep it resident until `unpin` (it counts against the budget)."""
        while True:
            got = self.get(name)
            with self._lock:
                if name in self._cache:  # not evicted between get() and here
                    pinned_bytes = sum(self._cache[n].nbytes for n in self._pinned | {name})
                    if pinned_bytes > self.budget_bytes:
                        raise AdapterError(
                            f"cannot pin {name!r}: pinned adapters would need {pinned_bytes} bytes, "
                            f"over the pool budget of {self.budget_bytes}"
                        )
                    self._pinned.add(name)
                    return got

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(name)

    def evict(self, name: str) -> bool:
        """Drop `name` from memory now (pinned adapters too: unpins them). True if it was resident."""
        with self._lock:
            self._pinned.discard(name)
            got = self._cache.pop(name, None)
            if got is not None:
                self._bytes -= got.nbytes
                self._evictions += 1
            return got is not None

    @property
    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(self._hits, self._misses, self._evictions, self._failed, self._bytes,
                             self.budget_bytes, tuple(self._cache), tuple(sorted(self._pinned)))

    def close(self) -> None:
        """Stop the loader threads (pending prefetches are cancelled; a running load finishes)."""
        with self._loaded_cv:
            self._closed = True
            for name in self._queue:
                self._inflight.discard(name)
            self._queue.clear()
            self._loaded_cv.notify_all()
            loaders = list(self._loaders)
        for t in loaders:
            t.join()

    def _submit(self, name: str) -> None:
        with self._lock:
            if self._closed:
                self._inflight.discard(name)
                return
            self._queue.append(name)
            if len(self._loaders) < self._max_loaders:
                t = threading.Thread(target=self._loader, name="lorakit-adapter-loader", daemon=True)
                self._loaders.add(t)
                t.start()

    def _loader(self) -> None:
        """Load queued names until the queue is empty, then exit."""
        me = threading.current_thread()
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    self._loaders.discard(me)
                    return
                name = self._queue.popleft()
            self._prefetch_one(name)

    # -- internals -----------------------------------------------------------------------
    def _adapter_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._adapter_locks.setdefault(name, threading.Lock())

    def _prefetch_one(self, name: str) -> None:
        try:
            self.get(name)
        except LorakitError as e:
            with self._lock:
                self._errors[name] = e
        except Exception as e:  # noqa: BLE001 -- a bug must reach the waiting request, not die in the thread
            with self._lock:
                self._errors[name] = AdapterFileError(f"adapter {name!r} failed to load: {type(e).__name__}: {e}")
        finally:
            with self._loaded_cv:
                self._inflight.discard(name)
                self._loaded_cv.notify_all()

    def _load_and_admit(self, name: str, path: Path) -> LoadedAdapter:
        with self._lock:
            self._misses += 1
        try:
            loaded = self._read(name, path)
        except LorakitError:
            with self._lock:
                self._failed += 1
            raise
        with self._lock:
            self._make_room(name, loaded.nbytes)
            self._cache[name] = loaded
            self._bytes += loaded.nbytes
            self._errors.pop(name, None)  # an older failed prefetch is stale now
        return loaded

    def _make_room(self, name: str, nbytes: int) -> None:
        """Evict least-recently-used unpinned adapters until `nbytes` fit (lock held)."""
        pinned = sum(self._cache[n].nbytes for n in self._pinned if n in self._cache)
        if pinned + nbytes > self.budget_bytes:
            raise AdapterError(
                f"adapter {name!r} needs {nbytes} bytes but the pool budget is {self.budget_bytes} "
                f"with {pinned} bytes pinned ({sorted(self._pinned)}); raise budget_bytes or unpin adapters"
            )
        for victim in list(self._cache):
            if self._bytes + nbytes <= self.budget_bytes:
                break
            if victim in self._pinned:
                continue
            self._bytes -= self._cache.pop(victim).nbytes
            self._evictions += 1

    def _read(self, name: str, path: Path) -> LoadedAdapter:
        """Parse and validate one adapter directory; never touches pool state."""
        if not path.is_dir():
            raise AdapterError(
                f"unknown adapter {name!r}: no directory {path}; available: {self.available() or 'none'}"
            )
        cfg, meta = read_config(path)
        if cfg.modules_to_save:
            raise ConfigError(
                f"{path / CONFIG_NAME}: adapter {name!r} trains whole modules {cfg.modules_to_save} "
                "(modules_to_save); batched serving supports only low-rank updates of linear layers"
            )
        if self.check_base and self.model is not None and meta.get("base_config_hash"):
            from lorakit.models import config_hash

            if config_hash(self.model) != meta["base_config_hash"]:
                raise AdapterFileError(
                    f"{path / CONFIG_NAME}: adapter {name!r} was trained on base model {meta.get('base_model')!r}, "
                    "whose config differs from the served model's (config hash mismatch)"
                )
        tensors = read_tensors(path)
        if cfg.method == "lora":
            factors = _lora_factors(cfg, tensors, path / WEIGHTS_NAME)
        else:
            factors = self._convert(cfg, meta, tensors, path)
        dtype = self.dtype or torch.float32
        factors = {p: (a.detach().to("cpu", dtype).contiguous(), b.detach().to("cpu", dtype).contiguous())
                   for p, (a, b) in factors.items()}
        if not factors:
            raise AdapterFileError(f"{path / WEIGHTS_NAME}: adapter {name!r} holds no LoRA tensors")
        if self.model is not None:
            self._check_against_model(name, factors)
        for p, (a, b) in factors.items():
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterFileError(f"{path / WEIGHTS_NAME}: adapter {name!r} has NaN or inf values in {p!r}")
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())
        rank = max(a.shape[0] for a, _ in factors.values())
        return LoadedAdapter(name, cfg.method, factors, rank, nbytes, meta.get("base_model"))

    def _convert(self, cfg, meta: dict, tensors: dict, path: Path) -> dict:
        """Rebuild a non-LoRA adapter on the base layers and take its `to_lora` factors."""
        from lorakit.core.inject import InjectionPlan
        from lorakit.core.io import _assign_tensors
        from lorakit.core.registry import get_method

        if self.model is None:
            raise ConfigError(
                f"{path}: converting a {cfg.method!r} adapter to LoRA needs the base model; "
                "bind one with AdapterPool(..., model=...) or pool.bind(model)"
            )
        spec = get_method(cfg.method)
        if not hasattr(spec.adapter_cls, "to_lora"):
            raise ConfigError(f"{path}: method {cfg.method!r} has no to_lora, so it cannot be served as LoRA")
        paths = meta.get("adapted_modules")
        if not paths:
            raise AdapterFileError(f"{path / CONFIG_NAME}: no 'adapted_modules' recorded for a {cfg.method!r} adapter")
        adapters = {}
        for p in paths:
            wrapper = _linear_spec_wrapper(self.model, p, path)
            lspec = wrapper.spec(p)
            if lspec.kind not in spec.adapter_cls.supports:
                raise ConfigError(f"{path}: method {cfg.method!r} cannot adapt {lspec.kind} layer {p!r}")
            adapters[p] = spec.adapter_cls(lspec, cfg).eval()
        plan = InjectionPlan("serve", cfg, adapters)
        saved = _assign_tensors(self.model, plan, tensors, path / WEIGHTS_NAME)  # names, shapes, finiteness
        out = {}
        with torch.no_grad():
            for p, adapter in adapters.items():
                adapter.load_state_dict(saved[p], strict=True)
                a, b, scale = adapter.to_lora(self.convert_rank)
                out[p] = (a, b * scale)
        return out

    def _check_against_model(self, name: str, factors: dict) -> None:
        for p, (a, b) in factors.items():
            base = _unwrap(_submodule(self.model, p, name))
            shape = _linear_shape(base)
            if shape is None:
                raise AdapterFileError(f"adapter {name!r} adapts {p!r}, which is not a linear layer of the model")
            d_out, d_in = shape
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise AdapterFileError(
                    f"adapter {name!r}: {p!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the model's layer "
                    f"maps {d_in} -> {d_out}"
                )


# -- helpers ------------------------------------------------------------------------------
def _lora_factors(cfg, tensors: dict, file: Path) -> dict:
    """(A, B·scale) per module straight from a LoRA file (lorakit- or PEFT-written)."""
    a_suffix, b_suffix = ".lora_A.weight", ".lora_B.weight"
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seen = set()
    for key in tensors:
        k = key.removeprefix(PREFIX)
        if k.endswith(("lora_embedding_A", "lora_embedding_B")):
            raise ConfigError(f"{file}: {key!r} is an embedding LoRA; batched serving adapts linear layers only")
        if k.endswith(a_suffix):
            mpath = k[: -len(a_suffix)]
        elif k.endswith(b_suffix):
            mpath = k[: -len(b_suffix)]
        else:
            raise AdapterFileError(f"{file}: unexpected tensor {key!r} in a LoRA adapter")
        seen.add(mpath)
    for mpath in sorted(seen):
        a = tensors.get(f"{PREFIX}{mpath}{a_suffix}", tensors.get(f"{mpath}{a_suffix}"))
        b = tensors.get(f"{PREFIX}{mpath}{b_suffix}", tensors.get(f"{mpath}{b_suffix}"))
        if a is None or b is None:
            which = "lora_A" if a is None else "lora_B"
            raise AdapterFileError(f"{file}: module {mpath!r} has no {which}.weight tensor")
        r, alpha = cfg.rank_alpha(mpath)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFileError(
                f"{file}: module {mpath!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"expected (r, d_in) and (d_out, r) with r={r}"
            )
        if not a.is_floating_point() or not b.is_floating_point():
            raise AdapterFileError(f"{file}: module {mpath!r} has non-float LoRA tensors ({a.dtype}, {b.dtype})")
        scale = alpha / (math.sqrt(r) if cfg.rslora else r)
        out[mpath] = (a, b.float() * scale)  # fold s into B once (in fp32; cast to the pool dtype later)
    return out


def _submodule(model: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise AdapterFileError(f"adapter {name!r} adapts {path!r}, which does not exist in the model") from None


def _unwrap(m: nn.Module) -> nn.Module:
    """The base layer inside a lorakit wrapper (AdaptedLayer or the engine's ServingLinear)."""
    from lorakit.core.layer import AdaptedLayer

    while isinstance(m, AdaptedLayer) or getattr(m, "is_serving_wrapper", False):
        m = m.base
    return m


def _linear_shape(m: nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of an nn.Linear or GPT-2 Conv1D (weight stored (d_in, d_out)); None otherwise."""
    from lorakit.core.layer import AdaptedConv1D, wrapper_for

    cls = wrapper_for(m)
    if cls is None or cls.kind != "linear":
        return None
    d0, d1 = m.weight.shape
    return (d1, d0) if cls is AdaptedConv1D else (d0, d1)


def _linear_spec_wrapper(model: nn.Module, mpath: str, path: Path):
    from lorakit.core.layer import wrapper_for

    base = _unwrap(_submodule(model, mpath, path.name))
    cls = wrapper_for(base)
    if cls is None:
        raise AdapterFileError(f"{path}: {mpath!r} is not an adaptable layer of the model")
    return cls(base)  # a throwaway wrapper: only its spec() is used; the model is not modified


__all__ = ["AdapterPool", "LoadedAdapter", "PoolStats"]
