"""Vocabulary expansion: choosing tokens, extending the tokenizer, initialising and training new rows."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.evaluate import fertility
from lorakit.lang import (
    NewToken,
    expand_vocabulary,
    extend_tokenizer,
    load_new_rows,
    new_rows_state,
    resize_and_init,
    save_new_rows,
    train_new_tokens,
    trainable_new_rows,
)
from tests.conftest import CORPUS, tiny_tokenizer

CHICHEWA = [
    "Pachiyambi Mulungu analenga kumwamba ndi dziko lapansi.",
    "Ndipo dziko lapansi linali lopanda maonekedwe, ndi lopanda kanthu.",
    "Ndipo Mulungu anati, Kuyenera kuwala; ndipo kunali kuwala.",
    "Ndipo Mulungu anaona kuwala, kuti kunali kwabwino; ndipo Mulungu analekanitsa kuwala ndi mdima.",
    "Moni, muli bwanji? Ndili bwino, zikomo kwambiri.",
    "Mulungu anakonda dziko lapansi kotero kuti anapatsa Mwana wake.",
]
ODD = ["", "  two  spaces\n\nand\ttabs ", "émoji 🙂 ünïcode — ok", "Zzz 123!?"]


def tiny_lm(vocab_size=300, tied=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def n_tokens(tok, texts):
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def extended():
    tok = tiny_tokenizer()
    new = train_new_tokens(CHICHEWA * 2, tok, k=40)
    return tok, new, extend_tokenizer(tok, new)


# --------------------------------------------------------------------------- tokens and tokenizer


def test_new_tokens_are_new_and_their_gain_is_the_exact_token_saving(extended):
    tok, new, ext = extended
    assert 0 < len(new) <= 40
    old_vocab = tok.get_vocab()
    assert all(t.piece not in old_vocab for t in new)
    assert len({t.piece for t in new}) == len(new)
    # each merge saves exactly its pair count: the sum is the corpus token-count reduction
    assert n_tokens(tok, CHICHEWA * 2) - n_tokens(ext, CHICHEWA * 2) == sum(t.gain for t in new)
    assert fertility(ext, CHICHEWA) < fertility(tok, CHICHEWA)


def test_extended_tokenizer_round_trips_text_exactly(extended):
    _, _, ext = extended
    for text in CHICHEWA + CORPUS + ODD:
        assert ext.decode(enc(ext, text)) == text


def test_old_ids_unchanged_and_new_ids_appended(extended):
    tok, new, ext = extended
    old, now = tok.get_vocab(), ext.get_vocab()
    assert all(now[t] == i for t, i in old.items())
    assert sorted(now[t.piece] for t in new) == list(range(len(tok), len(tok) + len(new)))
    assert len(ext) == len(tok) + len(new)
    # real vocabulary entries, not "added tokens" matched before pre-tokenisation
    assert len(ext.added_tokens_decoder) == len(tok.added_tokens_decoder)


def test_text_without_new_pieces_tokenises_as_before(extended):
    tok, _, ext = extended
    for text in ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]:
        assert enc(ext, text) == enc(tok, text)
        assert max(enc(ext, text)) < len(tok)


def test_a_plain_string_becomes_one_token_by_a_chain_of_merges():
    tok = tiny_tokenizer()
    assert len(enc(tok, " analekanitsa")) > 1
    ext = extend_tokenizer(tok, [" analekanitsa"])
    assert len(enc(ext, " analekanitsa")) == 1
    assert ext.decode(enc(ext, "Mulungu analekanitsa kuwala")) == "Mulungu analekanitsa kuwala"
    # its missing prefixes were added as intermediate merges
    assert len(ext) - len(tok) == len(enc(tok, " analekanitsa")) - 1
    with pytest.raises(ConfigError, match="pre-tokens"):
        extend_tokenizer(tok, ["two words"])


def test_extend_checks_merges_and_first_id():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="neither an old token"):
        extend_tokenizer(tok, [NewToken("qqzz", left="qq", right="zz")])
    with pytest.raises(ConfigError, match="does not produce"):
        extend_tokenizer(tok, [NewToken("abc", left="a", right="b")])
    with pytest.raises(ConfigError, match="first_id"):
        extend_tokenizer(tok, [" analekanitsa"], first_id=len(tok) - 1)


def test_first_id_leaves_room_for_padded_embedding_rows():
    tok = tiny_tokenizer()
    ext = extend_tokenizer(tok, train_new_tokens(CHICHEWA, tok, k=5), first_id=320)
    new_ids = sorted(set(ext.get_vocab().values()) - set(tok.get_vocab().values()))
    assert new_ids == list(range(320, 325))
    assert all(ext.decode(enc(ext, t)) == t for t in CHICHEWA)


def test_restricting_to_a_trained_target_tokenizer():
    tok = tiny_tokenizer()
    new = train_new_tokens(CHICHEWA * 3, tok, k=20, vocab_size=400)
    ext = extend_tokenizer(tok, new)
    assert 0 < len(new) <= 20
    assert n_tokens(tok, CHICHEWA * 3) - n_tokens(ext, CHICHEWA * 3) == sum(t.gain for t in new)


def test_bad_arguments_raise_config_errors():
    tok = tiny_tokenizer()
    for kwargs in ({"k": 0}, {"k": 3, "min_frequency": 0}, {"k": 3, "vocab_size": 1}):
        with pytest.raises(ConfigError):
            train_new_tokens(CHICHEWA, tok, **kwargs)
    with pytest.raises(ConfigError, match="list of strings"):
        train_new_tokens("one string", tok, k=3)
    with pytest.raises(ConfigError, match="no text"):
        train_new_tokens(["", " "], tok, k=3)


def _unigram_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(CORPUS * 3, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"],
                                                                unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>")


def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    t.train_from_iterator(CORPUS * 3, trainers.WordPieceTrainer(vocab_size=150, special_tokens=["[UNK]", "[CLS]"],
                                                                  show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", cls_token="[CLS]")


def _sentencepiece_bpe_tokenizer():
    """A Llama-2/Gemma-style BPE: "▁" for spaces, no pre-tokenizer, <0xNN> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    t.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>"],
                                                            show_progress=False))
    data = json.loads(t.to_str())
    data["pre_tokenizer"] = None
    data["model"].update(byte_fallback=True, unk_token="<unk>")
    vocab = data["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    t = Tokenizer.from_str(json.dumps(data))
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>")


def test_sentencepiece_style_bpe_is_extended_without_merging_across_words_or_bytes():
    tok = _sentencepiece_bpe_tokenizer()
    assert tok.decode(enc(tok, ODD[2])) == ODD[2]  # byte fallback covers unseen characters
    new = train_new_tokens(CHICHEWA * 2, tok, k=40)
    assert new and all("<0x" not in t.piece for t in new)
    assert all("\u2581" not in t.piece[1:] for t in new)  # pieces never span two words
    ext = extend_tokenizer(tok, new)
    assert n_tokens(tok, CHICHEWA * 2) - n_tokens(ext, CHICHEWA * 2) == sum(t.gain for t in new)
    for text in CHICHEWA + CORPUS + ODD:
        assert ext.decode(enc(ext, text)) == text


@pytest.mark.parametrize("make", [_unigram_tokenizer, _wordpiece_tokenizer], ids=["unigram", "wordpiece"])
def test_unigram_and_wordpiece_bases_gain_used_pieces(make):
    tok = make()
    new = train_new_tokens(CHICHEWA * 3, tok, k=15, vocab_size=200)
    assert 0 < len(new) <= 15
    ext = extend_tokenizer(tok, new)
    ext_vocab = ext.get_vocab()
    assert all(ext_vocab[t] == i for t, i in tok.get_vocab().items())
    assert n_tokens(ext, CHICHEWA) < n_tokens(tok, CHICHEWA)
    used = {i for t in CHICHEWA for i in enc(ext, t)}
    assert used & set(range(len(tok), len(ext)))
    # these bases cannot round-trip everything themselves (no byte fallback: "<unk>"; BERT
    # lowercases): the extension decodes exactly as the base does
    for t in CHICHEWA:
        assert ext.decode(enc(ext, t)) == tok.decode(enc(tok, t))


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merge_init_is_the_mean_of_the_old_pieces(extended, tied):
    tok, new, ext = extended
    model = tiny_lm(len(tok), tied=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    resize_and_init(model, tok, ext, method="merge")
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape == (len(ext), 32) and model.config.vocab_size == len(ext)
    assert (w_in is w_out) == tied
    for t in new:
        i = ext.convert_tokens_to_ids(t.piece)
        pieces = enc(tok, ext.convert_tokens_to_string([t.piece]))  # the old tokenizer's pieces
        assert len(pieces) > 1
        torch.testing.assert_close(w_in[i], old_in[pieces].mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(w_out[i], old_out[pieces].mean(0), rtol=0, atol=1e-6)


def test_mean_random_and_aligned_init(extended):
    tok, new, ext = extended
    n = len(tok)
    model = tiny_lm(n)
    old = model.get_input_embeddings().weight.detach().clone()
    resize_and_init(model, tok, ext, method="mean")
    rows = model.get_input_embeddings().weight[n:]
    torch.testing.assert_close(rows, old.mean(0).expand_as(rows))

    a, b = tiny_lm(n), tiny_lm(n)
    resize_and_init(a, tok, ext, method="random", seed=3)
    resize_and_init(b, tok, ext, method="random", seed=3)
    ra = a.get_input_embeddings().weight[n:]
    assert torch.equal(ra, b.get_input_embeddings().weight[n:])
    assert 0.5 < float(ra.std() / old.std()) < 2.0

    vectors = torch.randn(len(new), 32)
    m = tiny_lm(n, tied=False)
    resize_and_init(m, tok, ext, method="aligned", aligned_vectors={"input": vectors, "output": 2 * vectors})
    assert torch.equal(m.get_input_embeddings().weight[n:], vectors)
    assert torch.equal(m.get_output_embeddings().weight[n:], 2 * vectors)
    with pytest.raises(ConfigError, match="shape"):
        resize_and_init(tiny_lm(n), tok, ext, method="aligned", aligned_vectors=torch.zeros(2, 32))
    with pytest.raises(ConfigError, match="needs aligned_vectors"):
        resize_and_init(tiny_lm(n), tok, ext, method="aligned")
    with pytest.raises(ConfigError, match="unknown init"):
        resize_and_init(tiny_lm(n), tok, ext, method="zeros")


def test_resize_refuses_a_tokenizer_that_moves_old_ids(extended):
    tok, _, _ = extended
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)))
    with pytest.raises(ConfigError, match="old id"):
        resize_and_init(tiny_lm(len(tok)), tok, swapped)


@pytest.mark.parametrize("method", ["mean", "merge", "random"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_of_old_ids_are_unchanged_on_old_text(extended, method, tied):
    """New rows are only read for new ids (input) and only add new logit columns (head), so on
    text without new tokens every old-id logit is unchanged. Probabilities are not: the new
    logits join the softmax normaliser, so the old ids' probabilities now sum to < 1."""
    tok, _, ext = extended
    model = tiny_lm(len(tok), tied=tied)
    ids = torch.tensor([enc(tok, "The quick brown fox jumps over the lazy dog.")])
    assert torch.equal(ids, torch.tensor([enc(ext, "The quick brown fox jumps over the lazy dog.")]))
    with torch.no_grad():
        before = model(ids).logits
    resize_and_init(model, tok, ext, method=method)
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape[-1] == len(ext)
    torch.testing.assert_close(after[..., : len(tok)], before, rtol=0, atol=1e-6)
    assert float(after.softmax(-1)[..., : len(tok)].sum(-1).max()) < 1.0


def test_padded_embedding_rows_come_before_the_new_ones():
    tok = tiny_tokenizer()  # 300 tokens, the model has 320 rows (a padded vocabulary)
    model = tiny_lm(320)
    old = model.get_input_embeddings().weight.detach().clone()
    model, ext, report = expand_vocabulary(model, tok, CHICHEWA * 2, k=10, init="mean")
    assert report["n_old"] == 320
    w = model.get_input_embeddings().weight
    assert w.shape[0] == 320 + report["n_added"]
    assert torch.equal(w[:320], old)
    old_vocab = tok.get_vocab()
    assert min(i for p, i in ext.get_vocab().items() if p not in old_vocab) == 320


def test_expand_vocabulary_reports_fertility_and_runs():
    tok = tiny_tokenizer()
    model = tiny_lm(len(tok), tied=False)
    model, ext, report = expand_vocabulary(model, tok, CHICHEWA * 2, k=30)
    assert report["n_added"] == len(ext) - len(tok) > 0
    assert report["fertility_after"] < report["fertility_before"]
    assert report["init"] == "merge" and len(report["tokens"]) == report["n_added"]
    ids = torch.tensor([enc(ext, CHICHEWA[3])])
    assert int(ids.max()) >= len(tok)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- training and saving new rows


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_only_new_rows_get_gradients(extended, tied):
    tok, _, ext = extended
    n_old = len(tok)
    model = tiny_lm(n_old, tied=tied)
    resize_and_init(model, tok, ext, method="merge")
    for p in model.parameters():  # as after adapter injection
        p.requires_grad_(False)
    handle = trainable_new_rows(model, n_old)
    assert len(handle.params) == (1 if tied else 2)
    before = {id(p): p.detach().clone() for p in handle.params}
    opt = torch.optim.AdamW(handle.params, lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([enc(ext, CHICHEWA[3] + " " + CHICHEWA[0])])
    model(input_ids=ids, labels=ids).loss.backward()
    for p in handle.params:
        assert p.grad is not None
        assert torch.count_nonzero(p.grad[:n_old]) == 0
        assert torch.count_nonzero(p.grad[n_old:]) > 0
    assert all(p.grad is None for p in model.parameters() if all(p is not q for q in handle.params))
    opt.step()
    for p in handle.params:
        assert torch.equal(p[:n_old], before[id(p)][:n_old])  # old rows bit-identical
        assert not torch.equal(p[n_old:], before[id(p)][n_old:])
    handle.remove()
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="n_old"):
        trainable_new_rows(model, len(ext))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_new_rows_save_and_load(extended, tied, tmp_path):
    tok, new, ext = extended
    n_old = len(tok)
    trained = tiny_lm(n_old, tied=tied)
    resize_and_init(trained, tok, ext, method="random", seed=1)
    path = save_new_rows(trained, n_old, tmp_path / "new_rows.safetensors")
    saved = load_file(str(path))
    assert saved["new_rows.input_embeddings"].shape == (len(new), 32)
    assert ("new_rows.output_embeddings" in saved) == (not tied)
    assert int(saved["new_rows.n_old"][0]) == n_old

    fresh = tiny_lm(n_old, tied=tied)  # the base model, same seed: only the new rows differ
    load_new_rows(fresh, path)
    ids = torch.tensor([enc(ext, CHICHEWA[0])])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=0, atol=0)
    load_new_rows(fresh, new_rows_state(trained, n_old))  # already resized: overwritten in place

    with pytest.raises(ConfigError, match="tied vs untied"):
        load_new_rows(tiny_lm(n_old, tied=not tied), path)
    with pytest.raises(ConfigError, match="embedding rows"):
        load_new_rows(tiny_lm(n_old + 3, tied=tied), path)
    with pytest.raises(ConfigError, match="no new rows"):
        load_new_rows(fresh, {"x": torch.zeros(1)})


# --------------------------------------------------------------------------- the real tokenizer


@pytest.mark.integration
def test_smollm2_chichewa_fertility_drops():
    from lorakit.data import chichewa_split
    from lorakit.models import load_model

    model, tok = load_model("smollm2-135m")
    train, heldout = chichewa_split()
    train = train[:60]
    n_old = model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([enc(tok, "The Lord is my shepherd; I shall not want.")])
    with torch.no_grad():
        before = model(ids).logits
    model, ext, report = expand_vocabulary(model, tok, train, k=500, init="merge")
    assert report["n_added"] == 500 and len(ext) == n_old + 500
    assert report["fertility_after"] < 0.8 * report["fertility_before"]
    assert fertility(ext, heldout) < 0.85 * fertility(tok, heldout)
    assert all(ext.decode(enc(ext, t)) == t for t in heldout)
    ext_vocab = ext.get_vocab()
    assert all(ext_vocab[t] == i for t, i in tok.get_vocab().items())
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after[..., :n_old], before, rtol=0, atol=1e-4)
