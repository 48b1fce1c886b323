"""Memory-efficient training on SmolLM2-135M (Chichewa LM): peak memory, optimizer state, speed, quality.

Every variant trains the same number of steps on the same Chichewa batches (8 x 128 tokens,
packed from the Chichewa Bible's training split, fixed order), then the trained model's
bits-per-byte on the held-out Chichewa chapters is measured. Each variant runs in its own
Python process, so its memory is its own:

    full-adamw      all 134.5M parameters, torch AdamW                       (the reference)
    lora            LoRA r=8, alpha=16 on all linear layers, AdamW
    galore          full-parameter, GaLoreAdamW (rank --galore-rank, T=200, scale 0.25)
    frugal          full-parameter, FRUGAL (blocks, density --frugal-density, T=200, signSGD rest)
    lisa            full-parameter, LISA: embeddings + head always, 2 sampled layers every 20 steps
    int8-lora       frozen base quantized to int8 (per-group 64) + LoRA r=8
    int4-lora       ... int4 (fp32 compute, the model's own modules)
    int4-lora-gc    int4 + LoRA with gradient checkpointing (activations recomputed in backward)
    int4-lora-bf16  int4 + LoRA with bf16 compute (torch.autocast: QLoRA's recipe of 4-bit storage and
                    16-bit compute; the LoRA weights and AdamW state stay fp32)
    int4-lora-lean  lorakit's int4 recipe, `lorakit train --quantize 4 --bf16`: the rest of the frozen
                    base (embeddings, norms) in bf16, fp32 LoRA, bf16 autocast, lean activations
                    (lorakit.optim.lean), no checkpointing  (target: peak <= 30% of full-adamw's)
    int4-lora-lean-fp32  int4 + LoRA with lean activations and fp32 compute
    int2-lora       ... int2
    int4-lora-lrec  int4 + LoRA trained with CE + KL to the fp32 model's distribution (LREC; the fp32
                    teacher is in memory during training; the loss from both models' hidden states
                    in row chunks, lorakit.quant.lrec_training_loss, as `lorakit train --lrec`)
    int2-lora-lrec  the same at int2
    int4-lora-lrec-lean  LREC with lorakit's int4 recipe (`train --quantize 4 --bf16 --lrec`: bf16 teacher)
    loram           LoRAM: LoRA trained on a copy pruned by 50% (KV groups and MLP channels,
                    layers 2..27, random), recovered to the full model, evaluated on the full model
    loraprune       LoRAPrune: LoRA training with LoRA-gradient structured pruning to 50% of KV
                    groups and MLP channels (layers 2..27, cubic schedule); the merged, pruned
                    model is evaluated

Every variant runs with tcmalloc preloaded when it is installed (as `lorakit train` does; with
glibc the resident set of any PyTorch CPU training process grows with fragmentation over the
steps, see benchmarks/train_step.py). Measured per variant: peak RSS of the training steps alone (Linux VmHWM, reset after set-up:
model load, quantization and pruning are set-up) and of the whole process, optimizer-state
bytes (every tensor in ``optimizer.state``, from ``lorakit.optim.state_bytes``), trainable
parameters, median step time, training loss, and held-out bits-per-byte after training.

Run (about 30-40 minutes on 2 CPU cores with the defaults):
    PYTHONPATH=src .venv/bin/python benchmarks/memory.py
    PYTHONPATH=src .venv/bin/python benchmarks/memory.py --steps 4 --variants lora,int4-lora --out /tmp/m.json
    # re-measure some variants (always with their reference full-adamw) and keep the others' rows:
    PYTHONPATH=src .venv/bin/python benchmarks/memory.py --variants full-adamw,int4-lora,int4-lora-bf16 --update

Prints a table and writes benchmarks/results/memory.json, whose top level holds
``galore_state_ratio`` and ``frugal_state_ratio`` (optimizer state / AdamW's) and
``int4_peak_ratio`` (step peak RSS of lorakit's int4 + LoRA recipe, int4-lora-lean, / full-FT
AdamW's; named by ``int4_peak_variant``; the other int4 rows' ratios beside it), and memory.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _proc import log, release_and_reset_peak, vm_mb  # benchmarks/_proc.py (the script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VARIANTS = ("full-adamw", "lora", "galore", "frugal", "lisa", "int8-lora", "int4-lora", "int2-lora",
            "int4-lora-lrec", "int2-lora-lrec", "loram", "loraprune", "int4-lora-gc",
            "int4-lora-bf16", "int4-lora-lean", "int4-lora-lean-fp32", "int4-lora-lrec-lean")
INT4_RECIPE = "int4-lora-lean"
PRUNE_LAYERS = list(range(2, 28))  # LoRAM / LoRAPrune leave the first two and last two layers whole


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 (LoRA family), 2e-5 (full-parameter)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--galore-rank", type=int, default=64)
    p.add_argument("--frugal-density", type=float, default=0.15)
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    p.add_argument("--update", action="store_true",
                   help="keep the rows of variants not run now from --out (run full-adamw again with them: "
                        "ratios are taken within one run)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    bad = sorted(set(a.variants) - set(VARIANTS))
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if a.update and "full-adamw" not in a.variants:
        p.error("--update re-measures the reference too: include full-adamw in --variants")
    if a.update and a.out.exists():  # kept rows must come from a run with the same settings
        old = json.loads(a.out.read_text()).get("settings", {})
        differ = {k: (old[k], getattr(a, k)) for k in ("model", "steps", "batch", "seq", "lr", "r", "galore_rank",
                                                        "frugal_density", "prune_ratio", "seed")
                  if k in old and old[k] != getattr(a, k)}
        if differ:
            p.error(f"--update: {a.out} was measured with other settings ({', '.join(f'{k}={o!r}, now {n!r}' for k, (o, n) in differ.items())}); "
                    "rerun with the same settings or without --update")
    return a


# ============================================================================== the child
def full_params(model) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def run_child(a) -> dict:
    import torch

    import lorakit
    from lorakit.data import chichewa_split, pack
    from lorakit.evaluate import evaluate_lm
    from lorakit.models import load_model
    from lorakit.optim import state_bytes
    from lorakit.train import DEFAULT_LOSS_CHUNK, causal_lm_training_loss

    v = a.child
    torch.manual_seed(a.seed)
    lean = "-lean" in v
    bf16 = v.endswith(("-bf16", "-lean"))  # bf16 autocast; "-lean": QLoRA's storage, the rest of the base in bf16 too
    model, tok = load_model(a.model, dtype=torch.bfloat16 if v.endswith("-lean") else torch.float32)
    with torch.no_grad():  # private copies: idle mmapped weight pages get evicted and re-read
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    train_texts, heldout = chichewa_split()
    blocks = pack(tok, train_texts, a.seq)
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(blocks), generator=g)[: a.steps * a.batch]
    batches = blocks[order].view(a.steps, a.batch, a.seq)

    full = v in ("full-adamw", "galore", "frugal", "lisa")
    lr = a.lr or (2e-5 if full else 2e-4)
    lora_cfg = lorakit.LoraConfig(r=a.r, alpha=2 * a.r, dropout=0.0, target="all-linear")
    teacher = pruner = lisa = small = None
    result: dict = {"variant": v, "lr": lr}

    if v.startswith(("int8", "int4", "int2")):
        from lorakit.quant import quantize_model, quantized_nbytes

        if "-lrec" in v:
            import copy

            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        quantize_model(model, bits=int(v[3]), group_size=64)
        result["quantized_weight_mb"] = quantized_nbytes(model) / 2**20
    if v == "loram":
        from lorakit.prune import LoramConfig, loram_prune

        # in place: the full weights are released; the full model is loaded again for recovery
        small, _ = loram_prune(model, LoramConfig(ratio=a.prune_ratio, layers=PRUNE_LAYERS, seed=a.seed), inplace=True)
        model = small
        result["pruned_params"] = sum(p.numel() for p in model.parameters())

    if v.endswith("-gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if full:
        full_params(model)
        if v == "lisa":
            from lorakit.optim import Lisa

            lisa = Lisa(model, n_layers=2, interval=20, seed=a.seed)
    else:
        lorakit.inject(model, lora_cfg)
        if lean:
            from lorakit.core.inject import upcast_trainable
            from lorakit.optim import lean_activations

            upcast_trainable(model)  # fp32 master weights for the adapter over a bf16 base (as lorakit train)
            result["lean"] = lean_activations(model)
    if v == "loraprune":
        from lorakit.prune import LoraPrune, LoraPruneConfig

        pruner = LoraPrune(model, LoraPruneConfig(sparsity=a.prune_ratio, layers=PRUNE_LAYERS, prune_every=5))
        pruner.install(model)

    params = [p for p in model.parameters() if p.requires_grad]
    if v == "galore":
        from lorakit.optim import GaLoreAdamW, galore_param_groups

        opt = GaLoreAdamW(galore_param_groups(model), lr=lr, rank=a.galore_rank, update_proj_gap=200, scale=0.25)
    elif v == "frugal":
        from lorakit.optim import FrugalAdamW, frugal_param_groups

        opt = FrugalAdamW(frugal_param_groups(model), lr=lr, density=a.frugal_density, update_gap=200,
                          state_free_lr_scale=0.1, seed=a.seed)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["total_params"] = sum(p.numel() for p in model.parameters())
    model.train()

    release_and_reset_peak()
    result["rss_before_steps_mb"] = vm_mb("VmRSS")
    times, losses, state = [], [], 0
    for step in range(a.steps):
        t = time.perf_counter()
        if lisa is not None:
            lisa.maybe_switch(step, opt)
        x = batches[step]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            if teacher is not None:
                from lorakit.quant.lrec import lrec_training_loss

                loss = lrec_training_loss(model, teacher, x, x, chunk_size=DEFAULT_LOSS_CHUNK)
            else:
                loss = causal_lm_training_loss(model, x, x)
        loss.backward()
        if pruner is not None:
            pruner.step(model, step, a.steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        state = max(state, state_bytes(opt))
        log(f"[{v}] step {step + 1}/{a.steps} {times[-1]:.2f}s loss {losses[-1]:.3f}")
    result.update(step_peak_rss_mb=vm_mb("VmHWM"), peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  optimizer_state_mb=state / 2**20, median_step_s=statistics.median(times[1:] or times),
                  first_step_s=times[0], losses=losses, final_loss=statistics.fmean(losses[-5:]))
    del opt, teacher

    # -- evaluate the trained model (after the memory measurement) ------------------------
    if v == "loram":
        from lorakit.prune import recover

        full_model, _ = load_model(a.model)
        model = recover(small, full_model)
        result["note"] = "evaluated on the full model with the recovered adapter"
    if pruner is not None:
        pruning = pruner.finalize(model)
        result["params_after_pruning"] = sum(p.numel() for p in model.parameters())
        result["removed_units"] = pruning.removed()
    model.eval()
    ev = evaluate_lm(model, tok, heldout, block_size=512, batch_size=2, progress=False)
    result["heldout_bits_per_byte"] = ev["bits_per_byte"]
    return result


# ============================================================================== the parent
def spawn(a, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--child-out", str(out),
               "--model", a.model, "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
               "--r", str(a.r), "--galore-rank", str(a.galore_rank), "--frugal-density", str(a.frugal_density),
               "--prune-ratio", str(a.prune_ratio), "--seed", str(a.seed)] + (["--lr", str(a.lr)] if a.lr else [])
        env = dict(os.environ)  # every variant with the allocator `lorakit train` uses (tcmalloc when installed):
        sys.path.insert(0, str(HERE.parent / "src"))  # glibc's RSS grows with fragmentation over the steps
        from lorakit.allocator import tcmalloc_path  # torch-free import

        env.pop("LD_PRELOAD", None)
        if tcmalloc_path():
            env["LD_PRELOAD"] = tcmalloc_path()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, env=env)
        if proc.returncode != 0 or not out.exists():
            return {"variant": variant, "failed": f"exit code {proc.returncode}"}
        res = json.loads(out.read_text())
        res["wall_s"] = time.perf_counter() - t0
        return res


def table(results: list[dict], ref: dict | None) -> str:
    head = ("| variant | trainable params | step peak RSS (MB) | ÷ full FT | optimizer state (MB) | ÷ AdamW | "
            "step (s) | final train loss | held-out bpb |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['variant']} | failed: {r['failed']} |||||||| ")
            continue
        pk = r["step_peak_rss_mb"] / ref["step_peak_rss_mb"] if ref else float("nan")
        st = r["optimizer_state_mb"] / ref["optimizer_state_mb"] if ref else float("nan")
        lines.append(f"| {r['variant']} | {r['trainable_params'] / 1e6:.2f}M | {r['step_peak_rss_mb']:.0f} | {pk:.2f} | "
                     f"{r['optimizer_state_mb']:.1f} | {st:.3f} | {r['median_step_s']:.2f} | {r['final_loss']:.3f} | "
                     f"{r['heldout_bits_per_byte']:.3f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "failed" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["variant"] for r in ok]
    ax1.barh(names, [r["step_peak_rss_mb"] for r in ok],
             color=["tab:orange" if n == INT4_RECIPE else "tab:blue" for n in names])
    ref = next((r for r in ok if r["variant"] == "full-adamw"), None)
    if ref is not None:
        ax1.axvline(0.3 * ref["step_peak_rss_mb"], color="tab:red", ls="--", lw=1, label="30% of full-adamw")
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set(xlabel="peak RSS during training steps (MB)", title="Memory (SmolLM2-135M, batch 8x128)")
    ax1.invert_yaxis()
    ax2.scatter([r["step_peak_rss_mb"] for r in ok], [r["heldout_bits_per_byte"] for r in ok])
    for r in ok:
        ax2.annotate(r["variant"], (r["step_peak_rss_mb"], r["heldout_bits_per_byte"]), fontsize=7)
    ax2.set(xlabel="step peak RSS (MB)", ylabel="held-out Chichewa bits/byte", title="Memory vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        res = run_child(a)
        a.child_out.write_text(json.dumps(res, indent=2, default=float))
        return 0
    results = []
    for v in a.variants:
        log(f"== {v}")
        res = spawn(a, v)
        results.append(res)
        if "failed" not in res:
            log(f"   step peak {res['step_peak_rss_mb']:.0f} MB, state {res['optimizer_state_mb']:.1f} MB, "
                f"{res['median_step_s']:.2f} s/step, bpb {res['heldout_bits_per_byte']:.3f}")
    if a.update and a.out.exists():
        ran = {r["variant"] for r in results}
        kept = [r for r in json.loads(a.out.read_text()).get("results", []) if r.get("variant") not in ran]
        results = sorted(results + kept, key=lambda r: VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else 99)
        log(f"kept {len(kept)} earlier rows from {a.out}")
    by = {r["variant"]: r for r in results if "failed" not in r}
    ref = by.get("full-adamw")
    print(table(results, ref))
    summary = {}
    if ref:
        for name, key in (("galore", "galore_state_ratio"), ("frugal", "frugal_state_ratio")):
            if name in by:
                summary[key] = by[name]["optimizer_state_mb"] / ref["optimizer_state_mb"]
        if INT4_RECIPE in by:  # the target: lorakit's int4 recipe, no gradient checkpointing
            summary["int4_peak_ratio"] = by[INT4_RECIPE]["step_peak_rss_mb"] / ref["step_peak_rss_mb"]
            summary["int4_peak_variant"] = INT4_RECIPE
            summary["int4_process_peak_ratio"] = by[INT4_RECIPE]["peak_rss_mb"] / ref["peak_rss_mb"]
        for name, key in (("int4-lora", "int4_fp32_peak_ratio"), ("int4-lora-lean-fp32", "int4_lean_fp32_peak_ratio"),
                          ("int4-lora-gc", "int4_gc_peak_ratio"), ("int4-lora-bf16", "int4_bf16_peak_ratio")):
            if name in by:
                summary[key] = by[name]["step_peak_rss_mb"] / ref["step_peak_rss_mb"]
    if "lisa" in by and "lora" in by:
        summary["lisa_vs_lora_peak_ratio"] = by["lisa"]["step_peak_rss_mb"] / by["lora"]["step_peak_rss_mb"]
    for k, val in summary.items():
        print(f"{k}: {val:.3f}" if isinstance(val, float) else f"{k}: {val}")
    import torch

    payload = {"benchmark": "memory", **summary,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()},
               "settings": {k: (str(val) if isinstance(val, Path) else val) for k, val in vars(a).items()
                            if k not in ("child", "child_out", "out")},
               "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    plot(results, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
