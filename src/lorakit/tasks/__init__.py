"""Task-level adaptation beyond adapters: LAME (parameter-free test-time adaptation of a
classifier's outputs) and LS-LLaMA (label-supervised decoder classifiers, optionally unmasked)."""

from lorakit.tasks.lame import (
    LameConfig,
    LameSolution,
    LameStream,
    affinity_matrix,
    lame,
    lame_energy,
    lame_solve,
    laplacian_optimization,
)
from lorakit.tasks.ls_llama import (
    LSForSequenceClassification,
    LSForTokenClassification,
    build_ls_model,
    last_token_index,
    set_unmasked,
    with_label_head,
)

__all__ = [
    "LSForSequenceClassification",
    "LSForTokenClassification",
    "LameConfig",
    "LameSolution",
    "LameStream",
    "affinity_matrix",
    "build_ls_model",
    "lame",
    "lame_energy",
    "lame_solve",
    "laplacian_optimization",
    "last_token_index",
    "set_unmasked",
    "with_label_head",
]
