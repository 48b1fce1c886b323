"""Federated LoRA on Flower (package `flwr`, Message API): a Strategy, a ClientApp, a simulation.

The math and the client training are those of `lorakit.federated.flora.run_federation`
(FLoRA stacking, FedAvg of factors, exact FedAvg, CELLM top-k with error feedback, server-side
validation); this module only moves them onto Flower's transport:

    server (FloraStrategy, in a ServerApp)           client k (make_client_app, a ClientApp)
    ------------------------------------------       ------------------------------------------
    configure_train: Message("train") to every       base = model_factory() + the global state
      node: {"arrays": global state,                 (merged in the same order as the server),
             "config": strategy, seed, steps, lr,    init = seeded LoRA init (flora / round 1)
             alpha, target, sparse, ...}             or the global factors (fedavg*), train
                                                     `local_steps` AdamW steps on partition k
    aggregate_train: decode every reply, reject      reply {"arrays": ΔA, ΔB (scale folded),
      malformed / wrong-shape / non-finite ones        Δθ of modules_to_save, dense or top-k
      (`validate_update`), aggregate the rest with     as (indices, values) pairs),
      ops.aggregate (flora_stack / fedavg_factors)   "metrics": num-examples, client, rank,
      -> next global state                             train_loss}

Client k is the node's `partition-id` (node_config; set automatically in simulation, with
`--node-config "partition-id=k num-partitions=K"` for a real SuperNode); it picks
`client_datasets[k]` and `ranks[k]`, and the seeded inits use it, so a Flower run with the
same seed gives exactly the model of `run_federation` with the same arguments.

Global state (the ArrayRecord sent down each round; never the base weights, which every
node builds itself from `model_factory`, e.g. a pretrained checkpoint):

    "m{t}.A|path", "m{t}.B|path"   FLoRA: round t's stacked update (merged into the base)
    "h{t}|param"                   every strategy: round t's averaged modules_to_save delta
    "g.A|path", "g.B|path"         fedavg / fedavg-delta: the current global LoRA factors

FLoRA's downlink therefore grows with the rounds (Σ_t Σ_k r_k ranks per module): exact and
still low-rank; a long run would instead ship merged checkpoints out of band.

CELLM error feedback: a client keeps what it did not send in `context.state` (an ArrayRecord
per node; Flower keeps node state between rounds of a run, in simulation and deployment).

Simulation (tests, one machine): `run_flower_simulation(...)` (Flower's simulation engine;
Ray is its only backend: each ClientApp runs in a Ray actor process).

Real processes on 127.0.0.1 (moving to many machines = changing the addresses), with the
example app in examples/flower_app/ (its pyproject.toml names the ServerApp / ClientApp):

    # flwr 1.42: every SuperLink API is HTTP on one --host/--port
    flower-superlink --insecure --isolation subprocess --host 127.0.0.1 --port 9093 \\
        --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 \\
        --node-config "partition-id=0 num-partitions=2"
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9095 \\
        --node-config "partition-id=1 num-partitions=2"
    flwr run examples/flower_app local-deployment --stream   # connection in $FLWR_HOME/config.toml

`examples/flower_app/run_local.sh` does exactly this (verified: 2 SuperNodes, 2 FLoRA rounds,
both updates accepted each round). Nothing here opens sockets itself.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # pragma: no cover - optional dependency
    raise ImportError("lorakit.federated.flower needs Flower: pip install 'flwr[simulation]>=1.40,<2'") from e

from lorakit.core.inject import adapted_layers, find_targets, modules_to_save_paths
from lorakit.core.layer import wrapper_for
from lorakit.errors import ConfigError
from lorakit.federated.flora import (
    STRATEGIES,
    ClientUpdate,
    FederationHistory,
    _as_dataset,
    _sparsify,
    _weight_view,
    _wire_bytes,
    client_init,
    client_round,
    validate_update,
)
from lorakit.methods.lora import LoraConfig
from lorakit.ops.aggregate import (
    SparseUpdate,
    bytes_of,
    fedavg_factors,
    flora_stack,
    normalize_weights,
)

__all__ = [
    "FloraStrategy",
    "decode_update",
    "encode_update",
    "make_client_app",
    "make_server_app",
    "materialise",
    "run_flower_simulation",
]

log = logging.getLogger(__name__)
RESIDUAL_KEY = "lorakit-residual"


# -- tensors <-> Flower records -------------------------------------------------------------
def _arr(t: torch.Tensor) -> Array:
    return Array(np.ascontiguousarray(t.detach().cpu().numpy()))


def _tensor(a: Array) -> torch.Tensor:
    return torch.from_numpy(np.array(a.numpy(), copy=True))


def _put(out: dict, key: str, t) -> None:
    if isinstance(t, SparseUpdate):
        out[f"{key}|i"] = _arr(t.indices.to(torch.int64))
        out[f"{key}|v"] = _arr(t.values)
    else:
        out[key] = _arr(t)


def encode_update(update: ClientUpdate) -> ArrayRecord:
    """ClientUpdate -> ArrayRecord: "A|path", "B|path", "h|param"; a SparseUpdate as "<key>|i", "<key>|v"."""
    out: dict[str, Array] = {}
    for path, (da, db) in update.factors.items():
        _put(out, f"A|{path}", da)
        _put(out, f"B|{path}", db)
    for name, d in update.full.items():
        _put(out, f"h|{name}", d)
    return ArrayRecord(array_dict=out)


def decode_update(
    record: ArrayRecord, client: int, rank: int, shapes: dict[str, tuple[int, int]], full_shapes: dict
) -> ClientUpdate:
    """ArrayRecord -> ClientUpdate (sparse pairs become SparseUpdate with the expected shape).

    Raises ValueError on keys it cannot place; shapes and values are checked afterwards by
    `validate_update` (which names the problem).
    """
    dense: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    for key, a in record.items():
        base, _, part = key.rpartition("|") if key.endswith(("|i", "|v")) else (key, "", "")
        t = _tensor(a)
        if part:
            sparse.setdefault(base, {})[part] = t
        else:
            dense[base] = t

    def expected(key: str) -> tuple[int, ...]:
        kind, _, name = key.partition("|")
        if kind == "A" and name in shapes:
            return (rank, shapes[name][1])
        if kind == "B" and name in shapes:
            return (shapes[name][0], rank)
        if kind == "h" and name in full_shapes:
            return tuple(full_shapes[name])
        raise ValueError(f"unexpected array {key!r}")

    tensors: dict[str, Any] = dict(dense)
    for key, parts in sparse.items():
        if set(parts) != {"i", "v"}:
            raise ValueError(f"sparse array {key!r} needs both indices and values")
        tensors[key] = SparseUpdate(parts["i"].reshape(-1), parts["v"].reshape(-1), expected(key))
    factors: dict[str, list] = {}
    full: dict[str, Any] = {}
    for key, t in tensors.items():
        expected(key)  # unknown keys are an error
        kind, _, name = key.partition("|")
        if kind == "h":
            full[name] = t
        else:
            factors.setdefault(name, [None, None])[0 if kind == "A" else 1] = t
    for name, pair in factors.items():
        if pair[0] is None or pair[1] is None:
            raise ValueError(f"{name}: got only one of ΔA, ΔB")
    return ClientUpdate(client, rank, {k: tuple(v) for k, v in factors.items()}, full)


def _split_state(arrays: ArrayRecord) -> tuple[list[dict], list[dict], dict]:
    """Global state -> (per-round stacked updates [{path: (A, B)}], per-round head deltas, {path: (A, B)})."""
    merged: dict[int, dict] = {}
    heads: dict[int, dict] = {}
    glob: dict[str, list] = {}
    for key, a in arrays.items():
        tag, _, name = key.partition("|")
        t = _tensor(a)
        if tag.startswith("m"):
            rnd, _, ab = tag[1:].partition(".")
            merged.setdefault(int(rnd), {}).setdefault(name, [None, None])[ab == "B"] = t
        elif tag.startswith("h"):
            heads.setdefault(int(tag[1:]), {})[name] = t
        elif tag in ("g.A", "g.B"):
            glob.setdefault(name, [None, None])[tag == "g.B"] = t
        else:
            raise ValueError(f"unexpected global state array {key!r}")
    rounds = sorted(set(merged) | set(heads))
    return ([{p: tuple(v) for p, v in merged.get(t, {}).items()} for t in rounds],
            [heads.get(t, {}) for t in rounds],
            {p: tuple(v) for p, v in glob.items()})


def _apply_state(model: nn.Module, arrays: ArrayRecord, merge_global: bool = False) -> dict:
    """Bring a fresh `model_factory()` model to the global base, round by round in the server's order.

    Returns the global LoRA factors (fedavg*); with merge_global they are merged in as well.
    """
    merged, heads, glob = _split_state(arrays)
    with torch.no_grad():
        for upd, head in zip(merged, heads):
            for path in sorted(upd):
                a, b = upd[path]
                w = _weight_view(model.get_submodule(path))
                w += (b @ a).to(device=w.device, dtype=w.dtype)
            for name, d in head.items():
                param = model.get_parameter(name)
                param += d.to(device=param.device, dtype=param.dtype)
        if merge_global:
            for path, (a, b) in glob.items():
                w = _weight_view(model.get_submodule(path))
                w += (b @ a).to(device=w.device, dtype=w.dtype)
    return glob


def materialise(model_factory: Callable[[], nn.Module], arrays: ArrayRecord) -> nn.Module:
    """The global model (plain, every update merged) from a global state ArrayRecord."""
    model = model_factory()
    _apply_state(model, arrays, merge_global=True)
    return model


def _lora_config(cfg, r: int) -> LoraConfig:
    target = json.loads(cfg["target"])
    mts = json.loads(cfg["modules_to_save"])
    return LoraConfig(r=r, alpha=float(cfg["alpha"]), target=target, modules_to_save=mts,
                      **json.loads(cfg["lora_kwargs"]))


def _shapes(model: nn.Module, config: LoraConfig) -> tuple[dict, dict]:
    shapes = {}
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        spec = wrapper_for(module)(module).spec(path)
        if spec.kind != "linear":
            raise ConfigError(f"federated LoRA adapts linear layers only; {path!r} is {spec.kind}")
        shapes[path] = (spec.out_features, spec.in_features)
    full_shapes = {}
    for mpath in modules_to_save_paths(model, config):
        for name, p in model.get_submodule(mpath).named_parameters():
            full_shapes[f"{mpath}.{name}"] = tuple(p.shape)
    return shapes, full_shapes


# -- client ---------------------------------------------------------------------------------
def make_client_app(
    model_factory: Callable[[], nn.Module],
    client_datasets: Sequence,
    ranks: Sequence[int],
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    update_hook: Callable[[int, int, ClientUpdate], ClientUpdate | None] | None = None,
) -> ClientApp:
    """A ClientApp that trains LoRA (rank ranks[k]) on client_datasets[k], k = the node's partition-id.

    Everything else (strategy, seed, local_steps, lr, batch_size, alpha, target, sparse, ...)
    comes from the server's ConfigRecord each round. `model_factory` must build the same
    initial model as the server's. `update_hook(round0, k, update)` runs before sending
    (to simulate faulty clients), as in run_federation.
    """
    datasets = [_as_dataset(d) for d in client_datasets]
    ranks = [int(r) for r in ranks]
    if len(ranks) != len(datasets):
        raise ConfigError(f"got {len(ranks)} ranks for {len(datasets)} client datasets")
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        if not 0 <= k < len(datasets):
            raise ConfigError(f"partition-id {k} out of range for {len(datasets)} client datasets")
        cfg = msg.content["config"]
        strategy, seed, rnd = str(cfg["strategy"]), int(cfg["seed"]), int(cfg["server-round"]) - 1
        config = _lora_config(cfg, ranks[k])
        model = model_factory()
        device = next(model.parameters()).device
        glob = _apply_state(model, msg.content["arrays"])
        shapes, full_shapes = _shapes(model, config)
        init = client_init(strategy, rnd, k, ranks[k], shapes, glob, seed, device)
        update = client_round(model, config, k, init, datasets[k], rnd, seed, int(cfg["local-steps"]),
                               float(cfg["lr"]), int(cfg["batch-size"]), loss_fn, full_shapes, device)
        del model
        dense_bytes = bytes_of(update.factors) + bytes_of(update.full)
        sparse = float(cfg["sparse"])
        if sparse > 0:  # CELLM: top-k with error feedback, residual kept in the node's state
            store = context.state.get(RESIDUAL_KEY, ArrayRecord())
            residual = {tuple(key.rsplit("|", 1)): _tensor(a).to(device) for key, a in store.items()}
            _sparsify(update, sparse, residual)
            context.state[RESIDUAL_KEY] = ArrayRecord(array_dict={f"{p}|{s}": _arr(t) for (p, s), t in residual.items()})
        if update_hook is not None:
            update = update_hook(rnd, k, update) or update
        metrics = MetricRecord({"num-examples": int(update.num_examples), "client": k, "rank": ranks[k],
                                "train_loss": float(update.train_loss), "bytes-up-dense": int(dense_bytes)})
        return Message(RecordDict({"arrays": encode_update(update), "metrics": metrics}), reply_to=msg)

    return app


# -- server ---------------------------------------------------------------------------------
class FloraStrategy(Strategy):
    """Flower Strategy for federated LoRA: "flora" (default), "fedavg", "fedavg-delta"; sparse= for CELLM.

    Args mirror `run_federation`; the server owns the training recipe and sends it to the
    clients. ranks: expected rank per client id (partition-id); None trusts the rank a
    client reports (shapes are still checked against it). weights: p_k per client id;
    default the reported num-examples. min_nodes: clients sampled (all connected nodes,
    at least this many) each round.

    After a run: `history` (a FederationHistory with the same per-round records as
    run_federation) and `arrays` (the global state; `materialise(model_factory, arrays)`).
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        strategy: str = "flora",
        *,
        ranks: Sequence[int] | None = None,
        sparse: float | None = None,
        seed: int = 0,
        local_steps: int = 10,
        lr: float = 1e-3,
        batch_size: int = 8,
        alpha: float = 16.0,
        target: str | list[str] = "all-linear",
        modules_to_save: list[str] | None = None,
        lora_kwargs: dict | None = None,
        weights: Sequence[float] | None = None,
        min_nodes: int = 2,
        eval_fn: Callable[[nn.Module], dict] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if sparse is not None and not (isinstance(sparse, (int, float)) and not isinstance(sparse, bool)
                                       and 0 < sparse <= 1):
            raise ConfigError(f"sparse must be None or a fraction in (0, 1], got {sparse!r}")
        if ranks is not None and strategy == "fedavg" and len(set(ranks)) > 1:
            raise ConfigError(f"strategy 'fedavg' needs equal ranks, got {list(ranks)}")
        for name, v in (("local_steps", local_steps), ("batch_size", batch_size), ("min_nodes", min_nodes)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"lr must be > 0, got {lr!r}")
        lora_kwargs = dict(lora_kwargs or {})
        if "r" in lora_kwargs:
            raise ConfigError("give the clients' ranks to the ClientApp, not lora_kwargs['r']")
        self.model_factory, self.strategy = model_factory, strategy
        self.ranks = None if ranks is None else [int(r) for r in ranks]
        self.weights = None if weights is None else [float(w) for w in weights]
        self.min_nodes, self.eval_fn = min_nodes, eval_fn
        self.train_config = {
            "strategy": strategy, "seed": int(seed), "local-steps": local_steps, "lr": float(lr),
            "batch-size": batch_size, "alpha": float(alpha), "sparse": float(sparse or 0.0),
            "target": json.dumps(target), "modules_to_save": json.dumps(modules_to_save),
            "lora_kwargs": json.dumps(lora_kwargs),
        }
        model = model_factory()
        if adapted_layers(model):
            raise ConfigError("the global model already holds lorakit adapters; pass a plain model")
        self.shapes, self.full_shapes = _shapes(model, _lora_config(self.train_config, 1))
        self.history = FederationHistory(strategy)
        self.arrays = ArrayRecord()
        self._glob: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def initial_arrays(self) -> ArrayRecord:
        """Round 1's global state: empty (every node starts from model_factory())."""
        return ArrayRecord()

    def summary(self) -> None:
        log.info("FloraStrategy(%s): %d LoRA modules, %d full params, config %s", self.strategy,
                 len(self.shapes), len(self.full_shapes), self.train_config)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        node_ids = list(grid.get_node_ids())
        waited = 0.0
        while len(node_ids) < self.min_nodes and waited < 300:  # wait for SuperNodes to connect
            time.sleep(1.0)
            waited += 1.0
            node_ids = list(grid.get_node_ids())
        cfg = ConfigRecord({**dict(config), **self.train_config, "server-round": server_round})
        self._down = bytes_of_record(arrays)
        return [Message(RecordDict({"arrays": arrays, "config": cfg}), message_type=MessageType.TRAIN, dst_node_id=n)
                for n in sorted(node_ids)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round - 1
        record: dict[str, Any] = {"round": rnd, "accepted": [], "rejected": [], "weights": {}, "train_loss": {},
                                  "bytes_up": 0, "bytes_up_dense": 0, "bytes_down": 0}
        received: dict[int, ClientUpdate] = {}
        for msg in replies:
            record["bytes_down"] += getattr(self, "_down", 0)
            node = msg.metadata.src_node_id
            if msg.has_error():
                record["rejected"].append({"client": None, "node": node, "reason": f"client error: {msg.error.reason}"})
                continue
            try:
                metrics = msg.content["metrics"]
                k = int(metrics["client"])
                rank = self.ranks[k] if self.ranks is not None else int(metrics["rank"])
                update = decode_update(msg.content["arrays"], k, rank, self.shapes, self.full_shapes)
                update.num_examples = int(metrics["num-examples"])
                update.train_loss = float(metrics.get("train_loss", float("nan")))
                record["bytes_up_dense"] += int(metrics.get("bytes-up-dense", 0))
            except (KeyError, ValueError, TypeError, IndexError) as e:
                record["rejected"].append({"client": None, "node": node, "reason": f"undecodable reply: {e}"})
                continue
            record["bytes_up"] += _wire_bytes(update)
            record["train_loss"][k] = update.train_loss
            problem = validate_update(update, rank, self.shapes, self.full_shapes)
            if problem is None and k in received:
                problem = f"duplicate update from client {k}"
            if problem is None and self.strategy == "fedavg" and received:
                r0 = next(iter(received.values())).rank
                problem = None if rank == r0 else f"rank {rank} != {r0} (fedavg needs equal ranks)"
            if problem is not None:
                log.warning("round %d: rejected client %d: %s", server_round, k, problem)
                record["rejected"].append({"client": k, "node": node, "reason": problem})
                continue
            record["accepted"].append(k)
            received[k] = update
        record["accepted"].sort()
        if not received:
            record["skipped"] = True
            self.history.rounds.append(record)
            return None, MetricRecord({"accepted": 0, "rejected": len(record["rejected"])})

        ks = sorted(received)
        raw = [self.weights[k] if self.weights is not None else float(received[k].num_examples) for k in ks]
        p = normalize_weights(raw, len(ks))
        record["weights"] = dict(zip(ks, p))
        # the inits are regenerated here exactly as the clients did (seeded, or the global factors)
        inits = {k: client_init(self.strategy, rnd, k, received[k].rank, self.shapes, self._glob,
                                 int(self.train_config["seed"]), torch.device("cpu")) for k in ks}
        out = {key: a for key, a in self.arrays.items() if not key.startswith("g.")}
        sq_norm = 0.0
        with torch.no_grad():
            for path in sorted(self.shapes):
                As = [inits[k][path][0].float() + _dense(received[k].factors[path][0]) for k in ks]
                Bs = [inits[k][path][1].float() + _dense(received[k].factors[path][1]) for k in ks]
                if self.strategy == "flora":
                    a, b = flora_stack(As, Bs, p)
                    delta = b @ a
                    out[f"m{rnd}.A|{path}"], out[f"m{rnd}.B|{path}"] = _arr(a), _arr(b)
                else:
                    a, b = fedavg_factors(As, Bs, p) if self.strategy == "fedavg" else flora_stack(As, Bs, p)
                    old = self._glob.get(path)
                    delta = b @ a - (old[1] @ old[0] if old is not None else 0.0)
                    self._glob[path] = (a, b)
                    out[f"g.A|{path}"], out[f"g.B|{path}"] = _arr(a), _arr(b)
                sq_norm += float(delta.pow(2).sum())
            for name in self.full_shapes:
                d = sum(pk * _dense(received[k].full[name]) for pk, k in zip(p, ks))
                out[f"h{rnd}|{name}"] = _arr(d)
                sq_norm += float(d.pow(2).sum())
        record["delta_norm"] = math.sqrt(sq_norm)
        self.arrays = ArrayRecord(array_dict=out)
        if self.eval_fn is not None:
            record["eval"] = self.eval_fn(materialise(self.model_factory, self.arrays))
        self.history.rounds.append(record)
        losses = [received[k].train_loss for k in ks]
        return self.arrays, MetricRecord({"accepted": len(ks), "rejected": len(record["rejected"]),
                                          "train_loss": float(sum(losses) / len(losses)),
                                          "bytes_up": int(record["bytes_up"])})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return []  # evaluation is centralised (eval_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def global_model(self) -> nn.Module:
        return materialise(self.model_factory, self.arrays)


def _dense(t) -> torch.Tensor:
    return (t.to_dense() if isinstance(t, SparseUpdate) else t).float()


def bytes_of_record(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def make_server_app(strategy: FloraStrategy | Callable[[Context], FloraStrategy], num_rounds: int | None = None
                    ) -> ServerApp:
    """A ServerApp running `strategy` (or `strategy(context)`, built from the run config) for
    `num_rounds` rounds (default: run_config["num-server-rounds"])."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strat = strategy if isinstance(strategy, FloraStrategy) else strategy(context)
        n = num_rounds if num_rounds is not None else int(context.run_config["num-server-rounds"])
        strat.start(grid, strat.initial_arrays(), num_rounds=n)

    return app


def run_flower_simulation(
    model_factory: Callable[[], nn.Module],
    client_datasets: Sequence,
    ranks: Sequence[int],
    rounds: int,
    strategy: str = "flora",
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    update_hook: Callable[[int, int, ClientUpdate], ClientUpdate | None] | None = None,
    num_cpus_per_client: float = 1.0,
    backend_config: dict | None = None,
    **strategy_kwargs,
) -> FederationHistory:
    """run_federation's signature, run on Flower's simulation engine (Ray backend, one process per actor).

    strategy_kwargs go to FloraStrategy (sparse, seed, local_steps, lr, batch_size, alpha,
    target, modules_to_save, lora_kwargs, weights, eval_fn). Returns the strategy's
    FederationHistory with `.model` (the global model) and `.global_factors` set.
    """
    from flwr.simulation import run_simulation

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds <= 0:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    ranks = list(ranks)
    strat = FloraStrategy(model_factory, strategy, ranks=ranks, min_nodes=len(client_datasets), **strategy_kwargs)
    client_app = make_client_app(model_factory, client_datasets, ranks, loss_fn=loss_fn, update_hook=update_hook)
    config = copy.deepcopy(backend_config) if backend_config else {}
    config.setdefault("client_resources", {"num_cpus": num_cpus_per_client, "num_gpus": 0.0})
    config.setdefault("init_args", {})
    config["init_args"].setdefault("logging_level", "ERROR")
    run_simulation(server_app=make_server_app(strat, rounds), client_app=client_app,
                   num_supernodes=len(client_datasets), backend_config=config)
    if len(strat.history.rounds) != rounds:
        raise RuntimeError(f"the Flower simulation ran {len(strat.history.rounds)} of {rounds} rounds; see its log")
    strat.history.model = strat.global_model()
    if strat.strategy == "flora":
        last = _split_state(strat.arrays)[0]
        strat.history.global_factors = last[-1] if last else {}
    else:
        strat.history.global_factors = dict(strat._glob)
    return strat.history
