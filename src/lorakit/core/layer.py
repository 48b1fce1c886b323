"""Wrappers that hold an untouched base layer plus a ModuleDict of named adapters.

    y = base(x) + Σ_{a ∈ active, a not merged} adapters[a].delta(x, base(x))

With a route set (see `lorakit.route`), row i of the batch instead gets only the adapter
`route_names[adapter_ids[i]]` (-1 = base model only): one batch, many adapters.

`InsertSite` is the second kind of attachment point: it holds the adapters of methods that
insert new modules (bottleneck / invertible adapters) and drives them from forward hooks on
existing modules, so no module of the model is replaced or moved (module paths, and so LoRA
targets and saved keys, stay the same). Same bookkeeping: named adapters, active set, routing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
        self._init_adapters()

    def _init_adapters(self) -> None:
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        # W0 / b0 before the first merge, kept while something is merged and an adapter on this
        # layer needs them (`needs_w0`): one copy per layer, shared by all its adapters.
        self._w0: torch.Tensor | None = None
        self._b0: torch.Tensor | None = None
        # (adapter_ids (batch,), names) while inside `lorakit.route(...)`; None otherwise.
        self.route: tuple[torch.Tensor, list[str]] | None = None

    # -- what adapters see of the base layer -------------------------------------------
    def weight_view(self) -> torch.Tensor:
        """Base weight as (d_out, d_in) (linear) or (num_embeddings, dim) (embedding)."""
        return self.base.weight

    def pristine_weight(self) -> torch.Tensor:
        """W0: the live weight while nothing is merged, else the snapshot of the first merge."""
        if self.merged and self._w0 is None:
            raise AdapterError(f"adapters {self.merged} are merged into this layer and no copy of its original "
                               "weight was kept; unmerge them before adding an adapter whose update depends on W0")
        return self._w0 if self.merged else self.weight_view()

    def pristine_bias(self) -> torch.Tensor | None:
        if self.merged and self._w0 is not None:
            return self._b0
        return getattr(self.base, "bias", None)

    def spec(self, name: str) -> LayerSpec:
        w = self.base.weight
        d_out, d_in = self.weight_view().shape
        return LayerSpec(
            name=name, kind=self.kind, in_features=d_in, out_features=d_out,
            dtype=w.dtype, device=w.device, weight=self.weight_view,
            bias=lambda: getattr(self.base, "bias", None),
            base_weight=self.pristine_weight, base_bias=self.pristine_bias,
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
        todo = [n for n in names if n in self.adapters and n not in self.merged]
        if todo and not self.merged and any(getattr(a, "needs_w0", False) for a in self.adapters.values()):
            self._w0 = self.weight_view().detach().clone()  # (d_out, d_in), contiguous
            b = getattr(self.base, "bias", None)
            self._b0 = None if b is None else b.detach().clone()
        for name in todo:
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
        if not self.merged and self._w0 is not None:  # all unmerged: restore W0 / b0 bit-exactly
            self.weight_view().copy_(self._w0)
            if self._b0 is not None:
                self.base.bias.copy_(self._b0)
            self._w0 = self._b0 = None

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
        return LayerSpec(s.name, s.kind, b.num_embeddings, b.embedding_dim, s.dtype, s.device, s.weight, kw,
                         base_weight=s.base_weight, base_bias=s.base_bias)


# -- insertion sites -----------------------------------------------------------------------
HOOK_MODES = ("output", "input", "norm")


@dataclass(frozen=True)
class SiteHook:
    """One hook of an insertion site on the module at `path`.

    mode "output": h = the module's output (its first element if a tuple), replaced by h';
    mode "input":  h = the module's first positional input, replaced by h' (pre-hook);
    mode "norm":   for a normalisation module N with input s: the adapters read u = N(s) and add
                   to s, the output becomes N(s') (post-LN residual placement, e.g. BERT).
    `call` names the adapter method giving the change of h ("delta", or "delta_head").
    """

    path: str
    mode: str
    call: str = "delta"


@dataclass(frozen=True)
class Site:
    """A place where "insert" adapters attach: one role in one block (or the embeddings)."""

    role: str
    hooks: tuple[SiteHook, ...]
    features: int  # hidden size d: adapters map (..., d) -> (..., d)
    dtype: torch.dtype
    device: torch.device

    @property
    def attr(self) -> str:
        """Attribute name of the holder on the first hooked module."""
        return f"lorakit_{self.role}"

    @property
    def path(self) -> str:
        """Module path of the holder (`InsertSite`): where its adapters' parameters live."""
        return f"{self.hooks[0].path}.{self.attr}"


def _no_weight() -> torch.Tensor:
    raise AdapterError("an insertion site has no base weight: insert adapters add new modules")


class InsertSite(AdaptedLayer):
    """Holds the "insert" adapters of one `Site`; forward hooks on the site's modules run them.

    The holder is registered as a child of the first hooked module (`Site.path`), so adapter
    parameters live in the model's module tree ("<module>.lorakit_<role>.adapters.<name>...").
    Several active adapters are applied one after the other (each sees the previous output);
    under `lorakit.route` each row gets only its own adapter. Nothing can be merged.
    """

    kind = "insert"
    base = None  # wraps nothing: the hooked modules stay where they are

    def __init__(self, site: Site):
        nn.Module.__init__(self)
        self._init_adapters()
        self.site = site

    def spec(self, name: str) -> LayerSpec:
        s = self.site
        return LayerSpec(name=name, kind="insert", in_features=s.features, out_features=s.features,
                         dtype=s.dtype, device=s.device, weight=_no_weight, role=s.role)

    def forward(self, *args, **kwargs):
        raise TypeError("an InsertSite is run by forward hooks on the modules of its site, not called")

    # -- hooks -------------------------------------------------------------------------
    def hook(self, module: nn.Module, index: int) -> None:
        """Register hook `index` of the site on `module` (the module currently at its path)."""
        mode = self.site.hooks[index].mode
        if mode == "input":
            module.register_forward_pre_hook(functools.partial(self._pre_hook, index))
        else:
            module.register_forward_hook(functools.partial(self._post_hook, index))

    def unhook(self, module: nn.Module) -> None:
        """Remove every hook of this site from `module`."""
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                if isinstance(fn, functools.partial) and getattr(fn.func, "__self__", None) is self:
                    del hooks[key]

    def _pre_hook(self, index: int, module: nn.Module, args: tuple):
        if not args or not torch.is_tensor(args[0]):
            raise AdapterError(f"{self.site.hooks[index].path} was called without a positional tensor input; "
                               f"the {self.site.role!r} insertion site cannot reach it")
        new = self._transform(args[0], self.site.hooks[index].call)
        return None if new is None else (new, *args[1:])

    def _post_hook(self, index: int, module: nn.Module, args: tuple, output):
        hk = self.site.hooks[index]
        if hk.mode == "norm":  # output = N(s): adapters read N(s), add to s, output N(s')
            return self._transform(args[0], hk.call, norm=module.forward, u0=output)
        h = output[0] if isinstance(output, tuple) else output
        new = self._transform(h, hk.call)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _transform(self, h: torch.Tensor, call: str, norm=None, u0: torch.Tensor | None = None) -> torch.Tensor | None:
        """h' for hidden state h (batch, ..., d), or None when no adapter applies (h unchanged)."""
        if self.route is not None:
            return self._transform_routed(h, call, norm, u0)
        names = [n for n in self.active if n in self.adapters]
        if not names:
            return None
        u = u0
        for i, name in enumerate(names):
            if norm is not None and (i > 0 or u is None):
                u = norm(h)  # the next adapter reads the normalised updated stream
            d = getattr(self.adapters[name], call)(h if norm is None else u, h)
            h = h + d.to(h.dtype)
        return h if norm is None else norm(h)

    def _transform_routed(self, h: torch.Tensor, call: str, norm, u0) -> torch.Tensor | None:
        ids, names = self.route
        if ids.shape[0] != h.shape[0]:
            raise ValueError(f"adapter_ids has {ids.shape[0]} rows but the batch has {h.shape[0]}")
        u = h if norm is None else (u0 if u0 is not None else norm(h))
        out, changed = h, False
        for k in torch.unique(ids).tolist():
            if k < 0 or names[k] not in self.adapters:  # base-only rows, or adapter not at this site
                continue
            rows = (ids == k).nonzero().squeeze(1).to(h.device)
            d = getattr(self.adapters[names[k]], call)(u.index_select(0, rows), h.index_select(0, rows))
            out, changed = out.index_add(0, rows, d.to(out.dtype)), True
        if not changed:
            return None
        return out if norm is None else norm(out)

    # -- merge: impossible -------------------------------------------------------------
    def merge(self, names: list[str]) -> None:
        hit = [n for n in names if n in self.adapters]
        if hit:
            raise AdapterError(
                f"adapter {hit[0]!r} inserts a nonlinear module ({self.site.role} site at {self.site.hooks[0].path}); "
                "it cannot be merged into the base weights. Use it unmerged (it serves the same outputs)."
            )


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
