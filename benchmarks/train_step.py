"""One LoRA training step: lorakit vs PEFT on SmolLM2-135M (CPU), side by side.

What is measured
----------------
The wall time of one full training step -- forward + loss + backward + AdamW ``step()`` +
``zero_grad()`` -- and the peak resident memory (RSS) of the process, for:

    full-ft            all parameters trainable, HF's standard loss (reference only)
    peft-qkvo          PEFT LoRA on q/k/v/o_proj, loss = model(input_ids=x, labels=x).loss
    lorakit-qkvo       lorakit LoRA on q/k/v/o_proj, chunked loss from the hidden states
    peft-all           PEFT LoRA on every linear layer except the LM head ("all-linear")
    lorakit-all        lorakit LoRA, all-linear, chunked loss
    lorakit-all-bf16   lorakit-all under torch.autocast("cpu", dtype=torch.bfloat16)
                       (skipped, and reported so, when the CPU has no bf16 support)
    lorakit-all-compile  lorakit-all with the decoder torch.compile'd (not run by default)
    lorakit-all-eager  lorakit-all without lean activations (the model's own MLP / norm modules)

Every other lorakit row runs with lean activations (lorakit.optim.lean), as `lorakit train` does.

Same settings everywhere: r=8, alpha=16, dropout 0, a batch of 8 x 128 random token ids
(fixed seed, a new batch every step, labels = inputs), AdamW(lr=1e-4, torch defaults
otherwise). HF's loss materialises the (8*128, 49152) fp32 logits and their gradient;
lorakit's ``causal_lm_loss`` walks the LM head in row chunks and never holds them (see
``lorakit/ops/loss.py``) -- that and the adapter layers are what this compares.

Identical starting points: LoRA initialisations differ between the libraries, so after
injection every adapted module gets A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) drawn from a
generator seeded by the module's path, and B = 0, in both. A lorakit run and the PEFT run
of the same target config then follow the same loss curve up to float noise; the largest
|loss difference| over all steps is reported (``max_loss_diff``).

How (these VMs are noisy)
-------------------------
* Ratios, not absolute times: the VMs drift 10-20% over minutes, so the variants run
  interleaved, ``--rounds`` times, with the order rotated each round; a variant's time is
  the median of its per-round medians.
* Each variant runs in its own subprocess, so peak RSS belongs to that variant alone and no
  allocator state leaks between them. The parent never imports torch.
* The child copies every weight into anonymous process memory before timing: the VM evicts
  memory-mapped weight pages left idle for a few seconds, which makes single steps jump
  ~10x. It then runs ``--warmup`` untimed steps and ``--steps`` timed ones.
* Memory: ``peak_rss_mb`` is ``ru_maxrss`` of the child (whole process life, model load
  included); ``step_peak_rss_mb`` is the peak during the steps alone (Linux VmHWM, reset
  after loading through /proc/self/clear_refs), which is what the training recipe costs.
  Over rounds we report the max of each (memory is nearly deterministic).

Run:
    PYTHONPATH=src .venv/bin/python benchmarks/train_step.py                    # 3 rounds
    PYTHONPATH=src .venv/bin/python benchmarks/train_step.py --steps 2 --rounds 1 --warmup 1
    ... --variants peft-all,lorakit-all,lorakit-all-compile --chunk-size 512

Prints a table and writes benchmarks/results/train_step.json (top level: ``time_ratio`` and
``rss_ratio`` = lorakit / PEFT for all-linear, ``*_qkvo`` for q/k/v/o) plus a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from _proc import log, reset_peak_rss, vm_mb  # benchmarks/_proc.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "train_step.json"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> how the child builds it; `ref` is the PEFT row its ratios are taken against.
# alloc: the malloc the child runs with. PEFT rows run as PEFT users run them (glibc);
# lorakit rows as `lorakit train` runs them (tcmalloc when installed, see lorakit/allocator.py).
# The "-tcmalloc" / "-system" rows give the same-allocator comparison.
VARIANTS = {
    "full-ft": dict(impl="full", target=None, ref="peft-all", alloc="system"),
    "peft-qkvo": dict(impl="peft", target="qkvo", ref="peft-qkvo", alloc="system"),
    "lorakit-qkvo": dict(impl="lorakit", target="qkvo", ref="peft-qkvo", alloc="tcmalloc"),
    "peft-all": dict(impl="peft", target="all-linear", ref="peft-all", alloc="system"),
    "lorakit-all": dict(impl="lorakit", target="all-linear", ref="peft-all", alloc="tcmalloc"),
    "peft-all-tcmalloc": dict(impl="peft", target="all-linear", ref="peft-all", alloc="tcmalloc"),
    "lorakit-all-system": dict(impl="lorakit", target="all-linear", ref="peft-all", alloc="system"),
    "lorakit-all-bf16": dict(impl="lorakit", target="all-linear", ref="peft-all", bf16=True, alloc="tcmalloc"),
    "lorakit-all-compile": dict(impl="lorakit", target="all-linear", ref="peft-all", compile=True, alloc="tcmalloc"),
    "lorakit-all-eager": dict(impl="lorakit", target="all-linear", ref="peft-all", lean=False, alloc="tcmalloc"),
}
for _spec in VARIANTS.values():  # lean activations as `lorakit train` (off under torch.compile, as there)
    _spec.setdefault("lean", _spec["impl"] == "lorakit" and not _spec.get("compile"))
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "lorakit-all-compile"]
# (lorakit row, PEFT row) pairs whose loss curves must agree: same config, both fp32
LOSS_PAIRS = [("lorakit-qkvo", "peft-qkvo"), ("lorakit-all", "peft-all"), ("lorakit-all-system", "peft-all"),
              ("lorakit-all-compile", "peft-all"), ("lorakit-all-eager", "peft-all")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the variant order rotates each round")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--model", default="smollm2-135m", help="lorakit model alias or a local HF dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0 = torch's default)")
    # speed tricks for the lorakit children (all lorakit-* variants get them)
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder in every lorakit variant")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows per chunk of lorakit's loss (default: lorakit.train.DEFAULT_LOSS_CHUNK)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (a PNG is written beside it)")
    # internal: run one variant and write its JSON to this path
    p.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if a.steps < 1 or a.rounds < 1 or a.warmup < 0:
        p.error("need --steps >= 1, --rounds >= 1, --warmup >= 0")
    compiles = a.compile or any(VARIANTS[v].get("compile") for v in a.variants)
    if compiles and a.warmup < 1:
        p.error("torch.compile runs on the first step: use --warmup >= 1 so it is not timed")
    return a


# ============================================================================ the child
def bf16_support() -> tuple[bool, str]:
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return False, "torch built without oneDNN (mkldnn)"
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False, "CPU lacks native bf16 (avx512_bf16 / amx_bf16)"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(torch.randn(4, 8), torch.randn(8, 8))
        if y.dtype != torch.bfloat16:
            return False, f"autocast produced {y.dtype}, not bfloat16"
    except Exception as e:  # noqa: BLE001 - any failure means "do not measure bf16"
        return False, f"bf16 probe failed: {e!r}"
    return True, "native bf16 (oneDNN)"


def lora_factors(model, impl: str) -> dict:
    """{module path in the HF model: (A weight (r, d_in), B weight (d_out, r))} for either library."""
    out = {}
    if impl == "lorakit":
        from lorakit.core.inject import adapted_layers

        for path, layer in adapted_layers(model).items():
            lora = layer.adapters["default"]
            out[path] = (lora.lora_A.weight, lora.lora_B.weight)
    else:  # PEFT: LoraLayer modules carry lora_A / lora_B ModuleDicts keyed by adapter name
        for path, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
                out[path.removeprefix("base_model.model.")] = (m.lora_A["default"].weight, m.lora_B["default"].weight)
    return out


def same_lora_init(factors: dict, seed: int) -> None:
    """A from a generator seeded by (seed, module path), B = 0: identical in both libraries."""
    import zlib

    import torch

    with torch.no_grad():
        for path, (a, b) in sorted(factors.items()):
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
            bound = a.shape[1] ** -0.5  # = PEFT's kaiming_uniform_(a=sqrt(5)) bound
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=g))
            b.zero_()


def run_child(a: argparse.Namespace) -> dict:
    import resource

    import torch

    spec = VARIANTS[a.child]
    impl, bf16 = spec["impl"], spec.get("bf16", False)
    compile_ = spec.get("compile", False) or (a.compile and impl == "lorakit")
    name = a.tag or a.child
    result = dict(variant=a.child, impl=impl, target=spec["target"], bf16=bf16, compile=compile_,
                  chunk_size=(a.chunk_size or "default") if impl == "lorakit" else None)
    if a.threads:
        torch.set_num_threads(a.threads)
    result["torch_threads"] = torch.get_num_threads()
    result["allocator"] = "tcmalloc" if "tcmalloc" in Path("/proc/self/maps").read_text() else "system"
    if bf16:
        ok, why = bf16_support()
        result["bf16_support"] = why
        if not ok:
            log(f"[{name}] skipped: {why}")
            return {**result, "skipped": why}

    import warnings

    from transformers.utils import logging as hf_logging

    from lorakit.models import load_model

    hf_logging.disable_progress_bar()  # keep stderr to one progress line per step
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from peft/transformers

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    model, _ = load_model(a.model)
    # Weights into anonymous memory: idle mmap'd pages get evicted by the VM mid-benchmark.
    # (Tied lm_head/embed_tokens is one Parameter; replacing .data keeps it tied.)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    model.train()
    result["load_s"] = round(time.perf_counter() - t0, 2)

    torch.manual_seed(a.seed)
    target = QKVO if spec["target"] == "qkvo" else "all-linear"
    if impl == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif impl == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=a.r, lora_alpha=a.alpha, target_modules=target, lora_dropout=0.0))
    else:
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=a.r, alpha=a.alpha, dropout=0.0, target=target))
    if impl != "full":
        factors = lora_factors(model, impl)
        same_lora_init(factors, a.seed)
        result["adapted_modules"] = len(factors)
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in params)
    result["total_params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr)

    # The loss each implementation would use in practice.
    if impl == "lorakit":
        from lorakit.train import causal_lm_training_loss, compile_decoder  # what LorakitTrainer uses

        if compile_:
            compile_decoder(model)
        elif spec["lean"]:
            from lorakit.optim import lean_activations

            result["lean"] = lean_activations(model)

        def compute_loss(x):
            return causal_lm_training_loss(model, x, x, **({"chunk_size": a.chunk_size} if a.chunk_size else {}))
    else:
        def compute_loss(x):
            return model(input_ids=x, labels=x).loss  # HF: full (B*T, V) fp32 logits

    def step(x) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = compute_loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # Same batches in every variant: random ids from a fixed seed, a new batch per step.
    n = a.warmup + a.steps
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(a.seed + 1)
    batches = torch.randint(0, vocab, (n, a.batch, a.seq), generator=g)

    import gc

    gc.collect()
    result["rss_before_steps_mb"] = vm_mb("VmRSS")
    peak_reset = reset_peak_rss()
    times, losses = [], []
    for i in range(n):
        t = time.perf_counter()
        losses.append(step(batches[i]))
        times.append(time.perf_counter() - t)
        kind = "warmup" if i < a.warmup else "timed"
        log(f"[{name}] step {i + 1}/{n} ({kind}) {times[-1]:.2f}s loss {losses[-1]:.4f}")

    timed = times[a.warmup:]
    result.update(
        step_times_s=[round(t, 4) for t in timed],
        warmup_times_s=[round(t, 4) for t in times[: a.warmup]],
        median_step_s=statistics.median(timed),
        first_step_s=round(times[0], 3),
        # the first call compiles (forward and backward graphs); excluded from the timed steps
        compile_s=round(times[0] - statistics.median(timed), 2) if compile_ else None,
        losses=losses,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        step_peak_rss_mb=vm_mb("VmHWM") if peak_reset else None,
    )
    return result


# ============================================================================ the parent
def machine_info() -> dict:
    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": ver("torch"), "transformers": ver("transformers"), "peft": ver("peft"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def spawn(a: argparse.Namespace, variant: str, tag: str) -> dict:
    """Run one variant in a fresh interpreter; its progress goes to our stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--child-out", str(out),
               "--tag", tag, "--steps", str(a.steps), "--warmup", str(a.warmup), "--model", a.model,
               "--batch", str(a.batch), "--seq", str(a.seq), "--r", str(a.r), "--alpha", str(a.alpha),
               "--lr", str(a.lr), "--seed", str(a.seed), "--threads", str(a.threads),
               ] + (["--chunk-size", str(a.chunk_size)] if a.chunk_size else []) + (["--compile"] if a.compile else [])
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        if VARIANTS[variant]["alloc"] == "tcmalloc":
            sys.path.insert(0, str(HERE.parent / "src"))
            from lorakit.allocator import tcmalloc_path  # torch-free import

            if tcmalloc_path():
                env["LD_PRELOAD"] = tcmalloc_path()
            else:
                log(f"[{tag}] tcmalloc not installed (apt-get install libtcmalloc-minimal4): running with glibc")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            log(f"[{tag}] FAILED (exit code {proc.returncode}); see its traceback above")
            return {"variant": variant, "failed": f"exit code {proc.returncode}", "wall_s": wall}
        res = json.loads(out.read_text())
        res["wall_s"] = round(wall, 1)
        return res


def ratio(x, y):
    return None if x is None or y is None else x / y


def summarise(a: argparse.Namespace, runs: list[list[dict]]) -> dict:
    """Per variant: median of round medians (time), max over rounds (RSS), ratios vs its PEFT row."""
    per = {}
    for v in a.variants:
        ok = [r for rnd in runs for r in rnd if r["variant"] == v and "median_step_s" in r]
        bad = [r for rnd in runs for r in rnd if r["variant"] == v and "median_step_s" not in r]
        if not ok:
            per[v] = {"skipped" if bad and "skipped" in bad[0] else "failed":
                      (bad[0].get("skipped") or bad[0].get("failed")) if bad else "not run"}
            continue
        first = ok[0]
        step_peaks = [r["step_peak_rss_mb"] for r in ok if r.get("step_peak_rss_mb") is not None]
        per[v] = {
            "median_step_s": statistics.median(r["median_step_s"] for r in ok),
            "round_medians_s": [r["median_step_s"] for r in ok],
            "step_times_s": [r["step_times_s"] for r in ok],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "step_peak_rss_mb": max(step_peaks) if step_peaks else None,
            "rss_before_steps_mb": first.get("rss_before_steps_mb"),
            "ref": VARIANTS[v]["ref"],
            "trainable_params": first["trainable_params"],
            "adapted_modules": first.get("adapted_modules"),
            "losses": first["losses"],
            "compile_s": [r["compile_s"] for r in ok] if first["compile"] else None,
            "first_step_s": [r["first_step_s"] for r in ok],
            "bf16": first["bf16"], "bf16_support": first.get("bf16_support"),
            "compile": first["compile"], "chunk_size": first["chunk_size"],
            "torch_threads": first["torch_threads"], "load_s": [r["load_s"] for r in ok],
            "allocator": first.get("allocator"),
            "failed_rounds": len(bad),
        }
    for v, row in per.items():
        ref = per.get(row.get("ref") or "", {})
        row["time_ratio"] = ratio(row.get("median_step_s"), ref.get("median_step_s"))
        row["rss_ratio"] = ratio(row.get("peak_rss_mb"), ref.get("peak_rss_mb"))
        row["step_rss_ratio"] = ratio(row.get("step_peak_rss_mb"), ref.get("step_peak_rss_mb"))

    # Loss agreement: every round of the lorakit row against every round of its PEFT row.
    loss_diffs = {}
    for lk, pf in LOSS_PAIRS:
        lks = [r["losses"] for rnd in runs for r in rnd if r["variant"] == lk and "losses" in r]
        pfs = [r["losses"] for rnd in runs for r in rnd if r["variant"] == pf and "losses" in r]
        if lks and pfs:
            loss_diffs[f"{lk} vs {pf}"] = max(abs(x - y) for l1 in lks for l2 in pfs for x, y in zip(l1, l2))
        if lk in per and pf in per and "trainable_params" in per[lk] and "trainable_params" in per[pf]:
            if per[lk]["trainable_params"] != per[pf]["trainable_params"]:
                log(f"WARNING: {lk} trains {per[lk]['trainable_params']} params, {pf} {per[pf]['trainable_params']}")
    bf = per.get("lorakit-all-bf16", {}).get("losses")
    ref = per.get("peft-all", {}).get("losses")
    bf16_diff = max(abs(x - y) for x, y in zip(bf, ref)) if bf and ref else None

    def get(v, k):
        return per.get(v, {}).get(k)

    return {
        "time_ratio": get("lorakit-all", "time_ratio"),
        "rss_ratio": get("lorakit-all", "rss_ratio"),
        "time_ratio_qkvo": get("lorakit-qkvo", "time_ratio"),
        "rss_ratio_qkvo": get("lorakit-qkvo", "rss_ratio"),
        "step_rss_ratio": get("lorakit-all", "step_rss_ratio"),
        # same allocator on both sides: what the library itself (not the allocator) buys
        "same_allocator": {
            "tcmalloc": {"time_ratio": ratio(get("lorakit-all", "median_step_s"), get("peft-all-tcmalloc", "median_step_s")),
                         "rss_ratio": ratio(get("lorakit-all", "peak_rss_mb"), get("peft-all-tcmalloc", "peak_rss_mb"))},
            "system": {"time_ratio": ratio(get("lorakit-all-system", "median_step_s"), get("peft-all", "median_step_s")),
                       "rss_ratio": ratio(get("lorakit-all-system", "peak_rss_mb"), get("peft-all", "peak_rss_mb"))},
        },
        "step_rss_ratio_qkvo": get("lorakit-qkvo", "step_rss_ratio"),
        "max_loss_diff": max(loss_diffs.values()) if loss_diffs else None,
        "loss_diffs": loss_diffs,
        "bf16_vs_peft_all_max_loss_diff": bf16_diff,
        "aggregation": {"time": "median over rounds of each round's median step time",
                        "rss": "max over rounds; peak_rss_mb = ru_maxrss (whole child process), "
                               "step_peak_rss_mb = VmHWM reset after model load (steps only)",
                        "ratios": "variant / its `ref` PEFT row (full-ft and lorakit-all-* vs peft-all)"},
        "variants": per,
    }


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(summary: dict) -> None:
    head = f"{'variant':<22} {'malloc':>8} {'median s/step':>13} {'peak RSS MB':>11} {'step RSS MB':>11} " \
           f"{'time ratio vs PEFT':>18} {'rss ratio vs PEFT':>17}"
    print(head)
    print("-" * len(head))
    for v, row in summary["variants"].items():
        if "median_step_s" not in row:
            print(f"{v:<22} {'skipped: ' + row['skipped'] if 'skipped' in row else 'FAILED: ' + row['failed']}")
            continue
        print(f"{v:<22} {row.get('allocator') or '-':>8} {row['median_step_s']:>13.3f} {row['peak_rss_mb']:>11.0f} {fmt(row['step_peak_rss_mb'], '.0f'):>11} "
              f"{fmt(row['time_ratio'], '.3f'):>18} {fmt(row['rss_ratio'], '.3f'):>17}")
    print()
    for alloc, r in summary["same_allocator"].items():
        print(f"same allocator ({alloc}): lorakit-all / PEFT time {fmt(r['time_ratio'], '.3f')}, "
              f"peak RSS {fmt(r['rss_ratio'], '.3f')}")
    for pair, d in summary["loss_diffs"].items():
        print(f"max |loss diff| {pair}: {d:.2e}")
    if summary["bf16_vs_peft_all_max_loss_diff"] is not None:
        print(f"max |loss diff| lorakit-all-bf16 vs peft-all (bf16 rounding, expected > 0): "
              f"{summary['bf16_vs_peft_all_max_loss_diff']:.2e}")
    for v, row in summary["variants"].items():
        if row.get("compile_s"):
            print(f"{v}: compile time (first step minus median step) {row['compile_s']} s")


def plot(summary: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = {v: r for v, r in summary["variants"].items() if "median_step_s" in r}
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(rows)
    axes[0].barh(names, [rows[v]["median_step_s"] for v in names])
    axes[0].set_xlabel("median s / step (lower is better)")
    axes[1].barh(names, [rows[v]["peak_rss_mb"] for v in names])
    axes[1].set_xlabel("peak RSS MB (ru_maxrss)")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("One training step, SmolLM2-135M, 8x128 tokens, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.child:
        res = run_child(a)
        a.child_out.write_text(json.dumps(res))
        return

    info = machine_info()
    log(f"train_step: {len(a.variants)} variants x {a.rounds} rounds, {a.warmup} warmup + {a.steps} timed steps "
        f"each; {info['cpus_usable']} CPUs, load average {info['load_avg_at_start']}")
    runs = []
    n = len(a.variants)
    for k in range(a.rounds):
        order = a.variants[k % n:] + a.variants[: k % n]  # rotate: no variant always runs first
        rnd = []
        for j, v in enumerate(order):
            tag = f"{v} r{k + 1}/{a.rounds} #{j + 1}/{n}"
            log(f"--- round {k + 1}/{a.rounds}, {j + 1}/{n}: {v}")
            rnd.append(spawn(a, v, tag))
        runs.append(rnd)

    summary = summarise(a, runs)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                if k not in ("child", "child_out", "tag")}
    settings.update(optimizer="torch.optim.AdamW (betas, eps, weight_decay: torch defaults)",
                    lora_dropout=0.0, data="random token ids, torch.Generator seed = seed + 1, labels = inputs",
                    lora_init="A ~ U(+-1/sqrt(d_in)) seeded by module path, B = 0, in both libraries",
                    step="forward + loss + backward + optimizer.step() + zero_grad(set_to_none=True)",
                    orders=[a.variants[k % n:] + a.variants[: k % n] for k in range(a.rounds)])
    out = {**{k: summary[k] for k in ("time_ratio", "rss_ratio", "time_ratio_qkvo", "rss_ratio_qkvo")},
           **{k: v for k, v in summary.items() if k not in ("time_ratio", "rss_ratio", "time_ratio_qkvo", "rss_ratio_qkvo")},
           "machine": info, "settings": settings, "raw_runs": runs}
    print()
    print_table(summary)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    png = plot(summary, a.out.with_suffix(".png"))
    print(f"\nwrote {a.out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
