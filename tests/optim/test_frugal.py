"""FRUGAL: Adam on a state-full subspace (blocks / svd / random / columns), signSGD on the rest.

METHODS.md: "split the gradient into a state-full subspace (Adam on a projection or a block of
ρ·params, re-chosen every T steps) and a state-free rest (signSGD)" —
test_density_one_blocks_is_torch_adamw, test_density_zero_is_signsgd,
test_state_free_part_is_sign_of_the_residual, test_subspace_is_reselected_every_T_steps,
test_state_bytes_match_formula, test_loss_decreases_on_tiny_llama.
"""

import copy

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.optim.frugal import FrugalAdamW, frugal_param_groups, select_blocks, state_bytes, subspace_size
from lorakit.optim.galore import GaLoreAdamW
from tests.conftest import lm_batches, lm_loss, lsq_problem, run_steps, tiny_llama

F32, I64 = 4, 8
PROJECTIONS = ["blocks", "svd", "random", "columns"]




def active_blocks(opt, group=0):
    return [i for i, p in enumerate(opt.param_groups[group]["params"]) if opt.state[p].get("active", False)]


# -- limits: rho = 1 is AdamW, rho = 0 is signSGD ------------------------------------------------
def test_density_one_blocks_is_torch_adamw():
    """ρ = 1, blocks: every projectable tensor is state-full, the rest is AdamW anyway -> torch AdamW
    (within one period of T steps: like the reference, a re-selection restarts every block's Adam)."""
    model, ref_model = tiny_llama(), tiny_llama()
    kw = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    opt = FrugalAdamW(frugal_param_groups(model), density=1.0, **kw)
    ref = torch.optim.AdamW(ref_model.parameters(), foreach=False, **kw)
    for ids in lm_batches(5):
        run_steps(opt, [model, ids], lm_loss, 1)
        run_steps(ref, [ref_model, ids], lm_loss, 1)
        assert len(active_blocks(opt)) == len(opt.param_groups[0]["params"])
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, tiny_llama().model.layers[0].mlp.up_proj.weight)


def test_density_one_svd_is_galore_at_full_rank():
    """ρ = 1, svd: r = min(m, n) and the residual vanishes (so no sign step on rounding noise):
    GaLore at full rank with scale 1 (no refresh inside the run, so resetting plays no part)."""
    W0, loss = lsq_problem(6, 10)
    a, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    run_steps(FrugalAdamW([a], lr=2e-2, density=1.0, projection="svd", weight_decay=0.05), [a], loss, 5)
    run_steps(GaLoreAdamW([b], lr=2e-2, rank=6, scale=1.0, weight_decay=0.05), [b], loss, 5)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, W0)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_density_zero_is_signsgd(projection):
    """ρ = 0: no state-full coordinates; W ← W(1 − ηλ) − η s s' sign(G), and no Adam state."""
    W0, loss = lsq_problem(8, 12)
    w = torch.nn.Parameter(W0.clone())
    lr, scale, wd = 1e-2, 0.5, 0.1
    opt = FrugalAdamW([w], lr=lr, density=0.0, projection=projection, state_free_lr_scale=scale, weight_decay=wd,
                      update_gap=2)
    ref = W0.clone().requires_grad_(True)
    for _ in range(4):
        run_steps(opt, [w], loss, 1)
        g, = torch.autograd.grad(loss(ref), ref)
        with torch.no_grad():
            ref = (ref * (1 - lr * wd) - lr * scale * g.sign()).requires_grad_(True)
    assert torch.allclose(w, ref, atol=1e-6)
    assert not torch.allclose(w, W0)
    moments = [t for t in opt.state[w].values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert all(t.numel() == 0 for t in moments)  # svd/random keep an empty (m×0) projector; no moments beyond that


@pytest.mark.parametrize("projection", ["svd", "random"])
def test_state_free_part_is_sign_of_the_residual(projection):
    """One step: (s' = 1) − (s' = 0) = −η sign(G − back(proj(G))), and s' = 0 with svd is GaLore."""
    W0, loss = lsq_problem(10, 16, seed=2)
    lr = 1e-2
    ws = []
    for free in (1.0, 0.0):
        w = torch.nn.Parameter(W0.clone())
        opt = FrugalAdamW([w], lr=lr, density=0.3, projection=projection, state_free_lr_scale=free)
        run_steps(opt, [w], loss, 1)
        ws.append(w.detach())
    P = opt.state[w]["projector"]  # m = 10 <= n = 16: left side, P (m×r), r = round(0.3·10) = 3
    assert P.shape == (10, 3) and torch.allclose(P.T @ P, torch.eye(3), atol=1e-5)
    x = W0.clone().requires_grad_(True)
    G, = torch.autograd.grad(loss(x), x)
    assert torch.allclose(ws[0] - ws[1], -lr * (G - P @ (P.T @ G)).sign(), atol=1e-6)
    if projection == "svd":
        g = torch.nn.Parameter(W0.clone())
        run_steps(GaLoreAdamW([g], lr=lr, rank=3, scale=1.0), [g], loss, 1)
        assert torch.allclose(ws[1], g, atol=1e-6)


def test_svd_without_reset_and_state_free_step_is_galore():
    """The reference's GaLore baseline: reset_state=False, no state-free update, scale = s."""
    W0, loss = lsq_problem(12, 8, seed=4)
    a, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    run_steps(FrugalAdamW([a], lr=1e-2, density=0.5, projection="svd", update_gap=3, reset_state=False,
                    state_full_lr_scale=0.25, state_free_lr_scale=0.0), [a], loss, 8)
    run_steps(GaLoreAdamW([b], lr=1e-2, rank=4, update_proj_gap=3, scale=0.25), [b], loss, 8)
    assert torch.allclose(a, b, atol=1e-6)


def test_columns_update_splits_columns():
    """columns: Adam on G[:, K] (first Adam step = sign-like ±η), signSGD with s' on the others."""
    W0, loss = lsq_problem(6, 20, seed=5)
    w = torch.nn.Parameter(W0.clone())
    opt = FrugalAdamW([w], lr=1e-2, density=0.25, projection="columns", state_free_lr_scale=0.1, eps=0.0)
    run_steps(opt, [w], loss, 1)
    cols = opt.state[w]["columns"]
    assert cols.dtype == torch.long and cols.tolist() == sorted(cols.tolist()) and len(cols) == 5
    x = W0.clone().requires_grad_(True)
    G, = torch.autograd.grad(loss(x), x)
    expected = -1e-2 * 0.1 * G.sign()
    expected[:, cols] = -1e-2 * G[:, cols].sign()  # Adam's first step is η·g/|g|
    assert torch.allclose(w - W0, expected, atol=1e-6)
    assert opt.state[w]["exp_avg"].shape == (6, 5)


# -- frozen parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_frozen_parameters_are_bit_identical(projection):
    model = tiny_llama()
    frozen = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].mlp.down_proj.weight,
              model.model.embed_tokens.weight, model.model.norm.weight]
    for p in frozen:
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = frugal_param_groups(model)
    # hand the frozen weights to the optimizer too (as model.parameters() would)
    groups[0]["params"] += [frozen[0], frozen[1]]
    groups[1]["params"] += [frozen[2], frozen[3]]
    opt = FrugalAdamW(groups, lr=1e-2, density=0.5, update_gap=2, projection=projection, weight_decay=0.1)
    for ids in lm_batches(5):
        run_steps(opt, [model, ids], lm_loss, 1)
        for p in frozen:
            assert p.grad is None
        if projection == "blocks":  # ρ of the 12 *trainable* projectable tensors, never a frozen one
            active = [opt.param_groups[0]["params"][i] for i in active_blocks(opt)]
            assert len(active) == 6 and all(p.requires_grad for p in active)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
            assert not any(isinstance(t, torch.Tensor) for t in opt.state[p].values()), n  # no state either


# -- state size -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
@pytest.mark.parametrize("projection", ["svd", "random", "columns"])
def test_state_bytes_match_formula(shape, projection):
    m, n = shape
    W0, loss = lsq_problem(m, n)
    w = torch.nn.Parameter(W0.clone())
    opt = FrugalAdamW([w], density=0.25, projection=projection)
    run_steps(opt, [w], loss, 2)
    if projection == "columns":
        K = round(0.25 * n)
        assert subspace_size(shape, projection, 0.25) == K
        assert state_bytes(opt) == F32 * 2 * m * K + I64 * K
    else:
        r = round(0.25 * min(m, n))  # r = 3: moments r×max(m, n), projector r×min(m, n)
        assert subspace_size(shape, projection, 0.25) == r == 3
        assert opt.state[w]["exp_avg"].shape == ((m, r) if m >= n else (r, n))
        assert state_bytes(opt) == F32 * (2 * r * max(m, n) + r * min(m, n))


def test_model_state_bytes_blocks_formula_and_vs_adamw():
    model = tiny_llama()
    groups = frugal_param_groups(model)
    frugal, regular = groups[0]["params"], groups[1]["params"]
    assert len(frugal) == 14  # 7 linear weights × 2 layers; embeddings, head, norms stay AdamW
    opt = FrugalAdamW(groups, lr=1e-3)  # defaults: blocks, ρ = 0.25
    run_steps(opt, [model, lm_batches(1)[0]], lm_loss, 1)
    active = active_blocks(opt)
    assert len(active) == round(0.25 * 14) == 4
    expected = F32 * 2 * (sum(frugal[i].numel() for i in active) + sum(p.numel() for p in regular))
    assert state_bytes(opt) == expected

    ref = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_steps(ref, [model, lm_batches(1)[0]], lm_loss, 1)
    assert state_bytes(ref) == F32 * (2 * sum(p.numel() for p in model.parameters()) + len(list(model.parameters())))
    assert state_bytes(opt) < 0.75 * state_bytes(ref)


# -- re-selection ---------------------------------------------------------------------------------
def collect_blocks(seed, steps=8, T=3, order="random"):
    model = tiny_llama()
    opt = FrugalAdamW(frugal_param_groups(model), lr=1e-3, update_gap=T, seed=seed, block_order=order)
    seq, adam_steps = [], []
    for ids in lm_batches(steps):
        run_steps(opt, [model, ids], lm_loss, 1)
        seq.append(active_blocks(opt))
        adam_steps.append(opt.state[opt.param_groups[0]["params"][seq[-1][0]]]["step"])
    return seq, adam_steps


def test_subspace_is_reselected_every_T_steps():
    seq, adam_steps = collect_blocks(seed=0)
    changed = [i for i in range(1, len(seq)) if seq[i] != seq[i - 1]]
    assert changed == [3, 6]  # selections at steps 0, T, 2T
    assert adam_steps == [1, 2, 3, 1, 2, 3, 1, 2]  # Adam state of the new blocks restarts from zero
    assert collect_blocks(seed=0) == (seq, adam_steps)  # deterministic given the seed
    other, _ = collect_blocks(seed=1)
    assert other != seq


def test_projector_is_refreshed_every_T_steps():
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = FrugalAdamW([w], lr=1e-3, density=0.5, update_gap=3, projection="svd")
    g = torch.Generator().manual_seed(0)
    projs, steps = [], []
    for _ in range(7):
        w.grad = torch.randn(8, 12, generator=g)
        opt.step()
        projs.append(opt.state[w]["projector"].clone())
        steps.append(opt.state[w]["step"])
    assert [i for i in range(1, 7) if not torch.equal(projs[i], projs[i - 1])] == [3, 6]
    assert steps == [1, 2, 3, 1, 2, 3, 1]


def test_select_blocks_orders():
    assert select_blocks(10, 3, "ascending", seed=0, refresh=0) == [0, 1, 2]
    assert select_blocks(10, 3, "ascending", seed=0, refresh=3) == [0, 1, 9]
    assert select_blocks(10, 3, "descending", seed=0, refresh=0) == [7, 8, 9]
    assert select_blocks(10, 3, "descending", seed=0, refresh=1) == [4, 5, 6]
    r = select_blocks(10, 3, "random", seed=5, refresh=2)
    assert r == select_blocks(10, 3, "random", seed=5, refresh=2) and len(set(r)) == 3
    assert select_blocks(10, 0, "random", seed=5, refresh=2) == []
    draws = {tuple(select_blocks(10, 3, "random", seed=5, refresh=k)) for k in range(6)}
    assert len(draws) > 1


# -- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", ["blocks", "svd"])
def test_loss_decreases_on_tiny_llama(projection):
    torch.manual_seed(0)
    model = tiny_llama().train()
    ids = lm_batches(1)[0]
    opt = FrugalAdamW(frugal_param_groups(model), lr=3e-3, update_gap=10, projection=projection,
                      state_free_lr_scale=0.1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_runs_under_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama().train()
    opt = FrugalAdamW(frugal_param_groups(model), lr=1e-2, update_gap=2)
    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in lm_batches(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, lr_scheduler_type="linear", report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    assert opt.param_groups[0]["refresh_step"] == 3
    assert state_bytes(trainer.optimizer) == state_bytes(opt) > 0  # through accelerate's wrapper
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # the linear schedule drove both groups


@pytest.mark.parametrize("projection", ["blocks", "columns"])
def test_state_dict_round_trip_continues_identically(projection):
    W0, loss = lsq_problem(8, 12)
    a = torch.nn.Parameter(W0.clone())
    kw = {"lr": 1e-2, "density": 0.5, "update_gap": 4, "projection": projection}
    opt = FrugalAdamW([a, torch.nn.Parameter(torch.zeros(3, 3))], **kw)
    run_steps(opt, [a], loss, 2)
    b = torch.nn.Parameter(a.detach().clone())
    opt_b = FrugalAdamW([b, torch.nn.Parameter(torch.zeros(3, 3))], **kw)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    if projection == "columns":
        assert opt_b.state[b]["columns"].dtype == torch.long
    run_steps(opt, [a], loss, 5)  # crosses a refresh at step 4
    run_steps(opt_b, [b], loss, 5)
    assert torch.equal(a, b)


# -- parameter groups and configuration errors ----------------------------------------------------
def test_param_groups_and_tied_embeddings():
    model = tiny_llama()
    names = {id(p): n for n, p in model.named_parameters()}
    frugal, rest = frugal_param_groups(model)
    assert {names[id(p)] for p in rest["params"]} >= {"lm_head.weight", "model.embed_tokens.weight",
                                                       "model.norm.weight"}
    frugal, rest = frugal_param_groups(model, embeddings=True, head=True, norms=True)
    assert len(frugal["params"]) == 14 + 2 + 5 and rest["params"] == []
    with pytest.raises(ConfigError, match="needs 2-D parameters"):
        FrugalAdamW([frugal], projection="svd")

    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    with pytest.raises(ConfigError, match="ties its input embeddings"):
        frugal_param_groups(model, embeddings=True)
    frugal, _ = frugal_param_groups(model, embeddings=True, head=True)
    assert sum(p is model.lm_head.weight for p in frugal["params"]) == 1


def test_config_errors():
    w = [torch.nn.Parameter(torch.randn(3, 3))]
    for kw, msg in [({"density": -0.1}, r"density \(rho\) must be in \[0, 1\], got -0.1"),
                    ({"density": 1.5}, r"density \(rho\) must be in \[0, 1\], got 1.5"),
                    ({"update_gap": 0}, r"update_gap \(T\) must be an integer >= 1, got 0"),
                    ({"update_gap": 2.5}, r"update_gap \(T\) must be an integer"),
                    ({"lr": -1.0}, "lr must be a non-negative number, got -1.0"),
                    ({"state_free_lr_scale": -0.1}, "state_free_lr_scale must be a non-negative"),
                    ({"projection": "qr"}, "projection must be one of"),
                    ({"block_order": "mirror"}, "block_order must be one of"),
                    ({"betas": (0.9, 1.0)}, "betas must be"),
                    ({"seed": 1.5}, "seed must be an integer")]:
        with pytest.raises(ConfigError, match=msg):
            FrugalAdamW(w, **kw)
    opt = FrugalAdamW(w)
    with pytest.raises(ConfigError, match="density"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "density": 2.0})
    with pytest.raises(ConfigError, match="subspace_size is defined"):
        subspace_size((3, 4), "blocks", 0.5)
