"""Memory-efficient full-parameter training: GaLore (low-rank gradient projection of Adam
states), FRUGAL (Adam on a subspace, signSGD on the rest) and LISA (a few sampled layers
trainable at a time), and lean activations (activation-lean autograd for gated MLPs and RMSNorms)."""

from lorakit.optim.frugal import FrugalAdamW, frugal_param_groups
from lorakit.optim.galore import (
    GaLoreAdamW,
    LayerwiseGaLore,
    galore_param_groups,
    galore_per_layer,
    state_bytes,
)
from lorakit.optim.lean import lean_activations
from lorakit.optim.lisa import Lisa, LisaCallback, find_layers, sample_layers, set_active_layers

__all__ = [
    "FrugalAdamW",
    "GaLoreAdamW",
    "LayerwiseGaLore",
    "Lisa",
    "LisaCallback",
    "find_layers",
    "frugal_param_groups",
    "galore_param_groups",
    "galore_per_layer",
    "lean_activations",
    "sample_layers",
    "set_active_layers",
    "state_bytes",
]
