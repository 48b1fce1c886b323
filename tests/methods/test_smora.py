"""SMoRA: every rank an expert, top-k ranks per token, balancing by router-bias updates.

METHODS.md Check: with all ranks active and uniform gates it equals plain LoRA
(test_all_ranks_and_uniform_gates_equal_plain_lora).
"""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.core.io import export_peft
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.methods.smora import Smora, SmoraConfig, smora_balance_step, smora_modules
from tests.conftest import adapters, logits_of, randomize, tiny_llama


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"r": 4, "top_k": 5}, "top_k=5 exceeds the number of ranks r=4"),
        ({"r": 0}, "r must be a positive integer"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_k": 2.5}, "top_k must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive finite number"),
        ({"bias_update_rate": -1e-5}, "bias_update_rate must be a non-negative finite number"),
        ({"bias_update_rate": float("nan")}, "bias_update_rate must be a non-negative finite number"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SmoraConfig(**kw)


def test_all_ranks_and_uniform_gates_equal_plain_lora(tokens):
    """k = r and a zero router (softmax = 1/r, times k = 1 for every rank): SMoRA is LoRA B A."""
    lora = tiny_llama()
    lorakit.inject(lora, LoraConfig(r=8, alpha=16))
    randomize(lora, seed=3)
    smora = tiny_llama()
    lorakit.inject(smora, SmoraConfig(r=8, top_k=8, alpha=16))
    src = adapters(lora)
    with torch.no_grad():
        for path, m in smora_modules(smora).items():
            m.lora_A.copy_(src[path].lora_A.weight)
            m.lora_B.copy_(src[path].lora_B.weight)
            m.router.zero_()
            m.router_bias.copy_(torch.randn(8))  # with k = r the bias changes nothing
    out = logits_of(smora, tokens)
    assert torch.equal(out, logits_of(lora, tokens))
    assert not torch.allclose(out, logits_of(tiny_llama(), tokens))  # the LoRA really acts


def test_top_k_routing_equation_and_bias_only_selects():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, SmoraConfig(r=6, top_k=2, alpha=12, target="q_proj"))
    randomize(model, seed=1, std=0.3)
    m = next(iter(smora_modules(model).values()))
    with torch.no_grad():
        m.router_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))  # rank 5 always chosen
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = m.delta(x, None)
    expect = torch.zeros(2, 5, 32)
    for i in range(2):
        for t in range(5):
            z = m.router @ x[i, t]  # (r,)
            chosen = torch.topk(z + m.router_bias, 2).indices
            assert 5 in chosen.tolist()
            g = torch.softmax(z[chosen], 0) * 2  # gate values from z, not z + b
            h = (m.lora_A @ x[i, t])[chosen] * g
            expect[i, t] = m.lora_B[:, chosen] @ h * (12 / 6)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert m.last_counts.tolist()[5] == 10 and int(m.last_counts.sum()) == 20


def _toy(rate: float, seed: int = 0):
    """One 16x16 linear layer whose router prefers rank 0 for every input (inputs share an
    offset along dim 0 and router row 0 points along it): top-1 routing collapses onto rank 0."""
    torch.manual_seed(seed)
    toy = nn.Sequential(nn.Linear(16, 16))
    lorakit.inject(toy, SmoraConfig(target="0", r=4, top_k=1, bias_update_rate=rate))
    m = smora_modules(toy)["0"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.router.copy_(torch.randn(4, 16, generator=g) * 0.1)
        m.router[0, 0] += 1.0
    return toy, m, g


def _shares_after_training(rate: float, steps: int = 50) -> torch.Tensor:
    toy, m, g = _toy(rate)
    off = torch.zeros(16)
    off[0] = 3.0
    target = torch.randn(16, 16, generator=g) * 0.3
    opt = torch.optim.Adam([p for p in toy.parameters() if p.requires_grad], lr=1e-2)
    toy.train()
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g) + off
        loss = (toy(x) - x @ target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        smora_balance_step(toy)
    toy.eval()
    with torch.no_grad():
        toy(torch.randn(512, 16, generator=g) + off)
    return m.last_counts.float() / m.last_counts.sum()


def test_bias_balancing_keeps_every_rank_used():
    # u = 0.05 instead of the paper's 1e-5: the toy has 50 steps to undo a logit gap of ~3
    balanced = _shares_after_training(rate=0.05)
    assert (balanced > 0.1).all(), balanced
    collapsed = _shares_after_training(rate=0.0)
    assert collapsed[0] > 0.9 and collapsed.min() < 0.02, collapsed


def test_balance_step_moves_the_bias_by_u_against_the_load():
    toy, m, _ = _toy(rate=0.5)
    toy.eval()
    toy(torch.randn(8, 16))  # eval forwards are not counted
    assert not m.pending_load.any()
    toy.train()
    with torch.no_grad():
        toy(torch.randn(8, 16) + torch.eye(16)[0] * 3)
    assert m.pending_load.tolist() == [8.0, 0.0, 0.0, 0.0]
    smora_balance_step(toy)
    assert m.router_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert not m.pending_load.any()
    smora_balance_step(toy)  # nothing routed since: no change
    assert m.router_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_trainer_callback_updates_the_bias_after_each_optimizer_step(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.train import TrainConfig, train

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="smora", block_size=16, batch_size=2, max_steps=3, lr=1e-2, warmup_steps=0,
                      save_steps=3, logging_steps=1, progress=False)
    res = train(cfg, adapter={"r": 4, "top_k": 2, "bias_update_rate": 0.25})
    for m in smora_modules(res.model).values():
        b = m.router_bias
        # 3 steps of +-0.25 (or 0 for a rank at exactly the mean load); the loads were reset
        assert b.any() and torch.equal(b / 0.25, (b / 0.25).round()) and (b.abs() <= 0.75).all(), b
        assert not m.pending_load.any()
    reloaded = lorakit.load(AutoModelForCausalLM.from_pretrained(tiny_model_dir), res.adapter_dir)
    for path, m in smora_modules(reloaded).items():
        assert torch.equal(m.router_bias, smora_modules(res.model)[path].router_bias)


def test_save_load_round_trip_keeps_router_and_bias(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, SmoraConfig(r=8, top_k=2))
    randomize(model, seed=4, std=0.2)
    with torch.no_grad():
        for m in smora_modules(model).values():
            m.router_bias.copy_(torch.randn(8) * 3)  # large enough to change which ranks are picked
    out = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=0)
    for m in smora_modules(fresh).values():
        m.router_bias.zero_()
    assert not torch.allclose(logits_of(fresh, tokens), out)  # the bias was part of what was restored


def test_merge_and_export_refuse_and_leave_the_model_unchanged(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, SmoraConfig(r=4, top_k=2))
    randomize(model, seed=2)
    out = logits_of(model, tokens)
    with pytest.raises(AdapterError, match="SMoRA routes every token.*cannot be merged into the base weights"):
        lorakit.merge(model)
    assert not any(layer.merged for layer in adapted_layers(model).values())
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=0)
    assert not hasattr(Smora, "to_lora")
    with pytest.raises(ConfigError, match="cannot be exported to LoRA"):
        export_peft(model, tmp_path / "peft")
