"""LoLCATs: linearized attention (Hedgehog feature maps + sliding window), attention transfer,
LoRA correction, recurrent decoding, files."""

import copy
import json

import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.tasks.lolcats import (
    LolcatsAttention,
    LolcatsCacheLayer,
    LolcatsConfig,
    attention_transfer,
    cache_nbytes,
    decode_speed,
    generate_linear,
    greedy_decode,
    hedgehog,
    hybrid_attention,
    hybrid_attention_chunk,
    hybrid_attention_quadratic,
    linearize,
    linearized_config,
    linearized_layers,
    lm_loss,
    load_linearized,
    lora_correct,
    new_cache,
    save_linearized,
    set_mode,
    transfer_mse,
)
from tests.conftest import logits_of, tiny_bert, tiny_gpt2, tiny_llama


def sharp_llama(seed=0, scale=6.0):
    """Tiny Llama whose attention is peaked (random init attention is nearly uniform)."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(scale)
            layer.self_attn.k_proj.weight.mul_(scale)
    return model


def batches(n, t=24, seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (b, t), generator=g) for _ in range(n)]


def random_inputs(b=2, h=3, n=23, d=5, f=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3))
    wq, wk = (torch.randn(h, d, f, generator=g, dtype=dtype) for _ in range(2))
    wf = torch.rand(h, generator=g, dtype=dtype) * 0.8 + 0.1
    return q, hedgehog(q, wq), k, v, hedgehog(k, wk), wf


# -- math ---------------------------------------------------------------------------------
def test_hedgehog_feature_map_shapes_and_normalisation():
    x = torch.randn(2, 3, 7, 5)
    w = torch.randn(3, 5, 4)
    phi = hedgehog(x, w)
    assert phi.shape == (2, 3, 7, 8)
    assert (phi > 0).all()
    torch.testing.assert_close(phi[..., :4].sum(-1), torch.ones(2, 3, 7))  # softmax(xW)
    torch.testing.assert_close(phi[..., 4:].sum(-1), torch.ones(2, 3, 7))  # softmax(-xW)
    u = x[0, 1, 2] @ w[1]
    torch.testing.assert_close(phi[0, 1, 2], torch.cat([u.softmax(-1), (-u).softmax(-1)]))


@pytest.mark.parametrize("window", [0, 1, 3, 8, 40])
def test_chunked_and_recurrent_equal_quadratic(window):
    q, fq, k, v, fk, wf = random_inputs()
    ref = hybrid_attention_quadratic(q, fq, k, v, fk, wf, window, 0.4)
    for chunk in (1, 4, 7, 100):  # chunk 1 = token-by-token recurrence
        y, _ = hybrid_attention(q, fq, k, v, fk, wf, window, 0.4, chunk)
        assert (y - ref).abs().max() < 1e-10, (window, chunk)
    # prefill 10 tokens, then decode one token at a time from the carried state
    y0, state = hybrid_attention(q[:, :, :10], fq[:, :, :10], k[:, :, :10], v[:, :, :10], fk[:, :, :10], wf,
                                 window, 0.4, 4)
    ys = [y0]
    for t in range(10, q.shape[2]):
        y, state = hybrid_attention_chunk(q[:, :, t:t + 1], fq[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                          fk[:, :, t:t + 1], wf, window, 0.4, state)
        ys.append(y)
    assert (torch.cat(ys, 2) - ref).abs().max() < 1e-10
    # the state has a fixed size: W-1 keys + S + z, whatever the length
    assert state.k.shape[2] == min(max(window - 1, 0), 23) and state.S.shape == (2, 3, 8, 5)


def test_quadratic_matches_definition_for_one_query():
    q, fq, k, v, fk, wf = random_inputs(b=1, h=1, n=9)
    W, i, sc = 3, 8, 0.4
    y = hybrid_attention_quadratic(q, fq, k, v, fk, wf, W, sc)[0, 0, i]
    s = (k[0, 0, : i + 1] @ q[0, 0, i]) * sc
    win = torch.arange(i + 1) > i - W
    e = wf[0] * torch.exp(s - s[win].max()) * win
    a = (fk[0, 0, : i + 1] @ fq[0, 0, i]) * ~win
    expect = ((e + a) @ v[0, 0, : i + 1]) / (e + a).sum()
    torch.testing.assert_close(y, expect)


def test_window_covering_everything_is_softmax_attention():
    q, fq, k, v, fk, wf = random_inputs(n=12)
    y, _ = hybrid_attention(q, fq, k, v, fk, wf, 12, 0.4, 5)
    att = (q @ k.transpose(-1, -2) * 0.4).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(y, att.softmax(-1) @ v)


# -- the model ----------------------------------------------------------------------------
def test_linearize_replaces_attention_keeps_projections_and_shapes():
    model = tiny_llama()
    projs = [(a.q_proj, a.k_proj, a.v_proj, a.o_proj) for a in (layer.self_attn for layer in model.model.layers)]
    keys = set(model.state_dict())
    linearize(model, LolcatsConfig(window=4, feature_dim=16))
    layers = linearized_layers(model)
    assert sorted(layers) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for (q, k, v, o), attn in zip(projs, layers.values()):
        assert (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj) == (q, k, v, o)
        assert attn.feature_map_q.weight.shape == (4, 8, 16)  # (heads, head_dim, f)
        assert attn.window_factors.shape == (4,)
        torch.testing.assert_close(torch.sigmoid(attn.window_factors), torch.full((4,), 0.1))
    assert keys < set(model.state_dict())  # base keys unchanged, feature maps added
    ids = batches(1)[0]
    assert logits_of(model, ids).shape == (2, 24, 128)
    assert linearized_config(model).layers == [0, 1]


def test_identity_init_and_untied_maps():
    model = linearize(tiny_llama(), LolcatsConfig(feature_dim=16))
    attn = model.model.layers[0].self_attn
    w = attn.feature_map_q.weight
    torch.testing.assert_close(w[2], torch.eye(8, 16))
    assert attn.feature_map_k.weight is not w
    torch.testing.assert_close(attn.feature_map_k.weight, w)
    k1 = linearize(tiny_llama(), LolcatsConfig(init="kaiming", seed=3)).model.layers[0].self_attn.feature_map_q.weight
    k2 = linearize(tiny_llama(), LolcatsConfig(init="kaiming", seed=3)).model.layers[0].self_attn.feature_map_q.weight
    torch.testing.assert_close(k1, k2)  # seeded
    assert not torch.allclose(k1, torch.eye(8, 64).expand(4, 8, 64))


def test_long_window_model_equals_softmax_model():
    base = tiny_llama()
    model = linearize(copy.deepcopy(base), LolcatsConfig(window=64, chunk_size=7))
    ids = batches(1)[0]
    torch.testing.assert_close(logits_of(model, ids), logits_of(base, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [0, 4])
def test_prefill_equals_step_by_step_decode(window):
    model = linearize(sharp_llama(), LolcatsConfig(window=window, chunk_size=5, feature_dim=16))
    ids = batches(1, t=20)[0]
    full = logits_of(model, ids)
    with torch.no_grad():
        cache = new_cache(model)
        steps = [model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(20)]
        assert all(isinstance(cache.layers[i], LolcatsCacheLayer) for i in range(2))
        assert cache.get_seq_length() == 20
        cache2 = new_cache(model)
        pre = model(input_ids=ids[:, :13], cache=cache2, use_cache=True).logits
        rest = [model(input_ids=ids[:, t:t + 1], cache=cache2, use_cache=True).logits for t in range(13, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert (torch.cat([pre, *rest], 1) - full).abs().max() < 1e-5


def test_causal_future_tokens_do_not_change_past_outputs():
    model = linearize(sharp_llama(), LolcatsConfig(window=3, chunk_size=4, feature_dim=16))
    ids = batches(1, t=16)[0]
    other = ids.clone()
    other[:, 9:] = (other[:, 9:] + 17) % 128
    a, b = logits_of(model, ids), logits_of(model, other)
    assert (a[:, :9] - b[:, :9]).abs().max() < 1e-6
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def test_transfer_mode_returns_the_original_softmax_attention():
    base = sharp_llama()
    model = linearize(copy.deepcopy(base), LolcatsConfig(window=4))
    ids = batches(1)[0]
    set_mode(model, "transfer")
    torch.testing.assert_close(logits_of(model, ids), logits_of(base, ids), atol=1e-5, rtol=1e-4)
    assert all(m.transfer_loss is not None and m.transfer_loss > 0 for m in linearized_layers(model).values())
    set_mode(model, "linear")
    assert (logits_of(model, ids) - logits_of(base, ids)).abs().max() > 1e-3


def test_partial_linearization_mixes_kv_cache_and_state():
    model = linearize(sharp_llama(), LolcatsConfig(window=3, layers=[1], feature_dim=16))
    assert isinstance(model.model.layers[1].self_attn, LolcatsAttention)
    assert not isinstance(model.model.layers[0].self_attn, LolcatsAttention)
    ids = batches(1, t=12)[0]
    full = logits_of(model, ids)
    with torch.no_grad():
        cache = new_cache(model)
        pre = model(input_ids=ids[:, :7], cache=cache, use_cache=True).logits
        rest = [model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(7, 12)]
    assert (torch.cat([pre, *rest], 1) - full).abs().max() < 1e-5
    assert isinstance(cache.layers[1], LolcatsCacheLayer) and not isinstance(cache.layers[0], LolcatsCacheLayer)


# -- training -----------------------------------------------------------------------------
def test_attention_transfer_beats_untrained_feature_maps():
    """The issue's check: transferred attention approximates softmax better than untrained maps."""
    train, held = batches(6, seed=1), batches(3, seed=2)
    results = {}
    for init in ("kaiming", "identity"):
        model = linearize(sharp_llama(), LolcatsConfig(window=4, feature_dim=16, init=init, seed=1))
        before_w = model.model.layers[0].self_attn.q_proj.weight.clone()
        untrained = transfer_mse(model, held)
        history = attention_transfer(model, train, steps=60, lr=1e-2)
        trained = transfer_mse(model, held)
        results[init] = (untrained, trained)
        assert trained < 0.7 * untrained, (init, untrained, trained)
        assert history[-1] < history[0]
        torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, before_w)  # only φ, ω train
        assert all(p.requires_grad for p in model.model.embed_tokens.parameters())  # flags restored
        assert all(m.mode == "linear" for m in linearized_layers(model).values())
    assert results["kaiming"][1] < results["kaiming"][0]


def test_lora_correction_reduces_lm_loss_and_trains_only_lora():
    data = batches(4, t=20, seed=3)
    model = linearize(sharp_llama(), LolcatsConfig(window=4, feature_dim=16))
    attention_transfer(model, data, steps=20)
    fmap = model.model.layers[0].self_attn.feature_map_q.weight.clone()
    before = lm_loss(model, data)
    history = lora_correct(model, data, steps=40, lr=5e-3, r=4, alpha=8)
    after = lm_loss(model, data)
    assert after < before - 0.05, (before, after)
    assert history[-1] < history[0]
    torch.testing.assert_close(model.model.layers[0].self_attn.feature_map_q.weight, fmap)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A, B x q/k/v/o x 2 layers


def test_bad_inputs_to_training_are_rejected():
    model = linearize(tiny_llama())
    with pytest.raises(ValueError, match="padding"):
        attention_transfer(model, [{"input_ids": torch.ones(2, 5, dtype=torch.long),
                                    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])}], steps=1)
    with pytest.raises(ConfigError, match="steps"):
        attention_transfer(model, batches(1), steps=0)
    with pytest.raises(ValueError, match="no batches"):
        attention_transfer(model, [], steps=1)
    with pytest.raises(ConfigError, match="linearize"):
        attention_transfer(tiny_llama(), batches(1), steps=1)
    with pytest.raises(ConfigError, match="linearize"):
        lora_correct(tiny_llama(), batches(1), steps=1)
    assert all(p.requires_grad for p in model.model.embed_tokens.parameters())  # flags restored after errors


# -- generation ---------------------------------------------------------------------------
def test_generate_linear_matches_hf_generate_with_constant_state():
    model = linearize(sharp_llama(), LolcatsConfig(window=4, feature_dim=16))
    ids = batches(1, t=10)[0]
    out = generate_linear(model, ids, max_new_tokens=12)
    assert out.shape == (2, 22) and torch.equal(out[:, :10], ids)
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(out, hf)
    # the decoding state does not grow with the context
    sizes = []
    for n in (10, 40):
        t = {}
        greedy_decode(model, batches(1, t=n)[0], 3, timings=t)
        sizes.append(t["cache_bytes"])
    assert sizes[0] == sizes[1] > 0
    with pytest.raises(ConfigError, match="linearize"):
        generate_linear(tiny_llama(), ids, 3)


def test_greedy_decode_of_softmax_model_matches_hf_generate():
    model = tiny_llama()
    ids = batches(1, t=8)[0]
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_decode(model, ids, 6), hf)


def test_decode_speed_smoke():
    base = tiny_llama()
    lin = linearize(copy.deepcopy(base), LolcatsConfig(window=8, feature_dim=8))
    rows = decode_speed({"softmax": base, "lolcats": lin}, context_lengths=(16, 48), new_tokens=4, rounds=2)
    assert len(rows) == 4
    assert {r["model"] for r in rows} == {"softmax", "lolcats"}
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0
        assert r["speedup"] == 1.0 if r["model"] == "softmax" else r["speedup"] > 0
    mb = {(r["model"], r["context"]): r["cache_mb"] for r in rows}
    assert mb[("lolcats", 16)] == mb[("lolcats", 48)]  # O(1) state
    assert mb[("softmax", 48)] > mb[("softmax", 16)]  # KV cache grows
    with pytest.raises(ConfigError, match="new_tokens"):
        decode_speed({"softmax": base}, context_lengths=(8,), new_tokens=1)


# -- files --------------------------------------------------------------------------------
def test_save_load_round_trip_with_lora(tmp_path):
    data = batches(2)
    model = linearize(sharp_llama(), LolcatsConfig(window=4, feature_dim=16, layers=[0, 1]))
    attention_transfer(model, data, steps=5)
    lora_correct(model, data, steps=3, lr=1e-2)
    save_linearized(model, tmp_path / "lolcats")
    lorakit.save(model, tmp_path / "lora")
    meta = json.loads((tmp_path / "lolcats" / "lolcats_config.json").read_text())
    assert meta["config"]["window"] == 4 and meta["config"]["layers"] == [0, 1]

    fresh = load_linearized(sharp_llama(), tmp_path / "lolcats")
    lorakit.load(fresh, tmp_path / "lora")
    ids = batches(1, seed=9)[0]
    torch.testing.assert_close(logits_of(fresh, ids), logits_of(model, ids))
    assert linearized_config(fresh) == linearized_config(model)


def test_load_errors_leave_the_model_untouched(tmp_path):
    model = linearize(tiny_llama(), LolcatsConfig(feature_dim=16))
    save_linearized(model, tmp_path / "ok")
    # wrong base model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(AdapterFileError, match="another base model"):
        load_linearized(other, tmp_path / "ok")
    assert not linearized_layers(other)
    # a tensor with the wrong shape
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "lolcats_config.json").write_text((tmp_path / "ok" / "lolcats_config.json").read_text())
    t = load_file(tmp_path / "ok" / "lolcats_feature_maps.safetensors")
    t["layers.1.feature_map_k.weight"] = torch.zeros(4, 8, 15)
    save_file(t, bad / "lolcats_feature_maps.safetensors")
    fresh = tiny_llama()
    with pytest.raises(AdapterFileError, match=r"layers\.1\.feature_map_k\.weight.*\(4, 8, 15\).*\(4, 8, 16\)"):
        load_linearized(fresh, bad)
    assert not linearized_layers(fresh)
    with pytest.raises(AdapterFileError, match="missing"):
        load_linearized(fresh, tmp_path / "nowhere")
    (bad / "lolcats_feature_maps.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="safetensors"):
        load_linearized(fresh, bad)
    with pytest.raises(ConfigError, match="already linearized"):
        load_linearized(model, tmp_path / "ok")


# -- configuration errors -----------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_bert])
def test_non_llama_models_are_rejected(factory):
    model = factory()
    with pytest.raises(ConfigError, match="Llama-family attention"):
        linearize(model)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": -1}, "window"), ({"window": 2.5}, "window"), ({"window": True}, "window"),
    ({"feature_dim": 0}, "feature_dim"), ({"chunk_size": 0}, "chunk_size"), ({"init": "zeros"}, "init"),
    ({"window_factor": 0.0}, "window_factor"), ({"window_factor": 1.0}, "window_factor"),
    ({"layers": [0, 0]}, "duplicate"), ({"layers": [-1]}, "layers"), ({"layers": "0"}, "layers"),
    ({"eps": 0.0}, "eps"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LolcatsConfig(**kwargs)


def test_bad_linearize_calls_leave_the_model_unchanged():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"layers \[5\] out of range"):
        linearize(model, LolcatsConfig(layers=[0, 5]))
    assert not linearized_layers(model)
    with pytest.raises(ConfigError, match="LolcatsConfig"):
        linearize(model, {"window": 4})
    linearize(model)
    with pytest.raises(ConfigError, match="already linearized"):
        linearize(model)
    with pytest.raises(ConfigError, match="unknown"):
        LolcatsConfig.from_dict({"window": 4, "windw": 3})
    with pytest.raises(ConfigError, match="mode"):
        set_mode(model, "softmax")
    assert cache_nbytes(new_cache(model)) == 0
