"""LoRAPrune: LoRA-gradient importance, cubic schedule, progressive masks, physical pruning, files."""

import itertools
import types

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.errors import ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.prune import (
    LoraPrune,
    LoraPruneCallback,
    LoraPruneConfig,
    cubic_sparsity,
    load_pruned,
    lora_importance,
    lora_weight_grad,
    save_pruned,
)
from lorakit.prune.loram import n_removed
from lorakit.prune.loraprune import STATE_FILE
from tests.conftest import logits_of, randomize, tiny_llama, token_data

IDS = token_data(n=4, t=10, seed=5)


def adapted(seed=0, target="all-linear", r=4):
    model = tiny_llama(seed)
    lorakit.inject(model, LoraConfig(r=r, alpha=8, target=target))
    randomize(model, seed=seed, std=0.1)  # non-zero B so both gradient terms matter
    return model


def backward(model, ids=IDS):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()


def run_pruning(model, cfg, total=20, lr=1e-2):
    """A small LoRA training loop with LoRAPrune stepping before every optimizer step."""
    pruner = LoraPrune(model, cfg)
    pruner.install(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for t in range(total):
        backward(model, token_data(n=4, t=10, seed=100 + t))
        pruner.step(model, t, total)
        opt.step()
    model.eval()
    return pruner


# -- the importance estimate ---------------------------------------------------------------------
def test_lora_gradient_estimate_is_the_projected_weight_gradient():
    model = adapted()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    q.base.weight.requires_grad_(True)  # W_eff = W0 + sBA, so ∂L/∂W0 = G_W, the merged-weight gradient
    backward(model)
    a = q.adapters["default"]
    A, B, s, G_W = a.lora_A.weight, a.lora_B.weight, a.scale, q.base.weight.grad
    # the chain rule through h = W0 x + s·B A x
    torch.testing.assert_close(B.grad, s * G_W @ A.T, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(A.grad, s * B.T @ G_W, rtol=1e-4, atol=1e-7)
    G_hat = lora_weight_grad(A, B, A.grad, B.grad)
    # Ĝ = G_B A + B G_A = s·(G_W AᵀA + B Bᵀ G_W): G_W projected on A's row space and B's column space
    torch.testing.assert_close(G_hat, s * (G_W @ A.T @ A + B @ B.T @ G_W), rtol=1e-4, atol=1e-7)
    assert torch.nn.functional.cosine_similarity(G_hat.flatten(), G_W.flatten(), dim=0) > 0.1
    imp = lora_importance(q.base.weight, A, B, s, A.grad, B.grad)
    torch.testing.assert_close(imp, (G_hat * (q.base.weight + s * B @ A)).abs())
    second = lora_weight_grad(A, B, A.grad, B.grad, second_order=True)
    torch.testing.assert_close(second, G_hat - B.grad @ A.grad)


def test_unit_scores_group_importance_by_heads_and_channels():
    model = adapted()
    pruner = LoraPrune(model, LoraPruneConfig())
    backward(model)
    groups, channels = pruner.unit_scores(model)
    mods = adapter_modules(model)

    def imp(path):
        a = mods[path]
        A, B = a.factors()
        return lora_importance(a.spec.weight(), A, B, a.scale, A.grad, B.grad)

    def unit(v):
        return v / (v.norm() + 1e-8)

    p = "model.layers.1.self_attn."
    want = (unit(imp(p + "q_proj").sum(1).view(2, 16).sum(1)) + unit(imp(p + "k_proj").sum(1).view(2, 8).sum(1))
            + unit(imp(p + "v_proj").sum(1).view(2, 8).sum(1)) + unit(imp(p + "o_proj").sum(0).view(2, 16).sum(1)))
    torch.testing.assert_close(groups[1], want)
    p = "model.layers.0.mlp."
    want = unit(imp(p + "gate_proj").sum(1)) + unit(imp(p + "up_proj").sum(1)) + unit(imp(p + "down_proj").sum(0))
    torch.testing.assert_close(channels[0], want)
    # EMA from S₀ = 0: S₁ = (1 − β)·score
    assert pruner.accumulate(model)
    torch.testing.assert_close(pruner.score_channels[0], 0.1 * want)
    assert pruner.accumulate(model)
    torch.testing.assert_close(pruner.score_channels[0], 0.9 * 0.1 * want + 0.1 * want)
    model.zero_grad(set_to_none=True)
    assert not pruner.accumulate(model) and pruner.skipped == 1  # no gradients: no update


def test_cubic_schedule():
    T, p = 100, 0.5
    vals = [cubic_sparsity(t, T, p) for t in range(T + 1)]
    assert vals[0] == vals[10] == 0.0 and vals[91] == vals[100] == p
    assert all(b >= a for a, b in itertools.pairwise(vals))
    assert cubic_sparsity(50, T, p) == pytest.approx(p + (0 - p) * (1 - 40 / 80) ** 3)
    assert cubic_sparsity(50, T, p) > p / 2  # cubic: prunes fast early, slowly near the target
    assert cubic_sparsity(5, 10, 0.5, warmup=0.0, cooldown=0.0) == pytest.approx(0.5 * (1 - 0.5 ** 3))


# -- progressive pruning -------------------------------------------------------------------------
def test_hits_target_sparsity_exactly_with_progressive_monotone_masks():
    model = adapted()
    cfg = LoraPruneConfig(sparsity=0.5, prune_every=3, warmup=0.1, cooldown=0.2)
    pruner = LoraPrune(model, cfg)
    pruner.install(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    masks, total = [], 20
    for t in range(total):
        backward(model, token_data(n=4, t=10, seed=100 + t))
        pruner.step(model, t, total)
        opt.step()
        masks.append(torch.cat([pruner.kept_channels[i] for i in (0, 1)]))
    assert all(bool((b <= a).all()) for a, b in itertools.pairwise(masks))  # pruned units stay pruned
    assert len(pruner.history) >= 3 and pruner.history[-1][1] == 0.5  # several rounds, ending at the target
    assert 0 < pruner.history[0][1] < 0.5
    removed = pruner.pruning().removed()
    # exactly ⌊n·p⌋ per layer: 1 of 2 KV groups (2 query heads), 32 of 64 channels, in both layers
    assert removed == {"kv_heads": 2 * n_removed(2, 0.5), "heads": 4, "channels": 2 * n_removed(64, 0.5)}
    assert removed["channels"] == 64 and all(int(pruner.kept_channels[i].sum()) == 32 for i in (0, 1))


def test_prunes_lowest_ema_units():
    model = adapted()
    pruner = LoraPrune(model, LoraPruneConfig(sparsity=0.25, layers=[1], prune_attention=False))
    pruner.score_channels[1] = torch.arange(64.0).flip(0)  # channel 63 least important
    pruner.prune_to(0.25)
    assert torch.nonzero(~pruner.kept_channels[1]).squeeze(1).tolist() == list(range(48, 64))
    assert bool(pruner.kept_channels.get(0, torch.ones(1, dtype=torch.bool)).all()) and 0 not in pruner.kept_channels


def test_layers_and_unit_kinds_are_respected():
    model = adapted()
    pruner = run_pruning(model, LoraPruneConfig(sparsity=0.75, layers=[0], prune_attention=False, prune_every=2),
                         total=10)
    pruning = pruner.finalize(model)
    assert pruning.removed() == {"heads": 0, "kv_heads": 0, "channels": 48}
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (16, 32)
    assert model.model.layers[1].mlp.gate_proj.weight.shape == (64, 32)


def test_masked_model_equals_physically_pruned_model():
    model = adapted()
    pruner = run_pruning(model, LoraPruneConfig(sparsity=0.5, prune_every=2), total=12)
    masked = logits_of(model, IDS)  # LoRA unmerged, units masked by the hooks
    pruner.remove_hooks()
    assert not torch.allclose(logits_of(model, IDS), masked, atol=1e-4)  # the masks matter
    pruner.install(model)
    n_before = sum(p.numel() for p in model.parameters())
    pruning = pruner.finalize(model)
    assert lorakit.adapter_names(model) == [] and not pruner._hooks
    torch.testing.assert_close(logits_of(model, IDS), masked, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < n_before
    assert model.lorakit_pruning == pruning


def test_saved_pruned_model_reloads_with_identical_logits(tmp_path):
    model = adapted()
    pruner = run_pruning(model, LoraPruneConfig(sparsity=0.5, prune_every=2), total=10)
    pruning = pruner.finalize(model)
    want = logits_of(model, IDS)
    save_pruned(model, tmp_path / "pruned", pruning)
    back = load_pruned(tmp_path / "pruned")
    torch.testing.assert_close(logits_of(back, IDS), want, rtol=0, atol=0)
    assert back.model.layers[1].self_attn.k_proj.weight.shape == (8, 32)


# -- inside lorakit.train --------------------------------------------------------------------------
def test_callback_runs_inside_lorakit_train_and_resume_state(tiny_model_dir, text_file, tmp_path):
    from lorakit.train import TrainConfig, train

    cb = LoraPruneCallback(LoraPruneConfig(sparsity=0.5, prune_every=2))
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      block_size=16, batch_size=4, max_steps=10, lr=1e-2, warmup_steps=0, save_steps=5,
                      logging_steps=5, progress=False)
    res = train(cfg, adapter={"r": 4, "target": "all-linear"}, callbacks=[cb])
    pruner = cb.pruner
    assert pruner.history and pruner.sparsity == 0.5
    assert pruner.pruning().removed() == {"heads": 4, "kv_heads": 2, "channels": 64}
    ckpt = tmp_path / "run" / "checkpoint-5" / STATE_FILE
    assert ckpt.is_file()
    # a resumed run restores the step-5 masks and scores
    cb2 = LoraPruneCallback(LoraPruneConfig(sparsity=0.5, prune_every=2))
    args = types.SimpleNamespace(output_dir=str(tmp_path / "run"))
    cb2.on_train_begin(args, types.SimpleNamespace(global_step=5), None, model=res.model)
    from safetensors.torch import load_file

    saved = load_file(str(ckpt))
    assert torch.equal(cb2.pruner.kept_channels[0], saved["0.kept_channels"])
    assert torch.equal(cb2.pruner.score_groups[1], saved["1.score_groups"])
    assert 0 < cb2.pruner.sparsity < 0.5
    with pytest.raises(ConfigError, match="missing"):
        LoraPruneCallback().on_train_begin(args, types.SimpleNamespace(global_step=7), None, model=res.model)
    cb2.pruner.remove_hooks()
    masked = logits_of(res.model, IDS)
    pruning = cb.finalize(res.model)
    torch.testing.assert_close(logits_of(res.model, IDS), masked, rtol=1e-5, atol=1e-5)
    save_pruned(res.model, tmp_path / "pruned", pruning, tokenizer=res.tokenizer)
    back = load_pruned(tmp_path / "pruned")
    torch.testing.assert_close(logits_of(back, IDS), masked, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.5}, "sparsity"), ({"beta": 1.0}, "beta"),
    ({"prune_every": 0}, "prune_every"), ({"warmup": 0.6, "cooldown": 0.5}, "warmup \\+ cooldown"),
    ({"warmup": -0.1}, "warmup"), ({"layers": [1, 1]}, "layers"),
    ({"prune_attention": False, "prune_mlp": False}, "nothing to prune"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LoraPruneConfig(**kw)


def test_needs_lora_on_each_pruned_group():
    model = adapted(target=["gate_proj", "up_proj"])
    with pytest.raises(ConfigError, match="layer 0 has no LoRA adapter 'default' on self_attn"):
        LoraPrune(model, LoraPruneConfig())
    LoraPrune(model, LoraPruneConfig(prune_attention=False))  # MLP-only pruning is fine
    with pytest.raises(ConfigError, match="out of range"):
        LoraPrune(model, LoraPruneConfig(prune_attention=False, layers=[3]))
    from lorakit.methods.hydra import HydraConfig

    other = tiny_llama()
    lorakit.inject(other, HydraConfig(r=2, target="all-linear"))
    with pytest.raises(ConfigError, match="LoRA factors"):
        LoraPrune(other, LoraPruneConfig())
    frozen = adapted()
    lorakit.core.inject.adapter_modules(frozen)["model.layers.1.mlp.up_proj"].requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        LoraPrune(frozen, LoraPruneConfig())


def test_finalize_refuses_a_second_adapter():
    model = adapted()
    lorakit.inject(model, LoraConfig(r=2, target="q_proj"), name="other")
    pruner = LoraPrune(model, LoraPruneConfig())
    with pytest.raises(ConfigError, match="also carries"):
        pruner.finalize(model)
    with pytest.raises(ConfigError, match="not started"):
        LoraPruneCallback().finalize(model)
