"""SoRA: gated ranks, proximal L1 step after each optimizer step, pruning of zero gates.

METHODS.md Check: pruning zero-gate ranks leaves outputs bit-identical
(test_prune_is_bit_identical_smaller_and_loads_into_a_fresh_model).
"""

import json
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.core.inject import state
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.sora import Sora, SoraConfig, active_ranks, prune, sora_modules, sora_proximal_step
from tests.conftest import logits_of, perturb, tiny_gpt2, tiny_llama

LLAMA_IO_PER_LAYER = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64)  # Σ d_in + d_out
LLAMA_TARGETS = 2 * 7


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"sparse_lambda": -1e-3}, "sparse_lambda must be a finite number >= 0"),
        ({"sparse_lambda": float("inf")}, "sparse_lambda must be a finite number >= 0"),
        ({"sparse_lambda": float("nan")}, "sparse_lambda must be a finite number >= 0"),
        ({"sparse_lambda": "big"}, "sparse_lambda must be a finite number >= 0"),
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"gate_init": "zeros"}, r"gate_init must be one of \('normal', 'ones'\)"),
        ({"lr_scaled": "yes"}, "lr_scaled must be true or false"),
        ({"dropout": -0.1}, "dropout must be in"),
        ({"r": 4, "ranks": {"q_proj": 5}}, r"ranks\['q_proj'\] must be an integer between 0 and r=4"),
        ({"ranks": {"q_proj": -1}}, "must be an integer between 0"),
        ({"ranks": [3]}, "ranks must be a mapping"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SoraConfig(**kw)


def test_parameter_count_is_r_times_din_plus_dout_plus_gate():
    model = tiny_llama()
    lorakit.inject(model, SoraConfig(r=4))
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == 4 * 2 * LLAMA_IO_PER_LAYER + 4 * LLAMA_TARGETS


def test_gate_init_and_update_equation():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, SoraConfig(r=4, alpha=8, gate_init="ones", target="q_proj"))
    m = next(iter(sora_modules(model).values()))
    assert torch.equal(m.gate, torch.ones(4)) and not m.lora_B.any()
    perturb(model)
    x = torch.randn(3, 32)
    expect = ((x @ m.lora_A.T) * m.gate) @ m.lora_B.T * (8 / 4)
    torch.testing.assert_close(m.delta(x, None), expect, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x @ m.delta_weight().T, expect, rtol=1e-5, atol=1e-6)


def test_proximal_step_is_soft_thresholding():
    model = tiny_llama()
    lorakit.inject(model, SoraConfig(r=4, sparse_lambda=2.0, target="q_proj"))
    mods = list(sora_modules(model).values())
    with torch.no_grad():
        for m in mods:
            m.gate.copy_(torch.tensor([0.5, -0.05, -0.3, 0.1]))
    left = sora_proximal_step(model, lr=0.05)  # threshold η·λ = 0.1
    for m in mods:
        torch.testing.assert_close(m.gate, torch.tensor([0.4, 0.0, -0.2, 0.0]), rtol=0, atol=1e-7)
    assert left == 2 * len(mods) and set(active_ranks(model).values()) == {2}
    with pytest.raises(ConfigError, match="lr must be a number >= 0"):
        sora_proximal_step(model, lr=-1.0)
    with pytest.raises(AdapterError, match="no SoRA adapter named 'x'"):
        sora_proximal_step(model, lr=0.1, name="x")


def test_unscaled_threshold_and_zero_lambda():
    assert SoraConfig(sparse_lambda=3e-4, lr_scaled=False).threshold(1e-3) == 3e-4
    assert SoraConfig(sparse_lambda=10.0).threshold(1e-3) == pytest.approx(1e-2)
    model = tiny_llama()
    lorakit.inject(model, SoraConfig(r=4, sparse_lambda=0.0, target="q_proj"))
    before = [m.gate.clone() for m in sora_modules(model).values()]
    sora_proximal_step(model, lr=1.0)
    assert all(torch.equal(a, m.gate) for a, m in zip(before, sora_modules(model).values()))


def test_callback_uses_the_gate_groups_lr_and_skips_untrained_gates():
    model = tiny_llama()
    cfg = SoraConfig(r=4, sparse_lambda=1.0, target="q_proj")
    lorakit.inject(model, cfg)
    (cb,) = Sora.trainer_callbacks(model, "default", cfg)
    m0, m1 = sora_modules(model).values()
    with torch.no_grad():
        for m in (m0, m1):
            m.gate.copy_(torch.tensor([1.0, -1.0, 0.25, 2.0]))
    opt = torch.optim.SGD([{"params": [m0.gate], "lr": 0.5}, {"params": [m0.lora_A], "lr": 9.0}], lr=0.1)
    cb.on_optimizer_step(SimpleNamespace(), SimpleNamespace(), None, optimizer=opt)
    torch.testing.assert_close(m0.gate, torch.tensor([0.5, -0.5, 0.0, 1.5]))
    assert torch.equal(m1.gate, torch.tensor([1.0, -1.0, 0.25, 2.0]))  # not in the optimizer


def _zero_some_gates(model):
    mods = list(sora_modules(model).values())
    with torch.no_grad():
        for i, m in enumerate(mods):
            if i == 0:
                m.gate.zero_()  # one module loses every rank
            else:
                m.gate[i % m.rank] = 0.0
                m.gate[(i + 3) % m.rank] = 0.0
    return mods


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_prune_is_bit_identical_smaller_and_loads_into_a_fresh_model(factory, tokens, tmp_path):
    model = factory()
    lorakit.inject(model, SoraConfig(r=8))
    perturb(model, scale=0.2)
    _zero_some_gates(model)
    before = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "full")
    dw_before = {p: m.delta_weight() for p, m in sora_modules(model).items()}
    expected = active_ranks(model)
    new = prune(model)
    assert new == expected and min(new.values()) == 0 and max(new.values()) == 6
    assert {p: m.rank for p, m in sora_modules(model).items()} == new
    assert torch.equal(logits_of(model, tokens), before)  # the Check: bit-identical
    for p, m in sora_modules(model).items():
        assert m.lora_A.shape == (new[p], m.spec.in_features) and m.lora_B.shape == (m.spec.out_features, new[p])
        torch.testing.assert_close(m.delta_weight(), dw_before[p], rtol=0, atol=1e-6)
    assert state(model).configs["default"].ranks == {p: k for p, k in new.items() if k != 8}
    assert prune(model) == new  # idempotent

    lorakit.save(model, tmp_path / "pruned")
    size = lambda d: (d / "adapter_model.safetensors").stat().st_size
    assert size(tmp_path / "pruned") < size(tmp_path / "full")
    saved = json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())
    assert saved["lorakit"]["config"]["ranks"] == state(model).configs["default"].ranks

    fresh = factory()
    lorakit.load(fresh, tmp_path / "pruned")
    assert torch.equal(logits_of(fresh, tokens), before)
    assert {p: m.rank for p, m in sora_modules(fresh).items()} == new
    with torch.enable_grad():  # a loaded (frozen) adapter: same output with autograd on
        assert torch.equal(fresh(input_ids=tokens).logits, before)


def test_pruned_adapter_trains_on_and_merges(tokens):
    model = tiny_llama()
    lorakit.inject(model, SoraConfig(r=4))
    perturb(model)
    _zero_some_gates(model)
    prune(model)
    out = logits_of(model, tokens)
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="merged.*unmerge first"):
        prune(model)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    model.train()
    model(input_ids=tokens).logits.pow(2).mean().backward()
    for m in sora_modules(model).values():
        if m.rank:
            assert m.gate.grad is not None and m.gate.grad.abs().sum() > 0


def test_to_lora_is_exact_and_drops_zero_gates():
    model = tiny_llama()
    lorakit.inject(model, SoraConfig(r=8, target="v_proj"))
    perturb(model, scale=0.2)
    mods = _zero_some_gates(model)
    for m in mods:
        a, b, s = m.to_lora()
        k = int((m.gate != 0).sum())
        assert a.shape == (max(k, 1), m.spec.in_features) and b.shape == (m.spec.out_features, max(k, 1))
        torch.testing.assert_close((b @ a) * s, m.delta_weight(), rtol=1e-5, atol=1e-7)
        if k > 2:
            a2, _b2, _ = m.to_lora(2)
            assert a2.shape[0] == 2


def test_inference_skips_zero_gates_only_without_grad(tokens):
    """With autograd on, zero gates stay in the graph: their gradient can revive them."""
    model = tiny_llama()
    lorakit.inject(model, SoraConfig(r=4, target="q_proj"))
    perturb(model)
    m = next(iter(sora_modules(model).values()))
    with torch.no_grad():
        m.gate[1] = 0.0
    model(input_ids=tokens).logits.pow(2).mean().backward()
    assert m.gate.grad[1] != 0
    # and the cached index of active gates follows in-place gate updates
    with torch.no_grad():
        x = torch.randn(2, 32)
        d1 = m.delta(x, None)
        m.gate[1] = 1.0
        d2 = m.delta(x, None)
    assert not torch.allclose(d1, d2)
    torch.testing.assert_close(d2, ((x @ m.lora_A.T) * m.gate) @ m.lora_B.T * m.scale)


def test_train_applies_the_proximal_step_after_the_optimizer(tiny_model_dir, text_file, tmp_path):
    """λ·η far above any gate: every step ends with all gates exactly 0. Had the step run
    before optimizer.step(), Adam's last update would leave them non-zero."""
    from lorakit.train import TrainConfig, train

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="sora", block_size=16, batch_size=2, max_steps=3, lr=1e-2, warmup_steps=0,
                      save_steps=3, logging_steps=1, progress=False)
    res = train(cfg, adapter={"r": 4, "sparse_lambda": 1e4})
    assert set(active_ranks(res.model).values()) == {0}
    prune(res.model)
    assert all(m.rank == 0 for m in sora_modules(res.model).values())
