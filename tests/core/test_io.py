"""Adapter files: PEFT interop both ways, validation errors, atomic saves, fuzzed files."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, LorakitError
from tests.conftest import logits_of, randomize, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def saved_adapter(tmp_path, factory=tiny_llama, **cfg):
    m = factory()
    lorakit.inject(m, lorakit.LoraConfig(**cfg))
    randomize(m)
    path = lorakit.save(m, tmp_path / "adapter")
    return m, path


# -- PEFT interop ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory,cfg",
    [(tiny_llama, dict(r=4, alpha=8)), (tiny_llama, dict(target=["q_proj", "v_proj", "embed_tokens"], rslora=True)),
     (tiny_gpt2, dict(target=["c_attn", "c_proj"], r=2))],
)
def test_peft_loads_lorakit_adapter(tmp_path, tokens, factory, cfg):
    m, path = saved_adapter(tmp_path, factory, **cfg)
    ours = logits_of(m, tokens)
    pm = peft.PeftModel.from_pretrained(factory(), str(path)).eval()
    torch.testing.assert_close(logits_of(pm, tokens), ours, rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(factory(), tokens), ours)  # the adapter does something


@pytest.mark.parametrize(
    "factory,target", [(tiny_llama, ["q_proj", "k_proj", "down_proj"]), (tiny_gpt2, ["c_attn"]), (tiny_llama, "all-linear")]
)
def test_lorakit_loads_peft_adapter(tmp_path, tokens, factory, target):
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=target, init_lora_weights=False,
                           fan_in_fan_out=factory is tiny_gpt2)
    pm = peft.get_peft_model(factory(), pcfg).eval()
    ref = logits_of(pm, tokens)
    pm.save_pretrained(str(tmp_path / "p"))
    assert (tmp_path / "p" / "adapter_model.safetensors").exists()
    m = lorakit.load(factory(), tmp_path / "p")
    torch.testing.assert_close(logits_of(m, tokens), ref, rtol=0, atol=1e-5)
    # and back out again: the re-saved lorakit file loads in PEFT with the same logits
    lorakit.save(m, tmp_path / "again")
    pm2 = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits_of(pm2, tokens), ref, rtol=0, atol=1e-5)


def test_saved_keys_use_peft_names(tmp_path):
    _, path = saved_adapter(tmp_path, r=2, target="q_proj")
    keys = sorted(load_file(path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["q_proj"] and cfg["lorakit"]["method"] == "lora"


# -- bad inputs: clear errors, model untouched ----------------------------------------------
def assert_untouched(model):
    assert not adapted_layers(model) and lorakit.adapter_names(model) == []


def test_missing_dir_and_files(tmp_path):
    m = tiny_llama()
    with pytest.raises(AdapterFileError, match="adapter directory not found"):
        lorakit.load(m, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="adapter_config.json is missing"):
        lorakit.load(m, tmp_path / "empty")
    _, path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is missing"):
        lorakit.load(m, path)
    torch.save({}, path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="never unpickles"):
        lorakit.load(m, path)
    assert_untouched(m)


def test_truncated_safetensors(tmp_path):
    _, path = saved_adapter(tmp_path)
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    m = tiny_llama()
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        lorakit.load(m, path)
    assert_untouched(m)


def test_wrong_shape_names_file_tensor_and_shapes(tmp_path):
    _, path = saved_adapter(tmp_path, r=4)
    f = path / "adapter_model.safetensors"
    t = load_file(f)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    t[key] = torch.zeros(64, 3)
    save_file(t, f)
    m = tiny_llama()
    with pytest.raises(AdapterFileError, match=r"adapter_model.safetensors.*up_proj.lora_B.weight.*\(64, 3\).*\(64, 4\)"):
        lorakit.load(m, path)
    assert_untouched(m)


def test_missing_and_unexpected_tensors(tmp_path):
    _, path = saved_adapter(tmp_path, target="q_proj")
    f = path / "adapter_model.safetensors"
    t = load_file(f)
    t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    save_file(t, f)
    with pytest.raises(AdapterFileError, match="missing tensor .*layers.0.self_attn.q_proj.lora_A.weight"):
        lorakit.load(tiny_llama(), path)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(8, 32)
    save_file(t, f)
    with pytest.raises(AdapterFileError, match="unexpected tensor .*lora_C"):
        lorakit.load(tiny_llama(), path)


def test_unknown_method_and_unknown_key(tmp_path):
    _, path = saved_adapter(tmp_path)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lorakit"]["method"] = "magic"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        lorakit.load(tiny_llama(), path)
    cfg["lorakit"]["method"] = "lora"
    cfg["lorakit"]["config"]["rnak"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"adapter_config.json: unknown LoraConfig key\(s\) \['rnak'\]"):
        lorakit.load(tiny_llama(), path)
    cfg_file.write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        lorakit.load(tiny_llama(), path)


def test_rank_le_zero_in_file(tmp_path):
    _, path = saved_adapter(tmp_path)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lorakit"]["config"]["r"] = 0
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        lorakit.load(tiny_llama(), path)


def test_unknown_target_module_in_file(tmp_path):
    _, path = saved_adapter(tmp_path, factory=tiny_gpt2, target="c_attn")
    m = tiny_llama()
    with pytest.raises(LorakitError, match="config hash|matched no adaptable module"):
        lorakit.load(m, path)
    with pytest.raises(ConfigError, match="matched no adaptable module"):
        lorakit.load(m, path, check_base=False)
    assert_untouched(m)


def test_base_model_mismatch(tmp_path):
    _, path = saved_adapter(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         rope_theta=500.0))
    with pytest.raises(AdapterFileError, match="config hash"):
        lorakit.load(other, path)
    lorakit.load(other, path, check_base=False)  # explicit opt-out works


def test_unknown_adapter_name_on_save(tmp_path):
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig())
    with pytest.raises(AdapterError, match="unknown adapter 'x'"):
        lorakit.save(m, tmp_path / "a", name="x")


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig())
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(AdapterFileError, match="refusing to overwrite"):
        lorakit.save(m, tmp_path / "home")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_loaded_adapter_frozen_by_default(tmp_path):
    _, path = saved_adapter(tmp_path)
    m = lorakit.load(tiny_llama(), path, name="x")
    assert lorakit.trainable_parameters(m)[0] == 0
    m2 = lorakit.load(tiny_llama(), path, trainable=True)
    assert lorakit.trainable_parameters(m2)[0] > 0


# -- atomic saves ---------------------------------------------------------------------------
SAVER = textwrap.dedent(
    """
    import sys, torch, lorakit
    sys.path.insert(0, {root!r})
    from tests.conftest import tiny_llama
    from lorakit.core.inject import adapted_layers
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=64))
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            for l in adapted_layers(m).values():
                for p in l.adapters["default"].parameters():
                    p.fill_(float(i))
        lorakit.save(m, sys.argv[1])
    """
)


def test_sigkill_during_save_never_leaves_corrupt_adapter(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=root))
    target = tmp_path / "adapter"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "src"), root]))
    for delay in (0.05, 0.13, 0.29):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not target.exists():  # killed between the two renames: previous version kept aside
            continue
        m = lorakit.load(tiny_llama(), target)
        values = {p.flatten()[0].item() for l in adapted_layers(m).values() for p in l.adapters["default"].parameters()}
        assert len(values) == 1, f"adapter mixes two saves: {sorted(values)[:4]}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.tmp-")]
    m = tiny_llama()
    lorakit.inject(m, lorakit.LoraConfig(r=64))
    lorakit.save(m, target)  # a later save cleans temp dirs of dead processes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.tmp-")], leftovers


# -- fuzzing ------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_files_load_or_raise_lorakit_error(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    m0 = tiny_llama()
    lorakit.inject(m0, lorakit.LoraConfig(r=2, target="q_proj"))
    path = lorakit.save(m0, tmp / "a")
    which = data.draw(st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]))
    f = path / which
    raw = bytearray(f.read_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if op == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        raw = raw[:pos]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    f.write_bytes(bytes(raw))
    m = tiny_llama()
    try:
        lorakit.load(m, path)
    except LorakitError:
        assert_untouched(m)
    else:
        assert lorakit.adapter_names(m) == ["default"]


@settings(max_examples=30, deadline=None)
@given(
    r=st.integers(-3, 12),
    alpha=st.one_of(st.floats(-5, 64, allow_nan=False), st.integers(-5, 64)),
    dropout=st.floats(-0.5, 1.5, allow_nan=False),
    target=st.sampled_from(["q_proj", "all-linear", ["k_proj", "o_proj"], "zzz", r"model\.layers\.1\..*", "(("]),
)
def test_random_configs_inject_or_raise_config_error(r, alpha, dropout, target):
    m = tiny_llama()
    try:
        cfg = lorakit.LoraConfig(r=r, alpha=alpha, dropout=dropout, target=target)
        lorakit.inject(m, cfg)
    except ConfigError:
        assert_untouched(m)
    else:
        assert r > 0 and alpha > 0 and 0 <= dropout < 1


def test_injecting_another_adapter_keeps_loaded_one_frozen(tmp_path):
    _, path = saved_adapter(tmp_path)
    m = lorakit.load(tiny_llama(), path, name="frozen")
    lorakit.inject(m, lorakit.LoraConfig(r=2, target="q_proj"), name="new")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.new." in n for n in trainable)
