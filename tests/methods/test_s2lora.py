"""S2-LoRA: factors shared across layers, per-weight L1-sparse rank coefficients (Whisper).

What it must show: a tiny WhisperForConditionalGeneration adapted on encoder and decoder
attention + FFN trains (loss decreases), saves/loads to identical outputs and merges exactly;
the trainable count follows the formula and is far below LoRA's at equal rank; the sparsity
step zeroes coefficients and pruning keeps outputs bit-identical; a shared factor is one
tensor that accumulates the gradients of all its layers; config errors.
(The contract suite covers tiny Llama / GPT-2 / BERT.)
"""

import json
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.core.inject import find_targets, state
from lorakit.core.io import export_peft
from lorakit.core.shared import shared_names
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.s2lora import (
    S2Lora,
    S2LoraConfig,
    active_ranks,
    groups,
    parameter_count,
    prune,
    s2lora_modules,
    s2lora_proximal_step,
)
from lorakit.methods.sora import prune as sora_prune
from tests.conftest import logits_of, perturb, tiny_llama

D, FFN, MELS, FRAMES, VOCAB = 32, 64, 8, 32, 64
TARGET = ["q_proj", "v_proj", "fc1", "fc2"]


def tiny_whisper(seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=MELS, d_model=D, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=FFN,
                        decoder_ffn_dim=FFN, max_source_positions=FRAMES // 2, max_target_positions=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperForConditionalGeneration(cfg).eval()


def speech_batch(n=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, MELS, FRAMES, generator=g)  # random "log-mel" features (batch, mels, frames)
    labels = torch.randint(3, VOCAB, (n, t), generator=g)
    return feats, labels


@torch.no_grad()
def whisper_logits(model, feats, labels):
    return model(input_features=feats, labels=labels).logits


def whisper_s2(r=4, seed=0, **kw):
    model = tiny_whisper(seed)
    lorakit.inject(model, S2LoraConfig(r=r, target=TARGET, **kw))
    return model


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"sparse_lambda": -1e-3}, "sparse_lambda must be a finite number >= 0, got -0.001"),
        ({"sparse_lambda": float("inf")}, "sparse_lambda must be a finite number >= 0"),
        ({"sparse_lambda": float("nan")}, "sparse_lambda must be a finite number >= 0"),
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number, got 0"),
        ({"alpha": float("inf")}, "alpha must be a positive number"),
        ({"lr_scaled": 1}, "lr_scaled must be true or false"),
        ({"share": "ba"}, r"share must be one of \('ab', 'a', 'b'\), got 'ba'"),
        ({"share_by": "layer"}, r"share_by must be one of \('shape', 'role'\), got 'layer'"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"ranks": [2]}, "ranks must be a mapping"),
        ({"r": 4, "ranks": {"32x32": 5}}, r"ranks\['32x32'\] must be an integer between 0 and r=4, got 5"),
        ({"ranks": {"32x32": -1}}, "must be an integer between 0"),
        ({"ranks": {"a..b": 1}}, "invalid shared-parameter key 'a..b'"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        S2LoraConfig(**kw)


# -- Whisper: targets, groups, parameter count ----------------------------------------------
def test_all_linear_covers_whisper_encoder_and_decoder_but_not_the_head():
    model = tiny_whisper()
    paths = find_targets(model, S2LoraConfig())
    leaves = {p.split(".")[-1] for p in paths}
    assert leaves == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    # encoder self-attn (4) + fc1/fc2 per layer; decoder self-attn (4) + cross-attn (4) + fc1/fc2
    assert sum(".encoder." in p for p in paths) == 2 * 6 and sum(".decoder." in p for p in paths) == 2 * 10
    assert sum(".encoder_attn." in p for p in paths) == 2 * 4
    assert "proj_out" not in paths  # the output head (tied to the token embeddings) stays plain


def test_groups_by_shape_and_by_role():
    by_shape = groups(whisper_s2())
    assert {g: len(ps) for g, ps in by_shape.items()} == {f"{D}x{D}": 12, f"{FFN}x{D}": 4, f"{D}x{FFN}": 4}
    assert "model.encoder.layers.0.self_attn.q_proj" in by_shape[f"{D}x{D}"]
    assert "model.decoder.layers.1.encoder_attn.v_proj" in by_shape[f"{D}x{D}"]
    by_role = groups(whisper_s2(share_by="role"))
    assert len(by_role) == 4 + 6 and all(len(ps) == 2 for ps in by_role.values())  # one per layer
    assert by_role["model.decoder.layers.*.encoder_attn.q_proj.32x32"] == [
        "model.decoder.layers.0.encoder_attn.q_proj", "model.decoder.layers.1.encoder_attn.q_proj"]


# (d_out, d_in, number of adapted weights) of the groups by shape, TARGET on tiny Whisper
SHAPES = [(D, D, 12), (FFN, D, 4), (D, FFN, 4)]
N_WEIGHTS = sum(n for *_, n in SHAPES)


@pytest.mark.parametrize("r", [2, 8])
def test_trainable_count_formula_and_far_below_lora(r):
    lora = tiny_whisper()
    lorakit.inject(lora, lorakit.LoraConfig(r=r, target=TARGET))
    lora_count = lorakit.trainable_parameters(lora)[0]
    assert lora_count == sum(n * r * (o + i) for o, i, n in SHAPES)

    counts = {}
    for share, formula in [
        ("ab", sum(r * (o + i) for o, i, _ in SHAPES) + N_WEIGHTS * r),
        ("a", sum(r * i for _, i, _ in SHAPES) + sum(n * r * (o + 1) for o, _, n in SHAPES)),
        ("b", sum(r * o for o, _, _ in SHAPES) + sum(n * r * (i + 1) for _, i, n in SHAPES)),
    ]:
        model = whisper_s2(r=r, share=share)
        counts[share] = lorakit.trainable_parameters(model)[0]
        assert counts[share] == formula == parameter_count(model), share
    role = whisper_s2(r=r, share_by="role")  # 10 groups of 2 layers
    assert lorakit.trainable_parameters(role)[0] == sum(n // 2 * r * (o + i) for o, i, n in SHAPES) + N_WEIGHTS * r
    assert counts["ab"] * 5 < lora_count  # 276·r vs 1536·r on this tiny model; the gap grows with depth


# -- the update ------------------------------------------------------------------------------
def test_update_equation_and_zero_init():
    model = whisper_s2(r=4)
    feats, labels = speech_batch()
    base = tiny_whisper()
    torch.testing.assert_close(whisper_logits(model, feats, labels), whisper_logits(base, feats, labels),
                               rtol=0, atol=0)  # λ = 0: exactly the base model
    m = s2lora_modules(model)["model.decoder.layers.1.self_attn.q_proj"]
    assert not m.gate.any() and m.lora_A.std() < 0.05 and m.lora_B.abs().sum() > 0
    perturb(model)
    x = torch.randn(5, D)
    expect = ((x @ m.lora_A.T) * m.gate) @ m.lora_B.T * (16.0 / 4)
    torch.testing.assert_close(m.delta(x, None), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x @ m.delta_weight().T, expect, rtol=1e-5, atol=1e-6)
    a, b, s = m.to_lora()
    torch.testing.assert_close(s * b @ a, m.delta_weight(), rtol=1e-5, atol=1e-6)


def test_shared_factor_is_one_tensor_and_accumulates_gradients_of_all_its_layers():
    model = whisper_s2(r=4)
    mods = s2lora_modules(model)
    q_enc, v_dec = mods["model.encoder.layers.0.self_attn.q_proj"], mods["model.decoder.layers.1.encoder_attn.v_proj"]
    fc1 = mods["model.encoder.layers.0.fc1"]
    assert q_enc.lora_A is v_dec.lora_A and q_enc.lora_B is v_dec.lora_B  # same Parameter object
    assert q_enc.gate is not v_dec.gate and fc1.lora_A is not q_enc.lora_A  # own λ; other shape, other A
    assert shared_names(q_enc) == {"lora_A": "32x32.lora_A", "lora_B": "32x32.lora_B"}
    names = [n for n, _ in model.named_parameters() if n.endswith("lora_A")]
    assert len(names) == 3  # one A per group in model.parameters(), whatever the number of layers
    perturb(model)
    model.train()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    l1 = lambda: model.get_submodule("model.encoder.layers.0.self_attn.q_proj")(x1).pow(2).sum()
    l2 = lambda: model.get_submodule("model.decoder.layers.1.encoder_attn.v_proj")(x2).pow(2).sum()
    grads = []
    for loss in (l1, l2):
        model.zero_grad()
        loss().backward()
        grads.append(q_enc.lora_A.grad.clone())
        assert grads[-1].abs().sum() > 0
    model.zero_grad()
    (l1() + l2()).backward()
    torch.testing.assert_close(q_enc.lora_A.grad, grads[0] + grads[1], rtol=1e-5, atol=1e-7)
    assert v_dec.lora_A.grad is q_enc.lora_A.grad
    assert not torch.allclose(grads[0], grads[1])


def test_model_to_keeps_the_sharing():
    model = whisper_s2().double()
    mods = list(s2lora_modules(model).values())
    assert mods[0].lora_A.dtype == torch.float64
    assert all(m.lora_A is mods[0].lora_A for m in mods if m.group == mods[0].group)


# -- training on Whisper ----------------------------------------------------------------------
def _train(model, steps, lr, seed=0):
    feats, labels = speech_batch(n=2, t=4, seed=seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_features=feats, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        s2lora_proximal_step(model, lr)
        losses.append(loss.item())
    return model.eval(), losses


def test_whisper_trains_and_loss_decreases():
    model = whisper_s2(r=8, sparse_lambda=1e-4)
    a0 = {g: s2lora_modules(model)[ps[0]].lora_A.detach().clone() for g, ps in groups(model).items()}
    model, losses = _train(model, steps=30, lr=5e-2)
    # random labels on a random tiny Whisper: ln(64) ≈ 4.16 at the start, ≈ 3.6 after 30 steps
    assert losses[-1] < 0.9 * losses[0] and sum(losses[-5:]) < sum(losses[:5]) - 1.0, losses
    for g, ps in groups(model).items():
        m = s2lora_modules(model)[ps[0]]
        assert not torch.equal(m.lora_A, a0[g])  # the shared factors trained too
        assert all(s2lora_modules(model)[p].lora_A is m.lora_A for p in ps)  # and are still shared


def test_sparsity_step_zeroes_coefficients_and_pruning_keeps_outputs_bit_identical(tmp_path):
    def zeros(model):
        return sum(int((m.gate == 0).sum()) for m in s2lora_modules(model).values())

    dense, _ = _train(whisper_s2(r=8, sparse_lambda=0.0), steps=6, lr=2e-2)
    assert zeros(dense) == 0  # without the penalty no coefficient is exactly 0
    model, _ = _train(whisper_s2(r=8, sparse_lambda=0.5), steps=12, lr=2e-2)
    assert 10 < zeros(model) < 8 * N_WEIGHTS // 2, zeros(model)  # the L1 step made exact zeros, not everywhere
    # force one rank direction out of the whole fc2 group, and one layer to drop everything
    mods = s2lora_modules(model)
    fc2 = [mods[p] for p in groups(model)[f"{D}x{FFN}"]]
    with torch.no_grad():
        for m in fc2:
            m.gate[0] = 0.0
        mods["model.encoder.layers.1.fc1"].gate.zero_()
    ranks = active_ranks(model)
    feats, labels = speech_batch(seed=5)
    before = whisper_logits(model, feats, labels)
    lorakit.save(model, tmp_path / "full")
    expected = {g: int(torch.stack([mods[p].gate != 0 for p in ps]).any(0).sum())
                for g, ps in groups(model).items()}
    assert expected[f"{D}x{FFN}"] < 8
    new = prune(model)
    assert new == expected
    assert torch.equal(whisper_logits(model, feats, labels), before)  # bit-identical
    assert active_ranks(model) == ranks
    for g, ps in groups(model).items():
        ms = [s2lora_modules(model)[p] for p in ps]
        assert all(m.lora_A is ms[0].lora_A and m.lora_A.shape[0] == new[g] == m.gate.shape[0] for m in ms)
    assert state(model).configs["default"].ranks == {g: k for g, k in sorted(new.items()) if k != 8}
    assert prune(model) == new  # idempotent

    lorakit.save(model, tmp_path / "pruned")
    size = lambda d: (d / "adapter_model.safetensors").stat().st_size
    assert size(tmp_path / "pruned") < size(tmp_path / "full")
    fresh = tiny_whisper()
    lorakit.load(fresh, tmp_path / "pruned")
    assert torch.equal(whisper_logits(fresh, feats, labels), before)


def test_proximal_step_is_soft_thresholding_on_coefficients_only():
    model = whisper_s2(r=4, sparse_lambda=2.0)
    mods = list(s2lora_modules(model).values())
    a_before = mods[0].lora_A.detach().clone()
    with torch.no_grad():
        for m in mods:
            m.gate.copy_(torch.tensor([0.5, -0.05, -0.3, 0.1]))
    left = s2lora_proximal_step(model, lr=0.05)  # threshold η·γ = 0.1
    for m in mods:
        torch.testing.assert_close(m.gate, torch.tensor([0.4, 0.0, -0.2, 0.0]), rtol=0, atol=1e-7)
    assert left == 2 * len(mods) and torch.equal(mods[0].lora_A, a_before)
    assert S2LoraConfig(sparse_lambda=3e-4, lr_scaled=False).threshold(1e-3) == 3e-4
    with pytest.raises(ConfigError, match="lr must be a number >= 0"):
        s2lora_proximal_step(model, lr=-1.0)
    with pytest.raises(AdapterError, match="no S2-LoRA adapter named 'x'"):
        s2lora_proximal_step(model, lr=0.1, name="x")


def test_trainer_callback_thresholds_with_the_coefficients_lr():
    model = tiny_whisper()
    cfg = S2LoraConfig(r=4, sparse_lambda=1.0, target=r"model\.encoder\.layers\.\d\.fc1")
    lorakit.inject(model, cfg)
    (cb,) = S2Lora.trainer_callbacks(model, "default", cfg)
    m0, m1 = s2lora_modules(model).values()
    assert m0.lora_A is m1.lora_A
    with torch.no_grad():
        for m in (m0, m1):
            m.gate.copy_(torch.tensor([1.0, -1.0, 0.25, 2.0]))
    a = m0.lora_A.detach().clone()
    opt = torch.optim.SGD([{"params": [m0.gate], "lr": 0.5}, {"params": [m0.lora_A], "lr": 9.0}], lr=0.1)
    cb.on_optimizer_step(SimpleNamespace(), SimpleNamespace(), None, optimizer=opt)
    torch.testing.assert_close(m0.gate, torch.tensor([0.5, -0.5, 0.0, 1.5]))
    assert torch.equal(m1.gate, torch.tensor([1.0, -1.0, 0.25, 2.0]))  # not in the optimizer
    assert torch.equal(m0.lora_A, a)


# -- files, merge, routing, export ------------------------------------------------------------
def test_whisper_save_load_identical_and_sharing_restored(tmp_path):
    model = whisper_s2(r=4)
    perturb(model, scale=0.2)
    feats, labels = speech_batch()
    out = whisper_logits(model, feats, labels)
    lorakit.save(model, tmp_path / "s2")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s2" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    shared = {k for k in keys if ".lorakit_shared." in k}
    assert shared == {f"base_model.model.lorakit_shared.{g}.lora_{x}" for g in (f"{D}x{D}", f"{FFN}x{D}", f"{D}x{FFN}")
                      for x in "AB"}
    assert len(keys - shared) == N_WEIGHTS and all(k.endswith(".gate") for k in keys - shared)  # one λ per weight
    info = lorakit.adapter_info(tmp_path / "s2")
    assert info["parameters"] == lorakit.trainable_parameters(model)[0]  # stored once, like trained
    cfg = json.loads((tmp_path / "s2" / "adapter_config.json").read_text())["lorakit"]
    assert cfg["method"] == "s2lora" and len(cfg["adapted_modules"]) == N_WEIGHTS

    fresh = tiny_whisper()
    lorakit.load(fresh, tmp_path / "s2")
    torch.testing.assert_close(whisper_logits(fresh, feats, labels), out, rtol=0, atol=0)
    mods = s2lora_modules(fresh)
    for ps in groups(fresh).values():
        assert all(mods[p].lora_A is mods[ps[0]].lora_A and mods[p].lora_B is mods[ps[0]].lora_B for p in ps)
    assert len([n for n, _ in fresh.named_parameters() if n.endswith("lora_B")]) == 3


def test_whisper_merge_is_exact_and_unmerge_restores():
    model = whisper_s2(r=4)
    perturb(model, scale=0.2)
    feats, labels = speech_batch()
    out = whisper_logits(model, feats, labels)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    lorakit.merge(model)
    torch.testing.assert_close(whisper_logits(model, feats, labels), out, rtol=0, atol=1e-5)
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)
    lorakit.merge(model)
    lorakit.eject(model, keep_merged=True)  # a plain Whisper with the update folded in
    assert not any("adapters" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(whisper_logits(model, feats, labels), out, rtol=0, atol=1e-5)


def test_two_adapters_share_nothing_and_route_per_row():
    model = whisper_s2(r=4)
    lorakit.inject(model, S2LoraConfig(r=4, target=TARGET), name="b")
    perturb(model, "default", seed=1, scale=0.2)
    perturb(model, "b", seed=2, scale=0.2)
    p = "model.decoder.layers.0.self_attn.q_proj"
    layer = model.get_submodule(p)
    assert layer.adapters["default"].lora_A is not layer.adapters["b"].lora_A
    feats, labels = speech_batch()
    expected = []
    for names in (["default"], ["b"], []):
        lorakit.activate(model, names) if names else lorakit.deactivate(model)
        expected.append(whisper_logits(model, feats, labels))
    with lorakit.route(model, [1, -1, 0], names=["default", "b"]):
        routed = whisper_logits(model, feats, labels)
    for row, which in enumerate([1, 2, 0]):
        torch.testing.assert_close(routed[row], expected[which][row], rtol=0, atol=1e-5)
    lorakit.delete(model, "b")
    assert all("b" not in layer.adapters for layer in [model.get_submodule(p)])
    assert lorakit.trainable_parameters(model)[0] == parameter_count(model)


def test_export_peft_is_plain_lora_with_the_same_outputs(tmp_path):
    model = whisper_s2(r=4)
    perturb(model, scale=0.2)
    with torch.no_grad():  # a weight that uses no direction exports as a zero update
        s2lora_modules(model)["model.encoder.layers.0.fc2"].gate.zero_()
    feats, labels = speech_batch()
    out = whisper_logits(model, feats, labels)
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    fresh = tiny_whisper()
    lorakit.load(fresh, tmp_path / "peft")
    assert state(fresh).configs["default"].method == "lora"
    torch.testing.assert_close(whisper_logits(fresh, feats, labels), out, rtol=0, atol=1e-5)


def test_layerwise_prune_is_refused_and_leaves_the_model_unchanged():
    model = tiny_llama()
    lorakit.inject(model, S2LoraConfig(r=4))
    perturb(model)
    m = next(iter(s2lora_modules(model).values()))
    with pytest.raises(AdapterError, match="prune with lorakit.methods.s2lora.prune"):
        m.prune_()
    with pytest.raises(AdapterError, match="prune with lorakit.methods.s2lora.prune"):
        sora_prune(model)  # SoRA's per-layer pruning must not split the shared factors
    assert all(x.rank == 4 for x in s2lora_modules(model).values()) and state(model).configs["default"].ranks == {}


def test_prune_refuses_a_merged_adapter(tokens):
    model = tiny_llama()
    lorakit.inject(model, S2LoraConfig(r=4))
    perturb(model)
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="merged"):
        prune(model)
    lorakit.unmerge(model)
    before = logits_of(model, tokens)
    prune(model)  # no zero coefficient: nothing to drop
    assert torch.equal(logits_of(model, tokens), before)


# -- lorakit.train (Trainer): proximal callback, checkpoints, bit-exact resume --------------
def test_train_runs_the_proximal_step_and_resumes_bit_exactly(tiny_model_dir, text_file, tmp_path):
    """Trainer path: shared tensors reach the optimizer once, the callback thresholds λ after
    each step, and a run resumed from a checkpoint (load_weights into shared tensors +
    optimizer state) ends bit-identical to an uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    from lorakit.train import TrainConfig, train

    def run(out, **kw):
        cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(out), method="s2lora",
                          block_size=16, batch_size=2, max_steps=4, lr=1e-2, warmup_steps=0, save_steps=2,
                          logging_steps=1, progress=False, **kw)
        return train(cfg, adapter={"r": 4, "sparse_lambda": 0.5})

    ref = run(tmp_path / "ref")
    assert 0 < sum(int((m.gate == 0).sum()) for m in s2lora_modules(ref.model).values())  # callback ran
    mods = s2lora_modules(ref.model)
    assert all(mods[p].lora_A is mods[ps[0]].lora_A for ps in groups(ref.model).values() for p in ps)
    run(tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "adapter")  # as if killed after checkpoint-2
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    res = run(tmp_path / "cut", resume=True)
    assert res.log["resumed_from"].endswith("checkpoint-2")
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (tmp_path / "ref", tmp_path / "cut"))
    assert a.keys() == b.keys() and any(".lorakit_shared." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
