"""LoLDU (arXiv:2410.13618): LDU bases, r + 1 trainable parameters per module, init == base,
and parity with the reference code's residual parameterisation."""

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import ConfigError
from lorakit.methods.loldu import LoLDUConfig, ldu
from tests.conftest import logits_of, tiny_gpt2, tiny_llama


def adapters(model, name="default"):
    return {p: layer.adapters[name] for p, layer in adapted_layers(model).items()}


@pytest.mark.parametrize("shape", [(6, 6), (8, 5), (5, 8)])
def test_ldu_reconstructs_the_weight(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    pl, d, u = ldu(w)
    k = min(shape)
    assert pl.shape == (shape[0], k) and d.shape == (k,) and u.shape == (k, shape[1])
    torch.testing.assert_close(pl @ torch.diag(d) @ u, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.diagonal(u), torch.ones(k))  # unit upper


def test_singular_weight_gives_no_nan():
    pl, d, u = ldu(torch.zeros(4, 6))
    assert torch.isfinite(pl).all() and torch.isfinite(u).all() and (d == 0).all()


def test_param_count_is_r_plus_one_per_module():
    model = tiny_llama()
    lorakit.inject(model, LoLDUConfig(r=24))
    expected = 0
    for a in adapters(model).values():
        r = min(24, a.spec.out_features, a.spec.in_features)  # capped: k/v_proj are 32 -> 16
        assert a.vector_z.shape == (r,) and a.scaling_factor.shape == ()
        expected += r + 1
    assert lorakit.trainable_parameters(model)[0] == expected


def test_train_scale_false_trains_only_z():
    model = tiny_llama()
    lorakit.inject(model, LoLDUConfig(r=4, train_scale=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("vector_z") for n in trainable)
    assert lorakit.trainable_parameters(model)[0] == 4 * len(adapters(model))


def test_about_a_hundredth_of_a_percent_on_smollm2_shapes():
    """METHODS.md check: ~0.01% trainable. SmolLM2-135M: 30 layers of these widths, 134.5M params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    one_layer = LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                             num_attention_heads=9, num_key_value_heads=3, vocab_size=64))
    lorakit.inject(one_layer, LoLDUConfig())  # r = 64, all-linear
    per_layer = lorakit.trainable_parameters(one_layer)[0]
    assert per_layer == 7 * (64 + 1)
    fraction = 30 * per_layer / 134_515_008
    assert 0.5e-4 < fraction < 2e-4, fraction  # ~0.01%


def test_init_output_equals_base_exactly():
    model = tiny_gpt2()
    ref = logits_of(model, torch.arange(1, 10)[None])
    lorakit.inject(model, LoLDUConfig(r=8))
    for a in adapters(model).values():
        assert torch.count_nonzero(a.delta_weight()) == 0
    assert torch.equal(logits_of(model, torch.arange(1, 10)[None]), ref)


def test_matches_reference_residual_parameterisation():
    """Reference: W ← W0 − σ0 P L_r diag(z0) U_r, forward uses W + σ P L_r diag(z) U_r."""
    model = tiny_llama()
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()  # (32, 64)
    lorakit.inject(model, LoLDUConfig(r=12, alpha=3.0, target="down_proj"))
    a = adapters(model)["model.layers.0.mlp.down_proj"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        a.vector_z.add_(torch.randn(12, generator=g))
        a.scaling_factor.mul_(1.7)
    p, lower, upper = torch.linalg.lu(w0)
    d = torch.diagonal(upper)
    lr_, dr, ur = (p @ lower)[:, :12], d[:12], (upper / d[:, None])[:12]
    sigma0 = 3.0 / 12
    w_res = w0 - sigma0 * lr_ @ torch.diag(dr) @ ur
    w_ref = w_res + a.scaling_factor.detach() * lr_ @ torch.diag(a.vector_z.detach()) @ ur
    torch.testing.assert_close(w0 + a.delta_weight().detach(), w_ref, rtol=0, atol=1e-5)
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(x @ w0.T + a.delta(x, None).detach(), x @ w_ref.T, rtol=0, atol=1e-5)


def test_to_lora_is_exact_and_truncates():
    model = tiny_llama()
    lorakit.inject(model, LoLDUConfig(r=8, target="q_proj"))
    a = next(iter(adapters(model).values()))
    with torch.no_grad():
        a.vector_z.add_(torch.randn(8, generator=torch.Generator().manual_seed(1)))
    A, B, s = a.to_lora()
    assert A.shape == (8, 32) and B.shape == (32, 8)
    torch.testing.assert_close(s * B @ A, a.delta_weight().detach(), rtol=0, atol=1e-6)
    A3, B3, _ = a.to_lora(3)
    assert A3.shape == (3, 32) and B3.shape == (32, 3)


def test_bases_are_not_saved(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, LoLDUConfig(r=4, target="q_proj"))
    keys = set(next(iter(adapters(model).values())).state_dict())
    assert keys == {"vector_z", "scaling_factor"}


@pytest.mark.parametrize("bad,match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"alpha": True}, "alpha must be a positive number"),
    ({"alpha": float("inf")}, "alpha must be a positive number"),
    ({"train_scale": "yes"}, "train_scale must be true or false"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        LoLDUConfig(**bad)


def test_embedding_target_is_rejected():
    with pytest.raises(ConfigError, match="cannot adapt embedding"):
        lorakit.inject(tiny_llama(), LoLDUConfig(target="embed_tokens"))
