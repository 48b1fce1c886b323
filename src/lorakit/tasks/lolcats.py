"""LoLCATs: low-rank linearizing of LLMs (Zhang et al., "LoLCATs: On Low-Rank Linearizing of
Large Language Models", arXiv:2410.10254; reference code github.com/HazyResearch/lolcats).

Every softmax attention of a Llama-family decoder is replaced by a sliding-window + linear
attention hybrid with learnable Hedgehog feature maps (Zhang et al., arXiv:2402.04347), in two
cheap steps: (1) *attention transfer* trains only the feature maps (and a per-head mixing
factor) so that each layer's new attention reproduces that layer's softmax outputs (MSE);
(2) *low-rank linearizing* fine-tunes LoRA on q/k/v/o end to end on next-token loss to correct
what is left. Generation then needs O(1) state per token instead of a growing KV cache.

Feature map (per query head h, separate maps for queries and keys, W_h: (d, f)):

    φ(x) = [softmax(x W_h), softmax(-x W_h)]  (over the f features; clamped to >= eps)  (..., 2f)

applied to the rotated (RoPE) queries and keys, keys after the GQA repeat (one map per query
head, as the reference does). Init "identity" (W_h = I_{d×f}, the reference's `--lk_zero_init`
that its scripts use) or "kaiming" (kaiming-uniform, the reference's default); the key map
starts as a copy of the query map.

Hybrid attention of query i over keys j <= i, window W (keys i-W < j <= i use softmax, older
keys use the linear attention), s_ij = q_i·k_j · scaling, m_i = max_{j in window} s_ij,
ω = sigmoid(w_h) (learnable per head, init 0.1 as in the reference's "w01" configs):

          ω Σ_{i-W<j<=i} exp(s_ij - m_i) v_j  +  φq_i^T S_{i-W}
    y_i = ---------------------------------------------------        S_t = Σ_{j<=t} φk_j v_j^T   (2f, d)
          ω Σ_{i-W<j<=i} exp(s_ij - m_i)      +  φq_i^T z_{i-W}        z_t = Σ_{j<=t} φk_j         (2f,)

(the reference's `hybrid_attention_quadratic` for standard sliding windows, linear factor 1).
window=0 gives pure Hedgehog linear attention y_i = φq_i^T S_i / φq_i^T z_i.

The same function is evaluated three ways, which agree to float precision (tests): the
quadratic form with full (n, n) masks (`hybrid_attention_quadratic`, for checking), the chunked
form used for training and prefill (`hybrid_attention_chunk` over blocks of `chunk_size`
queries carrying (S, z) and the last W-1 keys), and recurrent decoding (the same chunk function
with one query: cost O(W + 2f·d) per token, independent of the context length).

Attention transfer (step 1), per layer l, teacher = the layer's own softmax attention on the
same q, k, v (computed through transformers' attention interface, i.e. exactly what the
original LlamaAttention computes); the residual stream follows the teacher, so layers are
trained independently (as in the reference's `train_attention` mode):

    L = mse_factor · mean_l  MSE(y_l^linear, y_l^softmax)      (head outputs before o_proj)

only φ's W_h and the window factors train (AdamW, lr 1e-2, mse_factor 1000 as in the
reference's `distill_*_xent0_mse1000_lr1e-2` configs). Step 2 injects lorakit's LoRA (r=8,
α=16, q/k/v/o: the reference's `finetune_lora_qkvo` config) and trains it on next-token loss.

    linearize(model, LolcatsConfig(window=64))          # swap the attentions in place
    attention_transfer(model, batches, steps=200)       # step 1
    lora_correct(model, batches, steps=200, lr=1e-4)    # step 2 (lorakit.inject + training)
    generate_linear(model, ids, max_new_tokens=64)      # O(1)-state greedy decoding
    save_linearized(model, "out/lolcats"); lorakit.save(model, "out/lora")

`model.generate(...)` works too: the linear attention stores its state in the cache that
transformers passes (a `DynamicCache`), replacing that layer's KV slot by a
`LolcatsCacheLayer`. Padding is not supported (as in the reference): batches must be
unpadded rows of equal length.

Differences from the reference: the window is the standard sliding window (its
`lolcats_llama_window_sw`, configs `*_wsw64_*`), not the "terraced" 64-blocks of its README
default (`*_wtk64_*`, a query sees its block and the previous one), because with a sliding
window training, chunked prefill and recurrent decoding compute the same function (the
reference trains tk-windows but decodes with a sliding window). Attention transfer uses the
MSE term only (its `xent0` configs), a constant learning rate (no reduce-on-plateau), and
whatever batches the caller gives (the reference: 1024-token Alpaca chunks, 2 epochs).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, repeat_kv

from lorakit.core.adapter import check_nonneg_int, check_positive_int, check_range
from lorakit.errors import AdapterFileError, ConfigError

CONFIG_FILE = "lolcats_config.json"
WEIGHTS_FILE = "lolcats_feature_maps.safetensors"
FORMAT = "lorakit-lolcats"
FORMAT_VERSION = 1
INITS = ("identity", "kaiming")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups", "scaling",
             "layer_idx", "config")
# attention variants whose math the hybrid does not reproduce (q/k norms, logit soft-capping)
_UNSUPPORTED = ("q_norm", "k_norm", "attn_logit_softcapping")


# -- configuration ------------------------------------------------------------------------
@dataclass
class LolcatsConfig:
    """feature_dim: f, the Hedgehog projection width (φ has 2f features); window: W, softmax
    keys per query (0 = pure linear attention); init: "identity" | "kaiming" for W_h;
    window_factor: initial ω = sigmoid(w) mixing weight of the softmax window; chunk_size:
    queries per block in the chunked (training / prefill) form; layers: decoder layer indices
    to linearize (None = all; the others keep softmax attention); eps: φ's lower clamp;
    seed: seeds the "kaiming" init (per layer seed + layer index)."""

    feature_dim: int = 64
    window: int = 64
    init: str = "identity"
    window_factor: float = 0.1
    chunk_size: int = 256
    layers: list[int] | None = None
    eps: float = 1e-12
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("feature_dim", self.feature_dim)
        check_nonneg_int("window", self.window)
        check_positive_int("chunk_size", self.chunk_size)
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        check_range("window_factor", self.window_factor, 0.0, 1.0)
        if self.window_factor <= 0.0:
            raise ConfigError(f"window_factor must be in (0, 1), got {self.window_factor!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise ConfigError(f"layers must be a list of layer indices or None, got {self.layers!r}")
            for i in self.layers:
                check_nonneg_int("layers[...]", i)
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"layers has duplicate indices: {self.layers!r}")
            self.layers = sorted(self.layers)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1e-3:
            raise ConfigError(f"eps must be a number in (0, 1e-3), got {self.eps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LolcatsConfig:
        from lorakit.config import from_dict

        return from_dict(cls, dict(data), where="LoLCATs config")


# -- pure math ----------------------------------------------------------------------------
def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: float32 for half/bfloat16/float32 inputs, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def hedgehog(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Hedgehog feature map: (b, h, n, d), weight (h, d, f) -> (b, h, n, 2f) =
    [softmax(x W_h), softmax(-x W_h)] over the f features, clamped to >= eps."""
    u = x @ weight  # (b, h, n, d) @ (h, d, f) -> (b, h, n, f)
    f = u.shape[-1]
    # both softmaxes in one call: (..., 2, f) normalised over the last dim
    return torch.cat([u, -u], dim=-1).view(*u.shape[:-1], 2, f).softmax(-1).view(*u.shape[:-1], 2 * f).clamp(min=eps)


@dataclass
class HybridState:
    """Recurrent state of one layer after t tokens: S = Σ_{j<=t-W} φk_j v_jᵀ (b, h, 2f, d),
    z = Σ_{j<=t-W} φk_j (b, h, 2f), and the last min(W-1, t) keys (b, h, m, ·) still inside the
    next query's softmax window (raw keys, values and φ(keys))."""

    S: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.S, self.z, self.k, self.v, self.fk

    def map(self, fn) -> HybridState:
        return HybridState(*(fn(t) for t in self.tensors()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def hybrid_attention_chunk(q: torch.Tensor, fq: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           fk: torch.Tensor, window_factor: torch.Tensor, window: int, scaling: float,
                           state: HybridState | None = None) -> tuple[torch.Tensor, HybridState]:
    """Hybrid attention of c new queries given the state of everything before them.

    q, k: (b, h, c, d); v: (b, h, c, dv); fq, fk: (b, h, c, F); window_factor: (h,) ω in (0, 1).
    Returns y (b, h, c, dv) and the state after the c tokens. Math in float32 (or float64).
    """
    h, c = q.shape[1], q.shape[2]
    q, fq, k, v, fk = (_acc(t) for t in (q, fq, k, v, fk))
    wf = _acc(window_factor).view(1, h, 1, 1)
    if state is None:
        m = 0
        K, V, FK = k, v, fk
    else:
        m = state.k.shape[2]
        K, V, FK = (torch.cat([old, new], dim=2) for old, new in ((state.k, k), (state.v, v), (state.fk, fk)))
    L = m + c
    if c == 1 and window > 0 and state is not None:
        # decoding: the m <= W-1 buffered keys and the new one are all inside the window
        s = (q @ K.transpose(-1, -2)) * scaling  # (b, h, 1, L)
        e = torch.exp(s - s.amax(dim=-1, keepdim=True)) * wf
        num = e @ V + fq @ state.S
        den = e.sum(-1, keepdim=True) + fq @ state.z.unsqueeze(-1)
        y = num / den
        if L < window:
            return y, HybridState(state.S, state.z, K, V, FK)
        f0, v0 = FK[:, :, :1], V[:, :, :1]  # key t-W+1 leaves the next query's window
        return y, HybridState(state.S + f0.transpose(-1, -2) @ v0, state.z + f0[:, :, 0], K[:, :, 1:], V[:, :, 1:],
                              FK[:, :, 1:])

    # delta = (absolute query position) - (absolute key position); buffer keys come first
    delta = torch.arange(c, device=q.device)[:, None] + m - torch.arange(L, device=q.device)[None, :]
    lin_mask = (delta >= window).to(q.dtype)  # (c, L) older than the window: linear attention
    a = (fq @ FK.transpose(-1, -2)) * lin_mask  # (b, h, c, L)
    if window > 0:
        s = (q @ K.transpose(-1, -2)) * scaling
        s = s.masked_fill(~((delta >= 0) & (delta < window)), float("-inf"))
        # exp(s - max) as in the reference: the window max is not shared with the linear terms
        a = a + torch.exp(s - s.amax(dim=-1, keepdim=True)) * wf
    num = a @ V
    den = a.sum(-1, keepdim=True)
    if state is not None:
        num = num + fq @ state.S
        den = den + fq @ state.z.unsqueeze(-1)
    y = num / den

    keep = min(max(window - 1, 0), L)  # keys the next query still sees through softmax
    out = L - keep  # keys leaving the window: folded into (S, z)
    S_new = FK[:, :, :out].transpose(-1, -2) @ V[:, :, :out]  # (b, h, F, dv)
    z_new = FK[:, :, :out].sum(2)
    if state is not None:
        S_new, z_new = state.S + S_new, state.z + z_new
    return y, HybridState(S_new, z_new, K[:, :, out:], V[:, :, out:], FK[:, :, out:])


def hybrid_attention(q, fq, k, v, fk, window_factor, window: int, scaling: float, chunk_size: int,
                     state: HybridState | None = None) -> tuple[torch.Tensor, HybridState]:
    """`hybrid_attention_chunk` over the sequence in blocks of `chunk_size` queries: memory
    O(chunk · (chunk + W)) per head instead of O(n²). Returns (y (b, h, n, dv), final state)."""
    ys = []
    for start in range(0, q.shape[2], chunk_size):
        sl = slice(start, start + chunk_size)
        y, state = hybrid_attention_chunk(q[:, :, sl], fq[:, :, sl], k[:, :, sl], v[:, :, sl], fk[:, :, sl],
                                          window_factor, window, scaling, state)
        ys.append(y)
    return torch.cat(ys, dim=2), state


def hybrid_attention_quadratic(q, fq, k, v, fk, window_factor, window: int, scaling: float) -> torch.Tensor:
    """The same attention with full (n, n) masks (reference formulation; O(n²), for checks)."""
    n = q.shape[2]
    q, fq, k, v, fk = (_acc(t) for t in (q, fq, k, v, fk))
    causal = torch.ones(n, n, device=q.device, dtype=q.dtype).tril()
    linear = torch.ones(n, n, device=q.device, dtype=q.dtype).tril(-window)
    win = causal - linear
    s = torch.einsum("bhmd,bhnd->bhmn", q, k) * scaling
    s = s.masked_fill(win == 0, -1e8)
    a_sm = torch.exp(s - s.amax(-1, keepdim=True)) * _acc(window_factor).view(1, -1, 1, 1) * win
    a_ln = torch.einsum("bhmf,bhnf->bhmn", fq, fk) * linear
    return ((a_sm + a_ln) @ v) / (a_sm + a_ln).sum(-1, keepdim=True)


# -- the cache layer ----------------------------------------------------------------------
class LolcatsCacheLayer(CacheLayerMixin):
    """One linearized layer's slot in a transformers `Cache`: a `HybridState` (fixed size:
    S, z and W-1 keys) instead of a growing KV cache. It reports the number of tokens seen, so
    positions and the masks of any remaining softmax layers stay right."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: HybridState | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a LoLCATs linear-attention cache layer holds a recurrent state, not keys and "
                           "values; a softmax attention layer cannot use it")

    def advance(self, state: HybridState, n_tokens: int) -> None:
        self.state, self.seen, self.is_initialized = state, self.seen + n_tokens, True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized = None, 0, False

    def offload(self) -> None:
        if self.state is not None:
            self._device = self.state.S.device
            self.state = self.state.map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.state is not None and getattr(self, "_device", None) is not None:
            self.state = self.state.map(lambda t: t.to(self._device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a LoLCATs linear-attention state cannot be cropped (tokens are folded into it)")


def _state_slot(cache, layer_idx: int) -> LolcatsCacheLayer:
    """This layer's LolcatsCacheLayer inside `cache`, put in place of an empty KV layer."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ConfigError(f"LoLCATs attention needs a transformers Cache with per-layer slots, got {type(cache).__name__}")
    if len(layers) <= layer_idx:
        make = getattr(cache, "layer_class_to_replicate", None)
        if make is None:
            raise ConfigError(f"cache {type(cache).__name__} has no slot for layer {layer_idx}")
        while len(layers) <= layer_idx:
            layers.append(make())
    slot = layers[layer_idx]
    if isinstance(slot, LolcatsCacheLayer):
        return slot
    if getattr(slot, "is_initialized", False) and slot.get_seq_length() > 0:
        raise ConfigError(f"cache layer {layer_idx} already holds softmax keys/values "
                          f"({type(slot).__name__}); start linear-attention decoding with a fresh cache")
    layers[layer_idx] = LolcatsCacheLayer()
    return layers[layer_idx]


# -- the attention module -----------------------------------------------------------------
class HedgehogFeatureMap(nn.Module):
    """φ(x) = [softmax(x W_h), softmax(-x W_h)], one W_h (d, f) per head: (b, h, n, d) -> (b, h, n, 2f)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str, eps: float,
                 seed: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, dtype=dtype, device=device))
        with torch.no_grad():
            if init == "identity":  # reference `zero_init_` without skip connection: W_h = I (rectangular)
                for w in self.weight:
                    nn.init.eye_(w)
            else:  # reference default: kaiming_uniform_ on the (h, d, f) tensor
                g = torch.Generator(device="cpu").manual_seed(seed)
                w = torch.empty(self.weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(w, generator=g)
                self.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hedgehog(x, self.weight.to(x.dtype), self.eps)


class LolcatsAttention(nn.Module):
    """Drop-in replacement of a Llama-family attention (same q/k/v/o projection modules, same
    module paths, so LoRA targets and state-dict keys are unchanged) computing the hybrid
    sliding-window + Hedgehog linear attention.

    mode "linear": the hybrid (chunked, or recurrent with a cache). mode "transfer": the
    layer also computes its softmax teacher on the same q, k, v, stores MSE(y_linear, y_softmax)
    in `transfer_loss`, and returns the teacher's output (layers train independently).
    """

    def __init__(self, base: nn.Module, cfg: LolcatsConfig):
        super().__init__()
        self.config = base.config
        self.layer_idx = base.layer_idx
        self.head_dim = base.head_dim
        self.num_key_value_groups = base.num_key_value_groups
        self.scaling = base.scaling
        self.attention_dropout = getattr(base, "attention_dropout", 0.0)
        self.is_causal = True
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.num_heads = base.config.num_attention_heads
        self.window = cfg.window
        self.chunk_size = cfg.chunk_size
        self.lolcats_config = cfg
        w = base.q_proj.weight if hasattr(base.q_proj, "weight") else next(base.q_proj.parameters())
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, cfg.feature_dim, cfg.init, cfg.eps,
                                                cfg.seed + self.layer_idx, w.dtype, w.device)
        self.feature_map_k = copy.deepcopy(self.feature_map_q)  # reference: untied maps, same init
        logit = math.log(cfg.window_factor / (1 - cfg.window_factor))  # reference init_window_factor
        self.window_factors = nn.Parameter(torch.full((self.num_heads,), logit, dtype=w.dtype, device=w.device))
        self.mode = "linear"
        self.transfer_loss: torch.Tensor | None = None

    def feature_parameters(self) -> list[nn.Parameter]:
        return [self.feature_map_q.weight, self.feature_map_k.weight, self.window_factors]

    def _qkv(self, hidden_states, position_embeddings):
        if position_embeddings is None:
            raise ValueError("LoLCATs attention needs the rotary `position_embeddings` (cos, sin) from the decoder")
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (b, h, n, d)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (b, h_kv, n, d)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        """(b, n, hidden) -> ((b, n, hidden), None)."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", kwargs.pop("past_key_value", None))
        b, n = hidden_states.shape[:2]
        q, k_kv, v_kv = self._qkv(hidden_states, position_embeddings)
        k, v = repeat_kv(k_kv, self.num_key_value_groups), repeat_kv(v_kv, self.num_key_value_groups)
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        wf = torch.sigmoid(self.window_factors)

        if self.mode == "transfer":
            y_pred, _ = hybrid_attention(q, fq, k, v, fk, wf, self.window, self.scaling, self.chunk_size)
            with torch.no_grad():
                y_true = self._softmax_attention(q, k_kv, v_kv, attention_mask, **kwargs)  # (b, n, h, d)
            self.transfer_loss = F.mse_loss(y_pred, _acc(y_true.transpose(1, 2)))
            out = y_true.reshape(b, n, -1)
        else:
            slot = _state_slot(cache, self.layer_idx) if cache is not None else None
            y, state = hybrid_attention(q, fq, k, v, fk, wf, self.window, self.scaling, self.chunk_size,
                                        slot.state if slot is not None else None)
            if slot is not None:  # the cache carries values, never a graph
                slot.advance(state.map(torch.Tensor.detach) if torch.is_grad_enabled() else state, n)
            out = y.to(hidden_states.dtype).transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out), None

    def _softmax_attention(self, q, k, v, attention_mask, **kwargs) -> torch.Tensor:
        """The original layer's attention output (b, n, h, d), through the same interface."""
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        for key in ("cache", "use_cache", "output_attentions"):
            kwargs.pop(key, None)
        out, _ = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return out


# -- conversion ---------------------------------------------------------------------------
def _candidate_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Module) and n
            and all(hasattr(m, a) for a in _REQUIRED) and not isinstance(m, LolcatsAttention)]


def linearized_layers(model: nn.Module) -> dict[str, LolcatsAttention]:
    """Module path -> LolcatsAttention of every linearized layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LolcatsAttention)}


def _require_linearized(model: nn.Module, what: str) -> dict[str, LolcatsAttention]:
    layers = linearized_layers(model)
    if not layers:
        raise ConfigError(f"{what}: {type(model).__name__} has no linearized attention; call linearize(model) first")
    return layers


def linearize(model: nn.Module, config: LolcatsConfig | None = None) -> nn.Module:
    """Replace the model's softmax attentions by LoLCATs attentions in place (projections reused).

    Raises ConfigError for models without Llama-family attention (GPT-2, BERT, ...), for
    attention variants the hybrid does not reproduce (q/k norms, logit soft-capping), for
    layer indices out of range, and for a model that is already linearized. Validation runs
    before anything is replaced.
    """
    cfg = config if config is not None else LolcatsConfig()
    if not isinstance(cfg, LolcatsConfig):
        raise ConfigError(f"config must be a LolcatsConfig, got {type(cfg).__name__}")
    if linearized_layers(model):
        raise ConfigError(f"{type(model).__name__} is already linearized")
    found = _candidate_attentions(model)
    if not found:
        attn = sorted({type(m).__name__ for _, m in model.named_modules() if "attention" in type(m).__name__.lower()})
        raise ConfigError(
            f"linearize: {type(model).__name__} has no Llama-family attention (modules with q_proj/k_proj/v_proj/"
            f"o_proj and rotary position embeddings, e.g. LlamaAttention, MistralAttention, Qwen2Attention); "
            f"its attention modules are {attn or 'none'}")
    for path, m in found:
        bad = [a for a in _UNSUPPORTED if getattr(m, a, None) is not None]
        if bad:
            raise ConfigError(f"linearize: {path} ({type(m).__name__}) uses {bad}, which LoLCATs' hybrid attention "
                              "does not reproduce; supported: Llama, Mistral, Qwen2-style attention")
    n_layers = len(found)
    chosen = list(range(n_layers)) if cfg.layers is None else cfg.layers
    bad_idx = [i for i in chosen if i >= n_layers]
    if bad_idx:
        raise ConfigError(f"layers {bad_idx} out of range: the model has {n_layers} attention layers (0..{n_layers - 1})")
    by_idx = {m.layer_idx: (p, m) for p, m in found}
    if sorted(by_idx) != list(range(n_layers)):
        raise ConfigError(f"attention layer indices {sorted(by_idx)} are not 0..{n_layers - 1}")
    for i in chosen:
        path, base = by_idx[i]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, LolcatsAttention(base, cfg))
    return model


def linearized_config(model: nn.Module) -> LolcatsConfig:
    layers = _require_linearized(model, "linearized_config")
    cfg = next(iter(layers.values())).lolcats_config
    idx = sorted(m.layer_idx for m in layers.values())
    return dataclasses.replace(cfg, layers=idx)


def set_mode(model: nn.Module, mode: str) -> None:
    """Set every linearized layer to mode "linear" (the hybrid) or "transfer" (the hybrid's MSE to
    the softmax teacher is recorded and the layer returns the teacher's output)."""
    if mode not in ("linear", "transfer"):
        raise ConfigError(f"mode must be 'linear' or 'transfer', got {mode!r}")
    for m in _require_linearized(model, "set_mode").values():
        m.mode = mode
        m.transfer_loss = None


# -- training -----------------------------------------------------------------------------
def _ids(batch) -> torch.Tensor:
    """A batch of token ids (b, t): a tensor or a dict with input_ids (no padding allowed)."""
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError("LoLCATs linear attention does not support padding: the batch's attention_mask has zeros; "
                             "use unpadded rows of equal length (e.g. packed blocks)")
        batch = batch["input_ids"]
    ids = torch.as_tensor(batch)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"a batch must be (batch, tokens) integer token ids, got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def _batches(batches) -> list:
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise ValueError("no batches given")
    return batches


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if dec is not None else model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _transfer_losses(model: nn.Module, layers: Iterable[LolcatsAttention], ids: torch.Tensor) -> torch.Tensor:
    _decoder(model)(input_ids=ids.to(_device(model)), use_cache=False)
    losses = [m.transfer_loss for m in layers]
    if any(loss is None for loss in losses):
        raise RuntimeError("a linearized layer did not run during attention transfer")
    return torch.stack(losses)  # (layers,)


def attention_transfer(model: nn.Module, batches, steps: int, lr: float = 1e-2, mse_factor: float = 1000.0,
                       weight_decay: float = 0.0) -> list[float]:
    """Step 1: train only the feature maps and window factors so every linearized layer's output
    matches its softmax teacher. Returns the mean per-layer MSE at each step (before the update).

    Optimises mse_factor · mean_l MSE_l with AdamW (reference: lr 1e-2, factor 1000, no decay).
    All other parameters are frozen during the call and get their requires_grad back after.
    """
    check_positive_int("steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    batches = _batches(batches)
    layers = list(_require_linearized(model, "attention_transfer").values())
    params = [p for m in layers for p in m.feature_parameters()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    history: list[float] = []
    try:
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        set_mode(model, "transfer")
        model.train()
        for step in range(steps):
            losses = _transfer_losses(model, layers, _ids(batches[step % len(batches)]))
            loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            (mse_factor * loss).backward()
            opt.step()
            history.append(loss.item())
    finally:
        set_mode(model, "linear")
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        model.train(was_training)
    return history


@torch.no_grad()
def transfer_mse(model: nn.Module, batches, per_layer: bool = False) -> float | list[float]:
    """Mean MSE between each linearized layer's output and its softmax teacher over `batches`
    (teacher-forced residual stream, as in training). per_layer=True: one value per layer."""
    batches = _batches(batches)
    layers = list(_require_linearized(model, "transfer_mse").values())
    was_training = model.training
    model.eval()
    try:
        set_mode(model, "transfer")
        total = torch.stack([_transfer_losses(model, layers, _ids(b)) for b in batches]).mean(0)
    finally:
        set_mode(model, "linear")
        model.train(was_training)
    return total.tolist() if per_layer else total.mean().item()


def lm_loss(model: nn.Module, batches) -> float:
    """Mean next-token cross-entropy over `batches` (no grad)."""
    batches = _batches(batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [model(input_ids=_ids(b).to(_device(model)), labels=_ids(b).to(_device(model)),
                            use_cache=False).loss.item() for b in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def lora_correct(model: nn.Module, batches, steps: int, lr: float = 1e-4, r: int = 8, alpha: float = 16.0,
                 name: str = "default", target: list[str] | None = None) -> list[float]:
    """Step 2: inject lorakit LoRA (default r=8, α=16 on q/k/v/o, the reference's setting) into the
    linearized model and train it on next-token loss with AdamW. Feature maps stay frozen.
    Returns the loss at each step (before the update). The adapter saves with `lorakit.save`.
    """
    import lorakit

    check_positive_int("steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    batches = _batches(batches)
    _require_linearized(model, "lora_correct")
    for b in batches:
        _ids(b)  # validate before the model is modified
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target=target or LORA_TARGETS), name=name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    history = []
    try:
        for step in range(steps):
            ids = _ids(batches[step % len(batches)]).to(_device(model))
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
    finally:
        model.train(was_training)
    return history


# -- generation ---------------------------------------------------------------------------
def new_cache(model: nn.Module):
    """A fresh cache for `model`: linearized layers put their recurrent state in it."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_nbytes(cache) -> int:
    """Bytes held by a cache: recurrent states of linearized layers + KV tensors of others."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, LolcatsCacheLayer):
            total += layer.state.nbytes() if layer.state is not None else 0
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def greedy_decode(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, timings: dict | None = None) -> torch.Tensor:
    """Greedy decoding with a cache (softmax models: KV cache; linearized: O(1) state).

    Prefill runs the whole prompt in one forward, then one forward per further token. `timings`,
    if given, receives prefill_s, decode_s, decode_steps (forwards after the prefill: one per
    new token but the last) and cache_bytes. Returns (b, t + max_new_tokens).
    """
    ids = _ids(ids).to(_device(model))
    check_nonneg_int("max_new_tokens", max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        cache = new_cache(model)
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        tokens = [ids]
        for i in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            if i + 1 < max_new_tokens:
                out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
        t2 = time.perf_counter()
    finally:
        model.train(was_training)
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=max(max_new_tokens - 1, 0),
                       cache_bytes=cache_nbytes(cache))
    return torch.cat(tokens, dim=1)


def generate_linear(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation of a linearized model with its recurrent state: the cost per new token
    does not grow with the context. Returns (b, t + max_new_tokens) token ids."""
    _require_linearized(model, "generate_linear")
    return greedy_decode(model, ids, max_new_tokens)


def decode_speed(models: dict[str, nn.Module], context_lengths: Sequence[int] = (512, 2048, 8192),
                 new_tokens: int = 32, rounds: int = 3, batch_size: int = 1, seed: int = 0) -> list[dict]:
    """Greedy decoding speed of several models side by side (e.g. {"softmax": original,
    "lolcats": linearized}) at each context length: prefill a random prompt of that length, then
    time the new_tokens - 1 single-token forwards after it. The order of models rotates over `rounds`; medians.

    Rows: {model, context, new_tokens, prefill_s, decode_s, decode_tokens_per_s, cache_mb,
    speedup (decode tokens/s relative to the first model)}.
    """
    if not models:
        raise ValueError("no models given")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ConfigError(f"new_tokens must be an integer >= 2 (one prefill token + timed steps), got {new_tokens!r}")
    check_positive_int("rounds", rounds)
    check_positive_int("batch_size", batch_size)
    for L in context_lengths:
        check_positive_int("context length", L)
    names = list(models)
    vocab = min(int(m.config.vocab_size) for m in models.values())
    rows = []
    for L in context_lengths:
        ids = torch.randint(0, vocab, (batch_size, L), generator=torch.Generator().manual_seed(seed + L))
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t: dict = {}
                greedy_decode(models[n], ids, new_tokens, timings=t)
                runs[n].append(t)
        for n in names:
            dec = statistics.median(t["decode_s"] for t in runs[n])
            rows.append({"model": n, "context": L, "new_tokens": new_tokens,
                         "prefill_s": statistics.median(t["prefill_s"] for t in runs[n]),
                         "decode_s": dec, "decode_tokens_per_s": batch_size * (new_tokens - 1) / dec,
                         "cache_mb": runs[n][-1]["cache_bytes"] / 2**20})
        base = next(row for row in rows if row["context"] == L and row["model"] == names[0])
        for row in rows:
            if row["context"] == L:
                row["speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


# -- files --------------------------------------------------------------------------------
def save_linearized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the feature maps + window factors (safetensors) and the LoLCATs config (JSON)
    atomically to directory `path`. LoRA adapters are saved separately with `lorakit.save`."""
    from safetensors.torch import save as st_save

    from lorakit.fsutil import atomic_dir
    from lorakit.models import config_hash

    layers = _require_linearized(model, "save_linearized")
    cfg = linearized_config(model)
    tensors = {}
    for m in layers.values():
        i = m.layer_idx
        tensors[f"layers.{i}.feature_map_q.weight"] = m.feature_map_q.weight.detach().cpu().contiguous()
        tensors[f"layers.{i}.feature_map_k.weight"] = m.feature_map_k.weight.detach().cpu().contiguous()
        tensors[f"layers.{i}.window_factors"] = m.window_factors.detach().cpu().contiguous()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": cfg.to_dict(),
            "base_config_hash": config_hash(model)}
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterFileError(f"cannot save to {path}: it exists and is not a directory")
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / WEIGHTS_FILE).write_bytes(st_save(tensors, metadata={"format": "pt", "lorakit": FORMAT}))
    return path


def read_linearized(path: str | os.PathLike) -> tuple[LolcatsConfig, dict, dict[str, torch.Tensor]]:
    """(config, metadata, tensors) of a directory written by `save_linearized`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfile, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfile, wfile):
        if not f.is_file():
            raise AdapterFileError(f"{f} is missing (not a LoLCATs directory written by save_linearized?)")
    try:
        meta = json.loads(cfile.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{cfile} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f"{cfile} is not a LoLCATs config (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                               f"expected {FORMAT!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise AdapterFileError(f"{cfile} has version {meta.get('version')!r}; this lorakit reads version {FORMAT_VERSION}")
    cfg = LolcatsConfig.from_dict(meta.get("config", {}))
    try:
        with safe_open(str(wfile), framework="pt") as f:
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(f"{wfile} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return cfg, meta, tensors


def load_linearized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Linearize a fresh (softmax) `model` as saved in `path` and load its feature maps.

    Everything is checked (base-model config hash, every tensor's presence and shape) before
    the model is modified; errors name the file, the tensor and expected vs found shapes.
    """
    from lorakit.models import config_hash

    cfg, meta, tensors = read_linearized(path)
    wfile = Path(path) / WEIGHTS_FILE
    expected_hash = meta.get("base_config_hash")
    if expected_hash is not None and expected_hash != config_hash(model):
        raise AdapterFileError(f"{Path(path) / CONFIG_FILE} was saved for another base model (config hash differs)")
    if linearized_layers(model):
        raise ConfigError(f"{type(model).__name__} is already linearized; load into a fresh model")
    c = model.config
    h, d = c.num_attention_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shapes = {}
    for i in (cfg.layers if cfg.layers is not None else range(c.num_hidden_layers)):
        shapes[f"layers.{i}.feature_map_q.weight"] = (h, d, cfg.feature_dim)
        shapes[f"layers.{i}.feature_map_k.weight"] = (h, d, cfg.feature_dim)
        shapes[f"layers.{i}.window_factors"] = (h,)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise AdapterFileError(f"{wfile}: missing tensors {missing}, unexpected tensors {extra}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterFileError(f"{wfile}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    linearize(model, cfg)
    with torch.no_grad():
        for m in linearized_layers(model).values():
            i = m.layer_idx
            m.feature_map_q.weight.copy_(tensors[f"layers.{i}.feature_map_q.weight"])
            m.feature_map_k.weight.copy_(tensors[f"layers.{i}.feature_map_k.weight"])
            m.window_factors.copy_(tensors[f"layers.{i}.window_factors"])
    return model


__all__ = [
    "HedgehogFeatureMap", "HybridState", "LolcatsAttention", "LolcatsCacheLayer", "LolcatsConfig",
    "attention_transfer", "cache_nbytes", "decode_speed", "generate_linear", "greedy_decode", "hedgehog",
    "hybrid_attention", "hybrid_attention_chunk", "hybrid_attention_quadratic", "linearize", "linearized_config",
    "linearized_layers", "lm_loss", "load_linearized", "lora_correct", "new_cache", "read_linearized",
    "save_linearized", "set_mode", "transfer_mse",
]
