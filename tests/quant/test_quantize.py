import copy

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import logits_of, tiny_llama
from torch import nn

import lorakit
import lorakit.core.inject
import lorakit.core.layer
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.quant import (
    QuantLinear,
    dequantize_weight,
    load_quantized,
    merge_lora_into_quantized,
    pack_codes,
    quantize_model,
    quantize_weight,
    quantized_modules,
    quantized_nbytes,
    save_quantized,
    unpack_codes,
)
from lorakit.quant import quantize as qmod

# Relative Frobenius error ‖W − Ŵ‖/‖W‖ of RTN on Gaussian weights, group_size 64, asymmetric
# (measured: int8 0.0054, int4 0.091, int2 0.457).
REL_BOUND = {8: 0.01, 4: 0.12, 2: 0.55}


def _bound(scales, group_size, d_in):
    return scales.repeat_interleave(group_size, dim=1)[:, :d_in] / 2


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size,d_in", [(64, 512), (128, 512), (64, 100)])  # 100: padded last group
def test_error_within_half_a_step(bits, symmetric, group_size, d_in):
    torch.manual_seed(bits)
    w = torch.randn(96, d_in) * 0.02
    w[3, :group_size] = 0.0  # an all-zero group stays exactly zero
    w[4, :group_size] = w[4, :group_size].abs() + 0.1  # an all-positive group
    q, s, z = quantize_weight(w, bits, group_size, symmetric)
    wd = dequantize_weight(q, s, z, bits, group_size, d_in)
    err = (w - wd).abs()
    assert (err <= _bound(s, group_size, d_in) * (1 + 1e-6) + 1e-9).all()  # |w − ŵ| ≤ s/2
    assert torch.equal(wd[3, :group_size], torch.zeros(group_size))
    if not symmetric and d_in == 512 and group_size == 64:
        w2 = w.clone()
        w2[3:5] = torch.randn(2, d_in) * 0.02  # the relative bound is for Gaussian rows
        q, s, z = quantize_weight(w2, bits, group_size, symmetric)
        rel = torch.linalg.norm(w2 - dequantize_weight(q, s, z, bits, group_size, d_in)) / torch.linalg.norm(w2)
        assert rel < REL_BOUND[bits]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_roundtrip_and_storage(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_memory_of_packed_weights(bits, symmetric):
    layer = QuantLinear.from_linear(nn.Linear(256, 128), bits=bits, group_size=64, symmetric=symmetric)
    n_groups = 128 * 256 // 64
    expected = 128 * 256 * bits // 8 + 4 * n_groups + (0 if symmetric else n_groups)
    assert layer.nbytes() == expected
    assert layer.qweight.numel() * layer.qweight.element_size() == 128 * 256 * bits // 8
    assert not any(p.numel() == 128 * 256 for p in layer.parameters())  # no fp weight parameter
    assert not any(b.is_floating_point() and b.numel() == 128 * 256 for b in layer.buffers())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_forward_and_input_grad_equal_dequantized_linear(bits):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(100, 48), bits=bits, group_size=32)
    x = torch.randn(3, 5, 100, requires_grad=True)
    y = layer(x)
    (y * torch.arange(48.0)).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, layer.weight, layer.bias)
    (y2 * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in layer.parameters())
    assert layer.weight.shape == (48, 100) and layer.weight.dtype == torch.float32


def test_chunked_dequantization_matches(monkeypatch):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 50), bits=4, group_size=32)
    x = torch.randn(4, 64, requires_grad=True)
    y_full = layer(x)
    (g_full,) = torch.autograd.grad(y_full.square().sum(), x)
    monkeypatch.setattr(qmod, "_CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk, last chunk partial
    assert len(list(layer.weight_chunks(torch.float32))) == 8
    y = layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, y_full)
    torch.testing.assert_close(g, g_full)


def test_backward_keeps_no_dense_weight():
    """Autograd must not hold the dequantized (d_out, d_in) weight between forward and backward."""
    layer = QuantLinear.from_linear(nn.Linear(96, 80), bits=4, group_size=32)
    saved = []
    x = torch.randn(2, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert (80, 96) not in saved and (96, 80) not in saved


def test_bf16_input():
    layer = QuantLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=64)
    y = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_config_errors():
    with pytest.raises(ConfigError, match="bits must be one of"):
        QuantLinear(64, 32, bits=3)
    with pytest.raises(ConfigError, match="group_size must be a positive integer multiple of 4"):
        quantize_weight(torch.randn(4, 64), bits=2, group_size=6)
    with pytest.raises(ConfigError, match="group_size"):
        quantize_model(tiny_llama(), bits=4, group_size=0)
    with pytest.raises(ConfigError, match="matched no nn.Linear"):
        quantize_model(tiny_llama(), targets=["nope"])


def test_quantize_model_replaces_linears_but_not_head():
    model = tiny_llama()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    fp_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    ref = copy.deepcopy(model)
    quantize_model(model, bits=8, group_size=32)
    q = quantized_modules(model)
    assert len(q) == n_linear - 1 and "lm_head" not in q and isinstance(model.lm_head, nn.Linear)
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(logits_of(model, ids), logits_of(ref, ids), atol=2e-2, rtol=0)
    quantize_model(ref, bits=4, group_size=32, targets=["q_proj", "v_proj"])
    assert set(quantized_modules(ref)) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    int4 = quantize_model(tiny_llama(), bits=4, group_size=32)
    numel = fp_bytes // 4
    assert quantized_nbytes(int4) == numel // 2 + numel // 32 * (4 + 1)  # codes + fp32 scale + uint8 zero
    assert quantized_nbytes(int4) <= 0.165 * fp_bytes  # (0.5 + 5/32) / 4 = 16.4%


def test_save_load_roundtrip(tmp_path):
    model = quantize_model(tiny_llama(), bits=4, group_size=32)
    ids = torch.randint(0, 128, (2, 10))
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)  # built from config.json
    assert set(quantized_modules(loaded)) == set(quantized_modules(model))
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), atol=0, rtol=0)
    into = load_quantized(tmp_path, model=tiny_llama(seed=5))  # into a given skeleton
    torch.testing.assert_close(logits_of(into, ids), logits_of(model, ids), atol=0, rtol=0)
    with pytest.raises(AdapterError, match="no quantization.json"):
        load_quantized(tmp_path / "missing")
    with pytest.raises(AdapterError, match="call quantize_model first"):
        save_quantized(tiny_llama(), tmp_path / "plain")


def test_lora_on_quantized_base_trains_and_merges(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(tiny_llama(), bits=4, group_size=32)
    ids = torch.randint(0, 128, (2, 10))
    base_logits = logits_of(model, ids)
    lorakit.inject(model, LoraConfig(r=4, target="all-linear"))
    assert all(isinstance(layer.base, QuantLinear) for layer in lorakit.core.inject.adapted_layers(model).values())
    torch.testing.assert_close(logits_of(model, ids), base_logits)  # zero-init LoRA
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("adapters.default" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    with pytest.raises(AdapterError, match="before attaching adapters"):
        quantize_model(model)
    with pytest.raises(AdapterError, match="eject"):
        save_quantized(model, tmp_path)
    adapted = logits_of(model, ids)
    assert not torch.allclose(adapted, base_logits)
    with pytest.raises(AdapterError, match="merge_lora_into_quantized"):  # plain merge would lose the adapter
        lorakit.merge(model)
    torch.testing.assert_close(logits_of(model, ids), adapted)
    # the adapter file holds adapter tensors only and loads onto a re-loaded quantized base
    lorakit.save(model, tmp_path / "adapter")
    save_quantized(lorakit.eject(copy.deepcopy(model)), tmp_path / "base")
    fresh = load_quantized(tmp_path / "base")
    lorakit.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits_of(fresh, ids), adapted)
    errors = merge_lora_into_quantized(model, "default")
    assert len(errors) == 14 and all(0 < e < REL_BOUND[4] for e in errors.values())
    assert lorakit.adapter_names(model) == [] and len(quantized_modules(model)) == 14
    assert all(isinstance(m, QuantLinear) for m in quantized_modules(model).values())
    merged = logits_of(model, ids)
    assert (merged - adapted).abs().max() < (adapted - base_logits).abs().max() + 0.05
    with pytest.raises(AdapterError, match="unknown adapter"):
        merge_lora_into_quantized(model, "default")
