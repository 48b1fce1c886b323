"""The adapter contract: a config dataclass base and the protocol every method implements.

An adapter is an `nn.Module` attached to one base layer. It never touches the base weight
during training; it only adds to the layer's output:

    h = base(x) + adapter.delta(x, base(x))

`delta_weight()` returns the same update as a dense matrix (d_out, d_in) for merging and
export, and `to_lora(rank)` gives (A, B, scale) with ΔW ≈ scale·B·A so any method can be
served or exported as plain LoRA.

A second kind of attachment point, "insert", serves methods that add new modules to the
network instead of updating a layer (bottleneck adapters, invertible adapters). Such a
method declares *roles* (`insert_roles(config)`, see `INSERT_ROLES`); the core finds the
matching sites of each transformer block and hooks them (`lorakit.core.layer.InsertSite`):

    h ← h + adapter.delta(u, h)

where h is the hidden state at the site and u what the adapter reads there (h itself, or
the LayerNorm of h for post-LN sites). Insert adapters are nonlinear: they cannot be merged
into base weights or exported as LoRA, and the core refuses both with a clear error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from lorakit.core.shared import SharedParameters
from lorakit.errors import ConfigError

#: Names of adapters become ModuleDict keys and directory names: keep them boring.
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")


def check_adapter_name(name: str) -> str:
    """Reject names that could escape a directory or break module paths ('../x', 'a.b', '')."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
        raise ConfigError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(no dots, slashes or leading '-')"
        )
    return name


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know about the base layer it is attached to.

    `weight()` returns the live base weight oriented as (d_out, d_in) for linear layers
    (GPT-2's Conv1D is transposed for you) and (num_embeddings, dim) for embeddings.
    `base_weight()` / `base_bias()` return W0 / b0 without any merged adapter: the live tensors
    while nothing is merged, else the layer's one snapshot taken at the first merge (kept only
    when an adapter on the layer sets `needs_w0 = True`). Methods whose update depends on W0
    (Bone "bat", Hydra) read it from there instead of keeping a private copy per adapter.
    """

    name: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" | "embedding" | "insert"
    in_features: int  # d_in (num_embeddings for embeddings; hidden size d for insert sites)
    out_features: int  # d_out (embedding_dim for embeddings; hidden size d for insert sites)
    dtype: torch.dtype
    device: torch.device
    weight: typing.Callable[[], torch.Tensor]
    embedding_kwargs: dict = field(default_factory=dict)  # padding_idx, max_norm, ...
    bias: typing.Callable[[], torch.Tensor | None] = lambda: None  # live base bias (d_out,) or None
    base_weight: typing.Callable[[], torch.Tensor] | None = None  # W0 without merged adapters; None = weight
    base_bias: typing.Callable[[], torch.Tensor | None] | None = None  # b0 likewise; None = bias
    role: str = ""  # insert sites only: one of INSERT_ROLES
    # the injection's pool of tensors shared across layers (`lorakit.core.shared`); set by
    # `plan_injection`, None when an adapter is built on its own. Use it in __init__, don't keep it.
    shared: SharedParameters | None = None

    def w0(self) -> torch.Tensor:
        """W0 (d_out, d_in) as if no adapter were merged (see the class docstring)."""
        return (self.base_weight or self.weight)()

    def b0(self) -> torch.Tensor | None:
        """b0 (d_out,) or None, as if no adapter were merged."""
        return (self.base_bias or self.bias)()


#: Where an "insert" method can attach (resolved per architecture by `lorakit.core.inject.find_sites`):
#:   "attn_output":  the attention sub-layer's output, before the residual add (Houlsby's first adapter)
#:   "ffn_output":   the feed-forward sub-layer's output, before the residual add (Houlsby's second)
#:   "ffn_residual": after the FFN, on the residual stream (Pfeiffer): the block output of pre-LN
#:                   blocks; for post-LN blocks (BERT) the adapter reads LN(s) of the FFN's
#:                   residual sum s and adds to s before that LayerNorm (AdapterHub's placement)
#:   "embed":        the embedding output entering the first block; where the model has output
#:                   embeddings (an LM head) the same adapter's `delta_head` runs on the head's input
INSERT_ROLES = ("attn_output", "ffn_output", "ffn_residual", "embed")

@dataclass
class AdapterConfig:
    """Fields shared by every method.

    target: which modules get the adapter: a module name ("q_proj", matched as a suffix of
        the module path), a list of names, a regular expression (full match on the module
        path), or "all-linear" (every linear layer except the output head).
    modules_to_save: whole modules (e.g. a classification head "score") that are trained
        fully and stored with the adapter.
    """

    method: ClassVar[str] = ""
    target: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, (list, tuple)):
            if not self.target or not all(isinstance(t, str) and t for t in self.target):
                raise ConfigError(f"target must be a non-empty list of module names, got {self.target!r}")
            self.target = list(self.target)
        elif not isinstance(self.target, str) or not self.target:
            raise ConfigError(f"target must be a module name, list, regex or 'all-linear', got {self.target!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from a dict; unknown keys are an error, never silently ignored."""
        from lorakit.config import from_dict

        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        return from_dict(cls, data)


def keep_ranks_(module: torch.nn.Module, keep: torch.Tensor, dims: dict[str, int]) -> None:
    """Replace each named parameter by its slices `keep` along its rank dimension `dims[name]`
    (new, smaller Parameters with the same requires_grad): for rank-pruning methods."""
    for pname, dim in dims.items():
        old = getattr(module, pname)
        setattr(module, pname, torch.nn.Parameter(old.index_select(dim, keep).contiguous(),
                                                  requires_grad=old.requires_grad))


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_finite_nonneg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_range(name: str, value: Any, lo: float, hi: float, hi_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value and (
        value < hi if hi_open else value <= hi
    )
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}")
    return float(value)


@runtime_checkable
class Adapter(Protocol):
    """What every registered adapter module provides."""

    method: ClassVar[str]
    #: True when a freshly built adapter leaves the layer output unchanged (delta == 0).
    zero_init: ClassVar[bool]
    #: Layer kinds it can attach to ("linear", "embedding") or ("insert",).
    supports: ClassVar[tuple[str, ...]]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_out): what the adapter adds to the base output."""

    def delta_weight(self) -> torch.Tensor:
        """(d_out, d_in): the update as a dense matrix, for merge/export only."""

    # Optional, not part of the protocol check:
    #   to_lora(rank=None) -> (A (r, d_in), B (d_out, r), scale): exact where the update is
    #       low-rank; best rank-`rank` approximation otherwise. Enables serving + PEFT export.
    #   test_config: ClassVar[dict] — kwargs that make the method fit the tiny contract models.
    #   trainer_callbacks(cls, model, name, config) -> list[transformers.TrainerCallback]:
    #       training-time behaviour (rank sampling, proximal steps, rank schedules); `train()`
    #       adds them to the Trainer, so they work inside any Trainer.
    #   delta_bias() -> (d_out,) | None: a constant output shift that merge() adds to the base
    #       bias (e.g. Hydra's sequential branch on W0 x + b0).
    #   data_init(cls, model, name, config, batches) -> None: data-aware initialisation run
    #       by `train()` after injection and before training; `batches(n)` returns the first
    #       n training batches (dicts of tensors, as the model's forward takes them).
    #   mergeable: ClassVar[bool] — False for methods with no weight update (e.g. per-token routed
    #       mixtures): `lorakit.merge` refuses up front with the method's delta_weight() error.
    #   shared tensors: an adapter may take trainable tensors shared with the other layers of
    #       its injection from `spec.shared` via `lorakit.core.shared.share_parameter` (S2-LoRA's
    #       global A, B); files store them once and loading restores the sharing.
    #   insert_roles(cls, config) -> tuple[str, ...]: required with supports = ("insert",): the
    #       INSERT_ROLES the method attaches to; `delta(u, h)` then gets u (what the adapter reads,
    #       (..., d)) and h (the hidden state it adds to, (..., d)). Role "embed" also calls
    #       `delta_head(u, h)` on the LM head's input (e.g. the inverse of an invertible adapter).
