"""PiSSA (arXiv:2404.02948): top-r SVD factors, output == base at init via the frozen offset,
exact rank-2r export, and parity with PEFT's init_lora_weights="pissa" (residual form)."""

import copy

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.init.pissa import PissaConfig, pissa_factors
from tests.conftest import adapters, logits_of, perturb, tiny_gpt2, tiny_llama



@pytest.mark.parametrize("alpha", [None, 2.0])
def test_factors_are_the_principal_part_of_w0(alpha):
    model = tiny_llama()
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()  # (32, 64)
    lorakit.inject(model, PissaConfig(r=5, alpha=alpha, target="down_proj"))
    a = adapters(model)["model.layers.0.mlp.down_proj"]
    s = a.scale
    assert s == (1.0 if alpha is None else 2.0 / 5)
    u, sv, vh = torch.linalg.svd(w0)
    best = u[:, :5] @ torch.diag(sv[:5]) @ vh[:5]
    torch.testing.assert_close(s * a.lora_B.weight @ a.lora_A.weight, best, rtol=0, atol=1e-5)
    # A = diag(√(S/s)) Vᵀ_r: rows of A are orthogonal with squared norms S_r / s
    torch.testing.assert_close(a.lora_A.weight @ a.lora_A.weight.T, torch.diag(sv[:5] / s), rtol=0, atol=1e-4)


def test_output_equals_base_at_init_exactly_and_offsets_are_saved(tmp_path):
    model = tiny_gpt2()  # Conv1D: the SVD is of the (d_out, d_in) view
    ids = torch.arange(1, 10)[None]
    ref = logits_of(model, ids)
    lorakit.inject(model, PissaConfig(r=4))
    assert torch.equal(logits_of(model, ids), ref)
    for a in adapters(model).values():
        assert torch.count_nonzero(a.delta_weight()) == 0
        assert a.lora_A0.abs().sum() > 0  # non-trivial factors, exactly cancelled
    lorakit.save(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert any(k.endswith("lora_A0") for k in keys) and any(k.endswith("lora_B0") for k in keys)


def test_parameter_count_and_rank_cap():
    model = tiny_llama()
    lorakit.inject(model, PissaConfig(r=24))  # k/v_proj are (16, 32): r capped at 16
    expected = 0
    for a in adapters(model).values():
        r = min(24, a.spec.out_features, a.spec.in_features)
        assert a.r == r and a.lora_A.weight.shape == (r, a.spec.in_features)
        expected += r * (a.spec.in_features + a.spec.out_features)
    assert lorakit.trainable_parameters(model)[0] == expected
    assert not any(n.endswith(("lora_A0", "lora_B0")) for n, _ in model.named_parameters())


def test_to_lora_is_exact_at_rank_2r_and_truncates_below():
    model = tiny_llama()
    lorakit.inject(model, PissaConfig(r=4, target="q_proj"))
    perturb(model)
    a = adapters(model)["model.layers.0.self_attn.q_proj"]
    A, B, s = a.to_lora()
    assert A.shape == (8, 32) and B.shape == (32, 8)
    torch.testing.assert_close(s * B @ A, a.delta_weight(), rtol=0, atol=1e-6)
    A3, B3, _ = a.to_lora(rank=3)
    assert A3.shape == (3, 32)
    dw = a.delta_weight()
    u, sv, vh = torch.linalg.svd(dw)
    torch.testing.assert_close(s * B3 @ A3, u[:, :3] @ torch.diag(sv[:3]) @ vh[:3], rtol=0, atol=1e-5)


def test_lowrank_svd_matches_full_on_a_low_rank_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 6, generator=g) @ torch.randn(6, 120, generator=g)  # rank 6; big enough for lowrank
    a_full, b_full = pissa_factors(w, 4, 1.0, "full")
    state = torch.get_rng_state()
    a_low, b_low = pissa_factors(w, 4, 1.0, "lowrank", niter=6)
    torch.testing.assert_close(b_low @ a_low, b_full @ a_full, rtol=0, atol=1e-3)
    assert torch.equal(torch.get_rng_state(), state)  # seeded internally: global RNG untouched
    a_again, _ = pissa_factors(w, 4, 1.0, "lowrank", niter=6)
    assert torch.equal(a_again, a_low)  # and reproducible
    model = tiny_llama()
    ref = logits_of(model, torch.arange(1, 9)[None])
    lorakit.inject(model, PissaConfig(r=4, svd="lowrank"))
    assert torch.equal(logits_of(model, torch.arange(1, 9)[None]), ref)


def test_matches_peft_pissa_residual_form():
    """PEFT: W_res = W0 − s·B A in the base, h = W_res x + s·B A x. Same A, B, same outputs."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = tiny_llama()
    ids = torch.arange(1, 12)[None]
    pm = get_peft_model(copy.deepcopy(model), PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                             target_modules=["q_proj", "down_proj"]))
    lorakit.inject(model, PissaConfig(r=4, alpha=8, target=["q_proj", "down_proj"]))
    ours = adapters(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, a in ours.items():
            pl = pm.base_model.model.get_submodule(path)
            torch.testing.assert_close(a.lora_A.weight, pl.lora_A["default"].weight, rtol=0, atol=1e-5)
            torch.testing.assert_close(a.lora_B.weight, pl.lora_B["default"].weight, rtol=0, atol=1e-5)
            for mine, theirs in ((a.lora_A.weight, pl.lora_A["default"].weight),
                                 (a.lora_B.weight, pl.lora_B["default"].weight)):
                noise = torch.randn(mine.shape, generator=g) * 0.05
                mine.add_(noise)
                theirs.add_(noise)
    torch.testing.assert_close(logits_of(model, ids), logits_of(pm, ids), rtol=0, atol=1e-5)


def test_peft_export_at_rank_2r_loads_in_peft(tmp_path):
    from peft import PeftModel

    from lorakit.core.io import export_peft

    model = tiny_gpt2()
    ids = torch.arange(1, 12)[None]
    lorakit.inject(model, PissaConfig(r=3))
    perturb(model)
    out = logits_of(model, ids)
    export_peft(model, tmp_path / "peft")
    pm = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(logits_of(pm, ids), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw,msg", [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"svd": "randomized"}, "svd must be 'full' or 'lowrank'"),
    ({"niter": -1}, "niter must be a non-negative integer"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        PissaConfig(**kw)
