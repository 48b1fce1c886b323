"""Per-group int8 / int4 / int2 weight quantization of Linear layers, on CPU, in pure PyTorch.

A quantized base is frozen: LoRA (or any lorakit linear adapter) trains on top of it, and the
base weight is rebuilt from its packed codes only for the duration of one matmul.

Quantization (round-to-nearest, RTN), for each row of W (d_out, d_in) and each group of
`group_size` consecutive input columns (the last group is zero-padded):

    asymmetric (default):  lo = min(min(w), 0), hi = max(max(w), 0)
                           s  = (hi - lo) / (2^b - 1),   z = round(-lo / s)  (integer, 0 ≤ z ≤ 2^b - 1)
                           q  = clamp(round(w / s) + z, 0, 2^b - 1)
    symmetric:             s  = max|w| / (2^(b-1) - 1),  z = 2^(b-1)          (fixed, not stored)
                           q  = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) + z
    dequantize:            ŵ  = (q - z) · s

Error bound (tested): |w - ŵ| ≤ s/2 for every element, with the s of its group. The range is
widened to contain 0 so that z is an exact integer in [0, 2^b - 1]; then w/s + z lies in
[-0.5, 2^b - 1 + 0.5] and clamping never costs more than the rounding does. A group of zeros
gets s = 1 (ŵ = 0 exactly).

Storage (what `QuantLinear` keeps; no fp32 copy of the weight):
    qweight  uint8 (d_out, d_in_padded · b / 8)   codes packed 8/b per byte, low bits first
             (b = 8: one code per byte; b = 4: two; b = 2: four)
    scales   fp32  (d_out, n_groups)
    zeros    uint8 (d_out, n_groups)               asymmetric only
    bias     the original bias (frozen), or None
so int4 with group_size 64 costs 0.5 + 5/64 ≈ 0.58 bytes per weight (14.5% of fp32).

Forward: y = x Ŵᵀ + b through `_QuantMatmul`, which dequantizes Ŵ in row chunks into a
temporary and saves only the (small) packed buffers for backward, where it dequantizes again
to produce dL/dx = dL/dy · Ŵ. The weight gets no gradient (it is frozen). So training keeps
no fp32 copy of any quantized layer alive between forward and backward.

Using lorakit adapters on a quantized base needs `wrapper_for` to accept a `QuantLinear`
(which carries `lorakit_linear = True`, `in_features`, `out_features` and a read-only
`weight` property returning Ŵ in fp32). Merging an adapter into a quantized base is not the
ordinary `lorakit.merge` (that adds ΔW in place, which a rebuilt temporary cannot take): use
`merge_lora_into_quantized`, which re-quantizes W + ΔW and reports the error it made.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import AdapterError, ConfigError

__all__ = [
    "SUPPORTED_BITS",
    "QuantLinear",
    "dequantize_weight",
    "load_quantized",
    "merge_lora_into_quantized",
    "pack_codes",
    "quantize_model",
    "quantize_weight",
    "quantized_modules",
    "quantized_nbytes",
    "save_quantized",
    "unpack_codes",
]

SUPPORTED_BITS = (8, 4, 2)
_CHUNK_ELEMENTS = 1 << 22  # at most 4M dequantized weights (16 MB fp32) alive per chunk
_FORMAT = "lorakit-quant"
_CONFIG_FILE = "quantization.json"
_WEIGHTS_FILE = "model.safetensors"


def check_quant_settings(bits: int, group_size: int) -> None:
    """ConfigError unless `bits` is supported and `group_size` packs whole bytes."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % (8 // bits):
        raise ConfigError(
            f"group_size must be a positive integer multiple of {8 // bits} for {bits}-bit codes, got {group_size!r}"
        )


# -- packing -------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2^bits) of shape (rows, n) -> (rows, n·bits/8) uint8, low bits first."""
    per = 8 // bits
    if per == 1:
        return codes.to(torch.uint8).contiguous()
    rows, n = codes.shape
    c = codes.to(torch.uint8).reshape(rows, n // per, per)
    out = torch.zeros(rows, n // per, dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= c[..., j] << (bits * j)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (rows, m) uint8 -> (rows, m·8/bits) uint8 codes."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(packed.shape[0], -1)


# -- quantize / dequantize -----------------------------------------------------------------
@torch.no_grad()
def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 64, symmetric: bool = False):
    """W (d_out, d_in) -> (qweight, scales, zeros or None); see the module docstring."""
    check_quant_settings(bits, group_size)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(w.shape)}")
    d_out, d_in = w.shape
    n_groups = -(-d_in // group_size)
    wf = w.detach().float()
    if n_groups * group_size != d_in:  # zero padding changes neither min/max (range holds 0) nor max|w|
        wf = F.pad(wf, (0, n_groups * group_size - d_in))
    g = wf.reshape(d_out, n_groups, group_size)  # (d_out, n_groups, group_size)
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        s = g.abs().amax(-1) / (half - 1)  # (d_out, n_groups)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(g / s.unsqueeze(-1)), -half, half - 1) + half
        zeros = None
    else:
        lo = g.amin(-1).clamp(max=0)
        hi = g.amax(-1).clamp(min=0)
        s = (hi - lo) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo / s), 0, qmax)  # (d_out, n_groups)
        q = torch.clamp(torch.round(g / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, qmax)
        zeros = z.to(torch.uint8)
    qweight = pack_codes(q.reshape(d_out, -1).to(torch.uint8), bits)
    return qweight, s.contiguous(), zeros


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(qweight, scales, zeros) of some rows -> Ŵ (rows, in_features) in `dtype`."""
    rows, n_groups = scales.shape
    codes = unpack_codes(qweight, bits).reshape(rows, n_groups, group_size).float()
    z = zeros.float() if zeros is not None else torch.full_like(scales, float(1 << (bits - 1)))
    w = (codes - z.unsqueeze(-1)) * scales.unsqueeze(-1)  # (rows, n_groups, group_size)
    return w.reshape(rows, -1)[:, :in_features].to(dtype)


# -- the layer -------------------------------------------------------------------------------
class _QuantMatmul(torch.autograd.Function):
    """y = x Ŵᵀ with Ŵ rebuilt per row chunk; backward rebuilds it again for dL/dx only."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer  # holds only packed buffers; nothing fp32 of size d_out x d_in is saved
        outs = [F.linear(x, w) for w in layer.weight_chunks(x.dtype)]
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            start = 0
            for w in layer.weight_chunks(grad_out.dtype):  # w: (rows, d_in)
                g = grad_out[..., start:start + w.shape[0]] @ w  # (..., d_in)
                grad_x = g if grad_x is None else grad_x + g
                start += w.shape[0]
        return grad_x, None


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored as packed `bits`-bit per-group codes.

    Args:
        in_features, out_features: as nn.Linear.
        bits: 8, 4 or 2 (default 4).
        group_size: input columns sharing one scale (and zero point) per output row (default 64).
        symmetric: symmetric codes without a stored zero point (default False: asymmetric).
        bias: whether the layer has a (frozen) bias.

    forward: x (..., in_features) -> (..., out_features), = F.linear(x, self.weight, self.bias).
    """

    lorakit_linear = True  # duck-typed marker for lorakit.core.layer.wrapper_for
    lorakit_quantized = True  # `weight` is a rebuilt temporary: in-place merges cannot work

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 symmetric: bool = False, bias: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        check_quant_settings(bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.compute_dtype = dtype  # dtype of the dequantized weight (and `weight`)
        n_groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, n_groups * group_size * bits // 8,
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64,
                    symmetric: bool = False) -> QuantLinear:
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bits, group_size, symmetric,
                bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        q.set_weight(w)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        q.train(linear.training)
        return q

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """(Re-)quantize the layer to hold W (d_out, d_in)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} != ({self.out_features}, {self.in_features})")
        qweight, scales, zeros = quantize_weight(w, self.bits, self.group_size, self.symmetric)
        self.qweight.copy_(qweight)
        self.scales.copy_(scales)
        if zeros is not None:
            self.zeros.copy_(zeros)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """Ŵ (or rows of it) as a fresh dense tensor."""
        zeros = None if self.zeros is None else self.zeros[rows]
        return dequantize_weight(self.qweight[rows], self.scales[rows], zeros, self.bits, self.group_size,
                                 self.in_features, dtype or self.compute_dtype)

    def weight_chunks(self, dtype: torch.dtype):
        """Ŵ in consecutive row blocks of at most ~_CHUNK_ELEMENTS entries."""
        step = max(1, _CHUNK_ELEMENTS // max(1, self.in_features))
        for start in range(0, self.out_features, step):
            yield self.dequantize(dtype, slice(start, start + step))

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the dequantized weight Ŵ (d_out, d_in), rebuilt on every access."""
        return self.dequantize()

    def nbytes(self) -> int:
        """Bytes of the quantized weight storage (packed codes + scales + zero points)."""
        bufs = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return sum(b.numel() * b.element_size() for b in bufs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else self.compute_dtype
        y = _QuantMatmul.apply(x.to(dtype), self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")


# -- whole models ---------------------------------------------------------------------------
def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Module path -> QuantLinear (also inside lorakit wrappers)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantized_nbytes(model: nn.Module) -> int:
    return sum(m.nbytes() for m in quantized_modules(model).values())


def _select(model: nn.Module, targets, exclude) -> list[str]:
    from lorakit.core.inject import match_targets, name_matches, output_head_names

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if not (targets == "all-linear" or isinstance(targets, (str, list, tuple))):
        raise ConfigError(f"targets must be 'all-linear', a list of module names or a regex, got {targets!r}")
    chosen = match_targets(linears, targets, heads=output_head_names(model))
    if exclude:
        chosen = [n for n in chosen if not name_matches(n, exclude)]
    if not chosen:
        raise ConfigError(f"targets {targets!r} matched no nn.Linear module "
                          f"(linear modules: {sorted({n.split('.')[-1] for n in linears})})")
    return chosen


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, targets="all-linear",
                   symmetric: bool = False, exclude: list[str] | None = None) -> nn.Module:
    """Replace the selected nn.Linear modules by `QuantLinear` in place (one at a time, so the
    fp32 weights are released as we go). `targets`: "all-linear" (every nn.Linear except the
    output head), a list of module names (suffix match) or a regex (full match on the path).
    Quantize before attaching adapters. Returns the model.
    """
    check_quant_settings(bits, group_size)
    from lorakit.core.layer import AdaptedLayer

    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise AdapterError("quantize the base model before attaching adapters (found a lorakit wrapper)")
    for path in _select(model, targets, exclude):
        _set_submodule(model, path, QuantLinear.from_linear(model.get_submodule(path), bits, group_size, symmetric))
    for m in quantized_modules(model).values():
        m.requires_grad_(False)
    return model


def _layout(model: nn.Module) -> dict:
    from lorakit.core.layer import AdaptedLayer

    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise AdapterError("save_quantized saves the base model only; save adapters with lorakit.save "
                           "and remove them (lorakit.eject) first")
    mods = {p: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
                "group_size": m.group_size, "symmetric": m.symmetric, "bias": m.bias is not None}
            for p, m in quantized_modules(model).items()}
    if not mods:
        raise AdapterError("model has no quantized (QuantLinear) module; call quantize_model first")
    return mods


def save_quantized(model: nn.Module, directory: str) -> None:
    """Write `quantization.json` (format, per-module bits/group size/shape) and `model.safetensors`
    (the whole state dict: packed codes, scales, zero points, and every non-quantized tensor),
    plus the transformers config (`config.json`) when the model has one."""
    from safetensors.torch import save_model

    modules = _layout(model)
    os.makedirs(directory, exist_ok=True)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "save_pretrained"):
        cfg.save_pretrained(directory)  # unchanged, so lorakit's base-config hash still matches
    save_model(model, os.path.join(directory, _WEIGHTS_FILE))  # drops tied duplicates
    with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
        json.dump({"format": _FORMAT, "version": 1, "architecture": type(model).__name__, "modules": modules}, f, indent=1, sort_keys=True)


def load_quantized(directory: str, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by `save_quantized`.

    `model`: an unquantized model of the same architecture to load into (its Linear weights are
    replaced); when None it is built from `config.json` with the transformers class that was saved
    (its random fp32 weights exist only until each layer is swapped, so loading briefly needs the
    fp32 model's memory; pass a skeleton built on a smaller dtype to avoid that).
    """
    from safetensors.torch import load_model

    path = os.path.join(directory, _CONFIG_FILE)
    if not os.path.exists(path):
        raise AdapterError(f"{directory!r} has no {_CONFIG_FILE}; not written by save_quantized")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT:
        raise AdapterError(f"{path} has format {meta.get('format')!r}, expected {_FORMAT!r}")
    if model is None:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(directory)
        arch = meta.get("architecture") or (getattr(cfg, "architectures", None) or [None])[0]
        if arch is None or not hasattr(transformers, arch):
            raise AdapterError(f"config.json in {directory!r} names no known architecture ({arch!r}); pass model=")
        model = getattr(transformers, arch)(cfg)
    for p, spec in meta["modules"].items():
        old = model.get_submodule(p)
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise AdapterError(f"module {p!r} is a {type(old).__name__}, expected a Linear")
        _set_submodule(model, p, QuantLinear(spec["in_features"], spec["out_features"], spec["bits"],
                                             spec["group_size"], spec["symmetric"], spec["bias"],
                                             device=old.weight.device if isinstance(old, nn.Linear) else None))
    missing, unexpected = load_model(model, os.path.join(directory, _WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise AdapterError(f"state mismatch loading {directory!r}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    for m in quantized_modules(model).values():
        m.requires_grad_(False)
    return model.eval()


# -- merging an adapter into a quantized base -----------------------------------------------------
@torch.no_grad()
def merge_lora_into_quantized(model: nn.Module, name: str = "default") -> dict[str, float]:
    """Fold adapter `name` into the base for good and remove the adapter.

    On quantized layers: W' = quantize(Ŵ + ΔW) with the layer's bits / group size; the returned
    dict maps each such module path to ‖deq(W') − (Ŵ + ΔW)‖_F / ‖Ŵ + ΔW‖_F (the error the
    re-quantization made). Non-quantized adapted layers are merged exactly (error 0.0).
    This cannot be undone (the re-quantized weight does not remember ΔW).
    """
    from lorakit.core.inject import _check_known, adapted_layers, check_not_merged, delete_adapter

    _check_known(model, name)
    check_not_merged(model, name)
    errors = {}
    for path, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        if isinstance(layer.base, QuantLinear):
            base = layer.base
            target = base.dequantize(torch.float32) + adapter.delta_weight().float()
            base.set_weight(target)
            hook = getattr(adapter, "delta_bias", None)
            db = hook() if hook is not None else None
            if db is not None:
                base.bias += db.to(base.bias.dtype)
            err = torch.linalg.norm(base.dequantize(torch.float32) - target) / torch.linalg.norm(target).clamp_min(1e-30)
            errors[path] = float(err)
        else:
            layer.merge([name])
            layer.merged.remove(name)  # the update now belongs to the base weight
            errors[path] = 0.0
    delete_adapter(model, name)
    return errors
