"""The method registry: one decorator turns a config dataclass + module class into a method.

    @register_method("lora", LoraConfig, paper="arXiv:2106.09685")
    class Lora(nn.Module): ...

Adding a method never requires editing another file: the CLI, `lorakit info`, the file
format and the contract test suite (`tests/contract/`) all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method."""

    name: str
    config_cls: type
    adapter_cls: type
    paper: str | None = None

    @property
    def summary(self) -> str:
        doc = (self.adapter_cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, paper: str | None = None):
    """Class decorator registering an adapter class under `name` with its config dataclass."""
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"method name must be a lower-case identifier, got {name!r}")

    def decorator(adapter_cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].adapter_cls is not adapter_cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].adapter_cls}")
        config_cls.method = name  # the config knows which method it configures
        adapter_cls.method = name
        _REGISTRY[name] = MethodSpec(name, config_cls, adapter_cls, paper)
        return adapter_cls

    return decorator


def get_method(name: str) -> MethodSpec:
    """Look up a registered method; unknown names list what exists."""
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}") from None


def method_for_config(config) -> MethodSpec:
    name = getattr(type(config), "method", None)
    if name is None:
        raise ConfigError(f"{type(config).__name__} is not a registered adapter config")
    return get_method(name)


def list_methods() -> list[MethodSpec]:
    _load_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_builtin_methods() -> None:
    # Importing the packages registers every method file in them (see methods/__init__.py).
    import lorakit.init  # noqa: F401
    import lorakit.methods  # noqa: F401
