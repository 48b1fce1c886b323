"""LAE: online adapter + EMA offline adapter on one model, ensemble by the elementwise max.

METHODS.md: "an online PET module trained on the current task and an offline module updated by
EMA of it (accumulation); inference ensembles both (max of the two outputs)" —
test_ema_update_equals_the_formula_for_every_method, test_ensemble_is_the_elementwise_max_of_two_runs,
test_two_task_class_incremental_sequence_reports_the_ensembles_forgetting.
"""

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.compose.lae import (
    LAE,
    LaeConfig,
    ema_update_,
    ensemble_predict,
    only_adapter,
    param_pairs,
    task_cross_entropy,
)
from lorakit.continual import TaskInfo, forgetting, run_task_sequence
from lorakit.core.inject import adapter_modules, state
from lorakit.errors import AdapterError, ConfigError
from tests.conftest import randomize, tiny_bert


def bert_classifier(num_labels=4, seed=0):
    """tiny_bert's shape with `num_labels` classes and no dropout (learns the toy reproducibly)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def cls_task(classes, n=8, t=4, seed=0):
    """Class c's examples draw their ids from tokens [8 + 4c, 12 + 4c)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(8 + 4 * c, 12 + 4 * c, (t,), generator=g),
             "attention_mask": torch.ones(t, dtype=torch.long), "labels": c} for c in classes for _ in range(n)]


def lora(**kw):
    return lorakit.LoraConfig(**{"r": 2, "target": ["query", "value"], "modules_to_save": ["classifier"], **kw})


def batch_of(examples):
    return torch.utils.data.default_collate(examples)


@pytest.mark.parametrize("kw,msg", [
    ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\], got 1.5"),
    ({"momentum": -0.1}, "momentum must be a number in"),
    ({"momentum": True}, "momentum must be a number in"),
    ({"freeze_epochs": -1}, "freeze_epochs must be an integer >= 0, got -1"),
    ({"freeze_epochs": 1.5}, "freeze_epochs must be an integer >= 0"),
    ({"combine": "mean"}, r"combine must be one of \('prob', 'logits'\), got 'mean'"),
    ({"offline": "online"}, "online and offline adapters need different names"),
    ({"online": "a/b"}, "invalid adapter name 'a/b'"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        LaeConfig(**kw)


def test_defaults_follow_the_reference():
    cfg = LaeConfig()
    assert (cfg.momentum, cfg.freeze_epochs, cfg.combine) == (0.9999, 3, "prob")  # ema_decay, num_freeze_epochs


def test_attach_injects_an_active_online_and_a_frozen_inactive_offline_adapter():
    model = tiny_bert()
    LAE(model, lora())
    assert state(model).active == ["online"]
    assert all(p.requires_grad for m in adapter_modules(model, "online").values() for p in m.parameters())
    assert not any(p.requires_grad for m in adapter_modules(model, "offline").values() for p in m.parameters())
    assert model.classifier.weight.requires_grad  # the shared head trains


LORA_FAMILY = ["lora", "dylora", "sora", "codyra", "adalora", "increlora", "triadaptlora", "nola", "randlora",
               "loldu", "bone", "lamda", "hydra", "pissa", "lora_ga", "lora_sb", "eva"]


@pytest.mark.parametrize("method", LORA_FAMILY)
def test_ema_update_equals_the_formula_for_every_method(method):
    """Any LoRA-family method works as LAE's PET module: θ_off ← α θ_off + (1 − α) θ_on."""
    spec = lorakit.get_method(method)
    cfg = spec.config_cls(**{**getattr(spec.adapter_cls, "test_config", {}), "target": ["query", "value"]})
    model = tiny_bert()
    LAE(model, cfg)
    randomize(model, "online", seed=1)
    randomize(model, "offline", seed=2)
    pairs = param_pairs(model)
    assert pairs
    off0 = [p_off.clone() for p_off, _ in pairs]
    on0 = [p_on.clone() for _, p_on in pairs]
    ema_update_(model, 0.7)
    for (p_off, p_on), o, n in zip(pairs, off0, on0):
        assert torch.equal(p_off, 0.7 * o + (1.0 - 0.7) * n)
        assert torch.equal(p_on, n)  # the online adapter is only read


def test_momentum_zero_copies_and_one_keeps(tokens):
    model = tiny_bert()
    LAE(model, lora())
    randomize(model, "online", seed=1)
    randomize(model, "offline", seed=2)
    before = [p.clone() for p, _ in param_pairs(model)]
    ema_update_(model, 1.0)
    assert all(torch.equal(p, b) for (p, _), b in zip(param_pairs(model), before))
    ema_update_(model, 0.0)
    assert all(torch.equal(p_off, p_on) for p_off, p_on in param_pairs(model))
    with only_adapter(model, "online"):
        on = model(input_ids=tokens).logits
    with only_adapter(model, "offline"):
        off = model(input_ids=tokens).logits
    assert torch.equal(on, off) and state(model).active == ["online"]  # active set restored
    with pytest.raises(ConfigError, match="momentum must be a number in"):
        ema_update_(model, 2.0)


@pytest.mark.parametrize("combine", ["prob", "logits"])
def test_ensemble_is_the_elementwise_max_of_two_runs(combine, tokens):
    model = bert_classifier()
    LAE(model, lora())
    randomize(model, "online", seed=1, std=0.5)
    randomize(model, "offline", seed=2, std=0.5)
    lorakit.activate(model, ["online"])
    z_on = model(input_ids=tokens).logits.detach()
    lorakit.activate(model, ["offline"])
    z_off = model(input_ids=tokens).logits.detach()
    lorakit.activate(model, ["online"])
    assert not torch.allclose(z_on, z_off)
    got = ensemble_predict(model, {"input_ids": tokens, "labels": None}, combine=combine)
    expect = torch.maximum(z_on.softmax(-1), z_off.softmax(-1)) if combine == "prob" else torch.maximum(z_on, z_off)
    assert torch.equal(got, expect)
    assert (got > (z_on.softmax(-1) if combine == "prob" else z_on)).any()  # the offline expert wins somewhere
    assert state(model).active == ["online"]
    # unseen classes are out of the running; before the offline expert exists: online alone
    only = ensemble_predict(model, {"input_ids": tokens}, offline=None, classes=[0, 2], combine=combine)
    keep = torch.tensor([0, 2])
    if combine == "prob":
        torch.testing.assert_close(only[:, keep], z_on[:, keep].softmax(-1), rtol=0, atol=1e-6)
        assert torch.equal(only[:, [1, 3]], torch.zeros(3, 2))
    else:
        assert torch.equal(only[:, keep], z_on[:, keep]) and bool((only[:, [1, 3]] == float("-inf")).all())


def test_task_loss_leaves_other_classes_head_rows_without_gradient():
    model = bert_classifier()
    LAE(model, lora())
    batch = batch_of(cls_task([2, 3], n=2))
    logits = model(input_ids=batch["input_ids"]).logits
    loss = task_cross_entropy(logits, batch["labels"], (2, 3))
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 2:], batch["labels"] - 2))
    loss.backward()
    g = model.classifier.weight.grad
    assert not g[:2].any() and g[2:].abs().sum() > 0  # old classes' rows are untouched
    with pytest.raises(ConfigError, match="label 5 is outside the model's 4 classes"):
        task_cross_entropy(logits, batch["labels"], (2, 5))


def test_offline_starts_as_a_copy_at_the_second_task_and_the_online_adapter_freezes():
    model = bert_classifier()
    lae = LAE(model, lora(), LaeConfig(freeze_epochs=2, momentum=0.5))
    randomize(model, "online", seed=1)
    randomize(model, "offline", seed=2)
    t0 = TaskInfo(index=0, classes=(0, 1), epochs=3, steps=6)
    lae.start_task(model, t0)
    assert not lae.offline_ready and not any(torch.equal(a, b) for a, b in param_pairs(model))
    lae.start_epoch(model, t0, 0)  # never frozen in the first task
    online = [p for m in adapter_modules(model, "online").values() for p in m.parameters()]
    assert all(p.requires_grad for p in online)
    lae.after_step(model, None, 0, t0)  # no offline expert yet: no EMA
    assert not any(torch.equal(a, b) for a, b in param_pairs(model))

    t1 = TaskInfo(index=1, classes=(2, 3), epochs=3, steps=6)
    lae.start_task(model, t1)
    assert lae.offline_ready and all(torch.equal(a, b) for a, b in param_pairs(model))
    assert lae.seen == {0, 1, 2, 3}
    lae.start_epoch(model, t1, 0)
    assert not any(p.requires_grad for p in online)
    params = {id(p) for p in lae.parameters(model, t1)}
    assert all(id(p) in params for p in online) and id(model.classifier.weight) in params  # frozen, still optimized
    assert not any(id(p_off) in params for p_off, _ in param_pairs(model))  # never the offline adapter
    lae.start_epoch(model, t1, 1)
    assert not any(p.requires_grad for p in online)
    lae.start_epoch(model, t1, 2)
    assert all(p.requires_grad for p in online)


@pytest.mark.parametrize("kw,msg", [
    ({"epochs": 3}, "freeze_epochs=3 must be < epochs=3"),
    ({"metric": "loss"}, "LAE's ensemble is a classifier: evaluate it with metric='accuracy'"),
])
def test_sequence_errors(kw, msg):
    model = bert_classifier()
    lae = LAE(model, lora())
    tasks = [cls_task([0, 1], n=1), cls_task([2, 3], n=1)]
    with pytest.raises(ConfigError, match=msg):
        run_task_sequence(model, tasks, strategy=lae, **kw)


def test_non_classification_tasks_and_mismatched_adapters_are_errors():
    model = bert_classifier()
    lae = LAE(model, lora())
    with pytest.raises(ConfigError, match="LAE needs classification tasks"):
        lae.start_task(model, TaskInfo(index=0, classes=None, epochs=1, steps=1))
    other = bert_classifier()
    lorakit.inject(other, lora(), name="online")
    with pytest.raises(AdapterError, match="no adapter named 'offline'"):
        LAE(other)
    lorakit.inject(other, lora(r=3), name="offline")
    with pytest.raises(AdapterError, match=r"'online' has shape \(2, 32\) but 'offline' has \(3, 32\)"):
        LAE(other)
    with pytest.raises(ConfigError, match="adapter_config must be an AdapterConfig"):
        LAE(bert_classifier(), {"r": 2})
    taken = bert_classifier()
    lorakit.inject(taken, lora(), name="offline")
    with pytest.raises(AdapterError, match="adapter 'offline' already exists"):
        LAE(taken, lora())
    assert lorakit.adapter_names(taken) == ["offline"]  # no half-attached online adapter left behind


def test_two_task_class_incremental_sequence_reports_the_ensembles_forgetting():
    """Classes {0, 1} then {2, 3} on a tiny BERT classifier with a LoRA PET module."""
    model = bert_classifier()
    lae = LAE(model, lora(r=4, target="all-linear"), LaeConfig(freeze_epochs=1, momentum=0.9))
    tasks = [cls_task([0, 1], seed=1), cls_task([2, 3], seed=2)]
    res = run_task_sequence(model, tasks, strategy=lae, epochs=3, lr=1e-2)
    r = res.matrix
    assert len(r) == 2 and all(0.0 <= v <= 1.0 for row in r for v in row)
    assert r[0][0] >= 0.75  # task 0 learned (its two classes, as the ensemble sees them)
    assert r[0][1] == 0.0  # classes 2, 3 are unseen after task 0: never predicted
    assert res.forgetting == pytest.approx(forgetting(r)) == pytest.approx(r[0][0] - r[1][0])
    assert lae.offline_ready
    pairs = param_pairs(model)
    assert not all(torch.equal(a, b) for a, b in pairs)  # EMA lags behind the online adapter
    assert all(not p.requires_grad for p, _ in pairs)
    assert state(model).active == ["online"]


def test_adapters_must_match_layer_for_layer_and_name_for_name():
    model = bert_classifier()
    lorakit.inject(model, lora(target=["query"]), name="online")
    lorakit.inject(model, lora(target=["value"]), name="offline")
    with pytest.raises(AdapterError, match="adapters 'online' and 'offline' sit on different layers"):
        LAE(model)
    model = bert_classifier()
    lorakit.inject(model, lora(), name="online")
    lorakit.inject(model, lorakit.get_method("sora").config_cls(r=2, target=["query", "value"]), name="offline")
    with pytest.raises(AdapterError, match="have different parameters"):
        LAE(model)


def test_ensemble_and_task_loss_errors(tokens):
    model = bert_classifier()
    LAE(model, lora())
    with pytest.raises(ConfigError, match="combine must be one of"):
        ensemble_predict(model, {"input_ids": tokens}, combine="vote")
    randomize(model, "offline")
    lorakit.merge(model, ["offline"])
    with pytest.raises(AdapterError, match="adapter 'offline' is merged"):
        ensemble_predict(model, {"input_ids": tokens})
    with pytest.raises(ConfigError, match=r"LAE needs \(batch, classes\) logits and \(batch,\) integer labels"):
        task_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long), (0, 1))
