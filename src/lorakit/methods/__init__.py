"""Adapter methods, one file each. Every module here is imported (and so registered) on
first use of the registry, so adding a method means adding one file."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
