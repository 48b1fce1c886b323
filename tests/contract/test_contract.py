"""The contract every registered method must pass, driven by the registry.

A new method file gets these tests by registering; methods may set a class attribute
`test_config = {...}` with kwargs that make the method fit the tiny test models.
"""

import pytest
import torch

import lorakit
from lorakit.core.registry import list_methods
from lorakit.errors import AdapterError
from tests.conftest import TINY_MODELS, logits_of, perturb

METHODS = [m.name for m in list_methods()]
CASES = [(m, k) for m in METHODS for k in sorted(TINY_MODELS)]


def make_config(method: str, **over):
    spec = lorakit.get_method(method)
    kw = dict(getattr(spec.adapter_cls, "test_config", {}))
    kw.update(over)
    return spec.config_cls(**kw)


def build(method, kind, seed=0, name="default", **over):
    model = TINY_MODELS[kind](seed)
    lorakit.inject(model, make_config(method, **over), name=name)
    return model


@pytest.mark.parametrize("method,kind", CASES)
def test_zero_init_equals_base(method, kind, tokens):
    spec = lorakit.get_method(method)
    if not spec.adapter_cls.zero_init:
        pytest.skip(f"{method} does not start at the base model by design")
    base = TINY_MODELS[kind](0)
    ref = logits_of(base, tokens)
    lorakit.inject(base, make_config(method))
    torch.testing.assert_close(logits_of(base, tokens), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,kind", CASES)
def test_save_load_round_trip(method, kind, tokens, tmp_path):
    model = build(method, kind)
    perturb(model)
    out = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "a")
    fresh = TINY_MODELS[kind](0)
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(method, kind, tokens):
    model = build(method, kind)
    perturb(model)
    cls = lorakit.get_method(method).adapter_cls
    if "insert" in cls.supports or getattr(cls, "mergeable", True) is False:
        # inserted nonlinear modules / input-dependent updates have no ΔW: merge refuses, model unchanged
        every = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = logits_of(model, tokens)
        with pytest.raises(AdapterError, match="cannot be merged into the base weights"):
            lorakit.merge(model)
        assert all(torch.equal(p, every[n]) for n, p in model.named_parameters())
        torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=0)
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    out = logits_of(model, tokens)
    lorakit.merge(model)
    lorakit.merge(model)  # idempotent
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.unmerge(model)  # idempotent
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,kind", CASES)
def test_per_row_routing_equals_separate_runs(method, kind, tokens):
    model = build(method, kind, name="a")
    lorakit.inject(model, make_config(method), name="b")
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    expected = []
    for name in ("a", "b", None):
        if name:
            lorakit.activate(model, [name])
        else:
            lorakit.deactivate(model)
        expected.append(logits_of(model, tokens))
    ids = torch.tensor([1, -1, 0])  # row 0 -> b, row 1 -> base, row 2 -> a
    with lorakit.route(model, ids, names=["a", "b"]):
        routed = logits_of(model, tokens)
    for row, which in enumerate([1, 2, 0]):
        torch.testing.assert_close(routed[row], expected[which][row], rtol=0, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])  # the two adapters really differ


@pytest.mark.parametrize("method,kind", CASES)
def test_only_adapter_params_train_and_grads_flow(method, kind, tokens):
    model = build(method, kind)
    perturb(model)  # zero-init B would make A's gradient exactly zero
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable), sorted(trainable)[:5]
    out = model(input_ids=tokens).logits
    out.float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}"
        else:
            assert p.grad is None, f"frozen parameter {n} got a gradient"
