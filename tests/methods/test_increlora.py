"""IncreLoRA: ranks grow from init_r by module importance, from reserved (advance-learned)
triplets, under a total budget that is never exceeded.

METHODS.md: "start at rank 1 (or small), every interval add ranks to the top-h modules by
importance score; new ranks come from reserved, warmed-up triplets; total budget cap."
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.core.inject import state
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.increlora import (
    ACTIVE,
    DORMANT,
    RESERVED,
    AdamRowRestart,
    IncreLora,
    IncreLoraAllocator,
    IncreLoraConfig,
    _adam_of,
    add_orth_grad_,
    growth_steps,
    increlora_modules,
    orth_regularizer,
    pick_modules,
    prune,
    rank_pattern,
)
from tests.conftest import logits_of, perturb, tiny_llama

N_LLAMA = 14  # all-linear targets of the tiny Llama (2 layers × 7)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"init_r": 3, "target_r": 2}, "target_r must be >= init_r=3"),
        ({"init_r": 2, "target_r": 4, "max_r": 3}, "max_r must be >= target_r=4"),
        ({"init_r": 3, "target_r": 3, "max_r": 2}, "max_r must be >= target_r=3"),
        ({"init_r": 0}, "init_r must be a positive integer"),
        ({"budget": 0}, "budget must be a positive integer"),
        ({"top_h": 0}, "top_h must be a positive integer"),
        ({"add_r": 0}, "add_r must be a positive integer"),
        ({"interval": 0}, "interval must be a positive integer"),
        ({"interval": -5}, "interval must be a positive integer"),
        ({"interval": 2.5}, "interval must be a positive integer"),
        ({"tinit": -1}, "tinit must be an integer >= 0"),
        ({"tfinal": -2}, "tfinal must be an integer >= 0"),
        ({"advance_lambda": -1e-5}, "advance_lambda must be a finite number >= 0"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be a finite number >= 0"),
        ({"orth_reg_weight": float("nan")}, "orth_reg_weight must be a finite number >= 0"),
        ({"beta1": 1.0}, "beta1 must be in \\(0, 1\\)"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"total_step": 0}, "total_step must be a positive integer"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, "tinit \\+ tfinal must be < total_step"),
        ({"ranks": {"q_proj": 0}}, r"ranks\['q_proj'\] must be an integer between 1 and max_r=8"),
        ({"ranks": {"q_proj": 9}}, r"ranks\['q_proj'\] must be an integer between 1 and max_r=8"),
        ({"ranks": [1]}, "ranks must be a mapping"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        IncreLoraConfig(**kw)


@pytest.mark.parametrize(
    "kw,total,msg",
    [
        ({"budget": N_LLAMA - 1}, 20, f"budget={N_LLAMA - 1} is below the number of adapted modules \\({N_LLAMA}\\)"),
        ({"init_r": 2, "target_r": 2, "budget": N_LLAMA + 3}, 20, "below the ranks the modules start with"),
        ({"max_r": 3, "budget": 3 * N_LLAMA + 1}, 20, "exceeds the pre-allocated capacity"),
        ({"interval": 30}, 20, "interval=30 leaves no growth step"),
        ({"interval": 4, "tinit": 4, "tfinal": 12}, 20, "interval=4 leaves no growth step"),
        ({"tinit": 3}, 2, "tinit \\+ tfinal must be < total_step"),
        ({}, None, "IncreLoRA needs total_step"),
    ],
)
def test_schedule_and_budget_errors(kw, total, msg):
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(**kw))
    with pytest.raises(ConfigError, match=msg):
        IncreLoraAllocator(model, total_step=total)


def test_bad_budget_fails_before_training_and_unknown_adapter():
    model = tiny_llama()
    cfg = IncreLoraConfig(budget=5)
    lorakit.inject(model, cfg)
    with pytest.raises(ConfigError, match="budget=5 is below the number of adapted modules"):
        IncreLora.trainer_callbacks(model, "default", cfg)
    with pytest.raises(AdapterError, match="no IncreLoRA adapter named 'x'"):
        IncreLoraAllocator(model, name="x", total_step=5)


def test_init_slots_and_update_equation():
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=2, target_r=3, max_r=5, alpha=6, target="q_proj"))
    m = next(iter(increlora_modules(model).values()))
    assert m.slot_state.tolist() == [ACTIVE, ACTIVE, DORMANT, DORMANT, DORMANT]
    assert (m.rank, m.live, m.capacity) == (2, 2, 5) and not m.lora_E.any()
    assert 0.01 < m.lora_A.std().item() < 0.03 and 0.01 < m.lora_B.std().item() < 0.03  # N(0, 0.02)
    perturb(model)
    m.reserve_(2)  # two reserved triplets: λ̃ = advance_lambda, frozen
    assert m.slot_state.tolist() == [ACTIVE, ACTIVE, RESERVED, RESERVED, DORMANT]
    x = torch.randn(3, 32)
    lam = torch.cat([m.lora_E[:2].view(-1), torch.full((2,), 1e-5)])
    expect = (x @ (m.lora_A[:4] * lam[:, None]).T) @ m.lora_B[:, :4].T * (6 / 2)  # s = α / r, r = 2 active
    torch.testing.assert_close(m.delta(x, None), expect, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x @ m.delta_weight().T, expect, rtol=1e-5, atol=1e-6)
    a, b, s = m.to_lora()
    assert a.shape == (4, 32) and s == 3.0
    torch.testing.assert_close(s * b @ a, m.delta_weight(), rtol=1e-5, atol=1e-7)
    # the reserved λ's get no gradient (frozen), their P and Q do (advance learning)
    m.delta(x, None).pow(2).sum().backward()
    assert m.lora_E.grad[2:].abs().sum() == 0 and m.lora_E.grad[:2].abs().sum() > 0
    assert m.lora_A.grad[2:4].abs().sum() > 0 and m.lora_A.grad[4].abs().sum() == 0  # dormant: untouched


def test_importance_is_the_authors_score_on_delta_w():
    """I = Σ|ΔW ⊙ ∂L/∂ΔW| / √(d_out d_in), checked against autograd on an explicit dense ΔW."""
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=2, target_r=3, max_r=4, target=["q_proj", "v_proj"]))
    perturb(model, scale=0.1)
    IncreLoraAllocator(model, total_step=10)  # reserves + tracking on
    path = "model.layers.1.self_attn.v_proj"
    twin = copy.deepcopy(model)
    tm = increlora_modules(twin)[path]
    w = tm.delta_weight().detach().clone().requires_grad_(True)  # (d_out, d_in) leaf
    tm.delta = lambda x, base_out: F.linear(x, w)
    tm._track = False
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    expect = (w * w.grad).abs().sum() / math.sqrt(w.numel())
    torch.testing.assert_close(increlora_modules(model)[path]._ipt, expect.detach(), rtol=1e-4, atol=1e-10)


def test_pick_modules_respects_room_budget_and_order():
    scores = {"a": 3.0, "b": 5.0, "c": 5.0, "d": 1.0, "e": 9.0}
    room = {"a": 2, "b": 2, "c": 1, "d": 2, "e": 0}  # e is full
    assert pick_modules(scores, room, n=3, add_r=2, left=10) == {"b": 2, "c": 1, "a": 2}  # tie b/c: path order
    assert pick_modules(scores, room, n=3, add_r=2, left=3) == {"b": 2, "c": 1}  # never past the budget
    assert pick_modules(scores, room, n=1, add_r=2, left=10) == {"b": 2}
    assert list(growth_steps(tinit=3, tfinal=2, total_step=20, interval=4)) == [4, 8, 12, 16]


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
    return opt


def test_budget_never_exceeded_ranks_grow_from_reserves_and_differ():
    total, budget = 24, 26
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=1, target_r=2, max_r=4, budget=budget, top_h=3, interval=2,
                                          tinit=1, tfinal=4))
    alloc = IncreLoraAllocator(model, total_step=total)
    mods = increlora_modules(model)
    assert all(m.live == 2 for m in mods.values())  # one reserved triplet each from the start (add_r = 1)
    seen = []

    def check(step, grown):
        ranks = rank_pattern(model)
        assert sum(ranks.values()) <= budget, f"budget exceeded at step {step}"
        if grown:
            assert step in growth_steps(1, 4, total, 2) and len(grown) <= 3  # top_h modules per allocation
            for p in grown:  # activated slots start at the reserved λ, a new reserve follows
                m = mods[p]
                assert m.lora_E[m.rank - 1].item() == pytest.approx(1e-5)  # the reserved λ carries over
                assert m.live == (m.rank if alloc.finalized else min(m.rank + 1, 4))  # budget hit: released
        seen.append(dict(ranks))

    _train(model, alloc, total, check=check)
    assert seen[0] == {p: 1 for p in mods}
    assert seen[-1] != seen[0]  # allocation changed during training
    assert len(set(seen[-1].values())) > 1  # ... and differs across modules
    assert sum(seen[-1].values()) == budget and alloc.finalized  # 12 ranks to add, 3 per allocation: done
    assert all(m.live == m.rank and not m._track for m in mods.values())  # reserves released, tracking off


def test_growth_stops_at_t_minus_tfinal():
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=1, target_r=4, max_r=4, add_r=1, top_h=2, interval=1, tfinal=7,
                                          target=["q_proj", "v_proj"]))
    alloc = IncreLoraAllocator(model, total_step=12)
    events = []
    _train(model, alloc, 12, check=lambda s, g: events.append((s, sum(g.values()))) if g else None)
    assert events == [(t, 2) for t in range(1, 5)]  # top_h × add_r at every step in (0, 12 − 7), then frozen
    assert sum(rank_pattern(model).values()) == 4 + 2 * 4 < 16 and alloc.finalized  # stopped by tfinal
    assert all(m.live == m.rank for m in increlora_modules(model).values())


def test_growing_keeps_the_learned_update_rescaled_by_r_over_r_prime():
    """Activation only rescales ΔW by r / r' (s = α / current rank); with advance_lambda = 0 exactly."""
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=2, target_r=3, max_r=4, advance_lambda=0.0, target="q_proj"))
    alloc = IncreLoraAllocator(model, total_step=10)
    path, m = next(iter(increlora_modules(model).items()))
    perturb(model, scale=0.05)
    before = m.delta_weight().detach().clone()
    alloc.grow(path, 1, 0, None)
    assert m.slot_state.tolist() == [ACTIVE, ACTIVE, ACTIVE, RESERVED] and m.lora_E[2].item() == 0.0
    torch.testing.assert_close(m.delta_weight(), before * 2 / 3, rtol=1e-6, atol=1e-8)


def test_fresh_rows_step_like_a_fresh_adam():
    """Rows that join at step t0 follow exactly the trajectory of a new AdamW parameter
    (rows 2, 3 join after step 4, row 1 after step 7: one tensor, two ages)."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 3, generator=g)
    grads = [torch.randn(4, 3, generator=g) for _ in range(14)]
    births = {4: [2, 3], 7: [1]}
    for t in range(8):  # not in use yet
        grads[t][1] = 0
        if t <= 4:
            grads[t][2:] = 0
    lr, wd = 0.1, 0.01

    def run(restart: bool):
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([p], lr=lr, weight_decay=wd)
        rows = AdamRowRestart()
        for t, gr in enumerate(grads):
            p.grad = gr.clone()
            rows.snapshot()
            opt.step()
            rows.apply(opt, t)
            if restart and t in births:
                rows.add(p, 0, births[t], t, opt)
        return p.detach(), len(rows)

    def fresh(rows, born):  # a new AdamW parameter from the rows' value at birth (only weight decay so far)
        ref = torch.nn.Parameter(p0[rows] * (1 - lr * wd) ** (born + 1))
        ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=wd)
        for gr in grads[born + 1:]:
            ref.grad = gr[rows].clone()
            ref_opt.step()
        return ref.detach()

    (fixed, tracked), (plain, _) = run(True), run(False)
    assert tracked == 3
    for born, rows in births.items():
        torch.testing.assert_close(fixed[rows], fresh(rows, born), rtol=1e-5, atol=1e-6)
        assert (plain[rows] - fresh(rows, born)).abs().max() > 1e-2  # the shared bias correction differs
    torch.testing.assert_close(fixed[0], plain[0], rtol=0, atol=0)  # rows in use from the start: untouched


def test_adam_is_found_inside_a_wrapper():
    class Wrapped:  # Trainer hands callbacks accelerate's AcceleratedOptimizer(.optimizer = the real one)
        def __init__(self, optimizer):
            self.optimizer = optimizer

    inner = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert _adam_of(Wrapped(inner)) is inner
    assert _adam_of(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)) is None


def test_orth_regularizer_and_its_gradient_equal_the_loss_term():
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=2, target_r=2, max_r=4, target=["q_proj", "v_proj"]))
    for m in increlora_modules(model).values():
        m.reserve_(1)  # live = 3: the regulariser covers active + reserved
    mods = list(increlora_modules(model).values())
    expect = torch.stack([torch.linalg.norm(c - torch.eye(3)) for m in mods
                          for c in (m.lora_A[:3] @ m.lora_A[:3].T, m.lora_B[:, :3].T @ m.lora_B[:, :3])]).mean()
    torch.testing.assert_close(orth_regularizer(model), expect)
    ids = torch.randint(0, 128, (2, 6))
    twin = copy.deepcopy(model)
    (model(input_ids=ids, labels=ids).loss + 0.1 * orth_regularizer(model)).backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    add_orth_grad_(twin, 0.1)
    for m, t in zip(increlora_modules(model).values(), increlora_modules(twin).values()):
        for pn in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(t, pn).grad, getattr(m, pn).grad, rtol=1e-5, atol=1e-8)


def test_save_load_mid_training_and_after_pruning_reproduce_outputs(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=1, target_r=3, max_r=4, top_h=4, interval=2))
    alloc = IncreLoraAllocator(model, total_step=10)
    _train(model, alloc, 6)
    model.eval()
    mid = logits_of(model, tokens)  # reserves live, slots mixed
    lorakit.save(model, tmp_path / "mid")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "mid")
    torch.testing.assert_close(logits_of(fresh, tokens), mid, rtol=0, atol=1e-6)
    assert rank_pattern(fresh) == rank_pattern(model)

    ranks = rank_pattern(model)
    final = alloc.finish()  # reserves off, dormant slots pruned
    assert final == ranks and all(m.capacity == ranks[p] for p, m in increlora_modules(model).items())
    out = logits_of(model, tokens)
    torch.testing.assert_close(out, mid, rtol=0, atol=1e-4)  # only the 1e-5-sized reserves went
    assert state(model).configs["default"].ranks == {p: k for p, k in ranks.items() if k != 4}
    lorakit.save(model, tmp_path / "final")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "final")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=1e-6)
    lorakit.merge(fresh)
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=1e-5, atol=1e-5)
    assert prune(model) == ranks  # idempotent


def test_train_grows_under_budget_and_saves_the_pruned_adapter(tiny_model_dir, text_file, tmp_path, tokens):
    from transformers import AutoModelForCausalLM, TrainerCallback

    from lorakit.train import TrainConfig, train

    seen, adams = [], []

    class Watch(TrainerCallback):
        def on_optimizer_step(self, args, state_, control, optimizer=None, **kwargs):
            adams.append(_adam_of(optimizer))  # what the growth callback corrects fresh rows with

        def on_step_end(self, args, state_, control, model=None, **kwargs):
            seen.append(rank_pattern(model))

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="increlora", block_size=16, batch_size=2, max_steps=12, lr=1e-2, warmup_steps=0,
                      save_steps=12, logging_steps=1, progress=False)
    budget = 20
    res = train(cfg, adapter={"init_r": 1, "target_r": 2, "max_r": 4, "budget": budget, "top_h": 2, "interval": 2},
                callbacks=[Watch()])
    assert len(seen) == 12 and all(sum(r.values()) <= budget for r in seen)
    assert all(isinstance(a, torch.optim.Adam) for a in adams)
    assert seen[0] != seen[-1] and len(set(seen[-1].values())) > 1
    mods = increlora_modules(res.model)
    assert all(m.capacity == m.rank == m.live for m in mods.values())  # pruned at the end
    saved = state(res.model).configs["default"]
    assert saved.ranks == {p: k for p, k in rank_pattern(res.model).items() if k != 4}
    ids = tokens
    res.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lorakit.load(base, res.adapter_dir)
    torch.testing.assert_close(logits_of(base, ids), logits_of(res.model, ids), rtol=0, atol=1e-5)


def test_auto_interval_spreads_the_rounds_over_the_growth_window():
    model = tiny_llama()
    lorakit.inject(model, IncreLoraConfig(init_r=1, target_r=2, top_h=4, tinit=2, tfinal=5))
    alloc = IncreLoraAllocator(model, total_step=30)
    rounds = math.ceil(N_LLAMA / 4)  # 14 ranks to add, top_h × add_r = 4 per round
    assert alloc.interval == (30 - 5 - 2 - 1) // rounds == 5
    steps = growth_steps(2, 5, 30, alloc.interval)
    assert list(steps) == [5, 10, 15, 20] and len(steps) >= rounds
