"""Federated LoRA fine-tuning in one process: FLoRA stacking, FedAvg of factors, exact FedAvg.

One round, for K clients with LoRA ranks r_k and weights p_k ∝ local dataset size:

    server  -> client k:  the global model and an init (A⁰_k (r_k, d_in), B⁰_k (d_out, r_k))
    client k:             copy the global base, inject LoRA(r_k), set it to the init,
                          train `local_steps` AdamW steps on its own data
    client k -> server:   (A_k − A⁰_k, s_k B_k − B⁰_k) per module (scale s_k = α/r_k folded
                          into B), optionally top-k sparsified with error feedback (CELLM)
    server:               validate every update (modules, shapes, finite values); reject bad
                          ones (logged) and aggregate the rest:

    "flora"        FLoRA (arXiv:2409.05976): W ← W + B A with A = [p_1A_1; …], B = [B_1 …]
                   (= Σ p_k B_k A_k exactly, any ranks); next round every client starts
                   afresh: A⁰ seeded Kaiming-uniform (as LoRA), B⁰ = 0.
    "fedavg"       FedIT: Ā = Σ p_k A_k, B̄ = Σ p_k B_k; the global model is W0 + B̄Ā (cross
                   terms included, see lorakit.ops.aggregate.cross_terms) and (Ā, B̄) is every
                   client's next init. Equal ranks only.
    "fedavg-delta" exact average of the updates, G = Σ p_k B_k A_k (kept as stacked factors,
                   never merged); the global model is W0 + G and client k's next init is the
                   best rank-r_k approximation of G (truncate_global, FlexLoRA-style), zero
                   rows of A re-seeded so every direction trains.

The init A⁰ is drawn from a generator seeded by (seed, round, client), so a real server
could regenerate it instead of receiving it; that is why clients send differences from
the init (which are also what a sparse encoding compresses well: B starts at 0).

Parameters of `modules_to_save` (e.g. a classification head) are trained in full and
averaged (Σ p_k Δθ_k, exact since they enter linearly) into the global model every round.

Error feedback with sparse=k_fraction keeps, per client and per transmitted tensor, what was
not sent and adds it to the next round's update of that tensor. For "fedavg" the factor
coordinates persist across rounds, so this is the usual error feedback; for "flora" and
"fedavg-delta" a client's factors restart each round, so the carried residual is a
first-order correction in new coordinates (no bytes are ever lost from the sum of sent
tensors, but its meaning in weight space is approximate).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapted_layers, find_targets, modules_to_save_paths
from lorakit.core.layer import AdaptedLayer, wrapper_for
from lorakit.errors import ConfigError
from lorakit.methods.lora import LoraConfig
from lorakit.ops.aggregate import (
    SparseUpdate,
    bytes_of,
    fedavg_factors,
    flora_stack,
    normalize_weights,
    topk_sparsify,
    truncate_global,
)

__all__ = ["STRATEGIES", "ClientUpdate", "FederationHistory", "client_init", "client_round", "run_federation",
           "validate_update"]

STRATEGIES = ("flora", "fedavg", "fedavg-delta")
ADAPTER = "default"


@dataclass
class ClientUpdate:
    """What client `client` sends after local training (the wire format).

    factors: module path -> (ΔA (r, d_in), ΔB (d_out, r)): differences from the round's init,
        scale folded into B; each a tensor or a SparseUpdate.
    full: parameter name -> Δθ for `modules_to_save` parameters (tensor or SparseUpdate).
    """

    client: int
    rank: int
    factors: dict[str, tuple[Any, Any]]
    full: dict[str, Any] = field(default_factory=dict)
    num_examples: int = 0
    train_loss: float = float("nan")


@dataclass
class FederationHistory:
    """Result of `run_federation`: one dict per round, the final global model and factors.

    Each round: round, accepted (client ids), rejected ([{client, reason}]), weights
    ({client: p_k}), train_loss ({client: mean local loss}), bytes_up, bytes_up_dense (the
    same updates sent dense), bytes_down, delta_norm (‖change of the global ΔW‖_F over all
    modules), and eval (what `eval_fn` returned), if given; skipped=True when every update
    was rejected.

    global_factors: path -> (A, B), scale folded into B. "fedavg"/"fedavg-delta": the global
    LoRA (model = W0 + B A); "flora": the last round's stacked update (already merged).
    """

    strategy: str
    rounds: list[dict] = field(default_factory=list)
    model: nn.Module | None = None  # plain model (no adapters), global update merged in
    global_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rounds)

    def __getitem__(self, i: int) -> dict:
        return self.rounds[i]

    def __iter__(self):
        return iter(self.rounds)

    def total(self, key: str = "bytes_up") -> int:
        return sum(r.get(key, 0) for r in self.rounds)


# -- helpers --------------------------------------------------------------------------------
def _derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:7], "little")


def _kaiming_a(gen: torch.Generator, r: int, d_in: int) -> torch.Tensor:
    # LoRA's A init (PEFT: kaiming_uniform_(a=√5)) = U(−1/√d_in, 1/√d_in), from our generator.
    return (torch.rand(r, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)  # (r, d_in)


def _weight_view(module: nn.Module) -> torch.Tensor:
    """The live base weight as (d_out, d_in) (GPT-2's Conv1D is stored transposed)."""
    return wrapper_for(module)(module).weight_view()


def _lora(layer: AdaptedLayer):
    return layer.adapters[ADAPTER]


def _as_dataset(data):
    if torch.is_tensor(data):  # (N, T) token ids: a causal-LM dataset
        if data.dim() != 2:
            raise ConfigError(f"a tensor client dataset must be (N, T) token ids, got shape {tuple(data.shape)}")
        return [{"input_ids": row} for row in data]
    return data


def _default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    if "labels" not in batch:  # causal LM on raw ids (mark padding -100 yourself)
        batch = {**batch, "labels": batch["input_ids"]}
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("the model returned no loss for a client batch; pass loss_fn=(model, batch) -> loss")
    return loss


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# -- server-side validation -----------------------------------------------------------------
def _tensor_problem(t, shape: tuple[int, ...]) -> str | None:
    if isinstance(t, SparseUpdate):
        if not (torch.is_tensor(t.indices) and torch.is_tensor(t.values)):
            return "sparse indices and values must be tensors"
        if tuple(t.shape) != tuple(shape):
            return f"shape {tuple(t.shape)}, expected {tuple(shape)}"
        if t.indices.dim() != 1 or t.values.dim() != 1 or t.indices.numel() != t.values.numel():
            return f"malformed sparse tensor ({t.indices.numel()} indices, {t.values.numel()} values)"
        if t.indices.dtype.is_floating_point or t.indices.dtype == torch.bool:
            return "sparse indices must be integers"
        if t.nnz and (int(t.indices.min()) < 0 or int(t.indices.max()) >= math.prod(shape)):
            return "sparse index out of range"
        if torch.unique(t.indices).numel() != t.nnz:
            return "duplicate sparse indices"
        values = t.values
    elif torch.is_tensor(t):
        if tuple(t.shape) != tuple(shape):
            return f"shape {tuple(t.shape)}, expected {tuple(shape)}"
        values = t
    else:
        return f"expected a tensor, got {type(t).__name__}"
    if not values.dtype.is_floating_point:
        return f"dtype {values.dtype} is not floating point"
    if not bool(torch.isfinite(values).all()):
        return "non-finite values (NaN/inf)"
    return None


def validate_update(
    update: ClientUpdate, rank: int, shapes: dict[str, tuple[int, int]], full_shapes: dict[str, tuple[int, ...]]
) -> str | None:
    """None if `update` fits (rank, module shapes (d_out, d_in), full-parameter shapes), else why not."""
    if not isinstance(update, ClientUpdate):
        return f"expected a ClientUpdate, got {type(update).__name__}"
    if not isinstance(update.factors, dict) or not isinstance(update.full, dict):
        return "factors and full must be dicts"
    got, want = set(update.factors), set(shapes)
    if got != want:
        return f"modules differ: missing {sorted(want - got)[:3]}, unexpected {sorted(got - want)[:3]}"
    for path in sorted(shapes):
        d_out, d_in = shapes[path]
        pair = update.factors[path]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            return f"{path}: expected a pair (ΔA, ΔB)"
        for name, t, shape in (("A", pair[0], (rank, d_in)), ("B", pair[1], (d_out, rank))):
            problem = _tensor_problem(t, shape)
            if problem:
                return f"{path} {name}: {problem}"
    if set(update.full) != set(full_shapes):
        return f"modules_to_save parameters differ: got {sorted(update.full)}, expected {sorted(full_shapes)}"
    for name, shape in full_shapes.items():
        problem = _tensor_problem(update.full[name], shape)
        if problem:
            return f"{name}: {problem}"
    return None


def _dense(t) -> torch.Tensor:
    return (t.to_dense() if isinstance(t, SparseUpdate) else t).float()


# -- the loop -------------------------------------------------------------------------------
def run_federation(
    model_factory: Callable[[], nn.Module],
    client_datasets: Sequence,
    ranks: Sequence[int],
    rounds: int,
    strategy: str = "flora",
    local_steps: int = 10,
    lr: float = 1e-3,
    sparse: float | None = None,
    seed: int = 0,
    *,
    batch_size: int = 8,
    alpha: float = 16.0,
    target: str | list[str] = "all-linear",
    modules_to_save: list[str] | None = None,
    lora_kwargs: dict | None = None,
    weights: Sequence[float] | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    update_hook: Callable[[int, int, ClientUpdate], ClientUpdate | None] | None = None,
) -> FederationHistory:
    """Simulate `rounds` rounds of federated LoRA training; see the module docstring.

    Args:
        model_factory: () -> the initial global model (called once; clients get deep copies).
        client_datasets: one per client: a sequence/Dataset of dict examples (tensors; with
            "labels" for classification, without for causal LM: labels = input_ids), or an
            (N, T) tensor of token ids.
        ranks: LoRA rank of each client (heterogeneous for "flora" and "fedavg-delta").
        strategy: "flora" | "fedavg" | "fedavg-delta".
        local_steps, lr, batch_size: each client's AdamW steps per round (weight decay 0).
        sparse: None (dense) or k_fraction in (0, 1]: top-k upload with error feedback.
        seed: seeds the inits, the data order and dropout; same seed, same history.
        alpha, target, lora_kwargs: the clients' LoraConfig (r = ranks[k]); scale α/r_k.
        modules_to_save: whole modules trained and averaged in full (e.g. ["classifier"]).
        weights: client weights p_k (normalised); default: local dataset sizes.
        loss_fn: (model, batch) -> loss; default model(**batch).loss.
        eval_fn: (global model) -> dict of metrics, called after every round.
        update_hook: (round, client, update) -> update or None; runs between client and server
            (to simulate faulty clients or a lossy network).
    Returns:
        FederationHistory (rounds, final plain global model, global factors for fedavg*).
    """
    # -- validate everything before any work ---------------------------------------------
    _check(strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    datasets = [_as_dataset(d) for d in client_datasets]
    ranks = list(ranks)
    _check(len(datasets) > 0, "need at least one client dataset")
    _check(len(ranks) == len(datasets), f"got {len(ranks)} ranks for {len(datasets)} client datasets")
    _check(all(_is_pos_int(r) for r in ranks), f"ranks must be positive integers, got {ranks}")
    _check(_is_pos_int(rounds), f"rounds must be a positive integer, got {rounds!r}")
    _check(_is_pos_int(local_steps), f"local_steps must be a positive integer, got {local_steps!r}")
    _check(_is_pos_int(batch_size), f"batch_size must be a positive integer, got {batch_size!r}")
    _check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, f"lr must be > 0, got {lr!r}")
    _check(
        sparse is None or (isinstance(sparse, (int, float)) and not isinstance(sparse, bool) and 0 < sparse <= 1),
        f"sparse must be None or a fraction in (0, 1], got {sparse!r}",
    )
    if strategy == "fedavg":
        _check(len(set(ranks)) == 1, f"strategy 'fedavg' averages A and B separately and needs equal ranks, "
               f"got {ranks}; use 'flora' or 'fedavg-delta' for heterogeneous ranks")
    for k, d in enumerate(datasets):
        _check(len(d) > 0, f"client {k} has no data")
    lora_kwargs = dict(lora_kwargs or {})
    _check("r" not in lora_kwargs, "give the clients' ranks in `ranks`, not lora_kwargs['r']")
    configs = [
        LoraConfig(r=r, alpha=alpha, target=target, modules_to_save=modules_to_save, **lora_kwargs) for r in ranks
    ]
    if weights is not None:
        weights = normalize_weights(weights, len(datasets))  # raises on a bad count or values
    client_weight = [float(weights[k]) if weights is not None else float(len(d)) for k, d in enumerate(datasets)]

    global_model = model_factory()
    _check(isinstance(global_model, nn.Module), f"model_factory must return an nn.Module, got {type(global_model)}")
    _check(not adapted_layers(global_model), "the global model already holds lorakit adapters; pass a plain model")
    device = next(global_model.parameters()).device

    shapes: dict[str, tuple[int, int]] = {}  # path -> (d_out, d_in)
    for path in find_targets(global_model, configs[0]):
        module = global_model.get_submodule(path)
        spec = wrapper_for(module)(module).spec(path)
        _check(spec.kind == "linear", f"federated LoRA adapts linear layers only; {path!r} is {spec.kind}")
        shapes[path] = (spec.out_features, spec.in_features)
    paths = sorted(shapes)
    full_shapes = {}
    for mpath in modules_to_save_paths(global_model, configs[0]):
        _check(mpath not in shapes, f"{mpath!r} is both a LoRA target and in modules_to_save")
        for name, p in global_model.get_submodule(mpath).named_parameters():
            full_shapes[f"{mpath}.{name}"] = tuple(p.shape)

    history = FederationHistory(strategy)
    global_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # fedavg*: folded (A, B), fp32
    residuals: list[dict] = [{} for _ in datasets]  # error feedback, per client and tensor
    last_broadcast = 0  # bytes every client must download before the next round

    for rnd in range(rounds):
        record: dict[str, Any] = {"round": rnd, "accepted": [], "rejected": [], "weights": {}, "train_loss": {},
                                  "bytes_up": 0, "bytes_up_dense": 0, "bytes_down": 0}
        received: dict[int, tuple[ClientUpdate, dict]] = {}
        for k in range(len(datasets)):
            init = client_init(strategy, rnd, k, ranks[k], shapes, global_factors, seed, device)
            if strategy == "flora":
                record["bytes_down"] += last_broadcast  # the previous round's stacked update
            elif rnd > 0:
                record["bytes_down"] += bytes_of(init) + last_broadcast  # factors + head deltas
            update = client_round(global_model, configs[k], k, init, datasets[k], rnd, seed, local_steps, lr,
                                   batch_size, loss_fn, full_shapes, device)
            record["bytes_up_dense"] += bytes_of(update.factors) + bytes_of(update.full)
            if sparse is not None:
                _sparsify(update, sparse, residuals[k])
            if update_hook is not None:
                update = update_hook(rnd, k, update) or update
            record["bytes_up"] += _wire_bytes(update)
            record["train_loss"][k] = getattr(update, "train_loss", float("nan"))
            problem = validate_update(update, ranks[k], shapes, full_shapes)
            if problem is not None:
                record["rejected"].append({"client": k, "reason": problem})
                continue
            record["accepted"].append(k)
            received[k] = (update, init)

        if not received:  # every update rejected: the global model stays as it is
            record["skipped"] = True
            last_broadcast = 0  # and there is nothing new to download
            history.rounds.append(record)
            continue
        ks = sorted(received)
        p = normalize_weights([client_weight[k] for k in ks], len(ks))
        record["weights"] = dict(zip(ks, p))
        factors = {}  # path -> ([A_k], [B_k]) of accepted clients, fp32, scale folded into B
        for path in paths:
            As, Bs = [], []
            for k in ks:
                upd, init = received[k]
                da, db = upd.factors[path]
                As.append(init[path][0].float() + _dense(da))
                Bs.append(init[path][1].float() + _dense(db))
            factors[path] = (As, Bs)

        sq_norm = 0.0
        with torch.no_grad():
            for path in paths:
                As, Bs = factors[path]
                if strategy == "flora":
                    a, b = flora_stack(As, Bs, p)
                    delta = b @ a  # (d_out, d_in) = Σ p_k B_k A_k exactly
                    w = _weight_view(global_model.get_submodule(path))
                    w += delta.to(device=w.device, dtype=w.dtype)
                    global_factors[path] = (a, b)  # this round's stacked update: what clients download next
                else:
                    a, b = fedavg_factors(As, Bs, p) if strategy == "fedavg" else flora_stack(As, Bs, p)
                    old = global_factors.get(path)
                    delta = b @ a - (old[1] @ old[0] if old is not None else 0.0)
                    global_factors[path] = (a, b)
                sq_norm += float(delta.pow(2).sum())
            full_delta = {}
            for name in full_shapes:
                full_delta[name] = sum(pk * _dense(received[k][0].full[name]) for pk, k in zip(p, ks))
                param = global_model.get_parameter(name)
                param += full_delta[name].to(device=param.device, dtype=param.dtype)
                sq_norm += float(full_delta[name].pow(2).sum())
        last_broadcast = bytes_of(full_delta) + (bytes_of(global_factors) if strategy == "flora" else 0)
        record["delta_norm"] = math.sqrt(sq_norm)
        if eval_fn is not None:
            record["eval"] = eval_fn(_materialise(global_model, global_factors, strategy))
        history.rounds.append(record)

    history.model = _materialise(global_model, global_factors, strategy)
    history.global_factors = global_factors
    return history


def client_init(strategy: str, rnd: int, k: int, r: int, shapes: dict, glob: dict, seed: int, device) -> dict:
    """Client k's init (A⁰ (r, d_in), B⁰ (d_out, r)) per module for round `rnd` (0-based).

    "flora" (and every strategy in round 0): A⁰ seeded Kaiming-uniform from (seed, rnd, k)
    (one shared draw for "fedavg"), B⁰ = 0. "fedavg": the global factors `glob`. "fedavg-delta":
    the best rank-r view of the global update, dead rows of A re-seeded. `shapes` maps each
    module path to (d_out, d_in); `glob` maps it to the global (A, B) (empty before round 1).
    Server and clients (in-process or Flower) call this, so both derive the same init.
    """
    paths = sorted(shapes)

    def seeded(client: int) -> dict:
        gen = torch.Generator().manual_seed(_derive_seed(seed, "init", rnd, client))
        return {p: _kaiming_a(gen, r, shapes[p][1]).to(device) for p in paths}

    if strategy == "flora" or not glob:
        a0 = seeded(-1 if strategy == "fedavg" else k)
        return {p: (a0[p], torch.zeros(shapes[p][0], r, device=device)) for p in paths}
    if strategy == "fedavg":
        return {p: (glob[p][0].to(device).clone(), glob[p][1].to(device).clone()) for p in paths}
    fresh = seeded(k)
    out = {}
    for p in paths:
        a, b = truncate_global(glob[p][0], glob[p][1], r)
        dead = a.abs().sum(dim=1) == 0
        a[dead] = fresh[p][dead].to(a.device)
        out[p] = (a.to(device), b.to(device))
    return out


def _wire_bytes(update) -> int:
    try:
        return bytes_of(getattr(update, "factors", None)) + bytes_of(getattr(update, "full", None))
    except TypeError:  # a malformed update (rejected below) is not sized
        return 0


def _materialise(global_model: nn.Module, global_factors: dict, strategy: str) -> nn.Module:
    """The global model as a plain model: for fedavg* a copy with W0 + B A merged in."""
    if strategy == "flora":
        return global_model  # updates are merged every round
    model = copy.deepcopy(global_model)
    with torch.no_grad():
        for path, (a, b) in global_factors.items():
            w = _weight_view(model.get_submodule(path))
            w += (b @ a).to(device=w.device, dtype=w.dtype)
    return model


def _sparsify(update: ClientUpdate, k_fraction: float, residual: dict) -> None:
    """Replace every tensor of `update` by its top-k part; keep the rest in `residual`."""
    for path, (da, db) in list(update.factors.items()):
        sa, residual[(path, "A")] = topk_sparsify(da, k_fraction, residual.get((path, "A")))
        sb, residual[(path, "B")] = topk_sparsify(db, k_fraction, residual.get((path, "B")))
        update.factors[path] = (sa, sb)
    for name, d in list(update.full.items()):
        update.full[name], residual[("full", name)] = topk_sparsify(d, k_fraction, residual.get(("full", name)))


def client_round(global_model, config, k, init, dataset, rnd, seed, steps, lr, batch_size, loss_fn,
                  full_shapes, device) -> ClientUpdate:
    """Client k: copy the global base, inject LoRA at `init`, train, return the differences."""
    client = copy.deepcopy(global_model)
    lorakit.inject(client, config, name=ADAPTER)
    layers = adapted_layers(client)
    with torch.no_grad():
        for path, (a0, b0) in init.items():
            lora = _lora(layers[path])
            lora.lora_A.weight.copy_(a0)
            lora.lora_B.weight.copy_(b0 / lora.scale)  # init B is in folded coordinates
    start_full = {name: client.get_parameter(name).detach().float().clone() for name in full_shapes}

    gen = torch.Generator().manual_seed(_derive_seed(seed, "data", rnd, k))
    loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True,
                                         generator=gen)
    params = [q for q in client.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded dropout without touching the caller's RNG
        torch.manual_seed(_derive_seed(seed, "dropout", rnd, k))
        client.train()
        batches = iter(loader)
        for _ in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
            loss = loss_fn(client, batch) if loss_fn is not None else _default_loss(client, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    factors = {}
    with torch.no_grad():
        for path, (a0, b0) in init.items():
            lora = _lora(layers[path])
            factors[path] = (lora.lora_A.weight.float() - a0, lora.lora_B.weight.float() * lora.scale - b0)
        full = {name: client.get_parameter(name).detach().float() - start_full[name] for name in full_shapes}
    del client, opt
    return ClientUpdate(k, int(config.r), factors, full, len(dataset), sum(losses) / len(losses))
