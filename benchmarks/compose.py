"""Composing trained task adapters: every merge method and the mixtures, on all tasks at once.

What is run
-----------
SmolLM2-135M-Instruct gets one LoRA per task (r 8, alpha 16, every linear layer of the blocks,
AdamW lr 1e-3 with linear warm-up and decay, ``--steps`` steps of ``--batch`` examples of at
most 256 tokens, seed 0), on four tasks built from packaged data:

    chichewa   Chichewa Bible text (LM)                 bits per byte, held-out books       lower is better
    translate  English -> Chichewa verse translation    bits per byte of the answer,        lower
                                                        held-out books
    chat       chatterbot-corpus English dialog         bits per byte of the answer,        lower
                                                        held-out pairs
    topic      BBC News article -> its topic word       accuracy: the label with the least  higher
                                                        NLL among the 5 topics

Then each composition is evaluated on all four tasks with one set of weights and no task id
at test time (only the ``individual`` row uses the task's own adapter):

    base              no adapter
    individual        each task scored with its own adapter: the reference
    <task> LoRA       one task's adapter on every task (the transfer matrix)
    merges            ``lorakit.compose.merge_adapters`` of the four adapters (PEFT-format LoRA out):
                      linear (the average, w = 1/n), task_arithmetic (lambda = 0.5 each), cat
                      (the exact sum, w = 1, rank sum r_i), svd (the sum truncated to rank r),
                      ties / dare_ties / dare_linear / magnitude_prune (w = 1, density ``--density``,
                      ties ``--ties-density``; output rank sum r_i)
    meteora           MeteoRA (``methods.meteora.from_adapters``): the four LoRAs frozen in one
                      tensor per layer, a per-token top-2 gate trained ``--gate-steps`` steps on the
                      union of the training sets with task labels (gate loss coefficient 50)
    library top-1/2   K-shot selection (``compose.library.select_from_library``, K = ``--kshot``
                      training examples of the task at hand): per task, the best adapter / the
                      average of the two best by K-shot likelihood (and accuracy for topic)
    multitask         one LoRA trained on the union of the four training sets for n x ``--steps``
                      steps: joint training with the data, the bar composition tries to reach
                      without it

The normalised score of a row on a task is (metric - base) / (own adapter - base): 1 = as good
as that task's own adapter, 0 = no better than the base model; ``mean`` averages the tasks.

Latency: milliseconds per generated token (greedy, batch 1, decode only: (t(1 + n) - t(1)) / n
for n = ``--latency-tokens``, median of ``--latency-repeats``) for the base model, one LoRA, the
merges at their ranks left unmerged, MeteoRA, and the cat merge folded into the weights.

    python benchmarks/compose.py                  # ~65 min on 2 CPU cores; writes results/compose.{json,png}
    python benchmarks/compose.py --smoke --out /tmp/compose.json
    python benchmarks/compose.py --report         # tables and plot from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import log  # noqa: E402

import lorakit  # noqa: E402
from lorakit.compose.library import LibraryConfig, select_from_library  # noqa: E402
from lorakit.compose.merge import merge_adapters  # noqa: E402
from lorakit.data.less import collate, encode_examples, lora_parameters, prompt_response, response_nll  # noqa: E402
from lorakit.methods.lora import LoraConfig  # noqa: E402
from lorakit.models import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("chichewa", "translate", "chat", "topic")
HIGHER_IS_BETTER = {"chichewa": False, "translate": False, "chat": False, "topic": True}
METRIC = {"chichewa": "bpb", "translate": "bpb", "chat": "bpb", "topic": "acc"}
MERGES = ("linear", "task_arithmetic", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
TOPIC_PROMPT = ("What is the topic of this news article? Answer with one word: business, entertainment, "
                "politics, sport or tech.")
LATENCY_PROMPT = "Write a short note about the weather in Lilongwe today and what people should wear."
SMOKE = {"steps": 3, "batch": 2, "n_eval": 6, "kshot": 2, "gate_steps": 2, "multitask_steps": 3,
         "latency_tokens": 4, "latency_repeats": 1, "chunk_chars": 120}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per task adapter")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256, help="training tokens per example (responses must fit)")
    p.add_argument("--chunk-chars", type=int, default=240, help="characters per Chichewa LM example")
    p.add_argument("--n-eval", type=int, default=64, help="held-out examples per task")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--density", type=float, default=0.5, help="dare_* / magnitude_prune: fraction kept")
    p.add_argument("--ties-density", type=float, default=0.2, help="TIES: fraction kept (the paper's k = 20%%)")
    p.add_argument("--gate-steps", type=int, default=40, help="MeteoRA gate training steps")
    p.add_argument("--gate-lr", type=float, default=2e-3)
    p.add_argument("--kshot", type=int, default=5)
    p.add_argument("--multitask-steps", type=int, default=0, help="0 = n_tasks x --steps; -1 = skip the row")
    p.add_argument("--latency-tokens", type=int, default=32)
    p.add_argument("--latency-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "compose.json"))
    p.add_argument("--report", action="store_true", help="only print the table and redraw the plot from --out")
    p.add_argument("--smoke", action="store_true", help="tiny settings that exercise every code path")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = sorted(set(a.tasks) - set(TASKS))
    if unknown or len(a.tasks) < 2:
        p.error(f"--tasks: need at least two of {TASKS}, got {a.tasks}")
    if a.multitask_steps == 0:
        a.multitask_steps = len(a.tasks) * a.steps
    return a


# ----------------------------------------------------------------------------------- data
def chunks(texts: list[str], chars: int) -> list[str]:
    """Cut texts into pieces of at most `chars` characters at word boundaries."""
    out = []
    for text in texts:
        cur = ""
        for w in text.split():
            if cur and len(cur) + 1 + len(w) > chars:
                out.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        if cur:
            out.append(cur)
    return out


def spread(items: list, n: int) -> list:
    """n items spread evenly over the list (all when it is shorter)."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def task_data(task: str, a: argparse.Namespace) -> dict:
    """{"train": items, "eval": items, "labels": topic words (topic only)}; items as
    `lorakit.data.less.encode_examples` takes them (strings or records)."""
    if task == "chichewa":
        from lorakit.data.bible import chichewa_split

        train, held = chichewa_split()
        return {"train": chunks(train, a.chunk_chars), "eval": spread(chunks(held, a.chunk_chars), a.n_eval)}
    if task == "translate":
        from lorakit.data.instructions import bible_translation_records

        return {"train": bible_translation_records("en-ny", "train", seed=a.seed),
                "eval": spread(bible_translation_records("en-ny", "test", seed=a.seed), a.n_eval)}
    if task == "chat":
        from lorakit.data.instructions import chatterbot_records

        recs = chatterbot_records("english", seed=a.seed)  # seeded order: the last fifth is held out
        cut = len(recs) - len(recs) // 5
        return {"train": recs[:cut], "eval": spread(recs[cut:], a.n_eval)}
    if task == "topic":
        from lorakit.data import bbc_news
        from lorakit.transfer.benchmark import snippet

        def recs(split):
            texts, labels, names = bbc_news(split)
            return [{"instruction": TOPIC_PROMPT, "input": snippet(t, 400), "output": names[y]}
                    for t, y in zip(texts, labels)], names

        train, names = recs("train")
        held, _ = recs("test")
        return {"train": train, "eval": spread(held, a.n_eval), "labels": list(names)}
    raise ValueError(task)


def trainable(encoded: list[dict], task: str) -> list[dict]:
    """Drop examples whose response was cut off entirely by --max-length (no label token)."""
    keep = [e for e in encoded if bool((e["labels"][1:] != -100).any())]
    if len(keep) < len(encoded):
        log(f"{task}: {len(encoded) - len(keep)} of {len(encoded)} training examples have no response token "
            "within --max-length; left out")
    if not keep:
        raise SystemExit(f"{task}: no training example fits --max-length")
    return keep


def encoded_eval(tok, task: str, data: dict) -> dict:
    """Encoded held-out examples (never truncated) and what each metric divides by."""
    items = data["eval"]
    if task == "topic":
        labels = data["labels"]
        choices = [{**r, "output": lab} for r in items for lab in labels]
        answer = torch.tensor([labels.index(r["output"]) for r in items])
        return {"choices": _encode_whole(tok, choices), "answer": answer, "n_labels": len(labels)}
    nbytes = sum(len(prompt_response(it, tok)[1].encode("utf-8")) for it in items)
    return {"gold": _encode_whole(tok, items), "bytes": nbytes}


def _encode_whole(tok, items: list) -> list[dict]:
    limit = 1024
    enc = encode_examples(tok, items, max_length=limit)
    if any(len(e["input_ids"]) >= limit for e in enc):
        raise ValueError(f"an evaluation example reached {limit} tokens; its metric would be cut")
    return enc


def evaluate(model, task: str, ev: dict, batch: int) -> float:
    """bits per byte of the responses (chichewa / translate / chat) or topic accuracy."""
    model.eval()
    if task == "topic":
        sums, _ = response_nll(model, ev["choices"], batch)
        pred = sums.view(-1, ev["n_labels"]).argmin(1)
        return float((pred == ev["answer"]).double().mean())
    sums, _ = response_nll(model, ev["gold"], batch)
    return float(sums.sum() / (math.log(2) * ev["bytes"]))


# ------------------------------------------------------------------------------- training
def train_steps(model, params: list, batches, steps: int, lr: float, on_batch=None) -> list[float]:
    """AdamW with 5% linear warm-up then linear decay; `batches(step)` gives one encoded batch."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    losses = []
    for step in range(steps):
        examples, extra = batches(step)
        batch = collate([(e["input_ids"], e["labels"]) for e in examples])
        if on_batch is None:
            loss = model(**batch).loss
        else:
            with on_batch(extra):
                loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def sampler(pools: list[list[dict]], batch: int, seed: int):
    """batches(step) -> (examples, task index per row): each row from a random pool, then a
    random example of it (one pool: plain shuffled sampling)."""
    g = torch.Generator().manual_seed(seed)

    def batches(step):
        rows = torch.randint(len(pools), (batch,), generator=g).tolist()
        ex = [pools[t][int(torch.randint(len(pools[t]), (1,), generator=g))] for t in rows]
        return ex, torch.tensor(rows)

    return batches


def train_lora(model, name: str, pools: list[list[dict]], steps: int, a) -> dict:
    torch.manual_seed(a.seed)
    lorakit.activate(model, [])
    lorakit.inject(model, LoraConfig(r=a.rank, alpha=2.0 * a.rank, target="all-linear"), name=name)
    params = list(lora_parameters(model, name).values())
    t0 = time.perf_counter()
    losses = train_steps(model, params, sampler(pools, a.batch, a.seed), steps, a.lr)
    return {"params": sum(p.numel() for p in params), "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first_last": [losses[0], sum(losses[-10:]) / len(losses[-10:])]}


# ------------------------------------------------------------------------------- latency
@torch.no_grad()
def ms_per_token(model, tok, n: int, repeats: int) -> float:
    ids = tok(LATENCY_PROMPT, return_tensors="pt")

    def run(k):
        t0 = time.perf_counter()
        model.generate(**ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t0

    run(2)  # warm-up
    times = [(run(1 + n) - run(1)) / n for _ in range(repeats)]
    return 1000.0 * statistics.median(times)


# --------------------------------------------------------------------------------- main run
def merge_settings(method: str, a, n: int) -> dict:
    if method == "linear":
        return {"weights": [1.0] * n}
    if method == "task_arithmetic":
        return {"weights": [0.5] * n}
    if method == "cat":
        return {"weights": [1.0] * n}
    if method == "svd":
        return {"weights": [1.0] * n, "rank": a.rank}
    density = a.ties_density if method == "ties" else a.density
    return {"weights": [1.0] * n, "density": density, "rank": n * a.rank, "seed": a.seed}


def adapter_rank(model, name: str) -> int:
    from lorakit.core.inject import adapter_modules

    ranks = [m.to_lora()[0].shape[0] for m in adapter_modules(model, name).values()]
    return max(ranks) if ranks else 0


def run(a: argparse.Namespace) -> dict:
    from lorakit.methods.meteora import from_adapters, task_labels

    torch.manual_seed(a.seed)
    model, tok = load_model("smollm2-135m")
    for p in model.parameters():
        p.requires_grad_(False)
    tasks = a.tasks
    data = {t: task_data(t, a) for t in tasks}
    train_enc = {t: trainable(encode_examples(tok, data[t]["train"], a.max_length), t) for t in tasks}
    evals = {t: encoded_eval(tok, t, data[t]) for t in tasks}
    log("tasks: " + ", ".join(f"{t} {len(train_enc[t])} train / {len(data[t]['eval'])} eval" for t in tasks))

    res: dict = {"tasks": tasks, "metric": {t: METRIC[t] for t in tasks}, "adapters": {}, "rows": {}, "latency": {}}
    rows = res["rows"]

    partial = Path(a.out).with_suffix(".partial.json")  # rows so far, should a later stage fail

    def score(name: str | None, label: str, kind: str, **info) -> dict:
        lorakit.activate(model, [] if name is None else [name])
        t0 = time.perf_counter()
        metrics = {t: evaluate(model, t, evals[t], a.eval_batch) for t in tasks}
        rows[label] = {"kind": kind, "metrics": metrics, **info}
        partial.write_text(json.dumps(res, indent=1, default=float) + "\n")
        log(f"{label:18s} " + "  ".join(f"{t} {v:.4f}" for t, v in metrics.items())
            + f"   ({time.perf_counter() - t0:.0f} s)")
        return metrics

    score(None, "base", "base")
    with tempfile.TemporaryDirectory(prefix="lorakit-compose-") as tmp:
        lib = Path(tmp) / "library"
        for t in tasks:
            res["adapters"][t] = train_lora(model, t, [train_enc[t]], a.steps, a)
            out = lorakit.save(model, lib / t, name=t)
            res["adapters"][t]["bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
            log(f"trained {t}: {res['adapters'][t]}")
            score(t, f"{t} LoRA", "single", rank=a.rank)
        rows["individual"] = {"kind": "individual", "rank": a.rank,
                              "metrics": {t: rows[f"{t} LoRA"]["metrics"][t] for t in tasks}}

        for method in MERGES:
            kw = merge_settings(method, a, len(tasks))
            name = f"m_{method}"
            merge_adapters(model, tasks, method=method, out_name=name, **kw)
            score(name, method, "merge", rank=adapter_rank(model, name), settings=kw)
            if method not in ("cat", "svd", "ties"):
                lorakit.delete(model, name)

        # MeteoRA: frozen experts, gate trained on the union with task labels
        from_adapters(model, [str(lib / t) for t in tasks], name="meteora", top_k=2)
        lorakit.activate(model, ["meteora"])
        gate = [p for p in lora_parameters(model, "meteora").values() if p.requires_grad]
        t0 = time.perf_counter()
        losses = train_steps(model, gate, sampler([train_enc[t] for t in tasks], a.batch, a.seed + 1),
                             a.gate_steps, a.gate_lr, on_batch=lambda rows_: task_labels(model, rows_, "meteora"))
        score("meteora", "meteora", "mixture", rank=a.rank, experts=len(tasks), top_k=2,
              gate_params=sum(p.numel() for p in gate), gate_steps=a.gate_steps,
              gate_seconds=round(time.perf_counter() - t0, 1), loss_first_last=[losses[0], losses[-1]])

        # K-shot library selection, per task
        for top_m in (1, 2):
            label = f"library top-{top_m}"
            metrics, chosen = {}, {}
            for t in tasks:
                kshot = spread(data[t]["train"], a.kshot)
                cfg = LibraryConfig(top_m=top_m, mix="merge", diversity=0.0, w_embedding=0.0,
                                    labels=data[t].get("labels"))
                sel = select_from_library(model, tok, lib, kshot, cfg, name="lib")
                chosen[t] = sel.chosen
                metrics[t] = evaluate(model, t, evals[t], a.eval_batch)
                lorakit.delete(model, "lib")
            rows[label] = {"kind": "mixture", "metrics": metrics, "chosen": chosen, "rank": top_m * a.rank,
                           "kshot": a.kshot}
            log(f"{label:18s} " + "  ".join(f"{t} {v:.4f}" for t, v in metrics.items()) + f"   chosen {chosen}")

        if a.multitask_steps > 0:
            res["adapters"]["multitask"] = train_lora(model, "multitask", [train_enc[t] for t in tasks],
                                                      a.multitask_steps, a)
            score("multitask", "multitask", "joint", rank=a.rank, steps=a.multitask_steps)

    normalise(res)
    partial.unlink(missing_ok=True)
    lat = res["latency"]
    for label, name in (("base", None), ("single LoRA", tasks[0]), ("svd", "m_svd"), ("cat", "m_cat"),
                        ("ties", "m_ties"), ("meteora", "meteora")):
        lorakit.activate(model, [] if name is None else [name])
        lat[label] = ms_per_token(model, tok, a.latency_tokens, a.latency_repeats)
        log(f"latency {label:12s} {lat[label]:.2f} ms/token")
    lorakit.activate(model, ["m_cat"])
    lorakit.merge(model, ["m_cat"])
    lat["cat merged into W"] = ms_per_token(model, tok, a.latency_tokens, a.latency_repeats)
    lorakit.unmerge(model)
    log(f"latency {'cat merged':12s} {lat['cat merged into W']:.2f} ms/token")
    res["latency_ratio_vs_lora"] = {k: v / lat["single LoRA"] for k, v in lat.items()}
    return res


def normalise(res: dict) -> None:
    base, own = res["rows"]["base"]["metrics"], res["rows"]["individual"]["metrics"]
    for row in res["rows"].values():
        norm = {}
        for t, v in row["metrics"].items():
            gap = own[t] - base[t]
            norm[t] = (v - base[t]) / gap if gap else float("nan")
        row["normalized"] = norm
        finite = [v for v in norm.values() if math.isfinite(v)]  # a task no adapter moved is left out
        row["mean_normalized"] = sum(finite) / len(finite) if finite else float("nan")


# ------------------------------------------------------------------------------ reporting
def table(res: dict) -> str:
    tasks = res["tasks"]
    head = "| row | kind | rank | " + " | ".join(f"{t} {res['metric'][t]}" for t in tasks) + " | mean normalised |"
    lines = [head, "|" + "---|" * (4 + len(tasks))]
    for label, r in res["rows"].items():
        cells = []
        for t in tasks:
            v, n = r["metrics"][t], r["normalized"][t]
            cells.append((f"{100 * v:.1f}%" if res["metric"][t] == "acc" else f"{v:.3f}") + f" ({n:+.2f})")
        lines.append(f"| {label} | {r['kind']} | {r.get('rank', '')} | " + " | ".join(cells)
                     + f" | {r['mean_normalized']:+.2f} |")
    lat = res.get("latency") or {}
    if lat:
        lines += ["", "| decode latency | ms/token | vs one LoRA |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {res['latency_ratio_vs_lora'][k]:.2f}x |" for k, v in lat.items()]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = res["tasks"]
    labels = [k for k in res["rows"] if k != "base"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        vals = [res["rows"][k]["normalized"][t] for k in labels]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=f"{t} ({res['metric'][t]})")
    ax.plot([j + 0.4 - width / 2 for j in range(len(labels))], [res["rows"][k]["mean_normalized"] for k in labels],
            "k_", markersize=14, mew=2, label="mean")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=40, ha="right", fontsize=8)
    ax.set(ylabel="normalised score (0 = base, 1 = own adapter)", title="All tasks at once, SmolLM2-135M")
    ax.set_ylim(bottom=max(-2.0, min(ax.get_ylim()[0], -0.2)))
    ax.legend(fontsize=7)
    lat = res.get("latency") or {}
    if lat:
        bx.barh(list(lat), list(lat.values()), color="tab:gray")
        bx.set(xlabel="ms per generated token (batch 1)", title="Decode latency")
        bx.invert_yaxis()
        bx.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if a.report:
        res = json.loads(out.read_text())
        normalise(res)
        print(table(res))
        plot(res, out.with_suffix(".png"))
        return 0
    t0 = time.perf_counter()
    res = run(a)
    res.update(benchmark="compose", smoke=a.smoke, seconds_total=round(time.perf_counter() - t0, 1),
               settings={k: v for k, v in vars(a).items() if k not in ("out", "report")},
               machine={"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=float) + "\n")
    os.replace(tmp, out)
    plot(res, out.with_suffix(".png"))
    print("\n" + table(res) + "\n", flush=True)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
