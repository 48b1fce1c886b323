"""ClientApp: node `partition-id` k trains LoRA(rank RANKS[k]) on its partition."""

from lorakit.federated.flower import make_client_app
from lorakit_flower_app.task import RANKS, client_datasets, model_factory

app = make_client_app(model_factory, client_datasets(2), RANKS[:2])
