"""Tokenizers built in code for the data tests: offline, instant, and with known ids."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[UNK]", "<eos>", "<pad>"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: id = position of the word in SPECIALS + sorted(words)."""
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>")


def bpe_tokenizer(corpus: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus`` in milliseconds; decoding is lossless."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture
def words_tok():
    return word_tokenizer("the cat sat on a mat dog ran far away and then".split())


@pytest.fixture(scope="session")
def bpe_tok():
    corpus = ["Ndipo mau a Yehova anadza kwa Yona mwana wa Amitai, ndi kuti,"] * 3 + [
        "Now the word of the LORD came unto Jonah the son of Amittai, saying,"
    ] * 3
    return bpe_tokenizer(corpus)
