"""GaLore: Adam states in a rank-r gradient subspace, normal and layer-wise (fused backward) modes.

METHODS.md Check: optimizer state ≈ 2rn vs 2mn floats
(test_state_size_matches_formula, test_model_state_is_smaller_than_adamw).
"""

import copy

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.optim import GaLoreAdamW, galore, galore_param_groups, galore_per_layer, state_bytes
from tests.conftest import lm_batches, lm_loss, lsq_problem, run_steps, tiny_llama

F32 = 4




# -- state size ---------------------------------------------------------------------------------
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_state_size_matches_formula(shape, proj_type):
    m, n = shape
    r = 4
    W0, loss = lsq_problem(m, n)
    w = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([w], rank=r, proj_type=proj_type)
    run_steps(opt, [w], loss, 1)
    st = opt.state[w]
    left = (m <= n) == (proj_type == "std")  # std projects the smaller side: moments r x max(m, n)
    assert st["exp_avg"].shape == st["exp_avg_sq"].shape == ((r, n) if left else (m, r))
    assert st["projector"].shape == ((m, r) if left else (r, n))
    big, small = (max(m, n), min(m, n)) if proj_type == "std" else (min(m, n), max(m, n))
    assert state_bytes(opt) == F32 * (2 * r * big + r * small)


def test_model_state_is_smaller_than_adamw():
    r = 4
    model = tiny_llama()
    groups = galore_param_groups(model)
    opt = GaLoreAdamW(groups, lr=1e-3, rank=r)
    run_steps(opt, [model, lm_batches(1)[0]], lm_loss, 1)
    expected = sum(F32 * (2 * r * max(p.shape) + r * min(p.shape)) for p in groups[0]["params"])
    expected += sum(F32 * 2 * p.numel() for p in groups[1]["params"])
    assert state_bytes(opt) == expected

    ref = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_steps(ref, [model, lm_batches(1)[0]], lm_loss, 1)
    n_params = len(list(model.parameters()))  # torch keeps a float32 `step` tensor per parameter
    assert state_bytes(ref) == F32 * (2 * sum(p.numel() for p in model.parameters()) + n_params)
    assert state_bytes(opt) < state_bytes(ref)


def test_param_groups_project_linear_weights_but_not_head_or_embeddings():
    model = tiny_llama()
    lowrank, rest = galore_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(lowrank["params"]) == 2 * 7 and all(p.dim() == 2 for p in lowrank["params"])
    rest_names = {names[id(p)] for p in rest["params"]}
    assert "lm_head.weight" in rest_names and "model.embed_tokens.weight" in rest_names
    only_mlp, _ = galore_param_groups(model, targets=["mlp"])
    assert len(only_mlp["params"]) == 2 * 3
    with pytest.raises(ConfigError, match="no trainable linear weight"):
        galore_param_groups(model, targets=["nothing_like_this"])
    with pytest.raises(ConfigError, match="list of module-name substrings"):
        galore_param_groups(model, targets="mlp")


# -- update rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_identity_basis_at_full_rank_is_torch_adamw(shape, monkeypatch):
    """r = min(m, n), α = 1, P = I: GaLore reduces to AdamW (weight decay and a 1-D bias included).

    With an SVD basis it does not: Adam's elementwise normalisation is not rotation invariant,
    so Adam on PᵀG differs from Adam on G even at full rank (see the next test for what holds)."""
    m, n = shape
    def identity_basis(grad, rank, side):  # U[:, :r] = I (m×r) or Vᵀ[:r] = I (r×n)
        return torch.eye(grad.shape[0])[:, :rank] if side == "left" else torch.eye(grad.shape[1])[:rank]

    monkeypatch.setattr(galore, "orthogonal_basis", identity_basis)
    W0, loss = lsq_problem(m, n)
    b0 = torch.randn(m, generator=torch.Generator().manual_seed(9))
    a, ab = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
    w, wb = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
    kw = {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    opt = GaLoreAdamW([a, ab], rank=min(m, n), update_proj_gap=1, scale=1.0, **kw)
    ref = torch.optim.AdamW([w, wb], foreach=False, **kw)
    f = lambda W, b: loss(W) + (b ** 2).sum() * W.sum()
    run_steps(opt, [a, ab], f, 5)
    run_steps(ref, [w, wb], f, 5)
    assert torch.allclose(a, w, atol=1e-6) and torch.allclose(ab, wb, atol=1e-6)
    assert not torch.equal(a, W0)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_full_rank_svd_basis_is_adamw_in_rotated_coordinates(shape):
    """Fixed orthonormal P (m×m, from the first SVD): GaLore on W == AdamW on Z = PᵀW (W = P Z)."""
    m, n = shape
    W0, loss = lsq_problem(m, n, seed=3)
    w = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([w], lr=2e-2, rank=min(m, n), update_proj_gap=10_000, scale=1.0, weight_decay=0.05)
    run_steps(opt, [w], loss, 6)
    P = opt.state[w]["projector"]
    left = m <= n
    assert torch.allclose(P @ P.T if left else P.T @ P, torch.eye(min(m, n)), atol=1e-5)
    z = torch.nn.Parameter((P.T @ W0) if left else (W0 @ P.T))
    ref = torch.optim.AdamW([z], lr=2e-2, weight_decay=0.05, foreach=False)
    run_steps(ref, [z], lambda Z: loss(P @ Z if left else Z @ P), 6)
    assert torch.allclose(w, P @ z if left else z @ P, atol=1e-5)


def test_update_stays_in_the_rank_r_subspace_between_refreshes():
    m, n, r = 10, 16, 2
    W0, loss = lsq_problem(m, n, seed=5)
    w = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([w], lr=1e-2, rank=r, update_proj_gap=100, scale=0.25)
    run_steps(opt, [w], loss, 5)
    P = opt.state[w]["projector"]  # (m×r), left side since m <= n
    dW = (w - W0).detach()
    assert P.shape == (m, r)
    assert torch.allclose(P @ (P.T @ dW), dW, atol=1e-6)
    sv = torch.linalg.svdvals(dW)  # rank r up to the float32 rounding of W0 + ΔW
    assert sv[r - 1] > 1e-3 * sv[0] and sv[r] < 1e-4 * sv[0]


def test_projector_refreshes_every_T_steps():
    T = 3
    w = torch.nn.Parameter(torch.randn(8, 12))
    opt = GaLoreAdamW([w], lr=1e-3, rank=3, update_proj_gap=T)
    g = torch.Generator().manual_seed(0)
    projs = []
    for _ in range(7):
        w.grad = torch.randn(8, 12, generator=g)  # a new gradient every step
        opt.step()
        projs.append(opt.state[w]["projector"].clone())
    changed = [i for i in range(1, 7) if not torch.equal(projs[i], projs[i - 1])]
    assert changed == [3, 6]  # SVD at steps 0, T, 2T (state["step"] before the increment)


def test_scale_multiplies_the_projected_update():
    W0, loss = lsq_problem(8, 12)
    deltas = []
    for scale in (1.0, 0.25):
        w = torch.nn.Parameter(W0.clone())
        run_steps(GaLoreAdamW([w], lr=1e-2, rank=4, scale=scale), [w], loss, 1)
        deltas.append((w - W0).detach())
    assert torch.allclose(deltas[1], 0.25 * deltas[0], atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    W0, loss = lsq_problem(8, 12)
    a = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([a], lr=1e-2, rank=3, update_proj_gap=4)
    run_steps(opt, [a], loss, 2)
    b = torch.nn.Parameter(a.detach().clone())
    opt_b = GaLoreAdamW([b], lr=1e-2, rank=3, update_proj_gap=4)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save/load would
    run_steps(opt, [a], loss, 4)
    run_steps(opt_b, [b], loss, 4)
    assert torch.equal(a, b)


def test_config_errors():
    w = [torch.nn.Parameter(torch.randn(3, 3))]
    for kw, msg in [({"rank": 0}, "rank must be a positive integer"),
                    ({"update_proj_gap": 0}, "update_proj_gap must be a positive integer"),
                    ({"scale": 0.0}, "scale must be a positive number"),
                    ({"proj_type": "full"}, "proj_type must be one of"),
                    ({"betas": (0.9, 1.0)}, "betas must be in"),
                    ({"lr": -1.0}, "lr must be a non-negative")]:
        with pytest.raises(ConfigError, match=msg):
            GaLoreAdamW(w, **kw)
    opt = GaLoreAdamW(w)
    with pytest.raises(ConfigError, match="rank must be"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "rank": -3})


# -- layer-wise mode ------------------------------------------------------------------------------
def test_per_layer_equals_normal_mode_and_holds_one_gradient_at_a_time():
    kw = {"rank": 4, "update_proj_gap": 2, "scale": 0.25, "weight_decay": 0.01}
    batches = lm_batches(3)

    normal = tiny_llama()
    opt = GaLoreAdamW(galore_param_groups(normal), lr=1e-2, **kw)
    for ids in batches:
        opt.zero_grad()
        lm_loss(normal, ids).backward()
        opt.step()

    layered = tiny_llama()
    params = [p for p in layered.parameters() if p.requires_grad]
    alive = []

    def count_live(_):  # registered first, so it runs before the optimizer hook of the same tensor
        alive.append(sum(q.grad is not None for q in params))

    checks = [p.register_post_accumulate_grad_hook(count_live) for p in params]
    handle = galore_per_layer(layered, lr=1e-2, **kw)
    for ids in batches:
        lm_loss(layered, ids).backward()  # the steps happen inside backward
        assert all(p.grad is None for p in params)
    assert len(alive) == 3 * len(params) and max(alive) == 1

    for (name, a), b in zip(normal.named_parameters(), layered.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert state_bytes(handle) == state_bytes(opt)

    # the counter has teeth: without the per-layer hooks every gradient is alive at the end
    handle.remove()
    alive.clear()
    lm_loss(layered, batches[0]).backward()
    assert max(alive) == len(params)
    for h in checks:
        h.remove()


def test_per_layer_runs_under_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = galore_per_layer(model, lr=1e-2, rank=4, update_proj_gap=2)
    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in lm_batches(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, lr_scheduler_type="linear", max_grad_norm=0.0, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=handle.trainer_optimizers(3))
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(opt.state[p]["step"] == 3 for p, opt in handle.optimizers.items())
    lrs = {g["lr"] for g in handle.param_groups}
    assert lrs == {0.0}  # the per-parameter linear schedules ran to the end (1e-2 -> 0 over 3 steps)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx([1e-2, 2e-2 / 3, 1e-2 / 3])
