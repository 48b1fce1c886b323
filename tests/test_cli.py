"""The CLI verbs end to end on a tiny local model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from tests.conftest import logits_of


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(text_file), "--output-dir", str(out),
               "--block-size", "16", "--batch-size", "4", "--max-steps", "4", "--lr", "0.01", "--no-progress",
               "--r", "4", "--target", "q_proj,v_proj,embed_tokens", "--alpha", "8"])
    assert rc == 0
    return out / "adapter"


def adapted(tiny_model_dir, adapter):
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return lorakit.load(m, adapter)


@pytest.mark.parametrize("verb", ["train", "eval", "export", "info", "generate", "methods", "merge", "serve", "vocab", "federate"])
def test_every_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_train_flags_from_method_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--rslora" in out and "--max-steps" in out and "--replay" in out


def test_info(trained, capsys):
    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "method      lora" in out and "rank        4" in out
    assert main(["info", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == 5 and info["parameters"] > 0


def test_eval_on_file(trained, tiny_model_dir, text_file, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(trained), "--data", str(text_file),
                 "--block-size", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)[str(text_file)]
    assert r["bits_per_byte"] > 0 and r["tokens"] > 100


def test_export_merged_equals_adapter(trained, tiny_model_dir, tmp_path, tokens):
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(trained), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ref = logits_of(adapted(tiny_model_dir, trained), tokens)
    torch.testing.assert_close(logits_of(merged, tokens), ref, rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokens), ref)


def test_export_peft_loads_in_peft(trained, tiny_model_dir, tmp_path, tokens):
    peft = pytest.importorskip("peft")
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(trained), "--out", str(tmp_path / "p"),
                 "--format", "peft"]) == 0
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "p"))
    ref = logits_of(adapted(tiny_model_dir, trained), tokens)
    torch.testing.assert_close(logits_of(pm.eval(), tokens), ref, rtol=0, atol=1e-5)


def test_generate(trained, tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(trained), "--prompt", "Moni",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_methods_lists_lora(capsys):
    assert main(["methods"]) == 0
    assert "lora" in capsys.readouterr().out


def test_errors_exit_2_with_message(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("modle: x\n")
    assert main(["train", "--config", str(f)]) == 2
    assert "unknown TrainConfig key(s) ['modle']" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "adapter directory not found" in capsys.readouterr().err
    assert main(["train", "--model", "no-such-model", "--max-steps", "1"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_export_peft_at_lower_rank(trained, tiny_model_dir, tmp_path):
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(trained), "--out", str(tmp_path / "r2"),
                 "--format", "peft", "--rank", "2"]) == 0
    cfg = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["r"] == 2
    m = lorakit.load(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "r2")
    assert lorakit.adapter_names(m) == ["default"]


def test_merge_recipe_verb(trained, tiny_model_dir, tmp_path, tokens, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {tiny_model_dir}\nadapters:\n  - {{path: {trained}, weight: 1.0}}\n"
                      f"  - {{path: {trained}, weight: 1.0}}\nmethod: cat\noutput: {tmp_path / 'm'}\nformat: peft\n")
    assert main(["merge", str(recipe)]) == 0
    m = lorakit.load(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "m")
    ref = adapted(tiny_model_dir, trained)
    lorakit.load(ref, trained, name="again")
    lorakit.activate(ref, ["default", "again"])  # the same adapter twice = the cat merge
    torch.testing.assert_close(logits_of(m, tokens), logits_of(ref, tokens), rtol=0, atol=1e-5)
    recipe.write_text("adapters: []\nmethd: cat\n")
    assert main(["merge", str(recipe)]) == 2
    assert "methd" in capsys.readouterr().err


def test_train_full_parameter_galore_from_cli(tiny_model_dir, text_file, tmp_path, capsys):
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(text_file), "--output-dir", str(tmp_path / "g"),
               "--block-size", "16", "--batch-size", "4", "--max-steps", "2", "--no-progress", "--method", "full",
               "--optim", "galore", "--galore-rank", "4"])
    assert rc == 0 and "model saved to" in capsys.readouterr().out
    assert (tmp_path / "g" / "model" / "model.safetensors").exists()


def test_serve_verb_calls_server(monkeypatch, tmp_path):
    import lorakit.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda model, adapters, host, port, **kw: seen.update(
        model=model, adapters=adapters, host=host, port=port, **kw))
    assert main(["serve", "--model", "m", "--adapters", str(tmp_path), "--port", "9123", "--max-batch", "4"]) == 0
    assert seen["model"] == "m" and seen["port"] == 9123 and seen["max_batch"] == 4 and seen["host"] == "127.0.0.1"
    assert seen["rank_groups"] == "pow2" and seen["schedule"] == "affinity"
    assert main(["serve", "--model", "m", "--rank-groups", "64"]) == 0 and seen["rank_groups"] == 64
    assert main(["serve", "--model", "m", "--schedule", "fcfs"]) == 0 and seen["schedule"] == "fcfs"
    for bad in (["--rank-groups", "0"], ["--schedule", "lifo"]):
        with pytest.raises(SystemExit):
            main(["serve", "--model", "m", *bad])


@pytest.mark.parametrize("action", ["expand", "reduce"])
def test_vocab_verb(action, tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / action
    data = text_file
    if action == "reduce":  # a corpus that uses only part of the vocabulary
        data = tmp_path / "small.txt"
        data.write_text("Moni, muli bwanji? Ndili bwino, zikomo kwambiri.")
    args = ["vocab", action, "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]
    assert main(args + (["--k", "20"] if action == "expand" else [])) == 0
    msg = capsys.readouterr().out
    assert "fertility" in msg and str(out) in msg
    from transformers import AutoTokenizer

    old, new = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings >= len(new)
    assert (len(new) > len(old)) if action == "expand" else (len(new) < len(old))
    text = "Moni, muli bwanji? Ndili bwino, zikomo kwambiri."
    assert new.decode(new(text)["input_ids"]) == text


def test_federate_verb_flora_mixed_ranks(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "fed"
    assert main(["federate", "--model", str(tiny_model_dir), "--task", "causal-lm", "--data", str(text_file),
                 "--clients", "2", "--ranks", "2,4", "--rounds", "2", "--local-steps", "2", "--block-size", "16",
                 "--batch-size", "4", "--lr", "0.01", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "history and final model written" in printed
    hist = json.loads((out / "federation.json").read_text())
    assert len(hist["rounds"]) == 2 and all(len(r["accepted"]) == 2 for r in hist["rounds"])
    merged = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert main(["federate", "--model", str(tiny_model_dir), "--task", "causal-lm", "--data", str(text_file),
                 "--clients", "3", "--ranks", "2,4"]) == 2
    assert "3 clients" in capsys.readouterr().err
