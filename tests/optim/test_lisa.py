"""LISA: embeddings + head always trained, γ sampled decoder layers per period, the rest frozen.

METHODS.md: "each K steps sample γ=2 middle layers uniformly to unfreeze; others frozen" —
test_custom_loop_freezes_switches_and_frees_states; "memory below LoRA" is a benchmark claim,
here its mechanism: Adam states exist only for active layers (test_adam_state_is_only_active_layers).
"""

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.optim import Lisa, LisaCallback, find_layers, sample_layers, set_active_layers, state_bytes
from tests.conftest import tiny_bert, tiny_gpt2


def llama(n_layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 10), generator=g) for _ in range(n)]


def layer_params(lisa):
    return [{id(p) for p in layer.parameters()} for layer in lisa.layers]


def test_find_layers_on_llama_gpt2_bert():
    assert find_layers(llama())[0] == "model.layers" and len(find_layers(llama())[1]) == 4
    assert find_layers(tiny_gpt2())[0] == "transformer.h"
    assert find_layers(tiny_bert())[0] == "bert.encoder.layer"


def test_sampling_is_uniform_seeded_and_reproducible():
    assert sample_layers(8, 2, seed=0, period=3) == sample_layers(8, 2, seed=0, period=3)
    draws = [tuple(sample_layers(8, 2, seed=0, period=k)) for k in range(400)]
    assert all(len(set(d)) == 2 and list(d) == sorted(d) for d in draws)
    counts = torch.bincount(torch.tensor([i for d in draws for i in d]), minlength=8).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()  # 100 expected each
    assert draws != [tuple(sample_layers(8, 2, seed=1, period=k)) for k in range(400)]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_custom_loop_freezes_switches_and_frees_states(set_to_none):
    # set_to_none=False: zero-filled grads of a just-frozen layer would still get weight decay
    model = llama(n_layers=4).train()
    lisa = Lisa(model, n_layers=1, interval=2, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    groups = layer_params(lisa)
    in_layers = set().union(*groups)
    always = {n: p for n, p in model.named_parameters() if id(p) not in in_layers}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(always)

    seen = []
    for step, ids in enumerate(batches(8)):
        lisa.maybe_switch(step, opt)
        assert lisa.active == sample_layers(4, 1, seed=0, period=step // 2)
        seen.append(tuple(lisa.active))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        for n, p in model.named_parameters():
            layer = next((i for i, g in enumerate(groups) if id(p) in g), None)
            if layer is None or layer in lisa.active:
                assert not torch.equal(before[n], p), f"step {step}: trainable {n} did not move"
            else:
                assert torch.equal(before[n], p), f"step {step}: frozen {n} changed"
        # Adam state only for the always-trained parameters and the active layer
        held = {id(p) for p in opt.state}
        assert held == {id(p) for p in always.values()} | groups[lisa.active[0]]
    assert len(set(seen)) > 1  # the active layer changed across periods
    assert seen[0::2] == seen[1::2]  # ... and only at period boundaries (interval = 2)
    assert [s for s, _ in lisa.history] == [0, 2, 4, 6]


def test_adam_state_is_only_active_layers():
    model = llama(n_layers=4).train()
    lisa = Lisa(model, n_layers=2, interval=1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step, ids in enumerate(batches(3)):
        lisa.maybe_switch(step, opt)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    full = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.requires_grad_(True)
    model(input_ids=batches(1)[0], labels=batches(1)[0]).loss.backward()
    full.step()
    per_layer = sum(p.numel() for p in lisa.layers[0].parameters())
    assert state_bytes(full) - state_bytes(opt) == 2 * 4 * (4 - 2) * per_layer + 4 * 2 * len(list(lisa.layers[0].parameters()))


def test_resume_picks_the_same_layers():
    a, b = Lisa(llama(), n_layers=2, interval=5), Lisa(llama(), n_layers=2, interval=5)
    for s in range(13):
        a.maybe_switch(s)
    assert b.maybe_switch(13) and b.active == a.active  # resumed mid-period: same draw, switches at once
    assert not b.maybe_switch(14) and b.maybe_switch(15)


def test_activating_a_layer_missing_from_the_optimizer_is_an_error():
    model = llama()
    lisa = Lisa(model, n_layers=1, interval=1)
    opt = torch.optim.AdamW([model.lm_head.weight], lr=1e-3)
    with pytest.raises(ConfigError, match="not in the optimizer"):
        lisa.maybe_switch(0, opt)
    with pytest.raises(ConfigError, match="out of range"):
        set_active_layers(lisa.layers, [7])


def test_config_errors():
    model = llama(n_layers=4)
    with pytest.raises(ConfigError, match="n_layers=5 exceeds the 4 layers"):
        Lisa(model, n_layers=5)
    for kw, msg in [({"n_layers": 0}, "n_layers must be a positive integer"),
                    ({"interval": 0}, "interval must be a positive integer"),
                    ({"seed": -1}, "seed must be a non-negative integer")]:
        with pytest.raises(ConfigError, match=msg):
            Lisa(model, **kw)
    with pytest.raises(ConfigError, match="no layer stack"):
        find_layers(torch.nn.Linear(2, 2))


def test_trainer_run_with_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = llama(n_layers=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = LisaCallback(model, n_layers=1, interval=2, seed=0)
    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in batches(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             weight_decay=0.1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    trained = {i for _, active in cb.lisa.history for i in active}
    assert [s for s, _ in cb.lisa.history] == [0, 2]
    assert len(trained) < 4  # 2 periods x 1 layer: some layer was never sampled
    groups = layer_params(cb.lisa)
    for n, p in model.named_parameters():
        layer = next((i for i, g in enumerate(groups) if id(p) in g), None)
        assert torch.equal(before[n], p) == (layer is not None and layer not in trained), n
    held = {id(p) for p in trainer.optimizer.state}
    assert not held & set().union(*(groups[i] for i in range(4) if i not in cb.lisa.active))
