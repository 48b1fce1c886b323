"""In-process federated LoRA: FLoRA stacking (arXiv:2409.05976), FedAvg, sparse uploads, splits."""

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.federated import ClientUpdate, dirichlet_split, run_federation, validate_update
from lorakit.ops.aggregate import SparseUpdate, cross_terms
from tests.conftest import logits_of, tiny_bert, tiny_gpt2, tiny_llama, token_data, two_clients

Q = "model.layers.0.self_attn.q_proj"


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(strategy="flora", ranks=(2, 4), rounds=2, **kw):
    kw.setdefault("local_steps", 3)
    kw.setdefault("lr", 1e-2)
    return run_federation(tiny_llama, two_clients(), list(ranks), rounds, strategy=strategy, **kw)


def test_two_clients_two_rounds_change_the_global_model():
    base = tiny_llama()
    hist = run("flora", ranks=(2, 4))
    assert len(hist) == 2 and [r["round"] for r in hist] == [0, 1]
    for r in hist:
        assert r["accepted"] == [0, 1] and r["rejected"] == []
        assert sum(r["weights"].values()) == pytest.approx(1.0)
        assert r["delta_norm"] > 0 and r["bytes_up"] == r["bytes_up_dense"] > 0
        assert all(torch.isfinite(torch.tensor(v)) for v in r["train_loss"].values())
    assert hist[0]["bytes_down"] == 0 and hist[1]["bytes_down"] > 0  # round 1 downloads round 0's stack
    before, after = weights_of(base), weights_of(hist.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert f"{Q}.weight" in changed and "lm_head.weight" not in changed
    assert all(k.endswith("proj.weight") for k in changed)  # only LoRA targets move; no adapters left
    ids = token_data(n=2, seed=5)
    assert not torch.allclose(logits_of(base, ids), logits_of(hist.model, ids))


def test_flora_round_merges_the_exact_average_of_heterogeneous_updates():
    # Same seed: same inits and the same local training; FLoRA merges Σ p_k B_k A_k into W,
    # fedavg-delta keeps it as stacked factors -> the same global model after one round.
    base = weights_of(tiny_llama())
    flora = run("flora", ranks=(2, 4), rounds=1)
    exact = run("fedavg-delta", ranks=(2, 4), rounds=1)
    w_flora, w_exact = weights_of(flora.model), weights_of(exact.model)
    for k in w_flora:
        assert torch.allclose(w_flora[k], w_exact[k], atol=1e-6), k
    delta = w_flora[f"{Q}.weight"] - base[f"{Q}.weight"]
    s = torch.linalg.svdvals(delta)
    assert s[6:].max() < 1e-5 * s[0]  # rank <= r_1 + r_2 = 6
    a, b = exact.global_factors[Q]
    assert a.shape == (6, 32) and b.shape == (32, 6)


def test_fedavg_global_update_carries_the_cross_terms():
    sent = {}

    def capture(rnd, k, update):
        sent[k] = update.factors[Q]

    base = weights_of(tiny_llama())
    hist = run("fedavg", ranks=(4, 4), rounds=1, update_hook=capture)
    a_bar, b_bar = hist.global_factors[Q]
    p = [hist[0]["weights"][0], hist[0]["weights"][1]]
    # clients started from the same (A0, 0): A_k = A0 + ΔA_k, B_k = ΔB_k (scale folded in)
    a0 = a_bar - sum(pk * sent[k][0] for k, pk in enumerate(p))
    As = [a0 + sent[k][0] for k in range(2)]
    Bs = [sent[k][1] for k in range(2)]
    exact = sum(pk * (b @ a) for pk, a, b in zip(p, As, Bs))
    got = hist.model.get_submodule(Q).weight - base[f"{Q}.weight"]
    assert torch.allclose(got, b_bar @ a_bar, atol=1e-6)
    assert torch.allclose(got - exact, cross_terms(As, Bs, p), atol=1e-6)
    assert (got - exact).abs().max() > 1e-6  # FedAvg of factors is not the average update


def test_fedavg_needs_equal_ranks():
    with pytest.raises(ConfigError, match="needs equal ranks.*'flora'"):
        run("fedavg", ranks=(2, 4))


def test_fedavg_delta_redistributes_at_each_clients_rank():
    hist = run("fedavg-delta", ranks=(2, 4), rounds=2)
    assert [r["accepted"] for r in hist] == [[0, 1], [0, 1]]
    assert hist[1]["bytes_down"] > 0 and all(r["delta_norm"] > 0 for r in hist)


def _bad_shape(rnd, k, update):
    if k == 1 and rnd == 0:
        a, b = update.factors[Q]
        update.factors[Q] = (a, torch.zeros(b.shape[0], b.shape[1] + 1))


def _nan(rnd, k, update):
    if k == 1 and rnd == 0:
        a, b = update.factors[Q]
        a = a.clone()
        a[0, 0] = float("nan")
        update.factors[Q] = (a, b)


def _missing(rnd, k, update):
    if k == 1 and rnd == 0:
        del update.factors[Q]


@pytest.mark.parametrize("hook, reason", [(_bad_shape, "shape"), (_nan, "non-finite"), (_missing, "missing")])
def test_bad_client_update_is_rejected_and_the_round_goes_on(hook, reason):
    hist = run("flora", ranks=(2, 4), rounds=2, update_hook=hook)
    r0 = hist[0]
    assert r0["accepted"] == [0] and r0["weights"] == {0: 1.0}
    assert len(r0["rejected"]) == 1 and r0["rejected"][0]["client"] == 1 and reason in r0["rejected"][0]["reason"]
    assert r0["delta_norm"] > 0 and hist[1]["accepted"] == [0, 1]
    assert all(torch.isfinite(v).all() for v in hist.model.state_dict().values())


def _sparse(idx, vals, shape=(2, 4)):
    return SparseUpdate(torch.tensor(idx), torch.tensor(vals), shape)


@pytest.mark.parametrize("da, db, full, reason", [
    (torch.zeros(3, 4), torch.zeros(3, 2), {}, "m A: shape (3, 4), expected (2, 4)"),
    (_sparse([9], [1.0]), torch.zeros(3, 2), {}, "out of range"),
    (_sparse([1, 1], [1.0, 2.0]), torch.zeros(3, 2), {}, "duplicate"),
    (_sparse([1.0], [1.0]), torch.zeros(3, 2), {}, "integers"),
    (_sparse([1], [1.0, 2.0]), torch.zeros(3, 2), {}, "malformed"),
    (torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 2), {}, "floating point"),
    (torch.zeros(2, 4), torch.full((3, 2), float("inf")), {}, "m B: non-finite"),
    (torch.zeros(2, 4), [[0.0] * 2] * 3, {}, "expected a tensor"),
    (torch.zeros(2, 4), torch.zeros(3, 2), {"head.weight": torch.zeros(2, 2)}, "modules_to_save"),
])
def test_validate_update(da, db, full, reason):
    shapes = {"m": (3, 4)}  # (d_out, d_in)
    assert validate_update(ClientUpdate(0, 2, {"m": (torch.zeros(2, 4), _sparse([0, 5], [1.0, 2.0], (3, 2)))}),
                           2, shapes, {}) is None
    problem = validate_update(ClientUpdate(0, 2, {"m": (da, db)}, full), 2, shapes, {})
    assert problem is not None and reason in problem
    assert "expected a ClientUpdate" in validate_update({"m": (da, db)}, 2, shapes, {})


def test_every_update_rejected_skips_the_round():
    def poison(rnd, k, update):
        return ClientUpdate(k, update.rank, {})

    hist = run("flora", rounds=1, update_hook=poison)
    assert hist[0]["skipped"] and hist[0]["accepted"] == []
    base, after = weights_of(tiny_llama()), weights_of(hist.model)
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_sparse_uploads_with_error_feedback():
    hist = run("flora", ranks=(2, 4), rounds=2, sparse=0.1)
    for r in hist:
        assert r["accepted"] == [0, 1]
        # 10% of entries at (fp32 value + uint32 index) = ~20% of the dense bytes
        assert 0.15 < r["bytes_up"] / r["bytes_up_dense"] < 0.25
    seen = []
    run("fedavg", ranks=(4, 4), rounds=1, sparse=0.1, update_hook=lambda rnd, k, u: seen.append(u))
    assert all(isinstance(t, SparseUpdate) for u in seen for pair in u.factors.values() for t in pair)


def test_same_seed_same_history_other_seed_differs():
    a, b, c = run(rounds=1, seed=3), run(rounds=1, seed=3), run(rounds=1, seed=4)
    wa, wb, wc = weights_of(a.model), weights_of(b.model), weights_of(c.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa[f"{Q}.weight"], wc[f"{Q}.weight"])
    assert a[0]["train_loss"] == b[0]["train_loss"]


def test_gpt2_conv1d_layers():
    hist = run_federation(tiny_gpt2, two_clients(), [1, 2], 1, local_steps=2, lr=1e-2)
    base = tiny_gpt2()
    delta = hist.model.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight  # (d_in, d_out)
    s = torch.linalg.svdvals(delta)
    assert s[0] > 0 and s[3:].max() < 1e-5 * s[0]


def test_bert_classifier_with_dirichlet_clients_and_a_trained_head():
    g = torch.Generator().manual_seed(0)
    n = 60
    labels = torch.randint(0, 3, (n,), generator=g)
    ids = torch.randint(1, 128, (n, 8), generator=g)
    ids[:, 1] = 100 + labels  # a learnable cue
    parts = dirichlet_split(labels, 3, alpha=0.5, seed=0, min_size=4)
    data = [[{"input_ids": ids[i], "labels": labels[i]} for i in part] for part in parts]
    evals = []

    def accuracy(model):
        with torch.no_grad():
            acc = (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()
        evals.append(acc)
        return {"accuracy": acc}

    hist = run_federation(tiny_bert, data, [2, 4, 8], 2, local_steps=4, lr=1e-2, modules_to_save=["classifier"],
                          eval_fn=accuracy)
    assert [r["accepted"] for r in hist] == [[0, 1, 2]] * 2
    assert hist[1]["eval"]["accuracy"] == evals[-1]
    assert hist[0]["weights"] == pytest.approx({k: len(p) / n for k, p in enumerate(parts)})
    base = tiny_bert()
    assert not torch.equal(hist.model.classifier.weight, base.classifier.weight)  # head averaged in
    assert not torch.equal(hist.model.bert.encoder.layer[0].attention.self.query.weight,
                           base.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("kw, msg", [
    ({"strategy": "fedprox"}, "strategy must be one of"),
    ({"sparse": 0.0}, r"sparse must be None or a fraction in \(0, 1\]"),
    ({"ranks": (2,)}, "1 ranks for 2 client datasets"),
    ({"ranks": (2, 0)}, "positive integers"),
    ({"rounds": 0}, "rounds must be a positive integer"),
    ({"lr": 0}, "lr must be > 0"),
    ({"lora_kwargs": {"r": 3}}, "not lora_kwargs"),
    ({"target": "embed_tokens"}, "linear layers only"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        run(**kw)


def test_empty_client_and_adapted_global_model_are_rejected():
    with pytest.raises(ConfigError, match="client 1 has no data"):
        run_federation(tiny_llama, [token_data(), []], [2, 2], 1)

    def adapted():
        import lorakit

        return lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2))

    with pytest.raises(ConfigError, match="already holds lorakit adapters"):
        run_federation(adapted, two_clients(), [2, 2], 1)


# -- dirichlet_split -------------------------------------------------------------------------------
def test_dirichlet_split_covers_every_sample_once_and_is_seeded():
    labels = [i % 5 for i in range(503)]
    parts = dirichlet_split(labels, 7, alpha=0.3, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(503)) and len(parts) == 7
    assert all(p == sorted(p) for p in parts)
    assert dirichlet_split(labels, 7, alpha=0.3, seed=1) == parts
    assert dirichlet_split(labels, 7, alpha=0.3, seed=2) != parts
    assert dirichlet_split(torch.tensor(labels), 7, alpha=0.3, seed=1) == parts


def test_dirichlet_alpha_controls_label_skew():
    labels = [i % 4 for i in range(4000)]

    def mean_top_class_share(alpha):
        shares = []
        for p in dirichlet_split(labels, 5, alpha=alpha, seed=0, min_size=1):
            counts = torch.bincount(torch.tensor([labels[i] for i in p]), minlength=4)
            shares.append(counts.max().item() / counts.sum().item())
        return sum(shares) / len(shares)

    assert mean_top_class_share(0.05) > 0.7  # mostly one class per client
    assert mean_top_class_share(1000.0) < 0.3  # nearly IID (1/4 each)


def test_dirichlet_min_size_and_errors():
    labels = [0] * 30 + [1] * 30
    assert min(len(p) for p in dirichlet_split(labels, 4, alpha=0.5, seed=0, min_size=5)) >= 5
    with pytest.raises(ConfigError, match="cannot give 4 clients 20 samples"):
        dirichlet_split(labels, 4, alpha=0.5, min_size=20)
    with pytest.raises(ConfigError, match="no Dirichlet"):
        dirichlet_split(labels, 4, alpha=0.01, seed=0, min_size=15, max_tries=3)
    with pytest.raises(ConfigError, match="alpha must be"):
        dirichlet_split(labels, 4, alpha=0)
    with pytest.raises(ConfigError, match="n_clients"):
        dirichlet_split(labels, 0, alpha=1.0)
    with pytest.raises(ConfigError, match="non-empty 1-D"):
        dirichlet_split([], 2, alpha=1.0)
