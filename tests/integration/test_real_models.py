"""A handful of steps on the real packaged models (marked `integration`; `make test-fast` skips them)."""

import pytest
import torch

import lorakit
from lorakit.train import TrainConfig, train

pytestmark = pytest.mark.integration


def test_smollm2_few_steps_then_peft_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    from lorakit.models import load_model

    res = train(TrainConfig(model="smollm2-135m", data="chichewa", output_dir=str(tmp_path / "run"), max_steps=3,
                            batch_size=2, block_size=64, save_steps=3, logging_steps=1, progress=False),
                adapter={"r": 4, "target": ["q_proj", "v_proj"]})
    losses = [h["loss"] for h in res.log["history"] if "loss" in h]
    assert len(losses) == 3 and all(l == l and l < 20 for l in losses)
    ids = res.tokenizer("Pachiyambi Mulungu analenga", return_tensors="pt").input_ids
    res.model.eval()
    with torch.no_grad():
        ours = res.model(ids).logits
    base, _ = load_model("smollm2-135m")
    pm = peft.PeftModel.from_pretrained(base, str(res.adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours, rtol=0, atol=1e-4)


def test_minilm_sequence_classification_trains(tmp_path):
    res = train(TrainConfig(model="minilm-l6", task="seq-cls", data="bbc-news", output_dir=str(tmp_path / "bbc"),
                            max_steps=4, batch_size=8, max_length=64, lr=5e-4, save_steps=4, logging_steps=1,
                            progress=False),
                adapter={"r": 4})
    assert res.model.classifier.weight.requires_grad
    fresh_losses = [h["loss"] for h in res.log["history"] if "loss" in h]
    assert len(fresh_losses) == 4
    from lorakit.models import load_model

    m, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    lorakit.load(m, res.adapter_dir)
    enc = tok(["Shares rose sharply on Monday."], return_tensors="pt")
    res.model.eval(), m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(**enc).logits, res.model(**enc).logits, rtol=0, atol=1e-5)
