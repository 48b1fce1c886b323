"""Memory-efficient training and compression by structured pruning of Llama-style decoders.

- `structured`: the shared primitive — remove attention heads (KV groups) and MLP channels by
  index, physically; `save_pruned` / `load_pruned` with a JSON sidecar for per-layer sizes.
- `loram`: LoRAM (arXiv:2502.13533) — train LoRA on a pruned base, recover it to the full model.
- `loraprune`: LoRAPrune (arXiv:2305.18403) — prune heads/channels by LoRA-gradient importance
  progressively during LoRA training (a TrainerCallback), ending with a smaller model.
"""

from lorakit.prune.loram import LoramConfig, recover
from lorakit.prune.loram import plan as loram_plan
from lorakit.prune.loram import prune as loram_prune
from lorakit.prune.loraprune import (
    LoraPrune,
    LoraPruneCallback,
    LoraPruneConfig,
    cubic_sparsity,
    lora_importance,
    lora_weight_grad,
)
from lorakit.prune.structured import (
    KeptIndices,
    PrunedModelFileError,
    StructuredPruning,
    find_decoder_layers,
    load_pruned,
    prune_structured,
    save_pruned,
)

__all__ = [
    "KeptIndices",
    "LoraPrune",
    "LoraPruneCallback",
    "LoraPruneConfig",
    "LoramConfig",
    "PrunedModelFileError",
    "StructuredPruning",
    "cubic_sparsity",
    "find_decoder_layers",
    "load_pruned",
    "lora_importance",
    "lora_weight_grad",
    "loram_plan",
    "loram_prune",
    "prune_structured",
    "recover",
    "save_pruned",
]
