"""Tensors shared across the layers of one adapter (`lorakit.core.shared`), exercised through
S2-LoRA: one pool per injection, stored once in files, sharing restored on load, checkpoint
resume, serving conversion and PEFT export of a shared adapter."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.core.inject import adapter_names
from lorakit.core.io import WEIGHTS_NAME, adapter_tensors, export_peft, load_weights
from lorakit.core.shared import SharedParameters, set_shared, share_parameter, shared_names
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.methods.s2lora import S2LoraConfig, s2lora_modules
from tests.conftest import logits_of, perturb, tiny_gpt2, tiny_llama

SHARED_KEY = "base_model.model.lorakit_shared.32x32.lora_A"


def test_pool_hands_out_one_parameter_per_key():
    pool, calls = SharedParameters(), []

    def make():
        calls.append(1)
        return torch.ones(2, 3)

    a, b = nn.Module(), nn.Module()
    pa = share_parameter(a, "w", pool, "g.w", make)
    pb = share_parameter(b, "w", pool, "g.w", make)
    assert pa is pb is a.w is b.w and len(calls) == 1 and len(pool) == 1 and "g.w" in pool
    assert shared_names(a) == {"w": "g.w"} and "w" in dict(a.named_parameters())
    assert shared_names(nn.Linear(2, 2)) == {}
    private = nn.Module()  # no pool: own tensor, still recorded under its key (files load into it)
    share_parameter(private, "w", None, "g.w", make)
    assert private.w is not pa and shared_names(private) == {"w": "g.w"}
    new = nn.Parameter(torch.zeros(1, 3))
    set_shared([a, b], "w", new)
    assert a.w is new and b.w is new
    with pytest.raises(ValueError, match="not a shared parameter"):
        set_shared([nn.Linear(2, 2)], "weight", new)
    for bad in ("", "a..b", "a/b", ".a", "a b", 3):
        with pytest.raises(ConfigError, match="invalid shared-parameter key"):
            pool.get(bad, make)


def shared_model(factory=tiny_llama, seed=0, **kw):
    model = factory()
    lorakit.inject(model, S2LoraConfig(r=4, **kw))
    perturb(model, seed=seed, scale=0.2)
    return model


def test_file_stores_each_shared_tensor_once(tmp_path):
    model = shared_model()
    tensors = adapter_tensors(model, "default")
    assert SHARED_KEY in tensors
    assert not any(k.endswith(".lora_A") and "lorakit_shared" not in k for k in tensors)
    n_shared = sum(".lorakit_shared." in k for k in tensors)
    assert n_shared == 2 * len({m.group for m in s2lora_modules(model).values()})
    stored = sum(t.numel() for t in tensors.values())
    assert stored == lorakit.trainable_parameters(model)[0]


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t.pop(SHARED_KEY), "missing shared tensor base_model.model.lorakit_shared.32x32.lora_A"),
    (lambda t: t.update({"base_model.model.lorakit_shared.7x7.lora_A": torch.ones(1)}),
     "unexpected shared tensor 'base_model.model.lorakit_shared.7x7.lora_A'"),
    (lambda t: t.update({SHARED_KEY: torch.ones(3, 32)}), r"has shape \(3, 32\), expected \(4, 32\)"),
    (lambda t: t.update({SHARED_KEY: torch.full((4, 32), float("nan"))}), "contains NaN or inf"),
])
def test_bad_shared_entries_are_refused_and_leave_the_model_untouched(tmp_path, tokens, edit, msg):
    path = lorakit.save(shared_model(), tmp_path / "a")
    tensors = load_file(str(path / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))
    fresh = tiny_llama()
    ref = logits_of(fresh, tokens)
    with pytest.raises(AdapterFileError, match=msg):
        lorakit.load(fresh, path)
    assert adapter_names(fresh) == [] and torch.equal(logits_of(fresh, tokens), ref)


def test_load_weights_resumes_into_the_shared_tensors(tmp_path, tokens):
    trained = shared_model(tiny_gpt2, seed=4)
    path = lorakit.save(trained, tmp_path / "ckpt")
    model = tiny_gpt2()
    lorakit.inject(model, S2LoraConfig(r=4))
    before = {id(p) for p in model.parameters()}
    load_weights(model, path)
    assert {id(p) for p in model.parameters()} == before  # filled in place: optimizer references stay valid
    torch.testing.assert_close(logits_of(model, tokens), logits_of(trained, tokens), rtol=0, atol=0)
    mods = list(s2lora_modules(model).values())
    assert all(m.lora_B is mods[0].lora_B for m in mods if m.group == mods[0].group)


def test_save_refuses_layers_whose_shared_tensor_diverged():
    model = shared_model()
    m = s2lora_modules(model)["model.layers.1.self_attn.q_proj"]
    m.lora_A = nn.Parameter(m.lora_A.detach() + 1.0)  # split off by hand, still recorded as shared
    with pytest.raises(AdapterError, match="shared tensor '32x32.lora_A' differs between"):
        adapter_tensors(model, "default")


def test_serving_pool_converts_a_shared_adapter_layer_by_layer(tmp_path):
    from lorakit.serve.cache import AdapterPool

    model = shared_model()
    lorakit.save(model, tmp_path / "s2")
    got = AdapterPool(tmp_path, model=tiny_llama()).get("s2")
    assert got.method == "s2lora"
    for p, m in s2lora_modules(model).items():
        a, b = got.factors[p]
        torch.testing.assert_close(b @ a, m.delta_weight(), rtol=1e-5, atol=1e-6)


def test_peft_export_of_a_shared_adapter_loads_in_peft(tmp_path, tokens):
    peft = pytest.importorskip("peft")
    model = shared_model()
    export_peft(model, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p")).eval()
    torch.testing.assert_close(logits_of(pm, tokens), logits_of(model, tokens), rtol=0, atol=1e-5)


def test_delete_drops_the_shared_tensors():
    model = shared_model()
    n_base = sum(p.numel() for p in tiny_llama().parameters())
    lorakit.delete(model, "default")
    assert sum(p.numel() for p in model.parameters()) == n_base
