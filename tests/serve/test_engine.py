"""Engine: batched heterogeneous LoRA generation equals one-request-at-a-time lorakit and PEFT;
continuous batching (joins/leaves) equals static batching; base rows equal the base model."""

import itertools

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError, ConfigError
from lorakit.serve import AdapterPool, Engine, Request, ServingLinear
from tests.conftest import logits_of, randomize, tiny_llama

EOS = 2  # tiny Llama's eos (LlamaConfig default): generate() and the engine both stop there


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """r2 / r4 / r8 LoRA (different targets, alphas, rsLoRA, a rank_pattern), a PEFT-written
    LoRA and a LoLDU adapter (served through to_lora)."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "r2": {"r": 2, "alpha": 4.0, "target": ["q_proj", "v_proj"]},
        "r4": {"r": 4, "alpha": 4.0, "rslora": True},
        "r8": {"r": 8, "alpha": 16.0, "rank_pattern": {"o_proj": 3, "gate_proj": 5}},  # pads 3, 5 -> 8
    }
    for i, (name, cfg) in enumerate(specs.items()):
        m = tiny_llama()
        lorakit.inject(m, lorakit.LoraConfig(**cfg))
        randomize(m, seed=10 + i, std=0.3)
        lorakit.save(m, root / name)
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                                           init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    pm.save_pretrained(root / "peft4")
    from lorakit.methods.loldu import LoLDUConfig

    m = tiny_llama()
    lorakit.inject(m, LoLDUConfig(r=4, target=["q_proj", "down_proj"]))
    with torch.no_grad():
        for layer in adapted_layers(m).values():
            layer.adapters["default"].scaling_factor.fill_(40.0)  # ΔW ≈ 40 × the rank-4 LDU part of W0
    lorakit.save(m, root / "ld")
    return root


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone_lorakit(root, req):
    m = tiny_llama()
    if req.adapter:
        lorakit.load(m, root / req.adapter)
    out = m.generate(torch.tensor([req.prompt]), max_new_tokens=req.max_new_tokens, do_sample=False)
    return out[0, len(req.prompt):].tolist()


def alone_peft(root, req):
    import peft

    m = tiny_llama()
    if req.adapter:
        m = peft.PeftModel.from_pretrained(m, str(root / req.adapter)).eval()
    out = m.generate(input_ids=torch.tensor([req.prompt]), max_new_tokens=req.max_new_tokens, do_sample=False)
    return out[0, len(req.prompt):].tolist()


def engine(root, **kw):
    return Engine(tiny_llama(), pool=AdapterPool(root), **kw)


MIXED = [None, "r2", "r4", "r8", "peft4", "r2", None, "r8", "ld"]


def mixed_requests(n_tokens=(5, 9, 3, 7, 6, 8, 4, 10, 6)):
    return [Request(p, adapter=a, max_new_tokens=k) for p, a, k in zip(prompts(len(MIXED)), MIXED, n_tokens)]


@pytest.mark.parametrize("decode_lora", ["concat", "gathered"])
def test_heterogeneous_batch_equals_lorakit_and_peft_alone(adapter_dir, decode_lora):
    reqs = mixed_requests()
    eng = engine(adapter_dir, max_batch=len(reqs), decode_lora=decode_lora)
    results = eng.generate(reqs)
    assert (eng.stats["concat_copies"] > 0) == (decode_lora == "concat")
    for req, res in zip(reqs, results):
        assert res.error is None
        assert res.tokens == alone_lorakit(adapter_dir, req), req.adapter
        if req.adapter != "ld":  # PEFT cannot read LoLDU
            assert res.tokens == alone_peft(adapter_dir, req), req.adapter


def test_adapters_really_change_the_output(adapter_dir):
    p = prompts(1, seed=3)[0]
    reqs = [Request(p, adapter=a, max_new_tokens=8, stop_token_ids=[]) for a in [None, "r2", "r4", "r8", "peft4", "ld"]]
    outs = [tuple(r.tokens) for r in engine(adapter_dir, max_batch=6).generate(reqs)]
    assert len(set(outs)) == len(outs)  # every adapter differs from the base and from the others


@pytest.mark.parametrize("decode_lora", ["concat", "gathered"])
def test_continuous_batching_equals_static_batching(adapter_dir, decode_lora):
    reqs = mixed_requests()
    cont = engine(adapter_dir, max_batch=3, decode_lora=decode_lora)
    stat = engine(adapter_dir, max_batch=3, policy="static")
    a, b = cont.generate(reqs), stat.generate(reqs)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert cont.stats["steps"] < stat.stats["steps"]  # rows joined while others were running


def test_requests_joining_between_steps(adapter_dir):
    reqs = mixed_requests()
    eng = engine(adapter_dir, max_batch=4)
    ids, got = [], {}
    schedule = {0: [0, 1], 2: [2, 3, 4], 3: [5], 7: [6, 7], 8: [8]}  # step -> requests arriving
    step = 0
    while step <= max(schedule) or eng.has_work():
        for i in schedule.get(step, []):
            ids.append(eng.add(reqs[i], collect=True))
        for ev in eng.step():
            got.setdefault(ev.request_id, []).append(ev)
        step += 1
    static = engine(adapter_dir, max_batch=1).generate(reqs)
    for rid, ref in zip(ids, static):
        assert eng.pop_result(rid).tokens == ref.tokens
        evs = got[rid]
        assert [e.index for e in evs] == list(range(len(evs))) and evs[-1].finished
        assert [e.token for e in evs] == ref.tokens


def test_running_rows_stay_grouped_so_layers_use_slices(adapter_dir):
    """Joins in any group order keep each rank group's rows contiguous: the plan holds slices
    (views, in-place adds), never index tensors, and tokens still equal one-at-a-time runs."""
    reqs = mixed_requests(n_tokens=(9, 3, 8, 5, 10, 4, 7, 6, 9))
    eng = engine(adapter_dir, max_batch=6)
    ids, seen_slices = [], 0
    for step in range(60):
        if step < len(reqs):  # one arrival per step, groups in the order of MIXED (not sorted)
            ids.append(eng.add(reqs[step], collect=True))
        eng.step()
        keys = [eng._group_key(s) for s in eng._running]
        assert keys == sorted(keys)
        if eng._running:
            plan = eng._plan_for(eng._running)
            assert all(rows is None or isinstance(rows, slice) for _, rows, _, _ in plan.groups)
            seen_slices += sum(isinstance(rows, slice) for _, rows, _, _ in plan.groups)
        if step >= len(reqs) and not eng.has_work():
            break
    assert seen_slices > 0  # several groups did share the batch
    static = engine(adapter_dir, max_batch=1).generate(reqs)
    assert [eng.pop_result(rid).tokens for rid in ids] == [r.tokens for r in static]


def test_concat_columns_are_reused_and_repacked(adapter_dir):
    """Decode batches side by side in the concat buffers: an adapter already there is not
    copied again, one that joins takes the columns of one that left (or the end), the buffers
    are repacked when dead columns exceed a quarter; every live entry's columns always equal
    its slot's factors, live entries never overlap, no layer keeps the per-row factors a
    prefill gathered, and tokens equal one-at-a-time runs."""
    names = ["r2", "r4", "r8", "peft4", "ld", "r8", "r2", "ld", "r4", "peft4", "r8", "r2"]
    ps = prompts(len(names), seed=7)
    reqs = [Request(p, adapter=a, max_new_tokens=3 + (i * 5) % 9, stop_token_ids=[])
            for i, (p, a) in enumerate(zip(ps, names))]
    eng = engine(adapter_dir, max_batch=3)
    for name in set(names):
        eng.pool.get(name)  # resident: admission does not depend on load timing
    ids, plan, rebuild_all = [], None, 0
    for step in range(200):
        if step % 2 == 0 and len(ids) < len(reqs):
            ids.append(eng.add(reqs[len(ids)], collect=True))
        eng.step()
        assert all(not layer._gathered[1] for layer in eng._layers.values())  # prefill copies are not kept
        if eng._plan is not plan and eng._plan is not None:  # a new decode plan
            plan = eng._plan
            rebuild_all += len({q.slot for q in eng._running})  # copies if nothing were kept
        spans = []
        for (g, s, key), (c, r) in eng._cat_cols.items():
            assert c + r <= eng._cat_width <= eng._cat_cap
            live = eng._groups[g].keys[s] == key and any(q.slot == (g, s) for q in eng._running)
            if live:
                spans.append((c, r))
                for layer in eng._layers.values():
                    assert torch.equal(layer.ca[:, c:c + r], layer.a[g][s, :, :r])
                    assert torch.equal(layer.cb[c:c + r], layer.b[g][s, :r])
        spans.sort()
        assert all(c1 + r1 <= c2 for (c1, r1), (c2, _) in itertools.pairwise(spans))
        if len(ids) == len(reqs) and not eng.has_work():
            break
    st = eng.stats
    assert st["concat_repacks"] >= 1 and st["concat_copies"] < rebuild_all
    ref = engine(adapter_dir, max_batch=1, decode_lora="gathered").generate(reqs)
    assert [eng.pop_result(i).tokens for i in ids] == [r.tokens for r in ref]


def test_auto_decode_keeps_the_gathered_form_when_concat_costs_too_much(adapter_dir):
    reqs = mixed_requests()
    eng = engine(adapter_dir, max_batch=len(reqs))
    eng.CONCAT_MAX_BLOWUP = 1  # any batch of two distinct adapters costs more than that
    for name in {r.adapter for r in reqs} - {None}:
        eng.pool.get(name)  # resident: all nine are admitted by the first step
    ids = [eng.add(r, collect=True) for r in reqs]
    eng.step()  # prefill
    eng.step()  # first decode step: nine rows, five distinct adapters
    assert eng._plan.cat_off is None and len(eng._plan.groups) == 3 and eng.stats["concat_copies"] == 0
    eng.run_until_idle()
    ref = engine(adapter_dir, max_batch=len(reqs), decode_lora="concat").generate(reqs)
    assert [eng.pop_result(i).tokens for i in ids] == [r.tokens for r in ref]


@pytest.mark.parametrize("schedule", ["affinity", "fcfs"])
def test_affinity_admits_running_adapters_first_within_a_bound(adapter_dir, schedule):
    """"affinity": a waiting request whose adapter is already running goes before an older
    one with a new adapter, but a request passed over max_batch times goes next; "fcfs" keeps
    arrival order. Tokens do not depend on the order."""
    ps = prompts(8, seed=11)
    reqs = ([Request(ps[0], adapter="r2", max_new_tokens=30, stop_token_ids=[]),
             Request(ps[1], adapter="r8", max_new_tokens=3, stop_token_ids=[])]
            + [Request(p, adapter="r2", max_new_tokens=3, stop_token_ids=[]) for p in ps[2:]])
    eng = engine(adapter_dir, max_batch=2, schedule=schedule)
    for name in ("r2", "r8"):
        eng.pool.get(name)
    ids = [eng.add(reqs[0], collect=True)]
    eng.step()  # the long r2 request runs alone; the rest arrive behind
    ids += [eng.add(r, collect=True) for r in reqs[1:]]
    admitted = [ids[0]]
    while eng.has_work():
        admitted += [ev.request_id for ev in eng.step() if ev.index == 0]
    later_first = admitted.index(ids[1]) - 1  # requests arriving after r8's, admitted before it
    assert later_first == (2 if schedule == "affinity" else 0)
    ref = engine(adapter_dir, max_batch=1).generate(reqs)
    assert [eng.pop_result(i).tokens for i in ids] == [r.tokens for r in ref]


def test_base_rows_match_the_base_model(adapter_dir):
    ps = prompts(4, seed=5)
    reqs = [Request(p, max_new_tokens=6) for p in ps] + [Request(ps[0], adapter="r8", max_new_tokens=6)]
    results = engine(adapter_dir, max_batch=5).generate(reqs)
    base = tiny_llama()
    for req, res in zip(reqs[:4], results[:4]):
        ref = base.generate(torch.tensor([req.prompt]), max_new_tokens=6, do_sample=False)[0, len(req.prompt):]
        assert res.tokens == ref.tolist()


def test_close_restores_the_model_and_state_dict_is_untouched(adapter_dir, tokens):
    model = tiny_llama()
    keys = set(model.state_dict())
    eng = Engine(model, pool=AdapterPool(adapter_dir), max_batch=2)
    assert sum(isinstance(m, ServingLinear) for m in model.modules()) == 14  # 7 linears x 2 layers
    eng.generate([Request([5, 6, 7], adapter="r4", max_new_tokens=3)])
    # only the wrapper's ".base" appears in the names; the slots are neither parameters nor buffers
    assert {k.replace(".base.", ".") for k in model.state_dict()} == keys
    torch.testing.assert_close(logits_of(model, tokens), logits_of(tiny_llama(), tokens), rtol=0, atol=0)
    eng.close()
    assert not any(isinstance(m, ServingLinear) for m in model.modules())


def test_exact_rank_groups_give_the_same_tokens(adapter_dir):
    reqs = mixed_requests()
    pow2 = engine(adapter_dir, max_batch=9)
    exact = engine(adapter_dir, max_batch=9, rank_groups="exact")
    assert [r.tokens for r in pow2.generate(reqs)] == [r.tokens for r in exact.generate(reqs)]
    assert sorted(pow2._groups) == [2, 4, 8] and sorted(exact._groups) == [2, 4, 8]


def test_fixed_rank_group_pads_every_adapter_into_one_group(adapter_dir):
    reqs = mixed_requests()
    ref = [r.tokens for r in engine(adapter_dir, max_batch=9).generate(reqs)]
    fixed = engine(adapter_dir, max_batch=9, rank_groups=8)
    assert [r.tokens for r in fixed.generate(reqs)] == ref
    assert sorted(fixed._groups) == [8]
    # an adapter above the fixed rank is refused by name; the other requests are served
    small = engine(adapter_dir, max_batch=9, rank_groups=4)
    res = small.generate([Request(prompts(1)[0], adapter="r8", max_new_tokens=3), reqs[1]])
    assert res[0].finish_reason == "error" and "'r8' has rank 8" in res[0].error and "rank_groups=4" in res[0].error
    assert res[1].error is None and res[1].tokens == ref[1]


def test_few_slots_are_recycled(adapter_dir):
    reqs = mixed_requests()
    eng = engine(adapter_dir, max_batch=1, max_slots=1)
    results = eng.generate(reqs)
    ref = engine(adapter_dir, max_batch=9).generate(reqs)
    assert [r.tokens for r in results] == [r.tokens for r in ref]
    # groups 2: r2 | 4: r4, peft4, ld | 8: r8 -> r2, r4, r8, peft4 (evicts r4), ld (evicts peft4); r2, r8 reused
    assert eng.stats["slot_loads"] == 5 and eng.stats["slot_hits"] == 2
    assert all(g.cap == 1 for g in eng._groups.values())


def test_streaming_generator_and_callback(adapter_dir):
    reqs = mixed_requests()[:4]
    seen = []
    results = engine(adapter_dir, max_batch=2).generate(reqs, on_token=seen.append)
    streamed = {}
    for ev in engine(adapter_dir, max_batch=2).stream(reqs):
        streamed.setdefault(ev.request_id, []).append(ev.token)
    assert sorted(map(tuple, streamed.values())) == sorted(tuple(r.tokens) for r in results)
    assert len(seen) == sum(len(r.tokens) for r in results)
    assert sum(ev.finished for ev in seen) == len(reqs)


def test_sampling_is_reproducible_per_request(adapter_dir):
    p = prompts(1, seed=7)[0]
    sampled = Request(p, adapter="r4", max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=123,
                      stop_token_ids=[])
    alone = engine(adapter_dir).generate([sampled])[0].tokens
    crowd = engine(adapter_dir, max_batch=4).generate(mixed_requests()[:3] + [sampled])[-1].tokens
    assert alone == crowd
    other = engine(adapter_dir).generate([Request(p, adapter="r4", max_new_tokens=8, temperature=5.0, seed=1,
                                                  stop_token_ids=[])])[0].tokens
    assert other != alone
    greedy = Request(p, adapter="r4", max_new_tokens=8, stop_token_ids=[])
    top1 = Request(p, adapter="r4", max_new_tokens=8, temperature=1.0, top_k=1, seed=0, stop_token_ids=[])
    g, t = engine(adapter_dir, max_batch=2).generate([greedy, top1])
    assert g.tokens == t.tokens


def test_stop_tokens_and_lengths(adapter_dir):
    p = prompts(1, seed=2)[0]
    free = engine(adapter_dir).generate([Request(p, max_new_tokens=6, stop_token_ids=[])])[0]
    assert free.finish_reason == "length" and len(free.tokens) == 6
    stop_at = free.tokens[2]
    res = engine(adapter_dir).generate([Request(p, max_new_tokens=6, stop_token_ids=[stop_at])])[0]
    assert res.finish_reason == "stop" and res.tokens == free.tokens[: free.tokens.index(stop_at) + 1]


def test_bad_adapters_fail_only_their_request(adapter_dir, tmp_path):
    import shutil

    root = tmp_path / "pool"
    shutil.copytree(adapter_dir, root)
    weights = root / "r4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # corrupt
    eng = Engine(tiny_llama(), pool=AdapterPool(root), max_batch=4)
    reqs = [Request([5, 6, 7], adapter="r2", max_new_tokens=4), Request([5, 6], adapter="r4", max_new_tokens=4),
            Request([9, 9], adapter="nope", max_new_tokens=4), Request([8], adapter="r4", max_new_tokens=4),
            Request([7, 7, 7], max_new_tokens=4)]
    res = eng.generate(reqs)
    assert [r.finish_reason for r in res] == ["length", "error", "error", "error", "length"]
    assert "adapter_model.safetensors" in res[1].error and "truncated or corrupt" in res[1].error
    assert "unknown adapter 'nope'" in res[2].error
    assert res[0].tokens == alone_lorakit(adapter_dir, reqs[0])
    assert eng.pool.stats.adapters == ("r2",)  # nothing half-loaded stays behind


def test_adapter_outside_the_served_targets_is_an_error(adapter_dir):
    eng = engine(adapter_dir, target=["q_proj", "v_proj"])
    ok, bad = eng.generate([Request([4, 5], adapter="r2", max_new_tokens=3),
                            Request([4, 5], adapter="r8", max_new_tokens=3)])
    assert ok.error is None and bad.finish_reason == "error" and "does not serve" in bad.error
    assert len(engine(adapter_dir, target="adapters")._layers) == 14


def test_cancel(adapter_dir):
    eng = engine(adapter_dir, max_batch=2)
    a = eng.add(Request([4, 5, 6], adapter="r2", max_new_tokens=20, stop_token_ids=[]), collect=True)
    b = eng.add(Request([4, 5], max_new_tokens=20, stop_token_ids=[]), collect=True)
    c = eng.add(Request([4], max_new_tokens=20, stop_token_ids=[]), collect=True)
    while not eng.pool.peek("r2"):
        eng.pool.wait_for_load(0.05)
    eng.step(), eng.step()
    eng.cancel(a), eng.cancel(c)
    eng.run_until_idle()
    ra, rb, rc = eng.pop_result(a), eng.pop_result(b), eng.pop_result(c)
    assert ra.finish_reason == "cancelled" and 1 <= len(ra.tokens) < 20
    assert rb.finish_reason == "length" and len(rb.tokens) == 20
    assert rc.finish_reason == "cancelled"


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "", "a.b"])
def test_bad_adapter_names_are_rejected(bad):
    with pytest.raises(ConfigError, match="invalid adapter name"):
        Request([1, 2], adapter=bad)


def test_request_and_engine_validation(adapter_dir):
    for kw, msg in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                    ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(ConfigError, match=msg):
            Request([1], **kw)
    eng = engine(adapter_dir)
    with pytest.raises(ConfigError, match="empty"):
        eng.add(Request([]))
    with pytest.raises(ConfigError, match="token ids"):
        eng.add(Request([1, 999]))
    with pytest.raises(ConfigError, match="tokenizer"):
        eng.add(Request("hello"))
    with pytest.raises(ConfigError, match="context"):
        eng.add(Request([1] * 60, max_new_tokens=10))
    with pytest.raises(AdapterError, match="no adapter pool"):
        Engine(tiny_llama()).add(Request([1], adapter="r2"))
    for kw, msg in [({"max_batch": 0}, "max_batch"), ({"policy": "x"}, "policy"),
                    ({"rank_groups": "x"}, "rank_groups"), ({"rank_groups": 0}, "rank_groups"),
                    ({"rank_groups": True}, "rank_groups"), ({"max_batch": 4, "max_slots": 2}, "max_slots"),
                    ({"decode_lora": "fused"}, "decode_lora"), ({"schedule": "lifo"}, "schedule")]:
        with pytest.raises(ConfigError, match=msg):
            Engine(tiny_llama(), **kw)
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=2))
    with pytest.raises(ConfigError, match="already carries lorakit adapters"):
        Engine(m)
    with pytest.raises(ConfigError, match="not a linear layer"):
        Engine(tiny_llama(), target="embed_tokens")


def test_one_invalid_request_queues_nothing(adapter_dir):
    eng = engine(adapter_dir)
    with pytest.raises(ConfigError, match="empty"):
        eng.generate([Request([1, 2], max_new_tokens=2), Request([])])
    assert not eng.has_work()


def test_closing_a_stream_early_cancels_its_requests(adapter_dir):
    eng = engine(adapter_dir, max_batch=2)
    reqs = [Request([4, 5], adapter="r2", max_new_tokens=30, stop_token_ids=[]),
            Request([6], max_new_tokens=30, stop_token_ids=[])]
    stream = eng.stream(reqs)
    first = next(stream)
    assert first.index == 0 and not first.finished
    stream.close()
    eng.run_until_idle()
    assert eng.stats["decode_tokens"] < 10 and eng.stats["requests_finished"] == 2


def test_duplicate_request_ids_are_refused(adapter_dir):
    eng = engine(adapter_dir)
    eng.add(Request([1, 2], max_new_tokens=2, request_id="x"))
    with pytest.raises(ConfigError, match="already queued"):
        eng.add(Request([3], max_new_tokens=2, request_id="x"))
    eng.run_until_idle()
    eng.add(Request([3], max_new_tokens=2, request_id="x"))  # finished ids can be reused
    with pytest.raises(ConfigError, match="distinct"):
        eng.generate([Request([1], request_id="y"), Request([2], request_id="y")])


def test_gpt2_conv1d_layers(tmp_path):
    from tests.conftest import tiny_gpt2

    m = tiny_gpt2()
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8.0))
    randomize(m, seed=3, std=0.3)
    lorakit.save(m, tmp_path / "g")
    reqs = [Request([5, 6, 7, 8], adapter="g", max_new_tokens=6, stop_token_ids=[]),
            Request([9, 3], max_new_tokens=4, stop_token_ids=[])]
    res = Engine(tiny_gpt2(), pool=AdapterPool(tmp_path), max_batch=2).generate(reqs)
    for req, r in zip(reqs, res):
        ref = tiny_gpt2()
        if req.adapter:
            lorakit.load(ref, tmp_path / req.adapter)
        out = ref.generate(torch.tensor([req.prompt]), max_new_tokens=req.max_new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        assert r.tokens == out[0, len(req.prompt):].tolist()
