"""MoSA / Split & Merge: disjoint groups of hidden units, one seeded group trained per step (the
others untouched by the optimizer), and the merged adapter = the concatenation of the groups."""

from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.mosa import (
    Mosa,
    MosaBn,
    MosaBnConfig,
    MosaConfig,
    clear_groups,
    merge_groups,
    mosa_modules,
    sample_group,
    set_step,
)
from tests.conftest import logits_of, randomize, tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("cls,kw,msg", [
    (MosaConfig, dict(groups=0), "groups must be"), (MosaConfig, dict(groups=3), "r=8 must be a multiple of groups=3"),
    (MosaConfig, dict(r=8, rank_pattern={"q_proj": 6}), "rank_pattern.*6 must be a multiple"),
    (MosaConfig, dict(groups=True), "groups must be"), (MosaBnConfig, dict(groups=-1), "groups must be"),
    (MosaBnConfig, dict(variant="x"), "variant"),
])
def test_config_errors(cls, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        cls(**kw)


def test_bottleneck_units_must_split_evenly_and_the_model_is_untouched():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"m = ⌊32 / 16⌋ = 2 hidden units, not a multiple of groups=4"):
        lorakit.inject(model, MosaBnConfig())
    assert not adapted_layers(model)


def test_groups_partition_the_lora_and_to_lora_is_their_concatenation(tokens):
    model = tiny_llama()
    lorakit.inject(model, MosaConfig(r=8, groups=4, target=["q_proj", "v_proj"]))
    randomize(model)
    for path, m in mosa_modules(model).items():
        d_out = 32 if path.endswith("q_proj") else 16  # v_proj: 2 kv heads x 8
        assert [tuple(a.shape) for a in m.lora_A] == [(2, 32)] * 4  # K groups of r/K ranks
        assert [tuple(b.shape) for b in m.lora_B] == [(d_out, 2)] * 4
        a, b, s = m.to_lora()
        assert torch.equal(a, torch.cat(list(m.lora_A))) and torch.equal(b, torch.cat(list(m.lora_B), 1))
        torch.testing.assert_close(m.delta_weight(), b @ a * s)


def test_full_adapter_is_the_sum_of_its_groups():
    torch.manual_seed(0)
    for model, cfg in ((tiny_llama(), MosaConfig(target="q_proj")), (tiny_gpt2(), MosaBnConfig(reduction_factor=4))):
        lorakit.inject(model, cfg)
        randomize(model, std=0.3)
        model.train()
        for m in mosa_modules(model).values():
            x = torch.randn(2, 3, 32)
            with torch.no_grad():
                full = m.delta(x, x)  # no_grad: the full (merged) adapter even in train mode
            parts = []
            for k in range(m.groups):
                m.train_group = k
                parts.append(m.delta(x, x).detach())  # K-scaled group k
            m.train_group = None
            if isinstance(m, MosaBn):  # the shared b_up is in every group unscaled
                shift = m.up_bias.detach() * m.scaling
                parts = [p - shift for p in parts]
                full = full - shift
            assert full.abs().max() > 0.1
            torch.testing.assert_close(sum(parts) / m.groups, full, rtol=0, atol=1e-5)  # E_k[K f_k] = f


@pytest.mark.parametrize("make,cfg", [(tiny_llama, MosaConfig(r=8, groups=4)),
                                      (tiny_bert, MosaBnConfig(reduction_factor=4, groups=4)),
                                      (tiny_gpt2, MosaBnConfig(variant="double_seq_bn", reduction_factor=4))])
def test_each_step_trains_only_the_drawn_group(make, cfg, tokens):
    model = make()
    lorakit.inject(model, cfg)
    randomize(model, std=0.05)  # zero B / W_up would block gradients into A / W_down
    mods = mosa_modules(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(4):  # Adam moments of earlier steps must not move the idle groups later
        drawn = set_step(model, step, seed=7)
        before = {p: [t.detach().clone() for t in _group_tensors(m)] for p, m in mods.items()}
        opt.zero_grad()
        model(input_ids=tokens).logits.float().pow(2).mean().backward()
        opt.step()
        for path, m in mods.items():
            for k, (old, new) in enumerate(zip(before[path], _group_tensors(m))):
                changed = not torch.equal(old, new)
                assert changed == (k == drawn[path]), (step, path, k, drawn[path])


def _group_tensors(m):
    """Per group, all its parameters concatenated (the shared b_up excluded)."""
    if isinstance(m, Mosa):
        return [torch.cat([a.flatten(), b.flatten()]) for a, b in zip(m.lora_A, m.lora_B)]
    return [torch.cat([w.flatten(), b.flatten(), u.flatten()]) for w, b, u in zip(m.down_weight, m.down_bias, m.up_weight)]


def test_draws_are_seeded_per_step_and_module_and_cover_all_groups():
    model = tiny_llama()
    lorakit.inject(model, MosaConfig(target=["q_proj", "k_proj"]))
    a = [set_step(model, s, seed=1) for s in range(40)]
    assert a == [set_step(model, s, seed=1) for s in range(40)]  # reproducible, independent of history
    assert set_step(model, 17, seed=1) == a[17]  # a resumed run draws what the first run drew
    assert a != [set_step(model, s, seed=2) for s in range(40)]
    paths = sorted(a[0])
    assert all(d[p] == sample_group(1, s, p, 4) for s, d in enumerate(a) for p in paths)
    assert {d[paths[0]] for d in a} == {0, 1, 2, 3}
    assert any(len(set(d.values())) > 1 for d in a)  # not one shared draw
    with pytest.raises(ConfigError, match="step must be"):
        set_step(model, -1)


def test_trainer_callback_draws_each_step_and_clears_at_the_end():
    model = tiny_gpt2()
    cfg = MosaBnConfig(reduction_factor=4)
    lorakit.inject(model, cfg)
    (cb,) = MosaBn.trainer_callbacks(model, "default", cfg)
    mods = mosa_modules(model)
    cb.on_step_begin(SimpleNamespace(seed=3), SimpleNamespace(global_step=5), None)
    assert {p: m.train_group for p, m in mods.items()} == {p: sample_group(3, 5, p, 4) for p in mods}
    cb.on_train_end(None, None, None)
    assert all(m.train_group is None for m in mods.values())
    with pytest.raises(AdapterError, match="no MoSA adapter named 'other'"):
        MosaBn.trainer_callbacks(model, "other", cfg)


def test_eval_and_no_grad_use_the_full_adapter(tokens):
    model = tiny_llama()
    lorakit.inject(model, MosaConfig())
    randomize(model)
    full = logits_of(model, tokens)
    set_step(model, 0)
    assert torch.equal(logits_of(model, tokens), full)  # no_grad
    model.train()
    with torch.enable_grad():
        sparse = model(input_ids=tokens).logits.detach()
    model.eval()
    assert not torch.allclose(sparse, full)
    clear_groups(model)


def test_merged_lora_merges_exactly_and_becomes_plain_lora(tokens, tmp_path):
    model = tiny_llama()
    ref = logits_of(model, tokens)
    lorakit.inject(model, MosaConfig(r=8, groups=2))
    randomize(model)
    out = logits_of(model, tokens)
    lorakit.merge(model)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    groups = {p: m.factors() for p, m in mosa_modules(model).items()}
    assert merge_groups(model) == "default"
    layers = adapted_layers(model)
    assert all(type(layers[p].adapters["default"]).__name__ == "Lora" for p in groups)
    for p, (a, b) in groups.items():
        assert torch.equal(layers[p].adapters["default"].lora_A.weight, a)
        assert torch.equal(layers[p].adapters["default"].lora_B.weight, b)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-6)
    lorakit.save(model, tmp_path / "a")
    cfg = (tmp_path / "a" / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in cfg  # the merged adapter is a plain PEFT LoRA
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=1e-6)
    assert not torch.allclose(out, ref)


def test_merged_bottleneck_equals_the_concatenation_of_the_groups(tokens, tmp_path):
    model = tiny_bert()
    lorakit.inject(model, MosaBnConfig(reduction_factor=4), name="m")
    randomize(model, "m", std=0.2)
    out = logits_of(model, tokens)
    with pytest.raises(AdapterError, match="cannot be merged into the base weights"):
        lorakit.merge(model)
    full = {p: {k: v.detach().clone() for k, v in m.full_weights().items()} for p, m in mosa_modules(model, "m").items()}
    assert merge_groups(model, "m", out_name="plain") == "plain"
    assert lorakit.adapter_names(model) == ["plain"]
    for p, sd in full.items():
        plain = adapted_layers(model)[p].adapters["plain"]
        assert type(plain).__name__ == "Bottleneck"
        assert all(torch.equal(plain.state_dict()[k], v) for k, v in sd.items())
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-6)
    lorakit.save(model, tmp_path / "b", name="plain")
    fresh = tiny_bert()
    lorakit.load(fresh, tmp_path / "b")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=1e-6)


def test_merge_groups_errors_leave_the_model_unchanged():
    model = tiny_llama()
    lorakit.inject(model, MosaConfig(target="q_proj"), name="a")
    lorakit.inject(model, lorakit.LoraConfig(target="q_proj"), name="b")
    with pytest.raises(AdapterError, match="'b' already exists"):
        merge_groups(model, "a", out_name="b")
    with pytest.raises(AdapterError, match="no MoSA adapter named 'b'"):
        merge_groups(model, "b")
    lorakit.merge(model, ["a"])
    with pytest.raises(AdapterError, match="merged into"):
        merge_groups(model, "a")
    assert lorakit.adapter_names(model) == ["a", "b"]


def test_train_draws_one_group_per_optimizer_step(tiny_model_dir, text_file, tmp_path):
    from transformers import TrainerCallback

    from lorakit.train import TrainConfig, train

    seen = []

    class Record(TrainerCallback):  # runs after the method's callbacks
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.append({p: m.train_group for p, m in mosa_modules(model).items()})

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="mosa", block_size=16, batch_size=2, grad_accum=2, max_steps=3, lr=1e-2,
                      warmup_steps=0, save_steps=3, logging_steps=1, progress=False, seed=3)
    res = train(cfg, adapter={"r": 4, "groups": 2, "target": ["q_proj", "v_proj"]}, callbacks=[Record()])
    assert seen == [{p: sample_group(3, step, p, 2) for p in seen[0]} for step in range(3)]
    assert all(m.train_group is None for m in mosa_modules(res.model).values())
