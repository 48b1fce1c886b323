"""LISA: layerwise importance-sampled AdamW (Pan et al., arXiv:2403.17919; reference: LMFlow's
`DynamicLayerActivationCallback` and its `LISATrainer`).

Full-parameter fine-tuning where, in each period of K steps (period k = ⌊step / K⌋), only
γ decoder layers drawn uniformly without replacement are trainable:

    S_k ~ Uniform{ S ⊂ {0, …, L−1} : |S| = γ }         (seeded by (seed, k): reproducible, resumable)
    trainable = embeddings ∪ LM head ∪ everything else outside the layer stack ∪ layers in S_k

Every other decoder layer is frozen (requires_grad=False, grad=None), so an optimizer that
skips parameters without gradients (torch AdamW does) leaves it bit-identical.

Optimizer state. At each switch the optimizer's state entries of *every* decoder-layer
parameter are deleted, so Adam only ever holds moments for the always-trained parameters and
the γ active layers, and each newly sampled layer starts a fresh AdamW for its period — the
paper's Algorithm 1 ("run AdamW for K iterations" on the sampled layers) and what LMFlow's
LISATrainer does (`del optimizer.state[param]` for the previously active layers, then it
points the body-layer param groups at the new layers). We delete state entries but leave
the param groups alone: the optimizer must therefore be built over *all* parameters, which
`Lisa(...)` arranges by making every parameter trainable when constructed; build the
optimizer (or the Trainer) after it. A layer that is activated but absent from the optimizer
is an error, not a silent no-op. The first LMFlow callback only toggled requires_grad, so the
moments of every layer ever sampled stayed allocated and memory grew back to full AdamW.

    lisa = Lisa(model, n_layers=2, interval=20, seed=0)          # custom loop
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for step, batch in enumerate(batches):
        lisa.maybe_switch(step, opt)
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()

    Trainer(model, args, callbacks=[LisaCallback(model, n_layers=2, interval=20)], ...)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from lorakit.errors import ConfigError

LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")  # model.layers, transformer.h, encoder.layer, ...


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the model's transformer block stack.

    Among the ModuleLists named layers / h / layer / blocks (Llama `model.layers`, GPT-2
    `transformer.h`, BERT `encoder.layer`, also under PEFT/lorakit wrappers) the one holding the
    most parameters wins; failing that, the largest ModuleList of all.
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    named = [(n, m) for n, m in lists if n.split(".")[-1] in LAYER_LIST_NAMES]
    pool = named or lists
    if not pool:
        raise ConfigError(f"LISA found no layer stack (nn.ModuleList) in {type(model).__name__}")
    return max(pool, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def sample_layers(n_total: int, n_layers: int, seed: int, period: int) -> list[int]:
    """γ = n_layers distinct layer indices in [0, n_total), uniform, a pure function of (seed, period)."""
    rng = np.random.default_rng([seed, period])
    return sorted(int(i) for i in rng.choice(n_total, size=n_layers, replace=False))


def _unwrap(optimizer: Any) -> torch.optim.Optimizer | None:
    # accelerate's AcceleratedOptimizer (what Trainer hands callbacks) wraps the real one
    return getattr(optimizer, "optimizer", optimizer)


def set_active_layers(layers: nn.ModuleList, active: list[int], optimizer: Any = None) -> None:
    """Make exactly the layers in `active` trainable, freeze the rest, and drop the optimizer
    state of every layer parameter (fresh Adam moments for the new period; none for frozen layers).

    Parameters outside `layers` are not touched. Raises ConfigError if an activated parameter
    is not in the optimizer (it would silently never train).
    """
    active_set = set(active)
    if not active_set <= set(range(len(layers))):
        raise ConfigError(f"active layers {sorted(active_set)} out of range for {len(layers)} layers")
    opt = _unwrap(optimizer)
    known = {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else None
    for i, layer in enumerate(layers):
        on = i in active_set
        for p in layer.parameters():
            if opt is not None:
                opt.state.pop(p, None)
                if on and id(p) not in known:
                    raise ConfigError(
                        f"layer {i} is activated but its parameters are not in the optimizer: build the "
                        "optimizer over all parameters after creating Lisa/LisaCallback")
            p.requires_grad_(on)
            p.grad = None


class Lisa:
    """Layer sampling state for one model: which layers are active, and when to switch.

    n_layers: γ, decoder layers trainable at a time (default 2). interval: K, steps per period
    (default 20). seed: layer draws depend only on (seed, period), so a resumed run picks the
    same layers. On construction every parameter is made trainable (LISA is full-parameter
    training; the optimizer must cover all of them); the first `maybe_switch` freezes.
    """

    def __init__(self, model: nn.Module, n_layers: int = 2, interval: int = 20, seed: int = 0):
        for name, v in (("n_layers", n_layers), ("interval", interval)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"LISA {name} must be a positive integer, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"LISA seed must be a non-negative integer, got {seed!r}")
        self.path, self.layers = find_layers(model)
        if n_layers > len(self.layers):
            raise ConfigError(f"LISA n_layers={n_layers} exceeds the {len(self.layers)} layers in {self.path}")
        self.n_layers, self.interval, self.seed = n_layers, interval, seed
        self.active: list[int] | None = None
        self.period: int | None = None
        self.history: list[tuple[int, list[int]]] = []  # (step, active layers) at each switch
        for p in model.parameters():
            p.requires_grad_(True)

    def layers_for(self, step: int) -> list[int]:
        return sample_layers(len(self.layers), self.n_layers, self.seed, step // self.interval)

    def maybe_switch(self, step: int, optimizer: Any = None) -> bool:
        """Call before each optimizer step's forward; switches at the start of every period
        (and on the first call, e.g. after resuming mid-period). Returns whether it switched."""
        period = step // self.interval
        if period == self.period:
            return False
        self.active = self.layers_for(step)
        set_active_layers(self.layers, self.active, optimizer)
        self.period = period
        self.history.append((step, list(self.active)))
        return True


class LisaCallback(TrainerCallback):
    """`transformers.TrainerCallback` running LISA: switches layers in `on_step_begin` using the
    Trainer's optimizer (so frozen layers' Adam states are freed). Create it before the Trainer."""

    def __init__(self, model: nn.Module, n_layers: int = 2, interval: int = 20, seed: int = 0):
        self.lisa = Lisa(model, n_layers=n_layers, interval=interval, seed=seed)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise ConfigError("LisaCallback needs the Trainer's optimizer to free frozen layers' states")
        self.lisa.maybe_switch(state.global_step, optimizer)
