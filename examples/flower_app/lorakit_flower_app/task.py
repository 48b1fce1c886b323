"""The model and the data partitions; replace with a pretrained checkpoint and real client data."""

import torch


def model_factory():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every node must build the same initial model
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def client_datasets(num_partitions=2):
    out = []
    for k in range(num_partitions):
        g = torch.Generator().manual_seed(k + 1)
        lo = 1 + k * 127 // num_partitions
        out.append(torch.randint(lo, lo + 127 // num_partitions, (12, 8), generator=g))
    return out


RANKS = [2, 4, 4, 8, 8, 8, 8, 8]  # rank of client k (heterogeneous: FLoRA stacks them)
