"""Training on a tiny local model: outputs, chunked-loss equivalence, bit-exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, load_run_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(tiny_model_dir, text_file, out, **kw):
    base = dict(model=str(tiny_model_dir), data=str(text_file), output_dir=str(out), block_size=16,
                batch_size=4, max_steps=6, lr=1e-2, warmup_steps=0, save_steps=3, logging_steps=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def adapter_weights(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_train_writes_adapter_log_plot_and_learns(tiny_model_dir, text_file, tmp_path):
    train(cfg(tiny_model_dir, text_file, tmp_path / "run", max_steps=12), adapter={"r": 4})
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter", "train_log.json", "loss.png"} <= files
    ckpt = tmp_path / "run" / "checkpoint-12"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    assert not list(ckpt.glob("model*.safetensors"))  # adapter-only checkpoints
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    losses = [h["loss"] for h in log["history"] if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert any(t.abs().sum() > 0 for k, t in adapter_weights(tmp_path / "run").items() if "lora_B" in k)
    assert log["trainable_parameters"] < log["total_parameters"] / 5


def test_chunked_loss_matches_model_loss(tiny_model_dir, text_file, tmp_path):
    train(cfg(tiny_model_dir, text_file, tmp_path / "a", max_steps=3), adapter={"r": 4})
    train(cfg(tiny_model_dir, text_file, tmp_path / "b", max_steps=3, chunked_loss=False), adapter={"r": 4})
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_replay_mixing_runs(tiny_model_dir, text_file, tmp_path):
    res = train(cfg(tiny_model_dir, text_file, tmp_path / "r", max_steps=2, replay=0.5, replay_data=str(text_file)),
                adapter={"r": 2})
    assert res.adapter_dir.exists()


KILLED = textwrap.dedent(
    """
    import sys, time
    from transformers import TrainerCallback
    from lorakit.train import TrainConfig, train

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 3:
                time.sleep(0.5)  # leave time to be killed after checkpoint-3

    cfg = TrainConfig(**{cfg!r})
    train(cfg, adapter={{"r": 4}}, callbacks=[Slow()])
    """
)


def test_sigkill_and_resume_is_bit_identical(tiny_model_dir, text_file, tmp_path):
    ref = cfg(tiny_model_dir, text_file, tmp_path / "ref", max_steps=8, save_steps=3)
    train(ref, adapter={"r": 4})
    killed = cfg(tiny_model_dir, text_file, tmp_path / "killed", max_steps=8, save_steps=3)
    script = tmp_path / "run.py"
    script.write_text(KILLED.format(cfg={k: getattr(killed, k) for k in killed.__dataclass_fields__}))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    state_file = tmp_path / "killed" / "checkpoint-3" / "trainer_state.json"
    while not state_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state_file.exists() and not (tmp_path / "killed" / "adapter").exists(), "run was not killed mid-way"
    resumed = cfg(tiny_model_dir, text_file, tmp_path / "killed", max_steps=8, save_steps=3, resume=True)
    res = train(resumed, adapter={"r": 4})
    assert res.log["resumed_from"].endswith(("checkpoint-3", "checkpoint-6"))
    a, b = adapter_weights(tmp_path / "ref"), adapter_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_config_file_round_trip_and_unknown_keys(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: x\nmax_steps: 3\nadapter:\n  r: 4\n  target: [q_proj]\n")
    c, ad = load_run_config(f)
    assert c.max_steps == 3 and ad == {"r": 4, "target": ["q_proj"]}
    f.write_text("model: x\nmax_step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown TrainConfig key\(s\) \['max_step'\]"):
        load_run_config(f)
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(f)


@pytest.mark.parametrize("kw,msg", [(dict(task="translate"), "task"), (dict(max_steps=0), "max_steps"),
                                    (dict(replay=1.0), "replay"), (dict(method="nope"), "unknown method")])
def test_bad_train_config(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)


def test_unknown_adapter_key(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        train(cfg(tiny_model_dir, text_file, tmp_path / "x"), adapter={"rank": 4})


@pytest.mark.parametrize("kw", [dict(optim="galore", galore_rank=4, galore_update_proj_gap=2),
                                dict(optim="galore_layerwise", galore_rank=4),
                                dict(lisa=True, lisa_layers=1, lisa_interval=2)])
def test_full_parameter_training_galore_lisa(tiny_model_dir, text_file, tmp_path, kw):
    res = train(cfg(tiny_model_dir, text_file, tmp_path / "full", method="full", max_steps=4, save_steps=4, **kw))
    assert (res.adapter_dir / "model.safetensors").exists() and (res.adapter_dir / "config.json").exists()
    losses = [h["loss"] for h in res.log["history"] if "loss" in h]
    assert len(losses) == 4 and all(l == l for l in losses)
    assert res.log["memory"]["peak_rss_mb"] > 0 and res.log["memory"]["optimizer_state_mb"] > 0
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(res.adapter_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_galore_state_smaller_than_adamw(tiny_model_dir, text_file, tmp_path):
    g = train(cfg(tiny_model_dir, text_file, tmp_path / "g", method="full", max_steps=2, save_steps=2,
                  optim="galore", galore_rank=2))
    a = train(cfg(tiny_model_dir, text_file, tmp_path / "a", method="full", max_steps=2, save_steps=2))
    assert g.log["memory"]["optimizer_state_mb"] < a.log["memory"]["optimizer_state_mb"]


@pytest.mark.parametrize("kw,msg", [(dict(optim="galore"), "method='full'"), (dict(lisa=True), "method='full'"),
                                    (dict(method="full", optim="sgd"), "optim must be"),
                                    (dict(method="full", optim="galore_layerwise", grad_accum=2), "grad_accum=1")])
def test_bad_full_parameter_configs(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)


def test_gradient_checkpointing_same_adapter(tiny_model_dir, text_file, tmp_path):
    train(cfg(tiny_model_dir, text_file, tmp_path / "a", max_steps=2, save_steps=2), adapter={"r": 4})
    res = train(cfg(tiny_model_dir, text_file, tmp_path / "b", max_steps=2, save_steps=2, gradient_checkpointing=True),
                adapter={"r": 4})
    assert res.model.is_gradient_checkpointing
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert any(t.abs().sum() > 0 for k, t in b.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_resume_data_aware_method_reuses_checkpoint_config(tiny_model_dir, text_file, tmp_path):
    """EVA picks per-module ranks from data; a resumed run must rebuild exactly those."""
    import shutil

    kw = dict(method="eva", max_steps=4, save_steps=2)
    train(cfg(tiny_model_dir, text_file, tmp_path / "ref", **kw))
    train(cfg(tiny_model_dir, text_file, tmp_path / "cut", **kw))
    shutil.rmtree(tmp_path / "cut" / "adapter")  # as if killed after checkpoint-2
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    res = train(cfg(tiny_model_dir, text_file, tmp_path / "cut", resume=True, **kw))
    assert res.log["resumed_from"].endswith("checkpoint-2")
    a, b = adapter_weights(tmp_path / "ref"), adapter_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ConfigError, match="holds a 'eva' adapter"):
        train(cfg(tiny_model_dir, text_file, tmp_path / "cut", resume=True, method="lora", max_steps=4, save_steps=2))


def test_allora_optimizer_trains_adapters(tiny_model_dir, text_file, tmp_path):
    from lorakit.core.io import read_tensors

    a = train(cfg(tiny_model_dir, text_file, tmp_path / "a", max_steps=3, save_steps=3, lr=1e-2),
              adapter={"r": 4, "alpha": 4, "dropout": 0.0})
    b = train(cfg(tiny_model_dir, text_file, tmp_path / "b", max_steps=3, save_steps=3, lr=1e-2, optim="allora",
                  allora_eta=0.5), adapter={"r": 4, "alpha": 4, "dropout": 0.0})
    ta, tb = read_tensors(a.adapter_dir), read_tensors(b.adapter_dir)
    assert ta.keys() == tb.keys() and any(not torch.equal(ta[k], tb[k]) for k in ta)  # the row scaling acts
    assert all(h["loss"] == h["loss"] for h in b.log["history"] if "loss" in h)
    with pytest.raises(ConfigError, match="needs an adapter method"):
        TrainConfig(method="full", optim="allora")
    with pytest.raises(ConfigError, match="allora_eta must be"):
        TrainConfig(optim="allora", allora_eta=0)


def test_quantized_bf16_base_trains_fp32_adapter_with_lean_activations(tiny_model_dir, text_file, tmp_path):
    import math

    import lorakit
    from lorakit.models import load_model
    from lorakit.quant import QuantLinear

    res = train(cfg(tiny_model_dir, text_file, tmp_path / "q", max_steps=10, quantize=4, quant_group_size=16,
                    bf16=True), adapter={"r": 4})
    model = res.model
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7  # every linear but the head
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # the rest of the frozen base
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert res.log["lean_activations"]["mlp"] == 2 and res.log["lean_activations"]["layers"] == 2
    losses = [h["loss"] for h in res.log["history"] if "loss" in h]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    fresh, _ = load_model(str(tiny_model_dir))  # the fp32 adapter loads onto the unquantized base
    lorakit.load(fresh, res.adapter_dir)
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(tmp_path / "q").items() if "lora_B" in k)


def test_lean_activations_train_like_plain(tiny_model_dir, text_file, tmp_path):
    train(cfg(tiny_model_dir, text_file, tmp_path / "a", max_steps=3), adapter={"r": 4})
    res = train(cfg(tiny_model_dir, text_file, tmp_path / "b", max_steps=3, lean_activations=False), adapter={"r": 4})
    assert res.log["lean_activations"] is None
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [
    ({"quantize": 3}, "quantize must be 0"),
    ({"quantize": True}, "quantize must be 0"),
    ({"quantize": 4, "method": "full", "optim": "galore"}, "needs an adapter method"),
    ({"quantize": 4, "prune": "loraprune"}, "cannot take exactly"),
    ({"quantize": 2, "quant_group_size": 6}, "group_size must be a positive integer multiple of 4"),
    ({"quantize": 4, "quant_group_size": 0}, "group_size must be a positive integer"),
])
def test_bad_quantize_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)


def test_lrec_training_lowers_the_kl_to_the_unquantized_base(tiny_model_dir, text_file, tmp_path):
    """Same quantized base, same steps: the LREC adapter ends closer to the unquantized model
    than an adapter trained on the labels alone."""
    from lorakit.models import load_model
    from lorakit.quant import kl_to_teacher

    teacher, _ = load_model(str(tiny_model_dir))
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    kl = {}
    for lrec in (False, True):
        res = train(cfg(tiny_model_dir, text_file, tmp_path / f"lrec{lrec}", max_steps=12, quantize=2,
                        quant_group_size=16, lrec=lrec, lrec_kl_weight=10.0), adapter={"r": 4})
        kl[lrec] = kl_to_teacher(res.model.eval(), teacher, [x])
        assert res.log["config"]["lrec"] is lrec
    assert kl[True] < 0.75 * kl[False], kl  # 0.56x here


@pytest.mark.parametrize("kw,msg", [
    ({"lrec": True}, "set quantize"),
    ({"lrec": True, "quantize": 4, "task": "seq-cls"}, "task must be 'causal-lm'"),
    ({"lrec_temperature": 0.0}, "lrec_temperature must be > 0"),
    ({"lrec_kl_weight": -1.0}, "lrec_kl_weight must be a finite number"),
])
def test_bad_lrec_settings(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)
