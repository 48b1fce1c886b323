"""Tests for lorakit.ops.loss: chunked fused linear + cross entropy."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError
from lorakit.ops.loss import causal_lm_loss, chunked_linear_cross_entropy

N, D, V = 37, 16, 50


def _data(seed=0, n=N, d=D, v=V, ignore_frac=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, y


def _grads(fn, h, w, b=None):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    args = (h, w) if b is None else (h, w, b.clone().requires_grad_(True))
    loss = fn(*args)
    loss.backward()
    return (loss.detach(),) + tuple(a.grad for a in args)


def _ref(h, w, y, reduction="mean", b=None, softcap=None):
    logits = F.linear(h.float(), w.float(), None if b is None else b.float())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, y, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 8, 1024])  # 37 rows: not divisible by 8
def test_matches_cross_entropy_value_and_grads(reduction, chunk_size):
    h, w, y = _data()
    assert (y == -100).any() and (y != -100).any()
    ref = _grads(lambda h, w: _ref(h, w, y, reduction), h, w)
    got = _grads(
        lambda h, w: chunked_linear_cross_entropy(h, w, y, chunk_size=chunk_size, reduction=reduction), h, w
    )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # ignored rows get exactly zero gradient
    assert torch.all(got[1][y == -100] == 0)


def test_bias_and_softcap_match_reference():
    h, w, y = _data(seed=1)
    b = torch.randn(V) * 0.1
    ref = _grads(lambda h, w, b: _ref(h, w, y, b=b, softcap=2.0), h, w, b)
    got = _grads(
        lambda h, w, b: chunked_linear_cross_entropy(h, w, y, chunk_size=5, bias=b, logit_softcap=2.0), h, w, b
    )
    for a, b_ in zip(got, ref):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    h, w, y = _data(seed=2, n=7, d=4, v=6)
    h, w = h.double().requires_grad_(True), w.double().requires_grad_(True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = lambda h, w, b: chunked_linear_cross_entropy(h, w, y, chunk_size=3, bias=b, logit_softcap=1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))
    assert fn(h, w, b).dtype == torch.float64


def test_frozen_weight_gets_no_grad_and_nothing_saved_for_it():
    h, w, y = _data(seed=3)
    h = h.requires_grad_(True)
    loss = chunked_linear_cross_entropy(h, w, y, chunk_size=8)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert [tuple(t.shape) for t in saved] == [(N, D)]
    loss.backward()
    torch.testing.assert_close(h.grad, torch.autograd.grad(_ref(h, w, y), h)[0], atol=1e-5, rtol=1e-5)
    assert w.grad is None


def test_grad_output_is_applied():
    h, w, y = _data(seed=4)
    h1 = h.clone().requires_grad_(True)
    (3.0 * chunked_linear_cross_entropy(h1, w, y, chunk_size=8)).backward()
    h2 = h.clone().requires_grad_(True)
    (3.0 * _ref(h2, w, y)).backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_is_zero_not_nan(reduction):
    h, w, _ = _data()
    y = torch.full((N,), -100)
    h = h.requires_grad_(True)
    w = w.requires_grad_(True)
    loss = chunked_linear_cross_entropy(h, w, y, chunk_size=8, reduction=reduction)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)
    assert not torch.isnan(h.grad).any()


def test_bf16_hidden():
    h, w, y = _data(seed=5, dtype=torch.bfloat16)
    ref = _grads(lambda h, w: _ref(h, w, y), h, w)  # fp32 logits from the bf16 values
    got = _grads(lambda h, w: chunked_linear_cross_entropy(h, w, y, chunk_size=8), h, w)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=1e-5)
    # the hidden grad is stored in bf16, like autograd would
    torch.testing.assert_close(got[1].float(), ref[1].float(), atol=1e-2, rtol=1e-2)


def test_bf16_weight_and_autocast_keep_fp32_accumulation():
    h, w, y = _data(seed=6)
    wb = w.bfloat16()
    ref = _ref(h, wb.float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_linear_cross_entropy(h, wb, y, chunk_size=8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_frozen_bf16_head_is_upcast_a_vocab_slice_at_a_time(monkeypatch, with_bias):
    """A frozen bf16 head: same loss and hidden grad as an fp32 copy of it, with the cast done
    in vocab slices (7 rows here: 50 = 7 x 7 + 1, so the last slice is ragged)."""
    import lorakit.ops.loss as loss_mod

    h, w, y = _data(seed=9)
    wb = w.bfloat16()
    b = (torch.randn(V) * 0.1) if with_bias else None
    hh = h.clone().requires_grad_(True)
    ref = _ref(hh, wb.float(), y, b=b)
    ref.backward()
    casts = []
    real_to = torch.Tensor.to

    def spy(t, *a, **k):
        out = real_to(t, *a, **k)
        if t.dtype == torch.bfloat16 and out.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == D:
            casts.append(t.shape[0])
        return out

    monkeypatch.setattr(loss_mod, "_VOCAB_SLICE", 7)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    hg = h.clone().requires_grad_(True)
    got = chunked_linear_cross_entropy(hg, wb, y, chunk_size=8, bias=b)
    got.backward()
    monkeypatch.undo()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hg.grad, hh.grad, atol=1e-5, rtol=1e-5)
    assert casts and max(casts) == 7  # never the whole (V, d) head in fp32


def test_batched_leading_dims():
    h, w, y = _data(seed=7, n=24)
    got = chunked_linear_cross_entropy(h.view(4, 6, D), w, y.view(4, 6), chunk_size=5)
    torch.testing.assert_close(got, _ref(h, w, y), atol=1e-5, rtol=1e-5)


def test_no_n_by_vocab_tensor_saved_for_backward():
    """Peak-memory proxy: naive CE keeps (N, V) logits for backward; the chunked loss must not."""
    n, d, v = 64, 8, 512
    h, w, y = _data(seed=8, n=n, d=d, v=v, ignore_frac=0.0)

    def saved_numels(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        hh = h.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(hh, ww)
        loss.backward()
        return sizes

    naive = saved_numels(lambda h, w: F.cross_entropy(h @ w.T, y))
    assert max(naive) >= n * v  # the probe does see the logits of the naive path
    chunked = saved_numels(lambda h, w: chunked_linear_cross_entropy(h, w, y, chunk_size=16))
    assert chunked and max(chunked) <= max(n * d, v * d)
    assert max(chunked) < n * v


def test_bad_inputs_raise():
    h, w, y = _data()
    with pytest.raises(ConfigError):
        chunked_linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ConfigError):
        chunked_linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ConfigError):
        chunked_linear_cross_entropy(h[:, :-1], w, y)
    with pytest.raises(ConfigError):
        chunked_linear_cross_entropy(h, w, y[:-1])
    bad = y.clone()
    bad[0] = V
    with pytest.raises(ConfigError, match="outside"):
        chunked_linear_cross_entropy(h, w, bad)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def test_causal_lm_loss_matches_transformers(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 8:] = -100  # padding
    with torch.no_grad():
        ref = model(ids, labels=labels).loss
        ref_n = model(ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss
        hidden = model.model(ids).last_hidden_state
    w = model.get_output_embeddings().weight
    torch.testing.assert_close(causal_lm_loss(hidden, w, labels, chunk_size=7), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        causal_lm_loss(hidden, w, labels, num_items_in_batch=torch.tensor(50)), ref_n, atol=1e-5, rtol=1e-5
    )
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(causal_lm_loss(hidden, w, None, shift_labels=shifted), ref, atol=1e-5, rtol=1e-5)


def test_causal_lm_loss_grads_match_transformers(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.model(ids).last_hidden_state
    causal_lm_loss(hidden, model.get_output_embeddings().weight, ids, chunk_size=4).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)
    model.zero_grad()


# -- causal_lm_distill_loss (LREC's CE + KL from hidden states) ------------------------------------
def _distill_data(seed=0, b=2, t=9, d=8, dt=6, v=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype)
    ht = torch.randn(b, t, dt, generator=g, dtype=dtype)
    wt = torch.randn(v, dt, generator=g, dtype=dtype)
    y = torch.randint(0, v, (b, t), generator=g)
    y[0, 3] = y[1, 5] = -100
    return h, w, ht, wt, y


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kl_weight", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_distill_loss_matches_lrec_loss_on_full_logits(temperature, kl_weight, with_labels):
    from lorakit.ops.loss import causal_lm_distill_loss
    from lorakit.quant import lrec_loss

    h, w, ht, wt, y = _distill_data()
    y = y if with_labels else None
    hr = h.clone().requires_grad_(True)
    ref = lrec_loss(hr @ w.T, ht @ wt.T, y, kl_weight=kl_weight, T=temperature)
    ref.backward()
    hg = h.clone().requires_grad_(True)
    got = causal_lm_distill_loss(hg, w, ht, wt, y, kl_weight=kl_weight, temperature=temperature, chunk_size=4)
    got.backward()
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(hg.grad, hr.grad, atol=1e-6, rtol=1e-5)


def test_distill_loss_keeps_no_logits_and_takes_a_bf16_teacher():
    from lorakit.ops.loss import causal_lm_distill_loss
    from lorakit.quant import lrec_loss

    h, w, ht, wt, y = _distill_data(seed=1, t=33, v=300, dtype=torch.float32)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    hg = h.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = causal_lm_distill_loss(hg, w, ht.bfloat16(), wt.bfloat16(), y, chunk_size=8)
    assert max(sizes) <= h.numel() < y.numel() * 300  # only dL/dh is kept, never (N, V)
    ref = lrec_loss(h @ w.T, ht.bfloat16().float() @ wt.bfloat16().float().T, y)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_distill_loss_bad_inputs():
    from lorakit.ops.loss import causal_lm_distill_loss

    h, w, ht, wt, y = _distill_data()
    with pytest.raises(ConfigError, match="temperature > 0"):
        causal_lm_distill_loss(h, w, ht, wt, y, temperature=0.0)
    with pytest.raises(ConfigError, match="shapes do not chain"):
        causal_lm_distill_loss(h, w, ht, wt[:, :4], y)
    with pytest.raises(ConfigError, match="leading shapes differ"):
        causal_lm_distill_loss(h, w, ht[:, :5], wt, y)
    with pytest.raises(ConfigError, match="frozen head"):
        causal_lm_distill_loss(h, w.clone().requires_grad_(True), ht, wt, y)
    with pytest.raises(ConfigError, match="outside"):
        causal_lm_distill_loss(h, w, ht, wt, torch.full_like(y, 999))
