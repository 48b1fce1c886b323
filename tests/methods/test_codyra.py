"""CoDyRA: per-task gated LoRA, the authors' sparsity schedule, fold into the base between tasks.

METHODS.md: "per-rank gates with L1/sparsity as in SoRA, applied per task in a task sequence;
measures forgetting on earlier tasks" — test_gates_reach_exactly_zero_and_pruning_is_bit_identical,
test_two_task_sequence_folds_sparsifies_and_reports_forgetting.
"""

import math
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.continual import forgetting, run_task_sequence
from lorakit.core.inject import adapted_layers, state
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.codyra import (
    Codyra,
    CodyraConfig,
    CodyraStrategy,
    codyra_modules,
    codyra_proximal_step,
    kappa_schedule,
    next_task,
)
from lorakit.methods.sora import Sora, active_ranks, prune
from tests.conftest import logits_of, perturb, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("kw,msg", [
    ({"dense_fraction": 1.5}, r"dense_fraction must be in \[0.0, 1.0\)"),
    ({"dense_fraction": -0.1}, "dense_fraction must be in"),
    ({"lambda_steps": 1}, "lambda_steps must be an integer >= 2"),
    ({"lambda_steps": 2.5}, "lambda_steps must be an integer >= 2"),
    ({"lambda_steps": True}, "lambda_steps must be an integer >= 2"),
    ({"sparse_lambda": -1.0}, "sparse_lambda must be a finite number >= 0"),  # SoRA's checks still apply
    ({"r": 0}, "r must be a positive integer"),
    ({"gate_init": "zeros"}, "gate_init must be one of"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        CodyraConfig(**kw)


def test_schedule_argument_errors():
    with pytest.raises(ConfigError, match="total_steps must be a positive integer, got 0"):
        kappa_schedule(0, 0, 1.0)
    with pytest.raises(ConfigError, match=r"step must be an integer in \[0, 10\), got 10"):
        kappa_schedule(10, 10, 1.0)
    cfg = CodyraConfig(lr_scaled=True, dense_fraction=0.0)
    with pytest.raises(ConfigError, match="lr_scaled=True needs the learning rate of the gates"):
        cfg.step_threshold(5, 10, None)
    assert cfg.step_threshold(0, 10, None) is None  # no step at k = 0 (k > ρK is required)


def test_defaults_follow_the_authors_and_it_is_a_sora_adapter():
    cfg = CodyraConfig()
    assert (cfg.r, cfg.alpha, cfg.sparse_lambda, cfg.lr_scaled) == (16, 16.0, 5e-3, False)
    assert (cfg.dense_fraction, cfg.lambda_steps) == (0.5, 50)
    spec = lorakit.get_method("codyra")
    assert spec.paper == "arXiv:2412.01004" and spec.config_cls is CodyraConfig
    model = tiny_llama()
    lorakit.inject(model, CodyraConfig(target="q_proj"))
    m = next(iter(codyra_modules(model).values()))
    assert isinstance(m, Sora) and m.scale == 1.0 and m.rank == 16  # authors' lora_scaling = 1
    assert lorakit.get_method("sora").config_cls.method == "sora"  # subclassing left SoRA alone


def reference_thresholds(total, rho, kappa_max, n):
    """The authors' models/codyra.py train_model loop, line by line (None = no proximal step)."""
    lambdas = [kappa_max * i / (n - 1) for i in range(n)]  # np.linspace(0, max_kappa, lambda_num)
    threshold_id, threshold = 0, lambdas[0]
    dense_iters = rho * total
    lambda_step_iters = int((total - dense_iters) // n)
    out = []
    for iteration in range(total):
        if lambda_step_iters > 0 and iteration >= dense_iters and iteration % lambda_step_iters == 0:
            threshold_id += 1
            threshold = lambdas[min(len(lambdas) - 1, threshold_id)]
        out.append(threshold if iteration > dense_iters else None)
    return out


@pytest.mark.parametrize("total,rho,n", [(500, 0.5, 50), (1000, 0.5, 50), (200, 0.3, 10), (103, 0.25, 7),
                                         (40, 0.0, 4), (64, 0.9, 3)])
def test_schedule_matches_the_reference_loop(total, rho, n):
    ours = [kappa_schedule(k, total, 7e-4, rho, n) for k in range(total)]
    ref = reference_thresholds(total, rho, 7e-4, n)
    assert [k is None for k in ours] == [k is None for k in ref]
    sparse = [k for k, x in enumerate(ref) if x is not None]
    assert [ours[k] for k in sparse] == pytest.approx([ref[k] for k in sparse], rel=1e-12, abs=0)
    assert ours[-1] == pytest.approx(7e-4)  # the staircase ends at κ_max


def test_short_tasks_still_climb_the_staircase():
    # K − ρK = 10 < n = 50: the reference's stair length is 0 and κ stays 0 (no sparsity); ours is 1
    assert set(reference_thresholds(20, 0.5, 1.0, 50)) == {None, 0.0}
    assert kappa_schedule(10, 20, 1.0, 0.5, 50) is None  # k ≤ ρK: dense
    assert kappa_schedule(11, 20, 1.0, 0.5, 50) == pytest.approx(2 / 49)
    assert kappa_schedule(19, 20, 1.0, 0.5, 50) == pytest.approx(10 / 49)


def _with_gates(model, values):
    with torch.no_grad():
        for m in codyra_modules(model).values():
            m.gate.copy_(torch.tensor(values))


def test_proximal_step_is_soft_thresholding_on_the_schedule():
    model = tiny_llama()
    # n = 2: κ jumps to κ_max at the first sparse step; ρ = 0.5 of K = 10 steps are dense
    lorakit.inject(model, CodyraConfig(r=4, target="q_proj", sparse_lambda=0.1, lambda_steps=2))
    _with_gates(model, [0.5, -0.05, -0.3, 0.1])
    assert codyra_proximal_step(model, step=5, total_steps=10) == 4 * 2  # dense phase: untouched
    assert torch.equal(next(iter(codyra_modules(model).values())).gate, torch.tensor([0.5, -0.05, -0.3, 0.1]))
    left = codyra_proximal_step(model, step=6, total_steps=10)
    for m in codyra_modules(model).values():
        torch.testing.assert_close(m.gate, torch.tensor([0.4, 0.0, -0.2, 0.0]), rtol=0, atol=1e-7)
    assert left == 2 * 2 and set(active_ranks(model).values()) == {2}
    with pytest.raises(AdapterError, match="no CoDyRA adapter named 'x'"):
        codyra_proximal_step(model, 6, 10, name="x")


def test_lr_scaled_threshold():
    cfg = CodyraConfig(sparse_lambda=2.0, lambda_steps=2, lr_scaled=True)
    assert cfg.step_threshold(9, 10, 0.01) == pytest.approx(0.02)
    assert CodyraConfig(sparse_lambda=2.0, lambda_steps=2).step_threshold(9, 10, 0.01) == pytest.approx(2.0)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_gates_reach_exactly_zero_and_pruning_is_bit_identical(factory, tokens):
    model = factory()
    base = logits_of(model, tokens)
    lorakit.inject(model, CodyraConfig(r=8, sparse_lambda=1e6, lambda_steps=2))
    perturb(model, scale=0.2)
    assert codyra_proximal_step(model, step=99, total_steps=100) == 0  # a huge κ zeroes every gate
    assert all(bool((m.gate == 0).all()) for m in codyra_modules(model).values())
    assert torch.equal(logits_of(model, tokens), base)  # every rank is off: exactly the base model
    assert set(prune(model).values()) == {0}  # SoRA's pruning works on CoDyRA adapters
    assert torch.equal(logits_of(model, tokens), base)

    # a moderate κ zeroes only some ranks; pruning them leaves the output bit-identical
    model = factory()
    lorakit.inject(model, CodyraConfig(r=8, sparse_lambda=0.6, lambda_steps=2))
    perturb(model, scale=0.2)
    codyra_proximal_step(model, step=99, total_steps=100)
    ranks = active_ranks(model)
    assert 0 < sum(ranks.values()) < 8 * len(ranks)
    before = logits_of(model, tokens)
    assert prune(model) == ranks
    assert torch.equal(logits_of(model, tokens), before)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_next_task_folds_the_update_and_restarts_the_gates(factory, tokens):
    model = factory()
    lorakit.inject(model, CodyraConfig(r=4, sparse_lambda=0.6, lambda_steps=2))
    perturb(model, scale=0.2)
    codyra_proximal_step(model, step=9, total_steps=10)
    prune(model)  # a pruned adapter (smaller A, B, g) folds and restarts at the full rank too
    mods = codyra_modules(model)
    layers = adapted_layers(model)
    expect_w = {p: (layers[p].weight_view() + m.delta_weight()).clone() for p, m in mods.items()}
    pruned = {p: m.rank for p, m in mods.items()}
    assert 0 < sum(pruned.values()) < 4 * len(pruned)
    out = logits_of(model, tokens)
    assert next_task(model) == pruned  # the ranks that were folded
    for p, m in codyra_modules(model).items():
        torch.testing.assert_close(layers[p].weight_view(), expect_w[p], rtol=0, atol=1e-6)
        assert m.rank == 4 and not m.lora_B.any() and bool((m.gate != 0).all())
        assert m.lora_A.requires_grad and m.gate.requires_grad
    assert state(model).configs["default"].ranks == {}
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)  # the fold keeps the model
    lorakit.unmerge(model)  # the fold is not a merge: nothing to undo
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)


def test_next_task_refuses_a_merged_adapter_and_changes_nothing(tokens):
    model = tiny_llama()
    lorakit.inject(model, CodyraConfig(r=4))
    perturb(model)
    lorakit.merge(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterError, match="adapter 'default' is merged"):
        next_task(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_trainer_callback_uses_global_step_max_steps_and_the_gate_lr():
    model = tiny_llama()
    cfg = CodyraConfig(r=4, target="q_proj", sparse_lambda=0.5, lambda_steps=2, lr_scaled=True)
    lorakit.inject(model, cfg)
    (cb,) = Codyra.trainer_callbacks(model, "default", cfg)
    m0, m1 = codyra_modules(model).values()
    _with_gates(model, [1.0, -1.0, 0.25, 2.0])
    opt = torch.optim.SGD([{"params": [m0.gate], "lr": 0.5}, {"params": [m0.lora_A], "lr": 9.0}], lr=0.1)
    cb.on_optimizer_step(SimpleNamespace(), SimpleNamespace(global_step=3, max_steps=10), None, optimizer=opt)
    assert torch.equal(m0.gate, torch.tensor([1.0, -1.0, 0.25, 2.0]))  # step 3 ≤ ρK = 5: dense
    cb.on_optimizer_step(SimpleNamespace(), SimpleNamespace(global_step=7, max_steps=10), None, optimizer=opt)
    torch.testing.assert_close(m0.gate, torch.tensor([0.75, -0.75, 0.0, 1.75]))  # κ·η = 0.5·0.5
    assert torch.equal(m1.gate, torch.tensor([1.0, -1.0, 0.25, 2.0]))  # not in the optimizer


def bert_classifier(num_labels=2, seed=0):
    """tiny_bert's shape with `num_labels` classes and no dropout (learns the toy reproducibly)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def cls_task(ranges, n=8, t=4, seed=0):
    """Examples whose label c is given by the token range ranges[c] the ids are drawn from."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, (t,), generator=g), "attention_mask": torch.ones(t, dtype=torch.long),
             "labels": c} for c, (lo, hi) in enumerate(ranges) for _ in range(n)]


def test_two_task_sequence_folds_sparsifies_and_reports_forgetting():
    """Task B flips task A's labels on a tiny BERT classifier; CoDyRA learns A, then B, and the matrix shows
    what B cost A. A large κ_max makes the ranks shrink within each task."""
    model = bert_classifier()
    lorakit.inject(model, CodyraConfig(r=4, modules_to_save=["classifier"],
                                       sparse_lambda=0.3, lambda_steps=2))
    strategy = CodyraStrategy()
    w_query = adapted_layers(model)["bert.encoder.layer.0.attention.self.query"].weight_view()
    w0 = w_query.clone()
    tasks = [cls_task([(8, 12), (12, 16)], seed=1), cls_task([(12, 16), (8, 12)], seed=2)]
    res = run_task_sequence(model, tasks, strategy=strategy, epochs=4, lr=1e-2)
    r = res.matrix
    assert len(r) == 2 and all(0.0 <= v <= 1.0 for row in r for v in row)
    assert r[0][0] >= 0.75  # task A was learned
    assert res.forgetting == pytest.approx(forgetting(r)) == pytest.approx(r[0][0] - r[1][0])
    assert math.isfinite(res.backward_transfer) and res.to_dict()["forgetting"] == res.forgetting
    assert not torch.equal(w_query, w0)  # task A's update was folded into the base before task B
    assert len(strategy.ranks) == 2
    full = 4 * len(strategy.ranks[0])
    assert all(sum(ranks.values()) < full for ranks in strategy.ranks)  # ranks were selected per task


def test_next_task_refuses_a_quantized_base_before_changing_anything(tokens):
    from lorakit.quant.quantize import quantize_model

    model = quantize_model(tiny_llama(), bits=8, group_size=32, targets=["v_proj"])
    lorakit.inject(model, CodyraConfig(r=4, target=["q_proj", "v_proj"]))
    perturb(model)
    out = logits_of(model, tokens)
    b_before = {p: m.lora_B.clone() for p, m in codyra_modules(model).items()}
    with pytest.raises(AdapterError, match="cannot fold CoDyRA adapter 'default' into quantized base layer"):
        next_task(model)
    assert all(torch.equal(m.lora_B, b_before[p]) for p, m in codyra_modules(model).items())  # no reset either
    assert torch.equal(logits_of(model, tokens), out)
