"""Wrappers that hold an untouched base layer plus a ModuleDict of named adapters.

    y = base(x) + Σ_{a ∈ active, a not merged} adapters[a].delta(x, base(x))

With a route set (see `lorakit.route`), row i of the batch instead gets only the adapter
`route_names[adapter_ids[i]]` (-1 = base model only): one batch, many adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import LayerSpec
from lorakit.errors import AdapterError

try:  # GPT-2 style transposed linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


class AdaptedLayer(nn.Module):
    """Common logic: adapter bookkeeping, merge/unmerge, per-row routing."""

    kind = "linear"

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        # (adapter_ids (batch,), names) while inside `lorakit.route(...)`; None otherwise.
        self.route: tuple[torch.Tensor, list[str]] | None = None

    # -- what adapters see of the base layer -------------------------------------------
    def weight_view(self) -> torch.Tensor:
        """Base weight as (d_out, d_in) (linear) or (num_embeddings, dim) (embedding)."""
        return self.base.weight

    def spec(self, name: str) -> LayerSpec:
        w = self.base.weight
        d_out, d_in = self.weight_view().shape
        return LayerSpec(
            name=name, kind=self.kind, in_features=d_in, out_features=d_out,
            dtype=w.dtype, device=w.device, weight=self.weight_view,
            bias=lambda: getattr(self.base, "bias", None),
        )

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.route is not None:
            return self._routed(x, out)
        for name in self.active:
            if name not in self.merged:
                out = out + self.adapters[name].delta(x, out).to(out.dtype)
        return out

    def _routed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ids, names = self.route
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"adapter_ids has {ids.shape[0]} rows but the batch has {x.shape[0]}")
        if self.merged:
            raise AdapterError(f"cannot route rows while adapters {self.merged} are merged; unmerge first")
        for k in torch.unique(ids).tolist():
            if k < 0 or names[k] not in self.adapters:  # base-only rows, or adapter not on this layer
                continue
            rows = (ids == k).nonzero().squeeze(1).to(x.device)
            xk = x.index_select(0, rows)
            d = self.adapters[names[k]].delta(xk, out.index_select(0, rows))
            out = out.index_add(0, rows, d.to(out.dtype))
        return out

    # -- merge ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Add ΔW of each named adapter into the base weight (idempotent per adapter)."""
        if getattr(self.base, "lorakit_quantized", False):
            raise AdapterError("the base layer is quantized: merging needs re-quantization; "
                               "use lorakit.quant.merge_lora_into_quantized (it reports the error)")
        for name in names:
            if name in self.adapters and name not in self.merged:
                w = self.weight_view()
                w += self.adapters[name].delta_weight().to(w.dtype)
                self._shift_bias(name, +1)
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged adapters again, newest first (idempotent)."""
        for name in reversed(list(self.merged)):
            if names is None or name in names:
                w = self.weight_view()
                w -= self.adapters[name].delta_weight().to(w.dtype)
                self._shift_bias(name, -1)
                self.merged.remove(name)

    def _shift_bias(self, name: str, sign: int) -> None:
        """Adapters with a constant output shift (`delta_bias`) move the base bias too."""
        hook = getattr(self.adapters[name], "delta_bias", None)
        db = hook() if hook is not None else None
        if db is not None:
            b = self.base.bias  # an adapter only returns a shift when the base has a bias
            b += sign * db.to(b.dtype)


class AdaptedLinear(AdaptedLayer):
    """Wraps an `nn.Linear`."""


class AdaptedConv1D(AdaptedLayer):
    """Wraps transformers' GPT-2 `Conv1D` (weight stored as (d_in, d_out))."""

    def weight_view(self) -> torch.Tensor:
        return self.base.weight.T  # a view: in-place merge writes through


class AdaptedEmbedding(AdaptedLayer):
    """Wraps an `nn.Embedding`; adapters get token ids as x."""

    kind = "embedding"

    def spec(self, name: str) -> LayerSpec:
        s = super().spec(name)
        b = self.base
        kw = dict(padding_idx=b.padding_idx, max_norm=b.max_norm, norm_type=b.norm_type,
                  scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)
        # ids in, vectors out: in_features = num_embeddings, out_features = embedding_dim
        return LayerSpec(s.name, s.kind, b.num_embeddings, b.embedding_dim, s.dtype, s.device, s.weight, kw)


def wrapper_for(module: nn.Module) -> type[AdaptedLayer] | None:
    """The wrapper class for a base module, or None if it cannot be adapted."""
    if isinstance(module, nn.Linear) or getattr(module, "lorakit_linear", False):  # e.g. quant.QuantLinear
        return AdaptedLinear
    if Conv1D and isinstance(module, Conv1D):
        return AdaptedConv1D
    if isinstance(module, nn.Embedding):
        return AdaptedEmbedding
    return None


def embed(ids: torch.Tensor, table: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """F.embedding with the base embedding's options (padding_idx, max_norm, ...)."""
    return F.embedding(ids, table, **spec.embedding_kwargs)
