"""Self-evolution MLM (Vega v2): informative-token masking and rectified smoothed labels."""

import pytest
import torch

from lorakit.data.masking import (
    IGNORE_INDEX,
    SelfEvolutionCollator,
    SelfEvolutionConfig,
    SelfEvolutionMLM,
    mask_budget,
    score_tokens,
    select_informative,
    self_evolution,
    self_evolution_loss,
    soft_targets,
)
from lorakit.errors import ConfigError
from tests.conftest import tiny_bert

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "and", "then", "far", "away", "big", "small", "red", "blue", "green", "old", "new", "house", "tree", "river", "hill", "sun", "moon", "star", "bird", "fish", "boat", "road", "town", "city"]


def mlm_tokenizer():
    """Word-level BERT-style tokenizer ([CLS] x [SEP]); ids < 128 fit the tiny BERT's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_mlm(seed=0):
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_bert(seed).config).eval()


def sentences(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (length,), generator=g).tolist()) for _ in range(n)]


def features(tok, texts):
    return [{"input_ids": tok(t)["input_ids"]} for t in texts]


@pytest.fixture(scope="module")
def tok():
    return mlm_tokenizer()


def test_config_validation():
    with pytest.raises(ConfigError, match="mask_prob"):
        SelfEvolutionConfig(mask_prob=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        SelfEvolutionConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="must be <= 1"):
        SelfEvolutionConfig(mask_replace_prob=0.9, random_replace_prob=0.2)
    with pytest.raises(ConfigError, match="loss_threshold"):
        SelfEvolutionConfig(loss_threshold=float("nan"))
    with pytest.raises(ConfigError, match="ref_dtype"):
        SelfEvolutionConfig(ref_dtype="int8")
    with pytest.raises(ConfigError, match="alpha"):
        SelfEvolutionMLM(tiny_mlm(), alpha=-0.1)


def test_tokenizer_without_mask_token_is_rejected(tok):
    from tests.conftest import tiny_tokenizer

    with pytest.raises(ConfigError, match="mask token"):
        SelfEvolutionCollator(tiny_mlm(), tiny_tokenizer())


def test_low_precision_reference_distributions(tok):
    batch = SelfEvolutionCollator(tiny_mlm(), tok, SelfEvolutionConfig(ref_dtype="bfloat16"))(
        features(tok, sentences(3, 10)))
    assert batch["ref_probs"].dtype == torch.bfloat16
    assert torch.isfinite(SelfEvolutionMLM(tiny_mlm())(**batch).loss)


def test_mask_budget():
    assert [mask_budget(n, 0.15) for n in (0, 1, 3, 10, 20, 100)] == [0, 1, 1, 2, 3, 15]


def test_deterministic_given_seed(tok):
    model, feats = tiny_mlm(), features(tok, sentences(6, 12))
    a = SelfEvolutionCollator(model, tok, SelfEvolutionConfig(seed=3))
    b = SelfEvolutionCollator(model, tok, SelfEvolutionConfig(seed=3))
    c = SelfEvolutionCollator(model, tok, SelfEvolutionConfig(seed=4))
    for _ in range(2):  # the same sequence of batches, not only the first one
        x, y, z = a(feats), b(feats), c(feats)
        for key in x:
            assert torch.equal(x[key], y[key]), key
    assert torch.equal(x["labels"], z["labels"])  # selection is by loss, not by chance
    assert not torch.equal(x["input_ids"], z["input_ids"])  # the 80/10/10 draw depends on the seed


def test_masks_highest_loss_tokens_not_predictable_ones(tok):
    model = tiny_mlm()
    easy = [tok.convert_tokens_to_ids(w) for w in ("the", "a", "and")]
    with torch.no_grad():  # the head predicts these three everywhere: near-zero loss when they occur
        model.cls.predictions.bias[easy] = 30.0
    texts = ["the cat a sat and the dog a ran and the mat"] * 2
    texts += sentences(4, 14, seed=5)
    feats = features(tok, texts)
    batch = SelfEvolutionCollator(model, tok)(feats)
    ids = torch.tensor([f["input_ids"] for f in feats[:2]])
    labelled = batch["labels"][:2, : ids.shape[1]] != IGNORE_INDEX
    assert labelled.any()
    assert not torch.isin(ids[labelled], torch.tensor(easy)).any()
    # and the picks are exactly the top-loss eligible tokens
    scores, _ = score_tokens(model, ids)
    eligible = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    for row in range(2):
        k = int(labelled[row].sum())
        top = torch.where(eligible[row], scores[row], torch.tensor(float("-inf"))).topk(k).values
        assert torch.allclose(scores[row][labelled[row]].sort().values, top.sort().values)


def test_loss_threshold_fills_budget_at_random(tok):
    scores = torch.tensor([[9.0, 0.1, 0.2, 0.3, 8.0, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.1, 0.3,
                            0.2, 0.1, 0.2, 0.3]])
    eligible = torch.ones_like(scores, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    sel = select_informative(scores, eligible, 0.15, loss_threshold=5.0, generator=g)
    assert int(sel.sum()) == 3 and sel[0, 0] and sel[0, 4]  # both hard tokens + one random filler
    sel_top = select_informative(scores, eligible, 0.15)
    assert sel_top[0, [0, 4]].all() and sel_top[0, 11]  # pure top-k: third pick is the 0.4


def test_budget_and_special_tokens(tok):
    model = tiny_mlm()
    lengths = [3, 7, 10, 20, 33]
    feats = features(tok, [s for n in lengths for s in sentences(1, n, seed=n)])
    batch = SelfEvolutionCollator(model, tok)(feats)
    labelled = batch["labels"] != IGNORE_INDEX
    for row, n in enumerate(lengths):
        assert int(labelled[row].sum()) == mask_budget(n, 0.15)
    # [CLS], [SEP] and padding are never selected
    padded = tok.pad(feats, return_tensors="pt")["input_ids"]
    special = torch.isin(padded, torch.tensor(tok.all_special_ids))
    assert not (labelled & special).any()
    assert torch.equal(batch["input_ids"][special], padded[special])


def test_replacement_rule_80_10_10(tok):
    model = tiny_mlm()
    feats = features(tok, sentences(80, 40, seed=1))
    batch = SelfEvolutionCollator(model, tok, SelfEvolutionConfig(seed=0))(feats)
    original = tok.pad(feats, return_tensors="pt")["input_ids"]
    sel = batch["labels"] != IGNORE_INDEX
    n = int(sel.sum())
    masked = (batch["input_ids"][sel] == tok.mask_token_id).float().mean().item()
    kept = (batch["input_ids"][sel] == original[sel]).float().mean().item()
    assert n == 80 * 6
    assert abs(masked - 0.8) < 0.05 and abs(kept - 0.1) < 0.04 and 1 - masked - kept > 0.05
    assert not torch.isin(batch["input_ids"][sel], torch.tensor([tok.pad_token_id, tok.cls_token_id,
                                                                 tok.sep_token_id])).any()
    assert torch.equal(batch["input_ids"][~sel], original[~sel])


def test_soft_labels_sum_to_one_and_match_formula(tok):
    model, alpha = tiny_mlm(), 0.3
    feats = features(tok, sentences(4, 15, seed=2))
    batch = SelfEvolutionCollator(model, tok, SelfEvolutionConfig(alpha=alpha))(feats)
    sel = batch["labels"] != IGNORE_INDEX
    # ref_probs = the model's own distribution on the *unmasked* input at the selected positions
    original = tok.pad(feats, return_tensors="pt")
    with torch.no_grad():
        ref = torch.softmax(model(**original).logits, -1)[sel]
    assert torch.allclose(batch["ref_probs"], ref, atol=1e-6)
    y = batch["labels"][sel]
    q = soft_targets(y, batch["ref_probs"], alpha)
    assert torch.allclose(q.sum(-1), torch.ones(len(q)), atol=1e-5)
    assert torch.allclose(q, (1 - alpha) * torch.nn.functional.one_hot(y, q.shape[-1]) + alpha * ref, atol=1e-6)
    logits = torch.randn(*batch["labels"].shape, q.shape[-1], generator=torch.Generator().manual_seed(0))
    expected = -(q * torch.log_softmax(logits[sel], -1)).sum(-1).mean()
    assert torch.allclose(self_evolution_loss(logits, batch["labels"], batch["ref_probs"], alpha), expected, atol=1e-5)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    assert torch.allclose(self_evolution_loss(logits, batch["labels"], None), plain, atol=1e-5)
    with pytest.raises(ValueError, match="one row per labelled position"):
        self_evolution_loss(logits, batch["labels"], batch["ref_probs"][1:], alpha)


def test_wrapper_training_reduces_loss(tok):
    model = tiny_mlm().train()
    wrapped, collator = self_evolution(model, tok, SelfEvolutionConfig(seed=0))
    data = features(tok, sentences(16, 12, seed=7))
    fixed = collator(data[:8])  # a fixed evaluation batch

    def eval_loss():
        wrapped.eval()
        with torch.no_grad():
            loss = wrapped(**fixed).loss.item()
        wrapped.train()
        return loss

    before = eval_loss()
    opt = torch.optim.Adam(wrapped.parameters(), lr=3e-3)
    for step in range(20):
        batch = collator(data[(step % 2) * 8:(step % 2) * 8 + 8])
        opt.zero_grad()
        loss = wrapped(**batch).loss
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.85 * before, (before, after)


def test_hf_trainer_runs(tok, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_mlm()
    wrapped, collator = self_evolution(model, tok)
    data = features(tok, sentences(12, 10, seed=3))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-3,
                             remove_unused_columns=False, disable_tqdm=True)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=wrapped, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 100 for x in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
