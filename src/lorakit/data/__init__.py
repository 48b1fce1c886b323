"""Corpora that ship as pip packages (no downloads), text file loading, packing and mixing.

- ``bible``: Chichewa and King James Bible, verse-aligned, with held-out books.
- ``text``: ``load_texts`` (plain text / JSONL / chat) and ``pack`` into token blocks.
- ``mix``: temperature sampling weights and seeded mixing of block sources.
- ``classify``: BBC News 5-topic classification.
"""

from lorakit.data.bible import (
    BOOKS,
    HELDOUT_BOOKS,
    Verse,
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
from lorakit.data.classify import bbc_news
from lorakit.data.mix import mix_blocks, temperature_weights
from lorakit.data.text import load_texts, pack, render_chat, render_record

__all__ = [
    "BOOKS",
    "HELDOUT_BOOKS",
    "Verse",
    "bbc_news",
    "book_name",
    "chapter_texts",
    "chichewa_split",
    "chichewa_verses",
    "english_heldout_texts",
    "english_replay_texts",
    "kjv_texts",
    "kjv_verses",
    "load_texts",
    "mix_blocks",
    "pack",
    "parallel_verses",
    "render_chat",
    "render_record",
    "temperature_weights",
]
