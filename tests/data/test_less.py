"""LESS (arXiv:2402.04333): per-example LoRA gradients, Adam preconditioning, Rademacher
projection (JL bound), the sharded feature datastore, scoring and selection."""

import dataclasses
import itertools
import json
import math

import pytest
import torch

import lorakit
from lorakit.data.less import (
    BLOCK_ROWS,
    FeatureStore,
    FeatureWriter,
    LessConfig,
    RademacherProjector,
    SelectConfig,
    WarmupResult,
    adam_direction,
    collate,
    collect_features,
    encode_examples,
    jl_epsilon,
    less_scores,
    lora_parameters,
    per_example_grads,
    prompt_response,
    response_nll,
    run_select,
    select,
    top_fraction,
    warmup_lora,
)
from lorakit.errors import ConfigError
from lorakit.methods.lora import LoraConfig
from tests.conftest import randomize, tiny_gpt2, tiny_llama, tiny_tokenizer

TINY = {"epochs": 2, "lr": 1e-2, "batch_size": 4, "r": 4, "alpha": 8.0, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "proj_dim": 256, "grad_batch_size": 16, "shard_size": 16,
        "dtype": "float32"}


def _examples(n=10, seed=0, lo=1, hi=128, step=None):
    """Causal-LM examples of varying length; the first 2 tokens are a masked 'prompt'.
    With `step`, each example is an arithmetic sequence x, x+step, ... in [lo, hi) (a 'task')."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(5, 12, (1,), generator=g))
        if step is None:
            ids = torch.randint(lo, hi, (t,), generator=g)
        else:
            x0 = int(torch.randint(0, hi - lo, (1,), generator=g))
            ids = lo + (x0 + step * torch.arange(t)) % (hi - lo)
        labels = ids.clone()
        labels[:2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _lora_model(factory=tiny_llama, target=("q_proj", "v_proj")):
    m = factory()
    lorakit.inject(m, LoraConfig(r=4, target=target if isinstance(target, str) else list(target)), name="less")
    randomize(m, "less", seed=1)  # non-zero B: every LoRA factor gets a gradient
    return m


# -- per-example gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("factory,target", [(tiny_llama, ("q_proj", "v_proj")), (tiny_gpt2, ("c_attn", "c_fc"))])
def test_per_example_grads_equal_a_per_example_loop(factory, target):
    model = _lora_model(factory, target)
    params = lora_parameters(model, "less")
    data = _examples(5, seed=3)
    batch = collate([(d["input_ids"], d["labels"]) for d in data])
    assert (batch["labels"] == -100).sum() > 2 * 5  # padding really happens
    fast = per_example_grads(model, params, batch)  # (5, D)
    assert fast.shape == (5, sum(p.numel() for p in params.values()))
    for i, d in enumerate(data):  # reference: one unpadded backward per example, the model's own loss
        model.zero_grad()
        model(input_ids=d["input_ids"][None], labels=d["labels"][None]).loss.backward()
        loop = torch.cat([p.grad.reshape(-1) for p in params.values()])
        torch.testing.assert_close(fast[i], loop, atol=1e-6, rtol=1e-4)
    assert fast.norm(dim=1).min() > 0


def test_adam_direction_is_the_adamw_step():
    """Γ = m̂/(√v̂+ε) is exactly −Δθ/lr of torch's AdamW step from the same state."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, generator=g))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    for _ in range(3):  # build up a state (step 3)
        p.grad = torch.randn(50, generator=g)
        opt.step()
    st = opt.state[p]
    grad = torch.randn(50, generator=g)
    gamma = adam_direction(grad[None], st["exp_avg"].clone(), st["exp_avg_sq"].clone(), int(st["step"]))[0]
    before = p.detach().clone()
    p.grad = grad
    opt.step()
    torch.testing.assert_close(gamma, (before - p.detach()) / 0.1, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gamma, grad)  # preconditioning changes the direction


# -- random projection -------------------------------------------------------------------------
def test_projection_keeps_inner_products_within_the_jl_bound():
    """max_{i<j} |<P̃u_i, P̃u_j> − <u_i, u_j>| / (‖u_i‖‖u_j‖) ≤ ε(n, d, δ), on real LoRA gradients."""
    model = _lora_model(target="all-linear")
    data = _examples(12, seed=5)
    grads = per_example_grads(model, lora_parameters(model, "less"),
                              collate([(d["input_ids"], d["labels"]) for d in data]))
    n, big_d = grads.shape
    assert big_d > BLOCK_ROWS  # several generated blocks
    norms = grads.norm(dim=1)
    true = grads @ grads.T
    iu = torch.triu_indices(n, n, 1)
    for d, seed in [(1024, 0), (1024, 1), (8192, 2)]:
        z = RademacherProjector(big_d, d, seed=seed).project(grads)
        err = ((z @ z.T - true) / (norms[:, None] * norms[None, :]))[iu[0], iu[1]].abs().max().item()
        eps = jl_epsilon(n, d, delta=1e-3)
        assert eps < 0.5  # the bound is in its valid range (not vacuous)
        assert err <= eps / 2, (d, err, eps)  # holds with a 2x margin
    # and the bound shrinks like 1/sqrt(d)
    assert jl_epsilon(12, 4096, 1e-3) == pytest.approx(jl_epsilon(12, 1024, 1e-3) / 2)


def test_projector_is_seeded_rademacher_and_independent_of_chunking():
    big_d, d = 2 * BLOCK_ROWS + 37, 64
    proj = RademacherProjector(big_d, d, seed=7)
    p = proj.matrix()
    assert p.shape == (big_d, d)
    assert torch.equal(p.abs(), torch.full_like(p, 1 / math.sqrt(d)))  # entries ±1/√d
    assert abs(p.sign().mean().item()) < 0.02  # balanced signs
    x = torch.randn(9, big_d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj.project(x), x @ p, atol=1e-4, rtol=1e-5)
    uncached = RademacherProjector(big_d, d, seed=7, cache_bytes=0)  # regenerated block by block
    assert uncached._cache is None
    torch.testing.assert_close(torch.cat([uncached.project(x[:4]), uncached.project(x[4:])]), proj.project(x))
    assert not torch.equal(RademacherProjector(big_d, d, seed=8).matrix(), p)
    with pytest.raises(ValueError, match=f"\\(n, {big_d}\\)"):
        proj.project(torch.zeros(2, big_d + 1))


# -- datastore ---------------------------------------------------------------------------------
def test_datastore_is_written_in_shards_and_read_back_lazily(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats, norms = torch.randn(10, 6, generator=g), torch.rand(10, generator=g)
    w = FeatureWriter(tmp_path / "s", dim=6, meta={"kind": "sgd"}, dtype="float32", shard_size=3)
    for a, b in [(0, 2), (2, 7), (7, 10)]:  # uneven appends
        w.add(torch.arange(a, b), feats[a:b], norms[a:b])
    assert json.loads((tmp_path / "s" / "index.json").read_text())["complete"] is False
    store = w.close()
    assert store.complete and len(store) == 10 and store.dim == 6
    assert [s["rows"] for s in store.shards] == [3, 3, 3, 1]
    assert len(list((tmp_path / "s").glob("shard-*.safetensors"))) == 4
    assert torch.equal(store.features(), feats) and torch.equal(store.indices(), torch.arange(10))
    idx, part = FeatureStore(tmp_path / "s").read(2, 8)  # spans three shards
    assert torch.equal(idx, torch.arange(2, 8)) and torch.equal(part, feats[2:8])
    blocks = list(store.iter_blocks(rows=4))
    assert [a for a, _, _ in blocks] == [0, 4, 8] and torch.equal(torch.cat([f for *_, f in blocks]), feats)
    assert [len(i) for _, i, _ in store.iter_blocks()] == [3, 3, 3, 1]
    # another run's features are never mixed in silently
    with pytest.raises(ConfigError, match="differs in \\['kind'\\]"):
        FeatureWriter(tmp_path / "s", dim=6, meta={"kind": "adam"}, dtype="float32", shard_size=3)
    w2 = FeatureWriter(tmp_path / "s", dim=6, meta={"kind": "adam"}, dtype="float32", shard_size=3, resume=False)
    assert w2.count == 0 and not list((tmp_path / "s").glob("shard-*"))
    with pytest.raises(ConfigError, match="not a feature store"):
        FeatureStore(tmp_path / "missing")


class _Flaky(list):
    """A dataset that fails once at position `fail_at` (an interrupted run)."""

    def __init__(self, items, fail_at):
        super().__init__(items)
        self.fail_at = fail_at

    def __getitem__(self, i):
        if i == self.fail_at:
            self.fail_at = None
            raise RuntimeError("interrupted")
        return super().__getitem__(i)


def test_collect_features_streams_and_resumes(tmp_path):
    model = _lora_model()
    data = _examples(11, seed=2)
    kw = {"adapter_name": "less", "kind": "sgd", "proj_dim": 64, "seed": 3, "grad_batch_size": 2, "shard_size": 4,
          "dtype": "float32"}
    full = collect_features(model, data, tmp_path / "full", **kw)
    assert [s["rows"] for s in full.shards] == [4, 4, 3] and full.complete
    # the stored rows are the normalised projections of the per-example gradients
    params = lora_parameters(model, "less")
    g = per_example_grads(model, params, collate([(d["input_ids"], d["labels"]) for d in data]))
    z = RademacherProjector(g.shape[1], 64, seed=3).project(g)
    torch.testing.assert_close(full.features(), z / z.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full.features().norm(dim=1), torch.ones(11))
    # a small gradient buffer projects every vmap chunk separately: same features, same shards
    small = collect_features(model, data, tmp_path / "small", **kw, buffer_mb=1e-3)
    assert [s["rows"] for s in small.shards] == [4, 4, 3]
    torch.testing.assert_close(small.features(), full.features(), atol=1e-6, rtol=1e-5)
    # interrupted after two shards, then resumed: the same store
    flaky = _Flaky(data, fail_at=9)
    with pytest.raises(RuntimeError, match="interrupted"):
        collect_features(model, flaky, tmp_path / "part", **kw)
    part = FeatureStore(tmp_path / "part")
    assert not part.complete and len(part) == 8
    resumed = collect_features(model, flaky, tmp_path / "part", **kw)
    assert resumed.complete and torch.equal(resumed.features(), full.features())
    assert torch.equal(resumed.indices(), torch.arange(11))


def test_collect_features_adam_uses_the_checkpoint_and_restores_weights(tmp_path):
    model = tiny_llama()
    data = _examples(8, seed=1)
    warm = warmup_lora(model, data, fraction=0.5, config=LessConfig(**TINY))
    params = lora_parameters(model, "less")
    before = {n: p.detach().clone() for n, p in params.items()}
    c0 = warm.checkpoints[0]
    store = collect_features(model, data, tmp_path / "a", kind="adam", checkpoint=c0, proj_dim=64, shard_size=8,
                             dtype="float32")
    assert all(torch.equal(before[n], p) for n, p in params.items())  # weights put back
    # reference: load epoch-1 weights, plain gradients, Adam direction, projection
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(c0.weights[n])
    g = per_example_grads(model, params, collate([(d["input_ids"], d["labels"]) for d in data]))
    m, v = c0.flat_state(list(params), "cpu")
    z = RademacherProjector(g.shape[1], 64).project(adam_direction(g, m, v, c0.adam_step))
    torch.testing.assert_close(store.features(), z / z.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="differs in \\['checkpoint', 'checkpoint_sha'\\]"):
        collect_features(model, data, tmp_path / "a", kind="adam", checkpoint=warm.checkpoints[1], proj_dim=64,
                         shard_size=8, dtype="float32")
    with pytest.raises(ConfigError, match="needs the warm-up checkpoint"):
        collect_features(model, data, tmp_path / "b", kind="adam")
    with pytest.raises(ConfigError, match="kind must be one of"):
        collect_features(model, data, tmp_path / "b", kind="sign")


# -- warm-up -------------------------------------------------------------------------------------
def test_warmup_keeps_adam_state_per_epoch_and_round_trips(tmp_path):
    model = tiny_llama()
    data = _examples(20, seed=4)
    cfg = LessConfig(**{**TINY, "epochs": 3})
    warm = warmup_lora(model, data, fraction=0.5, config=cfg)
    assert len(warm.subset) == 10 and warm.subset == sorted(set(warm.subset))
    assert [c.name for c in warm.checkpoints] == ["epoch-1", "epoch-2", "epoch-3"]
    assert [c.step for c in warm.checkpoints] == [3, 6, 9] and [c.adam_step for c in warm.checkpoints] == [3, 6, 9]
    lrs = [c.lr for c in warm.checkpoints]
    assert all(a > b > 0 for a, b in itertools.pairwise(lrs))  # linear decay: later epochs weigh less
    names = set(lora_parameters(model, "less"))
    assert set(warm.checkpoints[0].exp_avg) == names and set(warm.checkpoints[0].exp_avg_sq) == names
    first = next(iter(names))
    assert not torch.equal(warm.checkpoints[0].weights[first], warm.checkpoints[2].weights[first])
    assert warm.losses[-1] < warm.losses[0]  # it trains
    again = WarmupResult.load(warm.save(tmp_path / "w"))
    assert again.subset == warm.subset and again.losses == warm.losses
    for a, b in zip(warm.checkpoints, again.checkpoints):
        assert (a.name, a.step, a.lr, a.adam_step) == (b.name, b.step, b.lr, b.adam_step)
        assert all(torch.equal(a.exp_avg_sq[n], b.exp_avg_sq[n]) and torch.equal(a.weights[n], b.weights[n])
                   for n in names)
    # the same seed gives the same warm-up; the global RNG is left alone
    state = torch.random.get_rng_state()
    warm2 = warmup_lora(tiny_llama(), data, fraction=0.5, config=cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert warm2.losses == warm.losses


# -- scoring and selection -----------------------------------------------------------------------
def _store(path, feats, **meta):
    w = FeatureWriter(path, feats.shape[1], {"seed": 0, "rng": "cpu", "grad_dim": 5, "layout": "x", **meta},
                      dtype="float32", shard_size=3)
    w.add(torch.arange(len(feats)), feats, torch.ones(len(feats)))
    return w.close()


def test_less_scores_follow_the_formula(tmp_path):
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)
    tr = [unit(7, 4), unit(7, 4)]
    tg = [unit(5, 4), unit(5, 4)]
    train = [_store(tmp_path / f"tr{i}", t) for i, t in enumerate(tr)]
    target = [_store(tmp_path / f"tg{i}", t) for i, t in enumerate(tg)]
    w = [3.0, 1.0]  # renormalised to 0.75, 0.25
    inf = 0.75 * tr[0] @ tg[0].T + 0.25 * tr[1] @ tg[1].T  # (7, 5)
    torch.testing.assert_close(less_scores(train, target, w, block_rows=2), inf.max(1).values)
    groups = ["a", "b", "a", "b", "b"]  # mean within a subtask, max over subtasks
    ref = torch.stack([inf[:, [0, 2]].mean(1), inf[:, [1, 3, 4]].mean(1)], 1).max(1).values
    torch.testing.assert_close(less_scores(train, target, w, target_groups=groups), ref)
    with pytest.raises(ConfigError, match="target_groups has 2 entries for 5"):
        less_scores(train, target, w, target_groups=["a", "b"])
    with pytest.raises(ConfigError, match="not projected alike"):
        less_scores(train[:1], [_store(tmp_path / "other", tg[0], seed=1)])
    with pytest.raises(ConfigError, match="checkpoint_weights"):
        less_scores(train, target, [1.0, -1.0])
    with pytest.raises(ConfigError, match="one training and one target store"):
        less_scores(train, target[:1])


def test_top_fraction_is_deterministic_given_a_seed():
    scores = torch.tensor([0.5, 0.9, 0.9, 0.9, 0.1, 0.9, float("nan"), 0.2, 0.3, 0.4])
    a = top_fraction(scores, 0.3, seed=0)
    assert torch.equal(a, top_fraction(scores, 0.3, seed=0))
    assert len(a) == 3 and set(a.tolist()) < {1, 2, 3, 5}  # three of the four tied best
    tie_orders = {tuple(top_fraction(scores, 0.4, seed=s).tolist()) for s in range(8)}
    assert len(tie_orders) > 1  # ties are broken by the seed, not by position
    assert all(set(o) == {1, 2, 3, 5} for o in tie_orders)
    assert top_fraction(scores, 1.0)[-1].item() == 6  # NaN last
    assert top_fraction(torch.tensor([1.0, 2.0]), 0.01).tolist() == [1]  # at least one
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="fraction must be in \\(0, 1\\]"):
            top_fraction(scores, bad)


def _tasks():
    """Pool: two 'tasks' (arithmetic sequences over disjoint vocabularies), task A at even
    positions; target: fresh task-A examples; heldout: more task-A examples."""
    task_a = _examples(30, seed=1, lo=1, hi=64, step=1)
    task_b = _examples(30, seed=2, lo=64, hi=128, step=3)
    pool = [x for pair in zip(task_a, task_b) for x in pair]
    return pool, _examples(4, seed=9, lo=1, hi=64, step=1), _examples(16, seed=11, lo=1, hi=64, step=1)


SELECT_CFG = LessConfig(**{**TINY, "fraction": 0.2, "warmup_fraction": 0.3})


@pytest.fixture(scope="module")
def task_selection(tmp_path_factory):
    pool, target, _ = _tasks()
    model = tiny_llama()
    work = tmp_path_factory.mktemp("less")
    return model, select(model, pool, target, SELECT_CFG, work_dir=work)


def test_select_end_to_end_prefers_the_target_task_and_is_deterministic(task_selection, tmp_path):
    pool, target, _ = _tasks()
    model, res = task_selection
    assert lorakit.adapter_names(model) == []  # the warm-up adapter is removed again
    assert len(res.indices) == 12 and res.scores.shape == (60,)
    assert sum(i % 2 == 0 for i in res.indices.tolist()) >= 8  # random 20% would hold ~6 of task A
    assert res.scores[0::2].mean() > res.scores[1::2].mean()
    info = json.loads((res.work_dir / "selection.json").read_text())
    assert info["selected"] == res.indices.tolist() and len(info["checkpoints"]) == 2
    again = select(tiny_llama(), pool, target, SELECT_CFG, work_dir=tmp_path)
    assert torch.equal(again.indices, res.indices) and torch.equal(again.scores, res.scores)
    # resuming in a finished work dir reuses the warm-up and the stores: same answer, no recompute
    resumed = select(tiny_llama(), pool, target, SELECT_CFG, work_dir=res.work_dir)
    assert torch.equal(resumed.indices, res.indices)
    with pytest.raises(ConfigError, match="warm-up run with other settings \\(\\['lr'\\]\\)"):
        select(tiny_llama(), pool, target, dataclasses.replace(SELECT_CFG, lr=0.5), work_dir=res.work_dir)
    other = select(tiny_llama(), pool, target, dataclasses.replace(SELECT_CFG, seed=1), work_dir=tmp_path / "s1")
    assert not torch.equal(other.scores, res.scores)  # the seed matters (subset, init, projection)


def test_less_selection_beats_random_selection_on_the_target_task(task_selection):
    """METHODS check: fine-tuning on the LESS top-k gives a lower held-out target loss than
    fine-tuning on random subsets of the same size."""
    pool, _, heldout = _tasks()
    _, res = task_selection
    train_cfg = LessConfig(**{**TINY, "epochs": 15, "lr": 3e-2, "target_modules": "all-linear"})

    def target_loss(idx):
        m = tiny_llama()
        warmup_lora(m, [pool[i] for i in idx], 1.0, config=train_cfg)
        m.eval()
        with torch.no_grad():
            return sum(m(input_ids=e["input_ids"][None], labels=e["labels"][None]).loss.item() for e in heldout) / 16

    less = target_loss(res.indices.tolist())
    rand = [target_loss(torch.randperm(60, generator=torch.Generator().manual_seed(s))[:12].tolist()) for s in (1, 2)]
    assert less < min(rand), (less, rand)


def test_run_select_on_files_with_a_tiny_tokenizer(tmp_path, tiny_model_dir):
    topics = {"fruit": "apples and pears and plums", "ship": "the ship sails over the sea"}
    train = [{"instruction": f"Tell me about {k} {i}", "output": v} for i in range(10) for k, v in topics.items()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    target = [{"prompt": "Q: fruit? A:", "response": " apples and pears", "task": "fruit"},
              {"text": "plums and pears", "task": "fruit"}]
    (tmp_path / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target))
    cfg = SelectConfig(**{**TINY, "fraction": 0.25, "warmup_fraction": 0.5}, model=str(tiny_model_dir),
                       train=str(tmp_path / "train.jsonl"), target=str(tmp_path / "target.jsonl"),
                       output=str(tmp_path / "out" / "selected.jsonl"), work_dir=str(tmp_path / "work"),
                       group_field="task", max_length=64, progress=False)
    res = run_select(cfg)
    lines = (tmp_path / "out" / "selected.jsonl").read_text().splitlines()
    assert len(lines) == 5 == len(res.indices)
    assert [json.loads(x) for x in lines] == [train[i] for i in res.indices.tolist()]
    with pytest.raises(ConfigError, match="train must name an existing"):
        SelectConfig(train=str(tmp_path / "nope.jsonl"), target=str(tmp_path / "target.jsonl"))


# -- examples and configuration -----------------------------------------------------------------
def test_encode_examples_masks_the_prompt():
    from lorakit.data.text import render_record

    tok = tiny_tokenizer()
    rec = {"instruction": "Pack my box", "output": "with five dozen jugs."}
    prompt, response = prompt_response(rec)
    assert prompt + response == render_record(rec) and response == rec["output"]
    [ex] = encode_examples(tok, [rec], max_length=256)
    n_prompt = len(tok(prompt)["input_ids"])
    assert (ex["labels"][:n_prompt] == -100).all() and (ex["labels"][n_prompt:] != -100).all()
    assert ex["input_ids"][-1].item() == tok.eos_token_id
    [plain] = encode_examples(tok, ["The quick brown fox"])
    assert torch.equal(plain["labels"], plain["input_ids"])
    [short] = encode_examples(tok, [rec], max_length=5)
    assert len(short["input_ids"]) == 5
    msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    assert prompt_response(msgs)[1].startswith("hello there")
    with pytest.raises(ConfigError, match="item 0: expected a string"):
        encode_examples(tok, [{"question": "?"}])


@pytest.mark.parametrize("template", [None, "chatml"])
def test_chat_response_is_the_last_turn_even_when_it_occurs_in_the_markers(template):
    """A reply such as "e" or "a" also occurs in "<|im_end|>" / "<|assistant|>": the split must be
    at the last turn, not at the last occurrence of the text."""
    tok = tiny_tokenizer()
    if template:
        tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for user, reply in (("b", "e"), ("assistant", "a"), ("say end", "end"), ("hi", "hello there")):
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        prompt, response = prompt_response({"messages": msgs}, tok)
        assert response.startswith(reply) and prompt.endswith("assistant\n" if template else "<|assistant|>\n")
        assert user in prompt


def test_response_nll_is_the_per_example_label_loss_in_any_batching():
    model = _lora_model()
    model.eval()
    examples = _examples(n=7, seed=3)
    for batch_size in (1, 3, 8):
        sums, counts = response_nll(model, examples, batch_size=batch_size)
        assert sums.dtype == torch.float64 and counts.tolist() == [int((e["labels"][1:] != -100).sum()) for e in examples]
        for e, s, c in zip(examples, sums, counts):  # right padding changes nothing
            with torch.no_grad():
                loss = model(input_ids=e["input_ids"][None], labels=e["labels"][None]).loss
            assert float(s / c) == pytest.approx(float(loss), rel=1e-5)
    with pytest.raises(ConfigError, match="batch_size"):
        response_nll(model, examples, batch_size=0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    for bad, match in [({"fraction": 0.0}, "fraction must be in"), ({"warmup_fraction": 2.0}, "warmup_fraction"),
                       ({"proj_dim": 0}, "proj_dim must be a positive integer"), ({"lr": -1.0}, "lr must be"),
                       ({"dtype": "int8"}, "dtype must be one of"), ({"target_modules": []}, "target_modules"),
                       ({"checkpoint_weights": [0.0]}, "checkpoint_weights"), ({"seed": -1}, "seed")]:
        with pytest.raises(ConfigError, match=match):
            LessConfig(**bad)
    with pytest.raises(ConfigError, match="jl_epsilon needs"):
        jl_epsilon(1, 10, 0.1)
    model = tiny_llama()
    with pytest.raises(ConfigError, match="no adapter named 'less'"):
        lora_parameters(model, "less")
    seq_cls = {"input_ids": torch.arange(4), "labels": torch.tensor(1)}
    with pytest.raises(ConfigError, match="causal-LM examples"):
        warmup_lora(model, [seq_cls], fraction=1.0, config=LessConfig(**TINY))
    with pytest.raises(ConfigError, match="right-padded"):
        warmup_lora(tiny_llama(), [{"input_ids": torch.arange(4), "attention_mask": torch.tensor([0, 1, 1, 1])}],
                    fraction=1.0, config=LessConfig(**TINY))
    with pytest.raises(ConfigError, match="need training and target examples"):
        select(tiny_llama(), [], _examples(2), LessConfig(**TINY), work_dir=tmp_path)
