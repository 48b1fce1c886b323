"""Dataclasses are the single source of configuration: YAML/JSON files and CLI flags are
derived from their fields (litgpt style). Unknown keys are errors, never ignored."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import ConfigError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .yaml/.yml/.json config file into a dict (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, found {type(data).__name__}")
    return data


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Instantiate dataclass `cls` from `data`; unknown keys raise ConfigError listing valid keys."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{where}: " if where else ""
    if unknown:
        raise ConfigError(f"{prefix}unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{prefix}{e}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(tp):
    """The CLI parser for a field type: int/float/str/bool, JSON for lists and dicts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if any(typing.get_origin(a) in (list, dict) for a in args):
            return _json_or_str
        return _scalar_type(args[0]) if len(args) == 1 else _json_or_str
    if origin in (list, dict) or tp in (list, dict):
        return _json_or_str
    if tp in (int, float, str, bool):
        return tp
    return str


def _json_or_str(value: str):
    """'[1,2]' / '{"a":1}' parse as JSON; 'a,b' becomes a list; anything else stays a string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value.split(",") if "," in value else value


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", help_prefix: str = "",
                       taken: set[str] | None = None, clash_prefix: str = "") -> set[str]:
    """Add one flag `--field-name` per dataclass field (default None = not given).

    Values land in `ns.<prefix><field>`. A field whose flag is already in `taken` gets the
    flag `--<clash_prefix>-<field>` instead. Returns the flags added.
    """
    hints = typing.get_type_hints(cls)
    taken = set() if taken is None else taken
    added = set()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = _flag(f.name)
        if flag in taken:
            flag = _flag(f"{clash_prefix}_{f.name}")
        added.add(flag)
        tp = hints[f.name]
        parse = _scalar_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = f"{help_prefix}(default: {default!r})"
        dest = prefix + f.name
        if parse is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=doc)
        else:
            parser.add_argument(flag, dest=dest, type=parse, default=None, help=doc, metavar=f.name.upper())
    return added


def overrides(ns: argparse.Namespace, cls, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` that were given as flags."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, prefix + f.name, None)
        if v is not None:
            out[f.name] = v
    return out
