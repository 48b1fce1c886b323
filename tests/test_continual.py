"""The continual-learning loop and its metrics: R[i][j], average, forgetting, backward transfer."""

import json
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.continual import (
    ContinualResult,
    Strategy,
    average_accuracy,
    backward_transfer,
    check_matrix,
    evaluate_task,
    forgetting,
    run_task_sequence,
    task_classes,
)
from lorakit.errors import ConfigError
from tests.conftest import tiny_bert, tiny_llama

# R[i][j]: accuracy on task j after training task i
R3 = [[0.9, 0.1, 0.2],
      [0.7, 0.8, 0.1],
      [0.6, 0.6, 0.9]]


def test_metrics_match_a_hand_computed_matrix():
    # forgetting: j=0: max(0.9, 0.7) - 0.6 = 0.3;  j=1: max(0.1, 0.8) - 0.6 = 0.2  -> 0.25
    assert forgetting(R3) == pytest.approx(0.25, abs=1e-12)
    # BWT: (0.6 - 0.9 + 0.6 - 0.8) / 2 = -0.25
    assert backward_transfer(R3) == pytest.approx(-0.25, abs=1e-12)
    assert average_accuracy(R3) == pytest.approx((0.6 + 0.6 + 0.9) / 3, abs=1e-12)
    # a task that improved later (j=0 best at the end) contributes negative forgetting
    assert forgetting([[0.5, 0.0], [0.7, 0.9]]) == pytest.approx(-0.2, abs=1e-12)


def test_loss_metrics_use_min_and_flip_the_sign():
    losses = [[1.0, 5.0, 5.0],
              [1.5, 2.0, 5.0],
              [2.5, 2.2, 1.0]]
    # j=0: 2.5 - min(1.0, 1.5) = 1.5;  j=1: 2.2 - min(5.0, 2.0) = 0.2  -> 0.85
    assert forgetting(losses, higher_is_better=False) == pytest.approx(0.85, abs=1e-12)
    # BWT: -((2.5 - 1.0) + (2.2 - 2.0)) / 2 = -0.85: later tasks hurt earlier ones
    assert backward_transfer(losses, higher_is_better=False) == pytest.approx(-0.85, abs=1e-12)
    r = ContinualResult(matrix=losses, metric="loss")
    assert r.forgetting == pytest.approx(0.85) and not r.higher_is_better


def test_one_task_has_no_forgetting_and_result_is_json():
    assert forgetting([[0.8]]) == 0.0 and backward_transfer([[0.8]]) == 0.0
    res = ContinualResult(matrix=R3, train_loss=[1.0, 0.5, 0.2])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["forgetting"] == pytest.approx(0.25) and d["matrix"] == R3 and d["metric"] == "accuracy"


@pytest.mark.parametrize("bad,msg", [
    ([[1.0, 2.0]], r"must be square and non-empty .* got shape \(1, 2\)"),
    ([], "must be square and non-empty"),
    ([[1.0, 0.0], [0.5]], "must be a square list of lists"),
    ([[float("nan")]], "non-finite"),
])
def test_matrix_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        check_matrix(bad)


def test_task_classes():
    assert task_classes([{"labels": 2}, {"labels": torch.tensor(0)}, {"labels": 2}]) == (0, 2)
    assert task_classes([{"labels": torch.tensor([1, 2, 3])}]) is None  # token labels: not a classification task
    assert task_classes([{"labels": 0.5}]) is None


def bert_classifier(num_labels=2, seed=0):
    """tiny_bert's shape with `num_labels` classes and no dropout (the toy sequences learn
    within a few steps, reproducibly)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=128, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def cls_task(ranges, n=8, t=4, seed=0):
    """Examples whose label c is given by the token range ranges[c] the ids are drawn from."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, (lo, hi) in enumerate(ranges):
        for _ in range(n):
            ids = torch.randint(lo, hi, (t,), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones(t, dtype=torch.long), "labels": c})
    return out


class Recorder(Strategy):
    def __init__(self):
        self.calls = []
        self.optimizers = []

    def start_task(self, model, task):
        self.calls.append(("start_task", task.index, task.classes, task.steps))

    def start_epoch(self, model, task, epoch):
        self.calls.append(("start_epoch", task.index, epoch))

    def after_step(self, model, optimizer, step, task):
        self.calls.append(("step", task.index, step))
        self.optimizers.append(optimizer)

    def end_task(self, model, task):
        self.calls.append(("end_task", task.index))


def test_hooks_run_in_order_with_a_fresh_optimizer_per_task():
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target=["query"]))
    tasks = [cls_task([(8, 12), (12, 16)], n=3), cls_task([(12, 16), (8, 12)], n=2)]  # 6 and 4 examples
    rec = Recorder()
    res = run_task_sequence(model, tasks, strategy=rec, epochs=2, batch_size=4)
    # task 0: 6 examples / 4 = 2 batches x 2 epochs = 4 steps; task 1: 1 batch x 2 epochs
    assert rec.calls == [
        ("start_task", 0, (0, 1), 4), ("start_epoch", 0, 0), ("step", 0, 0), ("step", 0, 1),
        ("start_epoch", 0, 1), ("step", 0, 2), ("step", 0, 3), ("end_task", 0),
        ("start_task", 1, (0, 1), 2), ("start_epoch", 1, 0), ("step", 1, 0), ("start_epoch", 1, 1),
        ("step", 1, 1), ("end_task", 1),
    ]
    assert rec.optimizers[0] is rec.optimizers[3] and rec.optimizers[3] is not rec.optimizers[4]
    assert len(res.matrix) == 2 and all(len(row) == 2 for row in res.matrix) and len(res.train_loss) == 2
    assert not model.training  # mode restored (tiny_bert is built in eval mode)


def test_sequential_finetuning_forgets_a_conflicting_task():
    """Task B flips task A's labels: training B must destroy A, and the matrix shows it."""
    model = bert_classifier()
    lorakit.inject(model, lorakit.LoraConfig(r=4, modules_to_save=["classifier"]))
    tasks = [cls_task([(8, 12), (12, 16)], seed=1), cls_task([(12, 16), (8, 12)], seed=2)]
    res = run_task_sequence(model, tasks, epochs=4, lr=1e-2)
    r = res.matrix
    assert r[0][0] >= 0.75  # task A was learned ...
    assert r[1][1] > r[1][0]  # ... and after B the model prefers B's labelling
    assert res.forgetting == pytest.approx(r[0][0] - r[1][0]) and res.forgetting > 0.25
    assert res.backward_transfer == pytest.approx(r[1][0] - r[0][0])
    assert evaluate_task(model, tasks[1]) == pytest.approx(r[1][1])


def test_loss_metric_on_a_causal_lm():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    tasks = []
    for lo, hi in [(1, 64), (64, 128)]:
        ids = torch.randint(lo, hi, (4, 6), generator=g)
        tasks.append([{"input_ids": x, "labels": x} for x in ids])
    res = run_task_sequence(model, tasks, metric="loss", epochs=3, lr=1e-2, batch_size=2)
    r = res.matrix
    assert res.metric == "loss" and all(v > 0 for row in r for v in row)
    assert r[0][0] < r[0][1]  # the task just trained has the lower loss
    assert res.forgetting == pytest.approx(r[1][0] - r[0][0])
    with pytest.raises(ConfigError, match="metric='accuracy' needs \\(batch, classes\\) scores"):
        evaluate_task(model, tasks[0], metric="accuracy")


def _one_task():
    return [cls_task([(8, 12), (12, 16)], n=2)]


@pytest.mark.parametrize("kw,msg", [
    ({"tasks": []}, "tasks must be a non-empty list of datasets"),
    ({"tasks": "abc"}, "tasks must be a non-empty list of datasets"),
    ({"tasks": [[]]}, r"tasks\[0\] is empty"),
    ({"tasks": [[{"input_ids": torch.ones(3, dtype=torch.long)}]]}, r"tasks\[0\] examples must be dicts with a 'labels'"),
    ({"tasks": [[(1, 2)]]}, r"tasks\[0\] examples must be dicts"),
    ({"eval_tasks": _one_task() * 2}, "eval_tasks has 2 datasets but tasks has 1"),
    ({"metric": "f1"}, r"metric must be one of \('accuracy', 'loss'\), got 'f1'"),
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"lr": 0}, "lr must be a finite number > 0, got 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"weight_decay": -1.0}, "weight_decay must be a number >= 0"),
])
def test_run_task_sequence_errors(kw, msg):
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target=["query"]))
    kw = {"tasks": _one_task(), **kw}
    with pytest.raises(ConfigError, match=msg):
        run_task_sequence(model, kw.pop("tasks"), **kw)


class NoLoss(torch.nn.Module):
    """A model whose forward returns logits but no loss."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 2)

    def forward(self, input_ids, labels=None, attention_mask=None):
        return SimpleNamespace(logits=self.emb(input_ids).mean(1), loss=None)


def test_a_model_without_loss_and_a_dataset_without_len_are_errors():
    with pytest.raises(ConfigError, match="the model returned no loss for a batch with keys"):
        run_task_sequence(NoLoss(), _one_task())
    assert 0.0 <= evaluate_task(NoLoss(), _one_task()[0]) <= 1.0  # accuracy needs no loss
    with pytest.raises(ConfigError, match="metric must be one of"):
        evaluate_task(NoLoss(), _one_task()[0], metric="f1")
    with pytest.raises(ConfigError, match=r"tasks\[0\] must be a map-style dataset with len\(\)"):
        run_task_sequence(NoLoss(), [iter(_one_task()[0])])


def test_nothing_to_train_is_an_error():
    model = tiny_bert().requires_grad_(False)
    with pytest.raises(ConfigError, match="task 0: nothing to train"):
        run_task_sequence(model, _one_task())

