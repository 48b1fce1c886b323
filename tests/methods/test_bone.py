"""Bone / MiSS (arXiv:2409.15371): block-affine update, parity with PEFT's MiSS, exact merge,
r·d_out parameters per module, clear errors for shapes the variant cannot split."""

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import ConfigError
from lorakit.methods.bone import BoneConfig
from tests.conftest import logits_of, randomize, tiny_bert, tiny_llama


def adapters(model, name="default"):
    return {p: layer.adapters[name] for p, layer in adapted_layers(model).items()}


def test_bat_update_is_block_affine():
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.k_proj.weight.detach().clone()  # (16, 32)
    lorakit.inject(model, BoneConfig(r=8, target="k_proj"))
    randomize(model)
    a = adapters(model)["model.layers.0.self_attn.k_proj"]
    dw, beta = a.delta_weight().detach(), a.miss_block.detach()
    assert beta.shape == (2, 8, 8)
    for i in range(2):
        for j in range(4):
            blk = w0[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
            torch.testing.assert_close(dw[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8], blk @ beta[i] + beta[i])


@pytest.mark.parametrize("variant,init_weights,r", [("bat", "bat", 8), ("miss", True, 8), ("miss", True, 5)])
def test_matches_peft_miss(variant, init_weights, r, tokens):
    from peft import MissConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(tiny_llama(), MissConfig(r=r, init_weights=init_weights, target_modules=targets))
    ours = tiny_llama()
    lorakit.inject(ours, BoneConfig(r=r, variant=variant, target=targets))
    randomize(ours)
    found = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "miss_block" in name:
                path = name.removeprefix("base_model.model.").split(".miss_block")[0]
                p.copy_(adapters(ours)[path].miss_block)
                found += 1
    assert found == 6
    peft_model.eval()
    torch.testing.assert_close(logits_of(ours, tokens), logits_of(peft_model, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["bat", "miss"])
def test_param_count_is_r_times_d_out(variant):
    model = tiny_bert()
    lorakit.inject(model, BoneConfig(r=8, variant=variant))
    expected = sum(8 * a.spec.out_features for a in adapters(model).values())
    assert lorakit.trainable_parameters(model)[0] == expected


def test_miss_with_partial_last_block_merges_exactly(tokens):
    model = tiny_llama()
    lorakit.inject(model, BoneConfig(r=5, variant="miss"))  # d_in 32 and 64 are not multiples of 5
    randomize(model)
    out = logits_of(model, tokens)
    lorakit.merge(model)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)


def test_bat_update_uses_the_snapshot_not_the_live_weight():
    model = tiny_llama()
    lorakit.inject(model, BoneConfig(r=8, target="q_proj"))
    randomize(model)
    a = adapters(model)["model.layers.0.self_attn.q_proj"]
    before = a.delta_weight().detach().clone()
    lorakit.merge(model)
    torch.testing.assert_close(a.delta_weight().detach(), before, rtol=0, atol=0)
    assert "w0" not in a.state_dict()  # never saved


def test_bat_indivisible_shape_is_a_clear_error_and_leaves_the_model_alone():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"needs r to divide.*k_proj.*d_out=16, d_in=32.*got r=32"):
        lorakit.inject(model, BoneConfig(r=32, target=["q_proj", "k_proj"]))
    assert not adapted_layers(model)


def test_miss_rank_above_d_in_is_an_error():
    with pytest.raises(ConfigError, match="exceeds d_in=32"):
        lorakit.inject(tiny_llama(), BoneConfig(r=40, variant="miss", target="q_proj"))


def test_to_lora():
    model = tiny_llama()
    lorakit.inject(model, BoneConfig(r=8, variant="miss", target="q_proj"), name="m")
    lorakit.inject(model, BoneConfig(r=8, target="q_proj"), name="b")
    layer = adapted_layers(model)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        for a in layer.adapters.values():
            a.miss_block.normal_(generator=torch.Generator().manual_seed(0))
    m, b = layer.adapters["m"], layer.adapters["b"]
    A, B, s = m.to_lora()
    assert A.shape == (8, 32)
    torch.testing.assert_close(s * B @ A, m.delta_weight().detach(), rtol=0, atol=1e-5)
    A, B, s = b.to_lora()  # full rank, exact
    torch.testing.assert_close(s * B @ A, b.delta_weight().detach(), rtol=0, atol=1e-4)
    A, B, s = b.to_lora(4)  # Eckart–Young: the error is the discarded singular values
    sv = torch.linalg.svdvals(b.delta_weight().detach())
    err = torch.linalg.matrix_norm(b.delta_weight().detach() - s * B @ A)
    torch.testing.assert_close(err, sv[4:].norm(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"variant": "bone"}, "variant must be one of"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        BoneConfig(**bad)
