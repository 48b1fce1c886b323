"""Plumbing shared by the data-aware initialisations (no method is registered here).

- `take_batches`: the first n batches from a `batches(n)` callable or any iterable.
- `paused`: run the model with one adapter switched off (and the model in a given mode),
  restoring everything afterwards, also on error.
- `estimate_gradients`: the average full gradient ∂L/∂W0 of every base weight that carries a
  given adapter (LoRA-GA, LoRA-SB), with requires_grad switched on for those weights only.
- `OffsetLowRank`: ΔW = s·(B A − B0 A0) with trainable A, B and a saved frozen copy (A0, B0)
  of their initial values, so that a non-zero initialisation still starts at the base output
  (PiSSA, LoRA-GA). This is PEFT's "convert PiSSA/LoRA-GA to LoRA" form; lorakit never
  edits the base weight, so the residual W0 − s·B0 A0 of the papers lives in the adapter.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import LayerSpec
from lorakit.core.inject import activate_adapters, adapted_layers, deactivate_adapters, state
from lorakit.core.layer import AdaptedConv1D, AdaptedLayer
from lorakit.errors import AdapterError, ConfigError

Batch = dict[str, torch.Tensor]


# -- data ------------------------------------------------------------------------------------
def take_batches(batches: Callable[[int], list[Batch]] | Iterable[Batch], n: int) -> list[Batch]:
    """The first `n` batches: `batches` is train()'s `batches(n)` callable or any iterable of dicts."""
    out = list(batches(n)) if callable(batches) else list(itertools.islice(iter(batches), n))
    out = out[:n]
    if not out:
        raise ConfigError("data-aware initialisation needs at least one batch of training data, got none")
    for b in out:
        if not isinstance(b, dict) or "input_ids" not in b and "inputs_embeds" not in b:
            raise ConfigError(
                f"each init batch must be a dict of model inputs with 'input_ids' (as the model's forward takes "
                f"them), got {type(b).__name__}{' with keys ' + str(sorted(b)) if isinstance(b, dict) else ''}"
            )
    return out


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def adapter_layers(model: nn.Module, name: str) -> dict[str, AdaptedLayer]:
    """Module path -> wrapped layer, for every layer that carries adapter `name`."""
    if name not in state(model).configs:
        raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(state(model).configs) or 'no adapters'}")
    layers = {p: layer for p, layer in adapted_layers(model).items() if name in layer.adapters}
    merged = [p for p, layer in layers.items() if name in layer.merged]
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into {merged[:3]}...; unmerge it before a data-aware init")
    return layers


def weight_of(layer: AdaptedLayer) -> torch.Tensor:
    """The base weight as (d_out, d_in), detached (GPT-2 Conv1D transposed)."""
    return layer.weight_view().detach()


@contextlib.contextmanager
def paused(model: nn.Module, name: str, training: bool):
    """Adapter `name` inactive and the model in train/eval mode `training` inside the block."""
    st = state(model)
    before, was_training = list(st.active), model.training
    try:
        if name in before:
            deactivate_adapters(model, [name])
        model.train(training)
        yield
    finally:
        activate_adapters(model, before)
        model.train(was_training)


def batch_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The training loss of one batch: lorakit's chunked causal-LM loss where it applies,
    else the model's own `loss` output (seq-cls, custom models)."""
    loss = None
    if "input_ids" in batch and "labels" in batch and batch["labels"].shape == batch["input_ids"].shape:
        from lorakit.train import causal_lm_training_loss

        loss = causal_lm_training_loss(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"))
    if loss is None:
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("the init batches produced no loss: they need 'labels' (as for training)")
    return loss


# -- gradients --------------------------------------------------------------------------------
def estimate_gradients(model: nn.Module, name: str, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Average full gradient G = (1/n) Σ_b ∂L_b/∂W0, (d_out, d_in) float32, per layer carrying `name`.

    Only the target base weights require grad meanwhile (memory: one gradient per target),
    adapter `name` is switched off (so G is the base model's gradient), the model runs in
    train mode like the first training step. requires_grad flags and .grad are restored.
    """
    layers = adapter_layers(model, name)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    weights = {p: layer.base.weight for p, layer in layers.items()}
    saved_grads = {p: w.grad for p, w in weights.items()}
    device = model_device(model)
    grads: dict[str, torch.Tensor] = {}
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        with paused(model, name, training=True), torch.enable_grad():
            for batch in batches:
                batch_loss(model, to_device(batch, device)).backward()
        for p, layer in layers.items():
            g = weights[p].grad
            if g is None:  # layer not on the loss path (e.g. unused head): zero gradient
                g = torch.zeros_like(weights[p])
            g = g.detach().float() / len(batches)
            grads[p] = g.T if isinstance(layer, AdaptedConv1D) else g  # (d_out, d_in)
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for p, w in weights.items():
            w.grad = saved_grads[p]
    return grads


@contextlib.contextmanager
def seeded(device: torch.device, seed: int = 0):
    """Draw random numbers on `device` from a fixed seed inside the block; the global RNG
    state is restored afterwards (randomised SVDs are reproducible and disturb nothing)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        else:  # not torch.manual_seed: that also (lazily) seeds every accelerator, ~4 ms a call
            torch.default_generator.manual_seed(seed)
        yield


def svd(m: torch.Tensor, k: int, method: str = "full", niter: int = 4):
    """U (d_out, q), S (q,), Vh (q, d_in) of m (float32): thin SVD, or torch.svd_lowrank with
    q = 2k + 8 columns when method == "lowrank" (only the top k are needed) and the matrix is
    large enough for that to pay (min(m.shape) > 3q; otherwise the exact SVD is as cheap).
    The randomised SVD draws from a fixed seed: the same matrix always gives the same factors."""
    m = m.float()
    q = 2 * k + 8
    if method == "lowrank" and min(m.shape) > 3 * q:
        with seeded(m.device):
            u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
        return u, s, v.T
    return torch.linalg.svd(m, full_matrices=False)


def check_svd_args(svd_method: str, niter: int) -> None:
    if svd_method not in ("full", "lowrank"):
        raise ConfigError(f"svd must be 'full' or 'lowrank', got {svd_method!r}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ConfigError(f"niter must be a non-negative integer, got {niter!r}")


# -- the offset parameterisation ----------------------------------------------------------------
class OffsetLowRank(nn.Module):
    """h = W0 x + s·B A drop(x) − s·B0 A0 x, with B0, A0 frozen copies of B, A at init.

    Shapes: A (r, d_in), B (d_out, r), A0 (r, d_in), B0 (d_out, r). A, B train; A0, B0 are
    persistent buffers (saved with the adapter: they come from an SVD or from data and are not
    cheap or not possible to recompute). At init B = B0 and A = A0, so the two terms are the
    same numbers computed the same way and the delta is exactly zero.

    The offset term sees x without dropout, as the papers' residual weight W0 − s·B0A0 does.
    """

    zero_init = True
    supports = ("linear",)

    def _build(self, spec: LayerSpec, r: int, scale: float, dropout: float) -> None:
        self.spec = spec
        self.r = r
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"dtype": spec.dtype, "device": spec.device}
        self.lora_A = nn.Linear(spec.in_features, r, bias=False, **kw)  # (r, d_in), PEFT's names
        self.lora_B = nn.Linear(r, spec.out_features, bias=False, **kw)  # (d_out, r)
        self.register_buffer("lora_A0", torch.zeros(r, spec.in_features, **kw))  # (r, d_in), persistent
        self.register_buffer("lora_B0", torch.zeros(spec.out_features, r, **kw))  # (d_out, r), persistent

    def reset_random(self) -> None:
        """Plain LoRA start (Kaiming A, zero B, zero offset): used before any data is seen."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A0.zero_()
        self.lora_B0.zero_()

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """A ← a (r, d_in), B ← b (d_out, r), and the frozen offset A0, B0 ← the same values."""
        dt = self.lora_A.weight.dtype
        self.lora_A.weight.copy_(a.to(dt))
        self.lora_B.weight.copy_(b.to(dt))
        self.lora_A0.copy_(self.lora_A.weight)
        self.lora_B0.copy_(self.lora_B.weight)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # (..., d_in) -> (..., r) -> (..., d_out), twice; ΔW is never formed. F.linear on both
        # paths: identical kernels, so the difference is exactly 0 while B = B0 and A = A0.
        x = x.to(self.lora_A.weight.dtype)
        live = F.linear(F.linear(self.dropout(x), self.lora_A.weight), self.lora_B.weight)
        frozen = F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        return (live - frozen) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight - self.lora_B0 @ self.lora_A0) * self.scale  # (d_out, d_in)

    def to_lora(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact at rank 2r: ΔW = s·[B, B0] [A; −A0]. A lower `rank` gives the best approximation."""
        a = torch.cat([self.lora_A.weight, -self.lora_A0]).detach().clone()  # (2r, d_in)
        b = torch.cat([self.lora_B.weight, self.lora_B0], dim=1).detach().clone()  # (d_out, 2r)
        if rank is not None and rank < 2 * self.r:
            from lorakit.ops.lowrank import truncate

            a, b = truncate(a, b, rank)
        return a, b, self.scale


def check_number(name: str, value, lo: float = 0.0, lo_open: bool = True) -> float:
    """A real number > lo (or >= lo with lo_open=False), finite."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > lo if lo_open else value >= lo
    )
    if not ok:
        raise ConfigError(f"{name} must be a finite number {'>' if lo_open else '>='} {lo}, got {value!r}")
    return float(value)
