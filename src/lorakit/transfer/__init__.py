"""Moving adapters between base models.

- `trans_lora`: Trans-LoRA (arXiv:2405.17258) — data-free transfer of an adapter to a new base by
  distillation on discriminator-filtered synthetic inputs.
- `benchmark`: `run_transfer_benchmark`, the SmolLM2 BBC-News setting `benchmarks/beyond.py` reports.
"""

from lorakit.transfer.benchmark import run_transfer_benchmark
from lorakit.transfer.trans_lora import (
    Discriminator,
    DiscriminatorReport,
    Example,
    TransferError,
    TransLoraConfig,
    TransLoraReport,
    as_examples,
    clean_candidates,
    completion_logprobs,
    completion_nll,
    distill_lora,
    filter_synthetic,
    fit_lora,
    generate_text,
    synthesize_prompts,
    teacher_outputs,
    train_discriminator,
    transfer_lora,
)

__all__ = [
    "Discriminator",
    "DiscriminatorReport",
    "Example",
    "TransLoraConfig",
    "TransLoraReport",
    "TransferError",
    "as_examples",
    "clean_candidates",
    "completion_logprobs",
    "completion_nll",
    "distill_lora",
    "filter_synthetic",
    "fit_lora",
    "generate_text",
    "run_transfer_benchmark",
    "synthesize_prompts",
    "teacher_outputs",
    "train_discriminator",
    "transfer_lora",
]
