"""Trainable tensors shared by the adapters of one injection (e.g. one A, B for every layer).

An adapter normally owns its parameters. Some methods (S2-LoRA, ShareLoRA-style variants)
train one tensor that many layers use. The core supports that with a *pool*: each call of
`lorakit.inject` / `lorakit.load` makes one `SharedParameters` for the new adapter and hands
it to every adapter it builds (`LayerSpec.shared`). An adapter asks for a tensor by key:

    share_parameter(self, "lora_A", spec.shared, "32x32.lora_A", lambda: torch.randn(r, d_in))

Adapters of the same injection asking for the same key get the *same* `nn.Parameter`, which
each registers as its own attribute. Consequences, all by plain PyTorch semantics:

- `model.parameters()` (and so every optimizer and Trainer) yields the tensor once; gradients
  from all the layers using it accumulate into its single `.grad`.
- `adapter.parameters()` of every layer includes it, so freezing/unfreezing an adapter, the
  "only adapter parameters train" rule and `adapter_modules` work unchanged.
- `model.state_dict()` lists it under every layer path (as PyTorch does for tied weights);
  `model.to(...)` converts it in place and keeps the sharing.
- Deleting / ejecting the adapter drops the last references: nothing else to clean up.
- Several adapters (names) on one model each have their own pool: no sharing across names.

Files store a shared tensor once, as "<PREFIX>lorakit_shared.<key>" (see `lorakit.core.io`);
every adapter records which of its parameters came from which key (`shared_names`), so
loading fills them from that one entry, and rebuilding the adapters through a pool restores
the sharing. An adapter built without a pool (`LayerSpec.shared is None`, e.g. a file
converted layer by layer for serving) gets a private tensor under the same key: same values
once loaded, just not shared.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from lorakit.errors import ConfigError

#: File-key segment of shared tensors: "base_model.model.lorakit_shared.<key>".
SHARED_PREFIX = "lorakit_shared."
_KEY_RE = re.compile(r"^[A-Za-z0-9_*\-]+(\.[A-Za-z0-9_*\-]+)*$")
_NAMES_ATTR = "_lorakit_shared_names"


class SharedParameters:
    """One injection's pool of shared trainable tensors: key -> the one `nn.Parameter`."""

    def __init__(self) -> None:
        self._params: dict[str, nn.Parameter] = {}

    def get(self, key: str, make: Callable[[], torch.Tensor]) -> nn.Parameter:
        """The Parameter stored under `key`, created from `make()` the first time it is asked for."""
        check_key(key)
        if key not in self._params:
            self._params[key] = nn.Parameter(make())
        return self._params[key]

    def __contains__(self, key: str) -> bool:
        return key in self._params

    def __len__(self) -> int:
        return len(self._params)

    def items(self):
        return self._params.items()


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ConfigError(f"invalid shared-parameter key {key!r}: use letters, digits, '_', '-', '*' and '.' "
                          "between non-empty parts")
    return key


def share_parameter(module: nn.Module, attr: str, pool: SharedParameters | None, key: str,
                    make: Callable[[], torch.Tensor]) -> nn.Parameter:
    """Register the pool's Parameter `key` as `module.<attr>` and record it as shared.

    Without a pool the module gets a private Parameter from `make()`, still recorded under
    `key` so that files (which store it as a shared entry) load into it.
    """
    check_key(key)
    param = pool.get(key, make) if pool is not None else nn.Parameter(make())
    setattr(module, attr, param)
    names = module.__dict__.setdefault(_NAMES_ATTR, {})  # plain attribute: not a buffer, not saved
    names[attr] = key
    return param


def set_shared(modules, attr: str, param: nn.Parameter) -> None:
    """Put one new Parameter at `attr` of every module in `modules` (e.g. after pruning the
    shared tensor's ranks), keeping its shared key."""
    for m in modules:
        if attr not in shared_names(m):
            raise ValueError(f"{type(m).__name__}.{attr} is not a shared parameter")
        setattr(m, attr, param)


def shared_names(module: nn.Module) -> dict[str, str]:
    """State-dict name -> shared key for every shared tensor the adapter holds ({} if none)."""
    return dict(module.__dict__.get(_NAMES_ATTR, {}))
