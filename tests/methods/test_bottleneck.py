"""Sequential bottleneck adapters: AdapterHub placement (Pfeiffer after the FFN on the residual
stream / inside the post-LN LayerNorm, Houlsby after attention and FFN outputs), defaults,
parameter counts, init == base, and both variants through save/load and routing."""

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import ConfigError
from lorakit.methods.bottleneck import Bottleneck, BottleneckConfig, bottleneck_size
from tests.conftest import TINY_MODELS, logits_of, randomize, regression_losses, tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("kw,msg", [
    (dict(variant="parallel"), "variant must be one of"), (dict(reduction_factor=0), "reduction_factor"),
    (dict(reduction_factor=-2), "reduction_factor"), (dict(reduction_factor=True), "reduction_factor"),
    (dict(reduction_factor="16"), "reduction_factor"), (dict(non_linearity="softplus"), "non_linearity"),
    (dict(init="houlsby"), "init must be"), (dict(scaling=0), "scaling"), (dict(dropout=1.0), "dropout"),
    (dict(target=[]), "target"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        BottleneckConfig(**kw)


def test_defaults_follow_adapterhub_and_round_trip():
    seq, dbl = BottleneckConfig(), BottleneckConfig(variant="double_seq_bn")
    assert (seq.reduction_factor, seq.activation, seq.roles, seq.init) == (16, "relu", ("ffn_residual",), "zero")
    assert (dbl.activation, dbl.roles) == ("swish", ("attn_output", "ffn_output"))  # DoubleSeqBnConfig
    assert BottleneckConfig.from_dict(dbl.to_dict()) == dbl
    with pytest.raises(ConfigError, match="unknown BottleneckConfig key.*reduction"):
        BottleneckConfig.from_dict({"reduction": 8})
    assert bottleneck_size(32, 16) == 2 and bottleneck_size(768, 16) == 48 and bottleneck_size(8, 16) == 1


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
@pytest.mark.parametrize("variant,sites", [("seq_bn", 2), ("double_seq_bn", 4)])
@pytest.mark.parametrize("rf", [16, 4])
def test_parameter_count_is_2dm_plus_biases_per_site(kind, variant, sites, rf):
    model = TINY_MODELS[kind]()
    lorakit.inject(model, BottleneckConfig(variant=variant, reduction_factor=rf))
    d, m = 32, 32 // rf
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == sites * (2 * d * m + m + d)


def _f(adapter: Bottleneck, u, act=F.relu):
    """The adapter's function written out: s·(W_up φ(W_down u + b_down) + b_up)."""
    down, up = adapter.adapter_down, adapter.adapter_up
    return (act(u @ down.weight.T + down.bias) @ up.weight.T + up.bias) * adapter.scaling


def _run_capturing(model, tokens, module):
    """(input, output) of `module` in one forward; our test hook is registered after the site's,
    so it sees the adapter's final output."""
    seen = {}
    handle = module.register_forward_hook(lambda m, a, out: seen.update(inp=a, out=out))
    logits_of(model, tokens)
    handle.remove()
    return seen["inp"], seen["out"]


def _known_up(model, name="default", value=0.25):
    """Monkeypatch every up-projection to W_up = 0, b_up = value: the adapter adds exactly `value`."""
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            up = layer.adapters[name].adapter_up
            up.weight.zero_()
            up.bias.fill_(value)


def test_pfeiffer_on_post_ln_bert_adds_to_the_ffn_output_before_residual_and_layernorm(tokens):
    model = tiny_bert()
    lorakit.inject(model, BottleneckConfig())
    ln = model.bert.encoder.layer[0].output.LayerNorm
    _known_up(model, value=0.25)
    (s,), y = _run_capturing(model, tokens, ln)  # s = dropout(dense(x)) + x, the input of the LayerNorm
    with torch.no_grad():
        torch.testing.assert_close(y, ln.forward(s + 0.25), rtol=0, atol=1e-6)  # LN(g + f + x), f = 0.25
        assert not torch.allclose(y, ln.forward(s) + 0.25, atol=1e-3)  # not added after the LayerNorm
    randomize(model, std=0.2)
    (s,), y = _run_capturing(model, tokens, ln)
    adapter = adapted_layers(model)["bert.encoder.layer.0.output.LayerNorm.lorakit_ffn_residual"].adapters["default"]
    with torch.no_grad():  # AdapterHub: residual = FFN output, adapter input = LN(FFN output + x)
        torch.testing.assert_close(y, ln.forward(s + _f(adapter, ln.forward(s))), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make,block", [(tiny_llama, lambda m: m.model.layers[0]),
                                        (tiny_gpt2, lambda m: m.transformer.h[0])])
def test_pfeiffer_on_pre_ln_blocks_transforms_the_block_output(make, block, tokens):
    model = make()
    lorakit.inject(model, BottleneckConfig())
    lorakit.deactivate(model)
    _, z = _run_capturing(model, tokens, block(model))  # z = x + FFN(LN(x)), the base block output
    lorakit.activate(model, ["default"])
    _known_up(model, value=-0.5)
    _, y = _run_capturing(model, tokens, block(model))
    torch.testing.assert_close(y, z - 0.5, rtol=0, atol=1e-6)
    randomize(model, std=0.2)
    _, y = _run_capturing(model, tokens, block(model))
    path = next(p for p in adapted_layers(model) if ".0.lorakit_ffn_residual" in p)
    with torch.no_grad():  # AdapterHub with layer_norm=None: y = z + f(z)
        torch.testing.assert_close(y, z + _f(adapted_layers(model)[path].adapters["default"], z), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make,attn", [
    (tiny_llama, lambda m: m.model.layers[0].self_attn),
    (tiny_gpt2, lambda m: m.transformer.h[0].attn),
    (tiny_bert, lambda m: m.bert.encoder.layer[0].attention.output.dropout),
])
def test_houlsby_adds_to_the_attention_output_before_the_residual(make, attn, tokens):
    model = make()
    lorakit.inject(model, BottleneckConfig(variant="double_seq_bn"))
    randomize(model, std=0.2)
    lorakit.deactivate(model)
    _, g = _run_capturing(model, tokens, attn(model))  # block 0's attention sees unchanged embeddings
    lorakit.activate(model, ["default"])
    _, y = _run_capturing(model, tokens, attn(model))
    g, y = (g[0], y[0]) if isinstance(g, tuple) else (g, y)
    path = next(p for p in adapted_layers(model) if ".0." in p and p.endswith("lorakit_attn_output"))
    with torch.no_grad():  # g <- g + f(g), swish by default
        torch.testing.assert_close(y, g + _f(adapted_layers(model)[path].adapters["default"], g, F.silu),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_double_seq_bn_starts_at_base_round_trips_and_routes(kind, tokens, tmp_path):
    cfg = dict(variant="double_seq_bn", non_linearity="gelu", reduction_factor=8)
    model = TINY_MODELS[kind](0)
    ref = logits_of(model, tokens)
    lorakit.inject(model, BottleneckConfig(**cfg), name="a")
    torch.testing.assert_close(logits_of(model, tokens), ref, rtol=0, atol=1e-6)
    lorakit.inject(model, BottleneckConfig(**cfg), name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    lorakit.activate(model, ["a"])
    out_a = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "a", name="a")
    fresh = TINY_MODELS[kind](0)
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, tokens), out_a, rtol=0, atol=1e-6)
    lorakit.activate(model, ["b"])
    out_b = logits_of(model, tokens)
    with lorakit.route(model, [1, -1, 0], names=["a", "b"]):
        routed = logits_of(model, tokens)
    for row, want in enumerate([out_b, ref, out_a]):
        torch.testing.assert_close(routed[row], want[row], rtol=0, atol=1e-5)


def test_bert_init_starts_near_not_at_the_base_and_scaling_multiplies(tokens):
    base = tiny_llama()
    ref = logits_of(base, tokens)
    lorakit.inject(base, BottleneckConfig(init="bert"))
    near = logits_of(base, tokens)
    assert not torch.equal(near, ref) and torch.allclose(near, ref, atol=0.05)
    one, two = tiny_llama(), tiny_llama()
    lorakit.inject(one, BottleneckConfig())
    lorakit.inject(two, BottleneckConfig(scaling=2.0))
    randomize(one, seed=3)
    randomize(two, seed=3)
    a1 = next(iter(adapted_layers(one).values())).adapters["default"]
    a2 = next(iter(adapted_layers(two).values())).adapters["default"]
    u = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(a2.delta(u, u), 2 * a1.delta(u, u))


def test_bottleneck_adapters_train():
    model = tiny_llama()
    lorakit.inject(model, BottleneckConfig(reduction_factor=4))
    ids = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = regression_losses(model, ids, lr=3e-2, steps=15)
    assert losses[-1] < 0.97 * losses[0]  # LoRA r=8 reaches about the same (0.954 of the start) here


def test_delta_weight_refuses():
    model = tiny_gpt2()
    lorakit.inject(model, BottleneckConfig())
    adapter = next(iter(adapted_layers(model).values())).adapters["default"]
    with pytest.raises(ConfigError, match="nonlinear"):
        adapter.delta_weight()
