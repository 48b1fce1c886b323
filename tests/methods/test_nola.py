"""NOLA (arXiv:2310.02556): A = A0 + Σα_i A_i, B = Σβ_j B_j over seeded random bases."""

import math

import pytest
import torch
from safetensors import safe_open

import lorakit
from lorakit.core.io import WEIGHTS_NAME
from lorakit.errors import ConfigError
from lorakit.methods import nola
from lorakit.methods.nola import CHUNK, Nola, NolaConfig, basis_chunk, derive_seed, kaiming_offset
from tests.conftest import adapters, logits_of, perturb, regression_losses, tiny_llama


def llama(hidden: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()



# -- METHODS.md check: stored params independent of rank and width ----------------------------
def test_stored_params_independent_of_rank_and_width(tmp_path):
    ka, kb = 40, 24
    per_module = {}
    for hidden in (32, 64):
        for r in (2, 8):
            model = llama(hidden)
            lorakit.inject(model, NolaConfig(r=r, num_basis_a=ka, num_basis_b=kb))
            d = lorakit.save(model, tmp_path / f"h{hidden}-r{r}")
            with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            # only the coefficients are stored: no basis, no seed tensor, no A0
            assert {k.rsplit(".", 1)[1] for k in shapes} == {"coef_A", "coef_B"}
            n_modules = len(adapters(model))
            assert n_modules == 14  # 7 linear layers x 2 blocks
            assert sum(math.prod(s) for s in shapes.values()) == n_modules * (ka + kb)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert trainable == n_modules * (ka + kb)
            per_module[(hidden, r)] = {s for s in shapes.values()}
    assert len({frozenset(v) for v in per_module.values()}) == 1  # same shapes for every (width, rank)


def test_module_seed_is_stable_and_path_dependent():
    # pinned: a change here silently invalidates every saved NOLA adapter
    assert derive_seed(0, "model.layers.0.self_attn.q_proj", "A") == 3097962466751873595
    assert derive_seed(0, "model.layers.0.self_attn.q_proj", "A") != derive_seed(0, "model.layers.1.self_attn.q_proj", "A")
    assert derive_seed(0, "x", "A") != derive_seed(1, "x", "A")
    assert torch.equal(basis_chunk(7, 0, 2, (3, 4), 8), basis_chunk(7, 0, 2, (3, 4), 8))
    assert not torch.equal(basis_chunk(7, 0, 2, (3, 4), 8), basis_chunk(7, 1, 2, (3, 4), 8))
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(**Nola.test_config))
    ad = adapters(m)
    seeds = {a.seed_A for a in ad.values()}
    assert len(seeds) == len(ad)  # every module has its own bases


def test_same_seed_same_bases_other_seed_differs(tokens):
    outs = []
    for seed in (0, 0, 1):
        m = tiny_llama()
        lorakit.inject(m, NolaConfig(**Nola.test_config, seed=seed))
        perturb(m, seed=3)  # identical coefficients in all three models
        outs.append(logits_of(m, tokens))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])


# -- the on-the-fly generation ------------------------------------------------------------------
def _dense_reference(coef, seed, shape):
    """All k bases at once (what the chunked function must never hold) -> Σ coef_i basis_i."""
    k = coef.shape[0]
    stack = torch.cat([basis_chunk(seed, c, min(CHUNK, k - c * CHUNK), shape, k) for c in range(math.ceil(k / CHUNK))])
    assert stack.shape == (k, *shape)
    return torch.einsum("n,nij->ij", coef, stack)


def test_chunked_generation_matches_dense_and_holds_at_most_one_chunk(monkeypatch):
    sizes = []
    real = nola.basis_chunk

    def spy(seed, chunk, n, shape, k):
        sizes.append(n)
        return real(seed, chunk, n, shape, k)

    monkeypatch.setattr(nola, "basis_chunk", spy)
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(r=4, num_basis_a=150, num_basis_b=70, target="q_proj"))
    perturb(m)
    a_mod = next(iter(adapters(m).values()))
    a, b = a_mod.factors()  # grad path: no cache
    assert max(sizes) <= CHUNK and sizes.count(CHUNK) >= 2  # 150 = 64 + 64 + 22
    ca, cb = a_mod.coef_A.detach(), a_mod.coef_B.detach()
    ref_a = kaiming_offset(a_mod.seed_A0, (4, 32)) + _dense_reference(ca, a_mod.seed_A, (4, 32))
    ref_b = _dense_reference(cb, a_mod.seed_B, (32, 4))
    torch.testing.assert_close(a, ref_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, ref_b, rtol=1e-5, atol=1e-6)
    # backward regenerates the chunks: gradients equal plain autograd over the dense stack
    ga, gb = torch.randn(4, 32), torch.randn(32, 4)
    ((a * ga).sum() + (b * gb).sum()).backward()
    ca_ref, cb_ref = ca.clone().requires_grad_(), cb.clone().requires_grad_()
    ((_dense_reference(ca_ref, a_mod.seed_A, (4, 32)) * ga).sum()
     + (_dense_reference(cb_ref, a_mod.seed_B, (32, 4)) * gb).sum()).backward()
    torch.testing.assert_close(a_mod.coef_A.grad, ca_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a_mod.coef_B.grad, cb_ref.grad, rtol=1e-4, atol=1e-6)


def test_bases_follow_uniform_over_sqrt_k():
    k = 256
    basis = basis_chunk(5, 0, CHUNK, (8, 100), k)
    assert basis.abs().max() <= 1 / math.sqrt(k)
    assert basis.std().item() == pytest.approx(1 / math.sqrt(3 * k), rel=0.02)  # U(-1,1) has var 1/3


def test_beta_gets_gradient_at_init_thanks_to_offset(tokens):
    """β = 0 makes ΔW = 0, but A = A0 ≠ 0 so β still learns (α waits one step, as LoRA's A)."""
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(**Nola.test_config))
    m.train()
    m(input_ids=tokens).logits.pow(2).mean().backward()
    for a in adapters(m).values():
        assert a.coef_B.grad.abs().sum() > 0
        assert a.coef_A.grad.abs().sum() == 0


def test_no_grad_path_caches_and_invalidates_on_any_write():
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(**Nola.test_config, target="q_proj"))
    perturb(m)
    a_mod = next(iter(adapters(m).values()))
    with torch.no_grad():
        a1, b1 = a_mod.factors()
        a2, b2 = a_mod.factors()
        assert a1 is a2 and b1 is b2  # served from the cache
        a_mod.coef_B.data[0] += 1.0  # a write through .data bypasses the version counter
        _, b3 = a_mod.factors()
        assert b3 is not b1 and not torch.equal(b3, b1)
    # training path: never cached, and builds the same values
    _, b4 = a_mod.factors()
    assert a_mod._cache is None and b4.requires_grad
    torch.testing.assert_close(b4.detach(), b3)


def test_frozen_loaded_adapter_uses_cache_under_grad_mode(tmp_path, tokens):
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(**Nola.test_config))
    perturb(m)
    out = logits_of(m, tokens)
    lorakit.save(m, tmp_path / "a")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")  # trainable=False: coefficients frozen
    y = fresh(input_ids=tokens).logits  # grad mode on, nothing requires grad
    torch.testing.assert_close(y, out, rtol=0, atol=1e-6)
    assert all(a._cache is not None for a in adapters(fresh).values())


def test_to_lora_exact_and_truncated():
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(r=4, num_basis_a=80, num_basis_b=72, target="q_proj"))
    perturb(m)
    a_mod = next(iter(adapters(m).values()))
    a, b, s = a_mod.to_lora()
    assert a.shape == (4, 32) and b.shape == (32, 4) and s == pytest.approx(16 / 4)
    torch.testing.assert_close(s * b @ a, a_mod.delta_weight(), rtol=1e-5, atol=1e-7)
    a2, b2, _ = a_mod.to_lora(rank=2)
    assert a2.shape == (2, 32) and b2.shape == (32, 2)
    sv = torch.linalg.svdvals(a_mod.delta_weight().double())
    err = torch.linalg.norm(s * b2 @ a2 - a_mod.delta_weight()).item()
    assert err == pytest.approx(sv[2:].pow(2).sum().sqrt().item(), rel=1e-3)


def test_delta_equals_dense_update():
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(**Nola.test_config, target=["q_proj", "down_proj"]))
    perturb(m)
    x = torch.randn(2, 5, 64)
    for a in adapters(m).values():
        xi = x[..., : a.spec.in_features]
        torch.testing.assert_close(a.delta(xi, None), xi @ a.delta_weight().T, rtol=1e-4, atol=1e-6)


def test_short_training_lowers_loss(tokens):
    m = tiny_llama()
    lorakit.inject(m, NolaConfig(**Nola.test_config))
    losses = regression_losses(m, tokens, lr=5e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kw,msg", [
    ({"r": 0}, "r must be a positive integer"),
    ({"num_basis_a": 0}, "num_basis_a must be a positive integer"),
    ({"num_basis_b": 2.5}, "num_basis_b must be a positive integer"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"seed": 2**63}, "seed must be an integer"),
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"alpha": math.nan}, "alpha must be a positive number"),
    ({"dropout": 1.0}, "dropout must be in"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        NolaConfig(**kw)


def test_config_round_trip_and_unknown_key():
    cfg = NolaConfig(r=4, num_basis_a=32, seed=9)
    assert NolaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown NolaConfig key"):
        NolaConfig.from_dict({"method": "nola", "num_basis": 3})


def test_embedding_target_is_refused():
    m = tiny_llama()
    with pytest.raises(ConfigError, match="cannot adapt embedding"):
        lorakit.inject(m, NolaConfig(**Nola.test_config, target="embed_tokens"))
