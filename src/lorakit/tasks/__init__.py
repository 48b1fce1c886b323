"""Task-level adaptation beyond adapters: LAME (parameter-free test-time adaptation of a
classifier's outputs), LS-LLaMA (label-supervised decoder classifiers, optionally unmasked) and
LoLCATs (linearized attention by attention transfer + LoRA correction)."""

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
from lorakit.tasks.lolcats import (
    LolcatsConfig,
    attention_transfer,
    decode_speed,
    generate_linear,
    linearize,
    load_linearized,
    lora_correct,
    save_linearized,
    transfer_mse,
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
    "LolcatsConfig",
    "affinity_matrix",
    "attention_transfer",
    "build_ls_model",
    "decode_speed",
    "generate_linear",
    "lame",
    "lame_energy",
    "lame_solve",
    "laplacian_optimization",
    "last_token_index",
    "linearize",
    "load_linearized",
    "lora_correct",
    "save_linearized",
    "set_unmasked",
    "transfer_mse",
    "with_label_head",
]
