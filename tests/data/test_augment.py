"""Augmentation: RADA retrieval + generation, AMD²G de-domaining, dedup and filters."""

import json
import sys

import pytest
import torch

from lorakit.data.augment import (
    DeDomainConfig,
    FilterConfig,
    HFEmbedder,
    HFGenerator,
    RadaConfig,
    VectorIndex,
    as_records,
    augment_files,
    build_prompt,
    charset_ok,
    datasketch_available,
    dedomain,
    dedup,
    domain_terms,
    faiss_available,
    filter_generated,
    parse_example,
    rada_augment,
    read_records,
    record_fields,
    retrieve,
    two_stage_datasets,
)
from lorakit.errors import ConfigError
from tests.conftest import tiny_bert, tiny_tokenizer
from tests.data.conftest import word_tokenizer

SEEDS = ["Moni, muli bwanji? Ndili bwino.", "Mulungu anakonda dziko lapansi.", "The quick brown fox jumps."]
UNRELATED = ["Pack my box with five dozen liquor jugs.", "How vexingly quick daft zebras jump!",
             "Sphinx of black quartz, judge my vow.", "Zikomo kwambiri, abale.",
             "A wizard's job is to vex chumps quickly in fog."]
PLANTED = ["Moni, muli bwanji? Ndili bwino kwambiri.", "Mulungu anakonda dziko lonse lapansi.",
           "The quick brown fox jumps high."]  # PLANTED[i] is the near neighbour of SEEDS[i]
POOL = UNRELATED[:2] + [PLANTED[0]] + UNRELATED[2:4] + [PLANTED[1]] + UNRELATED[4:] + [PLANTED[2]]

BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])
DEDUP_BACKENDS = ["exact"] + (["minhash"] if datasketch_available() else [])


@pytest.fixture(scope="module")
def embedder():
    """A tiny random BERT encoder with the byte-level test tokenizer (vocabulary 320)."""
    from transformers import BertModel

    cfg = tiny_bert().config
    cfg.vocab_size = 320
    torch.manual_seed(0)
    return HFEmbedder(BertModel(cfg).eval(), tiny_tokenizer())


class ScriptedGenerator:
    """Stands in for an LLM: answers prompt i with replies[i % len(replies)]; records prompts."""

    def __init__(self, replies):
        self.replies, self.prompts, self.prefix = replies, [], None

    def __call__(self, prompts, response_prefix=""):
        self.prompts, self.prefix = list(prompts), response_prefix
        return [self.replies[i % len(self.replies)] for i in range(len(prompts))]


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("backend", BACKENDS)
def test_vector_index_returns_planted_neighbours(backend):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(300, 24, generator=g), dim=-1)
    planted = torch.tensor([5, 77, 123, 299])
    queries = base[planted] + 0.01 * torch.randn(4, 24, generator=g)
    scores, ids = VectorIndex(base, backend).search(queries, k=5)
    assert ids.shape == (4, 5) and torch.equal(ids[:, 0], planted)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    exact = torch.topk(queries @ base.T, 5).indices
    assert torch.equal(ids, exact)


def test_vector_index_errors():
    with pytest.raises(ConfigError, match="backend"):
        VectorIndex(torch.randn(3, 4), "annoy")
    with pytest.raises(ConfigError, match="non-empty"):
        VectorIndex(torch.empty(0, 4))
    index = VectorIndex(torch.randn(3, 4), "torch")
    with pytest.raises(ConfigError, match="k must be"):
        index.search(torch.randn(1, 4), 0)
    with pytest.raises(ConfigError, match=r"queries must be \(q, 4\)"):
        index.search(torch.randn(1, 5), 1)
    assert index.search(torch.randn(2, 4), 10)[1].shape == (2, 3)  # k is capped at the index size


def test_missing_optional_packages_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setitem(sys.modules, "datasketch", None)
    with pytest.raises(ConfigError, match="pip install faiss-cpu"):
        VectorIndex(torch.randn(3, 4), "faiss")
    with pytest.raises(ConfigError, match="pip install datasketch"):
        dedup(["a", "b"], backend="minhash")
    assert VectorIndex(torch.randn(3, 4), "auto").backend == "torch"
    assert dedup(["same text", "same  TEXT"], backend="auto") == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieve_finds_planted_pool_examples(embedder, backend):
    _, ids = retrieve(SEEDS, POOL, embedder, k=3, backend=backend)
    assert [POOL[i] for i in ids[:, 0].tolist()] == PLANTED


def test_embedder_is_normalised_and_padding_invariant(embedder):
    alone = embedder([SEEDS[0]])
    batched = embedder([SEEDS[0], UNRELATED[4] * 3])  # padding to a longer text must not matter
    assert torch.allclose(alone.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


# ----------------------------------------------------------------------------- prompts + parsing


def test_records_and_fields():
    assert as_records(["a", {"q": "x", "a": "y"}]) == [{"text": "a"}, {"q": "x", "a": "y"}]
    assert record_fields([{"q": "1", "a": "2"}, {"a": "3", "q": "4"}]) == ("q", "a")
    with pytest.raises(ConfigError, match="fields must be strings"):
        as_records([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match=r"seeds\[1\] has fields"):
        record_fields([{"q": "1"}, {"a": "2"}])
    with pytest.raises(ConfigError, match="at least one"):
        record_fields([])


def test_parse_example():
    fields = ("question", "answer")
    text = "Sure! Here it is:\nQuestion: What is 2+2?\nIt is arithmetic.\nAnswer: 4\n\nQuestion: another"
    assert parse_example(text, fields) == {"question": "What is 2+2?\nIt is arithmetic.", "answer": "4"}
    assert parse_example("### Example\n**Question**: x", fields) is None  # answer missing
    assert parse_example("question: a\nanswer:   \n", fields) is None  # empty answer
    assert parse_example("Text: hello world\nText: second", ("text",)) == {"text": "hello world"}
    assert parse_example("no format at all", ("text",)) is None
    # small models write the fields inline and run on into a second example
    inline = " How do I reset it? Answer: Unplug it for ten seconds. Question: And then?"
    assert parse_example("Question:" + inline, fields, require_end=True) == {
        "question": "How do I reset it?", "answer": "Unplug it for ten seconds."}
    assert parse_example("**Question**: a?\n**Answer**: b", fields) == {"question": "a?", "answer": "b"}
    cut = "Question: a?\nAnswer: b is"  # stopped by the token limit
    assert parse_example(cut, fields) is not None and parse_example(cut, fields, require_end=True) is None
    assert parse_example(cut + "\n\n", fields, require_end=True) == {"question": "a?", "answer": "b is"}
    chatty = "Question: a?\nsome remark\nAnswer: b.\n```python\nimport os"
    assert parse_example(chatty, fields, require_end=True) is None
    assert parse_example(chatty, fields, require_end=True, single_line=True) == {"question": "a?", "answer": "b."}


def test_build_prompt_shows_retrieved_then_seeds_with_anchor_last():
    seeds = [{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}]
    retrieved = [{"text": "from another dataset"}]
    prompt = build_prompt(seeds, retrieved, ("question", "answer"))
    assert prompt.index("from another dataset") < prompt.index("Question: Q1") < prompt.index("Question: Q2")
    assert '"Question: ...", "Answer: ..."' in prompt


# ----------------------------------------------------------------------------- RADA pipeline


def test_rada_with_scripted_generator(embedder):
    replies = [
        " Moni, muli bwanji? Ndili bwino.\n\n",          # copies seed 0: dropped as a copy
        " Lero kuli dzuwa ndipo tikupita kumunda.\n\n",  # new: kept
        " Lero kuli dzuwa ndipo tikupita kumunda!\n\n",  # near duplicate of the previous: dropped
        "\n\nnothing in format",                           # the prefix 'Text:' gets an empty value
        " Ana anapita kusukulu m'mawa uno ndipo",          # cut off by the token limit
        " Ana anapita kusukulu. Text: another one",        # a second example starts: complete
    ]
    gen = ScriptedGenerator(replies)
    result = rada_augment(SEEDS, POOL, embedder, gen, RadaConfig(k=2, shots=1, per_seed=2, seed=0))
    assert gen.prefix == "Text:"
    assert len(result.prompts) == len(SEEDS) * 2
    # prompt j of seed i shows neighbours ranked 2j, 2j+1; the planted neighbour is the first
    first = [p for p in result.prompts if p["variant"] == 0]
    for p in first:
        assert POOL[p["retrieved"][0]] == PLANTED[p["seed"]]
        assert PLANTED[p["seed"]] in p["prompt"] and SEEDS[p["seed"]] in p["prompt"]
    second = [p for p in result.prompts if p["variant"] == 1]
    assert all(set(a["retrieved"]).isdisjoint(b["retrieved"]) for a, b in zip(first, second))
    assert result.examples == [{"text": "Lero kuli dzuwa ndipo tikupita kumunda."},
                               {"text": "Ana anapita kusukulu."}]
    assert result.parse_failures == 2
    assert result.report.copy >= 1 and result.report.duplicate >= 1
    # deterministic
    again = rada_augment(SEEDS, POOL, embedder, ScriptedGenerator(replies), RadaConfig(k=2, shots=1, per_seed=2))
    assert [p["prompt"] for p in again.prompts] == [p["prompt"] for p in result.prompts]


def test_rada_config_validation(embedder):
    with pytest.raises(ConfigError, match="k must be"):
        RadaConfig(k=0)
    with pytest.raises(ConfigError, match="shots"):
        RadaConfig(shots=-1)
    with pytest.raises(ConfigError, match="index"):
        RadaConfig(index="annoy")
    with pytest.raises(ConfigError, match="placeholders"):
        RadaConfig(template="make one {seeds}")
    with pytest.raises(ConfigError, match="pool is empty"):
        rada_augment(SEEDS, [], embedder, ScriptedGenerator(["x"]))
    with pytest.raises(ValueError, match="returned 1 texts"):
        rada_augment(SEEDS, POOL, embedder, lambda prompts, response_prefix="": ["x"])


def tiny_word_lm(words, seed=0):
    """A tiny random Llama over a word-level vocabulary: every generation decodes to words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(words)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def test_rada_end_to_end_tiny_llama_greedy(embedder):
    vocab = " ".join(SEEDS + POOL).replace(",", " ").replace(".", " ").replace("?", " ").lower().split()
    lm, tok = tiny_word_lm(vocab)
    # random weights never emit EOS: accept examples cut at the token limit
    cfg = RadaConfig(k=2, shots=1, per_seed=1, require_complete=False, filter=FilterConfig(min_words=2))

    def run():
        return rada_augment(SEEDS, POOL, embedder, HFGenerator(lm, tok, max_new_tokens=8), cfg)

    first, second = run(), run()
    assert first.raw == second.raw and first.examples == second.examples  # greedy: deterministic
    assert len(first.raw) == len(SEEDS)
    assert first.examples, first.summary()
    for ex in first.examples:
        assert set(ex) == {"text"} and 2 <= len(ex["text"].split()) <= 8
        assert ex["text"] not in SEEDS + POOL
    texts = [ex["text"] for ex in first.examples]
    assert dedup(texts, threshold=0.8) == list(range(len(texts)))  # nothing left to deduplicate
    r = first.report
    assert r.kept == len(first.examples)
    assert r.candidates == len(first.raw) - first.parse_failures
    assert r.candidates == r.too_short + r.too_long + r.charset + r.check + r.copy + r.duplicate + r.kept


def test_hf_generator_sampling_is_seeded_and_chat_template_used():
    lm, tok = tiny_word_lm(["a", "b", "c", "d", "e", "f", "g", "h"])
    state = torch.random.get_rng_state()
    one = HFGenerator(lm, tok, max_new_tokens=6, temperature=1.0, seed=3)(["a b", "c d"])
    two = HFGenerator(lm, tok, max_new_tokens=6, temperature=1.0, seed=3)(["a b", "c d"])
    assert one == two and torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    gen = HFGenerator(lm, tok)
    assert gen.chat and gen.format("hi", "Text:") == "<user>hi<assistant>Text:"
    assert not HFGenerator(lm, tok, use_chat_template=False).chat
    with pytest.raises(ConfigError, match="temperature"):
        HFGenerator(lm, tok, temperature=-1)


def test_hf_generator_marks_responses_that_ended_with_eos():
    lm, tok = tiny_word_lm(["a", "b", "c", "d", "e", "f", "g", "h"])
    gen = HFGenerator(lm, tok, max_new_tokens=4)
    cut = gen(["a b c"])[0]
    assert not cut.endswith("\n\n")  # stopped by max_new_tokens
    first = tok.convert_tokens_to_ids(cut.split()[0])
    lm.generation_config.eos_token_id = first  # now the model "finishes" at once
    done = gen(["a b c"])[0]
    assert done.endswith("\n\n") and done.split() == cut.split()[:1]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        HFGenerator(lm, tok, max_new_tokens=0)


def test_augment_files(tmp_path, embedder):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"text": s}) for s in SEEDS) + "\n")
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(POOL) + "\n\n")
    out = tmp_path / "out" / "aug.jsonl"
    summary = augment_files(seeds, [pool], out, RadaConfig(k=1, shots=0), embedder=embedder,
                            generator=ScriptedGenerator([" Lero kuli dzuwa ndipo tikupita kumunda.\n\n"]))
    assert summary["seeds"] == 3 and summary["pool"] == len(POOL) and summary["kept"] == 1
    assert read_records(out) == [{"text": "Lero kuli dzuwa ndipo tikupita kumunda."}]
    assert json.loads((out.parent / "aug.jsonl.report.json").read_text())["prompts"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        read_records(bad)


# ----------------------------------------------------------------------------- de-domaining

FRAMES = ["can you tell me about the {}? please help, thank you.",
          "i have a question about the {} and the {} today.",
          "my friend said the {} was good, so i asked again.",
          "what do you think about the {}? it is important to me."]
DOMAIN_WORDS = {"medical": ["insulin", "glucose", "clinic"], "travel": ["passport", "flight", "hotel"],
                "food": ["dessert", "soup", "waiter"]}


def domain_corpora():
    out = {}
    for name, terms in DOMAIN_WORDS.items():
        out[name] = [f.format(*[terms[(i + j) % 3] for j in range(f.count("{}"))])
                     for i in range(12) for f in FRAMES]
    return out


def test_domain_terms_finds_planted_terms_not_common_words():
    corpora = domain_corpora()
    background = corpora["travel"] + corpora["food"]
    terms = domain_terms(corpora["medical"], background)
    assert set(terms) == {"insulin", "glucose", "clinic"}
    assert all(z > 2.58 for z in terms.values())
    assert list(domain_terms(corpora["medical"], background, DeDomainConfig(max_terms=1))) == [max(terms, key=terms.get)]
    assert "clinic" not in domain_terms(corpora["medical"], background, DeDomainConfig(keep_words=frozenset({"clinic"})))


def test_dedomain_replaces_whole_words_and_phrases():
    text = "The Insulin pump and insulins; glucose meter."
    assert dedomain(text, ["insulin", "glucose meter"]) == "The <term> pump and insulins; <term>."
    assert dedomain(text, []) == text
    assert dedomain("a blood test", ["blood test"], placeholder="[X]") == "a [X]"


def test_two_stage_datasets():
    corpora = domain_corpora()
    corpora["medical"] = corpora["medical"] + [{"question": "is insulin safe?", "answer": "ask the clinic"}]
    data = two_stage_datasets(corpora, target="medical", lexicon={"medical": ["blood test"]})
    assert data.stage2 == corpora["medical"]
    assert len(data.stage1) == sum(len(v) for v in corpora.values())
    flat = " ".join(x if isinstance(x, str) else " ".join(x.values()) for x in data.stage1)
    for terms in DOMAIN_WORDS.values():
        assert not any(t in flat.split() or f"{t}?" in flat for t in terms)
    assert "the" in flat.split() and "please" in flat.split() and "<term>" in flat
    assert {"question": "is <term> safe?", "answer": "ask the <term>"} in data.stage1
    assert data.terms["medical"]["blood test"] == float("inf")
    with pytest.raises(ConfigError, match="target domain 'law'"):
        two_stage_datasets(corpora, target="law")
    with pytest.raises(ConfigError, match="unknown domains"):
        two_stage_datasets(corpora, target="food", lexicon={"law": ["court"]})
    with pytest.raises(ConfigError, match="min_count"):
        DeDomainConfig(min_count=0)
    with pytest.raises(ConfigError, match="placeholder"):
        DeDomainConfig(placeholder="")


# ----------------------------------------------------------------------------- dedup + filters


@pytest.mark.parametrize("backend", DEDUP_BACKENDS)
def test_dedup_removes_planted_near_duplicates(backend):
    texts = [
        "The river flows quietly past the old mill at dawn.",
        "the river  flows quietly past the OLD mill at dawn.",   # exact after normalisation
        "The river flows quietly past the old mill at dusk.",    # near duplicate
        "Children played football in the dusty village square.",
        "Children played football in the dusty village square!",  # near duplicate
        "A completely different sentence about mountains.",
    ]
    assert dedup(texts, threshold=0.8, backend=backend) == [0, 3, 5]
    assert dedup(texts, threshold=1.0, backend=backend) == [0, 2, 3, 4, 5]  # exact duplicates only
    with pytest.raises(ConfigError, match="threshold"):
        dedup(texts, threshold=0.0)


def test_charset_and_filters():
    assert charset_ok("Ndili bwino, zikomo.")
    assert not charset_ok("\ufffd\ufffd abc")
    assert not charset_ok("12345 !!! ???")
    assert not charset_ok("   ")
    assert charset_ok("Привет мир", scripts=("CYRILLIC",)) and not charset_ok("Привет world", scripts=("CYRILLIC",))
    cands = [{"text": "hi"}, {"text": "one two three four"}, {"text": "%%%% $$$$ 1234"},
             {"text": "seed sentence copied here"}, {"text": "a fresh new example here"},
             {"text": "a fresh new example here!"}, {"text": "banned word inside text"},
             {"text": " ".join(["long"] * 30)}]
    cfg = FilterConfig(min_words=2, max_words=20, checks=(lambda t: "banned" not in t,))
    kept, report = filter_generated(cands, [{"text": "Seed sentence copied here."}], cfg)
    assert kept == [{"text": "one two three four"}, {"text": "a fresh new example here"}]
    assert report.as_dict() == {"candidates": 8, "too_short": 1, "too_long": 1, "charset": 1, "check": 1,
                                "copy": 1, "duplicate": 1, "kept": 2}
    with pytest.raises(ConfigError, match="min_words"):
        FilterConfig(min_words=5, max_words=2)
    with pytest.raises(ConfigError, match="copy_threshold"):
        FilterConfig(copy_threshold=0)
    with pytest.raises(ConfigError, match="backend"):
        FilterConfig(backend="simhash")
