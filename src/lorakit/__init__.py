"""lorakit: low-rank adaptation of pretrained transformers when parameters, memory, data or
compute are scarce.

    import lorakit
    from lorakit.methods.lora import LoraConfig

    lorakit.inject(model, LoraConfig(r=8, target="all-linear"))
    ...train...
    lorakit.save(model, "out/adapter")
    lorakit.load(fresh_model, "out/adapter")   # lorakit- or PEFT-written
"""

from lorakit.core.adapter import AdapterConfig
from lorakit.core.inject import (
    activate_adapters as activate,
    adapter_names,
    deactivate_adapters as deactivate,
    delete_adapter as delete,
    eject,
    inject,
    merge,
    route,
    trainable_parameters,
    unmerge,
)
from lorakit.core.io import adapter_info, load, save
from lorakit.core.registry import get_method, list_methods, register_method
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, LorakitError, ModelNotAvailableError
from lorakit.methods.lora import LoraConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "LoraConfig", "inject", "eject", "save", "load", "merge", "unmerge", "route",
    "activate", "deactivate", "delete", "adapter_names", "adapter_info", "trainable_parameters",
    "register_method", "get_method", "list_methods",
    "LorakitError", "ConfigError", "AdapterError", "AdapterFileError", "ModelNotAvailableError",
]
