"""IrokoBench-style evaluation runner: task files, scoring rules, modes, reports, built-in tasks."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.lang import evalsuite as es
from tests.conftest import randomize, tiny_llama, tiny_tokenizer

GOOD = ["sun", "moon", "star", "rain"]  # the gold options are always one of these
BAD = ["rock", "tree", "fish", "bird"]  # distractors
OTHER = ["what", "shines", "falls", "the", "sky", "at", "night", "dzuwa", "mwezi", "Answer:", "is", "B:"]


def word_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "<pad>", *GOOD, *BAD, *OTHER])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<pad>")


class Planted(nn.Module):
    """logits = prior + bonus * [token already in the input] (a context-copying toy LM)."""

    def __init__(self, tok, prior: dict[str, float], copy_bonus: float = 0.0):
        super().__init__()
        self.vocab = tok.get_vocab()
        self.bias = nn.Parameter(torch.zeros(len(self.vocab)), requires_grad=False)
        with torch.no_grad():
            for w, v in prior.items():
                self.bias[self.vocab[w]] = v
        self.copy_bonus = copy_bonus
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        seen = torch.zeros(b, t, len(self.vocab))
        seen.scatter_(2, input_ids[:, :, None], 1.0)
        seen = seen.cumsum(1).clamp(max=1)
        return SimpleNamespace(logits=self.bias + self.copy_bonus * seen)


def mc_lines(n=8):
    lines = []
    for i in range(n):
        gold = GOOD[i % 4]
        choices = [BAD[(i + j) % 4] for j in range(3)]
        choices.insert(i % 4, gold)  # gold at every position
        line = {"id": f"q{i}", "lang": "nya" if i % 2 else "eng", "prompt": f"what shines {gold} Answer:",
                "choices": choices, "answer": i % 4}
        if i < 6:
            line |= {"prompt_en": "what shines Answer:", "choices_en": choices}
        lines.append(line)
    return lines


def write(tmp_path, lines, name="task.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return f


# --------------------------------------------------------------------------- scoring


def test_a_model_that_prefers_the_gold_words_scores_one_and_its_opposite_zero(tmp_path):
    tok = word_tok()
    task = es.load_task(write(tmp_path, mc_lines()))
    good = Planted(tok, {w: 5.0 for w in GOOD})
    report = es.run_suite(good, tok, [task])
    rows = report["results"]
    assert {(r["lang"], r["mode"]) for r in rows} == {(lang, m) for lang in ("eng", "nya") for m in es.MODES}
    assert all(r["acc"] == 1.0 and r["acc_norm"] == 1.0 for r in rows)
    assert sum(r["n"] for r in rows if r["mode"] == "in-language") == 8
    assert sum(r["n"] for r in rows if r["mode"] == "translate-test") == 6  # items with English fields only
    bad = Planted(tok, {w: 5.0 for w in BAD})
    assert all(r["acc"] == 0.0 for r in es.run_suite(bad, tok, [task])["results"])
    assert report["summary"] == {"in-language": 1.0, "translate-test": 1.0}
    assert all(r["chance"] == 0.25 for r in rows)


def test_pmi_removes_the_unconditional_prior():
    tok = word_tok()
    # "rock" is likely everywhere (prior 3); the gold word is in the prompt (copy bonus 2)
    items = [es.Item(f"i{k}", "nya", "mc", f"the sky {g} Answer:", ("rock", g), 1, uncond="Answer:")
             for k, g in enumerate(GOOD)]
    task = es.Task("pmi", items)
    model = Planted(tok, {"rock": 3.0}, copy_bonus=2.0)
    [row] = es.evaluate_task(model, tok, task, modes=["in-language"], pmi=True)
    assert row["acc"] == 0.0  # raw likelihood follows the prior
    assert row["acc_pmi"] == 1.0  # LL(y|c) - LL(y|u) follows the context


def test_loglikelihoods_match_a_manual_computation_and_ignore_batching():
    tok = tiny_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))
    pairs = [("Moni, muli", " bwanji?"), ("The quick brown", " fox jumps"), ("", "Zikomo"), ("Moni, muli ", "bwanji?")]
    ll = es.loglikelihoods(model, tok, pairs, batch_size=3)
    ids = [tok.bos_token_id] + tok("Moni, muli bwanji?", add_special_tokens=False)["input_ids"]
    n_ctx = 1 + len(tok("Moni, muli", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    manual = sum(float(lp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
    assert ll[0][1] == len(ids) - n_ctx
    assert ll[0][0] == pytest.approx(manual, abs=1e-5)
    assert ll[3][0] == pytest.approx(ll[0][0], abs=1e-6)  # a trailing space moves to the continuation
    one = es.loglikelihoods(model, tok, pairs, batch_size=1)
    assert [n for _, n in one] == [n for _, n in ll]
    assert [v for v, _ in one] == pytest.approx([v for v, _ in ll], abs=1e-5)
    assert all(v < 0 for v, _ in ll)


def test_scores_on_a_tiny_lm_are_deterministic_and_in_range(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))
    lines = [{"lang": "nya", "prompt": "Moni, muli", "choices": ["bwanji?", "zikomo", "kwambiri", "dziko"],
              "answer": k % 4, "prompt_en": "Hello, how", "choices_en": ["are you?", "thanks", "very", "world"]}
             for k in range(6)]
    lines += [{"lang": "eng", "prompt": f"The quick {w}", "label": lab, "labels": ["fox", "dog"]}
              for w, lab in (("brown", "fox"), ("lazy", "dog"), ("red", "fox"))]
    f = write(tmp_path, lines)
    a = es.run_suite(model, tok, [f], shots=1, pmi=True)
    b = es.run_suite(model, tok, [f], shots=1, pmi=True, batch_size=1)
    assert a["results"] == b["results"]
    for r in a["results"]:
        for k in ("acc", "acc_norm", "acc_pmi", "chance"):
            assert 0.0 <= r[k] <= 1.0
    assert {r["type"] for r in a["results"]} == {"mc", "cls"}
    # an adapter changes the model, so its scores come from the adapted model
    lorakit.inject(model, lorakit.LoraConfig(r=2, target="all-linear"))
    randomize(model, std=0.5)
    ll_base = es.loglikelihoods(tiny_llama_resized(tok), tok, [("Moni", " muli")])
    ll_adapted = es.loglikelihoods(model, tok, [("Moni", " muli")])
    assert ll_base != ll_adapted


def tiny_llama_resized(tok):
    m = tiny_llama()
    m.resize_token_embeddings(len(tok))
    return m


def test_generation_exact_match_and_number_extraction(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama_resized(tok)
    prompt = "Moni, muli"
    [out] = es._generate(model, tok, [prompt], max_new_tokens=6)
    assert out and "\n" not in out
    f = write(tmp_path, [{"id": "right", "prompt": prompt, "answer": f"  {out.upper()} ", "lang": "nya"},
                         {"id": "wrong", "prompt": prompt, "answer": out + " extra", "lang": "eng"}])
    report = es.run_suite(model, tok, [f], max_new_tokens=6)
    by_lang = {r["lang"]: r for r in report["results"]}
    assert by_lang["nya"]["exact_match"] == 1.0 and by_lang["eng"]["exact_match"] == 0.0
    assert by_lang["nya"]["outputs"][0]["output"] == out
    assert es._correct_gen("so she has 1,234 apples", "1234", "number")
    assert es._correct_gen("= 12.0", "The answer is 12", "number")
    assert not es._correct_gen("12 or 13", "12", "number")  # the LAST number counts
    assert not es._correct_gen("no idea", "12", "number")
    assert es._correct_gen("Zikomo!", "zikomo", "exact") and not es._correct_gen("zikomo kwambiri", "zikomo", "exact")
    with pytest.raises(ConfigError, match="cannot generate"):
        es.run_suite(Planted(word_tok(), {}), word_tok(), [f])


def test_demonstrations_come_from_other_items_of_the_same_language():
    items = [es.Item(f"i{k}", "nya" if k < 3 else "eng", "mc", f"p{k}", ("a", "b"), k % 2) for k in range(5)]
    demo = es._demos(items, items[0], "in-language", 2, seed=0)
    assert demo.count("\n\n") == 2 and "p0" not in demo and "p3" not in demo
    assert "p1 b" in demo and "p2 a" in demo


# --------------------------------------------------------------------------- files and errors


BAD_FILES = [
    (['{"prompt": "x", "choices": ["a", "b"], "answer": 0}', "not json"], r"task.jsonl:2: invalid JSON"),
    ([{"prompt": "x", "choices": ["a", "b"], "answer": 2}], r":1: 'answer' must be a choice index in \[0, 2\)"),
    ([{"prompt": "x", "choices": ["a", "b"], "answer": "c"}], "is not one of the choices"),
    ([{"prompt": "x", "choices": ["a"], "answer": 0}], "at least 2 non-empty strings"),
    ([{"prompt": "x", "choices": ["a", "a"], "answer": 0}], "repeats an option"),
    ([{"choices": ["a", "b"], "answer": 0}], "missing 'prompt'"),
    ([{"prompt": "x", "choices": ["a", "b"], "answer": 0, "colour": 1}], r"unknown keys \['colour'\]"),
    ([{"prompt": "x", "choices": ["a", "b"], "answer": 0, "choices_en": ["a", "b", "c"]}], "has 3 options"),
    ([{"prompt": "x", "label": "yes"}], "at least 2 labels"),
    ([{"prompt": "x", "label": "yes", "labels": ["no", "maybe"]}], "label 'yes' is not one of"),
    ([{"prompt": "x", "answer": "seven", "match": "number"}], "holds no number"),
    ([{"prompt": "x", "answer": "7", "type": "gen", "choices": ["a", "b"]}], "takes no 'choices'"),
    ([{"prompt": "x", "answer": "7", "match": "fuzzy"}], "match must be one of"),
    ([{"prompt": "x"}], "cannot tell the task type"),
    ([{"prompt": "x", "answer": 1, "type": "essay"}], "type must be one of"),
    ([[1, 2]], "must be a JSON object"),
    ([""], "holds no items"),
]


@pytest.mark.parametrize("lines,match", BAD_FILES)
def test_bad_task_files_give_errors_naming_file_and_line(tmp_path, lines, match):
    with pytest.raises(ConfigError, match=match):
        es.load_task(write(tmp_path, lines))


def test_bad_arguments(tmp_path):
    tok = word_tok()
    model = Planted(tok, {})
    with pytest.raises(ConfigError, match="task file not found"):
        es.run_suite(model, tok, [tmp_path / "missing.jsonl"])
    with pytest.raises(ConfigError, match="neither a built-in task"):
        es.run_suite(model, tok, ["no-such-task"])
    with pytest.raises(ConfigError, match="at least one task"):
        es.run_suite(model, tok, [])
    f = write(tmp_path, mc_lines())
    with pytest.raises(ConfigError, match="mode must be one of"):
        es.run_suite(model, tok, [f], modes=["back-translate"])
    with pytest.raises(ConfigError, match="shots"):
        es.run_suite(model, tok, [f], shots=-1)
    with pytest.raises(ConfigError, match="share a name"):
        es.run_suite(model, tok, [f, f])
    with pytest.raises(ConfigError, match="unknown built-in"):
        es.builtin_task("xnli")
    with pytest.raises(ConfigError, match="not supported"):
        es.builtin_task("dialog-reply", langs=["klingon"])


def test_report_json_and_table(tmp_path):
    tok = word_tok()
    task = es.load_task(write(tmp_path, mc_lines()[6:]))  # no English fields: translate-test is n/a
    report = es.run_suite(Planted(tok, {w: 5.0 for w in GOOD}), tok, [task], model_name="planted")
    out = es.write_report(report, tmp_path / "out" / "suite.json")
    assert json.loads(out.read_text())["summary"] == {"in-language": 1.0}
    table = out.with_suffix(".md").read_text()
    assert "| task | type | lang | n | in-language | translate-test | chance |" in table
    assert "| task | mc | eng | 1 | 1.000 | n/a | 0.250 |" in table


# --------------------------------------------------------------------------- built-in tasks


@pytest.mark.integration
def test_builtin_bible_tasks_are_well_formed():
    from lorakit.data.bible import HELDOUT_BOOKS, parallel_verses

    pairs = parallel_verses(list(HELDOUT_BOOKS))
    english = {f"{en.book} {en.chapter}:{en.verse}": en.text for _, en in pairs}
    match = es.builtin_task("bible-match")
    assert len(match.items) == len(pairs)
    for it in match.items:
        assert len(set(it.choices)) == 4 and it.choices[it.answer] == english[it.id]
        assert it.prompt.startswith("Chichewa: ") and it.prompt_en is None
    golds = [it.answer for it in match.items]
    assert set(golds) == {0, 1, 2, 3}  # the gold position is shuffled
    nxt = es.builtin_task("bible-next-verse", limit=50)
    assert len(nxt.items) == 50 and all(it.view("translate-test") is not None for it in nxt.items)
    ny = {f"{v.book} {v.chapter}:{v.verse}": (v.text, en.text) for v, en in pairs}
    for it in nxt.items:
        book_ch, verse = it.id.rsplit(":", 1)
        nxt_ny, nxt_en = ny[f"{book_ch}:{int(verse) + 1}"]
        assert it.choices[it.answer] == nxt_ny and it.choices_en[it.answer] == nxt_en
    assert es.builtin_task("bible-next-verse", limit=50).items == nxt.items  # seeded


@pytest.mark.integration
def test_builtin_dialog_and_bbc_tasks():
    dialog = es.builtin_task("dialog-reply", limit=5, langs=["english", "yoruba"])
    assert {it.lang for it in dialog.items} == {"eng", "yor"} and len(dialog.items) == 10
    bbc = es.builtin_task("bbc-topic", limit=20)
    assert len(bbc.items) == 20 and all(it.type == "cls" and len(it.choices) == 5 for it in bbc.items)
