"""Example Flower App for lorakit federated LoRA (tiny Llama, synthetic token data)."""
