"""Data augmentation for low-resource domains: RADA generation, AMD²G de-domaining, and the
dedup/filter pass that generated data needs.

RADA — Retrieval-Augmented Data Augmentation (Seo et al., arXiv:2402.13482)
---------------------------------------------------------------------------
A handful of seed examples is too few for an LLM to generate diverse new ones. RADA retrieves
related examples from *other* datasets and shows them to the LLM next to the seeds:

1. Embed the seeds D = {s_i} and a pool C of other datasets' examples with a sentence encoder
   (mean pooling over the last hidden states, L2-normalised; MiniLM-L6 by default):
   e(x) = mean_t h_t(x) / ‖mean_t h_t(x)‖.
2. Retrieve, per seed, the pool examples with the largest cosine similarity ⟨e(s_i), e(c)⟩
   from a vector index (FAISS ``IndexFlatIP``, exact; or an exact torch matmul).
3. Prompt a local causal LM with the retrieved examples (cross-dataset context), a few other
   seeds and the anchor seed (target-task context), asking for ONE new example in the same
   "Field: value" format; the response is pre-filled with the first field's label so the model
   starts in format. With ``per_seed = m`` prompts per seed, prompt j shows retrieved
   neighbours ranked j·k .. (j+1)·k − 1 and a different seeded choice of other seeds, so greedy
   decoding still yields m different prompts.
4. Parse each response back into a record (all fields present and non-empty, and — by
   default — the example finished before the token limit; else dropped), then
   ``filter_generated``: length, charset and hook checks, drop copies of a seed or
   retrieved example, exact and near-duplicate removal.

AMD²G de-domaining (Liu et al., arXiv:2406.09881)
-------------------------------------------------
Domain corpora mix domain-agnostic expression patterns with domain-specific terms. Stage 1
trains on every domain's corpus with its domain terms replaced by a placeholder (so the model
learns the shared patterns), stage 2 adapts on the original target-domain data. The paper builds
its domain dictionaries with LLM keyword extraction and lexicons; here the dictionary is
statistical — the weighted log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi
& Quinn 2008) of a word in the domain vs. a background (the other domains, plus an optional
general corpus) — optionally merged with a user lexicon. For word w with counts y_w^D, y_w^B,
totals n^D, n^B, and prior α_w = a0 · (y_w^D + y_w^B) / (n^D + n^B):

    δ_w = log[(y_w^D + α_w) / (n^D + a0 − y_w^D − α_w)] − log[(y_w^B + α_w) / (n^B + a0 − y_w^B − α_w)]
    z_w = δ_w / sqrt(1 / (y_w^D + α_w) + 1 / (y_w^B + α_w))

and w is a domain term when z_w > z_threshold and y_w^D ≥ min_count. Words common to all
domains ("the", "please") get z ≈ 0 and are kept.

Dedup and filters
-----------------
Texts are normalised (NFKC, lower case, whitespace collapsed) and cut into character n-gram
shingles (n = 5: works for any script and tokenizer). Exact duplicates share a normalised
text; near duplicates have shingle Jaccard J(A, B) = |A ∩ B| / |A ∪ B| ≥ threshold. Candidate
pairs come from MinHash LSH (``datasketch``) when installed, else from comparing all pairs;
every candidate is then checked with the exact Jaccard, so LSH can only miss pairs (rarely,
near the threshold), never invent them. The first occurrence is kept.

Optional packages: ``faiss-cpu`` (vector index) and ``datasketch`` (MinHash LSH). ``backend=
"auto"`` uses them when importable and the exact torch / all-pairs search otherwise; both give
the same neighbours (exact search), so results do not depend on what is installed, up to LSH's
rare misses.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lorakit.data.text import read_jsonl, read_utf8
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Record = dict[str, str]

# =========================================================================== records


def as_records(examples: Iterable[str | Mapping[str, Any]], where: str = "examples") -> list[Record]:
    """Examples as flat string records: a plain string becomes ``{"text": s}``.

    Raises:
        ConfigError: a record that is not a mapping of strings, or records with different keys.
    """
    records: list[Record] = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            records.append({"text": ex})
        elif isinstance(ex, Mapping):
            bad = [k for k, v in ex.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise ConfigError(f"{where}[{i}]: fields must be strings; {bad} are not (nested records "
                                  "such as 'messages' are not supported for augmentation)")
            if not ex:
                raise ConfigError(f"{where}[{i}]: empty record")
            records.append(dict(ex))
        else:
            raise ConfigError(f"{where}[{i}]: expected a string or a record, got {type(ex).__name__}")
    return records


def record_fields(records: Sequence[Record], where: str = "seeds") -> tuple[str, ...]:
    """The fields shared by all records, in the first record's order."""
    if not records:
        raise ConfigError(f"{where}: need at least one example")
    fields = tuple(records[0])
    for i, r in enumerate(records):
        if set(r) != set(fields):
            raise ConfigError(f"{where}[{i}] has fields {sorted(r)}, but {where}[0] has {sorted(fields)}")
    return fields


def field_label(name: str) -> str:
    """How a field is written in prompts: ``"input_text"`` -> ``"Input text"``."""
    return name.replace("_", " ").strip().capitalize()


def render_example(record: Mapping[str, str], fields: Sequence[str] | None = None) -> str:
    """``Label: value`` lines, one per field, in ``fields`` order."""
    fields = list(fields or record)
    return "\n".join(f"{field_label(f)}: {record[f].strip()}" for f in fields)


def example_text(record: Mapping[str, str]) -> str:
    """The record's values joined by newlines: what embeddings, filters and dedup look at."""
    return "\n".join(v.strip() for v in record.values())


_END = re.compile(r"\n\s*\n|\n\s*###")  # a blank line or a "###" header ends a value
_END_LINE = re.compile(r"\n")


def parse_example(text: str, fields: Sequence[str], require_end: bool = False,
                  single_line: bool = False) -> Record | None:
    """Parse one generated example in ``Label: value`` format back into a record.

    A label counts at the start of a line or after whitespace (small models often write
    ``Question: ... Answer: ...`` on one line), optionally in markdown (``**Answer**:``); text
    before the first label is ignored. A value runs to the next label, a blank line or a
    ``###`` header. The example ends at a repeated label (a second example starts) or at a
    blank line / header after the last field. Returns None unless every field is present and
    non-empty, or — with ``require_end`` — when the text stops inside the example (a response
    cut off by the token limit; ``HFGenerator`` ends a finished response with a blank line).
    With ``single_line`` every value ends at its line's end (what the RADA prompt asks for
    records with several fields), so trailing chatter after the last field is ignored.
    """
    end_of_value = _END_LINE if single_line else _END
    labels = {field_label(f).lower(): f for f in fields}
    alternatives = "|".join(re.escape(field_label(f)) for f in sorted(fields, key=len, reverse=True))
    pattern = re.compile(r"(?:^|(?<=\s))[#>*_\-]*(" + alternatives + r")[*_]*\s*:", re.IGNORECASE | re.MULTILINE)
    matches = list(pattern.finditer(text))
    values: dict[str, str] = {}
    ended = False
    for i, m in enumerate(matches):
        name = labels[m.group(1).lower()]
        if name in values:
            ended = True
            break
        stop = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        chunk = text[m.end():stop]
        cut = end_of_value.search(chunk)
        values[name] = (chunk[: cut.start()] if cut else chunk).strip()
        if len(values) == len(fields):
            ended = cut is not None or i + 1 < len(matches)
            if ended:
                break
    if len(values) != len(fields) or not all(values.values()) or (require_end and not ended):
        return None
    return {f: values[f] for f in fields}


# =========================================================================== embeddings + index


class Embedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:  # (n, d), rows L2-normalised
        ...


class HFEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from any Hugging Face encoder.

    Args:
        model: an encoder (``AutoModel``; a model with a task head works too: its last hidden
            states are used).
        tokenizer: its tokenizer.
        batch_size / max_length: batching and truncation.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 32, max_length: int = 256):
        self.model, self.tokenizer = model.eval(), tokenizer
        # never longer than the encoder's absolute position table
        limits = [max_length, getattr(model.config, "max_position_embeddings", None),
                  getattr(tokenizer, "model_max_length", None)]
        self.batch_size, self.max_length = batch_size, min(int(x) for x in limits if x)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "minilm-l6", **kw: Any) -> HFEmbedder:
        """Load an alias (default MiniLM-L6) or local directory with ``lorakit.models.load_model``."""
        from lorakit.models import load_model

        model, tokenizer = load_model(name_or_path, task="base")
        return cls(model, tokenizer, **kw)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            out = self.model(**enc, output_hidden_states=True)
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                hidden = out.hidden_states[-1]                                   # (b, t, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)          # (b, t, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)         # (b, d)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        if not chunks:
            return torch.empty(0, 0)
        return torch.cat(chunks)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class VectorIndex:
    """Exact maximum-inner-product search (cosine on normalised vectors).

    Args:
        vectors: (n, d) float tensor.
        backend: ``"faiss"`` (``IndexFlatIP``), ``"torch"`` (matmul + topk) or ``"auto"`` (faiss
            when installed). Both are exact and return the same neighbours.
    """

    def __init__(self, vectors: torch.Tensor, backend: str = "auto"):
        if backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"index backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ConfigError(f"the index needs a non-empty (n, d) matrix, got shape {tuple(vectors.shape)}")
        if backend == "faiss" and not faiss_available():
            raise ConfigError("backend='faiss' needs the faiss-cpu package: pip install faiss-cpu")
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and faiss_available()) else "torch"
        self.vectors = vectors.detach().float().cpu().contiguous()
        if self.backend == "faiss":
            import faiss

            self._index = faiss.IndexFlatIP(self.vectors.shape[1])
            self._index.add(self.vectors.numpy())

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, ids)``, both (q, min(k, n)), best first."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        q = queries.detach().float().cpu().contiguous()
        if q.ndim != 2 or q.shape[1] != self.vectors.shape[1]:
            raise ConfigError(f"queries must be (q, {self.vectors.shape[1]}), got {tuple(q.shape)}")
        if self.backend == "faiss":
            scores, ids = self._index.search(q.numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(ids).long()
        scores, ids = torch.topk(q @ self.vectors.T, k, dim=1)                  # (q, k)
        return scores, ids


def retrieve(
    seeds: Sequence[str], pool: Sequence[str], embedder: Embedder, k: int = 4, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` pool texts per seed text by embedding cosine similarity: ``(scores, ids)``."""
    if not pool:
        raise ConfigError("the retrieval pool is empty")
    index = VectorIndex(embedder(list(pool)), backend)
    return index.search(embedder(list(seeds)), k)


# =========================================================================== generation


class Generator(Protocol):
    def __call__(self, prompts: Sequence[str], response_prefix: str = "") -> list[str]:
        """One continuation per prompt (text after ``response_prefix``)."""
        ...


class HFGenerator:
    """Batched generation with a local causal LM.

    Each prompt is a user message: wrapped in the tokenizer's chat template when it has one
    (``use_chat_template="auto"``), then ``response_prefix`` is appended so the answer starts in
    format. Greedy when ``temperature == 0`` (deterministic); otherwise sampling seeded by
    ``seed`` without touching the global RNG. A response that ended with EOS (rather than at
    ``max_new_tokens``) is returned with a trailing blank line, so ``parse_example(...,
    require_end=True)`` can drop responses that were cut off.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 0.95, seed: int = 0, batch_size: int = 4,
                 use_chat_template: str | bool = "auto", repetition_penalty: float = 1.0):
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if use_chat_template not in ("auto", True, False):
            raise ConfigError(f"use_chat_template must be 'auto', True or False, got {use_chat_template!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed, self.batch_size, self.repetition_penalty = seed, max(1, batch_size), repetition_penalty
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template is True and not has_template:
            raise ConfigError("use_chat_template=True, but the tokenizer has no chat template")
        self.chat = has_template if use_chat_template == "auto" else bool(use_chat_template)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2-135m", **kw: Any) -> HFGenerator:
        """Load an alias (default SmolLM2-135M-Instruct) or a local directory."""
        from lorakit.models import load_model

        model, tokenizer = load_model(name_or_path, task="causal-lm")
        return cls(model, tokenizer, **kw)

    def format(self, prompt: str, response_prefix: str = "") -> str:
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = prompt.rstrip() + "\n\n"
        return text + response_prefix

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], response_prefix: str = "") -> list[str]:
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(self.model.parameters()).device
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = tok.eos_token_id if eos is None else eos
        eos_ids = torch.tensor([e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None],
                               dtype=torch.long)
        side, tok.padding_side = tok.padding_side, "left"  # decoder-only: pad on the left
        outputs: list[str] = []
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for i in range(0, len(prompts), self.batch_size):
                    texts = [self.format(p, response_prefix) for p in prompts[i:i + self.batch_size]]
                    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat).to(device)
                    kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad_id,
                                              "repetition_penalty": self.repetition_penalty}
                    if self.temperature > 0:
                        kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
                    else:
                        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                    out = self.model.generate(**enc, **kwargs)
                    new = out[:, enc["input_ids"].shape[1]:]                     # (b, new)
                    finished = torch.isin(new, eos_ids.to(new.device)).any(dim=1).tolist()
                    texts = tok.batch_decode(new, skip_special_tokens=True)
                    # a blank line marks a response that ended on its own (EOS), not at the limit
                    outputs.extend(t.rstrip() + "\n\n" if done else t for t, done in zip(texts, finished))
        finally:
            tok.padding_side = side
        return outputs


DEFAULT_TEMPLATE = (
    "You create new training examples for a task that has very little data.\n\n"
    "Related examples from other datasets:\n\n{retrieved}\n\n"
    "Examples of the task:\n\n{seeds}\n\n"
    "Write ONE new example of the task. It must be different from every example above, "
    "follow the task's topic and style, and use exactly this format: {format}."
)


def build_prompt(seeds: Sequence[Record], retrieved: Sequence[Record], fields: Sequence[str],
                 template: str = DEFAULT_TEMPLATE) -> str:
    """The RADA prompt: retrieved cross-dataset examples, then target-task seeds (anchor last)."""
    def block(records: Sequence[Record], keys: Sequence[str] | None) -> str:
        return "\n\n".join(f"### Example {i + 1}\n{render_example(r, keys or list(r))}"
                           for i, r in enumerate(records)) or "(none)"

    fmt = ", ".join(f'"{field_label(f)}: ..."' for f in fields) + (" (one line each)" if len(fields) > 1 else "")
    return template.format(retrieved=block(retrieved, None), seeds=block(seeds, fields), format=fmt)


# =========================================================================== dedup + filters


def normalize_text(text: str) -> str:
    """NFKC, lower case, whitespace collapsed: the key for exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str, n: int = 5) -> frozenset[str]:
    """Character n-grams of the normalised text (the whole text when shorter than n)."""
    t = normalize_text(text)
    if len(t) <= n:
        return frozenset([t]) if t else frozenset()
    return frozenset(t[i:i + n] for i in range(len(t) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def datasketch_available() -> bool:
    try:
        import datasketch  # noqa: F401
    except ImportError:
        return False
    return True


class _NearIndex:
    """Sets of shingles, queried for members with Jaccard ≥ threshold (LSH candidates or all,
    then the exact Jaccard)."""

    def __init__(self, threshold: float, backend: str = "auto", num_perm: int = 128, seed: int = 0):
        if backend not in ("auto", "minhash", "exact"):
            raise ConfigError(f"dedup backend must be 'auto', 'minhash' or 'exact', got {backend!r}")
        if backend == "minhash" and not datasketch_available():
            raise ConfigError("backend='minhash' needs the datasketch package: pip install datasketch")
        self.threshold = threshold
        self.sets: list[frozenset[str]] = []
        self.lsh = None
        if backend == "minhash" or (backend == "auto" and datasketch_available()):
            from datasketch import MinHashLSH

            # LSH banding tuned for a slightly lower threshold: fewer misses, the exact check
            # removes the extra candidates
            self.lsh = MinHashLSH(threshold=max(0.05, threshold - 0.1), num_perm=num_perm)
            self.num_perm, self.seed = num_perm, seed

    def _minhash(self, s: frozenset[str]):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        for sh in sorted(s):
            m.update(sh.encode("utf-8"))
        return m

    def best(self, s: frozenset[str]) -> float:
        """Largest Jaccard between ``s`` and a member (0 when none is found)."""
        if self.lsh is not None:
            candidates = self.lsh.query(self._minhash(s)) if self.sets else []
        else:
            candidates = range(len(self.sets))
        return max((jaccard(s, self.sets[i]) for i in candidates), default=0.0)

    def add(self, s: frozenset[str]) -> None:
        if self.lsh is not None:
            self.lsh.insert(len(self.sets), self._minhash(s))
        self.sets.append(s)


def dedup(texts: Sequence[str], threshold: float = 0.8, ngram: int = 5, backend: str = "auto",
          num_perm: int = 128, seed: int = 0) -> list[int]:
    """Indices of the texts to keep: first occurrences, without exact or near duplicates
    (shingle Jaccard ≥ ``threshold`` with an earlier kept text)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    seen: set[str] = set()
    near = _NearIndex(threshold, backend, num_perm, seed)
    keep = []
    for i, text in enumerate(texts):
        key = normalize_text(text)
        if key in seen:
            continue
        s = shingles(text, ngram)
        if near.best(s) >= threshold:
            continue
        seen.add(key)
        near.add(s)
        keep.append(i)
    return keep


def charset_ok(text: str, min_alpha_ratio: float = 0.5, scripts: Sequence[str] | None = None,
               min_script_ratio: float = 0.9) -> bool:
    """Sanity of the characters: no U+FFFD or control characters (except newline/tab); at least
    ``min_alpha_ratio`` of the non-space characters are letters; with ``scripts`` (Unicode
    script words such as ``"LATIN"``, ``"CYRILLIC"``), at least ``min_script_ratio`` of the
    letters belong to one of them."""
    if "\ufffd" in text or any(unicodedata.category(c) == "Cc" and c not in "\n\t\r" for c in text):
        return False
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return False
    letters = [c for c in chars if c.isalpha()]
    if len(letters) < min_alpha_ratio * len(chars):
        return False
    if scripts:
        wanted = tuple(s.upper() for s in scripts)
        inside = sum(1 for c in letters if unicodedata.name(c, "").startswith(wanted))
        return inside >= min_script_ratio * len(letters)
    return True


@dataclass
class FilterConfig:
    """Filters applied to generated examples (see ``filter_generated``).

    Attributes:
        min_words / max_words: length bounds, in whitespace words over all fields.
        dedup_threshold: shingle Jaccard at or above which two generations are near duplicates.
        copy_threshold: Jaccard with a seed or retrieved example at or above which a generation
            counts as a copy.
        ngram: shingle length (characters).
        min_alpha_ratio / scripts / min_script_ratio: ``charset_ok`` arguments.
        checks: extra hooks ``text -> bool`` (e.g. a language identifier); False drops.
        backend: ``"auto"``, ``"minhash"`` (datasketch LSH) or ``"exact"`` (all pairs).
    """

    min_words: int = 1
    max_words: int = 512
    dedup_threshold: float = 0.8
    copy_threshold: float = 0.8
    ngram: int = 5
    min_alpha_ratio: float = 0.5
    scripts: tuple[str, ...] | None = None
    min_script_ratio: float = 0.9
    checks: tuple[Callable[[str], bool], ...] = ()
    backend: str = "auto"
    num_perm: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_words < 0 or self.max_words < self.min_words:
            raise ConfigError(f"need 0 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        for name in ("dedup_threshold", "copy_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.ngram < 1:
            raise ConfigError(f"ngram must be >= 1, got {self.ngram}")
        if not 0.0 <= self.min_alpha_ratio <= 1.0 or not 0.0 <= self.min_script_ratio <= 1.0:
            raise ConfigError("min_alpha_ratio and min_script_ratio must be in [0, 1]")
        if self.backend not in ("auto", "minhash", "exact"):
            raise ConfigError(f"backend must be 'auto', 'minhash' or 'exact', got {self.backend!r}")


@dataclass
class FilterReport:
    """How many candidates each filter removed (in the order they are applied)."""

    candidates: int = 0
    too_short: int = 0
    too_long: int = 0
    charset: int = 0
    check: int = 0
    copy: int = 0
    duplicate: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def filter_generated(candidates: Sequence[Record], references: Sequence[Record] = (),
                     config: FilterConfig | None = None) -> tuple[list[Record], FilterReport]:
    """Length, charset and hook filters, then copies of ``references`` (seeds and retrieved
    examples) removed, then exact and near duplicates among the candidates (first kept)."""
    cfg = config or FilterConfig()
    report = FilterReport(candidates=len(candidates))
    survivors: list[Record] = []
    for rec in candidates:
        text = example_text(rec)
        words = len(text.split())
        if words < cfg.min_words:
            report.too_short += 1
        elif words > cfg.max_words:
            report.too_long += 1
        elif not charset_ok(text, cfg.min_alpha_ratio, cfg.scripts, cfg.min_script_ratio):
            report.charset += 1
        elif not all(check(text) for check in cfg.checks):
            report.check += 1
        else:
            survivors.append(rec)

    refs = _NearIndex(cfg.copy_threshold, cfg.backend, cfg.num_perm, cfg.seed)
    ref_keys = set()
    for rec in references:
        refs.add(shingles(example_text(rec), cfg.ngram))
        ref_keys.add(normalize_text(example_text(rec)))
    originals = []
    for rec in survivors:
        text = example_text(rec)
        if normalize_text(text) in ref_keys or refs.best(shingles(text, cfg.ngram)) >= cfg.copy_threshold:
            report.copy += 1
        else:
            originals.append(rec)

    keep = dedup([example_text(r) for r in originals], cfg.dedup_threshold, cfg.ngram, cfg.backend,
                 cfg.num_perm, cfg.seed)
    report.duplicate = len(originals) - len(keep)
    kept = [originals[i] for i in keep]
    report.kept = len(kept)
    return kept, report


# =========================================================================== RADA pipeline


@dataclass
class RadaConfig:
    """RADA augmentation settings.

    Attributes:
        k: retrieved pool examples shown per prompt.
        shots: other seed examples shown per prompt (besides the anchor seed).
        per_seed: prompts per seed; prompt j uses neighbours ranked j·k .. (j+1)·k − 1.
        index: vector index backend (``"auto"``, ``"faiss"``, ``"torch"``).
        template: prompt template with ``{retrieved}``, ``{seeds}`` and ``{format}``.
        seed: seeds the choice of shots (generation's own seed is the generator's).
        require_complete: drop responses that stop inside the example (cut off by the token
            limit): the last field must be followed by a blank line, a header or a new label.
        filter: ``FilterConfig`` for the generations.
    """

    k: int = 4
    shots: int = 2
    per_seed: int = 1
    index: str = "auto"
    template: str = DEFAULT_TEMPLATE
    seed: int = 0
    require_complete: bool = True
    filter: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        for name in ("k", "per_seed"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shots < 0:
            raise ConfigError(f"shots must be >= 0, got {self.shots}")
        if self.index not in ("auto", "faiss", "torch"):
            raise ConfigError(f"index must be 'auto', 'faiss' or 'torch', got {self.index!r}")
        missing = [p for p in ("{retrieved}", "{seeds}", "{format}") if p not in self.template]
        if missing:
            raise ConfigError(f"template lacks the placeholders {missing}")


@dataclass
class AugmentResult:
    """What ``rada_augment`` produced.

    Attributes:
        examples: kept generated records (parsed, filtered, deduplicated), in prompt order.
        prompts: every prompt sent, with ``seed`` (index into the seeds) and ``retrieved``
            (indices into the pool).
        raw: the raw continuations, one per prompt.
        parse_failures: continuations that did not parse into a complete record.
        report: ``FilterReport`` of the filter pass.
    """

    examples: list[Record]
    prompts: list[dict[str, Any]]
    raw: list[str]
    parse_failures: int
    report: FilterReport

    def summary(self) -> dict[str, Any]:
        return {"prompts": len(self.prompts), "parse_failures": self.parse_failures, **self.report.as_dict()}


def rada_augment(seeds: Sequence[str | Mapping[str, str]], pool: Sequence[str | Mapping[str, str]],
                 embedder: Embedder, generator: Generator, config: RadaConfig | None = None) -> AugmentResult:
    """Generate new examples for the seed task with retrieval from ``pool`` (see the module
    docstring). Pool records may have other fields than the seeds (they are shown as they are);
    generations take the seeds' fields. Deterministic given the config's seed and a
    deterministic generator (greedy decoding)."""
    cfg = config or RadaConfig()
    seed_recs = as_records(seeds, "seeds")
    pool_recs = as_records(pool, "pool")
    fields = record_fields(seed_recs, "seeds")
    if not pool_recs:
        raise ConfigError("the retrieval pool is empty")

    depth = min(cfg.k * cfg.per_seed, len(pool_recs))
    _, ids = retrieve([example_text(r) for r in seed_recs], [example_text(r) for r in pool_recs], embedder,
                      depth, cfg.index)

    prompts: list[dict[str, Any]] = []
    for i, anchor in enumerate(seed_recs):
        others = [j for j in range(len(seed_recs)) if j != i]
        for j in range(cfg.per_seed):
            ranked = ids[i].tolist()
            got = ranked[j * cfg.k:(j + 1) * cfg.k] or ranked[: cfg.k]  # pool smaller than k·per_seed: reuse
            rng = random.Random(cfg.seed * 1_000_003 + i * 1_009 + j)
            shots = rng.sample(others, min(cfg.shots, len(others)))
            shown = [seed_recs[s] for s in shots] + [anchor]
            text = build_prompt(shown, [pool_recs[p] for p in got], fields, cfg.template)
            prompts.append({"seed": i, "variant": j, "retrieved": got, "prompt": text})

    prefix = f"{field_label(fields[0])}:"
    raw = generator([p["prompt"] for p in prompts], response_prefix=prefix)
    if len(raw) != len(prompts):
        raise ValueError(f"the generator returned {len(raw)} texts for {len(prompts)} prompts")
    # the prompt asks for one line per field when there are several fields
    parsed = [parse_example(prefix + r, fields, cfg.require_complete, single_line=len(fields) > 1) for r in raw]
    candidates = [p for p in parsed if p is not None]

    used = sorted({p for pr in prompts for p in pr["retrieved"]})
    references = seed_recs + [pool_recs[p] for p in used]
    kept, report = filter_generated(candidates, references, cfg.filter)
    return AugmentResult(kept, prompts, raw, len(parsed) - len(candidates), report)


# =========================================================================== AMD²G de-domaining

_WORD = re.compile(r"\w+(?:['’\-]\w+)*", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters/digits, inner apostrophes and hyphens kept)."""
    return [w.lower() for w in _WORD.findall(unicodedata.normalize("NFKC", text))]


def log_odds_z(domain_counts: Mapping[str, int], background_counts: Mapping[str, int],
               prior_strength: float = 100.0) -> dict[str, float]:
    """z-scores of the weighted log-odds ratio with an informative Dirichlet prior (Monroe,
    Colaresi & Quinn 2008) for every word of the domain (formula in the module docstring);
    the prior is the pooled word distribution scaled to ``prior_strength`` pseudo-counts."""
    if prior_strength <= 0:
        raise ConfigError(f"prior_strength must be > 0, got {prior_strength}")
    n_d, n_b = sum(domain_counts.values()), sum(background_counts.values())
    total = n_d + n_b
    if n_d == 0:
        return {}
    a0 = prior_strength
    z = {}
    for w, y_d in domain_counts.items():
        y_b = background_counts.get(w, 0)
        a_w = a0 * (y_d + y_b) / total
        delta = (math.log((y_d + a_w) / (n_d + a0 - y_d - a_w))
                 - math.log((y_b + a_w) / (n_b + a0 - y_b - a_w)))
        z[w] = delta / math.sqrt(1.0 / (y_d + a_w) + 1.0 / (y_b + a_w))
    return z


@dataclass
class DeDomainConfig:
    """AMD²G de-domaining settings.

    Attributes:
        z_threshold: log-odds z above which a word is domain-specific (2.58 ≈ p < 0.005).
        min_count: a term must occur at least this often in its domain.
        prior_strength: a0, pseudo-counts of the Dirichlet prior.
        max_terms: keep at most this many terms per domain (highest z first); None: all.
        placeholder: what a removed term becomes.
        keep_words: words never removed (e.g. a stop-word list).
    """

    z_threshold: float = 2.58
    min_count: int = 2
    prior_strength: float = 100.0
    max_terms: int | None = None
    placeholder: str = "<term>"
    keep_words: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ConfigError(f"min_count must be >= 1, got {self.min_count}")
        if self.prior_strength <= 0:
            raise ConfigError(f"prior_strength must be > 0, got {self.prior_strength}")
        if self.max_terms is not None and self.max_terms < 0:
            raise ConfigError(f"max_terms must be >= 0 or None, got {self.max_terms}")
        if not self.placeholder:
            raise ConfigError("placeholder must be a non-empty string")


def domain_terms(domain_texts: Sequence[str], background_texts: Sequence[str],
                 config: DeDomainConfig | None = None) -> dict[str, float]:
    """Domain-specific words of ``domain_texts`` vs ``background_texts``: word -> z, best first."""
    cfg = config or DeDomainConfig()
    dom = Counter(w for t in domain_texts for w in words(t))
    bg = Counter(w for t in background_texts for w in words(t))
    z = log_odds_z(dom, bg, cfg.prior_strength)
    keep = {w: s for w, s in z.items()
            if s > cfg.z_threshold and dom[w] >= cfg.min_count and w not in cfg.keep_words}
    ranked = sorted(keep.items(), key=lambda kv: (-kv[1], kv[0]))
    if cfg.max_terms is not None:
        ranked = ranked[: cfg.max_terms]
    return dict(ranked)


def dedomain(text: str, terms: Iterable[str], placeholder: str = "<term>") -> str:
    """Replace every whole-word, case-insensitive occurrence of ``terms`` (single words or
    phrases; longer ones first) by ``placeholder``."""
    ordered = sorted({t.strip() for t in terms if t.strip()}, key=lambda t: (-len(t), t))
    if not ordered:
        return text
    body = "|".join(r"\s+".join(re.escape(part) for part in t.split()) for t in ordered)
    pattern = re.compile(r"(?<![\w])(?:" + body + r")(?![\w])", re.IGNORECASE | re.UNICODE)
    return pattern.sub(placeholder, unicodedata.normalize("NFKC", text))


@dataclass
class TwoStageData:
    """AMD²G's two training sets.

    Attributes:
        stage1: domain-agnostic data: every domain's examples, de-domained (domain-agnostic
            training), in domain name order.
        stage2: the target domain's original examples (domain adaptation training).
        terms: domain -> the terms removed from it (word/phrase -> z; lexicon entries get inf).
    """

    stage1: list[Any]
    stage2: list[Any]
    terms: dict[str, dict[str, float]]


def two_stage_datasets(domains: Mapping[str, Sequence[str | Mapping[str, str]]], target: str,
                       general: Sequence[str] = (), lexicon: Mapping[str, Iterable[str]] | None = None,
                       config: DeDomainConfig | None = None) -> TwoStageData:
    """Build AMD²G's stage-1 (de-domained, all domains) and stage-2 (original target) data.

    Args:
        domains: domain name -> examples (strings or flat string records).
        target: the low-resource domain adapted to in stage 2.
        general: optional general-domain texts added to every domain's background.
        lexicon: optional domain -> known domain terms/phrases, removed in addition to the
            statistical ones (the paper's lexical banks).
        config: ``DeDomainConfig``.

    The terms of domain D are found against the background of all other domains plus
    ``general``. Examples keep their type: a string stays a string, a record keeps its fields
    (each field de-domained).
    """
    cfg = config or DeDomainConfig()
    if target not in domains:
        raise ConfigError(f"target domain {target!r} is not among the domains {sorted(domains)}")
    unknown = sorted(set(lexicon or {}) - set(domains))
    if unknown:
        raise ConfigError(f"lexicon names unknown domains {unknown}; domains are {sorted(domains)}")
    texts = {name: [example_text(r) for r in as_records(exs, f"domains[{name!r}]")] for name, exs in domains.items()}
    terms: dict[str, dict[str, float]] = {}
    for name in sorted(domains):
        background = [t for other in sorted(domains) if other != name for t in texts[other]] + list(general)
        found = domain_terms(texts[name], background, cfg)
        for entry in (lexicon or {}).get(name, ()):
            found.setdefault(entry.strip().lower(), math.inf)
        terms[name] = found

    stage1: list[Any] = []
    for name in sorted(domains):
        for ex in domains[name]:
            if isinstance(ex, str):
                stage1.append(dedomain(ex, terms[name], cfg.placeholder))
            else:
                stage1.append({k: dedomain(v, terms[name], cfg.placeholder) for k, v in ex.items()})
    return TwoStageData(stage1=stage1, stage2=list(domains[target]), terms=terms)


# =========================================================================== files (CLI entry)


def read_records(path: str | Path) -> list[Record]:
    """Flat string records from a JSONL file (one object per line) or a text file (one example
    per non-empty line, as ``{"text": line}``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    if p.suffix.lower() not in (".jsonl", ".json"):
        return [{"text": line.strip()} for line in read_utf8(p).splitlines() if line.strip()]
    out = []
    for lineno, rec in read_jsonl(p):
        out.extend(as_records([rec], f"{p}:{lineno}"))
    return out


def write_records(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write JSONL atomically (temp file beside ``path``, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def augment_files(seeds_path: str | Path, pool_paths: Sequence[str | Path], out_path: str | Path,
                  config: RadaConfig | None = None, embedder: Embedder | None = None,
                  generator: Generator | None = None, embedder_model: str = "minilm-l6",
                  generator_model: str = "smollm2-135m", **generator_kw: Any) -> dict[str, Any]:
    """RADA over files: seeds and pool from JSONL/text, generations written to ``out_path``
    (JSONL) and a summary to ``<out_path>.report.json``. Returns the summary."""
    seeds = read_records(seeds_path)
    pool = [r for path in pool_paths for r in read_records(path)]
    embedder = embedder or HFEmbedder.from_pretrained(embedder_model)
    generator = generator or HFGenerator.from_pretrained(generator_model, **generator_kw)
    result = rada_augment(seeds, pool, embedder, generator, config)
    out = write_records(result.examples, out_path)
    summary = {"seeds": len(seeds), "pool": len(pool), "out": str(out), **result.summary()}
    report = out.with_name(out.name + ".report.json")
    tmp = report.with_name(f".{report.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    os.replace(tmp, report)
    return summary
