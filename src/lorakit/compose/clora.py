"""CLoRA for text: compose ≥2 LoRAs at inference, each controlling its own part of the output
(Meral, Simsar, Tombari, Yanardag, "CLoRA: A Contrastive Approach to Compose Multiple LoRA
Models", arXiv:2403.19776; reference code github.com/gemlab-vt/CLoRA, `pipeline_clora.py`: its
loss_fn / update_latents / attention_map_to_mask are what "the reference" below refers to).

    lorakit.load(model, "runs/medical", name="med", activate=False)
    lorakit.load(model, "runs/legal", name="law", activate=False)
    out = generate(model, tok, "Explain the patient's consent form.",
                   concepts={"med": ["patient"], "law": ["consent form"]},
                   guidance_steps=2, lr=0.02, max_new_tokens=32)
    out.text, out.masks  # (T, 2): which adapter wrote each generated token

The reference (image generation, Stable Diffusion)
--------------------------------------------------
Each LoRA L_i is paired with a concept: tokens of its prompt ("a <cat> ..."). At a denoising
step t every LoRA runs its own forward on the *shared* latent z_t, giving a noise prediction
ε_i and cross-attention maps A_i[:, k] ∈ R^{H·W} (pixels × prompt token k, averaged over heads
and UNet layers). For the first `max_iter_to_alter` steps:

  1. contrastive guidance: each concept token's map, min-max normalised, is one embedding,
     labelled by its concept; an NT-Xent / InfoNCE loss (temperature 0.5, cosine similarity,
     pytorch-metric-learning's `NTXentLoss`) pulls maps of the same concept together (across
     the LoRAs' prompts) and pushes maps of different concepts apart, and the latent takes a
     gradient step  z_t ← z_t − η ∇_{z_t} L;
  2. masks: M_i[p] = 1[Σ_{k∈concept_i} A_i[p, k] > α · max_p Σ_k A_i[p, k]] (α = 0.3), pixels no
     mask claims go to the first LoRA; the fused prediction is the mask-weighted *average*
     ε[p] = Σ_i M_i[p] ε_i[p] / Σ_i M_i[p]  — not a sum of LoRAs.

The text analogue implemented here
----------------------------------
"Pixels" of an image step become the positions a decoder writes: the output of decode step t
is one token, so the masks live on generated positions and the maps on that position's
attention. All adapters share one prompt (text LoRAs have no trigger words); adapter i's
concept is a set of prompt positions K_i (disjoint across adapters).

- Rows. The n adapters run as n rows of one batch (`lorakit.route`, row i → adapter i): one
  forward per step for all adapters, each row with its own KV cache, all fed the same tokens.
- Latent. The shared latent is an additive vector δ ∈ R^d on the input embedding of the
  current position, the same δ for every row (as z_t is shared by every LoRA's forward). It
  starts at 0 at each decode step; after guidance the step's final forward runs with e_t + δ,
  so δ is written into the KV cache and carries forward like the updated z_t.
- Maps. A_i^{(l,h)}(t → k): attention of row i, layer l ∈ `layers` (default all), head h, from
  the current position t to prompt position k. The embedding of concept token k in row i is
  v_{i,k} = minmax([A_i^{(l,h)}(t → k)]_{l,h}) ∈ R^{|layers|·H}: the heads of the selected
  layers play the part of the pixels (one text step has one query position, where an image step
  has H·W of them; the reference averages heads, which would leave a single number).
- Guidance (decode steps t < `guided_tokens`, `guidance_steps` times):
      L(δ) = mean over positive pairs (a, p) of softplus(log Σ_{n: y_n ≠ y_a} e^{s_an} − s_ap),
      s_ab = cos(v_a, v_b) / τ,   y_{i,k} = the adapter owning k,
      δ ← δ − η · ‖e_t‖ · ∇_δ L / ‖∇_δ L‖      (‖e_t‖: mean norm of the rows' current input embedding)
  which is NT-Xent with several positives per anchor, as pytorch-metric-learning computes it
  (−log e^{s_ap} / (e^{s_ap} + Σ_n e^{s_an}) averaged over positive pairs; 0 when there are
  none). Positives: the same concept token seen by different rows, and the tokens of one
  concept span; negatives: other adapters' concept tokens. So guidance makes each adapter's
  concept read by its own set of heads instead of blended ones.
- Masks. s_i(t) = mean_{l,h} Σ_{k∈K_i} A_i^{(l,h)}(t → k), the attention mass adapter i's row
  puts on its own concept (the reference sums A_i over its concept tokens the same way), from
  the step's final forward. Rules (`mask`):
      "softmax":   M_i(t) = softmax_i(log s_i(t) / mask_temperature) = s_i^{1/τ_m} / Σ_j s_j^{1/τ_m}
                   (on log-masses, so the rule does not depend on how much attention a model
                   puts on prompt tokens at all: τ_m = 1 shares in proportion to the masses,
                   τ_m → 0 gives the position to the strongest adapter)
      "threshold": m_i(t) = 1[s_i(t) > α · max_{t'≤t} s_i(t')] (the reference's rule, with the
                   max over the positions written so far); if no m_i is on, m_0 = 1 (the first
                   adapter is the background, as in the reference); M_i = m_i / Σ_j m_j
      "fixed":     M_i(t) = w_i / Σ_j w_j for the given `mask_weights` (ablations: one-hot = a
                   single adapter, equal weights = output averaging)
- Fusion. ℓ(t) = Σ_i M_i(t) ℓ_i(t): the mask-weighted average of the adapters' next-token
  logits ℓ_i(t) (Σ_i M_i = 1); the next token is argmax ℓ(t) (or sampled) and every row is fed it.

How this differs from a plain sum. Activating all adapters together (or `merge_adapters` with
method "cat"/"task_arithmetic") runs ONE network with W0 + Σ_i ΔW_i: every adapter acts on every
token at full strength, so k adapters push k times as hard and their features mix inside the
network. The "linear" merge averages in weight space, W0 + (1/n) Σ_i ΔW_i, still one blended
network. CLoRA keeps n separate networks W0 + ΔW_i and combines their *outputs*, per token,
with weights that sum to 1: with equal masks and no guidance it is exactly the average of the
adapters' logits (≈ the linear merge only to first order in ΔW, never the sum), and with
one-hot masks it is exactly adapter i alone. Cost: n rows per decode step, plus
`guidance_steps` extra forward/backward passes on the guided steps.

Deviations. The latent step is normalised: the reference takes z ← z − η ∇L, but a token
embedding is read through a norm layer (RMSNorm/LayerNorm), so the raw gradient scales like
1/‖e_t‖ (≈100 on the 0.11-norm embeddings of a tiny random Llama) and a raw η would be
model-specific; here η is the step length in units of ‖e_t‖ (default 0.02). Not reproduced:
per-LoRA prompts, classifier-free guidance and the mask morphology (erode/dilate) of the image
pipeline have no counterpart in text decoding; the masks come from the post-guidance forward
(the one whose cache is kept).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.adapter import check_finite_nonneg, check_nonneg_int, check_positive_int
from lorakit.core.inject import adapted_layers, route, state
from lorakit.errors import AdapterError, ConfigError

__all__ = ["CloraConfig", "CloraOutput", "embed_rows", "generate", "info_nce", "masks_from_scores",
           "resolve_concepts", "rows_forward"]

MASK_RULES = ("softmax", "threshold", "fixed")


@dataclass
class CloraConfig:
    """Decoding and guidance settings of `generate` (see the module docstring for the math).

    max_new_tokens: tokens to generate.
    guidance_steps: gradient steps on the latent δ per guided decode step (0 = no guidance).
    guided_tokens: how many decode steps (from the first) get guidance — the reference guides
        the first `max_iter_to_alter` denoising steps only.
    lr: step length η of δ ← δ − η ‖e_t‖ ∇L/‖∇L‖, a fraction of the input embedding's norm.
    temperature: InfoNCE temperature τ (reference: 0.5).
    mask: "softmax" | "threshold" | "fixed".
    mask_temperature: τ_m of the "softmax" rule, M_i ∝ s_i^{1/τ_m} (1 = proportional, → 0 = argmax).
    mask_threshold: α of the "threshold" rule (reference: 0.3).
    mask_weights: the n fixed mask weights of mask="fixed" (normalised to sum 1).
    layers: decoder layers whose attention forms the maps and masks (None = all).
    sample_temperature: 0 = greedy; > 0 samples from softmax(ℓ / sample_temperature).
    seed: seeds the sampling generator.
    stop_token_ids: stop after any of these (None: the tokenizer's eos token, if any).
    """

    max_new_tokens: int = 32
    guidance_steps: int = 1
    guided_tokens: int = 8
    lr: float = 0.02
    temperature: float = 0.5
    mask: str = "softmax"
    mask_temperature: float = 0.2
    mask_threshold: float = 0.3
    mask_weights: list[float] | None = None
    layers: list[int] | None = None
    sample_temperature: float = 0.0
    seed: int = 0
    stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_nonneg_int("guidance_steps", self.guidance_steps)
        check_nonneg_int("guided_tokens", self.guided_tokens)
        check_finite_nonneg("lr", self.lr)
        for name in ("temperature", "mask_temperature"):
            if check_finite_nonneg(name, getattr(self, name)) == 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        check_finite_nonneg("sample_temperature", self.sample_temperature)
        if self.mask not in MASK_RULES:
            raise ConfigError(f"mask must be one of {MASK_RULES}, got {self.mask!r}")
        if check_finite_nonneg("mask_threshold", self.mask_threshold) > 1:
            raise ConfigError(f"mask_threshold must be in [0, 1], got {self.mask_threshold!r}")
        if (self.mask == "fixed") != (self.mask_weights is not None):
            raise ConfigError(f"mask_weights are given exactly when mask='fixed'; got mask={self.mask!r}, "
                              f"mask_weights={self.mask_weights!r}")
        if self.mask_weights is not None:
            w = [check_finite_nonneg(f"mask_weights[{i}]", v) for i, v in enumerate(self.mask_weights)]
            if not w or sum(w) == 0:
                raise ConfigError(f"mask_weights must contain a positive weight, got {self.mask_weights!r}")
            self.mask_weights = w
        if self.layers is not None:
            self.layers = [check_nonneg_int(f"layers[{i}]", v) for i, v in enumerate(self.layers)]
            if not self.layers:
                raise ConfigError("layers must name at least one decoder layer (or be None for all)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.stop_token_ids is not None:
            self.stop_token_ids = [check_nonneg_int("stop_token_ids", t) for t in self.stop_token_ids]


@dataclass
class CloraOutput:
    """What `generate` returns; T = number of generated tokens, n = number of adapters.

    masks: (T, n) mask weights M_i(t) (rows sum to 1); scores: (T, n) attention masses s_i(t)
    (zeros when mask="fixed" and there is no guidance: no attention is computed then);
    logits: (T, V) fused logits ℓ(t); losses[t]: InfoNCE before each guidance update and after
    the last one (guidance_steps + 1 values) for guided steps, [] otherwise;
    concept_positions[i]: the prompt positions K_i of adapter i.
    """

    adapters: list[str]
    prompt_ids: list[int]
    tokens: list[int]
    masks: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor
    losses: list[list[float]]
    concept_positions: list[list[int]]
    text: str | None = None
    finish_reason: str = "length"


# -- pure math ------------------------------------------------------------------------------
def info_nce(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with every same-label pair as a positive (pytorch-metric-learning's NTXentLoss).

    embeddings: (N, D); labels: (N,). With s_ab = cos(e_a, e_b) / τ,
        L = mean_{(a,p): y_a = y_p, a ≠ p} −log( e^{s_ap} / (e^{s_ap} + Σ_{n: y_n ≠ y_a} e^{s_an}) )
          = mean softplus(logsumexp_n s_an − s_ap);   0 without positive pairs.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"embeddings must be (N, D) and labels (N,), got {tuple(embeddings.shape)} "
                         f"and {tuple(labels.shape)}")
    z = F.normalize(embeddings, dim=1)
    s = z @ z.T / temperature  # (N, N)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if not pos.any():
        return s.sum() * 0.0  # keeps the graph (and the dtype/device)
    neg_lse = torch.logsumexp(s.masked_fill(same, float("-inf")), dim=1)  # (N,); -inf: no negatives
    a, p = pos.nonzero(as_tuple=True)
    return F.softplus(neg_lse[a] - s[a, p]).mean()


def masks_from_scores(scores: torch.Tensor, rule: str, mask_temperature: float = 0.2, threshold: float = 0.3,
                      running_max: torch.Tensor | None = None, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Mask weights M (n,) from the adapters' attention masses `scores` (n,); they sum to 1.

    "softmax": softmax(log scores / mask_temperature), i.e. M_i ∝ s_i^{1/mask_temperature}.
    "threshold": m_i = 1[s_i > α · max_i], max_i = `running_max` (the largest s_i so far, this
    step included; default `scores`); none on → adapter 0; M = m / Σ m.
    "fixed": `weights` / Σ weights.
    """
    if rule == "softmax":
        return torch.softmax(scores.clamp_min(1e-12).log() / mask_temperature, dim=-1)
    if rule == "threshold":
        top = scores if running_max is None else torch.maximum(running_max, scores)
        m = (scores > threshold * top).to(scores.dtype)
        if m.sum() == 0:
            m[0] = 1.0  # unclaimed positions belong to the first adapter (the reference's background)
        return m / m.sum()
    if rule == "fixed":
        if weights is None or len(weights) != scores.shape[-1]:
            raise ConfigError(f"mask='fixed' needs {scores.shape[-1]} mask_weights, one per adapter, got "
                              f"{None if weights is None else len(weights)}")
        w = torch.as_tensor(weights, dtype=scores.dtype, device=scores.device)
        return w / w.sum()
    raise ConfigError(f"mask must be one of {MASK_RULES}, got {rule!r}")


# -- prompt and concepts --------------------------------------------------------------------
def resolve_concepts(concepts: Mapping[str, object], prompt_ids: Sequence[int], prompt_text: str | None = None,
                     offsets: Sequence[tuple[int, int]] | None = None) -> tuple[list[str], list[list[int]]]:
    """(adapter names, prompt positions K_i) from {adapter: spans}.

    A span is a substring of the prompt text (its first occurrence; every token whose character
    offsets overlap it) or a token range (start, end), end exclusive, 0 ≤ start < end ≤ len(prompt).
    A single span may be given without a list. The K_i must be non-empty and disjoint.
    """
    if not isinstance(concepts, Mapping):
        raise ConfigError(f"concepts must map adapter names to prompt spans, got {type(concepts).__name__}")
    if len(concepts) < 2:
        raise ConfigError(f"CLoRA composes at least 2 adapters; concepts names {list(concepts)}")
    n_prompt = len(prompt_ids)
    names, positions, owner = [], [], {}
    for name, spans in concepts.items():
        if isinstance(spans, (str, tuple)):
            spans = [spans]
        if not isinstance(spans, Sequence) or not spans:
            raise ConfigError(f"concepts[{name!r}] must be a non-empty list of spans, got {spans!r}")
        pos: list[int] = []
        for span in spans:
            if isinstance(span, str):
                if prompt_text is None or offsets is None:
                    raise ConfigError(f"concept {span!r} of adapter {name!r} is text: pass the prompt as text and "
                                      "a fast tokenizer (character offsets), or give (start, end) token ranges")
                c0 = prompt_text.find(span) if span else -1
                if c0 < 0:
                    raise ValueError(f"concept {span!r} of adapter {name!r} does not occur in the prompt {prompt_text!r}")
                c1 = c0 + len(span)
                hit = [k for k, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
                if not hit:
                    raise ValueError(f"concept {span!r} of adapter {name!r} covers no prompt token")
                pos += hit
            elif (isinstance(span, (tuple, list)) and len(span) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
                s, e = span
                if not 0 <= s < e <= n_prompt:
                    raise ValueError(f"concept span {tuple(span)} of adapter {name!r} lies outside the prompt: "
                                     f"need 0 <= start < end <= {n_prompt} (the prompt has {n_prompt} tokens)")
                pos += range(s, e)
            else:
                raise ConfigError(f"concept span {span!r} of adapter {name!r} must be a substring of the prompt "
                                  "or a (start, end) token range")
        pos = sorted(set(pos))
        for k in pos:
            if k in owner:
                raise ValueError(f"prompt position {k} belongs to the concepts of both {owner[k]!r} and {name!r}; "
                                 "each adapter needs its own tokens")
            owner[k] = name
        names.append(name)
        positions.append(pos)
    return names, positions


def _check_adapters(model: nn.Module, names: list[str]) -> None:
    known = state(model).configs
    for n in names:
        if n not in known:
            raise AdapterError(f"unknown adapter {n!r}; this model has {sorted(known) or 'no adapters'}")
    merged = sorted({n for layer in adapted_layers(model).values() for n in layer.merged})
    if merged:
        raise AdapterError(f"adapters {merged} are merged into the base weights; CLoRA runs each adapter on its "
                           "own rows, unmerge first (lorakit.unmerge)")


# -- the batched per-adapter forward --------------------------------------------------------
def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x


def rows_forward(model: nn.Module, names: Sequence[str], inputs_embeds: torch.Tensor, cache=None,
                 attentions: bool = False, use_cache: bool = True):
    """One forward of n rows, row i through adapter `names[i]` only (`lorakit.route`).

    inputs_embeds: (n, L, d), e.g. `embed_rows(...)` (+ δ). Returns the model output
    (logits (n, L, V), the cache, and with `attentions` one (n, H, L, L_past + L) tensor per
    layer; attentions need the eager attention implementation).
    """
    kw = {_cache_kwarg(model): cache} if cache is not None else {}
    with route(model, torch.arange(len(names)), list(names)):
        return model(inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=attentions, **kw)


def embed_rows(model: nn.Module, names: Sequence[str], ids: torch.Tensor) -> torch.Tensor:
    """(n, L, d) input embeddings of ids (n, L), row i through adapter i (an adapted embedding
    layer routes too)."""
    with route(model, torch.arange(len(names)), list(names)):
        return model.get_input_embeddings()(ids)


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _Maps:
    """Attention read-outs of one forward: concept embeddings v_{i,k} and masses s_i."""

    def __init__(self, positions: list[list[int]], layers: list[int] | None, device: torch.device):
        self.flat = torch.tensor([k for pos in positions for k in pos], device=device)  # (C,)
        self.owner = torch.tensor([i for i, pos in enumerate(positions) for _ in pos], device=device)  # (C,)
        self.layers = layers

    def _stack(self, attentions) -> torch.Tensor:
        if not attentions or any(a is None for a in attentions):
            raise ConfigError("the model returned no attention weights (output_attentions); CLoRA needs them for "
                              "its masks and guidance: use a model with eager attention, or mask='fixed' and "
                              "guidance_steps=0")
        layers = range(len(attentions)) if self.layers is None else self.layers
        # (Ls, n, H, C): current query position -> concept keys
        return torch.stack([attentions[l][:, :, -1, :].index_select(-1, self.flat) for l in layers])

    def embeddings(self, attentions) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._stack(attentions)
        ls, n, h, c = a.shape
        v = a.permute(1, 3, 0, 2).reshape(n * c, ls * h)  # rows: (adapter row i, concept token k)
        lo, hi = v.min(1, keepdim=True).values, v.max(1, keepdim=True).values
        v = (v - lo) / (hi - lo + 1e-6)  # min-max per map, as the reference
        return v, self.owner.repeat(n)

    def scores(self, attentions) -> torch.Tensor:
        a = self._stack(attentions).mean(dim=(0, 2))  # (n, C)
        own = self.owner[None, :] == torch.arange(a.shape[0], device=a.device)[:, None]  # K_i of row i
        return (a * own).sum(-1)  # (n,)


# -- generation -----------------------------------------------------------------------------
def generate(model: nn.Module, tokenizer, prompt: str | Sequence[int] | torch.Tensor,
             concepts: Mapping[str, object], config: CloraConfig | None = None, **overrides) -> CloraOutput:
    """Generate from `prompt` with the adapters named in `concepts`, composed by CLoRA.

    model: a causal LM with ≥2 lorakit adapters (unmerged); in eval mode for reproducible output.
    tokenizer: encodes a text prompt, resolves text concepts, decodes; may be None when the prompt
        is token ids and concepts are (start, end) token ranges.
    concepts: {adapter name: span or list of spans} (see `resolve_concepts`), in adapter order.
    config / overrides: a `CloraConfig`, or its fields as keyword arguments.
    """
    if config is None:
        config = CloraConfig(**overrides)
    elif overrides:
        raise ConfigError(f"pass either config or keyword overrides, not both (got {sorted(overrides)})")
    cfg = config
    prompt_text, offsets = None, None
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ConfigError("a text prompt needs a tokenizer")
        prompt_text = prompt
        try:
            enc = tokenizer(prompt, return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers: no offsets
            enc = tokenizer(prompt)
        prompt_ids = list(enc["input_ids"])
    else:
        prompt_ids = [int(t) for t in (prompt.tolist() if torch.is_tensor(prompt) else prompt)]
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    names, positions = resolve_concepts(concepts, prompt_ids, prompt_text, offsets)
    _check_adapters(model, names)
    n = len(names)
    if cfg.mask == "fixed" and len(cfg.mask_weights) != n:
        raise ConfigError(f"mask_weights has {len(cfg.mask_weights)} weights for {n} adapters {names}")
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if cfg.layers is not None and n_layers is not None and max(cfg.layers) >= n_layers:
        raise ConfigError(f"layers {cfg.layers} name a layer >= {n_layers}, the model's number of layers")
    stop = set(cfg.stop_token_ids) if cfg.stop_token_ids is not None else (
        {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set())

    device = next(model.parameters()).device
    guide = cfg.guidance_steps > 0 and cfg.guided_tokens > 0
    need_attn = guide or cfg.mask != "fixed"
    prev_impl = getattr(model.config, "_attn_implementation", None)
    if need_attn and prev_impl != "eager":
        model.set_attn_implementation("eager")  # attention weights are only returned by eager attention
    try:
        return _decode(model, tokenizer, names, positions, prompt_ids, cfg, stop, device, need_attn)
    finally:
        if need_attn and prev_impl != "eager":
            model.set_attn_implementation(prev_impl)


def _decode(model, tokenizer, names, positions, prompt_ids, cfg: CloraConfig, stop, device, need_attn) -> CloraOutput:
    n = len(names)
    maps = _Maps(positions, cfg.layers, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.tensor([prompt_ids] * n, device=device)  # (n, P): every row reads the same tokens
    cache = None
    tokens, masks, scores, logits, losses = [], [], [], [], []
    running_max = None
    finish = "length"
    for t in range(cfg.max_new_tokens):
        with torch.no_grad():
            e = embed_rows(model, names, x)  # (n, L, d)
        delta = torch.zeros(e.shape[-1], dtype=e.dtype, device=device)  # shared latent δ, reset each step
        scale = e[:, -1].norm(dim=-1).mean()  # ‖e_t‖: steps are measured in units of the embedding's norm
        step_losses: list[float] = []
        if cfg.guidance_steps > 0 and t < cfg.guided_tokens:
            for _ in range(cfg.guidance_steps):
                delta.requires_grad_(True)
                with torch.enable_grad():
                    out = rows_forward(model, names, _shift_last(e, delta), cache, attentions=True,
                                       use_cache=cache is not None)
                    try:
                        loss = info_nce(*maps.embeddings(out.attentions), cfg.temperature)
                        (grad,) = torch.autograd.grad(loss, [delta])
                    finally:
                        if cache is not None:
                            cache.crop(-x.shape[1])  # guidance forwards must not grow the kept cache
                step_losses.append(loss.item())
                delta = (delta - cfg.lr * scale * grad / grad.norm().clamp_min(1e-12)).detach()
        with torch.no_grad():
            out = rows_forward(model, names, _shift_last(e, delta), cache, attentions=need_attn)
            cache = _out_cache(out)
            if step_losses:  # the loss the kept forward ends with
                step_losses.append(info_nce(*maps.embeddings(out.attentions), cfg.temperature).item())
            s = maps.scores(out.attentions) if need_attn else torch.zeros(n, device=device)
            m = masks_from_scores(s, cfg.mask, cfg.mask_temperature, cfg.mask_threshold, running_max,
                                  cfg.mask_weights)
            running_max = s if running_max is None else torch.maximum(running_max, s)
            row_logits = out.logits[:, -1, :].float()  # (n, V)
            fused = m.to(row_logits.dtype) @ row_logits  # (V,): Σ_i M_i ℓ_i, Σ_i M_i = 1
        tok = _pick(fused, cfg.sample_temperature, generator)
        tokens.append(tok)
        masks.append(m.float().cpu())
        scores.append(s.float().cpu())
        logits.append(fused.cpu())
        losses.append(step_losses)
        if tok in stop:
            finish = "stop"
            break
        x = torch.full((n, 1), tok, device=device)
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    return CloraOutput(adapters=list(names), prompt_ids=list(prompt_ids), tokens=tokens, masks=torch.stack(masks),
                       scores=torch.stack(scores), logits=torch.stack(logits), losses=losses,
                       concept_positions=positions, text=text, finish_reason=finish)


def _shift_last(e: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """e (n, L, d) with δ added at the current (last) position of every row."""
    if e.shape[1] == 1:
        return e + delta
    return torch.cat([e[:, :-1], e[:, -1:] + delta], dim=1)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
