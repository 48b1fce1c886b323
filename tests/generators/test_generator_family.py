"""Task families and the shared pieces of the adapter generators: task construction,
task vectors from the base model, per-task LoRAs from one seeded init, losses."""

import pytest
import torch

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.generators import Task, TaskLoraConfig, mixture_tasks, task_embedding, text_mixture_tasks
from lorakit.generators.family import (
    adapter_state,
    eval_loss,
    eval_with_state,
    hidden_states,
    inject_seeded,
    train_task_lora,
)
from tests.conftest import CORPUS, logits_of, randomize, tiny_llama, tiny_tokenizer
from tests.generators.conftest import TASK_LORA, family, sharp_llama


def test_mixture_tasks_shapes_support_and_determinism():
    tasks = mixture_tasks(3, vocab_size=128, n_basis=4, tokens_per_basis=8, seq_len=12, n_context=2, n_train=5,
                          n_eval=3, seed=4)
    again = mixture_tasks(3, vocab_size=128, n_basis=4, tokens_per_basis=8, seq_len=12, n_context=2, n_train=5,
                          n_eval=3, seed=4)
    other = mixture_tasks(3, vocab_size=128, n_basis=4, tokens_per_basis=8, seq_len=12, n_context=2, n_train=5,
                          n_eval=3, seed=5)
    for t, u in zip(tasks, again):
        assert t.context.shape == (2, 12) and t.train.shape == (5, 12) and t.eval.shape == (3, 12)
        assert torch.equal(t.train, u.train) and t.info["weights"] == u.info["weights"]
        w = torch.tensor(t.info["weights"])
        assert w.min() >= 0 and abs(float(w.sum()) - 1) < 1e-6
        p = t.info["probs"]
        assert abs(float(p.sum()) - 1) < 1e-5 and float(p[0]) == 0 and float(p[33:].sum()) == 0  # tokens 1..32
        ids = torch.cat([t.context, t.train, t.eval])
        assert ids.min() >= 1 and ids.max() <= 32
        assert 0 < t.info["entropy"] < torch.log(torch.tensor(32.0))
    assert not torch.equal(tasks[0].train, other[0].train)


def test_text_mixture_tasks_windows_of_group_documents():
    tok = tiny_tokenizer()
    groups = {"en": [CORPUS[0], CORPUS[2]], "ny": [CORPUS[1], CORPUS[3]]}
    tasks = text_mixture_tasks(groups, tok, n_tasks=2, seq_len=6, n_context=2, n_train=4, n_eval=2, seed=0)
    docs = {g: [tok(t, add_special_tokens=False)["input_ids"] for t in texts] for g, texts in groups.items()}
    for t in tasks:
        assert t.train.shape == (4, 6) and set(t.info["weights"]) == {"en", "ny"}
        for row in torch.cat([t.context, t.train, t.eval]).tolist():  # every row is a window of a document
            assert any(row == d[i:i + 6] for ds in docs.values() for d in ds for i in range(len(d) - 5))
    with pytest.raises(ConfigError, match="at least seq_len"):
        text_mixture_tasks(groups, tok, n_tasks=1, seq_len=500)
    with pytest.raises(ConfigError, match="at least 2"):
        text_mixture_tasks({"en": CORPUS}, tok, n_tasks=1)


def test_task_vector_is_base_model_only_and_per_layer_states():
    model = tiny_llama()
    ctx = family(1)[0].context
    hs = hidden_states(model, ctx)
    assert len(hs) == model.config.num_hidden_layers + 1 and hs[0].shape == (4, 16, 32)
    e_mean, e_last = task_embedding(model, ctx, "mean"), task_embedding(model, ctx, "last")
    assert e_mean.shape == (32,) and torch.allclose(e_mean, hs[-1].mean((0, 1)))
    assert torch.allclose(e_last, hs[-1][:, -1].mean(0))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target="all-linear"))
    randomize(model, std=0.5)
    before = logits_of(model, ctx)
    assert torch.allclose(task_embedding(model, ctx, "mean"), e_mean, atol=1e-6)  # adapters off inside
    assert torch.equal(logits_of(model, ctx), before)  # ... and back on afterwards
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="merged"):
        task_embedding(model, ctx)


def test_padding_is_ignored_by_task_vectors():
    model = tiny_llama()
    ctx = family(1)[0].context  # (4, 16)
    padded = torch.cat([ctx, torch.full((4, 5), 3)], dim=1)  # right padding: causal states of real tokens unchanged
    mask = torch.cat([torch.ones(4, 16), torch.zeros(4, 5)], dim=1).long()
    for pool in ("mean", "last"):
        assert torch.allclose(task_embedding(model, padded, pool, attention_mask=mask),
                              task_embedding(model, ctx, pool), atol=1e-5)
    assert not torch.allclose(task_embedding(model, padded, "last"), task_embedding(model, ctx, "last"), atol=1e-3)
    with pytest.raises(ConfigError, match="without any real token"):
        task_embedding(model, padded, attention_mask=torch.zeros_like(mask))


def test_task_loras_share_one_init_and_leave_the_model_unchanged():
    model = sharp_llama()
    tasks = family(2)
    ids = tasks[0].eval
    before = logits_of(model, ids)
    snaps = [train_task_lora(model, t, TASK_LORA) for t in tasks]
    assert lorakit.adapter_names(model) == [] and torch.equal(logits_of(model, ids), before)
    assert all(len(s) == TASK_LORA.snapshots for s in snaps)
    key = next(k for k in snaps[0][0] if k.endswith("lora_A.weight"))
    assert snaps[0][0][key].shape == (2, 32)
    assert not torch.equal(snaps[0][-1][key], snaps[1][-1][key])  # different tasks, different LoRAs
    # a rerun reproduces the LoRA exactly
    assert all(torch.equal(a, b) for a, b in zip(snaps[0][-1].values(), train_task_lora(model, tasks[0], TASK_LORA)[-1].values()))
    # the task's own LoRA fits its held-out rows better than the base model
    assert eval_with_state(model, tasks[0], TASK_LORA, snaps[0][-1]) < eval_loss(model, tasks[0].eval) - 0.5


def test_seeded_injection_gives_one_init_and_spares_the_global_rng():
    model = tiny_llama()
    cfg = TASK_LORA.lora_config()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    inject_seeded(model, cfg, "a", seed=7)
    inject_seeded(model, cfg, "b", seed=7)
    inject_seeded(model, cfg, "c", seed=8)
    assert torch.equal(torch.rand(3), expected)
    a, b, c = (adapter_state(model, n) for n in "abc")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(k for k in a if k.endswith("lora_A.weight"))],
                           c[next(k for k in c if k.endswith("lora_A.weight"))])


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        TaskLoraConfig(r=0)
    with pytest.raises(ConfigError, match="lr must be"):
        TaskLoraConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="snapshots=5 every 5 steps need more than 20 steps"):
        TaskLoraConfig(steps=20, snapshots=5, snapshot_every=5)
    with pytest.raises(ConfigError, match="target"):
        TaskLoraConfig(target="")
    with pytest.raises(ConfigError, match="do not fit in vocab_size"):
        mixture_tasks(2, vocab_size=16, n_basis=4, tokens_per_basis=8)
    with pytest.raises(ConfigError, match="concentration"):
        mixture_tasks(2, concentration=0.0)
    with pytest.raises(ConfigError, match="seq_len"):
        mixture_tasks(2, seq_len=1)
    with pytest.raises(ConfigError, match="context must be"):
        Task("t", torch.zeros(3), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="pool must be"):
        task_embedding(tiny_llama(), family(1)[0].context, pool="max")
    with pytest.raises(ConfigError, match="out of range"):
        task_embedding(tiny_llama(), family(1)[0].context, layer=7)
