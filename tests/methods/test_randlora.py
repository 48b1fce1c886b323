"""RandLoRA (arXiv:2502.00987): ΔW = s·Σ_n L_n Λ_n S_n Γ_n, full rank from shared random bases."""

import itertools

import pytest
import torch
from safetensors import safe_open

import lorakit
from lorakit.core.io import WEIGHTS_NAME
from lorakit.errors import ConfigError
from lorakit.methods.randlora import (
    RandLora,
    RandLoraConfig,
    derive_seed,
    generate_bases,
    num_bases,
    param_count,
)
from tests.conftest import adapters, logits_of, perturb, regression_losses, tiny_gpt2, tiny_llama

CFG = RandLora.test_config  # r = 8 on the tiny models (hidden 32, intermediate 64)



def injected(**over):
    m = tiny_llama()
    lorakit.inject(m, RandLoraConfig(**{**CFG, **over}))
    perturb(m)
    return m


def naive_delta(a: RandLora) -> torch.Tensor:
    """Σ_n L_n diag(λ_n) S_n diag(γ_n), term by term, oriented to (d_out, d_in)."""
    s, l_ = a.bases()
    s_n = (lambda n: s[0]) if s.shape[0] == 1 else (lambda n: s[n])  # shared A: S_n = S
    w = sum(l_[n].T @ torch.diag(a.randlora_lambda[n]) @ s_n(n) @ torch.diag(a.randlora_gamma[n]) for n in range(a.n))
    w = w * a.scale
    return w if a.small_in else w.T


# -- METHODS.md check: rank(ΔW) can exceed r (numerically full) --------------------------------
@pytest.mark.parametrize("shared_a", [True, False])
def test_update_is_full_rank_beyond_r(shared_a):
    m = injected(shared_a=shared_a).double()  # float64: the rank is not a rounding artefact
    seen = set()
    for path, a in adapters(m).items():
        dw = a.delta_weight()
        assert dw.dtype == torch.float64
        rank = torch.linalg.matrix_rank(dw).item()
        d_out, d_in = dw.shape
        assert rank == min(d_in, d_out), (path, rank)  # numerically full rank
        sv = torch.linalg.svdvals(dw)
        assert (sv[-1] / sv[0]).item() > 1e-6, path  # far above the float64 tolerance (~1e-14)
        seen.add((d_out, d_in, rank))
    assert {(32, 32, 32), (16, 32, 16), (64, 32, 32), (32, 64, 32)} <= seen  # square, thin, wide, tall
    assert max(r for *_, r in seen) > CFG["r"]
    # the same r in LoRA caps the rank at r
    lm = tiny_llama()
    lorakit.inject(lm, lorakit.LoraConfig(r=CFG["r"]))
    perturb(lm)
    lm.double()
    assert max(torch.linalg.matrix_rank(a.delta_weight()).item() for a in adapters(lm).values()) == CFG["r"]


def test_shared_a_rank_comes_from_gammas_differing():
    """With one S and equal γ_n, Σ_n L_n Λ_n S Γ = (Σ_n L_n Λ_n) S Γ has rank ≤ r."""
    m = tiny_llama()
    lorakit.inject(m, RandLoraConfig(**CFG, target="q_proj"))
    a = next(iter(adapters(m).values())).double()
    with torch.no_grad():
        a.randlora_lambda.normal_()  # γ still all 1/d_max
    assert torch.linalg.matrix_rank(a.delta_weight()).item() == CFG["r"]
    with torch.no_grad():
        a.randlora_gamma.add_(torch.randn_like(a.randlora_gamma) * 0.01)
    assert torch.linalg.matrix_rank(a.delta_weight()).item() == 32


@pytest.mark.parametrize("shared_a", [True, False])
def test_delta_matches_naive_sum_in_both_orientations(shared_a):
    m = injected(target=["q_proj", "k_proj", "gate_proj", "down_proj"], shared_a=shared_a)
    orient = set()
    for a in adapters(m).values():
        torch.testing.assert_close(a.delta_weight(), naive_delta(a), rtol=1e-5, atol=1e-6)
        x = torch.randn(2, 3, a.spec.in_features)
        torch.testing.assert_close(a.delta(x, None), x @ a.delta_weight().T, rtol=1e-4, atol=1e-5)
        orient.add(a.small_in)
    assert orient == {True, False}  # down_proj (64 -> 32) puts the trainables on the output side


def test_param_count_formula_and_only_diagonals_are_saved(tmp_path):
    m = tiny_llama()
    lorakit.inject(m, RandLoraConfig(**CFG))
    ad = adapters(m)
    for a in ad.values():
        d_in, d_out = a.spec.in_features, a.spec.out_features
        n = num_bases(min(d_in, d_out), 8)
        assert a.randlora_lambda.shape == (n, 8) and a.randlora_gamma.shape == (n, min(d_in, d_out))
        assert sum(p.numel() for p in a.parameters()) == param_count(d_in, d_out, 8) == n * (8 + min(d_in, d_out))
    assert param_count(32, 32, 8) == 4 * (8 + 32) == 160
    assert param_count(576, 1536, 32) == 18 * (32 + 576)  # SmolLM2 MLP at the default r
    assert num_bases(33, 8) == 5  # ⌈33/8⌉: the last basis covers the remainder
    d = lorakit.save(m, tmp_path / "a")
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
        total = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in keys)
    assert {k.rsplit(".", 1)[1] for k in keys} == {"randlora_lambda", "randlora_gamma"}  # no bases
    assert total == sum(param_count(a.spec.in_features, a.spec.out_features, 8) for a in ad.values())


def test_init_values_match_paper():
    m = tiny_llama()
    lorakit.inject(m, RandLoraConfig(**CFG, target="gate_proj"))
    a = next(iter(adapters(m).values()))
    assert torch.count_nonzero(a.randlora_lambda) == 0
    torch.testing.assert_close(a.randlora_gamma, torch.full_like(a.randlora_gamma, 1 / 64))
    assert torch.count_nonzero(a.delta_weight()) == 0


def test_bases_shared_per_shape_and_regenerated_from_seed():
    m = tiny_llama()
    lorakit.inject(m, RandLoraConfig(**CFG))
    ad = adapters(m)
    q0, o0, q1 = (ad[f"model.layers.{i}.self_attn.{n}"] for i, n in ((0, "q_proj"), (0, "o_proj"), (1, "q_proj")))
    assert q0.bases()[0] is o0.bases()[0] is q1.bases()[0]  # one copy for every 32x32 layer
    gate, down = ad["model.layers.0.mlp.gate_proj"], ad["model.layers.0.mlp.down_proj"]
    assert gate.bases()[1] is down.bases()[1]  # 32->64 and 64->32 share (d_min, d_max)
    assert q0.bases()[0] is not gate.bases()[0]
    s, l_ = generate_bases(0, 32, 32, 8, False)
    torch.testing.assert_close(q0.bases()[0], s, rtol=0, atol=0)
    assert s.shape == (1, 8, 32) and l_.shape == (4, 8, 32)  # one shared S, N = 4 L_n
    assert generate_bases(0, 32, 32, 8, False, shared_a=False)[0].shape == (4, 8, 32)
    assert s.std().item() == pytest.approx(1.0) and l_.std().item() == pytest.approx(1.0)
    assert not torch.equal(generate_bases(1, 32, 32, 8, False)[0], s)
    assert derive_seed("randlora", 0, 32, 32, 8, False, "S", 1) == 6758838728509523394  # pinned


def test_save_load_in_fresh_model_regenerates_bases(tmp_path, tokens):
    m = injected()
    out = logits_of(m, tokens)
    lorakit.save(m, tmp_path / "a")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=1e-6)


def test_custom_grad_equals_autograd():
    m = injected(target="down_proj")
    a = next(iter(adapters(m).values()))
    x = torch.randn(4, 64)
    g = torch.randn(4, 32)
    (a.delta(x, None) * g).sum().backward()
    lam = a.randlora_lambda.detach().clone().requires_grad_()
    gam = a.randlora_gamma.detach().clone().requires_grad_()
    s, l_ = a.bases()
    s_hat = (lam[:, :, None] * s * gam[:, None, :]).reshape(-1, a.d_min)
    ref = (x @ l_.reshape(-1, a.d_max).T) @ s_hat * a.scale
    (ref * g).sum().backward()
    torch.testing.assert_close(a.randlora_lambda.grad, lam.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.randlora_gamma.grad, gam.grad, rtol=1e-4, atol=1e-6)


def test_to_lora_exact_and_truncation_error(capsys):
    m = injected(target=["q_proj", "down_proj"])
    for path, a in adapters(m).items():
        dw = a.delta_weight()
        A, B, s = a.to_lora()  # exact: rank N·r
        assert A.shape == (a.n * a.r, a.spec.in_features) and B.shape == (a.spec.out_features, a.n * a.r)
        torch.testing.assert_close(s * B @ A, dw, rtol=1e-5, atol=1e-6)
        sv = torch.linalg.svdvals(dw.double())
        norm = sv.pow(2).sum().sqrt().item()
        errors = {}
        for k in (1, 4, 8, 16, 32):
            A, B, s = a.to_lora(rank=k)
            assert A.shape[0] == min(k, a.d_min) or A.shape[0] == k
            err = torch.linalg.norm(s * B @ A - dw).item() / norm
            tail = sv[k:].pow(2).sum().sqrt().item() / norm  # Eckart–Young optimum
            assert err == pytest.approx(tail, abs=1e-5), (path, k)
            errors[k] = err
        vals = list(errors.values())
        assert all(x >= y for x, y in itertools.pairwise(vals))  # more rank, less error
        assert errors[8] > 0.05  # rank r does NOT capture a RandLoRA update...
        assert errors[32] < 1e-5  # ...rank d_min does
        with capsys.disabled():
            print(f"\nrandlora to_lora relative Frobenius error {path}: "
                  + ", ".join(f"rank {k}: {e:.3f}" for k, e in errors.items()))


def test_export_peft_exact_round_trip(tmp_path, tokens):
    m = injected()
    out = logits_of(m, tokens)
    lorakit.core.io.export_peft(m, tmp_path / "peft")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "peft", check_base=False)
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=1e-4, atol=1e-5)


def test_sparse_bases_are_ternary_and_still_full_rank():
    s, l_ = generate_bases(0, 32, 64, 8, True)
    for t in (s, l_):
        vals = torch.unique(t)
        assert len(vals) == 3 and torch.allclose(vals[0], -vals[2]) and vals[1] == 0
        assert (t == 0).float().mean().item() == pytest.approx(2 / 3, abs=0.05)
    m = injected(sparse=True, target="gate_proj")
    a = next(iter(adapters(m).values()))
    assert torch.linalg.matrix_rank(a.delta_weight()).item() == 32


def test_gpt2_conv1d_and_dtype_move(tokens):
    m = tiny_gpt2()
    lorakit.inject(m, RandLoraConfig(**CFG))
    perturb(m)
    out = logits_of(m, tokens)
    m.double()  # bases re-fetched for the new dtype (they are not buffers)
    a = next(iter(adapters(m).values()))
    assert a.bases()[0].dtype == torch.float64
    torch.testing.assert_close(logits_of(m, tokens).float(), out, rtol=1e-4, atol=1e-4)


def test_short_training_lowers_loss(tokens):
    m = tiny_llama()
    lorakit.inject(m, RandLoraConfig(**CFG))
    losses = regression_losses(m, tokens, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kw,msg", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -3}, "r must be a positive integer"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"alpha": -1.0}, "alpha must be a positive number"),
    ({"alpha": float("inf")}, "alpha must be a positive number"),
    ({"sparse": "yes"}, "sparse must be true or false"),
    ({"shared_a": 1}, "shared_a must be true or false"),
    ({"dropout": -0.1}, "dropout must be in"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        RandLoraConfig(**kw)


def test_embedding_target_is_refused():
    m = tiny_llama()
    with pytest.raises(ConfigError, match="cannot adapt embedding"):
        lorakit.inject(m, RandLoraConfig(**CFG, target="embed_tokens"))
