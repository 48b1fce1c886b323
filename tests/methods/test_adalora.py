"""AdaLoRA: SVD triplets, importance-driven budget schedule, orthogonality regulariser.

METHODS.md: importance from the EMA (β1=β2=0.85) of |θ·∇θ| with the uncertainty term, cubic
budget schedule from r_init to target, regulariser ‖PᵀP−I‖+‖QQᵀ−I‖ — checked against PEFT's
AdaLoRA step by step (test_matches_peft_allocation_step_by_step).
"""

import copy

import pytest
import torch

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.adalora import (
    AdaLoraConfig,
    RankAllocator,
    adalora_modules,
    add_orth_grad_,
    orth_regularizer,
    prune,
    rank_pattern,
)
from tests.conftest import logits_of, perturb, tiny_llama

LLAMA_IO_PER_LAYER = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + 3 * (32 + 64)  # Σ d_in + d_out
LLAMA_TARGETS = 2 * 7


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"init_r": 4, "target_r": 6}, "target_r must be <= init_r=4"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, "tinit \\+ tfinal must be < total_step"),
        ({"tinit": 3, "tfinal": 8, "total_step": 10}, "tinit \\+ tfinal must be < total_step"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be a finite number >= 0"),
        ({"orth_reg_weight": float("nan")}, "orth_reg_weight must be a finite number >= 0"),
        ({"init_r": 0}, "init_r must be a positive integer"),
        ({"target_r": 0}, "target_r must be a positive integer"),
        ({"total_step": 0}, "total_step must be a positive integer"),
        ({"deltaT": 0}, "deltaT must be a positive integer"),
        ({"tinit": -1}, "tinit must be an integer >= 0"),
        ({"beta1": 1.0}, "beta1 must be in \\(0, 1\\)"),
        ({"beta2": 0}, "beta2 must be in \\(0, 1\\)"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"init_r": 4, "target_r": 2, "ranks": {"q_proj": 5}}, r"ranks\['q_proj'\] must be an integer between 0 and init_r=4"),
        ({"ranks": [1]}, "ranks must be a mapping"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        AdaLoraConfig(**kw)


def test_allocator_needs_a_total_step():
    model = tiny_llama()
    lorakit.inject(model, AdaLoraConfig(init_r=4, target_r=2, tinit=2))
    with pytest.raises(ConfigError, match="needs total_step"):
        RankAllocator(model)
    with pytest.raises(ConfigError, match="tinit \\+ tfinal must be < total_step"):
        RankAllocator(model, total_step=2)  # e.g. a Trainer's max_steps too small for the schedule
    with pytest.raises(AdapterError, match="no AdaLoRA adapter named 'x'"):
        RankAllocator(model, name="x", total_step=5)


def test_parameter_count_and_init():
    model = tiny_llama()
    lorakit.inject(model, AdaLoraConfig(init_r=4, target_r=2))
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == 4 * 2 * LLAMA_IO_PER_LAYER + 4 * LLAMA_TARGETS  # r(d_in + d_out) + r, per module
    m = next(iter(adalora_modules(model).values()))
    assert not m.lora_E.any() and m.lora_E.shape == (4, 1)
    assert 0.01 < m.lora_A.std().item() < 0.03 and 0.01 < m.lora_B.std().item() < 0.03  # N(0, 0.02)


def test_update_equation():
    model = tiny_llama()
    lorakit.inject(model, AdaLoraConfig(init_r=4, target_r=2, alpha=6, target="q_proj"))
    perturb(model)
    m = next(iter(adalora_modules(model).values()))
    x = torch.randn(3, 32)
    expect = (x @ (m.lora_A * m.lora_E).T) @ m.lora_B.T * (6 / 4)  # s P Λ Q x
    torch.testing.assert_close(m.delta(x, None), expect, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x @ m.delta_weight().T, expect, rtol=1e-5, atol=1e-6)
    a, b, s = m.to_lora()
    torch.testing.assert_close(s * b @ a, m.delta_weight(), rtol=1e-5, atol=1e-7)


def test_orth_regularizer_and_its_gradient_equal_the_loss_term():
    model = tiny_llama()
    lorakit.inject(model, AdaLoraConfig(init_r=4, target_r=2, target=["q_proj", "v_proj"]))
    mods = list(adalora_modules(model).values())
    expect = torch.stack([torch.linalg.norm(c - torch.eye(4)) for m in mods
                          for c in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B)]).mean()
    torch.testing.assert_close(orth_regularizer(model), expect)
    # the callback's gradient injection == backprop of 0.5·R added to the loss
    ids = torch.randint(0, 128, (2, 6))
    twin = copy.deepcopy(model)
    (model(input_ids=ids, labels=ids).loss + 0.5 * orth_regularizer(model)).backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    add_orth_grad_(twin, 0.5)
    for m, t in zip(adalora_modules(model).values(), adalora_modules(twin).values()):
        for pn in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(t, pn).grad, getattr(m, pn).grad, rtol=1e-5, atol=1e-8)


def _peft_and_ours(total_step=8, tinit=1, tfinal=2, deltaT=1, init_r=4, target_r=2):
    from peft import AdaLoraConfig as PeftAdaLoraConfig
    from peft import get_peft_model

    ref = get_peft_model(tiny_llama(), PeftAdaLoraConfig(
        init_r=init_r, target_r=target_r, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=total_step, orth_reg_weight=0.5))
    ours = tiny_llama()
    cfg = AdaLoraConfig(init_r=init_r, target_r=target_r, alpha=8, target=["q_proj", "v_proj"], tinit=tinit,
                        tfinal=tfinal, deltaT=deltaT, total_step=total_step, orth_reg_weight=0.5)
    lorakit.inject(ours, cfg)
    mods = adalora_modules(ours)
    peft_layers = {n.removeprefix("base_model.model."): mod for n, mod in ref.named_modules()
                   if hasattr(mod, "lora_E") and "default" in getattr(mod, "lora_E", {})}
    assert sorted(peft_layers) == sorted(mods)
    with torch.no_grad():
        for path, m in mods.items():
            for pn in ("lora_A", "lora_E", "lora_B"):
                getattr(m, pn).copy_(getattr(peft_layers[path], pn)["default"])
    return ref, ours, peft_layers, mods


def test_matches_peft_allocation_step_by_step():
    """Same weights, data and AdamW; PEFT's update_and_allocate vs our RankAllocator."""
    total = 8
    ref, ours, peft_layers, mods = _peft_and_ours(total_step=total)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 8), generator=g) for _ in range(total)]
    opt_r = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=2e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    alloc = RankAllocator(ours)
    ref.train()
    ours.train()
    patterns = 0
    for step, ids in enumerate(batches):
        ref(input_ids=ids, labels=ids).loss.backward()  # PEFT adds 0.5·R to the loss itself
        opt_r.step()
        ref.base_model.update_and_allocate(step)
        peft_pattern = ref.peft_config["default"].rank_pattern
        opt_r.zero_grad()

        ours(input_ids=ids, labels=ids).loss.backward()
        add_orth_grad_(ours, 0.5)
        opt_o.step()
        _, pattern = alloc.update_and_allocate(step)
        opt_o.zero_grad()

        if pattern is not None:
            patterns += 1
            expect = {k.replace(".lora_E.default", ""): v for k, v in peft_pattern.items()}
            assert pattern == expect, f"step {step}"
        for path, m in mods.items():
            torch.testing.assert_close(m.lora_E, peft_layers[path].lora_E["default"], rtol=1e-4, atol=1e-6)
    assert patterns == total - 2  # tinit=1: steps 0..1 do not mask; 2..5 mask, 6 is final, 7 re-masks
    assert alloc.finalized
    assert sum(sum(v) for v in alloc.rank_pattern.values()) <= 2 * len(mods)
    for path, m in mods.items():  # the final λ's agree, zeros included
        torch.testing.assert_close(m.lora_E, peft_layers[path].lora_E["default"], rtol=1e-4, atol=1e-6)
        assert torch.equal(m.lora_E == 0, peft_layers[path].lora_E["default"] == 0)


def _train(model, alloc, steps, lr=2e-2, seed=0, check=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        add_orth_grad_(model, 0.5)
        opt.step()
        budget, pattern = alloc.update_and_allocate(step)
        opt.zero_grad()
        if check is not None:
            check(step, budget, pattern)


def test_budget_is_never_exceeded_and_ranks_differ_across_modules():
    total, init_r, target_r = 12, 4, 2
    model = tiny_llama()
    lorakit.inject(model, AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=2, tfinal=3, total_step=total))
    alloc = RankAllocator(model)
    n = len(alloc.mods)
    budgets = []

    def check(step, budget, pattern):
        budgets.append(budget)
        assert budget == alloc.budget_schedule(step)[0]
        active = sum(rank_pattern(model).values())
        if step > 2:  # after warm-up every step masks (deltaT=1): Σ active ≤ b(t)
            assert sum(sum(v) for v in pattern.values()) <= budget and active <= budget
        if step == 2:  # warm-up ends with the full budget
            assert budget == init_r * n

    _train(model, alloc, total, check=check)
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == target_r * n
    # cubic schedule: b(t) = ⌊(b0 − bT)(1 − (t − tinit)/(T − tfinal − tinit))³ + bT⌋
    assert alloc.budget_schedule(4)[0] == int((init_r - target_r) * n * (1 - 2 / 7) ** 3 + target_r * n)
    ranks = rank_pattern(model)
    assert sum(ranks.values()) <= target_r * n
    assert len(set(ranks.values())) > 1  # the budget went to some modules more than others


def test_deltaT_masks_only_every_deltaT_steps():
    model = tiny_llama()
    lorakit.inject(model, AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=2, deltaT=3, total_step=12,
                                        target="q_proj"))
    alloc = RankAllocator(model)
    masked = []
    _train(model, alloc, 12, check=lambda s, b, p: masked.append(s) if p is not None and s < 10 else None)
    assert masked == [3, 6, 9]


def test_prune_keeps_outputs_and_round_trips(tokens, tmp_path):
    model = tiny_llama()
    lorakit.inject(model, AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8))
    alloc = RankAllocator(model)
    _train(model, alloc, 8)
    model.eval()
    before = logits_of(model, tokens)
    ranks = rank_pattern(model)
    new = prune(model)
    assert new == ranks and all(m.rank == ranks[p] for p, m in adalora_modules(model).items())
    torch.testing.assert_close(logits_of(model, tokens), before, rtol=0, atol=1e-6)
    cfg = lorakit.core.inject.state(model).configs["default"]
    assert cfg.ranks == {p: k for p, k in ranks.items() if k != 4}
    lorakit.save(model, tmp_path / "ada")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "ada")
    torch.testing.assert_close(logits_of(fresh, tokens), before, rtol=0, atol=1e-6)
    # the merged pruned adapter equals the unmerged one
    lorakit.merge(fresh)
    torch.testing.assert_close(logits_of(fresh, tokens), before, rtol=1e-5, atol=1e-5)


def test_train_runs_the_allocator_and_prunes_at_the_end(tiny_model_dir, text_file, tmp_path):
    from lorakit.train import TrainConfig, train

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="adalora", block_size=16, batch_size=2, max_steps=6, lr=1e-2, warmup_steps=0,
                      save_steps=6, logging_steps=1, progress=False)
    res = train(cfg, adapter={"init_r": 4, "target_r": 1, "tinit": 1, "tfinal": 2, "target": ["q_proj", "v_proj"]})
    mods = adalora_modules(res.model)
    assert sum(m.rank for m in mods.values()) <= 1 * len(mods)  # pruned to the final budget
    saved = lorakit.core.inject.state(res.model).configs["default"]
    assert saved.ranks and all(k < 4 for k in saved.ranks.values())
