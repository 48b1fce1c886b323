"""Invertible bottleneck (seq_bn_inv): the NICE coupling is exactly invertible, starts as the
identity, sits on the embedding output with its inverse on the LM head's input, and the
parameter count is the coupling's plus the bottlenecks'."""

import pytest
import torch

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import ConfigError
from lorakit.methods.invertible import NiceCoupling, SeqBnInvConfig
from tests.conftest import TINY_MODELS, logits_of, randomize, tiny_bert, tiny_gpt2, tiny_llama


def _random_coupling(d, rf=2.0, act="relu", seed=0):
    torch.manual_seed(seed)
    c = NiceCoupling(d, rf, act, "zero")
    with torch.no_grad():
        for p in c.parameters():
            p.normal_(0, 0.2)
    return c


@pytest.mark.parametrize("d,act", [(32, "relu"), (33, "swish"), (8, "tanh")])
def test_coupling_is_exactly_invertible(d, act):
    c = _random_coupling(d, act=act)
    x = torch.randn(4, 7, d)
    with torch.no_grad():
        y = c(x)
        assert (y - x).abs().max() > 0.1  # a real transformation
        torch.testing.assert_close(c.inverse(y), x, rtol=0, atol=1e-6)
        torch.testing.assert_close(c(c.inverse(x)), x, rtol=0, atol=1e-6)


def test_zero_init_is_the_identity_and_bert_init_is_not():
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert torch.equal(NiceCoupling(32, 2, "relu", "zero")(x), x)
        torch.manual_seed(0)
        c = NiceCoupling(32, 2, "relu", "bert")  # AdapterHub's init: N(0, 0.02)
        y = c(x)
        assert not torch.equal(y, x)
        torch.testing.assert_close(c.inverse(y), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_init_equals_base(kind, tokens):
    model = TINY_MODELS[kind]()
    ref = logits_of(model, tokens)
    lorakit.inject(model, SeqBnInvConfig())
    torch.testing.assert_close(logits_of(model, tokens), ref, rtol=0, atol=0)


def _nice_params(d, rf):
    d1, d2 = d // 2, d - d // 2
    m2, m1 = int(d2 // rf), int(d1 // rf)
    return (d2 * m2 + m2 + m2 * d1 + d1) + (d1 * m1 + m1 + m1 * d2 + d2)  # F + G


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
@pytest.mark.parametrize("variant,sites", [("seq_bn", 2), ("double_seq_bn", 4)])
def test_parameter_count_is_coupling_plus_bottlenecks(kind, variant, sites):
    model = TINY_MODELS[kind]()
    lorakit.inject(model, SeqBnInvConfig(variant=variant, inv_reduction_factor=4))
    d, m = 32, 2
    trainable, _ = lorakit.trainable_parameters(model)
    assert _nice_params(32, 4) == 2 * (16 * 4 + 4 + 4 * 16 + 16)
    assert trainable == _nice_params(d, 4) + sites * (2 * d * m + m + d)


@pytest.mark.parametrize("make,embed_out,head_in", [
    (tiny_llama, lambda m: m.model.embed_tokens, lambda m: m.model.norm),
    (tiny_gpt2, lambda m: m.transformer.drop, lambda m: m.transformer.ln_f),
])
def test_coupling_on_embeddings_and_its_inverse_before_the_lm_head(make, embed_out, head_in, tokens):
    model = make()
    lorakit.inject(model, SeqBnInvConfig())
    randomize(model, std=0.2)
    seen = {}
    hooks = [model.lm_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head_in", a[0])),
             head_in(model).register_forward_hook(lambda m, a, out: seen.__setitem__("final", out)),
             embed_out(model).register_forward_hook(lambda m, a, out: seen.__setitem__("embedded", out))]
    lorakit.deactivate(model)
    logits_of(model, tokens)
    e = seen["embedded"]  # the plain embedding output
    lorakit.activate(model, ["default"])
    logits_of(model, tokens)
    for h in hooks:
        h.remove()
    coupling = next(layer for p, layer in adapted_layers(model).items() if p.endswith("lorakit_embed")).adapters["default"].inv
    with torch.no_grad():
        torch.testing.assert_close(seen["embedded"], coupling(e), rtol=0, atol=1e-6)
        torch.testing.assert_close(seen["head_in"], coupling.inverse(seen["final"]), rtol=0, atol=1e-6)


def test_without_an_lm_head_only_the_forward_coupling_runs(tokens):
    model = tiny_bert()  # BertForSequenceClassification: get_output_embeddings() is None
    lorakit.inject(model, SeqBnInvConfig())
    holder = adapted_layers(model)["bert.embeddings.lorakit_embed"]
    assert [h.path for h in holder.site.hooks] == ["bert.embeddings"]
    randomize(model, std=0.2)
    seen = {}
    handle = model.bert.embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__("e", out))
    lorakit.deactivate(model)
    logits_of(model, tokens)
    plain = seen["e"]
    lorakit.activate(model, ["default"])
    logits_of(model, tokens)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen["e"], holder.adapters["default"].inv(plain), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [(dict(inv_reduction_factor=0), "inv_reduction_factor"),
                                    (dict(inv_reduction_factor=True), "inv_reduction_factor"),
                                    (dict(variant="houlsby"), "variant")])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SeqBnInvConfig(**kw)


def test_a_coupling_without_hidden_units_is_refused_and_the_model_untouched():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="leaves no hidden unit"):
        lorakit.inject(model, SeqBnInvConfig(inv_reduction_factor=32))
    assert not adapted_layers(model) and lorakit.adapter_names(model) == []


def test_roles_and_round_trip():
    cfg = SeqBnInvConfig(variant="double_seq_bn", inv_reduction_factor=4)
    from lorakit.methods.invertible import SeqBnInv

    assert SeqBnInv.insert_roles(cfg) == ("embed", "attn_output", "ffn_output")
    assert SeqBnInvConfig.from_dict(cfg.to_dict()) == cfg


def test_trains_saves_and_loads_through_lorakit_train(tiny_model_dir, text_file, tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    from lorakit.train import TrainConfig, train

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"),
                      method="seq_bn_inv", block_size=16, batch_size=2, max_steps=3, lr=1e-2,
                      warmup_steps=0, save_steps=3, logging_steps=1, progress=False, seed=0)
    res = train(cfg, adapter={"reduction_factor": 4})
    res.model.eval()
    trained = logits_of(res.model, tokens)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base = logits_of(fresh, tokens)
    assert not torch.allclose(trained, base)  # the adapters moved away from the zero init
    lorakit.load(fresh, res.adapter_dir)
    torch.testing.assert_close(logits_of(fresh, tokens), trained, rtol=0, atol=1e-5)
