"""A LoRA trained with new vocabulary rows saves as one adapter directory and loads onto the
ORIGINAL base model (lorakit.save / lorakit.load with lorakit.lang.vocab's extension record)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.core.io import NEW_ROWS_PREFIX, PREFIX, load_tokenizer, load_weights
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.lang import expand_vocabulary, trainable_new_rows, vocab_extension
from tests.conftest import tiny_tokenizer

CHICHEWA = [
    "Pachiyambi Mulungu analenga kumwamba ndi dziko lapansi.",
    "Ndipo dziko lapansi linali lopanda maonekedwe, ndi lopanda kanthu.",
    "Ndipo Mulungu anati, Kuyenera kuwala; ndipo kunali kuwala.",
    "Mulungu anakonda dziko lapansi kotero kuti anapatsa Mwana wake.",
]
K = 20


def base_lm(tied=True, seed=0, vocab_size=300, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def trained(tied=True, init="merge", steps=3):
    """Base -> expand by K tokens -> LoRA + trainable new rows -> a few Adam steps."""
    tok = tiny_tokenizer()
    model, ext, report = expand_vocabulary(base_lm(tied), tok, CHICHEWA * 2, k=K, init=init)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target="all-linear"))
    trainable_new_rows(model, report["n_old"])
    init_rows = model.get_input_embeddings().weight[report["n_old"]:].detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = ids_of(ext)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    return model, tok, ext, report, init_rows


def ids_of(tok):
    return torch.tensor([tok(" ".join(CHICHEWA), add_special_tokens=False)["input_ids"]])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def saved(request, tmp_path_factory):
    model, tok, ext, report, init_rows = trained(tied=request.param)
    path = lorakit.save(model, tmp_path_factory.mktemp("ad") / "adapter")
    return request.param, model, tok, ext, report, init_rows, path


# --------------------------------------------------------------------------- round trip


def test_round_trip_on_the_original_base_gives_identical_outputs(saved):
    tied, model, _, ext, report, init_rows, path = saved
    n_old = report["n_old"]
    assert not torch.equal(model.get_input_embeddings().weight[n_old:], init_rows)  # the rows did train
    ids = ids_of(ext)
    assert int(ids.max()) >= n_old  # the text uses new tokens
    fresh = base_lm(tied)
    base_rows = fresh.get_input_embeddings().weight.detach().clone()
    lorakit.load(fresh, path)
    assert fresh.get_input_embeddings().weight.shape[0] == n_old + K
    assert fresh.config.vocab_size == n_old + K
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    assert torch.equal(fresh.get_input_embeddings().weight[:n_old], base_rows)  # old rows untouched
    assert (fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight) == tied
    ext_rec = vocab_extension(fresh)
    assert ext_rec is not None and ext_rec.n_old == n_old


def test_tokenizer_travels_with_the_adapter(saved):
    _, _, _, ext, report, _, path = saved
    tok = load_tokenizer(path)
    assert tok.get_vocab() == ext.get_vocab()
    for text in CHICHEWA:
        assert tok(text)["input_ids"] == ext(text)["input_ids"]
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["peft_type"] is None  # PEFT could not resize the base: it must not load this silently
    assert meta["lorakit"]["new_rows"] == {"n_old": report["n_old"], "n_new": K, "tied": saved[0],
                                           "tensors": ["input_embeddings"] if saved[0]
                                           else ["input_embeddings", "output_embeddings"]}
    assert set(meta["lorakit"]["tokenizer"]["files"]) == {"tokenizer.json", "tokenizer_config.json"}
    info = lorakit.adapter_info(path)
    assert info["new_rows"]["n_new"] == K and "tokenizer.json" in info["tokenizer"]


def test_adapter_holds_only_the_new_rows_not_the_embedding(saved):
    tied, _, _, _, report, _, path = saved
    n_old, d = report["n_old"], 32
    tensors = load_file(str(path / "adapter_model.safetensors"))
    rows = {k[len(PREFIX + NEW_ROWS_PREFIX):]: t for k, t in tensors.items() if NEW_ROWS_PREFIX in k}
    assert set(rows) == ({"input_embeddings"} if tied else {"input_embeddings", "output_embeddings"})
    assert all(t.shape == (K, d) for t in rows.values())
    assert not any(t.shape[0] >= n_old for t in tensors.values())  # no full table anywhere
    lora_bytes = sum(t.numel() * 4 for k, t in tensors.items() if NEW_ROWS_PREFIX not in k)
    full_table = (n_old + K) * d * 4
    size = (path / "adapter_model.safetensors").stat().st_size
    assert size < lora_bytes + len(rows) * K * d * 4 + 8192
    assert size < lora_bytes + full_table  # smaller than saving embed_tokens as modules_to_save


def test_loading_onto_an_already_extended_model_overwrites_the_rows(saved):
    tied, model, tok, ext, _, _, path = saved
    other, *_ = expand_vocabulary(base_lm(tied), tok, CHICHEWA * 2, k=K, init="random")
    lorakit.load(other, path)
    ids = ids_of(ext)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)


def test_a_second_adapter_may_not_overwrite_rows_the_first_one_uses(saved, tmp_path):
    tied, _, _, _, _, _, path = saved
    model = base_lm(tied)
    lorakit.load(model, path, name="first")
    lorakit.load(model, path, name="same_rows")  # identical rows: nothing to overwrite
    other, *_ = trained(tied=tied, init="random")
    other_path = lorakit.save(other, tmp_path / "other")
    rows = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(AdapterFileError, match=r"already holds 20 new vocabulary rows.*\['first', 'same_rows'\]"):
        lorakit.load(model, other_path, name="second")
    assert torch.equal(model.get_input_embeddings().weight, rows)
    assert sorted(lorakit.adapter_names(model)) == ["first", "same_rows"]


def test_trainable_load_and_resume_restore_the_rows(saved):
    tied, model, _, ext, report, _, path = saved
    n_old = report["n_old"]
    fresh = base_lm(tied)
    lorakit.load(fresh, path, trainable=True)
    emb = fresh.get_input_embeddings().weight
    assert emb.requires_grad
    ids = ids_of(ext)
    fresh(input_ids=ids, labels=ids).loss.backward()
    assert torch.count_nonzero(emb.grad[:n_old]) == 0 and torch.count_nonzero(emb.grad[n_old:]) > 0
    # resume: scribble over adapter and rows, then load_weights puts the saved values back
    with torch.no_grad():
        emb[n_old:] = 0
        for layer in adapted_layers(fresh).values():
            for p in layer.adapters["default"].parameters():
                p.zero_()
    load_weights(fresh, path)
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    with pytest.raises(AdapterFileError, match="still has the base vocabulary"):
        base = base_lm(tied)
        lorakit.inject(base, lorakit.LoraConfig(r=4, target="all-linear"))
        load_weights(base, path)


# --------------------------------------------------------------------------- wrong bases leave the model untouched


def _unchanged(model, before_logits, ids):
    assert model.get_input_embeddings().weight.shape[0] == before_logits.shape[-1]
    assert not adapted_layers(model)
    torch.testing.assert_close(logits(model, ids), before_logits, rtol=0, atol=0)


def test_wrong_vocabulary_is_a_clear_error(saved):
    tied, _, _, _, _, _, path = saved
    small = base_lm(tied, vocab_size=128)
    ids = torch.tensor([[3, 5, 7]])
    before = logits(small, ids)
    with pytest.raises(AdapterFileError, match=r"wrong base vocabulary.*300-token vocabulary.*has 128 rows"):
        lorakit.load(small, path)
    _unchanged(small, before, ids)


def test_other_architecture_or_head_tying_is_refused(saved):
    tied, _, _, _, _, _, path = saved
    wide = base_lm(tied, hidden=64)
    with pytest.raises(AdapterFileError, match="shape"):
        lorakit.load(wide, path)
    flipped = base_lm(not tied)
    ids = torch.tensor([[3, 5, 7]])
    before = logits(flipped, ids)
    with pytest.raises(AdapterFileError, match="tied vs untied"):
        lorakit.load(flipped, path)
    _unchanged(flipped, before, ids)


def test_same_vocabulary_but_different_config_fails_the_base_check(saved, tmp_path):
    tied, *_ = saved
    other = base_lm(tied)
    other.config.rope_theta = 1234.0  # not the base it was trained on
    with pytest.raises(AdapterFileError, match="config hash"):
        lorakit.load(other, saved[-1])
    assert other.get_input_embeddings().weight.shape[0] == 300


def test_a_bad_lora_tensor_after_the_resize_rolls_the_resize_back(saved, tmp_path):
    tied, *_, path = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(5, 3)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    model = base_lm(tied)
    ids = torch.tensor([[3, 5, 7]])
    before = logits(model, ids)
    with pytest.raises(AdapterFileError, match=r"lora_A.weight.*shape \(5, 3\)"):
        lorakit.load(model, bad)
    _unchanged(model, before, ids)
    assert vocab_extension(model) is None


def test_damaged_metadata_and_tokenizer_are_refused(saved, tmp_path):
    tied, *_, path = saved

    def copy_to(name):
        d = tmp_path / name
        d.mkdir()
        for f in path.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    d = copy_to("tok")
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("Mulungu", "Mulunga"))
    with pytest.raises(AdapterFileError, match="sha256"):
        lorakit.load(base_lm(tied), d)
    with pytest.raises(AdapterFileError, match="sha256"):
        load_tokenizer(d)
    d = copy_to("meta")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lorakit"]["new_rows"]["n_new"] = K + 1
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=f"n_new={K + 1}"):
        lorakit.load(base_lm(tied), d)
    cfg["lorakit"]["new_rows"] = {"n_old": "300"}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="positive ints"):
        lorakit.load(base_lm(tied), d)
    del cfg["lorakit"]["new_rows"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="no 'lorakit.new_rows' record"):
        lorakit.load(base_lm(tied), d)


# --------------------------------------------------------------------------- opting in and out


def test_save_options(tmp_path):
    model, tok, _, report, _ = trained(steps=1)
    plain = lorakit.save(model, tmp_path / "plain", new_rows=False)
    with safe_open(str(plain / "adapter_model.safetensors"), "pt") as f:
        assert not any(NEW_ROWS_PREFIX in k for k in f.keys())  # noqa: SIM118 - safe_open is not a dict
    meta = json.loads((plain / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and "new_rows" not in meta["lorakit"]
    assert load_tokenizer(plain) is None
    # an explicit first new id (here: only the last 5 rows), and an explicit tokenizer
    n_old = report["n_old"]
    with pytest.raises(ConfigError, match="does not belong to these embedding rows"):
        lorakit.save(model, tmp_path / "x", new_rows=n_old + K - 5, tokenizer=tok)  # the base tokenizer
    part = lorakit.save(model, tmp_path / "part", new_rows=n_old + K - 5)
    assert json.loads((part / "adapter_config.json").read_text())["lorakit"]["new_rows"]["n_new"] == 5
    with pytest.raises(ConfigError, match="new_rows"):
        lorakit.save(model, tmp_path / "y", new_rows="yes")
    with pytest.raises(ConfigError, match="first new id"):
        lorakit.save(model, tmp_path / "y", new_rows=n_old + K)
    untouched = base_lm()
    lorakit.inject(untouched, lorakit.LoraConfig(r=2, target="q_proj"))
    with pytest.raises(ConfigError, match="no added vocabulary rows"):
        lorakit.save(untouched, tmp_path / "y", new_rows=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # any adapter may carry a tokenizer; overwriting keeps a user's tokenizer files
    d = lorakit.save(untouched, tmp_path / "withtok", tokenizer=tok)
    assert load_tokenizer(d).get_vocab() == tok.get_vocab()
    lorakit.save(untouched, d)
    assert (d / "tokenizer.json").is_file()


def test_train_saves_the_rows_of_an_extended_model(tmp_path, text_file):
    from lorakit.train import TrainConfig, train

    tok = tiny_tokenizer()
    model, ext, _ = expand_vocabulary(base_lm(), tok, CHICHEWA * 2, k=K, init="mean")
    cfg = TrainConfig(model="tiny", data=str(text_file), output_dir=str(tmp_path / "run"), max_steps=2,
                      batch_size=2, block_size=16, save_steps=1000, progress=False, warmup_steps=0)
    res = train(cfg, adapter={"r": 2, "target": "q_proj"}, model=model, tokenizer=ext)
    fresh = base_lm()
    lorakit.load(fresh, res.adapter_dir, check_base=True)
    ids = ids_of(ext)
    torch.testing.assert_close(logits(fresh, ids), logits(res.model, ids), rtol=0, atol=0)
    assert load_tokenizer(res.adapter_dir).get_vocab() == ext.get_vocab()


def test_a_lora_on_the_embedding_itself_round_trips_with_the_new_rows(tmp_path):
    tok = tiny_tokenizer()
    model, ext, report = expand_vocabulary(base_lm(tied=False), tok, CHICHEWA * 2, k=K, init="mean")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target=["embed_tokens", "q_proj"]))
    trainable_new_rows(model, report["n_old"])
    ids = ids_of(ext)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    path = lorakit.save(model, tmp_path / "ad")
    fresh = base_lm(tied=False)
    lorakit.load(fresh, path)  # the embedding LoRA is planned on the resized table
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
