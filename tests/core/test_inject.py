import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers, find_targets
from lorakit.errors import AdapterError, ConfigError
from tests.conftest import logits_of, tiny_bert, tiny_gpt2, tiny_llama


def test_all_linear_skips_output_head_and_embeddings():
    m = tiny_llama()
    paths = find_targets(m, lorakit.LoraConfig())
    assert "lm_head" not in paths and not any("embed" in p for p in paths)
    assert len(paths) == 2 * 7  # q k v o gate up down per layer


def test_all_linear_skips_classifier_head():
    paths = find_targets(tiny_bert(), lorakit.LoraConfig())
    assert "classifier" not in paths and "bert.pooler.dense" in paths


@pytest.mark.parametrize(
    "target,count",
    [("q_proj", 2), (["q_proj", "v_proj"], 4), (r"model\.layers\.0\.self_attn\.(q|k)_proj", 2), ("embed_tokens", 1)],
)
def test_target_forms(target, count):
    assert len(find_targets(tiny_llama(), lorakit.LoraConfig(target=target))) == count


def test_unknown_target_lists_available_names():
    m = tiny_llama()
    with pytest.raises(ConfigError, match="matched no adaptable module.*q_proj"):
        lorakit.inject(m, lorakit.LoraConfig(target="nope_proj"))
    assert not adapted_layers(m)


def test_bad_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        find_targets(tiny_llama(), lorakit.LoraConfig(target="q_proj(["))


@pytest.mark.parametrize("name", ["../evil", "a/b", "a.b", "", "-x", "x" * 65, "a b"])
def test_unsafe_adapter_names_rejected(name):
    m = tiny_llama()
    with pytest.raises(ConfigError, match="invalid adapter name"):
        lorakit.inject(m, lorakit.LoraConfig(), name=name)
    assert not adapted_layers(m)


@pytest.mark.parametrize("kw,msg", [(dict(r=0), "r must be"), (dict(r=-2), "r must be"), (dict(r=2.5), "r must be"),
                                    (dict(dropout=1.0), "dropout"), (dict(alpha=0), "alpha"),
                                    (dict(init="orthogonal"), "init"), (dict(bias="all"), "bias"),
                                    (dict(target=[]), "target")])
def test_bad_config_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        lorakit.LoraConfig(**kw)


def test_unknown_config_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown LoraConfig key.*rank"):
        lorakit.LoraConfig.from_dict({"rank": 4})


def test_duplicate_name_rejected_model_untouched(tokens):
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(target="q_proj"))
    n_before = len(list(m.parameters()))
    with pytest.raises(AdapterError, match="already exists"):
        lorakit.inject(m, lorakit.LoraConfig(target="v_proj"))
    assert len(list(m.parameters())) == n_before


def test_only_adapter_params_require_grad():
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=2))
    trainable, total = lorakit.trainable_parameters(m)
    assert trainable == sum(2 * (l.base.in_features + l.base.out_features) for l in adapted_layers(m).values())
    assert trainable < total


def test_modules_to_save_trains_head():
    m = tiny_bert()
    lorakit.inject(m, lorakit.LoraConfig(target="query", modules_to_save=["classifier"]))
    assert m.classifier.weight.requires_grad and not m.bert.embeddings.word_embeddings.weight.requires_grad


def test_several_active_adapters_add(tokens):
    m = tiny_llama()
    base = logits_of(m, tokens)
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(m, lorakit.LoraConfig(r=2), name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in adapted_layers(m).values():
                layer.adapters[name].lora_B.weight.normal_(generator=g)
    lorakit.activate(m, ["a"])
    da = logits_of(m, tokens) - base
    lorakit.activate(m, ["b"])
    db = logits_of(m, tokens) - base
    lorakit.activate(m, ["a", "b"])
    both = logits_of(m, tokens)
    assert not torch.allclose(da, torch.zeros_like(da)) and not torch.allclose(da, db)
    # outputs add per layer; the network is non-linear so only check the first layer exactly
    layer = m.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    lorakit.activate(m, ["a", "b"])
    y_ab = layer(x)
    lorakit.activate(m, ["a"])
    y_a = layer(x)
    lorakit.activate(m, ["b"])
    y_b = layer(x)
    torch.testing.assert_close(y_ab, y_a + y_b - layer.base(x), rtol=0, atol=1e-5)
    assert both.shape == base.shape


def test_deactivate_delete_eject_restore_base(tokens):
    m = tiny_llama()
    base = logits_of(m, tokens)
    lorakit.inject(m, lorakit.LoraConfig(init="gaussian"), name="x")
    with torch.no_grad():
        for l in adapted_layers(m).values():
            l.adapters["x"].lora_B.weight.fill_(0.1)
    assert not torch.allclose(logits_of(m, tokens), base)
    lorakit.deactivate(m)
    torch.testing.assert_close(logits_of(m, tokens), base)
    with pytest.raises(AdapterError, match="unknown adapter 'y'"):
        lorakit.activate(m, ["y"])
    lorakit.activate(m, ["x"])
    lorakit.merge(m)
    with pytest.raises(AdapterError, match="merged"):
        lorakit.delete(m, "x")
    lorakit.eject(m)
    assert not adapted_layers(m) and lorakit.adapter_names(m) == []
    torch.testing.assert_close(logits_of(m, tokens), base, rtol=0, atol=1e-5)


def test_route_validates_ids(tokens):
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig())
    with pytest.raises(AdapterError, match="adapter_ids must lie"):
        with lorakit.route(m, [0, 1, 0]):
            pass
    with pytest.raises(ValueError, match="rows"):
        with lorakit.route(m, [0, 0]):
            m(tokens)
    assert all(l.route is None for l in adapted_layers(m).values())  # cleared after errors
    lorakit.merge(m)
    with pytest.raises(AdapterError, match="unmerge first"):
        with lorakit.route(m, [0, 0, -1]):
            m(tokens)


def test_route_works_through_generate():
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(init="gaussian"), name="a")
    with torch.no_grad():
        for l in adapted_layers(m).values():
            l.adapters["a"].lora_B.weight.normal_(std=0.5)
    prompt = torch.randint(1, 128, (1, 4))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        solo = m.generate(prompt, **kw)
        lorakit.deactivate(m)
        plain = m.generate(prompt, **kw)
        with lorakit.route(m, [0, -1], names=["a"]):
            both = m.generate(prompt.repeat(2, 1), **kw)
    assert torch.equal(both[0], solo[0]) and torch.equal(both[1], plain[0])


def test_gpt2_conv1d_merge_exact(tokens):
    m = tiny_gpt2()
    lorakit.inject(m, lorakit.LoraConfig(target="c_attn", init="gaussian"))
    with torch.no_grad():
        for l in adapted_layers(m).values():
            l.adapters["default"].lora_B.weight.normal_(std=0.1)
    out = logits_of(m, tokens)
    lorakit.merge(m)
    torch.testing.assert_close(logits_of(m, tokens), out, rtol=0, atol=1e-5)


def test_injected_adapters_follow_model_mode():
    m = tiny_llama()  # eval mode
    lorakit.inject(m, lorakit.LoraConfig(dropout=0.5))
    assert not any(mod.training for mod in m.modules())
    m.train()
    lorakit.inject(m, lorakit.LoraConfig(target="q_proj"), name="b")
    assert all(mod.training for mod in m.modules())
