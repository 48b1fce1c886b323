"""Data-aware initialisations of LoRA-style adapters (PiSSA, LoRA-GA, LoRA-SB, EVA), one file
each, registered like methods. Every module here is imported on first use of the registry."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
