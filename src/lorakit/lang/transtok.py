"""Trans-tokenization (Remy, Delobelle et al., arXiv:2408.04303): embeddings for a new
language's tokens from a sentence-aligned parallel corpus.

A new (target-language) token has no trained embedding. If a parallel corpus says that the
target token ``t`` is usually the translation of source tokens ``s1, s2, ...``, the model
already knows what ``t`` should mean: initialise it as the average of their embeddings,
weighted by how often each was aligned to ``t``:

    c(t, s)   = number of times target token t is aligned to source token s   (Viterbi, below)
    w(t, s)   = c(t, s) / sum_s' c(t, s')          (pairs with c < min_count dropped first)
    E_new[t]  = sum_s w(t, s) E_src[s]             (input embedding; an untied LM head H alike)

Target tokens with no alignment fall back to ``"merge"`` (mean of the source embeddings of
the token's pieces under the source tokenizer, lorakit.lang.vocab's default init) or
``"mean"`` (mean of all source rows). Special tokens map to the source special of the same
role (bos -> bos, eos -> eos, ...), as in the authors' code. A target token that is also a
source token gets a pseudo-count ``identical_count`` for itself (the authors add 1).

Token alignment (``align_ibm1``): IBM Model 1 trained by EM on token ids, the model the
authors' pipeline runs (``fast_align -I 7`` without ``-d`` is Model 1 with a NULL word):

    p(f_j | e)        = sum_{i=0..l} 1/(l+1) t(f_j | e_i)        e_0 = NULL
    E-step  gamma_ij  = t(f_j | e_i) / sum_i' t(f_j | e_i')       (target position j, source i)
    M-step  t(f | e)  = sum_{j: f_j=f, i: e_i=e} gamma_ij / sum_f' (same for f')
    Viterbi a_j       = argmax_i t(f_j | e_i)   (ties: NULL first, then the earliest source)

t starts uniform, so the result is a deterministic function of the corpus (no seed to set).
The sparse table holds only pairs that co-occur in some sentence; the E-step is vectorised
with numpy over chunks of sentence pairs (every (target position, source position) pair of a
chunk as one flat array): the 31k-verse English-Chichewa Bible (41M token pairs with
SmolLM2's tokenizer) aligns in about 30 s on two CPU cores, ~1 GB peak memory.

Deviations from the authors' code, and why:

- We align tokens directly (the paper's description). The code's default joins a word's
  subword tokens into one unit for fast_align and spreads each word-pair count back over the
  token pairs; that needs tokenizer-specific word-boundary regexes and adds little for
  Bible-sized corpora.
- Target tokens without any alignment get the ``merge`` (or ``mean``) init instead of the
  authors' "smoothing" from overlapping mapped tokens and then the UNK row: ``merge`` is the
  init the vocabulary-expansion study (arXiv:2406.11477) found robust, and it keeps
  trans-tokenization a strict improvement over lorakit's default for unaligned tokens.
- No aligner binary: fast_align/eflomal need a C/C++ build (eflomal is a source-only package
  on PyPI), and Model 1 on token ids is a few numpy lines.

Use it two ways: ``transtokenize_embeddings`` returns new embedding rows for any target
tokenizer (a fully new vocabulary, as in the paper, or the ids you ask for), and
``expand_vocabulary_transtok`` / ``resize_and_init_transtok`` plug it into
lorakit.lang.vocab's expansion path (new tokens initialised by trans-tokenization, old rows
unchanged) through vocab's ``"aligned"`` init.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.lang.vocab import (
    _embeddings,
    _full_vocab,
    _new_ids,
    _piece_ids,
    extend_tokenizer,
    resize_and_init,
    train_new_tokens,
)

__all__ = [
    "FALLBACKS",
    "Alignment",
    "TransTokenized",
    "align_ibm1",
    "bible_pairs",
    "expand_vocabulary_transtok",
    "resize_and_init_transtok",
    "transtokenize_embeddings",
]

FALLBACKS = ("merge", "mean")
COUNT_KINDS = ("viterbi", "expected")
_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# fallbacks when the source lacks the role (the authors' choices)
_ROLE_FALLBACK = {"bos_token": "cls_token", "eos_token": "sep_token", "cls_token": "bos_token",
                  "sep_token": "eos_token", "mask_token": "pad_token"}


# --------------------------------------------------------------------------- aligner


@dataclass(frozen=True)
class Alignment:
    """Token alignment counts from ``align_ibm1``.

    Attributes:
        target_ids, source_ids: (P,) int64, the aligned token pairs (NULL alignments excluded),
            sorted by target id, then count (descending), then source id.
        counts: (P,) float64, how often each pair was aligned (Viterbi: an integer count;
            ``"expected"``: the sum of posteriors).
        n_sentences: sentence pairs used (pairs with an empty side are skipped).
        n_target_tokens: target token positions in them.
        n_null: target positions aligned to NULL (Viterbi) or their posterior mass.
    """

    target_ids: np.ndarray
    source_ids: np.ndarray
    counts: np.ndarray
    n_sentences: int
    n_target_tokens: int
    n_null: float

    def table(self, min_count: float = 1) -> dict[int, dict[int, float]]:
        """target id -> {source id: count}, pairs with ``count >= min_count`` only."""
        out: dict[int, dict[int, float]] = {}
        for t, s, c in zip(self.target_ids.tolist(), self.source_ids.tolist(), self.counts.tolist(), strict=True):
            if c >= min_count:
                out.setdefault(t, {})[s] = c
        return out

    def best(self) -> dict[int, int]:
        """target id -> the source id it was aligned to most often."""
        out: dict[int, int] = {}
        for t, s in zip(self.target_ids.tolist(), self.source_ids.tolist(), strict=True):
            out.setdefault(t, s)  # rows are sorted by count within a target: the first is the best
        return out


@dataclass
class _Chunk:
    idx: np.ndarray  # (P_c,) int32/int64 index of each (target pos, source pos) pair into the pair table
    lens: np.ndarray  # (n_pos,) number of source positions (incl. NULL) per target position
    starts: np.ndarray  # (n_pos,) start of each target position's segment in idx


def _check_ids(name: str, seqs) -> list[np.ndarray]:
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise ConfigError(f"{name} must be a list of token-id sequences, got {type(seqs).__name__}")
    out = []
    for k, s in enumerate(seqs):
        a = np.asarray(s, dtype=np.int64).reshape(-1) if len(s) else np.zeros(0, dtype=np.int64)
        if a.size and a.min() < 0:
            raise ConfigError(f"{name}[{k}] holds a negative token id {int(a.min())}")
        out.append(a)
    return out


def _pair_keys(src: list[np.ndarray], tgt: list[np.ndarray], n_src: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys ``f * n_src + e`` of every (target position, source position incl. NULL) pair of
    the sentences, grouped by target position, and the segment length of each position.

    ``e`` is the source id + 1 (0 = NULL), ``n_src`` = max source id + 2.
    """
    src_ext = [np.concatenate([[0], s + 1]) for s in src]  # NULL first in every sentence
    lens_s = np.array([len(s) for s in src_ext], dtype=np.int64)
    lens_t = np.array([len(t) for t in tgt], dtype=np.int64)
    src_flat = np.concatenate(src_ext)
    tgt_flat = np.concatenate(tgt)
    src_start = np.concatenate([[0], np.cumsum(lens_s)[:-1]])
    sent_of_pos = np.repeat(np.arange(len(tgt)), lens_t)  # (n_pos,)
    seg_len = lens_s[sent_of_pos]  # (n_pos,) source positions each target position sees
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    pos = np.repeat(np.arange(len(tgt_flat)), seg_len)  # (P,)
    within = np.arange(len(pos)) - seg_start[pos]
    e = src_flat[src_start[sent_of_pos][pos] + within]
    f = tgt_flat[pos]
    return f * n_src + e, seg_len


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if len(a) else a


def _chunks(src: list[np.ndarray], tgt: list[np.ndarray], max_pairs: int) -> Iterator[tuple[int, int]]:
    """Sentence ranges [a, b) holding at most ~max_pairs (target pos, source pos) pairs each."""
    a, acc = 0, 0
    for k in range(len(src)):
        acc += len(tgt[k]) * (len(src[k]) + 1)
        if acc >= max_pairs:
            yield a, k + 1
            a, acc = k + 1, 0
    if a < len(src):
        yield a, len(src)


def align_ibm1(
    source_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    iterations: int = 6,
    counts: str = "viterbi",
    chunk_pairs: int = 2_000_000,
) -> Alignment:
    """Align target tokens to source tokens with IBM Model 1 (see module docs).

    Args:
        source_ids, target_ids: token ids of each sentence pair (same number of sentences).
            Pairs where either side is empty are skipped.
        iterations: EM updates of t(f|e) before the final alignment pass (the authors run
            ``fast_align -I 7``: 6 updates, then the Viterbi pass).
        counts: ``"viterbi"`` (count of best alignments, fast_align's output) or
            ``"expected"`` (posterior-weighted counts of the last E-step).
        chunk_pairs: at most this many (target position, source position) pairs are held in
            memory per chunk while building the table (memory ~ 12 bytes x corpus pairs).

    Returns:
        ``Alignment`` (deterministic: t starts uniform; numpy sums run in a fixed order).

    Raises:
        ConfigError: different numbers of sentences, no sentence pair with tokens on both
            sides, negative ids, ``iterations < 1`` or an unknown ``counts``.
    """
    src, tgt = _check_ids("source_ids", source_ids), _check_ids("target_ids", target_ids)
    if len(src) != len(tgt):
        raise ConfigError(f"source_ids has {len(src)} sentences but target_ids has {len(tgt)}; "
                          "a parallel corpus needs one target sentence per source sentence")
    if not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations must be an int >= 1, got {iterations!r}")
    if counts not in COUNT_KINDS:
        raise ConfigError(f"counts must be one of {', '.join(COUNT_KINDS)}, got {counts!r}")
    if not isinstance(chunk_pairs, int) or chunk_pairs < 1:
        raise ConfigError(f"chunk_pairs must be a positive int, got {chunk_pairs!r}")
    keep = [k for k in range(len(src)) if len(src[k]) and len(tgt[k])]
    if not keep:
        raise ConfigError(f"no sentence pair (of {len(src)}) has tokens on both sides: nothing to align")
    src, tgt = [src[k] for k in keep], [tgt[k] for k in keep]
    n_src = int(max(int(s.max()) for s in src)) + 2  # source id + 1, and 0 = NULL

    ranges = list(_chunks(src, tgt, chunk_pairs))
    # pass 1: the sorted table of distinct co-occurring (f, e) pairs (sort-based unique: numpy's
    # hash-based np.unique is ~10x slower on tens of millions of int64 keys)
    keys = _sorted_unique(np.concatenate([_sorted_unique(_pair_keys(src[a:b], tgt[a:b], n_src)[0])
                                          for a, b in ranges]))
    index_dtype = np.int32 if len(keys) < 2**31 else np.int64
    # pass 2: every chunk as indices into the table (searchsorted on the chunk's sorted distinct
    # keys, then scattered back: sorted queries keep the binary searches cache-friendly)
    chunks = []
    for a, b in ranges:
        k, lens = _pair_keys(src[a:b], tgt[a:b], n_src)
        order = np.argsort(k)
        ks = k[order]
        new_run = np.concatenate([[True], ks[1:] != ks[:-1]])
        where = np.searchsorted(keys, ks[new_run]).astype(index_dtype)
        idx = np.empty(len(k), dtype=index_dtype)
        idx[order] = where[np.cumsum(new_run) - 1]
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        chunks.append(_Chunk(idx, lens, starts))
    pair_e = keys % n_src  # (U,) source (+1; 0 = NULL) of each table entry
    n_pairs = len(keys)

    t = np.ones(n_pairs)  # uniform t(f|e): the first E-step spreads each f evenly over its sentence
    expected = np.zeros(n_pairs)
    for _ in range(iterations):
        expected = np.zeros(n_pairs)
        for c in chunks:
            tv = t[c.idx]
            z = np.add.reduceat(tv, c.starts)  # (n_pos,) sum over source positions of t(f_j|e_i)
            expected += np.bincount(c.idx, weights=tv / np.repeat(z, c.lens), minlength=n_pairs)
        per_e = np.bincount(pair_e, weights=expected, minlength=n_src)
        t = expected / per_e[pair_e]

    if counts == "viterbi":
        aligned = np.zeros(n_pairs)
        for c in chunks:
            tv = t[c.idx]
            best = np.maximum.reduceat(tv, c.starts)
            at = np.arange(len(tv))
            # the first position reaching the maximum: NULL (segment start) wins ties, as in fast_align
            first = np.minimum.reduceat(np.where(tv == np.repeat(best, c.lens), at, len(tv)), c.starts)
            aligned += np.bincount(c.idx[first], minlength=n_pairs)
    else:
        aligned = expected
    null = pair_e == 0
    n_null = float(aligned[null].sum())
    sel = (~null) & (aligned > 0)
    f = keys[sel] // n_src
    e = pair_e[sel] - 1
    cnt = aligned[sel]
    order = np.lexsort((e, -cnt, f))
    return Alignment(
        target_ids=f[order].astype(np.int64),
        source_ids=e[order].astype(np.int64),
        counts=cnt[order],
        n_sentences=len(src),
        n_target_tokens=int(sum(len(x) for x in tgt)),
        n_null=n_null,
    )


# --------------------------------------------------------------------------- embeddings


@dataclass
class TransTokenized:
    """Result of ``transtokenize_embeddings``.

    Attributes:
        target_ids: the target ids the rows are for, in row order.
        input: (n, d) rows for the input embedding (dtype of the model's embedding).
        output: (n, d) rows for an untied LM head, None when it is tied (or absent).
        mapping: target id -> [(source id, weight)], weights summing to 1, for the ids
            initialised from the alignment or by special-token role.
        fallback_ids: target ids initialised by the fallback (no alignment survived).
        alignment: the token alignment used.
    """

    target_ids: list[int]
    input: torch.Tensor
    output: torch.Tensor | None
    mapping: dict[int, list[tuple[int, float]]]
    fallback_ids: list[int]
    alignment: Alignment
    fallback: str = "merge"

    @property
    def coverage(self) -> float:
        """Fraction of the rows set from the alignment (or a special-token role)."""
        return len(self.mapping) / max(1, len(self.target_ids))


def _check_pairs(parallel_pairs) -> tuple[list[str], list[str]]:
    if isinstance(parallel_pairs, (str, bytes)) or not isinstance(parallel_pairs, Sequence):
        raise ConfigError(f"parallel_pairs must be a list of (source_text, target_text) pairs, "
                          f"got {type(parallel_pairs).__name__}")
    if len(parallel_pairs) == 0:
        raise ConfigError("parallel_pairs is empty: trans-tokenization needs a sentence-aligned corpus")
    src, tgt = [], []
    for k, p in enumerate(parallel_pairs):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2:
            raise ConfigError(f"parallel_pairs[{k}] must be a (source_text, target_text) pair, got {p!r:.80}")
        s, t = p
        if not isinstance(s, str) or not isinstance(t, str):
            raise ConfigError(f"parallel_pairs[{k}] must hold two strings, got "
                              f"({type(s).__name__}, {type(t).__name__})")
        src.append(s)
        tgt.append(t)
    return src, tgt


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _special_map(source_tok, target_tok) -> dict[int, int]:
    """target special id -> source special id of the same role (or the same string)."""
    src_vocab, tgt_vocab = _full_vocab(source_tok), _full_vocab(target_tok)
    out: dict[int, int] = {}
    for role in _SPECIAL_ROLES:
        t = getattr(target_tok, role, None)
        if t is None or t not in tgt_vocab:
            continue
        candidates = (getattr(source_tok, role, None), getattr(source_tok, _ROLE_FALLBACK.get(role, ""), None),
                      t, getattr(source_tok, "unk_token", None))
        s = next((c for c in candidates if c is not None and c in src_vocab), None)
        if s is not None:
            out[tgt_vocab[t]] = src_vocab[s]
    for t in getattr(target_tok, "all_special_tokens", []):
        if t in src_vocab and t in tgt_vocab:
            out.setdefault(tgt_vocab[t], src_vocab[t])
    return out


def _fallback_pieces(source_tok, target_tok, ids: list[int]) -> list[list[int]]:
    """Source-tokenizer ids of each target token's text (the "merge" init)."""
    try:  # target extends source (vocabulary expansion): segment the piece exactly as vocab does
        new = set(_new_ids(source_tok, target_tok))
    except ConfigError:
        new = None
    src_vocab = _full_vocab(source_tok)
    id_to_tok = {i: t for t, i in _full_vocab(target_tok).items()}
    out: list[list[int]] = []
    for i in ids:
        piece = id_to_tok.get(i)
        if piece is None:
            out.append([])
        elif piece in src_vocab and (new is None or i not in new):
            out.append([src_vocab[piece]])
        elif new is not None and i in new:
            out.append(_piece_ids(source_tok, target_tok, [i])[0])
        else:  # a different tokenizer: its surface text, re-encoded by the source tokenizer
            text = target_tok.convert_tokens_to_string([piece])
            out.append(list(source_tok(text, add_special_tokens=False)["input_ids"]) if text else [])
    return out


def transtokenize_embeddings(
    model: nn.Module,
    source_tok,
    target_tok,
    parallel_pairs: Sequence[tuple[str, str]],
    target_ids: Sequence[int] | None = None,
    iterations: int = 6,
    min_count: float = 1,
    fallback: str = "merge",
    counts: str = "viterbi",
    identical_count: float = 1.0,
) -> TransTokenized:
    """Embedding rows for ``target_tok``'s tokens by trans-tokenization (see module docs).

    Args:
        model: a transformers model whose vocabulary matches ``source_tok`` (not modified).
        source_tok: the model's tokenizer (tokenizes the source side).
        target_tok: the target tokenizer (a new one, or ``source_tok`` extended with new tokens).
        parallel_pairs: ``(source_text, target_text)`` sentence pairs, e.g. ``bible_pairs()``.
        target_ids: the target ids to make rows for, in this order; default every id
            ``0 .. max target id`` (a full new embedding matrix).
        iterations, counts: passed to ``align_ibm1``.
        min_count: alignment pairs seen fewer times are dropped before weighting (the authors
            use 20 on corpora of millions of sentences; 1 keeps every Bible alignment).
        fallback: ``"merge"`` or ``"mean"`` for target tokens with no alignment.
        identical_count: pseudo-count added for (t, t) when the target token is also a source
            token (0 disables it).

    Returns:
        ``TransTokenized`` with ``input`` (n, d) and, for an untied LM head, ``output`` (n, d).
        A bias of the LM head is not set here (``resize_and_init`` gives new entries the mean).

    Raises:
        ConfigError: empty corpus, malformed pairs, unknown ``fallback``, bad ``min_count``,
            target ids out of range, or a model/tokenizer mismatch.
    """
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if not min_count > 0:
        raise ConfigError(f"min_count must be > 0, got {min_count!r}")
    if not identical_count >= 0:
        raise ConfigError(f"identical_count must be >= 0, got {identical_count!r}")
    src_texts, tgt_texts = _check_pairs(parallel_pairs)
    emb, head, tied = _embeddings(model)
    w_in = emb.weight.detach()
    w_out = head.weight.detach() if head is not None and not tied else None
    n_src_rows = w_in.shape[0]
    src_vocab = _full_vocab(source_tok)
    if max(src_vocab.values()) >= n_src_rows:
        raise ConfigError(f"source_tok has ids up to {max(src_vocab.values())} but the model has only "
                          f"{n_src_rows} embedding rows: they do not belong together")
    tgt_vocab = _full_vocab(target_tok)
    n_tgt = max(tgt_vocab.values()) + 1
    if target_ids is None:
        ids = list(range(n_tgt))
    else:
        ids = [int(i) for i in target_ids]
        bad = [i for i in ids if not 0 <= i < n_tgt]
        if bad:
            raise ConfigError(f"target_ids {bad[:5]} are outside the target vocabulary [0, {n_tgt})")

    alignment = align_ibm1(_encode(source_tok, src_texts), _encode(target_tok, tgt_texts),
                           iterations=iterations, counts=counts)
    table = alignment.table(min_count)
    if identical_count > 0:
        id_to_tok = {i: t for t, i in tgt_vocab.items()}
        for i in ids:
            s = src_vocab.get(id_to_tok.get(i, ""))
            if s is not None:
                row = table.setdefault(i, {})
                row[s] = row.get(s, 0.0) + identical_count
    mapping: dict[int, list[tuple[int, float]]] = {}
    for i in ids:
        row = table.get(i)
        if row:
            total = sum(row.values())
            mapping[i] = [(s, c / total) for s, c in sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))]
    wanted = set(ids)
    for t, s in _special_map(source_tok, target_tok).items():
        if t in wanted:
            mapping[t] = [(s, 1.0)]

    fallback_ids = [i for i in ids if i not in mapping]
    pieces = _fallback_pieces(source_tok, target_tok, fallback_ids) if fallback == "merge" else None
    ref = sorted(i for i in src_vocab.values())

    def rows(weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        mean = w[ref].mean(0)
        out = torch.empty(len(ids), w.shape[1])
        pos = {i: r for r, i in enumerate(ids)}
        # aligned rows: one sparse (n, V_src) x (V_src, d) product
        r_idx, s_idx, vals = [], [], []
        for i, lst in mapping.items():
            for s, wt in lst:
                r_idx.append(pos[i])
                s_idx.append(s)
                vals.append(wt)
        if r_idx:
            m = torch.sparse_coo_tensor(torch.tensor([r_idx, s_idx]), torch.tensor(vals, dtype=torch.float32),
                                        (len(ids), w.shape[0]), check_invariants=True).coalesce()
            out.copy_(torch.sparse.mm(m, w))
        for k, i in enumerate(fallback_ids):
            p = [j for j in pieces[k] if j < w.shape[0]] if pieces is not None else []
            out[pos[i]] = w[p].mean(0) if p else mean
        return out.to(weight.dtype)

    return TransTokenized(
        target_ids=ids,
        input=rows(w_in),
        output=rows(w_out) if w_out is not None else None,
        mapping=mapping,
        fallback_ids=fallback_ids,
        alignment=alignment,
        fallback=fallback,
    )


# --------------------------------------------------------------------------- vocabulary expansion


def resize_and_init_transtok(
    model: nn.Module,
    old_tokenizer,
    new_tokenizer,
    parallel_pairs: Sequence[tuple[str, str]],
    **kwargs,
) -> TransTokenized:
    """``vocab.resize_and_init`` with trans-tokenization for the new rows.

    Aligns ``parallel_pairs`` (source = the model's language, target text tokenized by
    ``new_tokenizer``), computes rows for the new ids only and hands them to
    ``resize_and_init(method="aligned")``: old rows are unchanged, an untied LM head gets its
    own aligned rows. ``kwargs`` go to ``transtokenize_embeddings``. Returns its result.
    """
    new_ids = _new_ids(old_tokenizer, new_tokenizer)
    if not new_ids:
        raise ConfigError("new_tokenizer adds no token to old_tokenizer: nothing to initialise")
    tt = transtokenize_embeddings(model, old_tokenizer, new_tokenizer, parallel_pairs, target_ids=new_ids, **kwargs)
    vectors = {"input": tt.input} if tt.output is None else {"input": tt.input, "output": tt.output}
    resize_and_init(model, old_tokenizer, new_tokenizer, method="aligned", aligned_vectors=vectors)
    return tt


def expand_vocabulary_transtok(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    k: int,
    parallel_pairs: Sequence[tuple[str, str]],
    vocab_size: int | None = None,
    min_frequency: int = 2,
    **kwargs,
):
    """``vocab.expand_vocabulary`` with ``init="transtok"``: train K new tokens on ``texts``,
    extend the tokenizer, resize, and initialise the new rows by trans-tokenization over
    ``parallel_pairs`` (``(source_text, target_text)``; ``kwargs`` go to
    ``transtokenize_embeddings``).

    Returns:
        ``(model, new_tokenizer, report)`` like ``expand_vocabulary``; the report also holds
        ``n_aligned`` (new tokens set from the alignment) and ``n_fallback``.
    """
    from lorakit.evaluate import fertility

    _check_pairs(parallel_pairs)  # fail before the (slower) token training
    emb, _, _ = _embeddings(model)
    new_tokens = train_new_tokens(texts, tokenizer, k, vocab_size=vocab_size, min_frequency=min_frequency)
    first_id = max(emb.weight.shape[0], max(_full_vocab(tokenizer).values()) + 1)
    new_tokenizer = extend_tokenizer(tokenizer, new_tokens, first_id=first_id)
    tt = resize_and_init_transtok(model, tokenizer, new_tokenizer, parallel_pairs, **kwargs)
    report = {
        "n_added": len(new_tokens),
        "n_old": first_id,
        "tokens": [t.text for t in new_tokens],
        "init": "transtok",
        "n_aligned": len(tt.mapping),
        "n_fallback": len(tt.fallback_ids),
        "fertility_before": fertility(tokenizer, list(texts)),
        "fertility_after": fertility(new_tokenizer, list(texts)),
    }
    return model, new_tokenizer, report


def bible_pairs(books: list[str] | None = None) -> list[tuple[str, str]]:
    """(English, Chichewa) verse pairs from the installed Bible packages: the parallel corpus
    for trans-tokenizing an English model to Chichewa. ``books=None`` takes every book except
    the held-out evaluation books (``lorakit.data.bible.HELDOUT_BOOKS``)."""
    from lorakit.data.bible import BOOKS, HELDOUT_BOOKS, parallel_verses

    if books is None:
        books = [b for b in BOOKS if b not in HELDOUT_BOOKS]
    return [(en.text, ny.text) for ny, en in parallel_verses(books)]
