"""Recipes: the shipped YAML files are valid and every stage's command parses at both scales;
the runner substitutes placeholders, resumes, stops at a failing stage, and rejects bad files."""

from pathlib import Path

import pytest

from lorakit import cli
from lorakit.data import instructions
from lorakit.errors import ConfigError
from lorakit.recipes import SCALES, load_recipe, run_recipe, stage_argv

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_ship():
    assert {p.name for p in RECIPES} >= {"chichewa_assistant.yaml", "medical_assistant.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("scale", SCALES)
def test_every_stage_parses(path, scale):
    recipe = load_recipe(path)
    fields = {"out": "/tmp/out", "recipe_dir": str(path.parent)}
    for st in recipe.stages:
        if st.verb == "prepare":
            kw = {k.replace("-", "_"): v for k, v in st.settings(scale).items()}
            assert kw.pop("builder") in instructions.BUILDERS and kw.pop("out").startswith("{out}/")
            import inspect

            assert set(kw) <= set(inspect.signature(instructions.BUILDERS[st.args["builder"]]).parameters), st.name
            continue
        argv = stage_argv(st, scale, fields)
        args = cli._parser(cli._method_from_argv(argv)).parse_args(argv)  # argparse exits on a bad flag
        assert args.verb == st.verb
        assert "{" not in " ".join(argv)  # every placeholder substituted


def test_reduced_scale_is_small():
    for path in RECIPES:
        for st in load_recipe(path).stages:
            if st.verb == "train":
                assert int(st.settings("reduced")["max-steps"]) <= 50, (path.name, st.name)
                assert int(st.settings("full")["max-steps"]) >= 1000, (path.name, st.name)


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_runner_runs_stages_in_order_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    built = []
    monkeypatch.setattr(instructions, "build", lambda builder, out, **kw: built.append((builder, out, kw)))
    p = _write(tmp_path, """
name: demo
stages:
  - {name: data, verb: prepare, args: {builder: chatterbot, out: "{out}/d.jsonl", n: 5}, full: {n: 50}}
  - {name: fit, verb: train, args: {data: "{out}/d.jsonl", max-steps: 3, eval: true, resume: false},
     full: {max-steps: 900}}
  - {name: score, verb: eval, args: {adapter: "{out}/fit/adapter", data: [a, "{recipe_dir}/b.txt"]}}
  - {name: grow, verb: vocab, positional: [expand], args: {data: chichewa, k: 10, out: "{out}/m"}}
""")
    recs = run_recipe(p, out=str(tmp_path / "o"), printer=lambda s: None)
    o = str(tmp_path / "o")
    assert built == [("chatterbot", f"{o}/d.jsonl", {"n": 5})]
    assert calls == [
        ["train", "--data", f"{o}/d.jsonl", "--max-steps", "3", "--eval"],
        ["eval", "--adapter", f"{o}/fit/adapter", "--data", "a", "--data", f"{tmp_path}/b.txt"],
        ["vocab", "expand", "--data", "chichewa", "--k", "10", "--out", f"{o}/m"],
    ]
    assert [r["stage"] for r in recs] == ["data", "fit", "score", "grow"]
    calls.clear()
    run_recipe(p, scale="full", start="score", out="x", printer=lambda s: None)
    assert [c[0] for c in calls] == ["eval", "vocab"]
    calls.clear()
    run_recipe(p, scale="full", only="fit", out="x", printer=lambda s: None)
    assert calls == [["train", "--data", "x/d.jsonl", "--max-steps", "900", "--eval"]]
    calls.clear()
    shown = []
    run_recipe(p, dry_run=True, printer=shown.append)
    assert calls == [] and len(shown) == 4 and shown[1].startswith("[demo:fit] lorakit train --data runs/demo-reduced/")


def test_runner_stops_at_a_failing_stage(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv[0]) or (2 if argv[0] == "export" else 0))
    p = _write(tmp_path, """
name: demo
stages:
  - {name: a, verb: train, args: {max-steps: 1}}
  - {name: b, verb: export, args: {adapter: x, out: y}}
  - {name: c, verb: eval}
""")
    with pytest.raises(ConfigError, match=r"stage 'b' failed \(exit 2\).*--from b"):
        run_recipe(p, printer=lambda s: None)
    assert calls == ["train", "export"]


def test_a_bad_flag_is_a_clear_failure_not_an_exit(tmp_path, capsys):
    p = _write(tmp_path, "name: demo\nstages:\n  - {name: a, verb: export, args: {no-such-flag: 1, out: y}}\n")
    with pytest.raises(ConfigError, match="stage 'a' failed"):
        run_recipe(p, printer=lambda s: None)
    assert "no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("text, msg", [
    ("[1, 2]", "a recipe is a mapping"),
    ("name: x\n", "'stages' must be a non-empty list"),
    ("name: ../x\nstages: [{name: a, verb: eval}]", "'name' must be a simple name"),
    ("name: x\nstages: [{name: a, verb: rm}]", "verb must be one of"),
    ("name: x\nstages: [{name: a, verb: eval}, {name: a, verb: eval}]", "duplicate stage name 'a'"),
    ("name: x\nstages: [{name: a, verb: eval, argz: {}}]", r"unknown keys \['argz'\]"),
    ("name: x\nstages: [{name: a, verb: eval, args: [1]}]", "must be a mapping of option names"),
    ("name: x\nstages: [{name: a, verb: eval}]\nextra: 1", r"unknown recipe keys \['extra'\]"),
    ("name: x\nstages: [{name: a, verb: eval\n", "invalid YAML"),
])
def test_bad_recipe_files(tmp_path, text, msg):
    with pytest.raises(ConfigError, match=msg):
        load_recipe(_write(tmp_path, text))


def test_bad_runner_arguments(tmp_path):
    p = _write(tmp_path, "name: x\nstages:\n  - {name: a, verb: eval, args: {data: '{nope}'}}\n"
                         "  - {name: b, verb: prepare, args: {out: z}}\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="scale must be one of"):
        run_recipe(p, scale="huge")
    with pytest.raises(ConfigError, match=r"--from 'zz': the recipe's stages are \['a', 'b'\]"):
        run_recipe(p, start="zz")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{nope\}"):
        run_recipe(p, dry_run=True, printer=lambda s: None)
    with pytest.raises(ConfigError, match="needs 'builder' and 'out'"):
        run_recipe(p, only="b", dry_run=True, printer=lambda s: None)


def test_data_builder_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown data builder 'nope'"):
        instructions.build("nope", tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['bogus'\]"):
        instructions.build("chatterbot", tmp_path / "x.jsonl", bogus=1)
    with pytest.raises(ConfigError, match="no records"):
        instructions.write_jsonl([], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()
