"""Federated LoRA on BBC News with MiniLM-L6: FLoRA vs FedAvg-of-factors vs centralised LoRA.

What is run
-----------
K clients (default 4) hold a non-IID split of the BBC News training set (Dirichlet label
skew, α = 0.5): each client sees mostly one or two of the five topics. Every round each
client trains its LoRA (all linear layers, plus the classifier head in full) for
``--local-steps`` AdamW steps, then the server aggregates. After every round the global
model is evaluated on the full BBC News test set (426 articles, accuracy).

    flora-het        FLoRA stacking, heterogeneous ranks (default 4, 8, 16, 8): W += Σ p_k B_k A_k
    flora-het-sparse the same with CELLM top-k uploads (10% of entries, error feedback)
    fedavg-delta-het exact average of the updates, FlexLoRA-style truncated re-init per client
    flora-r8         FLoRA with every client at rank 8
    fedavg-r8        FedIT: average A and B separately (needs equal ranks; cross terms included)
    centralised-r8   one LoRA (r = 8) on the pooled data, the same number of gradient steps
                     and examples per round as all clients together (K · local_steps), no
                     federation: the upper reference

Bytes are counted per round on the wire as ``lorakit.ops.aggregate.bytes_of`` sizes them:
``bytes_up`` (what clients send; sparse = values + int32 indices), ``bytes_up_dense`` (the
same updates sent dense) and ``bytes_down`` (what clients download before the round).

Run (about 25 min on 2 CPU cores):
    PYTHONPATH=src .venv/bin/python benchmarks/federated.py
    PYTHONPATH=src .venv/bin/python benchmarks/federated.py --rounds 2 --variants flora-het,fedavg-r8

Prints a table and writes benchmarks/results/federated.json (per-variant, per-round accuracy,
train loss and bytes) and federated.png (accuracy and upload bytes per round).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data import bbc_news
from lorakit.evaluate import evaluate_classifier
from lorakit.federated import dirichlet_split, run_federation
from lorakit.methods.lora import LoraConfig
from lorakit.models import load_model

# variant -> (strategy, heterogeneous ranks, sparse uploads); None = centralised
VARIANTS = {
    "flora-het": ("flora", True, False),
    "flora-het-sparse": ("flora", True, True),
    "fedavg-delta-het": ("fedavg-delta", True, False),
    "flora-r8": ("flora", False, False),
    "fedavg-r8": ("fedavg", False, False),
    "centralised-r8": None,
}
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--ranks", default="4,8,16,8", help="heterogeneous ranks, one per client")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dirichlet", type=float, default=0.5)
    p.add_argument("--sparse", type=float, default=0.1, help="top-k fraction for the -sparse variant")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(RESULTS / "federated.json"))
    args = p.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if len(args.ranks) != args.clients:
        p.error(f"--ranks gives {len(args.ranks)} ranks for {args.clients} clients")
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    return args


def build_data(args, tok) -> tuple[list[list[dict]], list[dict], dict]:
    texts, labels, _ = bbc_news("train")
    enc = tok(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    examples = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "labels": torch.tensor(labels[i])} for i in range(len(labels))]
    parts = dirichlet_split(labels, args.clients, args.dirichlet, seed=args.seed)
    clients = [[examples[i] for i in part] for part in parts]
    skew = {k: {int(c): sum(labels[i] == c for i in part) for c in sorted(set(labels))} for k, part in enumerate(parts)}
    return clients, examples, skew


def centralised(base, examples, args, rank: int, eval_fn) -> list[dict]:
    """Plain LoRA on the pooled data; one 'round' = K * local_steps steps of batch_size."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base)
    lorakit.inject(model, LoraConfig(r=rank, alpha=16.0, target="all-linear", modules_to_save=["classifier"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(examples, batch_size=args.batch_size, shuffle=True, generator=gen)
    it = iter(loader)
    rounds = []
    for rnd in range(args.rounds):
        model.train()
        losses = []
        for _ in range(args.clients * args.local_steps):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
        rounds.append({"round": rnd, "train_loss": sum(losses) / len(losses), "eval": eval_fn(model),
                       "bytes_up": 0, "bytes_up_dense": 0, "bytes_down": 0})
    return rounds


def run_variant(name: str, base, clients, examples, args, eval_fn) -> dict:
    t0 = time.perf_counter()
    if VARIANTS[name] is None:
        rounds = centralised(base, examples, args, 8, eval_fn)
    else:
        strategy, het, sparse = VARIANTS[name]
        history = run_federation(
            lambda: copy.deepcopy(base), clients, args.ranks if het else [8] * args.clients, args.rounds,
            strategy=strategy, local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
            sparse=args.sparse if sparse else None, seed=args.seed,
            modules_to_save=["classifier"], eval_fn=eval_fn,
        )
        rounds = []
        for r in history.rounds:
            losses = list(r["train_loss"].values())
            rounds.append({"round": r["round"], "train_loss": sum(losses) / len(losses), "eval": r.get("eval"),
                           "bytes_up": r["bytes_up"], "bytes_up_dense": r["bytes_up_dense"],
                           "bytes_down": r["bytes_down"], "accepted": r["accepted"]})
    return {"variant": name, "seconds": time.perf_counter() - t0, "rounds": rounds,
            "final_accuracy": rounds[-1]["eval"]["accuracy"],
            "best_accuracy": max(r["eval"]["accuracy"] for r in rounds)}


def table(results: list[dict]) -> str:
    rounds = len(results[0]["rounds"])
    head = "| variant | " + " | ".join(f"acc r{i + 1}" for i in range(rounds)) + \
        " | MB up / round | MB up dense / round | MB down / round | time (s) |"
    lines = [head, "|" + "---|" * (rounds + 5)]
    for res in results:
        rs = res["rounds"]
        mb = {key: sum(r[key] for r in rs) / len(rs) / 1e6 for key in ("bytes_up", "bytes_up_dense", "bytes_down")}
        accs = " | ".join(f"{r['eval']['accuracy'] * 100:.1f}" for r in rs)
        lines.append(f"| {res['variant']} | {accs} | {mb['bytes_up']:.2f} | {mb['bytes_up_dense']:.2f} | "
                     f"{mb['bytes_down']:.2f} | {res['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        xs = [r["round"] + 1 for r in res["rounds"]]
        ax1.plot(xs, [r["eval"]["accuracy"] * 100 for r in res["rounds"]], marker="o", label=res["variant"])
        if not res["variant"].startswith("centralised"):
            ax2.plot(xs, [r["bytes_up"] / 1e6 for r in res["rounds"]], marker="o", label=res["variant"])
    ax1.set(xlabel="round", ylabel="BBC News test accuracy (%)", title="Global model after each round")
    ax2.set(xlabel="round", ylabel="MB uploaded (all clients)", title="Upload per round", yscale="log")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    base, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    base.eval()
    clients, examples, skew = build_data(args, tok)
    test_texts, test_labels, _ = bbc_news("test")

    def eval_fn(model):
        return evaluate_classifier(model, tok, test_texts, test_labels, max_length=args.max_length)

    print(f"{args.clients} clients, sizes {[len(c) for c in clients]}, label counts per client {skew}")
    results = []
    for name in args.variants:
        print(f"== {name}", flush=True)
        res = run_variant(name, base, clients, examples, args, eval_fn)
        print("   accuracy per round:", [round(r["eval"]["accuracy"] * 100, 1) for r in res["rounds"]],
              f"({res['seconds']:.0f} s)", flush=True)
        results.append(res)
    print(table(results))
    by = {r["variant"]: r for r in results}
    summary = {k: by[k]["final_accuracy"] for k in by}
    if "flora-het" in by and "flora-het-sparse" in by:
        dense = sum(r["bytes_up"] for r in by["flora-het"]["rounds"])
        sparse = sum(r["bytes_up"] for r in by["flora-het-sparse"]["rounds"])
        summary["sparse_upload_ratio"] = sparse / dense
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "federated", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "client_sizes": [len(c) for c in clients], "client_label_counts": skew,
               "final_accuracy": summary, "results": results}
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
