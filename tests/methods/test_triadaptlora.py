"""TriAdaptLoRA: a full r × r core split into lower + upper triangular parts, ranks grown by
the change of the normalised Frobenius norm ‖C‖_F / g under linear / exponential thresholds,
within a total budget.

METHODS.md: "triangular split of the rank allocation with a normalized Frobenius-norm
importance per module and adaptive thresholds to grow ranks during training."
"""

import copy
import math

import pytest
import torch

import lorakit
from lorakit.core.inject import state
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.triadaptlora import (
    TriAdaptAllocator,
    TriAdaptLora,
    TriAdaptLoraConfig,
    add_orth_grad_,
    n_to_grow,
    orth_regularizer,
    rank_pattern,
    triadaptlora_modules,
)
from tests.conftest import logits_of, perturb, tiny_llama

N_LLAMA = 14


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"init_r": 4, "target_r": 2}, "target_r must be >= init_r=4"),
        ({"target_r": 8, "max_r": 6}, "max_r must be >= target_r=8"),
        ({"growth": "cubic"}, "growth must be one of \\('linear', 'exponential'\\)"),
        ({"budget": -3}, "budget must be a positive integer"),
        ({"add_r": 0}, "add_r must be a positive integer"),
        ({"interval": 0}, "interval must be a positive integer"),
        ({"tinit": -1}, "tinit must be an integer >= 0"),
        ({"orth_reg_weight": -0.5}, "orth_reg_weight must be a finite number >= 0"),
        ({"orth_reg_weight": float("inf")}, "orth_reg_weight must be a finite number >= 0"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"tinit": 4, "tfinal": 6, "total_step": 10}, "tinit \\+ tfinal must be < total_step"),
        ({"ranks": {"q_proj": 17}}, r"ranks\['q_proj'\] must be an integer between 1 and max_r=16"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TriAdaptLoraConfig(**kw)


@pytest.mark.parametrize(
    "kw,total,msg",
    [
        ({"budget": 10}, 20, "budget=10 is below the number of adapted modules \\(14\\)"),
        ({"target_r": 2, "max_r": 2, "budget": 29}, 20, "exceeds the pre-allocated capacity Σ max_r = 28"),
        ({"interval": 25}, 20, "interval=25 leaves no growth step"),
        ({}, None, "TriAdaptLoRA needs total_step"),
    ],
)
def test_schedule_and_budget_errors(kw, total, msg):
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(**kw))
    with pytest.raises(ConfigError, match=msg):
        TriAdaptAllocator(model, total_step=total)


def test_bad_budget_fails_before_training():
    model = tiny_llama()
    cfg = TriAdaptLoraConfig(budget=3)
    lorakit.inject(model, cfg)
    with pytest.raises(ConfigError, match="budget=3 is below the number of adapted modules"):
        TriAdaptLora.trainer_callbacks(model, "default", cfg)


def test_update_equation_triangular_core_and_zero_init():
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(init_r=3, target_r=4, max_r=5, alpha=6, target="q_proj"))
    m = next(iter(triadaptlora_modules(model).values()))
    assert (m.rank, m.groups, m.capacity) == (3, 1, 5)
    assert not m.core().any() and not m.delta_weight().any()  # C = 0: starts at the base model
    perturb(model)
    lo, up = m.lora_L.detach()[:3, :3], m.lora_U.detach()[:3, :3]
    c = torch.tril(lo) + torch.triu(up)  # the diagonal belongs to both parts
    torch.testing.assert_close(m.core(), c)
    assert m.core()[0, 2] == up[0, 2] and m.core()[2, 0] == lo[2, 0] and m.core()[1, 1] == lo[1, 1] + up[1, 1]
    x = torch.randn(4, 32)
    expect = x @ (m.lora_B[:, :3] @ c @ m.lora_A[:3]).T * (6 / 3)  # (α / r) B C A x
    torch.testing.assert_close(m.delta(x, None), expect, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x @ m.delta_weight().T, expect, rtol=1e-5, atol=1e-6)
    a, b, s = m.to_lora()
    torch.testing.assert_close(s * b @ a, m.delta_weight(), rtol=1e-5, atol=1e-7)
    m.delta(x, None).sum().backward()  # slots beyond r get no gradient until they are grown into
    assert m.lora_A.grad[3:].abs().sum() == 0 and m.lora_L.grad[3:].abs().sum() == 0
    assert m.lora_U.grad[:, 3:].abs().sum() == 0 and m.lora_U.grad[:3, :3].abs().sum() > 0


def test_rank_one_uses_both_triangles():
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(init_r=1, target_r=2, max_r=2, target="q_proj"))
    perturb(model)
    m = next(iter(triadaptlora_modules(model).values()))
    m.delta(torch.randn(2, 32), None).sum().backward()
    assert m.lora_L.grad[0, 0] != 0 and m.lora_U.grad[0, 0] != 0


def test_growth_adds_strips_and_keeps_the_learned_core():
    """r -> r': the old C block is kept, the new row / column strips start at 0, so ΔW only
    rescales by r / r' (s = α / current rank)."""
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(init_r=2, target_r=3, max_r=5, target="q_proj"))
    m = next(iter(triadaptlora_modules(model).values()))
    perturb(model, scale=0.1)
    old_core, before = m.core().detach().clone(), m.delta_weight().detach().clone()
    assert m.grow_(2) == (2, 4)
    assert (m.rank, m.groups) == (4, 2)
    c = m.core()
    torch.testing.assert_close(c[:2, :2], old_core)
    assert not c[2:, :].any() and not c[:, 2:].any()
    torch.testing.assert_close(m.delta_weight(), before * 2 / 4, rtol=1e-6, atol=1e-8)
    with pytest.raises(AdapterError, match="cannot grow rank 4 by 2"):
        m.grow_(2)


def test_importance_is_the_change_of_the_normalised_frobenius_norm():
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(init_r=2, target_r=3, max_r=4, target=["q_proj", "v_proj"]))
    alloc = TriAdaptAllocator(model, total_step=10)
    mods = triadaptlora_modules(model)
    assert all(v == 0.0 for v in alloc.prev.values())  # C = 0 at the start
    perturb(model, scale=0.1)
    p0 = next(iter(mods))
    mods[p0].grow_(1)  # g = 2 for this module
    norms = {p: torch.linalg.norm(m.core().detach()).item() / m.groups for p, m in mods.items()}
    assert norms[p0] == pytest.approx(torch.linalg.norm(mods[p0].core().detach()).item() / 2)
    s1 = alloc.scores()
    assert s1 == pytest.approx(norms)  # N(t) − 0
    with torch.no_grad():
        mods[p0].lora_L.mul_(3.0)
    s2 = alloc.scores()
    assert s2[p0] > 0 and all(abs(s2[p]) < 1e-12 for p in mods if p != p0)  # only p0's C changed


def test_number_of_modules_to_grow_linear_and_exponential():
    # m = (t − tinit) / (T − tfinal − tinit); linear ⌊ℓ m⌋, exponential ⌊ℓ^m⌋, clamped to [1, n]
    assert n_to_grow("linear", 5, 0, 20, 40, 100) == 10
    assert n_to_grow("exponential", 5, 0, 20, 40, 100) == int(math.exp(0.25 * math.log(40))) == 2
    assert n_to_grow("linear", 1, 0, 20, 10, 100) == 1  # ⌊0.5⌋ = 0 -> at least one module
    assert n_to_grow("linear", 19, 0, 20, 400, 14) == 14  # never more than the modules
    assert n_to_grow("linear", 12, 2, 22, 30, 100) == 15


def _train(model, alloc, steps, lr=2e-2, seed=0, check=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        grown = alloc.optimizer_step(opt, step)
        opt.zero_grad()
        if check is not None:
            check(step, grown)


def test_budget_never_exceeded_threshold_picks_top_scores_and_ranks_differ():
    total, budget = 24, 40
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(init_r=1, target_r=3, max_r=5, budget=budget, add_r=1, interval=2,
                                             tinit=1, tfinal=3))
    alloc = TriAdaptAllocator(model, total_step=total)
    scored = []
    orig = alloc.scores
    alloc.scores = lambda: scored.append(orig()) or scored[-1]
    seen = []

    def check(step, grown):
        ranks = rank_pattern(model)
        assert sum(ranks.values()) <= budget, f"budget exceeded at step {step}"
        if grown:
            s = scored[-1]
            before = {p: r - grown.get(p, 0) for p, r in ranks.items()}
            left = budget - sum(before.values())
            assert len(grown) <= n_to_grow("linear", step, 1, total - 3, left, N_LLAMA)
            rest = [s[p] for p in s if p not in grown and before[p] < 5]
            assert not rest or min(s[p] for p in grown) >= max(rest)  # the threshold: top-n_t scores
        seen.append(ranks)

    _train(model, alloc, total, check=check)
    assert seen[0] == {p: 1 for p in seen[0]} and seen[-1] != seen[0]
    assert len(set(seen[-1].values())) > 1
    assert sum(seen[-1].values()) == budget and alloc.finalized  # linear thresholds reach the budget


def test_orth_regularizer_gradient_equals_the_loss_term():
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(init_r=2, target_r=2, max_r=3, target=["q_proj", "v_proj"]))
    perturb(model)
    ids = torch.randint(0, 128, (2, 6))
    twin = copy.deepcopy(model)
    (model(input_ids=ids, labels=ids).loss + 0.5 * orth_regularizer(model)).backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    add_orth_grad_(twin, 0.5)
    for m, t in zip(triadaptlora_modules(model).values(), triadaptlora_modules(twin).values()):
        for pn in ("lora_A", "lora_B", "lora_L", "lora_U"):
            torch.testing.assert_close(getattr(t, pn).grad, getattr(m, pn).grad, rtol=1e-5, atol=1e-8)


def test_saved_adapter_after_training_reproduces_outputs(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, TriAdaptLoraConfig(init_r=1, target_r=2, max_r=4, add_r=1, interval=1))
    alloc = TriAdaptAllocator(model, total_step=8)
    _train(model, alloc, 8)
    model.eval()
    before = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "mid")  # unpruned: capacity max_r, rank from the saved state
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "mid")
    torch.testing.assert_close(logits_of(fresh, tokens), before, rtol=0, atol=1e-6)
    ranks = rank_pattern(model)
    assert alloc.finish() == ranks  # pruning keeps the outputs exactly
    torch.testing.assert_close(logits_of(model, tokens), before, rtol=0, atol=1e-6)
    assert state(model).configs["default"].ranks == {p: k for p, k in ranks.items() if k != 4}
    lorakit.save(model, tmp_path / "final")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "final")
    assert rank_pattern(fresh) == ranks
    torch.testing.assert_close(logits_of(fresh, tokens), before, rtol=0, atol=1e-6)
    lorakit.merge(fresh)
    torch.testing.assert_close(logits_of(fresh, tokens), before, rtol=1e-5, atol=1e-5)


def test_train_grows_under_budget_and_saves_the_pruned_adapter(tiny_model_dir, text_file, tmp_path, tokens):
    from transformers import AutoModelForCausalLM, TrainerCallback

    from lorakit.train import TrainConfig, train

    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state_, control, model=None, **kwargs):
            seen.append(rank_pattern(model))

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="triadaptlora", block_size=16, batch_size=2, max_steps=10, lr=1e-2, warmup_steps=0,
                      save_steps=10, logging_steps=1, progress=False)
    budget = 30
    res = train(cfg, adapter={"init_r": 1, "target_r": 2, "max_r": 4, "budget": budget, "add_r": 1, "interval": 2},
                callbacks=[Watch()])
    assert len(seen) == 10 and all(sum(r.values()) <= budget for r in seen)
    assert seen[0] != seen[-1] and len(set(seen[-1].values())) > 1
    assert all(m.capacity == m.rank for m in triadaptlora_modules(res.model).values())  # pruned
    res.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lorakit.load(base, res.adapter_dir)
    torch.testing.assert_close(logits_of(base, tokens), logits_of(res.model, tokens), rtol=0, atol=1e-5)
