"""Tests for lorakit.evaluate with a tiny random Llama and an offline byte-level BPE tokenizer."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from lorakit.errors import ConfigError
from lorakit.evaluate import evaluate_classifier, evaluate_lm, fertility

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Moni, muli bwanji? Ndili bwino, zikomo kwambiri.",
    "Pack my box with five dozen liquor jugs.",
    "Café crème brûlée — naïve façade, ½ price!",
    "Mulungu anakonda dziko lapansi kotero kuti anapatsa Mwana wake.",
]
VOCAB = 320


def _bpe(special=("<s>", "</s>", "<pad>")):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(), bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    )
    return LlamaForCausalLM(cfg).eval()


def _window_nll(model, ids, n_pred):
    """Sum NLL of the last n_pred tokens of ids, by the model's own loss."""
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, : len(ids) - n_pred] = -100
    with torch.no_grad():
        return model(x, labels=labels).loss.item() * n_pred


def test_bits_per_byte_by_hand_one_text(model, tokenizer):
    text = CORPUS[3]  # non-ASCII: bytes != characters
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll = _window_nll(model, [tokenizer.bos_token_id] + ids, len(ids))
    out = evaluate_lm(model, tokenizer, [text], block_size=64, progress=False)
    assert out["tokens"] == len(ids)
    assert out["bytes"] == len(text.encode("utf-8")) > len(text)
    assert out["nll_nats"] == pytest.approx(nll, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)


def test_perplexity_by_hand_several_windows(model, tokenizer):
    texts = CORPUS[:3]
    block = 8
    nll, n = 0.0, 0
    for text in texts:
        s = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        # windows s[0:8], s[7:15], s[14:22], ... each predicting all but its first token
        start = 0
        while start < len(s) - 1:
            w = s[start : start + block]
            nll += _window_nll(model, w, len(w) - 1)
            n += len(w) - 1
            start += block - 1
    out = evaluate_lm(model, tokenizer, texts, block_size=block, batch_size=3, progress=False)
    assert out["tokens"] == n == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert out["nll_nats"] == pytest.approx(nll, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert out["bytes"] == sum(len(t.encode()) for t in texts)


def test_sliding_stride_by_hand(model, tokenizer):
    text = CORPUS[4]
    s = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    block, stride = 8, 3
    nll, first = 0.0, 1
    while first < len(s):
        end = min(first + stride, len(s))
        start = max(0, first - (block - stride))
        nll += _window_nll(model, s[start:end], end - first)
        first = end
    out = evaluate_lm(model, tokenizer, [text], block_size=block, stride=stride, progress=False)
    assert out["tokens"] == len(s) - 1
    assert out["nll_nats"] == pytest.approx(nll, rel=1e-5)


def test_independent_of_batch_size(model, tokenizer):
    res = [evaluate_lm(model, tokenizer, CORPUS, block_size=6, batch_size=b, progress=False) for b in (1, 2, 5, 64)]
    for r in res[1:]:
        assert r["tokens"] == res[0]["tokens"] and r["bytes"] == res[0]["bytes"]
        assert r["nll_nats"] == pytest.approx(res[0]["nll_nats"], rel=1e-5)


def test_fused_path_equals_logits_fallback(model, tokenizer):
    class LogitsOnly(torch.nn.Module):  # no base_model / output embeddings: forces the fallback
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw)

    from lorakit.evaluate import fused_head

    assert fused_head(model) is not None and fused_head(LogitsOnly(model)) is None
    a = evaluate_lm(model, tokenizer, CORPUS, block_size=10, progress=False)
    b = evaluate_lm(LogitsOnly(model), tokenizer, CORPUS, block_size=10, progress=False)
    assert a["nll_nats"] == pytest.approx(b["nll_nats"], rel=1e-5)


def test_concat_joins_texts(model, tokenizer):
    out = evaluate_lm(model, tokenizer, CORPUS[:2], block_size=16, concat=True, progress=False)
    joined = "\n\n".join(CORPUS[:2])
    assert out["bytes"] == len(joined.encode())
    assert out["tokens"] == len(tokenizer(joined, add_special_tokens=False)["input_ids"])


def test_no_bos_no_eos_drops_first_token_and_its_bytes(model):
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe())
    assert tok.bos_token_id is None and tok.eos_token_id is None
    text = CORPUS[0]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    nll = _window_nll(model, ids, len(ids) - 1)
    out = evaluate_lm(model, tok, [text], block_size=64, progress=False)
    assert out["tokens"] == len(ids) - 1
    assert out["nll_nats"] == pytest.approx(nll, rel=1e-5)
    assert out["bytes"] == len(text.encode()) - len(text[: enc["offset_mapping"][0][1]].encode())


def test_eval_restores_training_mode(model, tokenizer):
    model.train()
    evaluate_lm(model, tokenizer, CORPUS[:1], block_size=8, progress=False)
    assert model.training
    model.eval()


def test_bad_arguments(model, tokenizer):
    with pytest.raises(ConfigError):
        evaluate_lm(model, tokenizer, "a bare string", progress=False)
    with pytest.raises(ConfigError):
        evaluate_lm(model, tokenizer, CORPUS, block_size=1, progress=False)
    with pytest.raises(ConfigError):
        evaluate_lm(model, tokenizer, CORPUS, block_size=8, stride=8, progress=False)
    with pytest.raises(ConfigError, match="no tokens"):
        evaluate_lm(model, tokenizer, ["", ""], progress=False)


def test_classifier_accuracy_known_predictions(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, num_labels=3, pad_token_id=tokenizer.pad_token_id,
    )
    clf = LlamaForSequenceClassification(cfg).eval()
    texts = CORPUS + ["Zikomo.", "Hello there, fox"]
    with torch.no_grad():  # one text at a time: no padding involved
        preds = [int(clf(torch.tensor([tokenizer(t)["input_ids"]])).logits.argmax()) for t in texts]
    labels = list(preds)
    labels[0] = (labels[0] + 1) % 3
    labels[5] = (labels[5] + 1) % 3
    for bs in (1, 3, 16):
        out = evaluate_classifier(clf, tokenizer, texts, labels, batch_size=bs)
        assert out == {"accuracy": pytest.approx(5 / 7), "n": 7}
    clf.config.id2label = {0: "a", 1: "b", 2: "c"}
    clf.config.label2id = {"a": 0, "b": 1, "c": 2}
    names = ["abc"[p] for p in preds]
    assert evaluate_classifier(clf, tokenizer, texts, names)["accuracy"] == 1.0
    with pytest.raises(ConfigError):
        evaluate_classifier(clf, tokenizer, texts, labels[:-1])
    with pytest.raises(ConfigError):
        evaluate_classifier(clf, tokenizer, texts[:1], ["zzz"])


def test_fertility(tokenizer):
    texts = ["hello world", "the quick brown fox"]
    n_tok = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert fertility(tokenizer, texts) == pytest.approx(n_tok / 6)
    with pytest.raises(ConfigError):
        fertility(tokenizer, ["   "])
