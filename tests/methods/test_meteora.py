"""MeteoRA: trained task LoRAs stacked in one tensor, a per-token top-k gate, the gate trained
with task-id cross-entropy, and `from_adapters` building it from saved lorakit LoRAs."""

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.methods.meteora import (
    MeteoraConfig,
    accept_task_ids,
    from_adapters,
    gate_loss,
    meteora_modules,
    task_labels,
)
from lorakit.methods.mola import mixture_delta
from lorakit.methods.sora import SoraConfig
from tests.conftest import adapters, logits_of, randomize, tiny_llama

TARGET = ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"num_experts": 2, "top_k": 3}, "top_k=3 exceeds num_experts=2"),
        ({"num_experts": 0}, "num_experts must be a positive integer"),
        ({"r": -1}, "r must be a positive integer"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"gate_loss_coef": -50}, "gate_loss_coef must be a non-negative finite number"),
        ({"gate_loss_coef": float("inf")}, "gate_loss_coef must be a non-negative finite number"),
        ({"alpha": 0}, "alpha must be a positive finite number"),
        ({"freeze_experts": "yes"}, "freeze_experts must be true or false"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MeteoraConfig(**kw)


def test_batched_forward_equals_a_per_token_loop():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, MeteoraConfig(num_experts=5, r=3, alpha=6, top_k=2, target="v_proj"))
    randomize(model, seed=1, std=0.3)
    m = next(iter(meteora_modules(model).values()))
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        got = m.delta(x, None)
    expect = torch.zeros(3, 6, m.spec.out_features)
    for i in range(3):
        for t in range(6):
            z = m.gate @ x[i, t]  # (n,)
            top, chosen = torch.topk(z, 2)  # top-k of the raw logits, softmax over the chosen two
            for w, e in zip(torch.softmax(top, 0), chosen.tolist()):
                expect[i, t] += w * (m.lora_B[e] @ (m.lora_A[e] @ x[i, t])) * (6 / 3)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert int(m.last_counts.sum()) == 3 * 6 * 2


def _save_loras(tmp_path, specs):
    """Save one plain LoRA per (r, alpha, rslora) spec on q_proj/v_proj of the tiny Llama."""
    dirs = []
    for i, (r, alpha, rslora) in enumerate(specs):
        m = tiny_llama()
        lorakit.inject(m, LoraConfig(r=r, alpha=alpha, rslora=rslora, target=TARGET))
        randomize(m, seed=10 + i, std=0.2)
        dirs.append(lorakit.save(m, tmp_path / f"lora{i}"))
    return dirs


def test_from_adapters_stacks_pads_folds_scales_and_freezes(tmp_path, tokens):
    dirs = _save_loras(tmp_path, [(2, 4.0, False), (4, 2.0, True)])  # scales 4/2 and rsLoRA 2/√4
    sources = [lorakit.load(tiny_llama(), d) for d in dirs]
    extra_a, extra_b = torch.randn(3, 32), torch.randn(16, 3)  # a (A, B, scale) set on k_proj only
    path_k = "model.layers.1.self_attn.k_proj"
    model = from_adapters(tiny_llama(), [*dirs, {path_k: (extra_a, extra_b, 0.5)}], top_k=2)
    mods = meteora_modules(model)
    assert len(mods) == 2 * 2 + 1 and all(m.n_experts == 3 and m.lora_A.shape[1] == 4 for m in mods.values())
    x = torch.randn(5, 32)
    for path, m in mods.items():
        for i, src in enumerate(sources):
            one_hot = torch.zeros(5, 3)
            one_hot[:, i] = 1.0
            got = mixture_delta(x, m.lora_A, m.lora_B, one_hot) * m.scale  # expert i alone, weight 1
            lora = adapters(src).get(path)
            want = lora.delta(x, None) if lora is not None else torch.zeros_like(got)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not m.lora_A[0, 2:].any() and not m.lora_B[0, :, 2:].any()  # rank 2 zero-padded to 4
    k = mods[path_k]
    assert torch.equal(k.lora_A[2, :3], extra_a) and torch.allclose(k.lora_B[2, :, :3], 0.5 * extra_b)
    assert not k.lora_A[:2].any()  # the saved LoRAs have no k_proj: zero experts there
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".gate") for n in trainable)
    # frozen experts survive save -> load, even with trainable=True
    out = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "meteora")
    fresh = lorakit.load(tiny_llama(), tmp_path / "meteora", trainable=True)
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable


def test_from_adapters_errors_leave_the_model_untouched(tmp_path):
    (lora_dir,) = _save_loras(tmp_path, [(2, 4.0, False)])
    sora = tiny_llama()
    lorakit.inject(sora, SoraConfig(r=2, target="q_proj"))
    sora_dir = lorakit.save(sora, tmp_path / "sora")
    model = tiny_llama()
    with pytest.raises(ConfigError, match="composes plain LoRA adapters, this one is 'sora'"):
        from_adapters(model, [lora_dir, sora_dir])
    with pytest.raises(ConfigError, match=r"source 1, module 'model.layers.0.self_attn.q_proj'.*expected A \(r, 32\)"):
        from_adapters(model, [lora_dir, {"model.layers.0.self_attn.q_proj": (torch.randn(2, 31), torch.randn(32, 2))}])
    with pytest.raises(ConfigError, match="top_k=3 exceeds num_experts=1"):
        from_adapters(model, [lora_dir], top_k=3)
    with pytest.raises(ConfigError, match="non-empty list"):
        from_adapters(model, [])
    with pytest.raises(ConfigError, match=r"expected \(A, B\) or \(A, B, scale\)"):
        from_adapters(model, [{"model.layers.0.self_attn.q_proj": torch.randn(2, 32)}])
    assert not adapted_layers(model) and not model.lorakit.configs


def _batch(g, n=12, t=8):
    """Three tasks with disjoint vocabularies: rows of task i use token ids 10i+1 .. 10i+10."""
    task = torch.randint(0, 3, (n,), generator=g)
    return task[:, None] * 10 + 1 + torch.randint(0, 10, (n, t), generator=g), task


def _gate_accuracy(model, ids, task):
    """Per gate: fraction of tokens whose top-1 LoRA is their task's."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, p=p: inputs.__setitem__(p, a[0]))
             for p, layer in adapted_layers(model).items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    want = task[:, None].expand(ids.shape).reshape(-1)
    return torch.stack([(m.route(inputs[p].reshape(-1, 32))[0].argmax(-1) == want).float().mean()
                        for p, m in meteora_modules(model).items()])


def _train_gates(dirs, labelled: bool, steps: int = 15):
    torch.manual_seed(0)
    model = from_adapters(tiny_llama(), dirs)  # experts frozen: only the gates train
    g = torch.Generator().manual_seed(0)
    test = _batch(torch.Generator().manual_seed(99), n=30)
    before = _gate_accuracy(model, *test)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        ids, task = _batch(g)
        if labelled:
            with task_labels(model, task):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()  # + Σ 50·CE(gate logits, task) when labelled
        opt.step()
    model.eval()
    return before, _gate_accuracy(model, *test)


def test_task_id_cross_entropy_teaches_the_gates_the_tasks(tmp_path):
    dirs = _save_loras(tmp_path, [(2, 4.0, False), (3, 4.0, False), (4, 4.0, False)])
    before, after = _train_gates(dirs, labelled=True)
    assert before.mean() < 0.5, before
    assert after.mean() > 0.85 and after.min() > 0.6, after
    _, unlabelled = _train_gates(dirs, labelled=False)  # the LM loss alone does not find the tasks
    assert unlabelled.mean() < 0.6, unlabelled


def test_gate_loss_enters_the_backward_exactly_as_if_added_to_the_loss():
    torch.manual_seed(0)
    model = tiny_llama()
    lorakit.inject(model, MeteoraConfig(num_experts=3, r=2, gate_loss_coef=7.0, target="q_proj"))
    randomize(model, seed=3, std=0.3)
    m = next(iter(meteora_modules(model).values()))
    x = torch.randn(2, 4, 32)
    labels = torch.tensor([[0, 2, -100, 1], [1, 1, 0, -100]])  # per token, -100 ignored
    with task_labels(model, labels):
        m.delta(x, None).pow(2).sum().backward()
    with_ce = m.gate.grad.clone()
    m.zero_grad()
    z = x.reshape(-1, 32) @ m.gate.T
    explicit = 7.0 * torch.nn.functional.cross_entropy(z, labels.reshape(-1), ignore_index=-100)
    (m.delta(x, None).pow(2).sum() + explicit).backward()  # no labels set now: main term only inside
    torch.testing.assert_close(with_ce, m.gate.grad, rtol=1e-5, atol=1e-6)
    assert torch.isclose(m.last_aux_loss, explicit.detach())
    assert m.task_labels is None  # the context manager cleaned up


def test_row_labels_hook_and_label_errors():
    model = tiny_llama()
    lorakit.inject(model, MeteoraConfig(num_experts=3, r=2, target=TARGET))
    model.train()
    ids = torch.randint(1, 128, (2, 5))
    handle = accept_task_ids(model)
    model(input_ids=ids, task_ids=torch.tensor([0, 2]))  # row labels, through model(**batch)
    assert gate_loss(model) > 0 and all(m.task_labels is not None for m in meteora_modules(model).values())
    model(input_ids=ids)  # no task_ids: the gates get no labels
    assert all(m.task_labels is None for m in meteora_modules(model).values())
    with pytest.raises(ValueError, match=r"task labels must lie in \[0, 2\]"):
        model(input_ids=ids, task_ids=torch.tensor([0, 3]))
    handle.remove()
    with pytest.raises(ValueError, match="must be integer tensors"), task_labels(model, torch.tensor([0.5, 1.0])):
        pass
    with task_labels(model, torch.tensor([0, 1, 2])), pytest.raises(
            ValueError, match=r"do not fit the layer input's leading shape \(2, 5\)"):
        model(input_ids=ids)


def test_merge_refuses_and_leaves_the_model_unchanged(tokens):
    model = tiny_llama()
    lorakit.inject(model, MeteoraConfig(num_experts=3, r=2))
    randomize(model, seed=9)
    out = logits_of(model, tokens)
    with pytest.raises(AdapterError, match="MeteoRA routes every token.*cannot be merged into the base weights"):
        lorakit.merge(model)
    assert not any(layer.merged for layer in adapted_layers(model).values())
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=0)
