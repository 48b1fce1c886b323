"""Pick adapters from a library with K labelled examples and compose the chosen ones
(open-knowledge task expertise: Yang et al., arXiv:2408.15915; reference code
github.com/Yaphabates/Rocket, `Model_Selection/`).

A library is a folder of adapters for one base model (lorakit- or PEFT-written, any ranks,
any lorakit method with an exact `to_lora`). Given K examples (prompt, response) of the task
at hand, every adapter i is loaded on the base model in turn and measured:

    nll_i   = Σ_k Σ_{t ∈ response_k} −log p_i(y_t | y_<t) / Σ_k |response_k|   (prompt masked, + eos)
    ppl_i   = exp(nll_i),     gain_i = nll_base − nll_i   (nats per response token)
    acc_i   = (1/K) Σ_k [argmin_{l ∈ labels} NLL_i(l | prompt_k) = response_k]   (only with a label set)
    emb_i   = cos(ē_i, ē_K)   ē: the mean L2-normalised sentence embedding of the adapter's stored
              description / training samples, and of the K prompt+response texts (only where an
              adapter has such text; the base model's own mean last hidden state by default, or any
              encoder such as MiniLM-L6 — `lorakit.data.augment.HFEmbedder`)

The reference computes ppl on chain-of-thought responses ("reasoning perplexity") next to
K-shot accuracy, so that adapters that *solve* the K shots — right answers with a confident
rationale — rank above blind guessers that hit the label with no better likelihood. Here the
signals are standardised over the library (z(v) = (v − mean) / std, 0 when all are equal) and
added:

    score_i = w_acc · z(acc)_i + w_ppl · z(gain)_i + w_emb · z(emb)_i      (absent signals left out)

Diversity (the paper's second key): near-duplicate experts add nothing to a mixture. With
ΔW_i^(l) = s_i B_i A_i of module l, the similarity of two adapters is

    sim_ij = mean over the modules either adapts of |⟨ΔW_i, ΔW_j⟩_F| / (‖ΔW_i‖_F ‖ΔW_j‖_F)

(0 where only one adapts the module), computed from the factors — ⟨B_iA_i, B_jA_j⟩_F =
Σ (B_iᵀB_j) ⊙ (A_iA_jᵀ) — so ΔW is never formed and any ranks compare. The reference sums
|cos| over the factor tensors A, B separately, which depends on how BA is factorised and needs
equal ranks; the cosine of ΔW does not. The group of m = top_m adapters is then

    S* = argmax_{S ⊆ C, |S| = m}  mean_{i∈S} ŝ_i − λ · mean_{i<j ∈ S} sim_ij,
    ŝ_i = (score_i − min score) / (max score − min score) ∈ [0, 1]

over the `candidates` best-scored adapters C (all by default), exhaustively when there are at
most `max_combinations` groups, else greedily. λ = `diversity` (0: plain top-m by score). The
reference enumerates all groups of 4 and keeps the one with the least summed similarity among
pre-selected candidates; the score term here keeps the K-shot evidence in the same objective.

The chosen adapters become one adapter on the model:
    mix="merge": a LoRA ΔW = Σ_i w_i ΔW_i, exact (rank Σ r_i; `compose.merge.merge_adapters`,
                 "linear"), w uniform or softmax of the scores;
    mix="moe":   a MeteoRA mixture of the chosen LoRAs (frozen) with a per-token top-k gate
                 (`methods.meteora.from_adapters`); only the gates require grad, so any training
                 loop over the model trains them — the paper fine-tunes its MoE on the K shots plus
                 selected open data (`lorakit.data.less` / `augment` select such data);
    mix="none":  only the ranking.

    result = select_from_library(model, tokenizer, "loras/", kshot, LibraryConfig(top_m=2, mix="merge"))
    print(result.table())
    lorakit.save(model, "out/expert", name=result.mixture)
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.adapter import check_adapter_name, check_positive_int
from lorakit.core.inject import activate_adapters, adapted_layers, delete_adapter, state
from lorakit.errors import AdapterError, ConfigError, LorakitError

__all__ = [
    "AdapterScore",
    "LibraryConfig",
    "LibraryResult",
    "LibraryRunConfig",
    "choose_group",
    "combine_scores",
    "delta_similarity",
    "find_adapters",
    "run_library",
    "select_from_library",
]

MIXES = ("merge", "moe", "none")
LIBRARY_INDEX = "library.json"
_IGNORE = -100


@dataclass
class LibraryConfig:
    """top_m: adapters in the mixture; candidates: best-scored adapters the group is chosen
    from (None = all); diversity: λ of the similarity penalty (0 = top-m by score);
    w_accuracy / w_perplexity / w_embedding: weights of the standardised signals; labels: the
    label set for K-shot accuracy (each response must be one of them; None = no accuracy);
    mix: "merge" | "moe" | "none"; merge_weights: "uniform" | "score" (softmax of the chosen
    scores); moe_top_k: gate top-k of the MoE; embedder: "model" (the base model's mean last
    hidden state), "none", or a sentence-encoder alias / local dir (e.g. "minilm-l6");
    batch_size / max_length: K-shot forward passes; on_error: "raise" on an adapter that does
    not fit the model, or "skip" it (reported in the result); max_combinations: above this
    many groups the search is greedy."""

    top_m: int = 2
    candidates: int | None = None
    diversity: float = 1.0
    w_accuracy: float = 1.0
    w_perplexity: float = 1.0
    w_embedding: float = 0.5
    labels: list[str] | None = None
    mix: str = "merge"
    merge_weights: str = "uniform"
    moe_top_k: int = 2
    embedder: str = "model"
    batch_size: int = 8
    max_length: int = 512
    on_error: str = "raise"
    max_combinations: int = 20000

    def __post_init__(self) -> None:
        check_positive_int("top_m", self.top_m)
        if self.candidates is not None:
            check_positive_int("candidates", self.candidates)
            if self.candidates < self.top_m:
                raise ConfigError(f"candidates={self.candidates} is smaller than top_m={self.top_m}")
        for k in ("diversity", "w_accuracy", "w_perplexity", "w_embedding"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{k} must be a finite number >= 0, got {v!r}")
        if self.labels is not None:
            if isinstance(self.labels, str) or not isinstance(self.labels, (list, tuple)) or len(self.labels) < 2 \
                    or not all(isinstance(x, str) and x.strip() for x in self.labels):
                raise ConfigError(f"labels must be a list of at least two non-empty strings, got {self.labels!r}")
            if len({x.strip() for x in self.labels}) != len(self.labels):
                raise ConfigError(f"labels must be distinct, got {self.labels!r}")
            self.labels = list(self.labels)
        if self.mix not in MIXES:
            raise ConfigError(f"mix must be one of {MIXES}, got {self.mix!r}")
        if self.merge_weights not in ("uniform", "score"):
            raise ConfigError(f"merge_weights must be 'uniform' or 'score', got {self.merge_weights!r}")
        check_positive_int("moe_top_k", self.moe_top_k)
        if not isinstance(self.embedder, str) or not self.embedder:
            raise ConfigError(f"embedder must be 'model', 'none' or a model alias / directory, got {self.embedder!r}")
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_length", self.max_length)
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        check_positive_int("max_combinations", self.max_combinations)


@dataclass
class LibraryRunConfig(LibraryConfig):
    """`LibraryConfig` plus files, for `run_library` (the CLI): library: folder of adapters;
    kshot: .jsonl of K records ({"prompt", "response"}, Alpaca or chat records, see
    `lorakit.data.less.encode_examples`); model: base model alias / dir (default: the base
    recorded by the first adapter that records one); output: directory for `adapter/` (the mixture) and
    `selection.json`; name: the mixture's adapter name."""

    library: str = ""
    kshot: str = ""
    model: str | None = None
    output: str = "runs/library"
    name: str = "library"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.library or not Path(self.library).is_dir():
            raise ConfigError(f"library must name a folder of adapters, got {self.library!r}")
        if not self.kshot or not Path(self.kshot).is_file():
            raise ConfigError(f"kshot must name a .jsonl file of K examples, got {self.kshot!r}")
        check_adapter_name(self.name)


# -- results ----------------------------------------------------------------------------------
@dataclass
class AdapterScore:
    """What was measured for one library adapter (error set: it was skipped)."""

    name: str
    path: str
    method: str = ""
    rank: int = 0
    nll: float = math.nan
    ppl: float = math.nan
    gain: float = math.nan
    accuracy: float | None = None
    embedding_sim: float | None = None
    score: float = math.nan
    selected: bool = False
    error: str | None = None


@dataclass
class LibraryResult:
    """Scores (best first, skipped adapters last), the pairwise ΔW similarities, the chosen
    group and the name of the mixture adapter on the model (None with mix="none")."""

    base: dict[str, float | None]
    adapters: list[AdapterScore]
    similarity: dict[str, dict[str, float]]
    chosen: list[str]
    objective: float
    mixture: str | None = None
    mix: str = "none"

    def table(self) -> str:
        """A plain-text table of the scores."""
        head = f"{'adapter':24s} {'method':10s} {'rank':>4s} {'ppl':>9s} {'gain':>7s} {'acc':>5s} {'emb':>6s} " \
               f"{'score':>7s}  chosen"
        rows = [head, "-" * len(head)]
        b = self.base
        rows.append(f"{'(base model)':24s} {'':10s} {'':>4s} {b['ppl']:9.3f} {0.0:7.3f} "
                    f"{_fmt(b.get('accuracy'), 5, 2)} {'':>6s} {'':>7s}")
        for a in self.adapters:
            if a.error:
                rows.append(f"{a.name[:24]:24s} skipped: {a.error}")
                continue
            rows.append(f"{a.name[:24]:24s} {a.method[:10]:10s} {a.rank:4d} {a.ppl:9.3f} {a.gain:7.3f} "
                        f"{_fmt(a.accuracy, 5, 2)} {_fmt(a.embedding_sim, 6, 3)} {a.score:7.3f}  "
                        f"{'*' if a.selected else ''}")
        rows.append(f"chosen: {', '.join(self.chosen)} (objective {self.objective:.3f})"
                    + (f"; mixture adapter {self.mixture!r} ({self.mix})" if self.mixture else ""))
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "adapters": [asdict(a) for a in self.adapters], "similarity": self.similarity,
                "chosen": self.chosen, "objective": self.objective, "mixture": self.mixture, "mix": self.mix}


def _fmt(v: float | None, width: int, digits: int) -> str:
    return f"{v:{width}.{digits}f}" if v is not None else " " * (width - 1) + "-"


# -- pure math ----------------------------------------------------------------------------------
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, d_in), s·B (d_out, r))


def delta_similarity(f1: Factors, f2: Factors) -> float:
    """mean over the union of modules of |cos(ΔW_1, ΔW_2)| (0 where only one adapts a module),
    from low-rank factors without forming ΔW."""
    paths = sorted(set(f1) | set(f2))
    if not paths:
        raise ConfigError("delta_similarity got two empty adapters")
    total = 0.0
    for p in paths:
        if p not in f1 or p not in f2:
            continue
        (a1, b1), (a2, b2) = f1[p], f2[p]
        a1, b1, a2, b2 = (t.double() for t in (a1, b1, a2, b2))
        inner = ((b1.T @ b2) * (a1 @ a2.T)).sum()
        n1 = ((b1.T @ b1) * (a1 @ a1.T)).sum().clamp_min(0).sqrt()
        n2 = ((b2.T @ b2) * (a2 @ a2.T)).sum().clamp_min(0).sqrt()
        if n1 > 0 and n2 > 0:
            total += float((inner / (n1 * n2)).abs().clamp(max=1.0))
    return total / len(paths)


def _zscore(values: Sequence[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    std = t.std(unbiased=False) if len(values) > 1 else torch.tensor(0.0, dtype=torch.float64)
    if not torch.isfinite(std) or std < 1e-12:
        return [0.0] * len(values)
    return ((t - t.mean()) / std).tolist()


def combine_scores(gain: Sequence[float], accuracy: Sequence[float | None] | None = None,
                   embedding: Sequence[float | None] | None = None, w_accuracy: float = 1.0,
                   w_perplexity: float = 1.0, w_embedding: float = 0.5) -> list[float]:
    """score_i = w_acc·z(acc)_i + w_ppl·z(gain)_i + w_emb·z(emb)_i over the library.

    An adapter without embedding text gets z(emb) = 0 (the library's mean); accuracy is all or
    nothing (it needs the label set)."""
    n = len(gain)
    score = [w_perplexity * z for z in _zscore(gain)]
    if accuracy is not None and any(a is not None for a in accuracy):
        if any(a is None for a in accuracy) or len(accuracy) != n:
            raise ConfigError("accuracy must be given for every adapter or for none")
        score = [s + w_accuracy * z for s, z in zip(score, _zscore(accuracy))]
    if embedding is not None and any(e is not None for e in embedding):
        have = [i for i, e in enumerate(embedding) if e is not None]
        z = _zscore([embedding[i] for i in have])
        for i, zi in zip(have, z):
            score[i] += w_embedding * zi
    return score


def choose_group(scores: Sequence[float], similarity: torch.Tensor, m: int, diversity: float = 1.0,
                 candidates: int | None = None, max_combinations: int = 20000) -> tuple[list[int], float]:
    """(indices of the chosen group, best first; its objective) maximising

        mean_{i∈S} ŝ_i − diversity · mean_{i<j∈S} sim_ij,   ŝ = (score − min) / (max − min) ∈ [0, 1]

    over groups S of size m drawn from the `candidates` best-scored entries. ŝ spans [0, 1] like
    the similarities, so at diversity = 1 a duplicate (sim ≈ 1) costs as much as the gap between
    the best and the worst adapter of the library."""
    n = len(scores)
    if m > n:
        raise ConfigError(f"cannot choose {m} adapters from {n}")
    order = sorted(range(n), key=lambda i: -scores[i])
    pool = order[: (n if candidates is None else max(m, min(candidates, n)))]

    lo, hi = min(scores), max(scores)
    unit = [(s - lo) / (hi - lo) if hi > lo else 1.0 for s in scores]  # score range -> [0, 1], as sim

    def objective(group: Sequence[int]) -> float:
        mean_score = sum(unit[i] for i in group) / len(group)
        pairs = list(itertools.combinations(group, 2))
        penalty = sum(float(similarity[i, j]) for i, j in pairs) / len(pairs) if pairs else 0.0
        return mean_score - diversity * penalty

    if math.comb(len(pool), m) <= max_combinations:
        best = max(itertools.combinations(pool, m), key=objective)  # pool is best-first: ties keep the better scores
    else:  # greedy: the best adapter, then the one that raises the objective most
        best = [pool[0]]
        while len(best) < m:
            best.append(max((i for i in pool if i not in best), key=lambda i: objective(best + [i])))
    group = sorted(best, key=lambda i: -scores[i])
    return group, objective(group)


# -- the library --------------------------------------------------------------------------------
def find_adapters(library) -> dict[str, Path]:
    """Adapter name -> directory: a folder's subdirectories that hold an adapter_config.json, a
    list of directories, or a {name: directory} mapping."""
    from lorakit.core.io import CONFIG_NAME

    if isinstance(library, (str, os.PathLike)):
        root = Path(library)
        if not root.is_dir():
            raise ConfigError(f"adapter library {root} is not a directory")
        found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / CONFIG_NAME).is_file()}
        if not found:
            raise ConfigError(f"no adapters found in {root}: expected subdirectories holding {CONFIG_NAME}")
        return found
    if isinstance(library, Mapping):
        found = {str(k): Path(v) for k, v in library.items()}
    elif isinstance(library, Sequence):
        found = {}
        for p in map(Path, library):
            if p.name in found:
                raise ConfigError(f"two library adapters are both named {p.name!r}; pass a {{name: path}} mapping")
            found[p.name] = p
    else:
        raise ConfigError(f"library must be a folder, a list of adapter folders or a mapping, "
                          f"got {type(library).__name__}")
    if not found:
        raise ConfigError("the adapter library is empty")
    return found


def _library_texts(library, names: Sequence[str], descriptions: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Adapter name -> its description / training samples: `library.json` in a library folder
    ({name: "text"} or {name: {"description": "...", "samples": [...]}}), then `descriptions`."""
    raw: dict[str, Any] = {}
    if isinstance(library, (str, os.PathLike)) and (Path(library) / LIBRARY_INDEX).is_file():
        index = Path(library) / LIBRARY_INDEX
        try:
            raw.update(json.loads(index.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"{index}: expected a JSON object {{adapter name: description}}: {e}") from None
    raw.update(descriptions or {})
    out: dict[str, list[str]] = {}
    for name, v in raw.items():
        if name not in names:
            raise ConfigError(f"a description is given for {name!r}, which is not in the library {sorted(names)}")
        if isinstance(v, str):
            texts = [v]
        elif isinstance(v, Mapping):
            texts = ([v["description"]] if "description" in v else []) + list(v.get("samples", []))
        elif isinstance(v, (list, tuple)):
            texts = list(v)
        else:
            texts = None
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"description of {name!r} must be text, a list of texts or "
                              f"{{'description': text, 'samples': [texts]}}, got {v!r}")
        out[name] = texts
    return out


# -- K-shot measurements ------------------------------------------------------------------------
def _encode(tokenizer, items: Sequence[Any], max_length: int):
    from lorakit.data.less import encode_examples

    enc = encode_examples(tokenizer, items, max_length)
    for i, e in enumerate(enc):
        if int((e["labels"][1:] != _IGNORE).sum()) == 0:
            raise ConfigError(f"K-shot example {i} has no response token to score (empty response, or the "
                              f"prompt fills max_length={max_length})")
    return enc


def _measure(model, gold, choices, answer, batch_size) -> dict[str, float | None]:
    from lorakit.data.less import response_nll

    sums, counts = response_nll(model, gold, batch_size)
    nll = float(sums.sum() / counts.sum())
    out = {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "accuracy": None}
    if choices is not None:
        k, n_labels = len(answer), len(choices) // len(answer)
        csum, _ = response_nll(model, choices, batch_size)
        pred = csum.view(k, n_labels).argmin(1)  # the label with the highest log-likelihood
        out["accuracy"] = float((pred == torch.tensor(answer)).double().mean())
    return out


def _embed(cfg: LibraryConfig, model, tokenizer, texts: list[str], embedder) -> torch.Tensor:
    from lorakit.data.augment import HFEmbedder

    if callable(embedder):
        return embedder(texts)
    if cfg.embedder != "model":
        return HFEmbedder.from_pretrained(cfg.embedder)(texts)
    pad = tokenizer.pad_token
    if pad is None:  # batching needs a pad token; masked out of the mean anyway
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token; give an embedder "
                              "(e.g. embedder='minilm-l6') to compare adapter descriptions")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return HFEmbedder(model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)(texts)
    finally:
        if pad is None:
            tokenizer.pad_token = None


def _factors(model: nn.Module, name: str) -> tuple[Factors, int]:
    """The adapter's exact LoRA factors (scale folded into B, on CPU) and its largest rank."""
    out: Factors = {}
    for path, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        with torch.no_grad():
            a, b, s = adapter.to_lora()
        out[path] = (a.detach().float().cpu(), (b.detach() * s).float().cpu())
    return out, max((a.shape[0] for a, _ in out.values()), default=0)


def select_from_library(model: nn.Module, tokenizer, library, kshot: Sequence[Any],
                        config: LibraryConfig | None = None, *, name: str = "library",
                        descriptions: Mapping[str, Any] | None = None,
                        embedder: Callable[[list[str]], torch.Tensor] | None = None,
                        progress: bool = False) -> LibraryResult:
    """Rank the adapters of `library` on the K examples `kshot`, choose a diverse group of
    `top_m` and (unless mix="none") attach their mixture to `model` as adapter `name`, the only
    active one afterwards. See the module docstring for the equations.

    Args:
        library: a folder of adapter directories (optionally with `library.json` descriptions),
            a list of adapter directories, or a {name: directory} mapping.
        kshot: K ≥ 1 records: {"prompt", "response"} (or the other forms of
            `lorakit.data.less.encode_examples`).
        descriptions: {adapter name: text | [texts] | {"description", "samples"}}, added to
            `library.json`; compared with the K shots by embedding similarity.
        embedder: a callable texts -> (n, d) L2-normalised embeddings, overriding config.embedder.

    Every adapter is loaded, measured and removed again; the model's other adapters and active
    set are left as they were (except for the new mixture). Errors name the adapter.
    """
    from lorakit.core.io import load, read_config
    from lorakit.data.less import prompt_response

    cfg = config or LibraryConfig()
    if not isinstance(cfg, LibraryConfig):
        raise ConfigError(f"config must be a LibraryConfig, got {type(cfg).__name__}")
    kshot = list(kshot) if kshot is not None else []
    if not kshot:
        raise ConfigError("need at least one K-shot example (K = 0): pass a list of {'prompt', 'response'} records")
    if cfg.mix != "none":
        check_adapter_name(name)
        if name in state(model).configs:
            raise AdapterError(f"adapter {name!r} already exists on this model; pick another name for the mixture")
    gold = _encode(tokenizer, kshot, cfg.max_length)
    choices, answer = None, None
    if cfg.labels is not None:
        labels = [x.strip() for x in cfg.labels]
        pairs = [prompt_response(item, tokenizer, where=f"K-shot example {i}") for i, item in enumerate(kshot)]
        answer = []
        for i, (_, resp) in enumerate(pairs):
            if resp.strip() not in labels:
                raise ConfigError(f"K-shot example {i}: response {resp.strip()!r} is not in the label set {labels}")
            answer.append(labels.index(resp.strip()))
        # the response may start with a space the label lacks: keep the example's own spelling
        choices = _encode(tokenizer, [(p, r.replace(r.strip(), lab)) for p, r in pairs for lab in cfg.labels],
                          cfg.max_length)
    paths = find_adapters(library)
    if cfg.top_m > len(paths):
        raise ConfigError(f"top_m={cfg.top_m} but the library holds only {len(paths)} adapters")
    texts = _library_texts(library, list(paths), descriptions)

    st = state(model)
    was_training, active = model.training, list(st.active)
    model.eval()
    scores: list[AdapterScore] = []
    factors: dict[str, Factors] = {}
    try:
        activate_adapters(model, [])
        base = _measure(model, gold, choices, answer, cfg.batch_size)
        sims: dict[str, float] = {}
        if texts and (embedder is not None or cfg.embedder != "none"):
            from lorakit.data.augment import example_text

            k_texts = [example_text(dict(zip(("prompt", "response"), prompt_response(it, tokenizer))))
                       for it in kshot]
            names = list(texts)
            flat = [t for n in names for t in texts[n]]
            emb = _embed(cfg, model, tokenizer, k_texts + flat, embedder).float()
            k_mean = torch.nn.functional.normalize(emb[: len(k_texts)].mean(0), dim=0)
            at = len(k_texts)
            for n in names:
                e = torch.nn.functional.normalize(emb[at:at + len(texts[n])].mean(0), dim=0)
                sims[n] = float(e @ k_mean)
                at += len(texts[n])
        items = list(paths.items())
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="library", unit="adapter")
        tmp = "_library_probe"
        while tmp in st.configs:
            tmp += "_"
        for aname, path in items:
            rec = AdapterScore(name=aname, path=str(path), embedding_sim=sims.get(aname))
            try:
                acfg, _ = read_config(path)
                rec.method = acfg.method
                load(model, path, name=tmp, activate=False, trainable=False)
            except LorakitError as e:
                if cfg.on_error == "raise":
                    raise type(e)(f"library adapter {aname!r} ({path}): {e}") from None
                rec.error = str(e)
                scores.append(rec)
                continue
            try:
                if any(not hasattr(layer.adapters[tmp], "to_lora") for layer in adapted_layers(model).values()
                       if tmp in layer.adapters):
                    msg = (f"library adapter {aname!r} ({path}): method {acfg.method!r} has no exact LoRA form "
                           "(to_lora), so it can be neither compared nor mixed")
                    if cfg.on_error == "raise":
                        raise ConfigError(msg)
                    rec.error = msg
                    scores.append(rec)
                    continue
                activate_adapters(model, [tmp])
                m = _measure(model, gold, choices, answer, cfg.batch_size)
                rec.nll, rec.ppl, rec.accuracy = m["nll"], m["ppl"], m["accuracy"]
                rec.gain = base["nll"] - m["nll"]
                factors[aname], rec.rank = _factors(model, tmp)
            finally:
                delete_adapter(model, tmp)
            scores.append(rec)
    finally:
        activate_adapters(model, [n for n in active if n in st.configs])
        model.train(was_training)

    ok = [s for s in scores if s.error is None]
    if len(ok) < cfg.top_m:
        raise ConfigError(f"only {len(ok)} library adapters fit this model, fewer than top_m={cfg.top_m}: "
                          + "; ".join(f"{s.name}: {s.error}" for s in scores if s.error))
    combined = combine_scores([s.gain for s in ok], [s.accuracy for s in ok] if cfg.labels else None,
                              [s.embedding_sim for s in ok], cfg.w_accuracy, cfg.w_perplexity, cfg.w_embedding)
    for s, v in zip(ok, combined):
        s.score = v
    n = len(ok)
    sim = torch.eye(n, dtype=torch.float64)
    for i, j in itertools.combinations(range(n), 2):
        sim[i, j] = sim[j, i] = delta_similarity(factors[ok[i].name], factors[ok[j].name])
    group, objective = choose_group(combined, sim, cfg.top_m, cfg.diversity, cfg.candidates, cfg.max_combinations)
    chosen = [ok[i].name for i in group]
    for i in group:
        ok[i].selected = True
    result = LibraryResult(
        base={"nll": base["nll"], "ppl": base["ppl"], "accuracy": base["accuracy"]},
        adapters=sorted(ok, key=lambda s: -s.score) + [s for s in scores if s.error is not None],
        similarity={ok[i].name: {ok[j].name: float(sim[i, j]) for j in range(n)} for i in range(n)},
        chosen=chosen, objective=objective, mix=cfg.mix)
    if cfg.mix != "none":
        _build_mixture(model, cfg, name, [paths[c] for c in chosen], [factors[c] for c in chosen],
                       [ok[i].score for i in group])
        result.mixture = name
    return result


def _build_mixture(model: nn.Module, cfg: LibraryConfig, name: str, paths: list[Path], factors: list[Factors],
                   scores: list[float]) -> None:
    if cfg.mix == "merge":
        from lorakit.compose.merge import merge_adapters

        if cfg.merge_weights == "score":
            weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
        else:
            weights = [1.0] * len(paths)
        merge_adapters(model, paths, weights, method="linear", out_name=name, activate=False)
    else:
        from lorakit.methods.meteora import from_adapters

        from_adapters(model, factors, name=name, top_k=min(cfg.moe_top_k, len(factors)))
    activate_adapters(model, [name])


def run_library(cfg: LibraryRunConfig) -> LibraryResult:
    """The CLI path: load the base model and the K shots, select, write `output/adapter`
    (the mixture, unless mix="none") and `output/selection.json`."""
    import lorakit
    from lorakit.core.io import read_config
    from lorakit.data.less import read_records
    from lorakit.models import load_model

    if not isinstance(cfg, LibraryRunConfig):
        raise ConfigError(f"run_library needs a LibraryRunConfig, got {type(cfg).__name__}")
    paths = find_adapters(cfg.library)
    kshot = read_records(cfg.kshot)
    base = cfg.model or next((b for p in paths.values() if (b := read_config(p)[1].get("base_model"))), None)
    if not base:
        raise ConfigError(f"no model given and no adapter in {cfg.library} records its base model; pass --model")
    model, tokenizer = load_model(base)
    result = select_from_library(model, tokenizer, cfg.library, kshot, cfg, name=cfg.name, progress=True)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if result.mixture:
        lorakit.save(model, out / "adapter", name=result.mixture, base_model=base)
    tmp = out / ".selection.json.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n")
    os.replace(tmp, out / "selection.json")
    return result
