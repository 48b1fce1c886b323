"""Flower integration: Strategy + ClientApp on Flower's simulation engine, and server-side rejection."""

import pytest
import torch

flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from lorakit.errors import ConfigError  # noqa: E402
from lorakit.federated import ClientUpdate, run_federation  # noqa: E402
from lorakit.federated.flora import _derive_seed, _kaiming_a  # noqa: E402
from lorakit.federated.flower import (  # noqa: E402
    FloraStrategy,
    decode_update,
    encode_update,
    materialise,
    run_flower_simulation,
)
from lorakit.ops.aggregate import SparseUpdate, flora_stack, topk_sparsify  # noqa: E402
from tests.conftest import logits_of, tiny_llama, token_data, two_clients  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"


def nan_from_client_1_in_round_0(rnd, k, update):
    # module-level so Ray pickles it by reference
    if rnd == 0 and k == 1:
        a, b = update.factors[Q]
        update.factors[Q] = (a * float("nan"), b)
    return update


def assert_same_weights(m1, m2, atol=0.0):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=atol, rtol=0), (k, (s1[k] - s2[k]).abs().max())


# -- simulations (Ray; ~15 s each on 2 CPU cores) -------------------------------------------
def test_flower_simulation_two_rounds_equals_run_federation_and_rejects_nan_client():
    kw = dict(local_steps=3, lr=1e-2, update_hook=nan_from_client_1_in_round_0)
    hist = run_flower_simulation(tiny_llama, two_clients(), [2, 4], 2, "flora", **kw)
    assert [r["round"] for r in hist] == [0, 1]
    # round 0: client 1's NaN update is rejected, the round still aggregates client 0
    r0, r1 = hist[0], hist[1]
    assert r0["accepted"] == [0] and not r0.get("skipped")
    assert [x["client"] for x in r0["rejected"]] == [1] and "non-finite" in r0["rejected"][0]["reason"]
    assert r0["weights"] == {0: 1.0} and r0["delta_norm"] > 0
    assert r1["accepted"] == [0, 1] and r1["rejected"] == [] and r1["delta_norm"] > 0
    assert r1["bytes_down"] > 0  # round 2 downloads round 1's stacked update
    # the global model moved, and equals the in-process federation with the same seeds
    base = tiny_llama()
    ids = token_data(n=2, seed=5)
    assert not torch.allclose(logits_of(base, ids), logits_of(hist.model, ids))
    ref = run_federation(tiny_llama, two_clients(), [2, 4], 2, "flora", **kw)
    assert [r["accepted"] for r in ref] == [[0], [0, 1]]
    assert_same_weights(hist.model, ref.model)
    for a, b in zip(hist, ref):
        assert a["delta_norm"] == pytest.approx(b["delta_norm"], rel=1e-6)
        assert a["weights"] == pytest.approx(b["weights"])
    a, b = hist.global_factors[Q]
    assert a.shape == (6, 32) and b.shape == (32, 6)  # last round's stack, ranks 2 + 4


def test_flower_simulation_fedavg_with_cellm_sparse_uploads_equals_run_federation():
    kw = dict(local_steps=2, lr=1e-2, sparse=0.25, seed=3)
    hist = run_flower_simulation(tiny_llama, two_clients(), [2, 2], 2, "fedavg", **kw)
    ref = run_federation(tiny_llama, two_clients(), [2, 2], 2, "fedavg", **kw)
    for h, r in zip(hist, ref):
        assert h["accepted"] == r["accepted"] == [0, 1]
        assert h["bytes_up"] == r["bytes_up"] < h["bytes_up_dense"] == r["bytes_up_dense"]
    # the error-feedback residual lives in each node's Flower state across rounds
    assert_same_weights(hist.model, ref.model, atol=1e-6)
    for path, (a, b) in ref.global_factors.items():
        assert torch.allclose(hist.global_factors[path][0], a, atol=1e-6)
        assert torch.allclose(hist.global_factors[path][1], b, atol=1e-6)


# -- server-side, no Ray --------------------------------------------------------------------
def make_update(strategy, k, rank, gen, sparse=None):
    factors = {p: (torch.randn(rank, d_in, generator=gen) * 0.01, torch.randn(d_out, rank, generator=gen) * 0.01)
               for p, (d_out, d_in) in strategy.shapes.items()}
    u = ClientUpdate(k, rank, factors, {}, num_examples=10 * (k + 1), train_loss=1.0)
    if sparse:
        u.factors = {p: (topk_sparsify(a, sparse)[0], topk_sparsify(b, sparse)[0]) for p, (a, b) in factors.items()}
    return u, factors


@pytest.fixture
def task_identity():
    # Message() needs a task identity (Flower sets one inside its apps); fake one, then restore
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def reply(k, rank, arrays, num_examples):
    msg = Message(RecordDict({}), dst_node_id=100 + k, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": num_examples, "client": k, "rank": rank, "train_loss": 1.0})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def test_encode_decode_round_trip_dense_and_sparse():
    strat = FloraStrategy(tiny_llama, ranks=[2])
    gen = torch.Generator().manual_seed(0)
    for sparse in (None, 0.1):
        u, _ = make_update(strat, 0, 2, gen, sparse)
        back = decode_update(encode_update(u), 0, 2, strat.shapes, strat.full_shapes)
        assert set(back.factors) == set(u.factors)
        for p, (a, b) in u.factors.items():
            for x, y in zip((a, b), back.factors[p]):
                assert type(x) is type(y)
                if isinstance(x, SparseUpdate):
                    assert torch.equal(x.indices, y.indices) and torch.equal(x.values, y.values) and x.shape == y.shape
                else:
                    assert torch.equal(x, y)


def test_bad_updates_are_rejected_without_losing_the_round(task_identity):
    strat = FloraStrategy(tiny_llama, "flora", ranks=[2, 4, 2, 2], seed=7)
    gen = torch.Generator().manual_seed(1)
    good0, f0 = make_update(strat, 0, 2, gen)
    good1, f1 = make_update(strat, 1, 4, gen, sparse=0.5)
    wrong_shape, _ = make_update(strat, 2, 3, gen)  # client 2 should send rank 2
    nan, _ = make_update(strat, 3, 2, gen)
    nan.factors[Q] = (nan.factors[Q][0], nan.factors[Q][1] * float("nan"))
    junk = ArrayRecord({"not-a-key": flwr.app.Array(torch.zeros(3).numpy())})
    replies = [reply(0, 2, encode_update(good0), 10), reply(1, 4, encode_update(good1), 30),
               reply(2, 3, encode_update(wrong_shape), 10), reply(3, 2, encode_update(nan), 10),
               reply(3, 2, junk, 10)]
    arrays, metrics = strat.aggregate_train(1, replies)
    rec = strat.history[0]
    assert rec["accepted"] == [0, 1] and arrays is not None and metrics["accepted"] == 2
    reasons = [r["reason"] for r in rec["rejected"]]
    assert len(reasons) == 3
    assert "shape" in reasons[0] and "non-finite" in reasons[1] and "unexpected array" in reasons[2]
    # the accepted ones aggregate exactly as ops.aggregate.flora_stack (inits regenerated from the seed)
    inits = []
    for k, r in ((0, 2), (1, 4)):
        g = torch.Generator().manual_seed(_derive_seed(7, "init", 0, k))
        inits.append({p: _kaiming_a(g, r, strat.shapes[p][1]) for p in sorted(strat.shapes)})
    dense1 = {p: (a.to_dense(), b.to_dense()) for p, (a, b) in good1.factors.items()}
    a_ref, b_ref = flora_stack([inits[0][Q] + f0[Q][0], inits[1][Q] + dense1[Q][0]],
                               [f0[Q][1], dense1[Q][1]], [10, 30])
    assert torch.equal(torch.from_numpy(arrays[f"m0.A|{Q}"].numpy()), a_ref)
    assert torch.equal(torch.from_numpy(arrays[f"m0.B|{Q}"].numpy()), b_ref)
    model = materialise(tiny_llama, arrays)
    w0 = tiny_llama().get_submodule(Q).weight
    assert torch.allclose(model.get_submodule(Q).weight - w0, b_ref @ a_ref, atol=1e-6)
    # every update rejected: the round is skipped, the global state is kept (None)
    arrays2, _ = strat.aggregate_train(2, [reply(3, 2, encode_update(nan), 10)])
    assert arrays2 is None and strat.history[1]["skipped"]


def test_strategy_config_errors():
    with pytest.raises(ConfigError, match="strategy must be one of"):
        FloraStrategy(tiny_llama, "median")
    with pytest.raises(ConfigError, match="sparse"):
        FloraStrategy(tiny_llama, sparse=1.5)
    with pytest.raises(ConfigError, match="equal ranks"):
        FloraStrategy(tiny_llama, "fedavg", ranks=[2, 4])
    with pytest.raises(ConfigError, match="lora_kwargs"):
        FloraStrategy(tiny_llama, lora_kwargs={"r": 4})
    with pytest.raises(ConfigError, match="rounds"):
        run_flower_simulation(tiny_llama, two_clients(), [2, 2], 0)
