"""MoLA: per-layer numbers of LoRA experts (more in higher layers), top-2 routers, and the
Switch load-balancing loss carried into the backward by AddAuxiliaryLoss."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.mola import (
    LAYOUTS,
    AddAuxiliaryLoss,
    MolaConfig,
    aux_loss,
    expert_share,
    layer_index,
    mola_config,
    mola_modules,
    switch_balance_loss,
)
from tests.conftest import logits_of, randomize, tiny_bert, tiny_llama


def llama_layers(n: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"experts": [1, 4], "top_k": 2}, r"top_k=2 exceeds the number of experts of some layers \(counts \[1, 4\]\)"),
        ({"experts": "square", "top_k": 6}, "top_k=6 exceeds"),
        ({"experts": [2, 0, 4]}, r"experts\[1\] must be a positive integer"),
        ({"experts": [2, -1]}, r"experts\[1\] must be a positive integer"),
        ({"experts": "pyramid"}, "experts must be a layout in .*'hourglass', 'inverted', 'square', 'triangle'"),
        ({"experts": []}, "non-empty list of counts"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"r": 0}, "r must be a positive integer"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"alpha": -2}, "alpha must be a positive finite number"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef must be a non-negative finite number"),
        ({"dropout": -0.1}, "dropout must be in"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MolaConfig(**kw)


def test_errors_when_layers_cannot_be_placed():
    with pytest.raises(ConfigError, match="needs num_layers"):
        lorakit.inject(tiny_llama(), MolaConfig())
    with pytest.raises(ConfigError, match="'bert.pooler.dense' has no layer number"):
        lorakit.inject(tiny_bert(), MolaConfig(num_layers=2))  # all-linear includes the pooler
    with pytest.raises(ConfigError, match="is in layer 1, but num_layers=1"):
        lorakit.inject(tiny_llama(), MolaConfig(num_layers=1, experts=[2]))


def test_layer_index_is_the_first_number_in_the_path():
    assert layer_index("model.layers.7.self_attn.q_proj") == 7
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("0") == 0
    assert layer_index("bert.pooler.dense") is None
    assert layer_index("model.layers.3.experts.12.w1") == 3


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_give_each_quarter_of_the_layers_its_expert_count(layout):
    model = llama_layers(8)
    lorakit.inject(model, mola_config(model, experts=layout, r=2))
    per_layer = {}
    for path, m in mola_modules(model).items():
        per_layer.setdefault(layer_index(path), set()).add(m.n_experts)
        assert m.router.shape == (m.n_experts, m.spec.in_features)
        assert m.lora_A.shape == (m.n_experts, 2, m.spec.in_features)
        assert m.lora_B.shape == (m.n_experts, m.spec.out_features, 2) and not m.lora_B.any()
    counts = LAYOUTS[layout]
    assert per_layer == {layer: {counts[layer // 2]} for layer in range(8)}


def test_inverted_default_grows_with_depth_and_lists_can_be_per_layer():
    model = llama_layers(4)
    lorakit.inject(model, mola_config(model))  # default: "inverted" 2/4/6/8
    assert [m.n_experts for p, m in mola_modules(model).items() if p.endswith("q_proj")] == [2, 4, 6, 8]
    model = llama_layers(4)
    lorakit.inject(model, mola_config(model, experts=[3, 2, 5, 4], target="q_proj"))
    assert [m.n_experts for m in mola_modules(model).values()] == [3, 2, 5, 4]
    assert MolaConfig(experts=["2", "6"]).experts == [2, 6]  # the CLI's --experts 2,6


def test_forward_equals_a_per_token_mixture_loop():
    """The authors' Linear_MoE loop: softmax over all experts, top-k, renormalise, Σ w_e s B_e A_e x."""
    model = llama_layers(4)
    lorakit.inject(model, mola_config(model, r=3, alpha=6, top_k=2, target="v_proj"))
    randomize(model, seed=5, std=0.3)
    m = list(mola_modules(model).values())[3]  # 8 experts
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        got = m.delta(x, None)
    expect = torch.zeros(2, 7, m.spec.out_features)
    for i in range(2):
        for t in range(7):
            p = torch.softmax(m.router @ x[i, t], 0)
            w, chosen = torch.topk(p, 2)
            w = w / w.sum()
            for wj, e in zip(w, chosen.tolist()):
                expect[i, t] += wj * (m.lora_B[e] @ (m.lora_A[e] @ x[i, t])) * (6 / 3)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert int(m.last_counts.sum()) == 2 * 7 * 2


def test_aux_loss_enters_the_backward_exactly_as_if_added_to_the_loss():
    torch.manual_seed(0)
    model = llama_layers(4)
    lorakit.inject(model, mola_config(model, r=2, target="q_proj", aux_loss_coef=0.3))
    randomize(model, seed=6, std=0.3)
    m = list(mola_modules(model).values())[2]
    m.train()
    x = torch.randn(3, 5, 32)
    m.delta(x, None).pow(2).sum().backward()
    with_aux = m.router.grad.clone()
    # the same loss written out: main term + c·E·Σ f·P of this router
    m.zero_grad()
    m.aux_loss_coef = 0.0
    main = m.delta(x, None).pow(2).sum()
    probs, chosen, _ = m.route(x.reshape(-1, 32))
    explicit = 0.3 * switch_balance_loss(probs, chosen, m.n_experts)
    (main + explicit).backward()
    torch.testing.assert_close(with_aux, m.router.grad, rtol=1e-5, atol=1e-7)
    m.zero_grad()
    m.delta(x, None).pow(2).sum().backward()
    assert not torch.allclose(with_aux, m.router.grad)  # the aux term really contributed
    assert torch.isclose(m.last_aux_loss, explicit.detach())  # logged value of the last aux forward


def test_switch_loss_values_and_add_aux_identity():
    uniform = torch.full((8, 4), 0.25)
    chosen = torch.arange(8).remainder(4).view(8, 1)
    assert torch.isclose(switch_balance_loss(uniform, chosen, 4), torch.tensor(1.0))
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    assert torch.isclose(switch_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), 4), torch.tensor(4.0))
    x = torch.randn(3, requires_grad=True)
    a = torch.tensor(2.0, requires_grad=True)
    y = AddAuxiliaryLoss.apply(x, a * a)
    assert torch.equal(y, x)
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 3.0)) and a.grad == 4.0  # ∂(a²)/∂a


def test_no_aux_loss_in_eval_or_without_grad():
    model = llama_layers(4)
    lorakit.inject(model, mola_config(model, r=2))
    ids = torch.randint(0, 128, (2, 6))
    model.eval()
    model(input_ids=ids).logits.sum().backward()
    assert aux_loss(mola_modules(model)) == 0.0
    model.train()
    model(input_ids=ids)
    assert aux_loss(mola_modules(model)) > 0  # c · Σ_routers E·Σ f P of that training forward


def _shares_after_training(coef: float, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """One 16x16 linear layer, 4 experts, top-2; the router prefers experts 0 and 1 for every
    input (inputs share an offset along dim 0 that router rows 0 and 1 point along)."""
    torch.manual_seed(seed)
    toy = nn.Sequential(nn.Linear(16, 16))
    lorakit.inject(toy, MolaConfig(target="0", r=2, top_k=2, experts=[4], num_layers=1, aux_loss_coef=coef))
    m = mola_modules(toy)["0"]
    g = torch.Generator().manual_seed(seed)
    off = torch.zeros(16)
    off[0] = 3.0
    with torch.no_grad():
        m.router.copy_(torch.randn(4, 16, generator=g) * 0.1)
        m.router[:2, 0] += 1.0
    target = torch.randn(16, 16, generator=g) * 0.3
    opt = torch.optim.Adam([p for p in toy.parameters() if p.requires_grad], lr=1e-2)
    toy.train()
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g) + off
        loss = (toy(x) - x @ target).pow(2).mean()  # the aux loss is not in here: it rides the backward
        opt.zero_grad()
        loss.backward()
        opt.step()
    toy.eval()
    with torch.no_grad():
        toy(torch.randn(512, 16, generator=g) + off)
    return expert_share(mola_modules(toy))["0"]


def test_load_balancing_loss_keeps_every_expert_used():
    # c = 1 instead of the authors' 0.001: one router, 50 steps to undo a logit gap of ~3
    balanced = _shares_after_training(coef=1.0)
    assert (balanced > 0.1).all(), balanced
    collapsed = _shares_after_training(coef=0.0)
    assert collapsed[2:].max() < 0.02, collapsed


def test_save_load_round_trip_with_a_per_layer_list(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, MolaConfig(num_layers=2, experts=[3, 5], r=2))
    randomize(model, seed=7, std=0.2)
    out = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=0)
    assert sorted({m.n_experts for m in mola_modules(fresh).values()}) == [3, 5]


def test_merge_refuses_and_leaves_the_model_unchanged(tokens):
    model = tiny_llama()
    lorakit.inject(model, MolaConfig(num_layers=2, r=2))
    randomize(model, seed=8)
    out = logits_of(model, tokens)
    with pytest.raises(AdapterError, match="MoLA routes every token.*cannot be merged into the base weights"):
        lorakit.merge(model)
    assert not any(layer.merged for layer in adapted_layers(model).values())
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=0)
