"""Engine: one base model, many LoRA adapters, one continuously batched generation loop.

Batched LoRA (S-LoRA arXiv:2311.03285; vLLM's punica wrapper). Every served linear layer is
replaced by a `ServingLinear` that computes, for a batch whose row i uses adapter a(i),

    y_i = W0 x_i + (x_i A_{a(i)}ᵀ)(B_{a(i)} s_{a(i)})ᵀ          (row i with no adapter: y_i = W0 x_i)

as one gathered batched matmul per rank group:

    A_g: (slots, d_in, r_g)  B_g: (slots, r_g, d_out)          stacked factors of the group
    rows_g, slots_g                                            rows of the batch in group g, their slots
    y[rows_g] += bmm(bmm(x[rows_g], A_g[slots_g]), B_g[slots_g])   x: (n, L, d_in) -> (n, L, r_g) -> (n, L, d_out)

Rank groups: an adapter's rank r (its largest per-module rank) is padded up to the next power
of two (`rank_groups="pow2"`, the default: at most 2x padding, and a handful of groups) or
grouped exactly (`"exact"`: no padding, one group per distinct rank), or padded to one fixed
rank R (`rank_groups=R`: a single group, so one gathered matmul pair per layer whatever the
mix of ranks; fewer kernel launches for more FLOPs, the better trade on a GPU where decoding
a small model is launch-bound; an adapter of rank > R is refused). Padded rank columns are
zeros, so they add exactly nothing. Modules an adapter does not adapt hold zeros in its slot.
Nothing is merged into W0 and there is no Python loop over requests in the math: the adapter
of each row is resolved to (group, slot) once per batch composition (not per layer call);
the only per-layer Python loop is over the rank groups present in the batch. The running
batch is kept ordered by rank group (prefills sort their rows, joining rows are placed at
their group's end), so each group's rows are one contiguous range: x[rows_g] is a view and
the update is added in place, with no index copies per layer.

Decode steps (one token per row; `decode_lora="concat"`, taken by "auto" for small batches)
use the batch's distinct adapters side by side instead, at their own ranks, with no padding
and no rank groups:

    A_cat: (d_in, w)  B_cat: (w, d_out)     adapters u of the batch in column ranges [c_u, c_u + r_u)
    y += ((x A_cat) ⊙ M) B_cat              M[i, j] = 1 iff column j belongs to row i's adapter

(a masked fill, so another adapter's column never reaches row i, even as inf). Decoding a
small batch is memory-bound: this reads each distinct adapter once per step however many
rows share it (the gathered form reads one copy per row), for B·w instead of Σ_i r_i
multiply-adds, which costs nothing while the weights' bytes dominate. The column buffers
outlive batch compositions: an adapter that stays in the batch is not copied again, one that
joins takes the columns of one that left (first fit) or the end, and the buffers are
repacked when more than a quarter of the used columns belong to adapters that left. This is
the role of punica's / S-LoRA's segmented gather kernels (SGMV, MBGMV), in two dense matmuls.

Scheduling (continuous batching). Requests wait in a queue until their adapter is resident in
the `AdapterPool` (loaded by background threads; a request whose adapter is still loading
never holds up requests for other adapters) and a slot is free. Each `step()`:
  1. decodes one token for every running row (one forward over the whole batch), and drops
     rows that finished (eos / stop token / max_new_tokens / cancelled);
  2. admits waiting requests up to `max_batch` rows, prefills them together (one forward,
     left-padded) which yields their first token, and appends them to the running batch.
The batch KV cache is a transformers `DynamicCache` whose rows are left-padded to a common
length; the 2-D attention mask hides the padding and each row gets its own position ids, so
a row's tokens do not depend on which other rows share the batch. Joining rows are padded
and concatenated, leaving rows are index-selected out, and all-padding columns on the left
are trimmed. `policy="static"` admits only into an empty batch (classic static batching).

transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`,
paged attention) was considered: it packs all requests into one flat row with no per-request
hook reaching the model's layers, so a per-token adapter index would need its private batch
preparation classes patched (and kept in sync with CUDA-graph static buffers); sampling
settings are per manager, not per request. Hence this small scheduler over the public
`DynamicCache` + attention-mask API.
"""

from __future__ import annotations

import inspect
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import AdapterConfig, check_adapter_name
from lorakit.errors import AdapterError, ConfigError, LorakitError
from lorakit.serve.cache import AdapterPool, LoadedAdapter, _linear_shape

# -- requests and outputs ------------------------------------------------------------------


@dataclass
class Request:
    """One generation request.

    prompt: token ids (list or 1-D tensor), or text when the engine has a tokenizer.
    adapter: adapter name in the pool; None serves the base model.
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
        restricted to the top_k tokens (0 = all) and the top_p nucleus (1.0 = all).
    seed: seeds this request's own sampling generator (reproducible whatever the batch).
    stop_token_ids: generation ends after any of these (None: the engine's eos ids).
    """

    prompt: Sequence[int] | torch.Tensor | str
    adapter: str | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        if self.adapter is not None:
            check_adapter_name(self.adapter)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            0 <= self.temperature < float("inf")
        ):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token (or the end of a request).

    finish_reason: None while running; "stop" (a stop token), "length" (max_new_tokens or the
    model's context), "cancelled" or "error" (then `error` says why and `token` is None).
    """

    request_id: str
    token: int | None
    index: int
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Result:
    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    tokens: list[int]
    finish_reason: str | None
    error: str | None = None
    text: str | None = None


@dataclass(eq=False)
class _Seq:
    """Engine-side state of one request."""

    rid: str
    req: Request
    prompt: list[int]
    stop: frozenset[int]
    on_token: Callable[[TokenEvent], None] | None
    collect: bool
    tokens: list[int] = field(default_factory=list)
    loaded: LoadedAdapter | None = None  # held from the first time it is found resident until admission
    slot: tuple[int, int] | None = None  # (rank group, slot) while admitted
    generator: torch.Generator | None = None
    cancelled: bool = False
    overtaken: int = 0  # admissions of later requests while this one waited (schedule="affinity")


# -- batched LoRA layer ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How the current batch maps to slots; built once per batch composition."""

    batch: int
    # (rank group, rows of the batch: None = all, a slice when contiguous, else an index
    # tensor; their slots, modules the group adapts)
    groups: tuple[tuple[int, slice | torch.Tensor | None, torch.Tensor, frozenset[str]], ...]
    # a "concat" decode plan (one token per row): the first `cat_width` columns of every
    # layer's concat buffers are used; cat_off (B, cat_width) bool marks, per row, the columns
    # that are not its adapter's; cat_modules: layers any adapter of the batch adapts
    cat_width: int = 0
    cat_off: torch.Tensor | None = None
    cat_modules: frozenset[str] = frozenset()
    # a gathered decode plan serves many steps: layers keep its gathered factors; a prefill
    # plan serves one forward, so they are dropped after use
    reuse: bool = False


class _Routing:
    """Shared by every ServingLinear of one engine; the engine sets `plan` around forwards."""

    plan: _Plan | None = None


class ServingLinear(nn.Module):
    """y = base(x) + per-row gathered LoRA over stacked slot factors (see the module docstring).

    a[g]: (slots, d_in, r_g) = A padded to r_g and transposed; b[g]: (slots, r_g, d_out) = (B·s)ᵀ.
    Plain tensor attributes, not parameters: they never appear in the model's state_dict.
    """

    is_serving_wrapper = True

    def __init__(self, base: nn.Module, path: str, routing: _Routing):
        super().__init__()
        self.base = base
        self.path = path
        self.out_features, self.in_features = _linear_shape(base)
        self.routing = routing
        self.a: dict[int, torch.Tensor] = {}
        self.b: dict[int, torch.Tensor] = {}
        # the per-row factors gathered for the last reusable plan: a gathered decode plan lives
        # for many steps (until a request joins or leaves), so each step skips the gather copies
        self._gathered: tuple[_Plan | None, dict] = (None, {})
        # concat buffers (d_in, C), (C, d_out): adapters side by side, columns managed by the engine
        self.ca: torch.Tensor | None = None
        self.cb: torch.Tensor | None = None

    def _factors(self, plan: _Plan, g: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not plan.reuse:  # each layer runs once per prefill: nothing to keep
            self._gathered = (None, {})
            return self.a[g].index_select(0, slots), self.b[g].index_select(0, slots)
        cached_plan, cache = self._gathered
        if cached_plan is not plan:
            cache = {}
            self._gathered = (plan, cache)
        if g not in cache:
            cache[g] = (self.a[g].index_select(0, slots), self.b[g].index_select(0, slots))
        return cache[g]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        plan = self.routing.plan
        if plan is None:
            return out
        flat = x.dim() == 2  # (B, d_in) -> (B, 1, d_in)
        if flat:
            x, out = x.unsqueeze(1), out.unsqueeze(1)
        if x.shape[0] != plan.batch:
            raise RuntimeError(f"{self.path}: batch has {x.shape[0]} rows but the routing plan has {plan.batch}")
        if plan.cat_off is not None:  # a decode step: one token per row
            if x.shape[1] != 1:
                raise RuntimeError(f"{self.path}: a decode plan got {x.shape[1]} tokens per row")
            if self.path in plan.cat_modules:
                w = plan.cat_width
                a, b = self.ca[:, :w], self.cb[:w]  # (d_in, w), (w, d_out)
                h = torch.mm(x[:, 0].to(a.dtype), a).masked_fill_(plan.cat_off, 0)  # (B, w): own columns only
                if out.dtype == b.dtype:
                    out[:, 0].addmm_(h, b)
                else:
                    out[:, 0].add_(torch.mm(h, b).to(out.dtype))
            return out.squeeze(1) if flat else out
        for g, rows, slots, modules in plan.groups:
            if self.path not in modules:  # no adapter of this group adapts this layer
                continue
            a, b = self._factors(plan, g, slots)  # (n, d_in, r_g), (n, r_g, d_out)
            if rows is None or isinstance(rows, slice):  # all rows / a contiguous range: views
                xs = x if rows is None else x[rows]  # (n, L, d_in)
                y = torch.bmm(torch.bmm(xs.to(a.dtype), a), b)  # (n, L, r_g) -> (n, L, d_out)
                (out if rows is None else out[rows]).add_(y.to(out.dtype))  # out: the base's fresh output
            else:
                y = torch.bmm(torch.bmm(x.index_select(0, rows).to(a.dtype), a), b)
                out.index_add_(0, rows, y.to(out.dtype))
        return out.squeeze(1) if flat else out


# -- slots ---------------------------------------------------------------------------------


class _SlotGroup:
    """Slots of one rank group: which adapter version each holds, and how many rows use it."""

    def __init__(self, rank: int):
        self.rank = rank
        self.cap = 0
        self.keys: list[tuple[str, int] | None] = []  # (adapter name, load version)
        self.ranks: list[int] = []  # the adapter's own rank (<= self.rank)
        self.modules: list[frozenset[str]] = []
        self.refs: list[int] = []
        self.last_used: list[int] = []
        self.index: dict[tuple[str, int], int] = {}


# -- the engine ----------------------------------------------------------------------------


class Engine:
    """Serve one base model with many adapters from `pool`, batched continuously.

    model: a causal LM (transformers) with a `DynamicCache` of full-attention layers. The
        engine owns it: target linears are replaced by `ServingLinear` (undo with `close()`).
    tokenizer: optional; used for text prompts, result text and default eos/pad ids.
    pool: the `AdapterPool` adapters are read from (bound to `model`); None = base model only.
    max_batch: most rows decoded together.
    target: linears that can carry adapters: "all-linear" (default), a module name / list /
        regex as in `lorakit.inject`, or "adapters" (the union of the pool's adapters' modules).
    rank_groups: "pow2" (pad each adapter's rank to the next power of two), "exact", or an
        int R (pad every adapter to rank R: one group; adapters of rank > R are refused).
    max_slots: slots per rank group (adapters resident on the device at once; default
        2·max_batch, so recently used adapters stay resident between requests).
    policy: "continuous" (join/leave between decode steps) or "static".
    decode_lora: how decode steps compute the LoRA part: "gathered" (per-row factors, grouped
        by rank, as prefill does), "concat" (the batch's distinct adapters side by side, each
        read once per step), or "auto" (default: "concat" on a GPU; on a CPU "concat" unless
        it costs more than `CONCAT_MAX_BLOWUP` times the gathered form's multiply-adds).
    schedule: admission order of waiting requests: "affinity" (default: among the first
        max_batch waiting, those whose adapter is already running go first; none is overtaken
        more than max_batch times) or "fcfs" (strict arrival order).
    """

    CONCAT_MAX_BLOWUP = 16  # decode_lora="auto": most B·R_tot / Σ_i r_i multiply-adds to take "concat"

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        pool: AdapterPool | None = None,
        *,
        max_batch: int = 8,
        target: str | list[str] = "all-linear",
        rank_groups: str | int = "pow2",
        max_slots: int | None = None,
        policy: str = "continuous",
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        decode_lora: str = "auto",
        schedule: str = "affinity",
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        fixed = isinstance(rank_groups, int) and not isinstance(rank_groups, bool)
        if not (fixed and rank_groups >= 1) and rank_groups not in ("pow2", "exact"):
            raise ConfigError(f"rank_groups must be 'pow2', 'exact' or a positive int rank, got {rank_groups!r}")
        if policy not in ("continuous", "static"):
            raise ConfigError(f"policy must be 'continuous' or 'static', got {policy!r}")
        if decode_lora not in ("auto", "concat", "gathered"):
            raise ConfigError(f"decode_lora must be 'auto', 'concat' or 'gathered', got {decode_lora!r}")
        if schedule not in ("fcfs", "affinity"):
            raise ConfigError(f"schedule must be 'fcfs' or 'affinity', got {schedule!r}")
        max_slots = 2 * max_batch if max_slots is None else max_slots
        if isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < max_batch:
            raise ConfigError(f"max_slots must be an integer >= max_batch ({max_batch}), got {max_slots!r}")
        from lorakit.core.inject import adapted_layers

        if adapted_layers(model):
            raise ConfigError("the model already carries lorakit adapters; serve a clean base model (lorakit.eject)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_batch = max_batch
        self.rank_groups = rank_groups
        self.max_slots = max_slots
        self.policy = policy
        self.decode_lora = decode_lora
        self.schedule = schedule
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self._check_cache_support()
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._logits_kw = "logits_to_keep" in params
        self.eos_ids = self._eos_ids(eos_token_id)
        self.pad_id = self._pad_id(pad_token_id)
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)

        if pool is not None:
            pool.bind(model)
        self._routing = _Routing()
        self._layers: dict[str, ServingLinear] = {}
        for path in self._resolve_targets(target):
            base = model.get_submodule(path)
            layer = ServingLinear(base, path, self._routing)
            _set_submodule(model, path, layer)
            self._layers[path] = layer
        self._groups: dict[int, _SlotGroup] = {}
        # concat buffers' columns: (group, slot, adapter key) -> (first column, rank); entries
        # of adapters no longer in the batch stay until their columns are reused
        self._cat_cols: dict[tuple, tuple[int, int]] = {}
        self._cat_width = 0  # columns in use (live or dead) from 0
        self._cat_cap = 0  # columns allocated

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._id_lock = threading.Lock()
        self._live: set[str] = set()  # ids queued or running (guarded by _id_lock)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._cache = None  # DynamicCache of the running rows
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self._last: torch.Tensor | None = None  # (B,) last token of each row
        self._pos: torch.Tensor | None = None  # (B,) position id of the next token
        self._plan: _Plan | None = None  # routing plan of the running batch (None = rebuild)
        self._results: dict[str, Result] = {}
        self._callbacks: dict[str, Callable[[TokenEvent], None]] = {}
        self._clock = 0
        self.counters = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "requests_finished": 0,
                         "slot_hits": 0, "slot_loads": 0, "decode_plans": 0, "concat_copies": 0, "concat_repacks": 0}

    # -- setup helpers -----------------------------------------------------------------
    def _check_cache_support(self) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = self._new_cache()
        odd = {type(layer).__name__ for layer in getattr(cache, "layers", []) if type(layer) is not DynamicLayer}
        if odd or not isinstance(cache, DynamicCache):
            raise ConfigError(
                f"the serving engine batches full-attention KV caches only; this model's cache uses {sorted(odd)}"
            )

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signature
            return DynamicCache()

    def _eos_ids(self, eos) -> frozenset[int]:
        if eos is None and self.tokenizer is not None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            gen = getattr(self.model, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(getattr(self.model, "config", None), "eos_token_id", None)
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])

    def _pad_id(self, pad) -> int:
        if pad is None and self.tokenizer is not None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        return int(pad)  # its value never matters: padded positions are masked

    def _resolve_targets(self, target) -> list[str]:
        from lorakit.core.inject import find_targets

        if target == "adapters":
            if self.pool is None:
                raise ConfigError("target='adapters' needs a pool")
            from lorakit.core.io import read_config

            paths: set[str] = set()
            for name in self.pool.available():
                cfg, meta = read_config(self.pool.path_of(name))
                paths |= set(meta.get("adapted_modules") or find_targets(self.model, cfg))
            if not paths:
                raise ConfigError(f"target='adapters': no adapters found in {self.pool.directory}")
            paths = sorted(paths)
        else:
            paths = find_targets(self.model, AdapterConfig(target=target))
        for p in paths:
            if _linear_shape(self.model.get_submodule(p)) is None:
                raise ConfigError(f"target {p!r} is not a linear layer; batched serving adapts linear layers only")
        return paths

    def close(self) -> None:
        """Give the model its original layers back (the engine is unusable afterwards)."""
        for path, layer in self._layers.items():
            _set_submodule(self.model, path, layer.base)
        self._layers.clear()

    # -- public API ------------------------------------------------------------------------
    def add(self, request: Request, on_token: Callable[[TokenEvent], None] | None = None,
            collect: bool = False) -> str:
        """Queue a request (thread-safe); its adapter starts loading now. Returns its id.

        on_token: called (from the thread running `step`) with every TokenEvent of this request.
        collect: keep a `Result` for `pop_result(request_id)` when it finishes.
        """
        return self._enqueue(self._make_seq(request, on_token, collect))

    def _make_seq(self, request: Request, on_token, collect: bool) -> _Seq:
        """Validate a request (raises before anything is queued)."""
        if not isinstance(request, Request):
            raise ConfigError(f"expected a Request, got {type(request).__name__}")
        prompt = self._prompt_ids(request.prompt)
        if self.max_positions and len(prompt) + request.max_new_tokens > self.max_positions:
            raise ConfigError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the model's "
                f"context of {self.max_positions} positions"
            )
        if request.adapter is not None:
            if self.pool is None:
                raise AdapterError(f"adapter {request.adapter!r} requested but the engine has no adapter pool")
            self.pool.path_of(request.adapter)  # a name that could leave the pool directory fails here
        rid = request.request_id or f"req-{next(self._ids)}"
        stop = self.eos_ids if request.stop_token_ids is None else frozenset(int(t) for t in request.stop_token_ids)
        return _Seq(rid, request, prompt, stop, on_token, collect)

    def _enqueue(self, seq: _Seq) -> str:
        with self._id_lock:
            if seq.rid in self._live:
                raise ConfigError(f"request id {seq.rid!r} is already queued or running")
            self._live.add(seq.rid)
        if seq.req.adapter is not None:
            self.pool.prefetch([seq.req.adapter])  # background load while the request waits
        self._inbox.put(seq)
        return seq.rid

    def cancel(self, request_id: str) -> None:
        """Stop a queued or running request at the next step (thread-safe)."""
        self._inbox.put(request_id)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or not self._inbox.empty())

    def pop_result(self, request_id: str) -> Result | None:
        return self._results.pop(request_id, None)

    @property
    def stats(self) -> dict:
        out = dict(self.counters, running=len(self._running), waiting=len(self._waiting))
        if self.pool is not None:
            out["pool"] = self.pool.stats
        return out

    def generate(self, requests: Sequence[Request],
                 on_token: Callable[[TokenEvent], None] | None = None) -> list[Result]:
        """Run `requests` to completion (batched with anything else queued); results in order."""
        seqs = [self._make_seq(r, on_token, True) for r in requests]  # all valid before any is queued
        if len({s.rid for s in seqs}) < len(seqs):
            raise ConfigError("request ids in one generate() call must be distinct")
        ids = [self._enqueue(seq) for seq in seqs]
        pending = set(ids)
        while pending & self._unfinished():
            self._advance()
        return [self._results.pop(i) for i in ids]

    def stream(self, requests: Sequence[Request]) -> Iterator[TokenEvent]:
        """Yield the TokenEvents of `requests` as they are produced."""
        events: deque[TokenEvent] = deque()
        seqs = [self._make_seq(r, events.append, False) for r in requests]
        pending = {self._enqueue(seq) for seq in seqs}
        try:
            while pending:
                if not events:
                    self._advance()
                while events:
                    ev = events.popleft()
                    if ev.finished:
                        pending.discard(ev.request_id)
                    yield ev
        finally:  # the consumer stopped early: do not keep generating for nobody
            for rid in pending:
                self.cancel(rid)

    def run_until_idle(self) -> None:
        while self.has_work():
            self._advance()

    def _unfinished(self) -> set[str]:
        self._drain_inbox()
        return {s.rid for s in self._running} | {s.rid for s in self._waiting}

    def _advance(self) -> None:
        if not self.step():
            self.wait_for_adapters(0.05)

    def wait_for_adapters(self, timeout: float) -> None:
        """Block (at most `timeout` s) while every queued request waits for an adapter load and
        nothing runs; returns at once otherwise. Call it after a `step()` that produced no
        events instead of spinning on `step()`: the loader threads get the CPU."""
        if not self._running and self._waiting and self.pool is not None:
            self.pool.wait_for_load(timeout)

    # -- one scheduling step ---------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Decode one token for every running row, then admit and prefill waiting requests."""
        self._clock += 1
        self.counters["steps"] += 1
        events: list[TokenEvent] = []
        self._drain_inbox(events)
        if self._running:
            self._decode(events)
        if self.policy == "continuous" or not self._running:
            admitted = self._admit(events)
            if admitted:
                self._prefill(admitted, events)
        for ev in events:
            self._deliver(ev)
        return events

    def _drain_inbox(self, events: list[TokenEvent] | None = None) -> None:
        cancels = set()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, str):
                cancels.add(item)
            else:
                self._waiting.append(item)
                if item.on_token is not None:
                    self._callbacks[item.rid] = item.on_token
        if not cancels:
            return
        sink = [] if events is None else events
        for seq in [s for s in self._waiting if s.rid in cancels]:
            self._waiting.remove(seq)
            sink.append(self._finish(seq, "cancelled"))
        for seq in self._running:
            if seq.rid in cancels:
                seq.cancelled = True
        if events is None:
            for ev in sink:
                self._deliver(ev)

    def _deliver(self, ev: TokenEvent) -> None:
        callback = self._callbacks.pop(ev.request_id, None) if ev.finished else self._callbacks.get(ev.request_id)
        if callback is not None:
            callback(ev)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, token: int | None = None) -> TokenEvent:
        if seq.slot is not None:
            g, s = seq.slot
            self._groups[g].refs[s] -= 1
            seq.slot = None
        self.counters["requests_finished"] += 1
        with self._id_lock:
            self._live.discard(seq.rid)
        if seq.collect:
            text = None
            if self.tokenizer is not None and seq.tokens:
                text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            self._results[seq.rid] = Result(seq.rid, seq.req.adapter, seq.prompt, list(seq.tokens), reason, error, text)
        index = len(seq.tokens) - 1 if token is not None else len(seq.tokens)
        return TokenEvent(seq.rid, token, index, True, reason, error)

    # -- admission -------------------------------------------------------------------------
    def _admit(self, events: list[TokenEvent]) -> list[_Seq]:
        """Waiting requests that can start now: adapter resident, a slot free, batch not full."""
        admitted: list[_Seq] = []
        room = self.max_batch - len(self._running)
        arrival = {id(s): i for i, s in enumerate(self._waiting)}
        failed: dict[str, str] = {}
        for seq in self._admission_order():
            if len(admitted) >= room:
                break
            name = seq.req.adapter
            if name is not None:
                if name in failed:
                    self._waiting.remove(seq)
                    events.append(self._finish(seq, "error", failed[name]))
                    continue
                if seq.loaded is None:  # hold it: a later eviction from the pool cannot starve this request
                    seq.loaded = self.pool.peek(name)
                loaded = seq.loaded
                if loaded is None:
                    state = self.pool.state(name)
                    if state == "failed":
                        err = self.pool.take_error(name)
                        failed[name] = str(err) if err is not None else f"adapter {name!r} failed to load"
                        self._waiting.remove(seq)
                        events.append(self._finish(seq, "error", failed[name]))
                    elif state == "absent":  # evicted after its prefetch: load it again
                        self.pool.prefetch([name])
                    continue  # still loading: later requests for other adapters go ahead
                try:
                    slot = self._acquire(loaded)
                except LorakitError as e:
                    failed[name] = str(e)
                    self._waiting.remove(seq)
                    events.append(self._finish(seq, "error", failed[name]))
                    continue
                if slot is None:  # every slot of its rank group is in use
                    continue
                seq.slot, seq.loaded = slot, None
            self._waiting.remove(seq)
            if seq.req.temperature > 0:
                seq.generator = torch.Generator(device=self.device)
                if seq.req.seed is not None:
                    seq.generator.manual_seed(seq.req.seed)
                else:
                    seq.generator.seed()
            admitted.append(seq)
        if admitted and self.schedule == "affinity":
            last = max(arrival[id(s)] for s in admitted)
            for seq in self._waiting:
                if arrival[id(seq)] < last:
                    seq.overtaken += 1
        return admitted

    def _admission_order(self) -> list[_Seq]:
        """Waiting requests in the order admission tries them.

        "fcfs": arrival order. "affinity": among the first `max_batch` waiting, requests whose
        adapter (or no adapter) is already in the running batch go first: they add no new
        adapter to the decode steps, whose LoRA cost is a read of each distinct adapter of the
        batch (see the module docstring). A request overtaken `max_batch` times is due: it goes
        before all of those, so none waits behind more than `max_batch` admissions of later ones.
        """
        waiting = list(self._waiting)
        if self.schedule == "fcfs":
            return waiting
        present = {s.req.adapter for s in self._running}
        head = waiting[: self.max_batch]
        due = [s for s in head if s.overtaken >= self.max_batch]
        warm = [s for s in head if s.overtaken < self.max_batch and s.req.adapter in present]
        first = {id(s) for s in due + warm}
        return due + warm + [s for s in waiting if id(s) not in first]

    def _rank_group(self, r: int) -> int:
        if self.rank_groups == "exact":
            return r
        if self.rank_groups == "pow2":
            return 1 << (r - 1).bit_length()
        return self.rank_groups  # fixed rank: _acquire refuses adapters above it

    def _acquire(self, loaded: LoadedAdapter) -> tuple[int, int] | None:
        """(group, slot) holding `loaded` on the device, copying it in if needed; None if full."""
        if isinstance(self.rank_groups, int) and loaded.rank > self.rank_groups:
            raise AdapterError(f"adapter {loaded.name!r} has rank {loaded.rank}, above this engine's fixed "
                               f"rank_groups={self.rank_groups}; build the engine with a larger rank or 'pow2'")
        g = self._rank_group(loaded.rank)
        group = self._groups.get(g)
        if group is None:
            group = self._groups[g] = _SlotGroup(g)
        key = (loaded.name, loaded.version)
        s = group.index.get(key)
        if s is not None:
            self.counters["slot_hits"] += 1
        else:
            self._check_servable(loaded)
            free = [i for i in range(group.cap) if group.refs[i] == 0]
            if free:  # an empty slot, else the least recently used idle one
                s = min(free, key=lambda i: (group.keys[i] is not None, group.last_used[i]))
            elif group.cap < self.max_slots:
                s = group.cap
                self._grow(group)
            else:
                return None
            self._write_slot(group, s, loaded)
            self.counters["slot_loads"] += 1
        group.refs[s] += 1
        group.last_used[s] = self._clock
        return g, s

    def _check_servable(self, loaded: LoadedAdapter) -> None:
        extra = sorted(set(loaded.factors) - set(self._layers))
        if extra:
            raise AdapterError(
                f"adapter {loaded.name!r} adapts {extra[:4]}{' ...' if len(extra) > 4 else ''}, which this engine "
                "does not serve; build the Engine with a target that includes them (e.g. target='all-linear')"
            )
        for p, (a, b) in loaded.factors.items():
            layer = self._layers[p]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise AdapterError(
                    f"adapter {loaded.name!r}: {p!r} maps {a.shape[1]} -> {b.shape[0]}, the model's layer "
                    f"{layer.in_features} -> {layer.out_features}"
                )

    def _grow(self, group: _SlotGroup) -> None:
        cap = min(self.max_slots, max(2, 2 * group.cap))
        r = group.rank
        for layer in self._layers.values():
            a = torch.zeros(cap, layer.in_features, r, device=self.device, dtype=self.dtype)
            b = torch.zeros(cap, r, layer.out_features, device=self.device, dtype=self.dtype)
            if group.cap:
                a[: group.cap] = layer.a[r]
                b[: group.cap] = layer.b[r]
            layer.a[r], layer.b[r] = a, b
        n = cap - group.cap
        group.keys += [None] * n
        group.ranks += [0] * n
        group.modules += [frozenset()] * n
        group.refs += [0] * n
        group.last_used += [0] * n
        group.cap = cap
        self._plan = None

    def _write_slot(self, group: _SlotGroup, s: int, loaded: LoadedAdapter) -> None:
        r = group.rank
        for path, layer in self._layers.items():
            a_slot, b_slot = layer.a[r][s], layer.b[r][s]  # (d_in, r_g), (r_g, d_out)
            a_slot.zero_()
            b_slot.zero_()
            fac = loaded.factors.get(path)
            if fac is not None:
                a, b = fac  # (k, d_in), (d_out, k) with k <= r_g: the rest stays zero
                k = a.shape[0]
                a_slot[:, :k].copy_(a.T)
                b_slot[:k, :].copy_(b.T)
        old = group.keys[s]
        if old is not None:
            group.index.pop(old, None)
        key = (loaded.name, loaded.version)
        group.keys[s], group.modules[s], group.ranks[s] = key, frozenset(loaded.factors), loaded.rank
        group.index[key] = s
        self._plan = None

    # -- routing ---------------------------------------------------------------------------
    def _plan_for(self, seqs: list[_Seq], decode: bool = False) -> _Plan:
        if decode and self.decode_lora != "gathered":
            plan = self._concat_plan(seqs)
            if plan is not None:
                return plan
        by_group: dict[int, tuple[list[int], list[int], set[str]]] = {}
        for i, seq in enumerate(seqs):
            if seq.slot is None:
                continue
            g, s = seq.slot
            rows, slots, mods = by_group.setdefault(g, ([], [], set()))
            rows.append(i)
            slots.append(s)
            mods |= self._groups[g].modules[s]
        groups = []
        for g, (rows, slots, mods) in sorted(by_group.items()):
            if len(rows) == len(seqs):
                sel = None
            elif rows[-1] - rows[0] + 1 == len(rows):  # ascending, so contiguous
                sel = slice(rows[0], rows[-1] + 1)
            else:
                sel = torch.tensor(rows, device=self.device)
            groups.append((g, sel, torch.tensor(slots, device=self.device), frozenset(mods)))
        return _Plan(len(seqs), tuple(groups), reuse=decode)

    def _concat_plan(self, seqs: list[_Seq]) -> _Plan | None:
        """A decode plan over the batch's distinct adapters side by side (None: no adapter in
        the batch, or not worth it).

        Each distinct adapter's factors are read once per step, however many rows use it,
        instead of once per row; the price is B·w instead of Σ_i r_i multiply-adds (every row
        against every distinct adapter, the other adapters' columns then zeroed). On a CPU
        "auto" takes it while that blow-up is at most `CONCAT_MAX_BLOWUP`: memory-bound
        small-batch decoding gains, a large batch of mostly distinct adapters keeps the gathered
        form. On a GPU "auto" always takes it: decoding a small model there is bound by kernel
        launches (three per layer here, two or three per rank group gathered), not FLOPs.
        """
        want: dict[tuple, int] = {}  # (group, slot, adapter key) -> rank, in row order
        used = 0
        for seq in seqs:
            if seq.slot is not None:
                g, s = seq.slot
                r = self._groups[g].ranks[s]
                want.setdefault((g, s, self._groups[g].keys[s]), r)
                used += r
        if not want:
            return None
        if (self.decode_lora == "auto" and self.device.type == "cpu"
                and len(seqs) * sum(want.values()) > self.CONCAT_MAX_BLOWUP * used):
            return None
        self._place_columns(want)
        off = torch.ones(len(seqs), self._cat_width, dtype=torch.bool)
        for i, seq in enumerate(seqs):
            if seq.slot is not None:
                g, s = seq.slot
                c, r = self._cat_cols[(g, s, self._groups[g].keys[s])]
                off[i, c:c + r] = False
        mods = frozenset().union(*(self._groups[g].modules[s] for g, s, _ in want))
        return _Plan(len(seqs), (), self._cat_width, off.to(self.device), mods)

    def _place_columns(self, want: dict[tuple, int]) -> None:
        """Give every adapter of `want` columns in the concat buffers, copying in only those
        not already in place: first fit into the columns of adapters that left the batch,
        else at the end. When the buffers are full or more than a quarter of the used columns
        would belong to adapters that left (a dead column costs a read every step, a copy a
        read and a write once), compact: entries inside the first Σ r columns stay, the others
        move into the holes there; repack everything only if they do not fit."""
        cols = self._cat_cols
        total = sum(want.values())
        live = {k: cols[k] for k in want if k in cols}
        by_rank = sorted((k for k in want if k not in cols), key=lambda k: -want[k])
        got = _first_fit(live, by_rank, want, self._cat_width, self._cat_cap)
        if got is None or got[1] - total > total // 4:
            stay = {k: (c, r) for k, (c, r) in live.items() if c + r <= total}
            movers = sorted((k for k in want if k not in stay), key=lambda k: -want[k])
            got = _first_fit(stay, movers, want, 0 if not stay else max(c + r for c, r in stay.values()), total)
            if got is None or total > self._cat_cap:
                self._repack(want)
                return
        placed, width = got
        moved = [k for k, span in placed.items() if cols.get(k) != span]
        for k, (c, r) in list(cols.items()):  # dead entries whose columns are taken or cut off now
            if k not in placed and (c + r > width or any(c < pc + pr and pc < c + r
                                                         for pc, pr in (placed[m] for m in moved))):
                del cols[k]
        for k in moved:
            self._copy_columns(k, *placed[k])
        cols.update(placed)
        self._cat_width = width

    def _repack(self, want: dict[tuple, int]) -> None:
        width = sum(want.values())
        if width > self._cat_cap:
            cap = width + width // 2  # room for adapters that join later
            for layer in self._layers.values():
                layer.ca = torch.zeros(layer.in_features, cap, device=self.device, dtype=self.dtype)
                layer.cb = torch.zeros(cap, layer.out_features, device=self.device, dtype=self.dtype)
            self._cat_cap = cap
        self._cat_cols, c = {}, 0
        for k, r in want.items():
            self._cat_cols[k] = (c, r)
            self._copy_columns(k, c, r)
            c += r
        self._cat_width = width
        self.counters["concat_repacks"] += 1

    def _copy_columns(self, key: tuple, c: int, r: int) -> None:
        g, s, _ = key
        for layer in self._layers.values():
            layer.ca[:, c:c + r].copy_(layer.a[g][s, :, :r])
            layer.cb[c:c + r].copy_(layer.b[g][s, :r])
        self.counters["concat_copies"] += 1

    @staticmethod
    def _group_key(seq: _Seq) -> int:
        """Rows are kept sorted by this: rank group, -1 for rows without an adapter."""
        return -1 if seq.slot is None else seq.slot[0]

    def _forward(self, plan: _Plan, ids, mask, pos, cache) -> torch.Tensor:
        """Last-position logits (B, V) in float32."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._logits_kw:
            kwargs["logits_to_keep"] = 1
        self._routing.plan = plan if plan.groups or plan.cat_off is not None else None
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
        finally:
            self._routing.plan = None
        return out.logits[:, -1, :].float()

    # -- prefill / decode ------------------------------------------------------------------
    def _prefill(self, seqs: list[_Seq], events: list[TokenEvent]) -> None:
        seqs = sorted(seqs, key=self._group_key)  # stable: each group's rows contiguous
        n, length = len(seqs), max(len(s.prompt) for s in seqs)
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every row's last token is in the last column
            ids[i, length - len(s.prompt):] = torch.tensor(s.prompt, dtype=torch.long)
            mask[i, length - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(self._plan_for(seqs), ids, mask, pos, cache)
        self.counters["prefill_tokens"] += int(mask.sum())
        tokens = self._sample(logits, seqs)
        last = torch.tensor(tokens, device=self.device)
        nxt = torch.tensor([len(s.prompt) for s in seqs], device=self.device)
        keep = self._emit(seqs, tokens, nxt, events)
        if not keep:
            return
        if len(keep) < n:
            idx = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(idx)
            mask, last, nxt = mask[idx], last[idx], nxt[idx]
        self._join([seqs[i] for i in keep], cache, mask, last, nxt)

    def _decode(self, events: list[TokenEvent]) -> None:
        seqs = self._running
        if any(s.cancelled for s in seqs):
            keep = []
            for i, s in enumerate(seqs):
                if s.cancelled:
                    events.append(self._finish(s, "cancelled"))
                else:
                    keep.append(i)
            self._keep_rows(keep)
            seqs = self._running
            if not seqs:
                return
        if self._plan is None:
            self._plan = self._plan_for(seqs, decode=True)
            self.counters["decode_plans"] += 1
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(seqs), 1)], dim=1)
        logits = self._forward(self._plan, self._last[:, None], self._mask, self._pos[:, None], self._cache)
        self.counters["decode_tokens"] += len(seqs)
        tokens = self._sample(logits, seqs)
        self._last = torch.tensor(tokens, device=self.device)
        self._pos = self._pos + 1
        keep = self._emit(seqs, tokens, self._pos, events)
        if len(keep) < len(seqs):
            self._keep_rows(keep)

    def _emit(self, seqs: list[_Seq], tokens: list[int], next_pos: torch.Tensor,
              events: list[TokenEvent]) -> list[int]:
        """Record each row's new token; returns the rows that keep running."""
        keep = []
        limit = self.max_positions
        next_pos = next_pos.tolist()
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.tokens.append(tok)
            if tok in seq.stop:
                events.append(self._finish(seq, "stop", token=tok))
            elif len(seq.tokens) >= seq.req.max_new_tokens or (limit and next_pos[i] >= limit):
                events.append(self._finish(seq, "length", token=tok))
            else:
                events.append(TokenEvent(seq.rid, tok, len(seq.tokens) - 1))
                keep.append(i)
        return keep

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """Greedy rows: argmax. Sampling rows: temperature, top-k, top-p, each with its own generator."""
        out = logits.argmax(-1)
        rows = [i for i, s in enumerate(seqs) if s.req.temperature > 0]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            reqs = [seqs[i].req for i in rows]
            vocab = logits.shape[-1]
            temp = torch.tensor([r.temperature for r in reqs], device=logits.device)
            top_k = torch.tensor([r.top_k or vocab for r in reqs], device=logits.device)
            top_p = torch.tensor([float(r.top_p) for r in reqs], device=logits.device)
            vals, order = (logits.index_select(0, idx) / temp[:, None]).sort(dim=-1, descending=True)
            keep = torch.arange(vocab, device=logits.device)[None, :] < top_k[:, None]  # (n, V)
            probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
            keep &= (probs.cumsum(-1) - probs) < top_p[:, None]  # smallest prefix with mass >= top_p
            probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
            for j, i in enumerate(rows):  # one draw per row from the request's own generator
                pick = torch.multinomial(probs[j], 1, generator=seqs[i].generator)
                out[i] = order[j, pick[0]]
        return out.tolist()

    # -- batch cache surgery ---------------------------------------------------------------
    def _join(self, seqs: list[_Seq], cache, mask, last, nxt) -> None:
        if not self._running:
            self._running, self._cache, self._mask, self._last, self._pos = list(seqs), cache, mask, last, nxt
        else:
            # each joining row goes to the end of its rank group's range (both sides are sorted)
            rows = self._running + seqs
            order = sorted(range(len(rows)), key=lambda i: self._group_key(rows[i]))
            dest = torch.empty(len(rows), dtype=torch.long)  # row i's new position
            dest[torch.tensor(order)] = torch.arange(len(rows))
            n_old = len(self._running)
            to_old, to_new = dest[:n_old].to(self.device), dest[n_old:].to(self.device)
            length = max(self._mask.shape[1], mask.shape[1])

            def place(old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
                old, new = _left_pad(old, length, dim), _left_pad(new, length, dim)
                out = old.new_empty((len(rows), *old.shape[1:]))
                return out.index_copy_(0, to_old, old).index_copy_(0, to_new, new)

            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = place(mine.keys, theirs.keys, -2)
                mine.values = place(mine.values, theirs.values, -2)
            self._mask = place(self._mask, mask, -1)
            self._running = [rows[i] for i in order]
            perm = torch.tensor(order, device=self.device)  # new row k = old-or-joining row order[k]
            self._last = torch.cat([self._last, last]).index_select(0, perm)
            self._pos = torch.cat([self._pos, nxt]).index_select(0, perm)
        self._plan = None

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self._running, self._cache, self._mask, self._last, self._pos = [], None, None, None, None
            self._plan = None
            return
        idx = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(idx)
        self._running = [self._running[i] for i in keep]
        self._mask, self._last, self._pos = self._mask[idx], self._last[idx], self._pos[idx]
        first = int(self._mask.any(0).nonzero()[0])  # columns left of this are padding in every row
        if first > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
            self._mask = self._mask[:, first:]
        self._plan = None

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("a text prompt needs an engine with a tokenizer; pass token ids instead")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ConfigError(f"prompt tensor must be 1-D token ids, got shape {tuple(prompt.shape)}")
            ids = prompt.tolist()
        else:
            ids = list(prompt)
        if not ids:
            raise ConfigError("prompt is empty")
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and (vocab is None or t < vocab)
                   for t in ids):
            raise ConfigError(f"prompt must be token ids in [0, {vocab}), got {ids[:8]}...")
        return ids


def parse_rank_groups(value: str) -> str | int:
    """`rank_groups` from text (a CLI flag): "pow2", "exact" or a positive integer rank."""
    if value in ("pow2", "exact"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ConfigError(f"rank_groups must be pow2, exact or a positive integer rank, got {value!r}")


def _first_fit(fixed: dict, movers: list, size: dict, width: int, limit: int):
    """Place each of `movers` (size[k] columns) into the first gap between `fixed` spans
    within [0, width), else at `width` while it stays <= `limit`. Returns ({key: (first
    column, size)} for fixed and movers, the new width), or None if one does not fit."""
    placed = dict(fixed)
    for k in movers:
        need, start, at = size[k], 0, None
        for c, r in sorted(placed.values()):
            if c - start >= need:
                at = start
                break
            start = max(start, c + r)
        if at is None:
            if width - start >= need:  # the gap after the last span, inside the used width
                at = start
            elif width + need <= limit:
                at, width = width, width + need
            else:
                return None
        placed[k] = (at, need)
    return placed, width


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left of dimension `dim` (-1 or -2) up to `length`."""
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    pad = (extra, 0) if dim == -1 else (0, 0, extra, 0)
    return F.pad(t, pad)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


__all__ = ["Engine", "Request", "Result", "ServingLinear", "TokenEvent"]
