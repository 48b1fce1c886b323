"""Master-ASR: a shared bank of low-rank modules, per-task assembly weights, per-row task
routing, a new task that trains only its assembly weights, and exact export of a task as LoRA."""

import pytest
import torch

import lorakit
from lorakit.core.inject import trainable_parameters
from lorakit.core.io import export_peft
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.methods.master_asr import (
    MasterAsrConfig,
    add_task,
    assembly_weights,
    master_asr_modules,
    set_task,
    set_trainable,
    use_tasks,
)
from tests.conftest import lm_loss, logits_of, randomize, tiny_llama, token_data


def build(tasks=("en", "fr"), seed=0, **kw):
    model = tiny_llama()
    kw = {"num_modules": 4, "r": 2, "alpha": 4.0, **kw}
    lorakit.inject(model, MasterAsrConfig(tasks=list(tasks), **kw))
    randomize(model, seed=seed, std=0.3)
    return model


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"tasks": []}, "tasks must be a non-empty list"),
        ({"tasks": "en"}, "tasks must be a non-empty list"),
        ({"tasks": ["en", "en"]}, "tasks must be unique"),
        ({"tasks": ["a.b"]}, "invalid task name 'a.b'"),
        ({"num_modules": 0}, "num_modules must be a positive integer"),
        ({"r": 0}, "r must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive finite number"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"num_modules": 2, "top_k": 3}, "top_k=3 exceeds num_modules=2"),
        ({"task": "fr"}, "task 'fr' is not one of tasks"),
        ({"task_modules": {"fr": 2}}, "task_modules names 'fr'"),
        ({"task_modules": {"default": 9}}, r"task_modules\['default'\]=9 exceeds num_modules=8"),
        ({"trainable_tasks": ["xx"]}, r"trainable_tasks \['xx'\] are not among tasks"),
        ({"trainable_modules": [8]}, r"trainable_modules \[8\] are not module indices in \[0, 7\]"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MasterAsrConfig(**kw)


@pytest.mark.parametrize("top_k", [0, 2])
def test_forward_is_the_weighted_sum_of_bank_modules(top_k):
    model = build(top_k=top_k)
    m = next(iter(master_asr_modules(model).values()))
    x = torch.randn(2, 5, m.spec.in_features)
    for t in (0, 1):
        a = m.logits[t].detach()
        if top_k:
            top, idx = a.topk(top_k)
            w = torch.zeros_like(a)
            w[idx] = torch.softmax(top, 0)
        else:
            w = torch.softmax(a, 0)
        expect = sum(w[i] * (x @ m.lora_A[i].T @ m.lora_B[i].T) for i in range(4)) * (4.0 / 2)
        with torch.no_grad():
            m.call_task = t
            got = m.delta(x, None)
            m.call_task = None
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
        assert int((m.task_weights(t) > 0).sum()) == (top_k or 4)
        torch.testing.assert_close(m.task_weights(t).sum(), torch.tensor(1.0))


def test_sparse_assembly_leaves_unchosen_modules_without_gradient():
    model = build(tasks=("en",), top_k=1)
    m = next(iter(master_asr_modules(model).values()))
    chosen = int(m.logits[0].argmax())
    m.delta(torch.randn(3, m.spec.in_features), None).pow(2).sum().backward()
    for i in range(4):
        got = m.lora_B[i].grad
        assert (got is not None and got.abs().sum() > 0) == (i == chosen), i


def test_task_selection_per_call_and_per_row_equals_separate_runs(tmp_path):
    model = build(tasks=("en", "fr", "sw"))
    ids = token_data(n=3, t=7, seed=3)
    sep = {}
    for t in ("en", "fr", "sw"):
        with use_tasks(model, t):
            sep[t] = logits_of(model, ids)
    torch.testing.assert_close(logits_of(model, ids), sep["en"], rtol=0, atol=0)  # default: tasks[0]
    assert not torch.allclose(sep["en"], sep["fr"])
    with use_tasks(model, ["fr", "sw", "en"]):
        routed = logits_of(model, ids)
    with use_tasks(model, torch.tensor([1, 2, 0])):
        routed_ids = logits_of(model, ids)
    for row, t in enumerate(["fr", "sw", "en"]):
        torch.testing.assert_close(routed[row], sep[t][row], rtol=0, atol=1e-5)
    torch.testing.assert_close(routed_ids, routed, rtol=0, atol=0)
    set_task(model, "sw")
    torch.testing.assert_close(logits_of(model, ids), sep["sw"], rtol=0, atol=0)
    lorakit.save(model, tmp_path / "a")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, ids), sep["sw"], rtol=0, atol=1e-6)  # default task kept


def test_use_tasks_errors():
    model = build()
    with pytest.raises(ConfigError, match="unknown task 'de'"), use_tasks(model, "de"):
        pass
    with pytest.raises(ConfigError, match="task index 5 is out of range"), use_tasks(model, [0, 5]):
        pass
    with use_tasks(model, ["en", "fr"]), pytest.raises(ValueError, match="2 row tasks but the batch has 3"):
        logits_of(model, token_data(n=3, t=4))
    with use_tasks(model, "fr"), pytest.raises(AdapterError, match="inside use_tasks"):
        lorakit.merge(model)
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="is merged"), use_tasks(model, "fr"):
        pass
    with pytest.raises(AdapterError, match="is merged"):
        set_task(model, "fr")
    with pytest.raises(AdapterError, match="no Master-ASR adapter named 'x'"), use_tasks(model, "en", name="x"):
        pass


def test_to_lora_is_exact_for_every_task_and_exports_as_plain_lora(tmp_path):
    model = build(tasks=("en", "fr"), top_k=3)
    ids = token_data(n=2, t=6, seed=5)
    m = next(iter(master_asr_modules(model).values()))
    for t in ("en", "fr"):
        a, b, s = m.to_lora(task=t)
        assert a.shape == (3 * 2, m.spec.in_features) and b.shape == (m.spec.out_features, 3 * 2)  # rank k·r
        with use_tasks(model, t):
            x = torch.randn(4, m.spec.in_features)
            torch.testing.assert_close(x @ (s * b @ a).T, m.delta(x, None).detach(), rtol=1e-5, atol=1e-6)
    set_task(model, "fr")
    with use_tasks(model, "fr"):
        expect = logits_of(model, ids)
    export_peft(model, tmp_path / "fr")
    cfg, _ = lorakit.core.io.read_config(tmp_path / "fr")
    assert cfg.method == "lora"
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "fr")
    torch.testing.assert_close(logits_of(fresh, ids), expect, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown task 'de'"):
        m.to_lora(task="de")
    a2, b2, _ = m.to_lora(rank=2, task="fr")  # truncated: the best rank-2 approximation
    assert a2.shape[0] == 2 and b2.shape[1] == 2


def test_new_task_trains_only_its_assembly_weights_others_stay_bit_identical(tmp_path):
    model = build(tasks=("en", "fr"), num_modules=8)
    ids = token_data(n=4, t=8, seed=7)
    before = {}
    for t in ("en", "fr"):
        with use_tasks(model, t):
            before[t] = logits_of(model, ids)
    bank = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    n_train = add_task(model, "sw", init_from="fr")
    trainable, _ = trainable_parameters(model)
    assert n_train == trainable
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".logits.2") for n in names)  # only sw's assembly logits
    # the ratio to a rank-8 LoRA on the same layers (the paper: tens of times fewer)
    lora = tiny_llama()
    lorakit.inject(lora, LoraConfig(r=8))
    ratio = trainable_parameters(lora)[0] / trainable
    assert ratio > 30, ratio
    with use_tasks(model, "sw"):
        start = logits_of(model, ids)
    torch.testing.assert_close(start, before["fr"], rtol=0, atol=1e-6)  # copied from fr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        with use_tasks(model, "sw"):
            lm_loss(model, ids).backward()
        opt.step()
    model.eval()
    with use_tasks(model, "sw"):
        assert not torch.allclose(logits_of(model, ids), start, atol=1e-4)
    for t in ("en", "fr"):  # other tasks: bit-identical
        with use_tasks(model, t):
            assert torch.equal(logits_of(model, ids), before[t]), t
    assert all(torch.equal(p, bank[n]) for n, p in model.named_parameters() if n in bank)
    lorakit.save(model, tmp_path / "a")  # the grown adapter round-trips with its new task
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a", trainable=True)
    with use_tasks(model, ["sw", "en", "fr", "sw"]), use_tasks(fresh, ["sw", "en", "fr", "sw"]):
        torch.testing.assert_close(logits_of(fresh, ids), logits_of(model, ids), rtol=0, atol=1e-6)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(names)


def test_new_task_with_a_new_module_keeps_old_tasks_bit_identical(tmp_path):
    model = build(tasks=("en", "fr"))
    ids = token_data(n=3, t=6, seed=2)
    before = {}
    for t in ("en", "fr"):
        with use_tasks(model, t):
            before[t] = logits_of(model, ids)
    add_task(model, "sw", new_module=True)
    cfg = lorakit.core.inject.state(model).configs["default"]
    assert cfg.num_modules == 5 and cfg.task_modules == {"en": 4, "fr": 4}
    assert cfg.trainable_tasks == ["sw"] and cfg.trainable_modules == [4]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".logits.2", ".lora_A.4", ".lora_B.4")) for n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        with use_tasks(model, "sw"):
            lm_loss(model, ids).backward()
        opt.step()
    m = next(iter(master_asr_modules(model).values()))
    assert m.lora_B[4].abs().sum() > 0  # the new module trained
    for t in ("en", "fr"):
        with use_tasks(model, t):
            assert torch.equal(logits_of(model, ids), before[t]), t
    w = next(iter(assembly_weights(model).values()))
    assert w.shape == (3, 5) and torch.all(w[:2, 4] == 0) and w[2, 4] > 0
    lorakit.save(model, tmp_path / "a")
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    for t in ("en", "fr", "sw"):
        with use_tasks(model, t), use_tasks(fresh, t):
            torch.testing.assert_close(logits_of(fresh, ids), logits_of(model, ids), rtol=0, atol=1e-6)


def test_assembly_weights_alone_fit_a_new_task_from_a_jointly_trained_bank():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, MasterAsrConfig(tasks=["lo", "hi"], num_modules=4, r=4, alpha=8.0))
    lo, hi = token_data(n=8, t=10, lo=1, hi=40, seed=1), token_data(n=8, t=10, lo=80, hi=128, seed=2)
    batch, rows = torch.cat([lo, hi]), ["lo"] * 8 + ["hi"] * 8
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    for _ in range(25):  # stage 1: bank + both tasks, rows routed to their task
        opt.zero_grad()
        with use_tasks(model, rows):
            lm_loss(model, batch).backward()
        opt.step()
    add_task(model, "hi2")  # stage 2: a new task like "hi" learns only its 4 logits per layer
    new = token_data(n=8, t=10, lo=80, hi=128, seed=3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with use_tasks(model, "hi2"):
            loss = lm_loss(model, new)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_add_task_and_set_trainable_errors():
    model = build()
    with pytest.raises(ConfigError, match="task 'en' already exists"):
        add_task(model, "en")
    with pytest.raises(ConfigError, match="invalid task name"):
        add_task(model, "a/b")
    with pytest.raises(ConfigError, match="unknown task 'de'"):
        add_task(model, "sw", init_from="de")
    with pytest.raises(ConfigError, match=r"trainable_modules \[7\]"):
        set_trainable(model, modules=[7])
    assert set_trainable(model, tasks=["fr"], modules=[]) == sum(
        m.logits[1].numel() for m in master_asr_modules(model).values())
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="is merged"):
        add_task(model, "sw")
    assert lorakit.core.inject.state(model).configs["default"].tasks == ["en", "fr"]  # unchanged
