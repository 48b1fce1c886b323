"""LoRA-SB (arXiv:2411.19557): r² trainable parameters per module, B/A/R from the SVD of the
approximated first full-FT step, the paper's start (W0 + that step) or the base start, and
save -> load of the data-derived (saved) bases."""

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import ConfigError
from lorakit.init._shared import estimate_gradients
from lorakit.init.lora_sb import LoraSBConfig, first_update, init_lora_sb
from tests.conftest import logits_of, tiny_gpt2, tiny_llama
from tests.init.test_lora_ga import lm_batches


def adapters(model, name="default"):
    return {p: layer.adapters[name] for p, layer in adapted_layers(model).items() if name in layer.adapters}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_exactly_r_squared_trainable_parameters_per_module(factory):
    model = factory()
    lorakit.inject(model, LoraSBConfig(r=6))
    ads = adapters(model)
    for a in ads.values():
        assert [n for n, p in a.named_parameters()] == ["lora_R"] and a.lora_R.shape == (6, 6)
    assert lorakit.trainable_parameters(model)[0] == 36 * len(ads)
    init_lora_sb(model, lm_batches(2))
    assert lorakit.trainable_parameters(model)[0] == 36 * len(ads)  # data_init keeps the shapes


def test_rank_is_capped_by_the_layer_shape():
    model = tiny_llama()
    lorakit.inject(model, LoraSBConfig(r=20, target="k_proj"))  # (16, 32)
    a = adapters(model)["model.layers.0.self_attn.k_proj"]
    assert a.r == 16 and lorakit.trainable_parameters(model)[0] == 2 * 16 * 16


def test_init_is_the_best_rank_r_approximation_of_the_first_adam_step():
    batches = lm_batches(3)
    model = tiny_llama()
    ids = torch.arange(1, 12)[None]
    lorakit.inject(model, LoraSBConfig(r=4, init_lr=1e-3, start="update"))
    grads = estimate_gradients(model, "default", batches)
    init_lora_sb(model, batches)
    for path, a in adapters(model).items():
        update = -1e-3 * torch.sign(grads[path])
        u, s, vh = torch.linalg.svd(update)
        torch.testing.assert_close(a.delta_weight(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=0, atol=1e-6)
        torch.testing.assert_close(a.lora_B.T @ a.lora_B, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal bases
        torch.testing.assert_close(a.lora_A @ a.lora_A.T, torch.eye(4), rtol=0, atol=1e-5)
        torch.testing.assert_close(a.lora_R, torch.diag(s[:4]))
    assert not torch.equal(logits_of(model, ids), logits_of(tiny_llama(), ids))  # starts one step ahead


def test_first_step_sgd_variant_and_base_start():
    g = torch.tensor([[0.5, -2.0], [0.0, 1.0]])
    torch.testing.assert_close(first_update(g, LoraSBConfig(init_lr=0.1)), -0.1 * torch.sign(g))
    torch.testing.assert_close(first_update(g, LoraSBConfig(init_lr=0.1, update="sgd")), -0.1 * g)
    model = tiny_llama()
    ids = torch.arange(1, 12)[None]
    ref = logits_of(model, ids)
    lorakit.inject(model, LoraSBConfig(r=4, update="sgd"))  # start="base" is the default
    init_lora_sb(model, lm_batches(2))
    for a in adapters(model).values():
        assert a.lora_R.abs().sum() > 0 and torch.equal(a.lora_R, a.lora_R0)
    assert torch.equal(logits_of(model, ids), ref)


def test_fresh_adapter_uses_weight_svd_bases_and_starts_at_base():
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    lorakit.inject(model, LoraSBConfig(r=3, target="o_proj"))
    a = adapters(model)["model.layers.0.self_attn.o_proj"]
    u, _, vh = torch.linalg.svd(w0)
    torch.testing.assert_close(a.lora_B.abs(), u[:, :3].abs(), rtol=0, atol=1e-5)  # LoRA-XS bases
    torch.testing.assert_close(a.lora_A.abs(), vh[:3].abs(), rtol=0, atol=1e-5)
    assert torch.count_nonzero(a.delta_weight()) == 0


def test_data_bases_are_saved_and_reloaded(tmp_path):
    model = tiny_llama()
    ids = torch.arange(1, 12)[None]
    lorakit.inject(model, LoraSBConfig(r=4, start="update"))
    init_lora_sb(model, lm_batches(2))
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_R.add_(0.01)
    out = logits_of(model, ids)
    lorakit.save(model, tmp_path / "sb")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "sb")
    torch.testing.assert_close(logits_of(fresh, ids), out, rtol=0, atol=1e-6)


def test_to_lora_is_exact_at_rank_r():
    model = tiny_llama()
    lorakit.inject(model, LoraSBConfig(r=4, target="up_proj"))
    init_lora_sb(model, lm_batches(1))
    a = adapters(model)["model.layers.1.mlp.up_proj"]
    A, B, s = a.to_lora()
    assert A.shape == (4, 32) and B.shape == (64, 4) and s == 1.0
    torch.testing.assert_close(B @ A, a.delta_weight(), rtol=0, atol=1e-7)
    A2, _, _ = a.to_lora(rank=2)
    assert A2.shape == (2, 32)


@pytest.mark.parametrize("kw,msg", [
    ({"r": 0}, "r must be a positive integer"),
    ({"init_batches": -1}, "init_batches must be a positive integer"),
    ({"update": "lion"}, "update must be one of"),
    ({"init_lr": 0}, "init_lr must be a finite number > 0"),
    ({"start": "zero"}, "start must be one of"),
    ({"svd": "qr"}, "svd must be 'full' or 'lowrank'"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LoraSBConfig(**kw)
