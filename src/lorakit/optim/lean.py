"""Lean activations: run a decoder's gated MLPs and RMSNorms with activation-lean autograd.

    from lorakit.optim import lean_activations
    report = lean_activations(model)    # {"mlp": 30, "norm": 61, "layers": 30, "skipped": []}
    lean_activations(model, False)      # back to the modules' own forward

Each gated MLP ``down(act(gate(x)) * up(x))`` then keeps g and u for backward instead of g,
act(g) and u, and each RMSNorm keeps x and 1/rms instead of (under bf16) an fp32 copy of x;
the math is in ``lorakit.ops.activations``. Each decoder layer holding such an MLP also runs
under a saved-tensor hook: the norm outputs and the gated product, which the adapters on the
next projections save for their weight gradients (LoRA's A needs its input), are stored as
"rebuild from what is kept anyway" (x and 1/rms; g and u) and rebuilt once in backward, shared
by every op that saved them. No matmul is recomputed. Forward values are unchanged and
gradients equal to float rounding (the gated product's are bit-identical). On SmolLM2-135M with
LoRA on every linear layer (batch 8 x 128) the bytes kept for backward fall from 663 MB to
348 MB in bf16 and from 1190 MB to 695 MB in fp32, at the same step time
(``benchmarks/memory.py``: int4 + LoRA peaks at 0.28x of full fine-tuning without
checkpointing). Gradient checkpointing keeps less still but recomputes every layer's forward;
when it is on, its hooks take precedence and the lean layers only keep the lean MLP/norm math.

A module is switched only if it has the expected parts (``gate_proj``/``up_proj``/
``down_proj``/``act_fn``; an RMSNorm with ``weight`` and ``variance_epsilon`` or ``eps``) and
its own forward gives the same output as the lean one on a random probe input; anything else
keeps its forward and is listed under "skipped". Adapters on the projections (LoRA etc.) keep
working: the lean MLP calls the same (possibly adapted) submodules, before or after injection
(the probes run in eval mode, so adapter dropout does not disturb them). An adapter with
dropout > 0 saves its own dropped copy of the input: only the lean MLP/norm math helps it.
"""

from __future__ import annotations

import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.ops.activations import gated_mlp_product, rms_norm

__all__ = ["lean_activations"]

_PROBE_ROWS = 4


class _Rebuild:
    """What a saved activation is packed as: a view of one registered output, rebuilt on first
    unpack and shared by the other ops that saved it (q, k and v save one norm output)."""

    __slots__ = ("entry", "shape")

    def __init__(self, entry, shape):
        self.entry, self.shape = entry, shape
        entry.pending += 1


class _Entry:
    """A registered output: how to rebuild it, and the rebuilt value while unpacks are pending."""

    __slots__ = ("fn", "pending", "value")

    def __init__(self, fn):
        self.fn, self.pending, self.value = fn, 0, None


class _Scope(threading.local):
    outputs: dict | None = None  # key of a tensor -> (tensor, _Entry), inside a lean layer


_SCOPE = _Scope()


def _key(t: torch.Tensor) -> tuple:
    # ops save reshaped views (F.linear saves x as (tokens, d)): same memory, same contiguous layout
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype, t.device)


def _pack(t: torch.Tensor):
    hit = _SCOPE.outputs.get(_key(t)) if _SCOPE.outputs is not None else None
    if hit is None or not t.is_contiguous():
        # detached: an op that saves its own output (sdpa, exp, ...) would otherwise hold a tensor
        # whose grad_fn is that op, a cycle through C++ that leaks an un-backpropagated graph.
        # The version is kept for the in-place check autograd skips for hooked tensors.
        return t.detach(), t._version
    return _Rebuild(hit[1], t.shape)  # hit: (the output, its _Entry)


def _unpack(saved):
    if isinstance(saved, _Rebuild):
        e = saved.entry
        if e.value is None:
            with torch.no_grad():
                e.value = e.fn()
        value = e.value
        e.pending -= 1
        if e.pending <= 0:  # the last op that saved it: let it go (a retain_graph rerun rebuilds it)
            e.value = None
        return value.view(saved.shape)
    t, version = saved
    if t._version != version:
        raise RuntimeError(f"a tensor of shape {tuple(t.shape)} saved for backward inside a lean decoder layer "
                           f"was modified in place (version {t._version}, saved at {version}); "
                           "switch the model back with lorakit.optim.lean_activations(model, False)")
    return t


def _other_hooks_active() -> bool:
    """True under gradient checkpointing (or anyone's saved-tensor hooks): theirs win."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _register(out: torch.Tensor, rebuild) -> None:
    """Inside a lean layer, a saved copy of `out` is packed as `rebuild` (same values, recomputed)."""
    if _SCOPE.outputs is not None and out.is_contiguous():  # (even without grad: adapters may save it)
        _SCOPE.outputs[_key(out)] = (out, _Entry(rebuild))  # holding `out` keeps its address unique


def _lean_layer(self, *args, **kwargs):
    if _SCOPE.outputs is not None or _other_hooks_active() or not torch.is_grad_enabled():
        return type(self).forward(self, *args, **kwargs)
    _SCOPE.outputs = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            return type(self).forward(self, *args, **kwargs)
    finally:
        _SCOPE.outputs = None


def _lean_mlp(self, x: torch.Tensor) -> torch.Tensor:
    g, u, act = self.gate_proj(x), self.up_proj(x), self._lorakit_lean
    h = gated_mlp_product(g, u, act)
    # the down projection's adapters save h; rebuilt from g and u, which the product keeps anyway
    # (detached: a closure over a tensor with grad_fn, stored in that graph, would be a cycle
    # that Python's gc cannot see, leaking the graph of a forward that is never backpropagated)
    gd, ud = g.detach(), u.detach()
    _register(h, lambda: gated_mlp_product(gd, ud, act))
    return self.down_proj(h)


def _lean_norm(self, x: torch.Tensor) -> torch.Tensor:
    w, eps, offset = self.weight, self._lorakit_lean_eps, self._lorakit_lean
    y = rms_norm(x, w, eps, offset)
    xd, wd = x.detach(), w.detach()
    _register(y, lambda: rms_norm(xd, wd, eps, offset))  # the next projections' adapters save y
    return y


def _probe(dim: int, like: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(_PROBE_ROWS, dim, generator=g).to(device=like.device, dtype=like.dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 2e-2
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def _mlp_act(m: nn.Module) -> str | None:
    """"silu" / "gelu_tanh" for a gated MLP with that activation, "" for a gated MLP with another
    activation, None for any other module."""
    if not all(isinstance(getattr(m, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    t = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        y = m.act_fn(t)
    if torch.allclose(y, F.silu(t), atol=1e-6):
        return "silu"
    if torch.allclose(y, F.gelu(t, approximate="tanh"), atol=1e-6):
        return "gelu_tanh"
    return ""


def _check_mlp(m: nn.Module, act: str, seed: int) -> bool:
    gate = m.gate_proj
    d = getattr(gate, "in_features", getattr(getattr(gate, "base", None), "in_features", None))  # adapted or not
    if not isinstance(d, int):
        return False
    dtypes = [t.dtype for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    device = next((t.device for t in (*m.parameters(), *m.buffers())), torch.device("cpu"))
    m._lorakit_lean = act
    for dtype in dict.fromkeys([*dtypes, torch.float32]):  # the first input dtype the module accepts
        x = _probe(d, torch.zeros((), device=device, dtype=dtype), seed)
        try:
            with torch.no_grad():
                want = m.forward(x)
        except RuntimeError:
            continue
        with torch.no_grad():
            return _same(want, _lean_mlp(m, x))
    return False


def _norm_parts(m: nn.Module):
    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not type(m).__name__.endswith("RMSNorm") or not isinstance(w, torch.Tensor) or w.dim() != 1 \
            or not isinstance(eps, float):
        return None
    return w, eps


def _check_norm(m: nn.Module, w: torch.Tensor, eps: float, seed: int) -> float | None:
    """The offset (0: w * x̂, 1: (1 + w) * x̂) that reproduces m's forward, or None."""
    x = _probe(w.shape[0], w, seed) * 3
    with torch.no_grad():
        want = m.forward(x)
        for offset in (0.0, 1.0):
            if _same(want, rms_norm(x, w, eps, offset)):
                return offset
    return None


_MARKS = ("_lorakit_lean", "_lorakit_lean_eps", "_lorakit_lean_layer")


def _restore(m: nn.Module) -> None:
    if any(k in m.__dict__ for k in _MARKS):
        m.__dict__.pop("forward", None)
        for k in _MARKS:
            m.__dict__.pop(k, None)


def lean_activations(model: nn.Module, enable: bool = True, seed: int = 0) -> dict:
    """Switch every recognised gated MLP and RMSNorm of `model` to activation-lean autograd, and
    their decoder layers to rebuilding those modules' outputs in backward instead of keeping the
    adapters' saved copies (enable=False switches all back).

    Returns {"mlp": n, "norm": n, "layers": n, "skipped": [names of look-alikes left as they were]}.
    """
    report: dict = {"mlp": 0, "norm": 0, "layers": 0, "skipped": []}
    for m in model.modules():
        _restore(m)
    if not enable:
        return report
    modes = {m: m.training for m in model.modules()}
    model.eval()  # deterministic probes (adapter dropout off)
    layers = []
    try:
        for name, m in model.named_modules():
            if "forward" in m.__dict__:
                continue  # someone else's per-instance forward: leave it
            act = _mlp_act(m)
            if act is not None:
                if act and _check_mlp(m, act, seed):
                    m.forward = types.MethodType(_lean_mlp, m)  # survives copy.deepcopy (rebinds)
                    report["mlp"] += 1
                    layers.append(name.rpartition(".")[0])
                else:
                    _restore(m)
                    report["skipped"].append(name)
                continue
            parts = _norm_parts(m)
            if parts is not None:
                offset = _check_norm(m, *parts, seed)
                if offset is None:
                    report["skipped"].append(name)
                    continue
                m._lorakit_lean, m._lorakit_lean_eps = offset, parts[1]
                m.forward = types.MethodType(_lean_norm, m)
                report["norm"] += 1
        for path in dict.fromkeys(layers):  # the MLPs' parents: decoder layers, norms inside
            layer = model.get_submodule(path) if path else model
            if "forward" not in layer.__dict__:
                layer._lorakit_lean_layer = True
                layer.forward = types.MethodType(_lean_layer, layer)
                report["layers"] += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    return report
