"""ServerApp: FloraStrategy configured from the run config ([tool.flwr.app.config] / --run-config)."""

from lorakit.federated.flower import FloraStrategy, make_server_app
from lorakit_flower_app.task import model_factory


def build(context):
    c = context.run_config
    sparse = float(c.get("sparse", 0.0)) or None
    return FloraStrategy(model_factory, str(c.get("strategy", "flora")), sparse=sparse, seed=int(c.get("seed", 0)),
                         local_steps=int(c.get("local-steps", 3)), lr=float(c.get("lr", 1e-2)), min_nodes=2)


app = make_server_app(build)
