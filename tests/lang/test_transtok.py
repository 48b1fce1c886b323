"""Trans-tokenization: IBM Model 1 token alignment and alignment-weighted embedding init."""

import numpy as np
import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.lang.transtok import (
    align_ibm1,
    bible_pairs,
    expand_vocabulary_transtok,
    resize_and_init_transtok,
    transtokenize_embeddings,
)
from lorakit.lang.vocab import expand_vocabulary, extend_tokenizer, train_new_tokens
from tests.conftest import tiny_tokenizer

SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>"]
WORDS = [f"w{i:02d}" for i in range(60)]


def word_tok(words):
    """Whitespace word-level tokenizer: ids = SPECIALS, then ``words`` in the given order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_lm(vocab_size, tied=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def cipher_corpus(n=400, noise=0.0, seed=0):
    """A planted "language": target word = CIPHER[source word], order shuffled per sentence.

    With ``noise``, each target word is dropped with that probability and a random target word
    is inserted per sentence. Returns (pairs, cipher dict, target tokenizer)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(WORDS))
    cipher = {w: f"k{perm[i]:02d}x" for i, w in enumerate(WORDS)}
    zipf = 1.0 / np.arange(1, len(WORDS) + 1) ** 0.7
    zipf /= zipf.sum()
    pairs = []
    for _ in range(n):
        src = list(rng.choice(WORDS, size=int(rng.integers(5, 13)), p=zipf))
        tgt = [cipher[w] for w in src if rng.random() >= noise]
        if noise:
            tgt.insert(int(rng.integers(0, len(tgt) + 1)), cipher[WORDS[int(rng.integers(len(WORDS)))]])
        rng.shuffle(tgt)
        pairs.append((" ".join(src), " ".join(tgt)))
    return pairs, cipher, word_tok(sorted(cipher.values()))


def ids_of(tok, texts):
    return tok(texts, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- aligner


def test_aligner_recovers_the_planted_mapping_despite_noise():
    src_tok = word_tok(WORDS)
    pairs, cipher, tgt_tok = cipher_corpus(noise=0.1)
    al = align_ibm1(ids_of(src_tok, [s for s, _ in pairs]), ids_of(tgt_tok, [t for _, t in pairs]))
    best = al.best()
    planted = {tgt_tok.convert_tokens_to_ids(cipher[w]): src_tok.convert_tokens_to_ids(w) for w in WORDS}
    correct = sum(best.get(t) == s for t, s in planted.items())
    assert correct / len(planted) >= 0.95
    assert al.n_sentences == len(pairs)
    # Viterbi counts are integers and every target position is aligned (to a token or NULL)
    assert np.all(al.counts == np.round(al.counts))
    assert al.counts.sum() + al.n_null == al.n_target_tokens


def test_aligner_expected_counts_sum_to_the_non_null_posterior_mass():
    src_tok = word_tok(WORDS)
    pairs, _, tgt_tok = cipher_corpus(n=100)
    al = align_ibm1(ids_of(src_tok, [s for s, _ in pairs]), ids_of(tgt_tok, [t for _, t in pairs]),
                    counts="expected")
    assert al.counts.sum() + al.n_null == pytest.approx(al.n_target_tokens)
    assert not np.all(al.counts == np.round(al.counts))


def test_aligner_is_deterministic_and_chunking_does_not_change_it():
    src_tok = word_tok(WORDS)
    pairs, _, tgt_tok = cipher_corpus(n=150, noise=0.1, seed=3)
    s, t = ids_of(src_tok, [p[0] for p in pairs]), ids_of(tgt_tok, [p[1] for p in pairs])
    a, b = align_ibm1(s, t), align_ibm1(s, t)
    c = align_ibm1(s, t, chunk_pairs=97)  # many small chunks
    for x in (b, c):
        assert np.array_equal(a.target_ids, x.target_ids) and np.array_equal(a.source_ids, x.source_ids)
        assert np.allclose(a.counts, x.counts)


def test_aligner_skips_empty_sides_and_rejects_bad_corpora():
    al = align_ibm1([[1, 2], [], [3]], [[5, 6], [7], []])
    assert al.n_sentences == 1
    with pytest.raises(ConfigError, match="3 sentences but target_ids has 2"):
        align_ibm1([[1], [2], [3]], [[1], [2]])
    with pytest.raises(ConfigError, match="no sentence pair"):
        align_ibm1([[], [1]], [[1], []])
    with pytest.raises(ConfigError, match="no sentence pair"):
        align_ibm1([], [])
    with pytest.raises(ConfigError, match="iterations"):
        align_ibm1([[1]], [[1]], iterations=0)
    with pytest.raises(ConfigError, match="counts"):
        align_ibm1([[1]], [[1]], counts="soft")
    with pytest.raises(ConfigError, match="negative"):
        align_ibm1([[1, -2]], [[1]])


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("tied", [True, False])
def test_each_cipher_token_gets_its_source_words_embedding(tied):
    src_tok = word_tok(WORDS)
    pairs, cipher, tgt_tok = cipher_corpus()
    model = tiny_lm(len(src_tok), tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tt = transtokenize_embeddings(model, src_tok, tgt_tok, pairs)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert tt.input.shape == (len(tgt_tok), 32)
    assert (tt.output is None) == tied
    for w in WORDS:
        t, s = tgt_tok.convert_tokens_to_ids(cipher[w]), src_tok.convert_tokens_to_ids(w)
        assert tt.mapping[t] == [(s, 1.0)]
        assert torch.equal(tt.input[t], emb[s])
        if not tied:
            assert torch.equal(tt.output[t], head[s])
    # special tokens map by role; nothing fell back; the model is left untouched
    for name in ("<s>", "</s>", "<pad>", "[UNK]"):
        assert torch.equal(tt.input[tgt_tok.convert_tokens_to_ids(name)], emb[src_tok.convert_tokens_to_ids(name)])
    assert tt.fallback_ids == [] and tt.coverage == 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rows_are_the_alignment_count_weighted_average():
    # "zz" is aligned twice to w01 and once to w02: its row is 2/3 E[w01] + 1/3 E[w02]
    src_tok = word_tok(WORDS)
    tgt_tok = word_tok(["zz", "yy"])
    pairs = [("w01", "zz"), ("w01", "zz"), ("w02", "zz"), ("w03", "yy")]
    model = tiny_lm(len(src_tok))
    tt = transtokenize_embeddings(model, src_tok, tgt_tok, pairs)
    e = model.get_input_embeddings().weight.detach()
    zz = tgt_tok.convert_tokens_to_ids("zz")
    a, b = src_tok.convert_tokens_to_ids("w01"), src_tok.convert_tokens_to_ids("w02")
    assert tt.mapping[zz] == [(a, pytest.approx(2 / 3)), (b, pytest.approx(1 / 3))]
    assert torch.allclose(tt.input[zz], 2 / 3 * e[a] + 1 / 3 * e[b], atol=1e-6)
    # min_count drops the rare pair: only w01 survives
    tt2 = transtokenize_embeddings(model, src_tok, tgt_tok, pairs, min_count=2)
    assert tt2.mapping[zz] == [(a, 1.0)]
    assert tgt_tok.convert_tokens_to_ids("yy") in tt2.fallback_ids


def test_unaligned_tokens_fall_back_to_mean_or_merge():
    src_tok = word_tok(WORDS)
    tgt_tok = word_tok(["zz", "w05", "unseen"])  # "w05" is also a source word, "unseen" never occurs
    pairs = [("w01 w02", "zz zz")]
    model = tiny_lm(len(src_tok))
    e = model.get_input_embeddings().weight.detach()
    mean = e[: len(src_tok)].mean(0)
    unseen, w05 = tgt_tok.convert_tokens_to_ids("unseen"), tgt_tok.convert_tokens_to_ids("w05")
    tt = transtokenize_embeddings(model, src_tok, tgt_tok, pairs, fallback="mean", target_ids=[unseen, w05])
    assert tt.target_ids == [unseen, w05] and tt.input.shape == (2, 32)
    assert torch.allclose(tt.input[0], mean, atol=1e-6)
    # a target token that is a source token: the identical pseudo-count maps it to itself
    assert torch.equal(tt.input[1], e[src_tok.convert_tokens_to_ids("w05")])
    tt = transtokenize_embeddings(model, src_tok, tgt_tok, pairs, identical_count=0, target_ids=[w05])
    assert tt.fallback_ids == [w05]
    assert torch.equal(tt.input[0], e[src_tok.convert_tokens_to_ids("w05")])  # "merge": its own source piece


def test_transtok_rejects_bad_input():
    src_tok = word_tok(WORDS)
    model = tiny_lm(len(src_tok))
    with pytest.raises(ConfigError, match="empty"):
        transtokenize_embeddings(model, src_tok, src_tok, [])
    with pytest.raises(ConfigError, match=r"parallel_pairs\[1\]"):
        transtokenize_embeddings(model, src_tok, src_tok, [("w01", "w01"), ("w02",)])
    with pytest.raises(ConfigError, match="two strings"):
        transtokenize_embeddings(model, src_tok, src_tok, [("w01", 3)])
    with pytest.raises(ConfigError, match="list of"):
        transtokenize_embeddings(model, src_tok, src_tok, "w01 w02")
    with pytest.raises(ConfigError, match="no sentence pair"):
        transtokenize_embeddings(model, src_tok, src_tok, [("", "w01")])
    with pytest.raises(ConfigError, match="fallback"):
        transtokenize_embeddings(model, src_tok, src_tok, [("w01", "w01")], fallback="random")
    with pytest.raises(ConfigError, match="min_count"):
        transtokenize_embeddings(model, src_tok, src_tok, [("w01", "w01")], min_count=0)
    with pytest.raises(ConfigError, match="outside the target vocabulary"):
        transtokenize_embeddings(model, src_tok, src_tok, [("w01", "w01")], target_ids=[10_000])
    with pytest.raises(ConfigError, match="do not belong together"):
        transtokenize_embeddings(tiny_lm(10), src_tok, src_tok, [("w01", "w01")])


# --------------------------------------------------------------------------- vocabulary expansion

EN = ["quick", "brown", "fox", "jumps", "over", "lazy", "dog", "box", "five", "dozen", "jugs"]
NY = {w: "ka" + w[::-1] for w in EN}  # the planted target word for each English word


def en_ny_pairs(n=200, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        words = list(rng.choice(EN, size=int(rng.integers(4, 9))))
        pairs.append((" ".join(words), " ".join(NY[w] for w in words)))
    return pairs


@pytest.mark.parametrize("tied", [True, False])
def test_expansion_with_transtok_init_aligns_new_words_to_their_translation(tied):
    tok = tiny_tokenizer()
    model = tiny_lm(300, tied=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    pairs = en_ny_pairs()
    model, new_tok, report = expand_vocabulary_transtok(model, tok, [t for _, t in pairs], k=40,
                                                        parallel_pairs=pairs)
    n_old = report["n_old"]
    assert report["init"] == "transtok" and report["n_added"] > 0
    assert report["n_aligned"] + report["n_fallback"] == report["n_added"]
    # intermediate BPE pieces never survive in the final segmentation (they fall back to merge);
    # the used ones are aligned, bar a shared prefix piece ("ka") that IBM 1 gives to NULL
    used = {i for ids in ids_of(new_tok, [t for _, t in pairs]) for i in ids if i >= report["n_old"]}
    assert len(used) >= 10 and report["n_aligned"] >= 0.9 * len(used)
    assert report["fertility_after"] < report["fertility_before"]
    emb, head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    assert torch.equal(emb[:300], old_in)  # old rows unchanged
    if not tied:
        assert torch.equal(head[:300], old_out)
    # each new token that is a whole target word is initialised from the English word's pieces only
    vocab = new_tok.get_vocab()
    checked = 0
    for en, ny in NY.items():
        piece = "Ġ" + ny
        if piece not in vocab or vocab[piece] < n_old:
            continue
        en_pieces = set(tok(" " + en, add_special_tokens=False)["input_ids"]) | set(
            tok(en, add_special_tokens=False)["input_ids"])
        nid = vocab[piece]
        mapping = transtokenize_embeddings(tiny_lm(300, tied=tied), tok, new_tok, pairs, target_ids=[nid]).mapping
        assert {s for s, _ in mapping[nid]} <= en_pieces
        expected = sum(w * old_in[s] for s, w in mapping[nid])
        assert torch.allclose(emb[nid], expected, atol=1e-5)
        if not tied:
            assert torch.allclose(head[nid], sum(w * old_out[s] for s, w in mapping[nid]), atol=1e-5)
        checked += 1
    assert checked >= 5


def test_transtok_without_alignments_equals_the_merge_init():
    tok = tiny_tokenizer()
    pairs = en_ny_pairs(n=80)
    texts = [t for _, t in pairs]
    new_tok = extend_tokenizer(tok, train_new_tokens(texts, tok, k=20))
    a, b = tiny_lm(300), tiny_lm(300)
    tt = resize_and_init_transtok(a, tok, new_tok, pairs, min_count=10**9)  # every new token falls back
    assert len(tt.fallback_ids) == len(tt.target_ids) > 0
    expand_b = expand_vocabulary(b, tok, texts, k=20, init="merge")[0]
    assert torch.allclose(a.get_input_embeddings().weight, expand_b.get_input_embeddings().weight, atol=1e-6)
    with pytest.raises(ConfigError, match="adds no token"):
        resize_and_init_transtok(tiny_lm(300), tok, tok, pairs)


# --------------------------------------------------------------------------- real corpus


@pytest.mark.integration
def test_bible_alignment_finds_mulungu_is_god():
    pairs = bible_pairs(["Genesis"])
    assert len(pairs) > 1500 and all(en and ny for en, ny in pairs)
    norm = [(" ".join(w.strip(".,;:!?'\"()").lower() for w in en.split()),
             " ".join(w.strip(".,;:!?'\"()").lower() for w in ny.split())) for en, ny in pairs]
    en_words = sorted({w for en, _ in norm for w in en.split()})
    ny_words = sorted({w for _, ny in norm for w in ny.split()})
    en_tok, ny_tok = word_tok(en_words), word_tok(ny_words)
    al = align_ibm1(ids_of(en_tok, [e for e, _ in norm]), ids_of(ny_tok, [n for _, n in norm]))
    best = al.best()
    god = en_tok.convert_tokens_to_ids("god")
    assert best[ny_tok.convert_tokens_to_ids("mulungu")] == god
    assert best[ny_tok.convert_tokens_to_ids("yosefe")] == en_tok.convert_tokens_to_ids("joseph")
    ruth = bible_pairs(["Ruth"])
    assert len(ruth) == 85 and not set(ruth) & set(bible_pairs())  # held-out books are not in the default
