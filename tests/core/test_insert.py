"""The "insert" injection point: sites found per architecture, driven by forward hooks, with the
same lifecycle as wrapped layers (activate, route, delete, eject, save/load) and clear refusals
where a nonlinear inserted module cannot follow (merge, PEFT export)."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapted_layers, find_sites
from lorakit.core.io import export_peft
from lorakit.core.layer import InsertSite
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.bottleneck import BottleneckConfig
from lorakit.methods.invertible import SeqBnInvConfig
from tests.conftest import TINY_MODELS, logits_of, randomize, tiny_bert, tiny_gpt2, tiny_llama

ROLES = ("attn_output", "ffn_output", "ffn_residual", "embed")
EXPECTED = {  # role -> (hooked module of block 0 / embeddings, hook mode); + the LM head for "embed"
    "llama": {"attn_output": ("model.layers.0.self_attn", "output"), "ffn_output": ("model.layers.0.mlp", "output"),
              "ffn_residual": ("model.layers.0", "output"), "embed": ("model.embed_tokens", "output")},
    "gpt2": {"attn_output": ("transformer.h.0.attn", "output"), "ffn_output": ("transformer.h.0.mlp", "output"),
             "ffn_residual": ("transformer.h.0", "output"), "embed": ("transformer.drop", "output")},
    "bert": {"attn_output": ("bert.encoder.layer.0.attention.output.dropout", "output"),
             "ffn_output": ("bert.encoder.layer.0.output.dropout", "output"),
             "ffn_residual": ("bert.encoder.layer.0.output.LayerNorm", "norm"), "embed": ("bert.embeddings", "output")},
}


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_sites_resolve_per_architecture(kind):
    model = TINY_MODELS[kind]()
    sites = find_sites(model, ROLES)
    assert len(sites) == 2 * 3 + 1  # three block roles in two blocks + the embeddings
    for role, (path, mode) in EXPECTED[kind].items():
        site = sites[f"{path}.lorakit_{role}"]
        assert (site.hooks[0].path, site.hooks[0].mode, site.features) == (path, mode, 32)
    embed = sites[f"{EXPECTED[kind]['embed'][0]}.lorakit_embed"]
    if kind == "bert":  # sequence classification: no output embeddings, forward coupling only
        assert len(embed.hooks) == 1
    else:  # the LM head's input gets the paired call
        assert [(h.path, h.mode, h.call) for h in embed.hooks[1:]] == [("lm_head", "input", "delta_head")]


@pytest.mark.parametrize("target,blocks", [("all", [0, 1]), (["layers.1"], [1]), (r"model\.layers\.0", [0])])
def test_target_selects_blocks_and_embed_is_always_placed(target, blocks):
    sites = find_sites(tiny_llama(), ("ffn_residual", "embed"), target)
    assert sorted(sites) == sorted([f"model.layers.{i}.lorakit_ffn_residual" for i in blocks]
                                   + ["model.embed_tokens.lorakit_embed"])


def test_bad_roles_targets_and_unknown_architectures_are_config_errors():
    with pytest.raises(ConfigError, match="insert roles"):
        find_sites(tiny_llama(), ("after_everything",))
    with pytest.raises(ConfigError, match="matched no transformer block.*model.layers.0"):
        lorakit.inject(tiny_llama(), BottleneckConfig(target="layers.7"))
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="cannot place inserted adapters in Sequential.*Llama family"):
        lorakit.inject(plain, BottleneckConfig())
    assert not adapted_layers(plain) and lorakit.adapter_names(plain) == []


def test_no_module_is_replaced_and_lora_still_targets_inside_hooked_blocks(tokens):
    model = tiny_llama()
    names_before = {n for n, _ in model.named_parameters()}
    lorakit.inject(model, BottleneckConfig(variant="double_seq_bn"), name="bn")
    names_after = {n for n, _ in model.named_parameters()}
    assert names_before <= names_after  # every original parameter keeps its path
    assert all(".lorakit_" in n for n in names_after - names_before)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target=["up_proj", "o_proj"]), name="lo")  # inside hooked modules
    assert {p for p, l in adapted_layers(model).items() if not isinstance(l, InsertSite)} == {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.up_proj", "self_attn.o_proj")}
    randomize(model, "bn", seed=1)
    randomize(model, "lo", seed=2)
    outs = {}
    for active in (["bn"], ["lo"], ["bn", "lo"]):
        lorakit.activate(model, active)
        outs[tuple(active)] = logits_of(model, tokens)
    assert not torch.allclose(outs[("bn", "lo")], outs[("bn",)]) and not torch.allclose(outs[("bn", "lo")], outs[("lo",)])


def _capture_output(module):
    seen = {}
    handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    return seen, handle


def test_several_active_insert_adapters_apply_one_after_the_other(tokens):
    model = tiny_llama()
    lorakit.inject(model, BottleneckConfig(target="layers.0"), name="a")
    lorakit.inject(model, BottleneckConfig(target="layers.0"), name="b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    seen, handle = _capture_output(model.model.layers[0])  # registered last: sees the final output
    lorakit.deactivate(model)
    logits_of(model, tokens)
    z = seen["out"]
    lorakit.activate(model, ["a", "b"])
    logits_of(model, tokens)
    handle.remove()
    holder = adapted_layers(model)["model.layers.0.lorakit_ffn_residual"]
    with torch.no_grad():
        z1 = z + holder.adapters["a"].delta(z, z)
        expected = z1 + holder.adapters["b"].delta(z1, z1)
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=1e-6)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("remove", ["delete", "eject"])
def test_delete_and_eject_remove_holders_and_hooks(remove, tokens):
    model = tiny_gpt2()
    ref = logits_of(model, tokens)
    hooks0, params0 = _hook_count(model), {n for n, _ in model.named_parameters()}
    lorakit.inject(model, SeqBnInvConfig(variant="double_seq_bn"), name="x")
    randomize(model, "x")
    assert _hook_count(model) == hooks0 + 6  # embed forward + head inverse + 2 per block
    assert not torch.allclose(logits_of(model, tokens), ref)
    lorakit.delete(model, "x") if remove == "delete" else lorakit.eject(model)
    assert _hook_count(model) == hooks0 and not adapted_layers(model)
    assert {n for n, _ in model.named_parameters()} == params0
    torch.testing.assert_close(logits_of(model, tokens), ref, rtol=0, atol=0)


def test_deactivate_gives_the_base_and_activate_restores(tokens):
    model = tiny_bert()
    ref = logits_of(model, tokens)
    lorakit.inject(model, BottleneckConfig())
    randomize(model)
    adapted = logits_of(model, tokens)
    lorakit.deactivate(model)
    torch.testing.assert_close(logits_of(model, tokens), ref, rtol=0, atol=0)
    lorakit.activate(model, ["default"])
    torch.testing.assert_close(logits_of(model, tokens), adapted, rtol=0, atol=0)


def test_sites_follow_a_layer_that_lora_wraps_and_unwraps(tokens):
    """An invertible adapter hooks embed_tokens and lm_head; a LoRA then wraps both. The
    coupling must see the LoRA-adapted embeddings / head input, and its holder keep its path."""
    model = tiny_llama()
    lorakit.inject(model, SeqBnInvConfig(), name="inv")
    randomize(model, "inv", seed=1)
    only_inv = logits_of(model, tokens)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target=["embed_tokens", "lm_head"]), name="lo")
    randomize(model, "lo", seed=2)
    layers = adapted_layers(model)
    assert "model.embed_tokens.lorakit_embed" in layers  # same path (and saved keys) as before
    emb = model.model.embed_tokens
    assert not emb.base._forward_hooks and len(emb._forward_hooks) == 1  # the hook moved to the wrapper
    seen = {}
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("h0", a[0]))
    logits_of(model, tokens)
    handle.remove()
    coupling = layers["model.embed_tokens.lorakit_embed"].adapters["inv"].inv
    with torch.no_grad():  # coupling(base embedding + LoRA delta), not coupling(base) + delta
        expected = coupling(emb.base(tokens) + emb.adapters["lo"].delta(tokens, None))
    torch.testing.assert_close(seen["h0"], expected, rtol=0, atol=1e-6)
    lorakit.delete(model, "lo")
    assert isinstance(model.model.embed_tokens, nn.Embedding) and len(model.model.embed_tokens._forward_hooks) == 1
    assert isinstance(model.lm_head, nn.Linear) and len(model.lm_head._forward_pre_hooks) == 1
    torch.testing.assert_close(logits_of(model, tokens), only_inv, rtol=0, atol=0)


def test_merge_refuses_inserts_up_front_and_merges_linear_adapters_alone(tokens):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2), name="lo")
    lorakit.inject(model, BottleneckConfig(), name="bn")
    randomize(model, "lo", seed=1)
    randomize(model, "bn", seed=2)
    out = logits_of(model, tokens)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterError, match="'bn' \\(method 'bottleneck'\\) inserts nonlinear modules"):
        lorakit.merge(model, ["lo", "bn"])
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # LoRA not half merged
    assert not any(layer.merged for layer in adapted_layers(model).values())
    lorakit.merge(model, ["lo"])  # the linear one alone merges; the bottleneck keeps running from hooks
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=1e-5)


def test_export_peft_refuses_inserted_adapters(tmp_path):
    model = tiny_gpt2()
    lorakit.inject(model, BottleneckConfig())
    with pytest.raises(ConfigError, match="inserts new nonlinear modules.*lorakit.save"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_save_load_keys_use_site_paths_and_load_checks_them(tmp_path, tokens):
    model = tiny_llama()
    lorakit.inject(model, BottleneckConfig(target="layers.1"))
    randomize(model)
    out = logits_of(model, tokens)
    lorakit.save(model, tmp_path / "a")
    tensors = lorakit.core.io.read_tensors(tmp_path / "a")
    assert sorted(tensors) == [f"base_model.model.model.layers.1.lorakit_ffn_residual.adapter_{w}"
                               for w in ("down.bias", "down.weight", "up.bias", "up.weight")]
    fresh = tiny_llama()
    lorakit.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits_of(fresh, tokens), out, rtol=0, atol=0)
    other = tiny_llama()
    lorakit.inject(other, BottleneckConfig(target="layers.0"), name="default")  # name taken: nothing changes
    with pytest.raises(AdapterError, match="already exists"):
        lorakit.load(other, tmp_path / "a")


def test_deepcopy_keeps_independent_working_adapters(tokens):
    model = tiny_gpt2()
    lorakit.inject(model, SeqBnInvConfig())
    randomize(model)
    out = logits_of(model, tokens)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits_of(twin, tokens), out, rtol=0, atol=0)
    randomize(twin, seed=5)
    assert not torch.allclose(logits_of(twin, tokens), out)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=0)  # the original is untouched
    lorakit.eject(twin)
    torch.testing.assert_close(logits_of(model, tokens), out, rtol=0, atol=0)


def test_insert_sites_are_not_lora_targets_and_carry_no_weight():
    model = tiny_llama()
    lorakit.inject(model, SeqBnInvConfig())
    paths = lorakit.core.inject.find_targets(model, lorakit.LoraConfig())
    assert paths and not any("lorakit_" in p for p in paths)  # adapter internals are never targets
    holder = adapted_layers(model)["model.layers.0.lorakit_ffn_residual"]
    spec = holder.spec("x")
    assert (spec.kind, spec.role, spec.in_features) == ("insert", "ffn_residual", 32)
    with pytest.raises(AdapterError, match="no base weight"):
        spec.weight()
    with pytest.raises(TypeError, match="forward hooks"):
        holder(torch.zeros(1))


def test_dtype_moves_reach_inserted_adapters(tokens):
    model = tiny_llama()
    lorakit.inject(model, SeqBnInvConfig())
    randomize(model)
    out = logits_of(model, tokens)
    model.double()  # nn.Module._apply must reach the holders (and not clash with their own methods)
    assert all(p.dtype == torch.float64 for layer in adapted_layers(model).values() for p in layer.parameters())
    torch.testing.assert_close(logits_of(model, tokens).float(), out, rtol=0, atol=1e-5)
