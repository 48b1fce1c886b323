"""Adapter generators: hypernetworks that emit a task's LoRA from its context or description
in one forward pass, trained on a family of tasks and applied to held-out ones.

- `icm_lora`: ICM-LoRA (arXiv:2501.17635), a conditional VAE over flattened per-task LoRAs,
  conditioned on a task vector read from the base model's hidden states.
- `generative_adapter`: GenerativeAdapter (arXiv:2411.05877), per-layer outer-product
  accumulation of the context's hidden states into a low-rank update, trained end to end.
- `family`: task families (synthetic unigram mixtures; mixtures of real document groups),
  task embeddings, per-task LoRA training, losses.
- `compare`: held-out comparison base / trained LoRA / mean LoRA / generated LoRAs.

Both generators write a plain lorakit LoRA (`generate_adapter(model, context, name)`), which
`lorakit.save`/`load`, `merge`, serving and PEFT export treat like any other LoRA.
"""

from lorakit.generators.compare import compare_on_heldout
from lorakit.generators.family import (
    Task,
    TaskLoraConfig,
    eval_loss,
    hidden_states,
    mixture_tasks,
    task_embedding,
    text_mixture_tasks,
    train_task_lora,
    train_task_loras,
)
from lorakit.generators.generative_adapter import (
    GenerativeAdapter,
    GenerativeAdapterConfig,
    train_generative_adapter,
)
from lorakit.generators.icm_lora import CVAE, IcmLoraConfig, IcmLoraGenerator, train_icm_lora


def generate_adapter(model, generator, context, name: str = "generated", activate: bool = True,
                     attention_mask=None):
    """Inject the LoRA that `generator` (ICM-LoRA or GenerativeAdapter) emits for `context`
    (token ids (n, T), `attention_mask` 0 at padding) into `model` as adapter `name`; returns
    the model."""
    if not isinstance(generator, (GenerativeAdapter, IcmLoraGenerator)):
        from lorakit.errors import ConfigError

        raise ConfigError(f"generator must be a GenerativeAdapter or an IcmLoraGenerator, got {type(generator).__name__}")
    return generator.generate_adapter(model, context, name=name, activate=activate, attention_mask=attention_mask)


__all__ = [
    "CVAE", "GenerativeAdapter", "GenerativeAdapterConfig", "IcmLoraConfig", "IcmLoraGenerator", "Task",
    "TaskLoraConfig", "compare_on_heldout", "eval_loss", "generate_adapter", "hidden_states", "mixture_tasks",
    "task_embedding", "text_mixture_tasks", "train_generative_adapter", "train_icm_lora", "train_task_lora",
    "train_task_loras",
]
