"""GenerativeAdapter (arXiv:2411.05877): one forward pass of the base model over the context,
S = Σ_t (A₂ĥ_t)(A₃ĥ_t)ᵀ per layer, ΔW = (α/R2)·B Φ(S)ᵀ A₁, emitted as a plain LoRA."""

import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

import lorakit
from lorakit.core.inject import state
from lorakit.core.io import export_peft
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.generators import GenerativeAdapter, GenerativeAdapterConfig, generate_adapter, train_generative_adapter
from lorakit.generators.family import adapter_state, hidden_states
from lorakit.generators.generative_adapter import accumulate_state, normalize_state, polar, rms_norm
from tests.conftest import logits_of, tiny_gpt2, tiny_llama
from tests.generators.conftest import GA, family, sharp_llama

QUICK = dataclasses.replace(GA, steps=6)


def randomized(gen: GenerativeAdapter, seed: int = 0) -> GenerativeAdapter:
    """Give B (zero at init) random values so the generated update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return gen


def test_shapes_and_zero_init_emits_the_base_model():
    model = tiny_llama()
    cfg = GenerativeAdapterConfig(r=3, inter_size=5, alpha=6.0)
    gen = GenerativeAdapter(model, cfg)
    assert len(gen.paths) == 14 and gen.blocks["model.layers.1.mlp.down_proj"] == 1
    layer = gen.layers["model__layers__0__self_attn__k_proj"]
    assert layer.a1.shape == (5, 32) and layer.a2.shape == (5, 32) and layer.a3.shape == (3, 32)
    assert layer.b.shape == (16, 3) and torch.count_nonzero(layer.b) == 0
    ctx = family(1)[0].context
    factors = gen(hidden_states(model, ctx))
    a, b = factors["model.layers.1.mlp.down_proj"]
    assert a.shape == (3, 64) and b.shape == (32, 3)
    before = logits_of(model, ctx)
    gen.generate_adapter(model, ctx, name="gen")
    assert lorakit.adapter_names(model) == ["gen"]
    assert torch.equal(logits_of(model, ctx), before)  # B = 0: a fresh generator changes nothing


def test_generation_equals_the_documented_accumulation_formula():
    model = tiny_llama()
    cfg = GenerativeAdapterConfig(r=3, inter_size=4, alpha=6.0, norm="svd")
    gen = randomized(GenerativeAdapter(model, cfg))
    ctx = family(1)[0].context  # (4, 16)
    hs = hidden_states(model, ctx)
    path = "model.layers.1.self_attn.v_proj"
    lg = gen.layers[path.replace(".", "__")]
    # S = Σ over every context token of the outer product (A₂ ĥ_t)(A₃ ĥ_t)ᵀ, ĥ = RMSNorm_γ(h) at block 1's input
    s = torch.zeros(4, 3)
    for row in hs[1]:
        for h in row:
            hn = h / torch.sqrt(h.pow(2).mean() + cfg.eps) * lg.gain
            s += torch.outer(lg.a2 @ hn, lg.a3 @ hn)
    assert torch.allclose(lg.state(hs[1], eps=cfg.eps), s, atol=1e-4)
    u, _, vh = torch.linalg.svd(s, full_matrices=False)
    delta_w = (cfg.alpha / cfg.r) * lg.b @ (u @ vh).T @ lg.a1  # ΔW = (α/R2) B Φ(S)ᵀ A₁
    # the injected LoRA applies exactly ΔW to the layer input
    gen.generate_adapter(model, ctx, name="gen")
    layer = model.get_submodule(path)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer.adapters["gen"].delta(x, layer.base(x))
        assert torch.allclose(got, x @ delta_w.T, atol=1e-4)
        assert torch.allclose(layer.adapters["gen"].delta_weight(), delta_w, atol=1e-4)
    # the state is a sum over tokens: any split of the context accumulates to the same S
    split = accumulate_state(rms_norm(hs[1][:2], lg.gain, cfg.eps), lg.a2, lg.a3) + accumulate_state(
        rms_norm(hs[1][2:], lg.gain, cfg.eps), lg.a2, lg.a3)
    assert torch.allclose(split, s, atol=1e-4)
    # masked tokens do not count
    mask = torch.ones(4, 16)
    mask[:, 8:] = 0
    assert torch.allclose(lg.state(hs[1], mask, cfg.eps), lg.state(hs[1][:, :8], eps=cfg.eps), atol=1e-5)


def test_padding_contributes_nothing():
    model = tiny_llama()
    gen = randomized(GenerativeAdapter(model, GenerativeAdapterConfig(r=2)))
    ctx = family(1)[0].context
    padded = torch.cat([ctx, torch.full((4, 3), 5)], dim=1)
    mask = torch.cat([torch.ones(4, 16), torch.zeros(4, 3)], dim=1).long()
    want = gen.generate_state(model, ctx)
    got = gen.generate_state(model, padded, attention_mask=mask)
    assert all(torch.allclose(got[k], want[k], atol=1e-4) for k in want)
    unmasked = gen.generate_state(model, padded)
    assert not all(torch.allclose(unmasked[k], want[k], atol=1e-4) for k in want)


def test_one_forward_pass_of_the_base_model():
    model = tiny_llama()
    gen = randomized(GenerativeAdapter(model, GenerativeAdapterConfig(r=2)))
    calls = []
    handle = model.model.register_forward_hook(lambda *a: calls.append(1))
    gen.generate_adapter(model, family(1)[0].context, name="gen")
    handle.remove()
    assert len(calls) == 1


def test_norms_and_the_polar_factor_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64)
    p = normalize_state(s, "svd")
    assert torch.allclose(p.T @ p, torch.eye(3, dtype=torch.float64), atol=1e-10)  # orthonormal columns
    assert abs(float(torch.linalg.matrix_norm(normalize_state(s, "frobenius"))) - 1) < 1e-6
    assert abs(float(torch.linalg.matrix_norm(normalize_state(s, "spectral"), ord=2)) - 1) < 1e-6
    assert torch.allclose(normalize_state(3.7 * s, "svd"), p)  # scale-free
    for shape in ((5, 3), (3, 5), (4, 4), (2, 4, 3)):  # tall, wide, square, batched
        m = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: polar(t, 1e-12), (m,))
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        (ours,) = torch.autograd.grad((polar(m) * w).sum(), m)
        mm = m.detach().clone().requires_grad_(True)
        u, _, vh = torch.linalg.svd(mm, full_matrices=False)
        (ref,) = torch.autograd.grad(((u @ vh) * w).sum(), mm)
        assert torch.allclose(ours, ref, atol=1e-8)
    # equal singular values: autograd through svd is undefined, the polar gradient is finite
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    m = (2.0 * q).requires_grad_(True)
    (grad,) = torch.autograd.grad((polar(m) * torch.randn(4, 4, generator=g, dtype=torch.float64)).sum(), m)
    assert torch.isfinite(grad).all()


def test_training_lowers_the_loss_and_is_deterministic():
    model = sharp_llama()
    tasks = family(6)
    cfg = dataclasses.replace(GA, steps=25)
    a = train_generative_adapter(model, tasks, cfg)
    b = train_generative_adapter(model, tasks, cfg)
    assert lorakit.adapter_names(model) == []  # the training adapter is gone
    assert a.losses == b.losses
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert sum(a.losses[-5:]) / 5 < sum(a.losses[:5]) / 5 - 0.3
    c = train_generative_adapter(model, tasks, dataclasses.replace(cfg, seed=1))
    assert c.losses != a.losses
    # generation is a pure function of the context
    ctx = tasks[0].context
    s1, s2 = a.generate_state(model, ctx), a.generate_state(model, ctx)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = a.generate_state(model, tasks[1].context)
    assert not all(torch.equal(s1[k], other[k]) for k in s1)


def test_generated_adapter_loads_as_a_normal_lora_and_exports_to_peft(tmp_path):
    model = sharp_llama()
    tasks = family(3)
    gen = randomized(train_generative_adapter(model, tasks, QUICK))
    ctx, ids = tasks[0].context, tasks[0].eval
    generate_adapter(model, gen, ctx, name="task0")
    assert state(model).configs["task0"].method == "lora"
    want = logits_of(model, ids)
    lorakit.save(model, tmp_path / "a", name="task0")
    fresh = sharp_llama()
    lorakit.load(fresh, tmp_path / "a")
    assert torch.allclose(logits_of(fresh, ids), want, atol=1e-5)
    assert not torch.allclose(logits_of(sharp_llama(), ids), want, atol=1e-3)  # the adapter does something
    export_peft(model, tmp_path / "peft", name="task0")
    peft_model = PeftModel.from_pretrained(sharp_llama(), tmp_path / "peft")
    assert torch.allclose(logits_of(peft_model, ids), want, atol=1e-5)
    lorakit.merge(model, ["task0"])
    assert torch.allclose(logits_of(model, ids), want, atol=1e-4)


def test_generator_save_load_round_trip(tmp_path):
    model = sharp_llama()
    gen = randomized(GenerativeAdapter(model, GenerativeAdapterConfig(r=2, target=["q_proj", "v_proj"])))
    gen.save(tmp_path / "gen")
    back = GenerativeAdapter.load(tmp_path / "gen", model)
    ctx = family(1)[0].context
    s1, s2 = gen.generate_state(model, ctx), back.generate_state(model, ctx)
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    with pytest.raises(AdapterFileError, match="missing"):
        GenerativeAdapter.load(tmp_path / "nothing", model)
    (tmp_path / "gen" / "generator.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="missing"):
        GenerativeAdapter.load(tmp_path / "gen", model)


def test_works_on_gpt2_conv1d_layers():
    model = tiny_gpt2()
    gen = randomized(GenerativeAdapter(model, GenerativeAdapterConfig(r=2, target="all-linear")))
    assert gen.blocks["transformer.h.1.mlp.c_proj"] == 1 and gen.dims["transformer.h.0.attn.c_attn"] == (32, 96)
    ids = family(1)[0].eval
    base = logits_of(model, ids)
    gen.generate_adapter(model, family(1)[0].context, name="gen")
    assert not torch.allclose(logits_of(model, ids), base, atol=1e-4)
    assert adapter_state(model, "gen")["transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 2)


def test_config_errors():
    with pytest.raises(ConfigError, match="norm must be one of"):
        GenerativeAdapterConfig(norm="l2")
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        GenerativeAdapterConfig(r=0)
    with pytest.raises(ConfigError, match="inter_size must be a positive integer"):
        GenerativeAdapterConfig(inter_size=-2)
    with pytest.raises(ConfigError, match="alpha must be a positive finite number"):
        GenerativeAdapterConfig(alpha=float("inf"))
    with pytest.raises(ConfigError, match="both 0"):
        GenerativeAdapterConfig(completion_weight=0.0, recon_weight=0.0)
    with pytest.raises(ConfigError, match="recon_weight must be a finite number >= 0"):
        GenerativeAdapterConfig(recon_weight=-1.0)
    with pytest.raises(ConfigError, match="matched no adaptable module"):
        GenerativeAdapter(tiny_llama(), GenerativeAdapterConfig(target=["nope"]))
    with pytest.raises(ConfigError, match="linear layers"):
        GenerativeAdapter(tiny_llama(), GenerativeAdapterConfig(target=["embed_tokens"]))
    with pytest.raises(ConfigError, match="at least one task"):
        train_generative_adapter(tiny_llama(), [], QUICK)
    gen = GenerativeAdapter(tiny_llama(), GenerativeAdapterConfig(r=2))
    narrow = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=128, n_positions=32))
    with pytest.raises(ConfigError, match="hidden size 32"):
        gen.generate_state(narrow, family(1)[0].context)
    with pytest.raises(ConfigError, match="must be a GenerativeAdapter or an IcmLoraGenerator"):
        generate_adapter(tiny_llama(), object(), family(1)[0].context)
