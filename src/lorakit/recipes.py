"""Recipes: end-to-end pipelines (data -> continued pre-training -> instruction tuning -> eval)
as one YAML file of stages, run by ``lorakit recipe FILE``.

A recipe is a list of stages; each runs one ``lorakit`` verb with the flags in ``args``, or
builds a JSONL data set (``verb: prepare``, see ``lorakit.data.instructions.BUILDERS``).
Every recipe gives its full-size settings and a reduced size that runs on a laptop CPU in
minutes; ``--scale`` picks one and the stage's ``full:`` / ``reduced:`` keys override ``args``::

    name: chichewa-assistant
    paper: ChocoLlama (arXiv:2412.07633), Conversations in Galician (arXiv:2311.03812)
    stages:
      - name: data
        verb: prepare
        args: {builder: bible-translation, out: "{out}/data/train.jsonl", split: train}
        reduced: {n: 400}
      - name: cpt
        verb: train
        args: {data: chichewa, replay: 0.25, output-dir: "{out}/cpt"}
        full: {max-steps: 3000}
        reduced: {max-steps: 40}

``{out}`` is the recipe's output directory (default ``runs/<name>-<scale>``); ``{recipe_dir}``
the directory of the YAML file. Flag values: ``true`` -> a bare flag, ``false`` / null ->
omitted, a list -> the flag repeated (``--data a --data b``). Stages run in order and stop at
the first failure; ``--from STAGE`` resumes there and ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

VERBS = ("prepare", "train", "eval", "export", "vocab", "select", "merge", "augment", "library", "generate")
SCALES = ("reduced", "full")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FIELD = re.compile(r"\{([^{}]*)\}")


@dataclass
class Stage:
    name: str
    verb: str
    args: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)
    reduced: dict[str, Any] = field(default_factory=dict)
    positional: list[str] = field(default_factory=list)  # e.g. ["expand"] for `vocab expand`

    def settings(self, scale: str) -> dict[str, Any]:
        return {**self.args, **(self.full if scale == "full" else self.reduced)}


@dataclass
class Recipe:
    name: str
    stages: list[Stage]
    path: Path
    description: str = ""
    paper: str = ""

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{where} must be a mapping of option names to values, got {value!r}")
    return dict(value)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe YAML file (raises ConfigError naming the problem)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with 'name' and 'stages'")
    unknown = sorted(set(data) - {"name", "description", "paper", "stages"})
    if unknown:
        raise ConfigError(f"{path}: unknown recipe keys {unknown}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: 'name' must be a simple name (letters, digits, '-', '_', '.'), got {name!r}")
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    stages, seen = [], set()
    for i, st in enumerate(raw):
        where = f"{path}: stage {i + 1}"
        if not isinstance(st, dict):
            raise ConfigError(f"{where} must be a mapping")
        bad = sorted(set(st) - {"name", "verb", "args", "full", "reduced", "positional"})
        if bad:
            raise ConfigError(f"{where}: unknown keys {bad}")
        sname, verb = st.get("name"), st.get("verb")
        if not isinstance(sname, str) or not _NAME.match(sname):
            raise ConfigError(f"{where}: 'name' must be a simple name, got {sname!r}")
        if sname in seen:
            raise ConfigError(f"{where}: duplicate stage name {sname!r}")
        seen.add(sname)
        if verb not in VERBS:
            raise ConfigError(f"{where} ({sname}): verb must be one of {VERBS}, got {verb!r}")
        positional = st.get("positional") or []
        if not isinstance(positional, list) or not all(isinstance(p, str) for p in positional):
            raise ConfigError(f"{where} ({sname}): 'positional' must be a list of strings")
        stages.append(Stage(sname, verb, _mapping(st.get("args"), f"{where} args"),
                            _mapping(st.get("full"), f"{where} full"), _mapping(st.get("reduced"), f"{where} reduced"),
                            positional))
    return Recipe(name, stages, path, str(data.get("description") or ""), str(data.get("paper") or ""))


def _substitute(value: Any, fields: dict[str, str], where: str) -> Any:
    if isinstance(value, list):
        return [_substitute(v, fields, where) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match) -> str:
        if m.group(1) not in fields:
            raise ConfigError(f"{where}: unknown placeholder {{{m.group(1)}}}; known: {sorted(fields)}")
        return fields[m.group(1)]

    return _FIELD.sub(repl, value)


def stage_argv(stage: Stage, scale: str, fields: dict[str, str]) -> list[str]:
    """The ``lorakit`` argument list of a (non-prepare) stage at ``scale``."""
    argv = [stage.verb] + [_substitute(p, fields, stage.name) for p in stage.positional]
    for key, value in stage.settings(scale).items():
        flag = "--" + key.replace("_", "-")
        value = _substitute(value, fields, f"stage {stage.name}")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def run_recipe(path: str | os.PathLike, scale: str = "reduced", out: str | None = None, start: str | None = None,
               only: str | None = None, dry_run: bool = False, printer=print) -> list[dict]:
    """Run (or with ``dry_run`` print) the stages of a recipe; returns one record per stage."""
    from lorakit import cli
    from lorakit.data.instructions import build

    if scale not in SCALES:
        raise ConfigError(f"scale must be one of {SCALES}, got {scale!r}")
    recipe = load_recipe(path)
    names = recipe.stage_names()
    for opt, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{opt} {value!r}: the recipe's stages are {names}")
    fields = {"out": str(Path(out) if out else Path("runs") / f"{recipe.name}-{scale}"),
              "recipe_dir": str(recipe.path.resolve().parent)}
    todo = recipe.stages[names.index(start):] if start else recipe.stages
    if only:
        todo = [s for s in recipe.stages if s.name == only]
    records = []
    for st in todo:
        if st.verb == "prepare":
            kw = {k.replace("-", "_"): _substitute(v, fields, f"stage {st.name}") for k, v in st.settings(scale).items()}
            builder, target = kw.pop("builder", None), kw.pop("out", None)
            if not builder or not target:
                raise ConfigError(f"stage {st.name}: a prepare stage needs 'builder' and 'out' in its args")
            shown = f"prepare {builder} -> {target} " + " ".join(f"{k}={v}" for k, v in kw.items())
        else:
            argv = stage_argv(st, scale, fields)
            shown = "lorakit " + shlex.join(argv)
        printer(f"[{recipe.name}:{st.name}] {shown}")
        if dry_run:
            records.append({"stage": st.name, "command": shown})
            continue
        t0 = time.time()
        if st.verb == "prepare":
            build(builder, target, **kw)
        else:
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse rejected the stage's flags (its message is printed above)
                rc = e.code if isinstance(e.code, int) else 2
            if rc != 0:
                raise ConfigError(f"recipe {recipe.name!r} stopped: stage {st.name!r} failed (exit {rc}); fix it and "
                                  f"rerun with --from {st.name}")
        records.append({"stage": st.name, "command": shown, "seconds": round(time.time() - t0, 1)})
    return records


__all__ = ["SCALES", "VERBS", "Recipe", "Stage", "load_recipe", "run_recipe", "stage_argv"]
