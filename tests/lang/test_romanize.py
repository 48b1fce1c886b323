"""Romanization with uroman: non-Latin scripts to Latin, Latin text untouched, idempotent."""

import sys

import pytest

import lorakit.lang.romanize as romanize_mod
from lorakit.errors import ConfigError, ModelNotAvailableError
from lorakit.lang.romanize import needs_romanization, romanize, romanize_texts

EXPECTED = {
    "Привет, мир!": "Privet, mir!",  # Cyrillic
    "Καλημέρα κόσμε": "Kalemera kosme",  # Greek
    "مرحبا بالعالم": "mrhba bal'alm",  # Arabic (unvocalised: no short vowels to write)
    "नमस्ते दुनिया": "namaste duniyaa",  # Devanagari
    "ሰላም ለዓለም": "salaame laaalame",  # Ge'ez (Amharic)
    "안녕하세요 세계": "annyeonghaseyo segye",  # Hangul
    "カーテン": "kaaten",  # Katakana with the (Common-script) long-vowel mark
    "你好，世界": "nihao, shijie",  # Han, with a full-width comma inside the run
    "१२३ ५": "123 5",  # Devanagari digits
}
LATIN = [
    "The quick brown fox jumps over the lazy dog.",
    "Ndipo Mulungu anati, Kuyenera kuwala; ŵ Ŵ",  # Chichewa, with its w-circumflex
    "café naïve — “quoted” 123 !?",
    "",
    "  spaces\tand\nnewlines ",
]


@pytest.mark.parametrize("text", sorted(EXPECTED))
def test_scripts_romanize_to_the_expected_latin(text):
    out = romanize(text)
    assert out == EXPECTED[text]
    assert needs_romanization(text) and not needs_romanization(out)


@pytest.mark.parametrize("text", LATIN)
def test_latin_text_is_unchanged(text):
    assert not needs_romanization(text)
    assert romanize(text) == text


def test_only_non_latin_runs_change_in_mixed_text():
    assert romanize("Hello Привет café, «мир»!") == "Hello Privet café, «mir»!"
    # keep_latin=False hands everything to uroman, which also drops Latin diacritics
    assert romanize("Привет café", keep_latin=False) == "Privet cafe"


@pytest.mark.parametrize("text", sorted(EXPECTED) + LATIN + ["Hello Привет café", "ٱلْعَرَبِيَّة"])
def test_romanize_is_idempotent(text):
    once = romanize(text)
    assert romanize(once) == once
    assert romanize(romanize(text, keep_latin=False), keep_latin=False) == romanize(text, keep_latin=False)


def test_language_code_selects_language_specific_rules():
    assert romanize("Київ") == "Kiyiv"
    assert romanize("Київ", lcode="ukr") == "Kyiv"


def test_romanize_texts_maps_each_text_and_validates():
    assert romanize_texts(["Привет", "hi"]) == ["Privet", "hi"]
    with pytest.raises(ConfigError, match="list of strings"):
        romanize_texts("Привет")
    with pytest.raises(ConfigError, match="must be a str"):
        romanize(b"bytes")
    with pytest.raises(ConfigError, match="must be a str"):
        romanize_texts(["ok", 3])
    with pytest.raises(ConfigError, match="ISO 639-3"):
        romanize("Привет", lcode="ru")
    with pytest.raises(ConfigError, match="must be a str"):
        needs_romanization(None)


def test_missing_uroman_is_a_clear_error(monkeypatch):
    romanize_mod._uroman.cache_clear()
    monkeypatch.setitem(sys.modules, "uroman", None)  # makes `import uroman` fail
    try:
        with pytest.raises(ModelNotAvailableError, match="pip install uroman"):
            romanize("Привет")
        assert romanize("plain Latin") == "plain Latin"  # Latin text never needs uroman
    finally:
        romanize_mod._uroman.cache_clear()
