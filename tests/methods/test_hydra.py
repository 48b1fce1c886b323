"""Hydra (arXiv:2309.06922): parallel + sequential branches, exact merge (also with biases),
exact LoRA export at rank r + r_seq."""

import math

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import ConfigError
from lorakit.methods.hydra import HydraConfig
from lorakit.methods.lora import LoraConfig
from tests.conftest import logits_of, perturb, tiny_bert, tiny_gpt2, tiny_llama


def adapters(model, name="default"):
    return {p: layer.adapters[name] for p, layer in adapted_layers(model).items() if name in layer.adapters}


def test_branches_equal_their_definition():
    """Parallel branch on x, sequential branch on the frozen layer's output (no bias here)."""
    model = tiny_llama()
    base = model.model.layers[0].mlp.up_proj  # (64, 32), no bias
    lorakit.inject(model, HydraConfig(r=4, r_seq=2, alpha=8.0, target="up_proj"))
    perturb(model, scale=0.1)
    a = adapters(model)["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    base_out = base(x)
    par = a.par_B(a.par_A(x)) * (8.0 / 4)
    seq = a.seq_B(a.seq_A(base_out)) * (8.0 / 2)
    torch.testing.assert_close(a.delta(x, base_out), par + seq, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert])
def test_merge_is_exact_on_layers_with_bias(factory, tokens):
    model = factory()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the tiny models start with zero biases; make them count
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lorakit.inject(model, HydraConfig(r=4))
    perturb(model, scale=0.1)
    out = logits_of(model, tokens)
    lorakit.merge(model)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)


def test_stays_consistent_when_another_adapter_is_merged_underneath(tokens):
    """The sequential branch reads the W0 snapshot, not the live (merged-into) base output."""
    model = tiny_llama()
    lorakit.inject(model, HydraConfig(r=4), name="h")
    lorakit.inject(model, LoraConfig(r=4), name="l")
    perturb(model, "h", seed=1, scale=0.1)
    perturb(model, "l", seed=2, scale=0.1)
    out = logits_of(model, tokens)
    lorakit.merge(model, ["l"])
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)
    lorakit.merge(model, ["h"])
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)


def test_param_count():
    model = tiny_llama()
    lorakit.inject(model, HydraConfig(r=4, r_seq=2))
    expected = sum(4 * (a.spec.in_features + a.spec.out_features) + 2 * 2 * a.spec.out_features
                   for a in adapters(model).values())
    assert lorakit.trainable_parameters(model)[0] == expected


def test_default_scales_and_init():
    model = tiny_llama()
    lorakit.inject(model, HydraConfig(r=8, r_seq=4, alpha=16, target="q_proj"))
    a = next(iter(adapters(model).values()))
    assert (a.scale_par, a.scale_seq) == (2.0, 4.0)
    assert torch.count_nonzero(a.par_B.weight) == 0 and torch.count_nonzero(a.seq_B.weight) == 0
    assert torch.count_nonzero(a.delta_weight()) == 0
    assert set(a.state_dict()) == {"par_A.weight", "par_B.weight", "seq_A.weight", "seq_B.weight"}


def test_to_lora_exact_at_stacked_rank():
    model = tiny_gpt2()
    lorakit.inject(model, HydraConfig(r=4, r_seq=3, target="c_fc"))
    perturb(model, scale=0.1)
    a = next(iter(adapters(model).values()))
    A, B, s = a.to_lora()
    assert A.shape == (7, 32) and B.shape == (128, 7)
    torch.testing.assert_close(s * B @ A, a.delta_weight().detach(), rtol=0, atol=1e-6)
    A, B, _ = a.to_lora(2)
    assert A.shape == (2, 32) and B.shape == (128, 2)


@pytest.mark.parametrize("bad,match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r_seq": 0}, "r_seq must be a positive integer"),
    ({"alpha": -1}, "alpha must be a positive number"),
    ({"alpha": math.nan}, "alpha must be a positive number"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        HydraConfig(**bad)


def test_sequential_branch_sees_the_bias_and_merge_moves_it():
    """With a bias, h = W0x + b0 + s_p B_p A_p x + s_s B_s A_s (W0x + b0), as in the reference."""
    m = tiny_bert()
    lorakit.inject(m, HydraConfig(r=2, target="query"))
    perturb(m, scale=0.1)
    layer = m.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.base.bias.normal_()
    lorakit.delete(m, "default")  # rebuild so the adapter snapshots the non-zero bias
    lorakit.inject(m, HydraConfig(r=2, target="query"))
    perturb(m, scale=0.1)
    layer = m.bert.encoder.layer[0].attention.self.query
    a = layer.adapters["default"]
    x = torch.randn(3, 32)
    with torch.no_grad():
        base = layer.base(x)
        ref = base + a.scale_par * a.par_B(a.par_A(x)) + a.scale_seq * a.seq_B(a.seq_A(base))
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
        bias_before = layer.base.bias.clone()
        lorakit.merge(m)
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
        assert not torch.allclose(layer.base.bias, bias_before)
        lorakit.unmerge(m)
        torch.testing.assert_close(layer.base.bias, bias_before, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="shifts the layer bias"):
        a.to_lora()
