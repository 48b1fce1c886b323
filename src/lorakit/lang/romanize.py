"""Romanization: transliterate non-Latin scripts to Latin with uroman.

"Romanization-based Large-scale Adaptation of Multilingual Language Models" (Purkayastha,
Ruder, Pfeiffer, Gurevych, Vulić; arXiv:2304.08865) adapts multilingual models to
low-resource languages written in scripts the model's vocabulary barely covers by
transliterating them with UROMAN (Hermjakob et al., 2018), a rule-based romanizer for
virtually every Unicode script. The romanized text shares subwords with Latin-script
languages the model knows (names, loanwords, numbers), so the tokenizer's fertility drops
and the embeddings transfer; the paper finds the largest gains for unseen scripts and
little data, without vocabulary augmentation.

We wrap the ``uroman`` package (the official pure-Python port of the Perl original, offline:
its Unicode tables ship inside the wheel) rather than re-implementing its tables:

    romanize(text) = text with every run of non-Latin script replaced by uroman(run, lcode)

Latin-script text (with its diacritics, e.g. Chichewa "ŵ" or French "é"), ASCII and
whitespace are kept as they are (``keep_latin=True``): uroman alone would also strip Latin
diacritics ("café" -> "cafe"), which changes text the model already reads well. A run starts
at a character of a script other than Latin/Common/Inherited and extends over further such
characters, combining marks, modifier letters, zero-width (non-)joiners, and non-ASCII
punctuation that sits between two of them ("你好，世界" is one run), so uroman sees whole
words. ``keep_latin=False`` passes the whole text to uroman.

Properties the tests check: Latin text is unchanged; the result is idempotent
(``romanize(romanize(x)) == romanize(x)``), since uroman's output is Latin/ASCII.

``lcode`` (ISO 639-3, e.g. "rus", "ukr", "amh", "zho") selects uroman's language-specific
rules where it has them. Loading uroman's tables takes ~2-4 s once per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import regex

from lorakit.errors import ConfigError, ModelNotAvailableError

__all__ = ["needs_romanization", "romanize", "romanize_texts"]

_FOREIGN = r"[^\p{Latin}\p{Common}\p{Inherited}]"  # a character of a non-Latin script
_OTHER = r"[^\x00-\x7F\p{Latin}\s]"  # non-ASCII, non-Latin, not a space (punctuation, marks, ...)
_RUN = regex.compile(rf"{_FOREIGN}(?:{_FOREIGN}|[\p{{M}}\p{{Lm}}\u200c\u200d]|{_OTHER}+(?={_FOREIGN}))*")
_LCODE = regex.compile(r"[a-z]{3}")


@lru_cache(maxsize=1)
def _uroman():
    try:
        import uroman
    except ImportError:
        raise ModelNotAvailableError(
            "romanization needs the 'uroman' package (pure Python, offline): "
            "pip install uroman  (or pip install 'lorakit[romanize]')"
        ) from None
    return uroman.Uroman()


def _check(text: str, lcode: str | None) -> None:
    if not isinstance(text, str):
        raise ConfigError(f"text must be a str, got {type(text).__name__}")
    if lcode is not None and (not isinstance(lcode, str) or not _LCODE.fullmatch(lcode)):
        raise ConfigError(f"lcode must be an ISO 639-3 code of three lowercase letters (e.g. 'rus'), got {lcode!r}")


def needs_romanization(text: str) -> bool:
    """Whether ``text`` holds any character of a script other than Latin (Common and
    Inherited characters such as digits, punctuation and combining marks do not count)."""
    _check(text, None)
    return regex.search(_FOREIGN, text) is not None


def romanize(text: str, lcode: str | None = None, keep_latin: bool = True) -> str:
    """``text`` with its non-Latin scripts transliterated to Latin by uroman.

    Args:
        text: any Unicode text.
        lcode: ISO 639-3 language code for uroman's language-specific rules, or None.
        keep_latin: keep Latin-script text, ASCII and spaces as they are and romanize only
            the runs of other scripts (default); False romanizes the whole text with uroman
            (which also removes Latin diacritics).

    Returns:
        The romanized text (unchanged when it has no non-Latin script and ``keep_latin``).

    Raises:
        ConfigError: ``text`` is not a str or ``lcode`` is not three lowercase letters.
        ModelNotAvailableError: the ``uroman`` package is not installed.
    """
    _check(text, lcode)
    if keep_latin and not needs_romanization(text):
        return text
    ur = _uroman()
    if not keep_latin:
        return ur.romanize_string(text, lcode=lcode)
    return _RUN.sub(lambda m: ur.romanize_string(m.group(0), lcode=lcode), text)


def romanize_texts(texts: Sequence[str], lcode: str | None = None, keep_latin: bool = True) -> list[str]:
    """``romanize`` applied to each text (e.g. a corpus before tokenizer training)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ConfigError(f"texts must be a list of strings, got {type(texts).__name__}")
    return [romanize(t, lcode=lcode, keep_latin=keep_latin) for t in texts]
