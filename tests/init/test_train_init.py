"""train() runs every data-aware init end to end (data_init -> Trainer -> save) and the saved
adapter reloads to the trained model's outputs (EVA: with its redistributed ranks)."""

import pytest
import torch

import lorakit
from lorakit.train import TrainConfig, train
from tests.conftest import logits_of


@pytest.mark.parametrize("method,adapter", [
    ("pissa", {"r": 4}),
    ("lora_sb", {"r": 4, "init_batches": 2}),
    ("eva", {"r": 4, "init_batches": 2, "tau": 0.9}),
])
def test_train_and_reload(method, adapter, tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(text_file), output_dir=str(tmp_path / "run"), method=method,
                      block_size=16, batch_size=4, max_steps=3, lr=1e-2, warmup_steps=0, save_steps=3,
                      logging_steps=1, progress=False)
    res = train(cfg, adapter=adapter)
    if method == "eva":
        ranks = res.log["adapter"]["ranks"]
        assert sum(ranks.values()) == 4 * len(ranks)  # recorded in the run log too
    ids = torch.arange(3, 20)[None]
    res.model.eval()
    out = logits_of(res.model, ids)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lorakit.load(fresh, res.adapter_dir)
    torch.testing.assert_close(logits_of(fresh, ids), out, rtol=0, atol=1e-5)
