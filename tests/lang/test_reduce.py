"""MAFT vocabulary reduction: keep the tokens a corpus uses, slice the rows, same logits."""

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.lang import reduce_vocabulary
from tests.conftest import CORPUS, tiny_tokenizer
from tests.lang.test_vocab import CHICHEWA, ODD, _sentencepiece_bpe_tokenizer, _unigram_tokenizer, enc, tiny_lm

ENGLISH = "The quick brown fox jumps over the lazy dog."


def _bos_tokenizer():
    """The tiny byte-level tokenizer with a post-processor that prepends <s> (like Llama)."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_reduced_model_gives_identical_logits_on_kept_tokens(tied):
    tok = tiny_tokenizer()
    model = tiny_lm(320, tied=tied)  # 300 tokens + 20 padding rows
    full = tiny_lm(320, tied=tied)
    model, small, report = reduce_vocabulary(model, tok, CHICHEWA)
    kept, old_to_new = report["kept_ids"], report["old_to_new"]
    assert report["n_before"] == 320 and report["n_after"] == len(kept) == len(small) < 300
    assert model.get_input_embeddings().weight.shape == (len(kept), 32)
    assert model.get_output_embeddings().weight.shape == (len(kept), 32)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert model.config.vocab_size == len(kept)
    for text in CHICHEWA:
        old_ids = torch.tensor([enc(tok, text)])
        new_ids = torch.tensor([enc(small, text)])
        assert torch.equal(new_ids, old_to_new[old_ids])  # same pieces, ids remapped
        assert torch.equal(kept[new_ids], old_ids)
        assert small.decode(new_ids[0]) == text
        with torch.no_grad():
            want = full(old_ids).logits[..., kept]
            got = model(new_ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bytes_saved_and_text_outside_the_corpus_still_encodes():
    tok = tiny_tokenizer()
    model = tiny_lm(300, tied=False)
    before = sum(p.numel() for p in model.parameters()) * 4
    model, small, report = reduce_vocabulary(model, tok, CHICHEWA)
    removed = 300 - report["n_after"]
    assert report["params_saved"] == removed * 32 * 2
    assert report["bytes_saved"] == removed * 32 * 2 * 4
    assert report["bytes_before"] == before and report["bytes_after"] == before - report["bytes_saved"]
    assert 0 < report["fraction_saved"] < 1
    # the byte alphabet was kept, so any text still encodes and round-trips (in more pieces)
    for text in [ENGLISH, "émoji 🙂 ünïcode", "Zzz 123!?"]:
        ids = enc(small, text)
        assert max(ids) < len(small) and small.decode(ids) == text
    assert len(enc(small, ENGLISH)) > len(enc(tok, ENGLISH))


def test_without_alphabet_only_used_tokens_and_their_merge_parents_remain():
    tok = tiny_tokenizer()
    _, small, report = reduce_vocabulary(tiny_lm(300), tok, CHICHEWA, keep_alphabet=False)
    _, small_alpha, _ = reduce_vocabulary(tiny_lm(300), tok, CHICHEWA)
    assert len(small) < len(small_alpha)
    used = {i for t in CHICHEWA for i in enc(tok, t)}
    assert used <= set(report["kept_ids"].tolist())
    for text in CHICHEWA:
        assert small.decode(enc(small, text)) == text


def test_specials_and_config_ids_are_remapped():
    tok = _bos_tokenizer()
    model = tiny_lm(300)
    old = {name: getattr(tok, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model, small, report = reduce_vocabulary(model, tok, CHICHEWA)
    o2n = report["old_to_new"]
    for name, old_id in old.items():
        assert getattr(small, name) == int(o2n[old_id])
        assert getattr(model.config, name) == int(o2n[getattr(tiny_lm(300).config, name)])
    # the post-processor's <s> id follows the remapping
    ids = small(CHICHEWA[0])["input_ids"]
    assert ids[0] == small.bos_token_id == int(o2n[tok.bos_token_id])
    assert ids == o2n[torch.tensor(tok(CHICHEWA[0])["input_ids"])].tolist()


def test_keep_special_false_drops_unused_specials_but_not_the_post_processor_ones():
    tok = _bos_tokenizer()
    _, small, _ = reduce_vocabulary(tiny_lm(300), tok, CHICHEWA, keep_special=False)
    vocab = small.get_vocab()
    assert "<s>" in vocab  # inserted by the post-processor
    assert "<pad>" not in vocab and "</s>" not in vocab


def test_unigram_reduction_keeps_the_segmentation():
    tok = _unigram_tokenizer()
    model = tiny_lm(len(tok))
    full = tiny_lm(len(tok))
    model, small, report = reduce_vocabulary(model, tok, CORPUS[1::2])
    assert report["n_after"] < len(tok)
    for text in CORPUS[1::2]:
        old_ids = torch.tensor([enc(tok, text)])
        new_ids = torch.tensor([enc(small, text)])
        assert torch.equal(report["kept_ids"][new_ids], old_ids)
        with torch.no_grad():
            torch.testing.assert_close(model(new_ids).logits, full(old_ids).logits[..., report["kept_ids"]],
                                       rtol=0, atol=1e-6)


def test_byte_fallback_pieces_are_kept_so_any_text_still_encodes():
    tok = _sentencepiece_bpe_tokenizer()
    _, small, report = reduce_vocabulary(tiny_lm(len(tok)), tok, CHICHEWA)
    assert sum(t.startswith("<0x") for t in small.get_vocab()) == 256
    for text in CHICHEWA:
        assert torch.equal(report["kept_ids"][torch.tensor(enc(small, text))], torch.tensor(enc(tok, text)))
    for text in [*ODD, ENGLISH]:
        assert small.decode(enc(small, text)) == text


def test_mismatched_model_and_bad_texts_raise():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="do not belong together"):
        reduce_vocabulary(tiny_lm(128), tok, CHICHEWA)
    with pytest.raises(ConfigError, match="list of strings"):
        reduce_vocabulary(tiny_lm(300), tok, CHICHEWA[0])


@pytest.mark.integration
def test_smollm2_reduced_to_chichewa_keeps_its_logits():
    from lorakit.data import chichewa_split
    from lorakit.models import load_model

    model, tok = load_model("smollm2-135m")
    full, _ = load_model("smollm2-135m")
    train, _ = chichewa_split()
    train = train[:60]
    model, small, report = reduce_vocabulary(model, tok, train)
    assert report["n_after"] < 0.5 * report["n_before"]
    assert report["fraction_saved"] > 0.1  # the tied 49k x 576 embedding is ~20% of 135M
    text = train[0][:400]
    old_ids = torch.tensor([enc(tok, text)])
    new_ids = torch.tensor([enc(small, text)])
    assert torch.equal(report["kept_ids"][new_ids], old_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(new_ids).logits, full(old_ids).logits[..., report["kept_ids"]],
                                   rtol=0, atol=1e-4)
    assert small.decode(enc(small, "Hello, world! 🙂")) == "Hello, world! 🙂"
