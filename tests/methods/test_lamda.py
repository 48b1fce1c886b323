"""LaMDA: frozen A (SVD of W0 / random), trainable r×r S, B progressively frozen by column.

METHODS.md Check ("low memory"): A gets no gradient and no optimizer state; trainable
parameters per module are r² + d_out·r; frozen columns of B stay bit-identical.
"""

from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.methods.lamda import Lamda, LamdaConfig, frozen_count, lamda_modules, lamda_step
from tests.conftest import logits_of, perturb, tiny_llama

# d_out summed over the 7 linear layers of one tiny Llama block (q 32, k 16, v 16, o 32, mlp 64·2 + 32)
LLAMA_DOUT_PER_LAYER = 32 + 16 + 16 + 32 + 64 + 64 + 32


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"a_init": "pissa"}, r"a_init must be one of \('svd', 'random'\)"),
        ({"freeze_fraction": 1.5}, r"freeze_fraction must be in \[0.0, 1.0\]"),
        ({"freeze_steps": 0}, "freeze_steps must be a positive integer"),
        ({"seed": -1}, "seed must be an integer"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LamdaConfig(**kw)


def test_svd_rank_above_layer_size_is_an_error():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"r=17 exceeds min\(d_out, d_in\)=16"):
        lorakit.inject(model, LamdaConfig(r=17, target="k_proj"))
    lorakit.inject(model, LamdaConfig(r=17, target="k_proj", a_init="random"))  # no SVD: any r


@pytest.mark.parametrize("r", [2, 4])
def test_trainable_parameter_count(r):
    model = tiny_llama()
    lorakit.inject(model, LamdaConfig(r=r))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2 * (7 * r * r + LLAMA_DOUT_PER_LAYER * r)  # r² (S) + d_out·r (B) per module


def test_a_is_top_right_singular_vectors_and_gets_no_gradient(tokens):
    model = tiny_llama()
    lorakit.inject(model, LamdaConfig(r=4))
    mods = lamda_modules(model)
    layer = model.model.layers[0].self_attn.q_proj
    a = mods["model.layers.0.self_attn.q_proj"].lora_A
    _, _s, vh = torch.linalg.svd(layer.base.weight.detach())
    torch.testing.assert_close((a @ vh[:4].T).abs(), torch.eye(4), atol=1e-5, rtol=0)  # ±v_i, in order
    # A is a buffer: not a parameter, never saved (recomputed from W0), no grad after backward
    m = mods["model.layers.0.self_attn.q_proj"]
    assert "lora_A" not in dict(m.named_parameters()) and "lora_A" not in m.state_dict()
    perturb(model)
    model(input_ids=tokens).logits.sum().backward()
    assert all(not m.lora_A.requires_grad and m.lora_A.grad is None for m in mods.values())
    assert all(m.lora_S.grad is not None and m.lora_B.grad is not None for m in mods.values())


def test_random_a_is_regenerated_from_the_seed():
    def a_of(seed):
        model = tiny_llama()
        lorakit.inject(model, LamdaConfig(r=4, a_init="random", seed=seed))
        return lamda_modules(model)["model.layers.1.mlp.down_proj"].lora_A

    assert torch.equal(a_of(0), a_of(0))
    assert not torch.equal(a_of(0), a_of(1))


@pytest.mark.parametrize(
    "step,expected", [(0, 0), (1, 0), (333, 0), (334, 1), (666, 1), (667, 2), (1000, 3), (5000, 3)]
)
def test_frozen_count_schedule(step, expected):
    assert frozen_count(step, r=10, fraction=0.3, steps=1000) == expected  # ⌊0.3·10·t/T⌋


def _train(model, ids, steps, lr=1e-2):
    target = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model.train()
    history = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = (model(input_ids=ids).logits - target).pow(2).mean()
        loss.backward()
        opt.step()
        lamda_step(model, step)
        history.append({p: m.lora_B.detach().clone() for p, m in lamda_modules(model).items()})
    return history


def test_frozen_columns_stay_bit_identical_and_smallest_sigma_goes_first(tokens):
    model = tiny_llama()
    lorakit.inject(model, LamdaConfig(r=8, freeze_fraction=0.3, freeze_steps=4))  # ⌊0.3·8⌋ = 2 by step 4
    hist = _train(model, tokens, steps=8)
    for path, m in lamda_modules(model).items():
        # step t freezes ⌊2t/4⌋... columns: 0,0(t=1),1(t=2),1,2(t=4); smallest singular values first
        assert m.lora_frozen.tolist() == [False] * 6 + [True, True]
        b = hist[-1][path]
        torch.testing.assert_close(b, m.effective_B(), atol=0, rtol=0)
        assert torch.equal(hist[1][path][:, 7], b[:, 7])  # frozen after step 2
        assert torch.equal(hist[3][path][:, 6], b[:, 6])  # frozen after step 4
        assert not torch.equal(hist[3][path][:, :6], b[:, :6])  # the rest keeps training
        assert not torch.equal(hist[0][path][:, 6], hist[3][path][:, 6])  # trained before freezing


def test_random_a_freezes_smallest_norm_columns_first():
    model = tiny_llama()
    lorakit.inject(model, LamdaConfig(r=4, a_init="random", target="q_proj"))
    m = next(iter(lamda_modules(model).values()))
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape[0], 4) * torch.tensor([3.0, 0.1, 2.0, 1.0]))
    assert m.freeze_to(2) == [1, 3]
    assert m.freeze_to(3) == [2]
    assert m.freeze_to(1) == []  # never unfreezes


def test_trainer_callback_runs_the_schedule(tokens):
    model = tiny_llama()
    cfg = LamdaConfig(r=4, freeze_fraction=0.5, freeze_steps=2)
    lorakit.inject(model, cfg)
    (cb,) = Lamda.trainer_callbacks(model, "default", cfg)
    mods = lamda_modules(model).values()
    cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert all(m.num_frozen() == 0 for m in mods)
    cb.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert all(m.num_frozen() == 1 for m in mods)
    cb.on_step_end(None, SimpleNamespace(global_step=9), None)
    assert all(m.num_frozen() == 2 for m in mods)


def test_save_load_keeps_frozen_state(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, LamdaConfig(r=4, freeze_steps=2, freeze_fraction=0.5))
    _train(model, tokens, steps=3)
    model.eval()
    lorakit.save(model, tmp_path / "a")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    for (p, m), m2 in zip(lamda_modules(model).items(), lamda_modules(fresh).values()):
        assert torch.equal(m.lora_frozen, m2.lora_frozen) and m2.num_frozen() == 2, p
        assert torch.equal(m.lora_A, m2.lora_A)  # recomputed from W0, bit-identical
    torch.testing.assert_close(logits_of(fresh, tokens), logits_of(model, tokens), atol=1e-6, rtol=0)


def test_to_lora_is_exact():
    model = tiny_llama()
    lorakit.inject(model, LamdaConfig(r=4))
    perturb(model)
    for m in lamda_modules(model).values():
        a, b, s = m.to_lora()
        assert a.shape == (4, m.spec.in_features) and b.shape == (m.spec.out_features, 4)
        torch.testing.assert_close(s * b @ a, m.delta_weight(), atol=1e-6, rtol=1e-5)
