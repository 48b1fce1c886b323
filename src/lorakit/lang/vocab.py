"""Vocabulary expansion for a new language (Yamaguchi et al., arXiv:2406.11477).

An English-centric tokenizer cuts a low-resource language into many short pieces (high
*fertility*, tokens per word), so the model needs more steps per sentence and sees less
text per context window. Expansion adds target-language tokens and gives each a new
embedding row (and LM-head row), initialised by a heuristic, then continues pre-training
the embeddings (+ LoRA):

    random   e_new ~ N(0, std(E_old)^2)                 (the common baseline)
    mean     e_new = mean_{i in V_old} E_old[i]          (Hewitt 2021: adds ~no mass to the softmax)
    merge    e_new = mean_{j in old_pieces(t)} E_old[j]  (old-tokenizer pieces of the new token t)
    aligned  e_new = given by the caller                 (e.g. trans-tokenization, arXiv:2408.04303)

The paper finds the simple heuristics (mean, merge) more sample-efficient and robust than
random init in low-resource settings; "merge" is our default.

Choosing the new tokens (``train_new_tokens``)
----------------------------------------------
Appending tokens to a BPE vocabulary only helps if the tokenizer can *reach* them: BPE builds
every token by a merge of two existing tokens, applied in rank order. New merges are appended
after all old ones, so a word is first segmented exactly as before and only then can new
merges act on that old segmentation. A piece taken from an independently trained target
tokenizer is often unreachable (its own merge path passes through pieces the old
segmentation never produces), so we choose new tokens by **continuing BPE training from the
base tokenizer's segmentation of the target corpus**: repeatedly merge the most frequent
adjacent pair (a, b) whose result a+b is not yet in the vocabulary. Criterion: each merge
reduces the corpus token count by exactly its pair frequency at that point, so the K merges
are the greedy maximisers of token-count reduction (the BPE objective itself), and every new
token is used by construction. With ``vocab_size`` set, a target tokenizer of that size is
first trained with the ``tokenizers`` library (a ByteLevel BPE for a byte-level base), and only
its pieces may be added (fewer corpus-specific fragments, slightly less reduction).

Unigram (SentencePiece-unigram, e.g. T5/XLM-R) and WordPiece (BERT) bases: a target tokenizer
of ``vocab_size`` pieces is trained with the matching ``tokenizers`` trainer and the K pieces
with the largest ``frequency x (old pieces - 1)`` (tokens saved if every occurrence became
one token) are added. Unigram pieces keep their trained log-probability as score, so the
Viterbi segmentation picks them where they win; WordPiece uses them by longest match.
SentencePiece-BPE tokenizers (Llama-2, Gemma; a BPE model with a ``▁`` normaliser and byte
fallback) are BPE in ``tokenizer.json`` and are extended like byte-level BPE: words are split
before ``▁`` and byte-fallback tokens (``<0x41>``) are never merged. Slow (Python
SentencePiece) tokenizers are refused: load the fast one.

Extending the tokenizer (``extend_tokenizer``) edits the backend's JSON - vocabulary + merges
for BPE - rather than calling ``add_tokens``: added tokens are matched verbatim *before* the
pre-tokenizer and model run, so they would split words at odd places and bypass byte-level
encoding. Old ids are unchanged and new ids are appended, so the old embedding rows stay
valid and the extended tokenizer round-trips text exactly (every token is still a byte
string).

Training only the new rows (``trainable_new_rows``) and saving only them
(``new_rows_state`` / ``save_new_rows`` / ``load_new_rows``) keep an adapter that adds a
language small: a LoRA + K new rows, not a second copy of the 49k x d embedding. A resized
model carries a ``VocabExtension`` record (first new id + extended tokenizer), and
``lorakit.save`` then writes the new rows and the tokenizer into the adapter directory;
``lorakit.load(base, dir)`` resizes the original base and restores them
(``lorakit.core.io.load_tokenizer(dir)`` gives the tokenizer back).
"""

from __future__ import annotations

import copy
import heapq
import json
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "INIT_METHODS",
    "NewRows",
    "NewToken",
    "VocabExtension",
    "expand_vocabulary",
    "extend_tokenizer",
    "load_new_rows",
    "new_rows_state",
    "resize_and_init",
    "save_new_rows",
    "train_new_tokens",
    "trainable_new_rows",
    "vocab_extension",
]

INIT_METHODS = ("random", "mean", "merge", "aligned")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SP_SPACE = "\u2581"  # SentencePiece's "▁"


@dataclass(frozen=True)
class NewToken:
    """One token to add.

    Attributes:
        piece: the token as the tokenizer's model stores it (byte-level BPE: ``"Ġkwambiri"``).
        text: its surface text (``" kwambiri"``); for reading only.
        left, right: BPE only: the merge ``(left, right) -> piece`` that builds it. Both are
            old tokens or earlier new ones.
        gain: tokens saved on the training texts (BPE: exact, the pair frequency when it was
            merged; Unigram/WordPiece: the estimate ``count x (old pieces - 1)``).
        score: Unigram only: the piece's log-probability from the target tokenizer.
    """

    piece: str
    text: str = ""
    left: str | None = None
    right: str | None = None
    gain: int = 0
    score: float = 0.0


# --------------------------------------------------------------------------- tokenizer JSON


def _backend(tokenizer) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; vocabulary editing needs a fast "
            "tokenizer backed by the `tokenizers` library (load it with use_fast=True)"
        )
    return backend


def _tok_json(tokenizer) -> dict:
    return json.loads(_backend(tokenizer).to_str())


def _model_type(data: dict) -> str:
    kind = data["model"].get("type")
    if kind is None:  # very old tokenizer.json files have no "type": infer it
        m = data["model"]
        kind = "BPE" if "merges" in m else "Unigram" if isinstance(m.get("vocab"), list) else "WordPiece"
    if kind not in ("BPE", "Unigram", "WordPiece"):
        raise ConfigError(f"tokenizer model {kind!r} is not supported; expected BPE, Unigram or WordPiece")
    return kind


def _with_backend(tokenizer, data: dict):
    """A copy of the transformers tokenizer whose backend is built from ``data``.

    The wrapper keeps special tokens, chat template and class; every vocabulary query of a
    transformers fast tokenizer reads the backend, so swapping it is enough.
    """
    from tokenizers import Tokenizer

    new = copy.deepcopy(tokenizer)
    backend = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    old = _backend(tokenizer)
    if hasattr(old, "encode_special_tokens"):  # runtime flag, not part of the JSON
        backend.encode_special_tokens = old.encode_special_tokens
    new._tokenizer = backend
    return new


def _full_vocab(tokenizer) -> dict[str, int]:
    """Token -> id including added (special) tokens."""
    return dict(_backend(tokenizer).get_vocab(with_added_tokens=True))


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]


def _merged(model: dict, a: str, b: str) -> str:
    """The token a BPE merge of (a, b) produces (the continuing-subword prefix of b is dropped)."""
    prefix = model.get("continuing_subword_prefix") or ""
    if prefix and b.startswith(prefix):
        b = b[len(prefix):]
    return a + b


def _words(backend: Tokenizer, texts: Sequence[str]) -> Counter:
    """Pre-tokens ("words", in the model's alphabet) of ``texts`` with their counts."""
    norm, pre = backend.normalizer, backend.pre_tokenizer
    words: Counter = Counter()
    for text in texts:
        n = norm.normalize_str(text) if norm is not None else text
        if pre is not None:
            words.update(w for w, _ in pre.pre_tokenize_str(n))
        else:  # SentencePiece style: the whole text is one sequence; pieces never cross "▁"
            words.update(w for w in re.split(f"(?={_SP_SPACE})", n) if w)
    return words


def _model_form(backend: Tokenizer, text: str) -> str:
    """A surface string as the model's single pre-token (byte-level: " ab" -> "Ġab")."""
    words = list(_words(backend, [text]))
    if len(words) != 1:
        raise ConfigError(
            f"{text!r} is split into {len(words)} pre-tokens {words} by the tokenizer's pre-tokenizer, "
            "so it can never be a single token"
        )
    return words[0]


def _decode_piece(backend: Tokenizer, piece: str) -> str:
    try:
        return backend.decoder.decode([piece]) if backend.decoder is not None else piece
    except Exception:  # noqa: BLE001 - a decoder that cannot take a lone piece: show it raw
        return piece


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ConfigError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must contain only strings")
    if not any(t.strip() for t in texts):
        raise ConfigError("texts hold no text to learn tokens from")
    return list(texts)


# --------------------------------------------------------------------------- choosing tokens


def train_new_tokens(
    texts: Sequence[str],
    tokenizer,
    k: int,
    vocab_size: int | None = None,
    min_frequency: int = 2,
) -> list[NewToken]:
    """The K most useful target-language tokens missing from ``tokenizer`` (see module docs).

    Args:
        texts: target-language training text.
        tokenizer: the base (fast) tokenizer.
        k: how many new tokens to return at most (fewer when no candidate reaches
            ``min_frequency``).
        vocab_size: size of a target tokenizer trained with the ``tokenizers`` library whose
            pieces are the candidates. BPE: None = any merge may be added (continued BPE);
            Unigram/WordPiece: None = 8000.
        min_frequency: a candidate must save at least this many tokens (BPE: occur as an
            adjacent pair this often) on ``texts``.

    Returns:
        ``NewToken`` s, most useful first; for BPE in merge order (pass them to
        ``extend_tokenizer`` in this order).
    """
    texts = _check_texts(texts)
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive int, got {k!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(f"min_frequency must be a positive int, got {min_frequency!r}")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 2):
        raise ConfigError(f"vocab_size must be an int >= 2 or None, got {vocab_size!r}")
    data = _tok_json(tokenizer)
    kind = _model_type(data)
    backend = _backend(tokenizer)
    words = _words(backend, texts)
    if kind == "BPE":
        allowed = None
        if vocab_size is not None:
            target = _train_target(backend, data, texts, vocab_size, min_frequency)
            allowed = set(target.get_vocab()) - set(_full_vocab(tokenizer))
        return _continue_bpe(backend, data, words, k, min_frequency, allowed)
    target = _train_target(backend, data, texts, vocab_size or 8000, min_frequency)
    return _pick_pieces(backend, data, target, words, k, min_frequency)


def _train_target(backend: Tokenizer, data: dict, texts: list[str], vocab_size: int, min_frequency: int):
    """A target-language tokenizer of the base's model type, normaliser and pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    kind = _model_type(data)
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
    specials = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
    if kind == "BPE":
        m = data["model"]
        affixes = {key: m[key] for key in ("continuing_subword_prefix", "end_of_word_suffix") if m.get(key)}
        target = Tokenizer(models.BPE(**affixes))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [], **affixes,
        )
    elif kind == "Unigram":
        target = Tokenizer(models.Unigram())
        unk = data["model"].get("unk_id")
        unk_token = data["model"]["vocab"][unk][0] if unk is not None else None
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                          unk_token=unk_token)
    else:
        prefix = data["model"].get("continuing_subword_prefix", "##")
        target = Tokenizer(models.WordPiece(unk_token=data["model"].get("unk_token", "[UNK]"),
                                            continuing_subword_prefix=prefix))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                            special_tokens=specials, continuing_subword_prefix=prefix)
    if backend.normalizer is not None:
        target.normalizer = backend.normalizer
    if backend.pre_tokenizer is not None:
        target.pre_tokenizer = backend.pre_tokenizer
    else:  # SentencePiece-BPE has no pre-tokenizer; train on words split before "▁"
        target.pre_tokenizer = pre_tokenizers.Split(_SP_SPACE, behavior="merged_with_next")
    target.train_from_iterator(texts, trainer)
    return target


def _continue_bpe(
    backend: Tokenizer, data: dict, words: Counter, k: int, min_frequency: int, allowed: set[str] | None
) -> list[NewToken]:
    """Greedy BPE merges on top of the base tokenizer's segmentation of ``words``."""
    model = data["model"]
    vocab = set(_full_vocab_json(data))
    frozen = {t["content"] for t in data.get("added_tokens", [])}  # specials are never merged
    byte_fallback = bool(model.get("byte_fallback"))

    def mergeable(tok: str) -> bool:
        return tok not in frozen and not (byte_fallback and _BYTE_FALLBACK.fullmatch(tok))

    seqs: list[list[str]] = []
    counts: list[int] = []
    for w, c in words.items():
        seqs.append([t.value for t in backend.model.tokenize(w)])
        counts.append(c)

    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in pairwise(seq):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    banned: set[tuple[str, str]] = set()
    out: list[NewToken] = []
    while heap and len(out) < k:
        neg, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if -neg != count or count == 0 or pair in banned:
            continue  # stale heap entry (the count changed since it was pushed)
        if count < min_frequency:
            break
        a, b = pair
        new = _merged(model, a, b)
        # A merge whose result already exists could re-enable old merges of that token and
        # break the "old segmentation first" argument; we only create new strings.
        if new in vocab or not (mergeable(a) and mergeable(b)) or (allowed is not None and new not in allowed):
            banned.add(pair)
            continue
        vocab.add(new)
        out.append(NewToken(new, _decode_piece(backend, new), a, b, gain=count))
        changed: set[tuple[str, str]] = set()
        for i in list(where.pop(pair, ())):
            seq = seqs[i]
            merged = _apply_merge(seq, a, b, new)
            if len(merged) == len(seq):
                continue
            c = counts[i]
            for p in pairwise(seq):
                pair_count[p] -= c
                changed.add(p)
            for p in pairwise(merged):
                pair_count[p] += c
                where[p].add(i)
                changed.add(p)
            seqs[i] = merged
        for p in changed:
            c = pair_count[p]
            if c <= 0:
                pair_count.pop(p, None)
            elif p not in banned:
                heapq.heappush(heap, (-c, p))
    return out


def _apply_merge(seq: list[str], a: str, b: str, new: str) -> list[str]:
    """Merge adjacent (a, b) left to right without overlap, as the tokenizers BPE model does."""
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _full_vocab_json(data: dict) -> dict[str, int]:
    model = data["model"]
    if isinstance(model["vocab"], dict):
        vocab = dict(model["vocab"])
    else:  # Unigram: a list of [piece, score] indexed by id
        vocab = {p: i for i, (p, _) in enumerate(model["vocab"])}
    for t in data.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    return vocab


def _old_pieces(backend: Tokenizer, data: dict, piece: str) -> list[str]:
    """The base model's segmentation of one piece (WordPiece: a "##" piece stays word-internal)."""
    model = data["model"]
    if _model_type(data) == "WordPiece":
        prefix = model.get("continuing_subword_prefix", "##")
        if piece.startswith(prefix):
            # segment it as the tail of a word: put a one-char head in front and drop it
            vocab = model["vocab"]
            head = next((c for c in ("a", "e", "x") if c in vocab), None)
            if head is not None:
                toks = [t.value for t in backend.model.tokenize(head + piece[len(prefix):])]
                if toks and toks[0] == head:
                    return toks[1:]
            return [t.value for t in backend.model.tokenize(piece[len(prefix):])]
    return [t.value for t in backend.model.tokenize(piece)]


def _pick_pieces(backend: Tokenizer, data: dict, target, words: Counter, k: int, min_frequency: int) -> list[NewToken]:
    """Unigram/WordPiece: the target pieces with the largest count x (old pieces - 1)."""
    old = set(backend.get_vocab(with_added_tokens=True))
    uses: Counter = Counter()
    for w, c in words.items():
        for t in target.model.tokenize(w):
            if t.value not in old:
                uses[t.value] += c
    scores = {}
    tdata = json.loads(target.to_str())
    if _model_type(tdata) == "Unigram":
        scores = {p: s for p, s in tdata["model"]["vocab"]}
    ranked = []
    for piece, c in uses.items():
        if c < min_frequency:
            continue
        gain = c * (len(_old_pieces(backend, data, piece)) - 1)
        if gain > 0:
            ranked.append((-gain, piece))
    ranked.sort()
    return [
        NewToken(p, _decode_piece(backend, p), gain=-g, score=float(scores.get(p, 0.0)))
        for g, p in ranked[:k]
    ]


# --------------------------------------------------------------------------- extending


def extend_tokenizer(tokenizer, new_tokens: Sequence[NewToken | str], first_id: int | None = None):
    """A copy of ``tokenizer`` with ``new_tokens`` as real vocabulary entries.

    Args:
        tokenizer: a fast (``tokenizers``-backed) transformers tokenizer.
        new_tokens: ``NewToken`` s from ``train_new_tokens`` (in its order), and/or plain
            strings of surface text (``" kwambiri"``; each must be one pre-token). BPE builds a
            plain string by a left-to-right chain of merges over its current segmentation, so
            its prefixes (``" kw"``, ``" kwa"``, ...) are added too when they are missing.
            Tokens already in the vocabulary are skipped.
        first_id: id of the first new token; default ``len(tokenizer)`` (max id + 1). Pass the
            model's embedding rows when they exceed the tokenizer (padded vocabularies) so new
            rows are appended after them; ids in between stay unused (BPE/WordPiece only).

    Returns:
        The extended tokenizer (the input is not modified). Old tokens keep their ids; new ids
        are ``first_id, first_id + 1, ...``. Text without the new pieces tokenises as before
        (BPE: new merges rank after every old merge).
    """
    data = _tok_json(tokenizer)
    kind = _model_type(data)
    model = data["model"]
    vocab = _full_vocab_json(data)
    next_id = max(vocab.values(), default=-1) + 1
    if first_id is not None:
        if not isinstance(first_id, int) or first_id < next_id:
            raise ConfigError(f"first_id must be an int >= {next_id} (the next free id), got {first_id!r}")
        if kind == "Unigram" and first_id != len(model["vocab"]):
            raise ConfigError("a Unigram vocabulary is a list indexed by id: first_id must be its length "
                              f"{len(model['vocab'])}, got {first_id}")
        next_id = first_id
    if kind == "Unigram" and next_id != len(model["vocab"]):
        raise ConfigError(f"cannot append to a Unigram vocabulary of {len(model['vocab'])} pieces whose added "
                          f"tokens reach id {next_id - 1}")
    strings = []
    list_format = bool(model.get("merges")) and isinstance(model["merges"][0], list)
    for tok in new_tokens:
        if isinstance(tok, str):
            strings.append(tok)
            continue
        if not isinstance(tok, NewToken):
            raise ConfigError(f"new tokens must be NewToken or str, got {type(tok).__name__}")
        if tok.piece in vocab:
            continue
        if kind == "BPE":
            if tok.left is None or tok.right is None:
                strings.append(tok.text or tok.piece)  # no merge given: build it like a string
                continue
            for side in (tok.left, tok.right):
                if side not in vocab:
                    raise ConfigError(f"merge ({tok.left!r}, {tok.right!r}) of {tok.piece!r} uses {side!r}, which "
                                      "is neither an old token nor an earlier new one (keep train_new_tokens' order)")
            if _merged(model, tok.left, tok.right) != tok.piece:
                raise ConfigError(f"merge ({tok.left!r}, {tok.right!r}) does not produce {tok.piece!r}")
            next_id = _add_bpe(model, vocab, tok.piece, tok.left, tok.right, next_id, list_format)
        else:
            next_id = _add_piece(model, kind, vocab, tok.piece, tok.score, next_id)
    for text in strings:
        current = _tokenizer_from(data)
        piece = _model_form(current, text)
        if piece in vocab:
            continue
        if kind == "BPE":
            seq = [t.value for t in current.model.tokenize(piece)]
            left = seq[0]
            for right in seq[1:]:
                new = _merged(model, left, right)
                if new not in vocab:
                    next_id = _add_bpe(model, vocab, new, left, right, next_id, list_format)
                left = new
        else:
            next_id = _add_piece(model, kind, vocab, piece, _median_score(model) if kind == "Unigram" else 0.0, next_id)
    return _with_backend(tokenizer, data)


def _tokenizer_from(data: dict):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def _add_bpe(model: dict, vocab: dict, piece: str, left: str, right: str, next_id: int, list_format: bool) -> int:
    model["vocab"][piece] = next_id
    vocab[piece] = next_id
    model.setdefault("merges", []).append([left, right] if list_format else f"{left} {right}")
    return next_id + 1


def _add_piece(model: dict, kind: str, vocab: dict, piece: str, score: float, next_id: int) -> int:
    if kind == "Unigram":
        model["vocab"].append([piece, float(score)])
    else:
        model["vocab"][piece] = next_id
    vocab[piece] = next_id
    return next_id + 1


def _median_score(model: dict) -> float:
    scores = sorted(s for _, s in model["vocab"] if s != 0.0)
    return scores[len(scores) // 2] if scores else 0.0


# --------------------------------------------------------------------------- embeddings


def _embeddings(model: nn.Module) -> tuple[nn.Embedding, nn.Module | None, bool]:
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(
            f"the input embedding is a {type(emb).__name__}, not an nn.Embedding; change the vocabulary "
            "before injecting adapters (or eject them first)"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and not isinstance(head, (nn.Linear, nn.Embedding)):
        raise ConfigError(f"the output embedding is a {type(head).__name__}, not an nn.Linear; "
                          "change the vocabulary before injecting adapters")
    tied = head is not None and head.weight is emb.weight
    return emb, head, tied


def _new_ids(old_tokenizer, new_tokenizer) -> list[int]:
    old, new = _full_vocab(old_tokenizer), _full_vocab(new_tokenizer)
    moved = [t for t, i in old.items() if new.get(t) != i]
    if moved:
        raise ConfigError(f"new_tokenizer changes or drops {len(moved)} old tokens (e.g. {moved[:3]}); "
                          "it must keep every old id")
    return sorted(i for t, i in new.items() if t not in old)


def _piece_ids(old_tokenizer, new_tokenizer, new_ids: list[int]) -> list[list[int]]:
    """For each new id, the old-tokenizer ids of its piece (the "merge" init)."""
    data = _tok_json(old_tokenizer)
    backend = _backend(old_tokenizer)
    old_vocab = _full_vocab(old_tokenizer)
    id_to_tok = {i: t for t, i in _full_vocab(new_tokenizer).items()}
    out = []
    for i in new_ids:
        piece = id_to_tok[i]
        ids = [old_vocab[p] for p in _old_pieces(backend, data, piece) if p in old_vocab]
        if not ids:  # e.g. an added special token: fall back to its surface text
            ids = list(old_tokenizer(piece, add_special_tokens=False)["input_ids"])
        out.append(ids)
    return out


def _init_rows(
    weight: torch.Tensor, ref_ids: list[int], pieces: list[list[int]] | None, method: str,
    given: torch.Tensor | None, n_new: int, generator: torch.Generator,
) -> torch.Tensor:
    """(n_new, d) initial rows for one matrix (embedding or LM head), in fp32."""
    w = weight.detach().float()
    ref = w[ref_ids]
    if method == "mean":
        return ref.mean(0).expand(n_new, -1).clone()
    if method == "random":
        std = float(ref.std())
        return torch.randn(n_new, w.shape[1], generator=generator) * std
    if method == "merge":
        mean = ref.mean(0)
        return torch.stack([w[ids].mean(0) if ids else mean for ids in pieces])
    assert given is not None
    return given.detach().float().to(w.device)


def resize_and_init(
    model: nn.Module,
    old_tokenizer,
    new_tokenizer,
    method: str = "mean",
    aligned_vectors: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Resize input embeddings and LM head (tied or untied) and initialise the new rows.

    Args:
        model: a transformers model whose vocabulary matches ``old_tokenizer``.
        old_tokenizer, new_tokenizer: the base tokenizer and its extension (old ids unchanged).
        method: ``"random"`` (normal, std of the old rows), ``"mean"`` (mean of the old rows),
            ``"merge"`` (mean of the old rows of the new token's old-tokenizer pieces) or
            ``"aligned"`` (rows given in ``aligned_vectors``).
        aligned_vectors: for ``"aligned"``: a ``(n_new, d)`` tensor in new-id order (used for the
            LM head too when it is untied), or ``{"input": ..., "output": ...}``.
        seed: for ``"random"``.

    Returns:
        ``model``, modified in place: ``max(old rows, max new id + 1)`` rows; old rows unchanged.
        An untied LM head gets the same rule applied to its own rows (and bias). Outputs on
        text without new tokens keep the same logits for every old id; the softmax over the
        larger vocabulary does change (the new logits join its normaliser).
    """
    if method not in INIT_METHODS:
        raise ConfigError(f"unknown init method {method!r}; expected one of {', '.join(INIT_METHODS)}")
    emb, head, tied = _embeddings(model)
    new_ids = _new_ids(old_tokenizer, new_tokenizer)
    if not new_ids:
        return model
    n_old_rows, d = emb.weight.shape
    old_ids = sorted(i for i in _full_vocab(old_tokenizer).values() if i < n_old_rows)
    if len(old_ids) < len(_full_vocab(old_tokenizer)):
        raise ConfigError(f"old_tokenizer has ids beyond the model's {n_old_rows} embedding rows: "
                          "they do not belong together")
    if set(new_ids) & set(old_ids):
        raise ConfigError("new_tokenizer gives new tokens ids that old tokens use")
    aligned_in = aligned_out = None
    if method == "aligned":
        if aligned_vectors is None:
            raise ConfigError("method='aligned' needs aligned_vectors")
        if isinstance(aligned_vectors, Mapping):
            unknown = set(aligned_vectors) - {"input", "output"}
            if unknown or "input" not in aligned_vectors:
                raise ConfigError("aligned_vectors as a dict needs key 'input' (and optionally 'output'), "
                                  f"got {sorted(aligned_vectors)}")
            aligned_in, aligned_out = aligned_vectors["input"], aligned_vectors.get("output")
        else:
            aligned_in = aligned_vectors
        for name, t in (("input", aligned_in), ("output", aligned_out)):
            if t is not None and tuple(t.shape) != (len(new_ids), d):
                raise ConfigError(f"aligned_vectors[{name!r}] has shape {tuple(t.shape)}, "
                                  f"expected ({len(new_ids)}, {d})")
        aligned_out = aligned_in if aligned_out is None else aligned_out
    elif aligned_vectors is not None:
        raise ConfigError(f"aligned_vectors is only used with method='aligned', not {method!r}")

    pieces = _piece_ids(old_tokenizer, new_tokenizer, new_ids) if method == "merge" else None
    gen = torch.Generator().manual_seed(seed)
    rows_in = _init_rows(emb.weight, old_ids, pieces, method, aligned_in, len(new_ids), gen)
    rows_out = None
    old_bias = None
    if head is not None and not tied:
        rows_out = _init_rows(head.weight, old_ids, pieces, method, aligned_out, len(new_ids), gen)
    if isinstance(head, nn.Linear) and head.bias is not None:
        old_bias = head.bias.detach().float().clone()

    n_rows = max(n_old_rows, new_ids[-1] + 1)
    _resize(model, emb, head, tied, n_rows)
    emb, head, tied = _embeddings(model)
    idx = torch.tensor(new_ids, device=emb.weight.device)
    with torch.no_grad():
        # rows between the old ones and the first new id (a padded tokenizer) get the mean
        taken = set(new_ids)
        gap = [i for i in range(n_old_rows, n_rows) if i not in taken]
        if gap:
            fill = emb.weight[old_ids].mean(0)
            emb.weight[gap] = fill
        emb.weight.index_copy_(0, idx, rows_in.to(emb.weight.dtype))
        if rows_out is not None:
            if gap:
                head.weight[gap] = head.weight[old_ids].mean(0)
            head.weight.index_copy_(0, idx, rows_out.to(head.weight.dtype))
        if old_bias is not None:
            b = old_bias[old_ids]
            if method == "merge":
                vals = torch.stack([old_bias[p].mean() if p else b.mean() for p in pieces])
            else:
                vals = b.mean().expand(len(new_ids))
            head.bias[n_old_rows:] = b.mean().to(head.bias.dtype)
            head.bias.index_copy_(0, idx, vals.to(head.bias.dtype))
    note_extension(model, n_old_rows, tokenizer=new_tokenizer)  # lorakit.save stores rows + tokenizer
    return model


def _resize(model: nn.Module, emb: nn.Embedding, head, tied: bool, n_rows: int) -> None:
    """Resize to ``n_rows`` keeping the modules' classes, the tie and ``requires_grad``; update the config."""
    was = {name: p.requires_grad for name, p in _row_params(model)[0].items()}
    resize = getattr(model, "resize_token_embeddings", None)
    if callable(resize):
        # transformers keeps the embedding class (e.g. Gemma's scaled embedding) and the tie;
        # the random rows it adds are overwritten by our init
        resize(n_rows, mean_resizing=False)
    else:
        _set_rows(model, emb, head, tied, lambda w: torch.cat([w, w.new_zeros(n_rows - w.shape[0], *w.shape[1:])]))
    # transformers builds a new (trainable) LM head when it is untied: keep the old flags
    for name, p in _row_params(model)[0].items():
        if name in was:
            p.requires_grad_(was[name])


def _set_rows(model: nn.Module, emb: nn.Embedding, head, tied: bool, fn) -> None:
    """Replace the vocabulary rows of embedding, LM head (and its bias) by ``fn(rows)``, in place."""
    with torch.no_grad():
        emb.weight.data = fn(emb.weight.data)
        emb.num_embeddings = emb.weight.shape[0]
        if emb.padding_idx is not None and emb.padding_idx >= emb.num_embeddings:
            emb.padding_idx = None
        if head is not None:
            if not tied:
                head.weight.data = fn(head.weight.data)
            if isinstance(head, nn.Linear):
                head.out_features = head.weight.shape[0]
                if head.bias is not None:
                    head.bias.data = fn(head.bias.data)
            else:
                head.num_embeddings = head.weight.shape[0]
    n = emb.weight.shape[0]
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        text_config.vocab_size = n
        config.vocab_size = n
    if hasattr(model, "vocab_size"):
        model.vocab_size = n


# --------------------------------------------------------------------------- one call


def expand_vocabulary(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    k: int,
    init: str = "merge",
    vocab_size: int | None = None,
    min_frequency: int = 2,
    aligned_vectors: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
):
    """Train K new tokens on ``texts``, extend the tokenizer, resize and initialise the model.

    Returns:
        ``(model, new_tokenizer, report)``; ``model`` is changed in place. ``report`` holds
        ``n_added``, ``n_old`` (embedding rows before = first new id), ``tokens`` (surface
        text of each new token, in id order), ``init`` and ``fertility_before`` /
        ``fertility_after`` (tokens per word on ``texts``, ``lorakit.evaluate.fertility``).
    """
    from lorakit.evaluate import fertility

    if init not in INIT_METHODS:
        raise ConfigError(f"unknown init method {init!r}; expected one of {', '.join(INIT_METHODS)}")
    emb, _, _ = _embeddings(model)
    new_tokens = train_new_tokens(texts, tokenizer, k, vocab_size=vocab_size, min_frequency=min_frequency)
    n_old = emb.weight.shape[0]
    first_id = max(n_old, max(_full_vocab(tokenizer).values()) + 1)
    new_tokenizer = extend_tokenizer(tokenizer, new_tokens, first_id=first_id)
    resize_and_init(model, tokenizer, new_tokenizer, method=init, aligned_vectors=aligned_vectors, seed=seed)
    report = {
        "n_added": len(new_tokens),
        "n_old": first_id,
        "tokens": [t.text for t in new_tokens],
        "init": init,
        "fertility_before": fertility(tokenizer, list(texts)),
        "fertility_after": fertility(new_tokenizer, list(texts)),
    }
    return model, new_tokenizer, report


# --------------------------------------------------------------------------- training new rows only


@dataclass
class NewRows:
    """Handle returned by ``trainable_new_rows``: the parameters it unfroze and their hooks."""

    n_old: int
    params: list[nn.Parameter]
    _hooks: list = field(default_factory=list, repr=False)
    _was: list[bool] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove the gradient masks and restore the parameters' ``requires_grad``."""
        for h in self._hooks:
            h.remove()
        for p, was in zip(self.params, self._was):
            p.requires_grad_(was)
        self._hooks.clear()


def _unwrap(module):
    """The base layer of an adapter-wrapped layer (``AdaptedLinear`` / ``AdaptedEmbedding``)."""
    from lorakit.core.layer import AdaptedLayer

    return module.base if isinstance(module, AdaptedLayer) else module


def _row_params(model: nn.Module) -> tuple[dict[str, nn.Parameter], bool]:
    """The vocabulary-indexed parameters: input embedding, untied LM head, head bias.

    Adapter wrappers are looked through (a LoRA on ``embed_tokens`` or ``lm_head`` keeps the
    base layer inside), so rows can be saved and trained after injection.
    """
    emb = _unwrap(model.get_input_embeddings())
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(f"the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    get_head = getattr(model, "get_output_embeddings", None)
    head = _unwrap(get_head()) if callable(get_head) and get_head() is not None else None
    tied = head is not None and head.weight is emb.weight
    out = {"input_embeddings": emb.weight}
    if head is not None and not tied:
        out["output_embeddings"] = head.weight
    if isinstance(head, nn.Linear) and head.bias is not None:
        out["output_bias"] = head.bias
    return out, tied


def embedding_rows(model: nn.Module) -> int:
    """Rows of the model's input embedding (its vocabulary size)."""
    return _row_params(model)[0]["input_embeddings"].shape[0]


def trainable_new_rows(model: nn.Module, n_old: int) -> NewRows:
    """Make only rows ``>= n_old`` of the input embedding (and of an untied LM head and its
    bias) learn: the weights require grad and a hook zeroes the gradient of rows < n_old.

    Call it after injecting adapters (injection freezes base weights). The old rows get zero
    gradient, so SGD and Adam leave them untouched, but *decoupled weight decay still shrinks
    them*: use ``weight_decay=0`` for these parameters (lorakit's TrainConfig default).

    The model then carries a ``VocabExtension`` record, so ``lorakit.save`` stores the new rows
    with the adapter (see ``vocab_extension``).
    """
    params, _ = _row_params(model)
    rows = params["input_embeddings"].shape[0]
    if isinstance(n_old, bool) or not isinstance(n_old, int) or not 0 <= n_old < rows:
        raise ConfigError(f"n_old must be an int in [0, {rows}) (the embedding has {rows} rows), got {n_old!r}")
    handle = NewRows(n_old, list(params.values()))
    for p in handle.params:
        handle._was.append(p.requires_grad)
        p.requires_grad_(True)
        handle._hooks.append(p.register_hook(lambda g, n=n_old: _mask_rows(g, n)))
    note_extension(model, n_old)
    return handle


def _mask_rows(grad: torch.Tensor, n_old: int) -> torch.Tensor:
    grad = grad.clone()
    grad[:n_old] = 0
    return grad


# --------------------------------------------------------------------------- the extension record


_RECORD = "lorakit_vocab_extension"


@dataclass
class VocabExtension:
    """What lorakit knows about the vocabulary rows a model gained (``model.lorakit_vocab_extension``).

    Set by ``resize_and_init`` (so by ``expand_vocabulary`` and trans-tokenization),
    ``load_new_rows``, ``trainable_new_rows`` and ``lorakit.load`` of an adapter that carries
    new rows. ``lorakit.save`` reads it: rows ``>= n_old`` (+ the tokenizer) are then stored with
    the adapter, so it loads onto the original base model.

    Attributes:
        n_old: embedding rows of the original base model (the first new id).
        tokenizer: the extended tokenizer, when known.
        tokenizer_files: file name -> bytes of the extended tokenizer as read from an adapter
            directory (used when ``tokenizer`` is None).
    """

    n_old: int
    tokenizer: object = None
    tokenizer_files: dict[str, bytes] | None = None


def vocab_extension(model: nn.Module) -> VocabExtension | None:
    """The model's ``VocabExtension``, or None when it has no added rows (or lost them)."""
    ext = getattr(model, _RECORD, None)
    if ext is None:
        return None
    try:
        rows = embedding_rows(model)
    except ConfigError:
        return None
    return ext if rows > ext.n_old else None


def note_extension(model: nn.Module, n_old: int, tokenizer=None, tokenizer_files: dict[str, bytes] | None = None
                   ) -> VocabExtension:
    """Record that rows ``>= n_old`` of ``model`` were added (keeps the smallest ``n_old`` seen,
    the original base's vocabulary, when a model is extended twice)."""
    ext = getattr(model, _RECORD, None)
    if ext is None or embedding_rows(model) <= ext.n_old:
        ext = VocabExtension(n_old)
    ext.n_old = min(ext.n_old, n_old)
    if tokenizer is not None:
        ext.tokenizer, ext.tokenizer_files = tokenizer, None
    elif tokenizer_files is not None:
        ext.tokenizer, ext.tokenizer_files = None, dict(tokenizer_files)
    # object.__setattr__: a plain attribute, kept out of nn.Module's submodule tracking
    object.__setattr__(model, _RECORD, ext)
    return ext


def truncate_rows(model: nn.Module, n_rows: int) -> nn.Module:
    """Drop every vocabulary row ``>= n_rows`` (undo a resize; old rows are kept bit-exactly)."""
    emb, head, tied = _embeddings(model)
    if n_rows >= emb.weight.shape[0]:
        return model
    was = {name: p.requires_grad for name, p in _row_params(model)[0].items()}
    resize = getattr(model, "resize_token_embeddings", None)
    if callable(resize):
        resize(n_rows, mean_resizing=False)
    else:
        _set_rows(model, emb, head, tied, lambda w: w[:n_rows].clone())
    for name, p in _row_params(model)[0].items():
        if name in was:
            p.requires_grad_(was[name])
    if getattr(model, _RECORD, None) is not None and n_rows <= getattr(model, _RECORD).n_old:
        object.__setattr__(model, _RECORD, None)
    return model


# --------------------------------------------------------------------------- saving and loading rows


def new_rows_state(model: nn.Module, n_old: int) -> dict[str, torch.Tensor]:
    """The rows ``>= n_old`` as tensors (a few KB, not the whole embedding).

    Keys: ``new_rows.n_old`` (int64, (1,)), ``new_rows.input_embeddings`` (n_new, d) and, for an
    untied LM head, ``new_rows.output_embeddings`` (n_new, d); ``new_rows.output_bias`` (n_new,)
    when the head has a bias. The prefix lets them share a file with adapter tensors.
    """
    params, _ = _row_params(model)
    rows = params["input_embeddings"].shape[0]
    if isinstance(n_old, bool) or not isinstance(n_old, int) or not 0 <= n_old < rows:
        raise ConfigError(f"n_old must be an int in [0, {rows}), got {n_old!r}")
    out = {"new_rows.n_old": torch.tensor([n_old], dtype=torch.int64)}
    for name, p in params.items():
        out[f"new_rows.{name}"] = p.detach()[n_old:].clone().contiguous().cpu()
    return out


def save_new_rows(model: nn.Module, n_old: int, path: str | os.PathLike) -> Path:
    """Write ``new_rows_state`` to a safetensors file, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(new_rows_state(model, n_old), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_new_rows(model: nn.Module, n_old: int, rows: Mapping[str, torch.Tensor]) -> bool:
    """Check that ``rows`` (name -> (n_new, ...) tensor, names as in ``new_rows_state`` without
    the prefix) fit ``model``; nothing is changed. Returns True when the model is still the
    base (``n_old`` rows) and must be resized, False when it already has ``n_old + n_new``.

    Raises:
        ConfigError: wrong vocabulary size, tied vs untied head, or a shape mismatch.
    """
    if "input_embeddings" not in rows:
        raise ConfigError("tensors hold no new rows (input_embeddings missing)")
    n_new = rows["input_embeddings"].shape[0]
    params, _ = _row_params(model)
    have = params["input_embeddings"].shape[0]
    if have not in (n_old, n_old + n_new):
        raise ConfigError(f"the model has {have} embedding rows; these new rows need {n_old} (base) "
                          f"or {n_old + n_new} (already resized)")
    expected = {name: (n_new, *p.shape[1:]) for name, p in params.items()}
    if set(rows) != set(expected):
        raise ConfigError(f"saved rows {sorted(rows)} do not match this model's {sorted(expected)} "
                          "(tied vs untied LM head, or a head bias?)")
    for name, t in rows.items():
        if tuple(t.shape) != expected[name]:
            raise ConfigError(f"new_rows.{name} has shape {tuple(t.shape)}, expected {expected[name]}")
        if t.dtype.is_floating_point != params[name].dtype.is_floating_point:
            raise ConfigError(f"new_rows.{name} has dtype {t.dtype}, expected {params[name].dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConfigError(f"new_rows.{name} contains NaN or inf")
    return have == n_old


def put_new_rows(model: nn.Module, n_old: int, rows: Mapping[str, torch.Tensor]) -> nn.Module:
    """Resize the model to ``n_old + n_new`` rows when needed and write ``rows`` (checked first)."""
    if check_new_rows(model, n_old, rows):
        emb, head, tied = _embeddings(model)
        _resize(model, emb, head, tied, n_old + rows["input_embeddings"].shape[0])
    params, _ = _row_params(model)
    with torch.no_grad():
        for name, p in params.items():
            p[n_old:] = rows[name].to(device=p.device, dtype=p.dtype)
    note_extension(model, n_old)
    return model


def load_new_rows(model: nn.Module, tensors: Mapping[str, torch.Tensor] | str | os.PathLike) -> nn.Module:
    """Put saved new rows back into ``model`` (in place).

    ``tensors`` is ``new_rows_state``'s dict (other keys are ignored) or a safetensors file. A
    model with ``n_old`` rows (the base) is first resized to ``n_old + n_new``; one that already
    has that many rows is overwritten. Everything is checked before the model changes.
    """
    if isinstance(tensors, (str, os.PathLike)):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensors))
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{tensors} is not a readable safetensors file: {e}") from None
    if "new_rows.n_old" not in tensors or "new_rows.input_embeddings" not in tensors:
        raise ConfigError("tensors hold no new rows (keys new_rows.n_old / new_rows.input_embeddings missing)")
    n_old = int(tensors["new_rows.n_old"].reshape(-1)[0])
    saved = {k[len("new_rows."):]: v for k, v in tensors.items() if k.startswith("new_rows.") and k != "new_rows.n_old"}
    return put_new_rows(model, n_old, saved)
