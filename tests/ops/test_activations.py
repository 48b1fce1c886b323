"""lorakit.ops.activations: activation-lean gated product and RMSNorm equal the eager math,
in values and gradients, while saving less for backward."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops.activations import gated_mlp_product, rms_norm


def _saved(fn, *inputs):
    """(output, [saved tensors]) of fn(*inputs) with every input requiring grad."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return out, saved


def _grads(fn, inputs, seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


def _eager_act(act):
    return F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_product_matches_eager(act, dtype):
    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(3, 5, 16, generator=gen) * 3).to(dtype), torch.randn(3, 5, 16, generator=gen).to(dtype)
    want, want_grads = _grads(lambda g, u: _eager_act(act)(g) * u, (g, u))
    got, got_grads = _grads(lambda g, u: gated_mlp_product(g, u, act), (g, u))
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same kernels as eager autograd:
    for a, b in zip(got_grads, want_grads):  # bit-identical values and gradients
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gated_product_saves_only_gate_and_up():
    g, u = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    _, eager = _saved(lambda g, u: F.silu(g) * u, g, u)
    _, lean = _saved(gated_mlp_product, g, u)
    assert sum(t.numel() for t in eager) == 3 * g.numel()  # g, silu(g), u
    assert sum(t.numel() for t in lean) == 2 * g.numel()
    assert {t.data_ptr() for t in lean} == {g.data_ptr(), u.data_ptr()}


def test_gated_product_without_grad_saves_nothing_and_checks_args():
    g, u = torch.randn(2, 8), torch.randn(2, 8)
    out, saved = _saved(gated_mlp_product, g, u)
    assert saved == [] and torch.equal(out, F.silu(g) * u)
    with pytest.raises(ValueError, match="act must be one of"):
        gated_mlp_product(g, u, "relu")
    with pytest.raises(ValueError, match="one shape and dtype"):
        gated_mlp_product(g, u[:, :4])


def _llama_norm(x, w, eps):  # transformers' LlamaRMSNorm.forward
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _gemma_norm(x, w, eps):  # transformers' Gemma3RMSNorm.forward
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


@pytest.mark.parametrize("offset,eager", [(0.0, _llama_norm), (1.0, _gemma_norm)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_eager_with_trained_weight(offset, eager, dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 7, 24, generator=gen) * 4).to(dtype)
    w = (torch.rand(24, generator=gen) + 0.5).to(dtype)
    want, want_grads = _grads(lambda x, w: eager(x, w, 1e-6), (x, w))
    got, got_grads = _grads(lambda x, w: rms_norm(x, w, 1e-6, offset), (x, w))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_rms_norm_keeps_no_fp32_copy_of_a_bf16_input():
    x = torch.randn(4, 6, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, dtype=torch.bfloat16)  # frozen
    _, eager = _saved(lambda x: _llama_norm(x, w, 1e-6), x)
    _, lean = _saved(lambda x: rms_norm(x, w, 1e-6), x)
    big = x.numel()
    assert any(t.dtype == torch.float32 and t.numel() == big for t in eager)  # the upcast copy
    assert not any(t.dtype == torch.float32 and t.numel() == big for t in lean)
    assert sum(t.numel() * t.element_size() for t in lean) < sum(t.numel() * t.element_size() for t in eager) / 2


def test_rms_norm_gradcheck_and_bad_weight():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6, 0.0), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6, 1.0), (x, w))
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: gated_mlp_product(g, u, "silu"), (g, u))
    assert torch.autograd.gradcheck(lambda g, u: gated_mlp_product(g, u, "gelu_tanh"), (g, u))
    with pytest.raises(ValueError, match="does not match the last dim"):
        rms_norm(torch.randn(2, 5), torch.ones(4), 1e-6)
