"""FRUGAL: full-rank updates with gradient splitting (Zmushko, Beznosikov, Takáč, Horváth,
arXiv:2411.07837; reference: github.com/philip-zmushko/FRUGAL, `frugal/proj_optimizer_templates.py`,
`frugal/adamw.py`, `frugal/galore_projector.py`, `frugal/coordinate_projector.py`).

Every trainable parameter is updated at full rank, but only a fraction ρ (`density`) of the
"projectable" parameters' coordinates carries Adam state; the rest of the gradient takes a
state-free signSGD step. Every T steps (`update_gap`; steps 0, T, 2T, ... of the optimizer)
the state-full subspace is chosen anew and, as in the reference (`reset_statistics=True`), the
Adam state of the new subspace starts from zero (moments zero, bias-correction step 0).

With η the group lr, s = `state_full_lr_scale`, s' = `state_free_lr_scale`, λ the decoupled
weight decay, and Adam(·) = m̂ / (√v̂ + ε) of the moments kept for that subspace, one step on a
projectable weight W with gradient G is

    W ← W (1 − ηλ)
    blocks   (W active):    W ← W − η s Adam(G)
             (W inactive):  W ← W − η s s' sign(G)                       (no state at all)
    svd / random (W: m×n, r = round(ρ·min(m, n)), P the projector of galore.py's "std" side):
                            R = proj(G)                                   (r×n or m×r)
                            W ← W − η s back(Adam(R)) − η s s' sign(G − back(R))
    columns  (K = round(ρ·n) random column indices, sorted):
                            W[:, K]  ← W[:, K]  − η s Adam(G[:, K])
                            W[:, ¬K] ← W[:, ¬K] − η s s' sign(G[:, ¬K])

`blocks` (BAdam-like): the blocks are the individual projectable tensors; round(ρ·n) of the
n trainable ones are active (Python round, as the reference), picked uniformly at random
(`block_order="random"`, the reference default) or cyclically ("ascending"/"descending"; the
reference's C4 pre-training scripts use "descending"). `svd` is GaLore's projection (top-r
singular vectors of the current gradient, `galore.orthogonal_basis`), `random` a random
semi-orthogonal basis, `columns` the reference's coordinate ("columns") projection. At ρ = 1
the residual is zero by construction and is skipped (its sign would be rounding noise).
Non-projectable parameters (group ``frugal=False``) take plain AdamW with lr η.

Defaults (the reference's): projection "blocks" (its `--optimizer frugal` for pre-training;
its fine-tuning scripts use "columns"), ρ = 0.25, T = 200, s = 1, s' = 1 (the paper uses
s' = 1 for pre-training and 0.1 for fine-tuning), betas (0.9, 0.999), ε = 1e-8. Which tensors
are projectable is `frugal_param_groups`: the weights of all linear layers except the output
head (the reference's `prepare_proj_params`: attention and MLP weights); embeddings, the LM
head, norms and biases keep full AdamW state unless asked (the reference's `proj_embeds`,
`proj_logits`, `proj_norms`, all False by default; the paper finds the logits layer needs Adam).

Optimizer state (floats): blocks 2·Σ_active numel; svd/random 2·r·max(m, n) moments + r·min(m, n)
projector per weight; columns 2·m·K moments + K int64 indices; plus 2·numel per AdamW
parameter. `state_bytes` (from galore.py) counts it. Where this differs from the reference:
the random choices come from a generator seeded by (seed, group, refresh index[, parameter]),
not the global RNG, so a run (and a resumed run) re-selects identically; the columns count is
round(ρ·n) (the reference floors it); and moments are allocated when a parameter first gets a
gradient rather than at selection, so frozen parameters never hold state. Adam's ε is added to
√v̂ and decay multiplies W before the update, exactly as `torch.optim.AdamW` (and the reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.optim.galore import (
    galore_param_groups,
    orthogonal_basis,
    project,
    project_back,
    projection_side,
    state_bytes,
)

PROJECTIONS = ("blocks", "svd", "random", "columns")
BLOCK_ORDERS = ("random", "ascending", "descending")

__all__ = [
    "BLOCK_ORDERS",
    "PROJECTIONS",
    "FrugalAdamW",
    "frugal_param_groups",
    "select_blocks",
    "state_bytes",
    "subspace_size",
]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_group(group: dict[str, Any]) -> None:
    d = group["density"]
    if not _is_number(d) or not 0.0 <= d <= 1.0:
        raise ConfigError(f"FRUGAL density (rho) must be in [0, 1], got {d!r}")
    t = group["update_gap"]
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ConfigError(f"FRUGAL update_gap (T) must be an integer >= 1, got {t!r}")
    if group["projection"] not in PROJECTIONS:
        raise ConfigError(f"FRUGAL projection must be one of {PROJECTIONS}, got {group['projection']!r}")
    if group["block_order"] not in BLOCK_ORDERS:
        raise ConfigError(f"FRUGAL block_order must be one of {BLOCK_ORDERS}, got {group['block_order']!r}")
    for key in ("lr", "state_full_lr_scale", "state_free_lr_scale", "weight_decay", "eps"):
        if not _is_number(group[key]) or group[key] < 0:
            raise ConfigError(f"FRUGAL {key} must be a non-negative number, got {group[key]!r}")
    betas = group["betas"]
    if len(betas) != 2 or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
        raise ConfigError(f"FRUGAL seed must be an integer, got {group['seed']!r}")
    if group["frugal"] and group["projection"] != "blocks":
        bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
        if bad:
            raise ConfigError(f"FRUGAL projection {group['projection']!r} needs 2-D parameters, got shapes {bad}; "
                              "put them in a group with frugal=False or use projection='blocks'")


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative ints (same key, same draws)."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def select_blocks(n: int, n_active: int, order: str, seed: int, refresh: int, group: int = 0) -> list[int]:
    """Indices (sorted) of the `n_active` of `n` blocks that are state-full in refresh period `refresh`.

    random: uniform without replacement, seeded by (seed, group, refresh);
    ascending: the window starting at refresh·n_active (mod n); descending: the window ending
    at n−1−refresh·n_active (mod n), i.e. the reference's cyclic orders without a stored pointer.
    """
    if n_active <= 0 or n == 0:
        return []
    if order == "random":
        return sorted(torch.randperm(n, generator=_generator(seed, group, refresh))[:n_active].tolist())
    if order == "ascending":
        start = refresh * n_active
        return sorted({(start + i) % n for i in range(n_active)})
    if order == "descending":
        start = n - 1 - refresh * n_active
        return sorted({(start - i) % n for i in range(n_active)})
    raise ConfigError(f"FRUGAL block_order must be one of {BLOCK_ORDERS}, got {order!r}")


def subspace_size(shape: torch.Size | tuple[int, ...], projection: str, density: float) -> int:
    """Size of the state-full subspace of one m×n weight: r = round(ρ·min(m, n)) for svd/random
    (the side galore's "std" projects) or K = round(ρ·n) columns; blocks have no per-tensor size."""
    if projection in ("svd", "random"):
        return round(density * min(shape))
    if projection == "columns":
        return round(density * shape[1])
    raise ConfigError(f"subspace_size is defined for svd/random/columns, not {projection!r}")


def _random_basis(shape: torch.Size, rank: int, side: str, generator: torch.Generator,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random semi-orthogonal basis: (m×r) with orthonormal columns ('left') or (r×n) with orthonormal rows."""
    m, n = shape
    basis = torch.empty((m, rank) if side == "left" else (rank, n))
    torch.nn.init.orthogonal_(basis, generator=generator)
    return basis.to(device=device, dtype=dtype)


def _adam_direction(state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float],
                    eps: float) -> tuple[torch.Tensor, float]:
    """Update the moments in `state` with `grad` (zeros on first use) and return (m / (√v̂ + ε), 1/(1−β1ᵗ)).

    The step is −lr · (1/(1−β1ᵗ)) · m / (√v̂ + ε), the operation order of torch.optim.AdamW.
    """
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["step"] = 0
    state["step"] += 1
    t = state["step"]
    beta1, beta2 = betas
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
    return exp_avg / denom, 1.0 / (1 - beta1**t)


def _drop_moments(state: dict[str, Any]) -> None:
    for key in ("exp_avg", "exp_avg_sq", "step"):
        state.pop(key, None)


class FrugalAdamW(torch.optim.Optimizer):
    """FRUGAL with AdamW as the state-full and signSGD as the state-free optimizer.

    Args:
        params: parameters or param groups; a group with ``frugal=False`` is plain AdamW (see
            `frugal_param_groups` for the usual split). Groups may override every keyword below.
        lr: η (default 1e-3).
        density: ρ ∈ [0, 1], the state-full fraction: of the projectable tensors (blocks), of the
            smaller side's rank (svd/random) or of the columns (columns). Default 0.25.
        update_gap: T ≥ 1, steps between re-selections of the state-full subspace (default 200).
        projection: "blocks" (default), "svd", "random" or "columns".
        block_order: "random" (default), "ascending" or "descending" (blocks only).
        state_full_lr_scale: s, multiplies η for the state-full part of projectable tensors (1.0).
        state_free_lr_scale: s', the state-free signSGD step is η·s·s' (1.0; 0 disables it).
        reset_state: zero the Adam moments when the subspace is re-chosen (True, the reference's
            FRUGAL); False keeps them (GaLore's behaviour; svd/random/columns only, blocks always reset).
        betas, eps, weight_decay: as torch.optim.AdamW (defaults (0.9, 0.999), 1e-8, 0).
        seed: seeds the random subspace choices (default 0).

    State per projectable tensor: ``active`` (blocks), ``projector`` (svd/random: m×r or r×n),
    ``columns`` (int64, K), ``exp_avg``/``exp_avg_sq``/``step`` for its state-full part.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, density: float = 0.25, update_gap: int = 200,
                 projection: str = "blocks", block_order: str = "random", state_full_lr_scale: float = 1.0,
                 state_free_lr_scale: float = 1.0, reset_state: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0):
        defaults = {"lr": lr, "density": density, "update_gap": update_gap, "projection": projection,
                    "block_order": block_order, "state_full_lr_scale": state_full_lr_scale,
                    "state_free_lr_scale": state_free_lr_scale, "reset_state": bool(reset_state),
                    "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "seed": seed,
                    "frugal": True, "refresh_step": 0}
        _check_group({**defaults, "params": []})
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every non-`step` state tensor to the parameter's float dtype; the column
        # indices must stay int64 (bf16 cannot even hold them exactly)
        columns = {k: v["columns"].clone() for k, v in state_dict["state"].items() if "columns" in v}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, idx in columns.items():
            self.state[params[k]]["columns"] = idx.to(device=params[k].device, dtype=torch.long)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            if not group["frugal"]:
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw(p, group)
                continue
            t = group["refresh_step"]
            refresh = t % group["update_gap"] == 0
            k = t // group["update_gap"]  # index of the current refresh period
            if group["projection"] == "blocks":
                if refresh:
                    self._select_blocks(group, gi, k)
                for p in group["params"]:
                    if p.grad is not None:
                        self._blocks_update(p, group)
            else:
                for j, p in enumerate(group["params"]):
                    if p.grad is not None:
                        self._projected_update(p, group, refresh, (gi, k, j))
            group["refresh_step"] = t + 1
        return loss

    # -- the three update rules ---------------------------------------------------------------
    def _check_grad(self, p: torch.Tensor) -> torch.Tensor:
        if p.grad.is_sparse:
            raise RuntimeError("FrugalAdamW does not support sparse gradients")
        return p.grad

    def _decay(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = self._check_grad(p)
        self._decay(p, group)
        direction, bias1 = _adam_direction(self.state[p], grad, group["betas"], group["eps"])
        p.add_(direction, alpha=-group["lr"] * bias1)

    def _select_blocks(self, group: dict[str, Any], gi: int, k: int) -> None:
        eligible = [p for p in group["params"] if p.requires_grad]
        chosen = set(select_blocks(len(eligible), round(group["density"] * len(eligible)), group["block_order"],
                                   group["seed"], k, gi))
        active = {id(eligible[i]) for i in chosen}
        for p in group["params"]:
            state = self.state[p]
            _drop_moments(state)  # reset: newly active blocks start a fresh Adam; inactive ones hold nothing
            state["active"] = id(p) in active

    def _blocks_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = self._check_grad(p)
        state = self.state[p]
        lr = group["lr"] * group["state_full_lr_scale"]
        self._decay(p, group)
        if state.get("active", False):
            direction, bias1 = _adam_direction(state, grad, group["betas"], group["eps"])
            p.add_(direction, alpha=-lr * bias1)
        elif group["state_free_lr_scale"] != 0:
            p.add_(grad.sign(), alpha=-lr * group["state_free_lr_scale"])

    def _projected_update(self, p: torch.Tensor, group: dict[str, Any], refresh: bool, key: tuple[int, int, int]) -> None:
        grad = self._check_grad(p)
        state = self.state[p]
        proj = group["projection"]
        size = subspace_size(p.shape, proj, group["density"])
        new = "projector" not in state and "columns" not in state
        if refresh or new:
            gi, k, j = key
            if proj == "columns":
                gen = _generator(group["seed"], gi, k, j)
                state["columns"] = torch.randperm(p.shape[1], generator=gen)[:size].sort().values.to(p.device)
            else:
                side = projection_side(p.shape, "std")
                state["projector"] = (orthogonal_basis(grad, size, side) if proj == "svd" else
                                      _random_basis(p.shape, size, side, _generator(group["seed"], gi, k, j),
                                                    grad.dtype, grad.device))
            if group["reset_state"] or new:
                _drop_moments(state)
        lr = group["lr"] * group["state_full_lr_scale"]
        free_lr = lr * group["state_free_lr_scale"]
        self._decay(p, group)
        if proj == "columns":
            cols = state["columns"]
            direction, bias1 = _adam_direction(state, grad[:, cols], group["betas"], group["eps"])  # (m×K)
            update = grad.sign().mul_(free_lr) if free_lr != 0 and size < p.shape[1] else torch.zeros_like(p)
            update[:, cols] = direction * (lr * bias1)
            p.sub_(update)
            return
        side = projection_side(p.shape, "std")
        basis = state["projector"]
        low = project(grad, basis, side)  # (r×n) or (m×r)
        direction, bias1 = _adam_direction(state, low, group["betas"], group["eps"])
        p.add_(project_back(direction, basis, side), alpha=-lr * bias1)
        if free_lr != 0 and size < min(p.shape):  # at r = min(m, n) the residual is exactly zero
            p.add_((grad - project_back(low, basis, side)).sign_(), alpha=-free_lr)


# -- which parameters are projectable -----------------------------------------------------------
def frugal_param_groups(model: nn.Module, targets: list[str] | None = None, embeddings: bool = False,
                        head: bool = False, norms: bool = False) -> list[dict[str, Any]]:
    """Split the trainable parameters into a FRUGAL group and a plain-AdamW group.

    targets: as `galore_param_groups` (None: every linear weight except the output head, the
    reference's attention + MLP weights). embeddings / head / norms: also make the input
    embedding, the output head and the normalisation weights projectable (state-free unless
    selected; the reference's proj_embeds / proj_logits / proj_norms, default False). Norms are
    1-D, so they need projection="blocks". With tied embeddings the one matrix is both input
    embedding and head: set both flags or neither.
    Returns ``[{"params": [...], "frugal": True}, {"params": [...], "frugal": False}]``.
    """
    lowrank, rest = galore_param_groups(model, targets)
    extra: list[torch.Tensor] = []
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and out is not None and out.weight is emb.weight and embeddings != head:
        raise ConfigError(f"{type(model).__name__} ties its input embeddings to the output head: "
                          f"set embeddings and head together (got embeddings={embeddings}, head={head})")
    if embeddings and emb is not None:
        extra.append(emb.weight)
    if head and out is not None:
        extra.append(out.weight)
    if norms:
        extra += [p for m in model.modules() if "norm" in type(m).__name__.lower()
                  for p in m.parameters(recurse=False)]
    chosen = {id(p) for p in extra}
    moved = [p for p in rest["params"] if id(p) in chosen]
    return [{"params": lowrank["params"] + moved, "frugal": True},
            {"params": [p for p in rest["params"] if id(p) not in chosen], "frugal": False}]
