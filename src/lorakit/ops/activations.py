"""Activation-lean autograd for the two element-wise blocks of a Llama-style decoder layer.

PyTorch's autograd keeps every intermediate an op needs for its own backward. For the
gated MLP ``down(act(gate(x)) * up(x))`` that is g = gate(x) (for act's backward), act(g)
and u = up(x) (for the product's backward): three (tokens x d_ff) tensors. For the RMSNorm
``w * cast(x_f32 * rsqrt(mean(x_f32^2) + eps))`` under bf16 it is an fp32 copy of x as well.
With a frozen (e.g. int4) base and LoRA on top these saved intermediates are most of a
training step's memory, so the two functions below keep only what backward cannot cheaply
rebuild and recompute the rest (element-wise, O(tokens x d) work, no matmul):

    gated_mlp_product(g, u, act):  h = act(g) * u                 saves g, u (not act(g))
        dL/du = dL/dh * act(g)                     act(g) recomputed
        dL/dg = dL/dh * u * act'(g)                aten's silu_backward / gelu_backward (tanh):
          silu: act'(g) = s (1 + g (1 - s)), s = sigmoid(g)   the kernels eager autograd runs

    rms_norm(x, w, eps, offset):  y = (w + offset) * cast(x̂),  x̂ = x_f32 * r,  r = rsqrt(mean(x_f32^2) + eps)
                                                                  saves x (its own dtype), r (tokens x 1)
        dL/dx̂ = dL/dy * (w + offset)
        dL/dx  = r * (dL/dx̂ - x̂ * mean(dL/dx̂ * x̂))
        dL/dw  = sum_rows dL/dy * cast(x̂)        (only when w is trained)

Both match the eager modules they replace (``LlamaMLP``-style SwiGLU / GeGLU, ``LlamaRMSNorm``
and Gemma's ``1 + w`` variant) to float rounding; ``lorakit.optim.lean`` installs them only
after checking that on a probe input. The idea is "selective activation recomputation"
(Korthikanti et al., 2022, arXiv:2205.05198): recompute what is cheap, keep what is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "gated_mlp_product", "rms_norm"]

ACTIVATIONS = ("silu", "gelu_tanh")


def _f32(t: torch.Tensor) -> torch.Tensor:
    """fp32 at least (bf16/fp16 upcast, fp64 kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _act(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


class _GatedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, act):
        ctx.act = act
        ctx.save_for_backward(g, u)
        return _act(g, act) * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        dg = du = None
        # exactly eager autograd's math for act(g) * u: the same kernels, the same roundings
        if ctx.needs_input_grad[1]:
            du = grad * _act(g, ctx.act)
        if ctx.needs_input_grad[0]:
            gu = grad * u
            dg = (torch.ops.aten.silu_backward(gu, g) if ctx.act == "silu"
                  else torch.ops.aten.gelu_backward(gu, g, approximate="tanh"))
        return dg, du, None


def gated_mlp_product(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(g) * u, keeping only g and u for backward.

    g, u: (..., d_ff) of one dtype; act: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    Returns (..., d_ff) in that dtype.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"gate and up must have one shape and dtype, got {tuple(g.shape)} {g.dtype} "
                         f"and {tuple(u.shape)} {u.dtype}")
    if not (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad)):
        return _act(g, act) * u
    return _GatedProduct.apply(g, u, act)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, offset):
        xhat, r = _normalized(x, eps)
        ctx.offset = offset
        ctx.save_for_backward(x, w, r)
        return _scale(w, offset, xhat, x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w, r = ctx.saved_tensors
        xhat = _f32(x) * r  # (..., d) fp32, rebuilt
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gx = _f32(grad * w) if ctx.offset == 0 else _f32(grad) * (_f32(w) + ctx.offset)
            dx = (r * (gx - xhat * (gx * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            y = xhat.to(x.dtype) if ctx.offset == 0 else xhat
            dw = (_f32(grad) * _f32(y)).reshape(-1, x.shape[-1]).sum(0).to(w.dtype)
        return dx, dw, None, None


def _normalized(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ = x_f32 * r, r = rsqrt(mean(x_f32^2) + eps)), r of shape (..., 1)."""
    xf = _f32(x)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * r, r


def _scale(w: torch.Tensor, offset: float, xhat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # xhat fp32. Llama: w * cast(x̂) (type promotion with w);  Gemma: cast(x̂ * (1 + w_f32)).
    return w * xhat.to(dtype) if offset == 0 else (xhat * (offset + _f32(w))).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm keeping only x and the per-row 1/rms for backward.

    offset 0: Llama/Qwen/Mistral, ``weight * (x_f32 * r).to(x.dtype)``;
    offset 1: Gemma, ``((x_f32 * r) * (1 + weight_f32)).to(x.dtype)`` (normalised in fp32 as Gemma does).
    x: (..., d); weight: (d,). Returns (..., d).
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _scale(weight, offset, _normalized(x, eps)[0], x.dtype)
    return _RMSNorm.apply(x, weight, eps, offset)
