"""LoRAM (train small, infer large) and the structured-pruning primitive it shares with LoRAPrune."""

import copy

import pytest
import torch

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.methods.hydra import HydraConfig
from lorakit.methods.lora import LoraConfig
from lorakit.prune import (
    LoramConfig,
    PrunedModelFileError,
    StructuredPruning,
    load_pruned,
    loram_plan,
    loram_prune,
    prune_structured,
    recover,
    save_pruned,
)
from lorakit.prune.loram import n_removed
from tests.conftest import logits_of, regression_losses, tiny_llama, token_data

IDS = token_data(n=3, t=9, seed=3)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tied_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def zero_pruned_units(model, pruning):
    """Hooks that zero the pruned heads' outputs (o_proj input) and pruned MLP channels
    (down_proj input) in a full-size model: the function a pruned model must compute."""
    hooks, hd = [], pruning.head_dim
    for i, layer in enumerate(model.model.layers):
        mh = torch.zeros(pruning.num_heads * hd)
        for h in pruning.kept_heads(i):
            mh[h * hd:(h + 1) * hd] = 1
        mc = torch.zeros(pruning.intermediate_size)
        mc[pruning.kept_channels(i)] = 1
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, mh=mh: (a[0] * mh,)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, mc=mc: (a[0] * mc,)))
    return hooks


# -- the structured primitive ---------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("per_head", [False, True])
def test_pruned_model_equals_full_model_with_units_zeroed(attn, per_head):
    full = tied_llama()
    full.config._attn_implementation = attn
    geo = StructuredPruning.for_model(full)
    assert (geo.num_heads, geo.num_kv_heads, geo.group_size, geo.head_dim, geo.intermediate_size) == (6, 2, 3, 8, 40)
    if per_head:  # layer 0 keeps 2 of 3 query heads in each KV group (G' = 2); layer 2 keeps 2 heads of group 1
        pruning = StructuredPruning.from_dict(
            {**geo.to_dict(), "heads": {"0": [0, 2, 4, 5], "2": [4, 5]}, "channels": {"1": list(range(0, 40, 3))}})
    else:
        pruning = StructuredPruning.from_groups(geo, {0: [1], 2: [0]}, {0: [1, 5, 7], 1: list(range(20))})
    ref = copy.deepcopy(full)
    hooks = zero_pruned_units(ref, pruning)
    want = logits_of(ref, IDS)
    for h in hooks:
        h.remove()
    small = copy.deepcopy(full)
    kept = prune_structured(small, pruning)
    torch.testing.assert_close(logits_of(small, IDS), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, logits_of(full, IDS), atol=1e-3)  # pruning did change the function
    for path, k in kept.items():  # shapes follow the kept-index map
        w = small.get_submodule(path).weight
        assert w.shape == (len(k.rows) if k.rows is not None else k.out_features,
                           len(k.cols) if k.cols is not None else k.in_features)
    out = small.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)  # KV cache with per-layer sizes
    assert out.shape == (1, 8)


def test_prune_counts_and_kept_index_map():
    full = tiny_llama()
    geo = StructuredPruning.for_model(full)
    assert (geo.num_layers, geo.hidden_size, geo.num_heads, geo.num_kv_heads, geo.head_dim,
            geo.intermediate_size) == (2, 32, 4, 2, 8, 64)
    pruning = StructuredPruning.from_groups(geo, {0: [1]}, {1: [3, 9]})
    assert pruning.removed() == {"heads": 2, "kv_heads": 1, "channels": 62}
    kept = prune_structured(full, pruning)
    assert set(kept) == {f"model.layers.0.self_attn.{p}" for p in PROJ[:4]} | {
        f"model.layers.1.mlp.{p}" for p in PROJ[4:]}
    assert kept["model.layers.0.self_attn.q_proj"].rows.tolist() == list(range(16, 32))  # heads 2, 3
    assert kept["model.layers.0.self_attn.k_proj"].rows.tolist() == list(range(8, 16))  # KV head 1
    assert kept["model.layers.0.self_attn.o_proj"].cols.tolist() == list(range(16, 32))
    assert kept["model.layers.1.mlp.down_proj"].cols.tolist() == [3, 9]
    attn = full.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.o_proj.in_features == 16 and attn.num_key_value_groups == 2
    assert full.model.layers[1].mlp.intermediate_size == 2
    assert full.lorakit_pruning is pruning


def test_pruning_validation_errors():
    geo = StructuredPruning.for_model(tiny_llama())
    with pytest.raises(ConfigError, match="same number"):  # 2 heads in group 0, 1 in group 1
        StructuredPruning.from_dict({**geo.to_dict(), "heads": {"0": [0, 1, 2]}})
    with pytest.raises(ConfigError, match=r"in \[0, 64\)"):
        StructuredPruning.from_groups(geo, {}, {0: [3, 64]})
    with pytest.raises(ConfigError, match="sorted, unique"):
        StructuredPruning.from_groups(geo, {}, {0: [5, 3]})
    with pytest.raises(ConfigError, match="keeps nothing"):
        StructuredPruning.from_groups(geo, {0: []}, {})
    with pytest.raises(ConfigError, match="layer 2"):
        StructuredPruning.from_groups(geo, {2: [0]}, {})
    with pytest.raises(ConfigError, match="format_version"):
        StructuredPruning.from_dict({**geo.to_dict(), "format_version": 99})
    model = tiny_llama()
    pruning = StructuredPruning.from_groups(geo, {0: [0]}, {})
    prune_structured(model, pruning)
    with pytest.raises(ConfigError, match="already pruned"):
        StructuredPruning.for_model(model)
    with pytest.raises(ConfigError, match="unpruned"):  # indices refer to original sizes
        prune_structured(model, pruning)
    adapted = tiny_llama()
    lorakit.inject(adapted, LoraConfig(r=2, target="q_proj"))
    with pytest.raises(ConfigError, match="carries lorakit adapters"):
        prune_structured(adapted, pruning)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match="Llama-style"):
        StructuredPruning.for_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))


def test_save_pruned_load_pruned_round_trip(tmp_path):
    full = tied_llama()
    small, pruning = loram_prune(full, LoramConfig(ratio=0.5, criterion="magnitude"))
    want = logits_of(small, IDS)
    save_pruned(small, tmp_path / "m", pruning)
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "pruning.json"} <= files and not any(f.endswith(".bin") for f in files)
    back = load_pruned(tmp_path / "m")
    torch.testing.assert_close(logits_of(back, IDS), want, rtol=0, atol=0)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied
    assert back.model.layers[0].mlp.gate_proj.weight.shape == (20, 48)
    assert StructuredPruning.from_dict(pruning.to_dict()) == pruning
    (tmp_path / "m" / "pruning.json").unlink()
    with pytest.raises(PrunedModelFileError, match="pruning.json is missing"):
        load_pruned(tmp_path / "m")
    adapted = copy.deepcopy(small)
    lorakit.inject(adapted, LoraConfig(r=2, target="q_proj"))
    with pytest.raises(ConfigError, match="adapters"):
        save_pruned(adapted, tmp_path / "n", pruning)


def test_load_pruned_rejects_mismatched_sidecar(tmp_path):
    small, pruning = loram_prune(tiny_llama(), LoramConfig(ratio=0.5))
    save_pruned(small, tmp_path / "m", pruning)
    other = StructuredPruning.from_groups(StructuredPruning.for_model(tiny_llama()), {}, {0: [0, 1]})
    (tmp_path / "m" / "pruning.json").write_text(__import__("json").dumps(other.to_dict()))
    with pytest.raises(PrunedModelFileError, match="has shape"):
        load_pruned(tmp_path / "m")


# -- LoRAM --------------------------------------------------------------------------------------
def test_loram_prune_ratio_counts_and_full_model_untouched():
    full = tied_llama()
    before = {k: v.clone() for k, v in full.state_dict().items()}
    small, pruning = loram_prune(full, LoramConfig(ratio=0.5, layers=[0, 2]))
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    # per pruned layer: ⌊2·0.5⌋ = 1 of 2 KV groups (3 query heads), ⌊40·0.5⌋ = 20 channels
    assert pruning.removed() == {"heads": 6, "kv_heads": 2, "channels": 40}
    assert small.model.layers[1].mlp.gate_proj.weight.shape == (40, 48)  # layer 1 not pruned
    assert small.model.layers[2].self_attn.q_proj.weight.shape == (24, 48)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    assert n_removed(10, 0.29999999) == 2 and n_removed(100, 0.29) == 29 and n_removed(3, 0.99) == 2


def test_magnitude_keeps_largest_units_and_random_is_seeded():
    full = tiny_llama()
    with torch.no_grad():
        full.model.layers[0].mlp.up_proj.weight[[5, 40]] *= 50
        full.model.layers[1].self_attn.v_proj.weight[:8] *= 50  # KV group 0 of layer 1
        full.model.layers[0].self_attn.o_proj.weight[:, 16:] *= 50  # query heads 2, 3 = KV group 1 of layer 0
    p = loram_plan(full, LoramConfig(ratio=0.5, criterion="magnitude"))
    assert {5, 40} <= set(p.kept_channels(0))
    assert p.kept_kv_heads(1) == [0] and p.kept_kv_heads(0) == [1]
    a, b = (loram_plan(full, LoramConfig(ratio=0.5, seed=s)) for s in (0, 0))
    c = loram_plan(full, LoramConfig(ratio=0.5, seed=1))
    assert a == b and a.channels != c.channels


def _trained_small(method_cfg=None, ratio=0.5, seed=0):
    full = tiny_llama(seed)
    small, pruning = loram_prune(full, LoramConfig(ratio=ratio, criterion="random", seed=seed))
    lorakit.inject(small, method_cfg or LoraConfig(r=4, alpha=8, target="all-linear"))
    losses = regression_losses(small, IDS, lr=1e-2, steps=4)
    assert losses[-1] < losses[0]
    return full, small, pruning


def test_recovered_adapter_has_full_shapes_zeros_where_pruned_and_equals_trained_on_kept():
    full, small, pruning = _trained_small()
    kept_map = pruning.module_indices()
    small_ad = {p: (a.lora_A.weight.detach().clone(), a.lora_B.weight.detach().clone())
                for p, a in lorakit.core.inject.adapter_modules(small).items()}
    recover(small, full, pruning)
    full_ad = lorakit.core.inject.adapter_modules(full)
    assert set(full_ad) == set(small_ad) and len(full_ad) == 2 * 7
    for path, a in full_ad.items():
        base = full.get_submodule(path).base
        A, B = a.lora_A.weight, a.lora_B.weight
        assert A.shape == (4, base.in_features) and B.shape == (base.out_features, 4)
        A_p, B_p = small_ad[path]
        k = kept_map[path]
        if k.rows is not None:  # q/k/v/gate/up: pruned output rows of B are exactly zero
            pruned = torch.ones(k.out_features, dtype=torch.bool)
            pruned[k.rows] = False
            assert torch.equal(B[k.rows], B_p) and torch.equal(A, A_p)
            assert B[pruned].abs().max() == 0 and pruned.any()
        else:  # o/down: pruned input columns of A are exactly zero
            pruned = torch.ones(k.in_features, dtype=torch.bool)
            pruned[k.cols] = False
            assert torch.equal(A[:, k.cols], A_p) and torch.equal(B, B_p)
            assert A[:, pruned].abs().max() == 0 and pruned.any()
        dW, dW_p = a.delta_weight(), small.get_submodule(path).adapters["default"].delta_weight()
        rows = k.rows if k.rows is not None else torch.arange(k.out_features)
        cols = k.cols if k.cols is not None else torch.arange(k.in_features)
        torch.testing.assert_close(dW[rows][:, cols], dW_p)
        outside = dW.clone()
        outside[rows.unsqueeze(1), cols] = 0
        assert outside.abs().max() == 0  # ΔW is exactly zero outside the kept block
    assert not any(p.requires_grad for p in full.parameters())  # recovered for inference


def test_full_model_with_recovered_adapter_runs_matches_small_on_kept_units_and_round_trips(tmp_path):
    full, small, pruning = _trained_small()
    want_small = logits_of(small, IDS)
    base_out = logits_of(full, IDS)
    recover(small, full, pruning)
    out = logits_of(full, IDS)
    assert torch.isfinite(out).all() and not torch.allclose(out, base_out, atol=1e-4)  # the adapter acts
    hooks = zero_pruned_units(full, pruning)  # the full model restricted to the kept units == small model
    torch.testing.assert_close(logits_of(full, IDS), want_small, rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    lorakit.save(full, tmp_path / "loram")
    fresh = tiny_llama(0)
    lorakit.load(fresh, tmp_path / "loram")
    torch.testing.assert_close(logits_of(fresh, IDS), out, rtol=0, atol=0)
    lorakit.merge(fresh)  # an ordinary adapter: merges into the full base
    torch.testing.assert_close(logits_of(fresh, IDS), out, rtol=1e-5, atol=1e-5)


def test_recover_other_linear_method_hydra_on_output_side():
    # Hydra's sequential branch B_s A_s (W0 x): A_s acts on the d_out side and is scattered there
    full, small, pruning = _trained_small(HydraConfig(r=2, target=["q_proj", "gate_proj"]))
    recover(small, full, pruning)
    a = full.get_submodule("model.layers.0.mlp.gate_proj").adapters["default"]
    assert a.delta_weight().shape == (64, 32)


def test_recover_refuses_w0_dependent_update():
    # on o_proj Hydra's B_s A_s W0 reads the pruned input columns of W0: not recoverable by zero-scatter
    full, small, pruning = _trained_small(HydraConfig(r=2, target=["o_proj"]))
    with pytest.raises(ConfigError, match="depends on W0"):
        recover(small, full, pruning)
    assert lorakit.adapter_names(full) == [] and not lorakit.core.inject.adapted_layers(full)  # untouched


def test_recover_errors():
    full, small, pruning = _trained_small()
    with pytest.raises(AdapterError, match="no adapter 'other'"):
        recover(small, full, pruning, name="other")
    with pytest.raises(ConfigError, match="StructuredPruning"):
        recover(_no_pruning(small), full)
    with torch.no_grad():
        small.model.layers[0].mlp.gate_proj.base.weight.add_(0.1)  # e.g. a PiSSA init moved W0
    with pytest.raises(ConfigError, match="not the full model's weight"):
        recover(small, full, pruning)
    assert lorakit.adapter_names(full) == []
    with pytest.raises(ConfigError):
        recover(small, tiny_llama(1), pruning, check=True)  # a different base model


def _no_pruning(small):
    m = copy.deepcopy(small)
    object.__delattr__(m, "lorakit_pruning")
    return m


def test_recover_merged_adapter_refused():
    full, small, pruning = _trained_small()
    lorakit.merge(small)
    with pytest.raises(AdapterError, match="merged"):
        recover(small, full, pruning)


@pytest.mark.parametrize("kw,msg", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"criterion": "taylor"}, "criterion"),
    ({"layers": []}, "layers"), ({"layers": [0, 0]}, "layers"), ({"layers": [-1]}, "layers"),
    ({"prune_attention": False, "prune_mlp": False}, "nothing to prune"), ({"seed": "x"}, "seed"),
])
def test_loram_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LoramConfig(**kw)


def test_loram_layers_out_of_range():
    with pytest.raises(ConfigError, match="out of range"):
        loram_plan(tiny_llama(), LoramConfig(layers=[0, 5]))
