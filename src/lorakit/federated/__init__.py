"""Federated fine-tuning of LoRA adapters.

    from lorakit.federated import run_federation, dirichlet_split

    history = run_federation(make_model, client_datasets, ranks=[2, 4, 8], rounds=5, strategy="flora")
    history.model            # the global model after the last round (plain, update merged)
    history[0]["bytes_up"]   # per-round log: accepted/rejected clients, weights, bytes, losses

The aggregation math is in `lorakit.ops.aggregate` (pure functions); this package runs
clients and server in one process (no Flower yet; a Flower app would reuse these functions).
"""

from lorakit.federated.flora import STRATEGIES, ClientUpdate, FederationHistory, run_federation, validate_update
from lorakit.federated.split import dirichlet_split

__all__ = ["STRATEGIES", "ClientUpdate", "FederationHistory", "dirichlet_split", "run_federation", "validate_update"]
