"""Serving many LoRA adapters on SmolLM2-135M: lorakit's engine vs PEFT mixed batches vs merging.

Workload (S-LoRA's synthetic one, arXiv:2311.03285 §7): a universe of N adapters with ranks
drawn uniformly from {8, 16, 32, 64} (q/k/v/o_proj, random non-zero factors, PEFT format on
disk), adapter popularity Zipf(α = 1) over the N adapters, Poisson arrivals at ``--rate``
requests/s, prompt lengths uniform in [8, 256] (random token ids), output lengths uniform
in [8, 128] tokens, generated greedily to exactly that length (EOS ignored). The same trace
(same seed) is replayed against every system:

    lorakit   `lorakit.serve.Engine` + `AdapterPool` (adapters loaded on demand from disk by
              background threads), continuous batching, max_batch B, the engine's defaults:
              batched LoRA gathered per rank group in prefill, the batch's distinct adapters
              side by side in decode steps (decode_lora="auto"), schedule="affinity"
    lorakit_fcfs  the same engine admitting strictly first-come-first-served (schedule="fcfs")
    peft      PEFT `PeftModel.generate(adapter_names=[...])` (mixed-adapter batch) on static
              batches of up to B requests taken from the queue in arrival order; adapters
              are `load_adapter`-ed the first time a batch needs them (then kept); a batch
              runs until its longest request is done (static batching); a request's first
              token / finish time is the decode step at which it got them (as if streamed)
    merge     merge-per-adapter: take the oldest waiting request's adapter, gather up to B
              waiting requests of that adapter, merge W += s·B·A into the base (q/k/v/o),
              generate the static batch, restore the base weights; repeat
    base      the lorakit engine serving every request with no adapter (the limit)

Metrics per system and N: throughput (generated tokens / makespan, from the first arrival to
the last completion), time to first token (TTFT, arrival -> first token: queueing + prefill)
p50/p90, per-token latency (mean over requests of (finish - first token)/(len - 1)), end-to-end
latency p50, and SLO attainment (share of requests with TTFT <= ``--slo`` seconds).

Only the adapters the traces actually request are written to disk (an adapter that is never
requested can't influence any system); the rest of the N exist only as popularity mass.

Run (about 20 minutes per repeat on 2 CPU cores with the defaults; the stored results used
--repeats 3, about an hour):
    PYTHONPATH=src .venv/bin/python benchmarks/serving.py --repeats 3
    PYTHONPATH=src .venv/bin/python benchmarks/serving.py --adapters 1,100 --requests 16 --systems lorakit,peft
    ... --device cuda --dtype bfloat16 --requests 256 --rate 20 --max-batch 32        (on a GPU)

Prints a table and writes benchmarks/results/serving.json (top level: ``speedup_vs_peft_100``
= lorakit throughput / PEFT's with 100 adapters, ``fraction_of_base_100`` = lorakit / base,
``ttft_p50_ratio_100`` = lorakit p50 TTFT / PEFT's) and serving.png (throughput vs N).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("lorakit", "lorakit_fcfs", "peft", "merge", "base")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapters", default="1,10,100,1000", help="numbers of adapters N")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--requests", type=int, default=48, help="requests per trace")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate (requests/s)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--prompt-len", default="8,256")
    p.add_argument("--output-len", default="8,128")
    p.add_argument("--slo", type=float, default=10.0, help="TTFT service-level objective (seconds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--random-weights", action="store_true",
                   help="--model is a directory with config.json + tokenizer only: build the architecture with "
                        "seeded random weights (speed is what is measured; used on machines without the weights)")
    p.add_argument("--adapter-dir", default=None, help="where adapters are written (default: a temp dir)")
    p.add_argument("--rank-groups", default="pow2",
                   help="the engine's rank grouping: pow2, exact, or an int R (pad every adapter to R: one group)")
    p.add_argument("--decode-lora", default="auto", choices=["auto", "concat", "gathered"],
                   help="the engine's decode-step LoRA form (see lorakit.serve.Engine)")
    p.add_argument("--repeats", type=int, default=1,
                   help="replay every trace this many times, interleaved; tables and ratios use the median run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "serving.json"))
    args = p.parse_args(argv)
    args.adapters = [int(n) for n in args.adapters.split(",")]
    args.systems = args.systems.split(",")
    bad = sorted(set(args.systems) - set(SYSTEMS))
    if bad:
        p.error(f"unknown systems {bad}; choose from {SYSTEMS}")
    args.ranks = [int(r) for r in args.ranks.split(",")]
    from lorakit.serve import parse_rank_groups

    try:
        args.rank_groups = parse_rank_groups(args.rank_groups)
    except ValueError as e:
        p.error(str(e))
    if isinstance(args.rank_groups, int) and args.rank_groups < max(args.ranks):
        p.error(f"--rank-groups must be pow2, exact or an int >= the largest rank {max(args.ranks)}")
    args.prompt_len = tuple(int(x) for x in args.prompt_len.split(","))
    args.output_len = tuple(int(x) for x in args.output_len.split(","))
    return args


# -- workload --------------------------------------------------------------------------------
@dataclass
class Req:
    i: int
    arrival: float
    adapter: str
    prompt: list[int]
    out_len: int
    first: float | None = None  # seconds since the trace start
    done: float | None = None


@dataclass
class Trace:
    n_adapters: int
    reqs: list[Req] = field(default_factory=list)


def adapter_name(j: int) -> str:
    return f"ad{j:04d}"


def adapter_rank(j: int, ranks: list[int], seed: int) -> int:
    g = torch.Generator().manual_seed(seed * 100_003 + j)
    return ranks[int(torch.randint(len(ranks), (1,), generator=g))]


def make_trace(n: int, args, vocab: int, special: set[int]) -> Trace:
    """Arrivals, prompts and lengths depend on the seed only (the same for every N); adapters on N."""
    pop = torch.tensor([1.0 / (j + 1) ** args.zipf for j in range(n)])
    g = torch.Generator().manual_seed(args.seed * 7919 + n)
    adapters = torch.multinomial(pop / pop.sum(), args.requests, replacement=True, generator=g).tolist()
    g = torch.Generator().manual_seed(args.seed)
    gaps = torch.empty(args.requests).exponential_(args.rate, generator=g).tolist()
    t, reqs = 0.0, []
    for i in range(args.requests):
        t += gaps[i] if i else 0.0  # the first request arrives at 0
        plen = int(torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (1,), generator=g))
        olen = int(torch.randint(args.output_len[0], args.output_len[1] + 1, (1,), generator=g))
        ids = torch.randint(vocab, (plen,), generator=g).tolist()
        ids = [x if x not in special else x + 1 for x in ids]
        reqs.append(Req(i, t, adapter_name(adapters[i]), ids, olen))
    return Trace(n, reqs)


def write_adapter(root: Path, j: int, args, shapes: dict[str, tuple[int, int]]) -> None:
    """A PEFT-format LoRA (q/k/v/o) with seeded random A and B (B non-zero, so it changes outputs)."""
    from safetensors.torch import save_file

    path = root / adapter_name(j)
    if (path / "adapter_model.safetensors").exists():
        return
    r = adapter_rank(j, args.ranks, args.seed)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + j)
    tensors = {}
    for mod, (d_out, d_in) in shapes.items():
        key = f"base_model.model.{mod}"
        tensors[f"{key}.lora_A.weight"] = (torch.rand(r, d_in, generator=g) * 2 - 1) / math.sqrt(d_in)
        tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.02
    tmp = root / f".{adapter_name(j)}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
           "target_modules": list(TARGETS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "base_model_name_or_path": args.model, "init_lora_weights": True, "inference_mode": True}
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, path)


# -- drivers ---------------------------------------------------------------------------------
def _sleep_until(t0: float, t: float) -> None:
    dt = t0 + t - time.perf_counter()
    if dt > 0:
        time.sleep(dt)


def run_engine(model, tok, trace: Trace, args, pool, schedule: str = "affinity") -> dict:
    """Replay `trace` through a fresh Engine (pool=None: the base model for every request). The
    pool (host memory, LRU) lives across traces, as PEFT's loaded adapters do; slots on the
    device start empty with each engine."""
    from lorakit.serve import Engine, Request

    engine = Engine(model, tok, pool, max_batch=args.max_batch, target=list(TARGETS),
                    rank_groups=args.rank_groups, decode_lora=args.decode_lora,
                    schedule=schedule)
    try:
        reqs, nxt = trace.reqs, 0
        t0 = time.perf_counter()

        errors = []

        def on_token(req: Req):
            def cb(ev):
                now = time.perf_counter() - t0
                if req.first is None and ev.token is not None:
                    req.first = now
                if ev.finished:
                    req.done = now
                    if ev.error:
                        errors.append(f"request {req.i} ({req.adapter}) failed: {ev.error}")
            return cb

        while nxt < len(reqs) or engine.has_work():
            now = time.perf_counter() - t0
            while nxt < len(reqs) and reqs[nxt].arrival <= now:
                r = reqs[nxt]
                engine.add(Request(r.prompt, adapter=r.adapter if pool is not None else None,
                                   max_new_tokens=r.out_len, stop_token_ids=[]), on_token=on_token(r))
                nxt += 1
            if engine.has_work():
                if not engine.step():  # all queued requests wait for adapter loads: wait, do not spin
                    nxt_at = reqs[nxt].arrival - (time.perf_counter() - t0) if nxt < len(reqs) else 0.05
                    engine.wait_for_adapters(min(0.05, max(nxt_at, 0.0)))
            elif nxt < len(reqs):
                _sleep_until(t0, reqs[nxt].arrival)
        if errors:
            raise RuntimeError("; ".join(errors[:3]))
        return dict(engine.counters)
    finally:
        engine.close()


class _StepClock:
    """A StoppingCriteria that timestamps every decode step and never stops generation."""

    def __init__(self, t0: float):
        self.t0, self.times = t0, []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter() - self.t0)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _static_generate(model, batch: list[Req], pad_id: int, t0: float, device, **gen_kw) -> None:
    from transformers import StoppingCriteriaList

    length = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(batch):
        ids[i, length - len(r.prompt):] = torch.tensor(r.prompt)
        mask[i, length - len(r.prompt):] = 1
    steps = max(r.out_len for r in batch)
    clock = _StepClock(t0)
    with torch.inference_mode():
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
                       min_new_tokens=steps, do_sample=False, pad_token_id=pad_id,
                       stopping_criteria=StoppingCriteriaList([clock]), **gen_kw)
    for r in batch:  # step k's timestamp is when token k+1 existed
        r.first, r.done = clock.times[0], clock.times[r.out_len - 1]


def run_static(trace: Trace, args, pick, generate) -> None:
    """Static batching from the arrival-ordered queue: `pick(waiting)` -> batch, `generate(batch, t0)`."""
    waiting: list[Req] = []
    pending = list(trace.reqs)
    t0 = time.perf_counter()
    while pending or waiting:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            waiting.append(pending.pop(0))
        if not waiting:
            _sleep_until(t0, pending[0].arrival)
            continue
        batch = pick(waiting)
        for r in batch:
            waiting.remove(r)
        generate(batch, t0)


def run_peft(peft_model, trace: Trace, args, adapter_dir: Path, pad_id: int, loaded: set) -> None:
    def pick(waiting):
        return waiting[: args.max_batch]

    def generate(batch, t0):
        for name in {r.adapter for r in batch} - loaded:
            peft_model.load_adapter(str(adapter_dir / name), adapter_name=name)
            loaded.add(name)
        _static_generate(peft_model, batch, pad_id, t0, args.device, adapter_names=[r.adapter for r in batch])

    run_static(trace, args, pick, generate)


def run_merge(model, trace: Trace, args, adapter_dir: Path, pad_id: int) -> None:
    from safetensors.torch import load_file

    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(TARGETS)}

    def pick(waiting):
        name = waiting[0].adapter
        return [r for r in waiting if r.adapter == name][: args.max_batch]

    def generate(batch, t0):
        name = batch[0].adapter
        cfg = json.loads((adapter_dir / name / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        tensors = load_file(str(adapter_dir / name / "adapter_model.safetensors"))
        with torch.no_grad():
            for mod, w0 in originals.items():
                a = tensors[f"base_model.model.{mod}.lora_A.weight"].to(w0)
                b = tensors[f"base_model.model.{mod}.lora_B.weight"].to(w0)
                model.get_submodule(mod).weight.copy_(w0 + scale * (b @ a))
        try:
            _static_generate(model, batch, pad_id, t0, args.device)
        finally:
            with torch.no_grad():
                for mod, w0 in originals.items():
                    model.get_submodule(mod).weight.copy_(w0)

    run_static(trace, args, pick, generate)


# -- metrics ---------------------------------------------------------------------------------
def metrics(trace: Trace, slo: float) -> dict:
    reqs = trace.reqs
    missing = [r.i for r in reqs if r.first is None or r.done is None]
    if missing:
        raise RuntimeError(f"requests {missing[:5]} never finished")
    tokens = sum(r.out_len for r in reqs)
    makespan = max(r.done for r in reqs) - min(r.arrival for r in reqs)
    ttft = sorted(r.first - r.arrival for r in reqs)
    tpot = [(r.done - r.first) / (r.out_len - 1) for r in reqs if r.out_len > 1]
    e2e = sorted(r.done - r.arrival for r in reqs)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]
    return {"requests": len(reqs), "tokens": tokens, "makespan_s": makespan, "throughput_tok_s": tokens / makespan,
            "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": q(ttft, 0.9),
            "tpot_mean_ms": 1000 * statistics.fmean(tpot), "e2e_p50_s": statistics.median(e2e),
            "slo_attainment": sum(t <= slo for t in ttft) / len(ttft),
            "distinct_adapters": len({r.adapter for r in reqs})}


def reset(trace: Trace) -> Trace:
    for r in trace.reqs:
        r.first = r.done = None
    return trace


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    import copy

    from lorakit.models import load_model

    dtype = getattr(torch, args.dtype)
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = load_model(args.model)
    model = model.to(device=args.device, dtype=dtype).eval()
    for p in model.parameters():  # private copies: mmapped pages evicted while idle make timings jump
        p.data = p.data.clone()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(TARGETS)}
    special = set(tok.all_special_ids)
    traces = {n: make_trace(n, args, len(tok), special) for n in args.adapters}

    tmp = None
    if args.adapter_dir:
        adapter_dir = Path(args.adapter_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lorakit-serving-")
        adapter_dir = Path(tmp.name)
    needed = sorted({int(r.adapter[2:]) for tr in traces.values() for r in tr.reqs})
    t = time.perf_counter()
    for j in needed:
        write_adapter(adapter_dir, j, args, shapes)
    print(f"{len(needed)} distinct adapters requested over all traces, written to {adapter_dir} "
          f"in {time.perf_counter() - t:.1f} s", flush=True)

    peft_model = None
    if "peft" in args.systems:
        from peft import PeftModel

        first = needed[0]
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir / adapter_name(first)),
                                               adapter_name=adapter_name(first)).eval()
        peft_loaded = {adapter_name(first)}

    from lorakit.serve import AdapterPool

    # one pool per lorakit system: neither finds the other's adapters already loaded
    pools = {s: AdapterPool(adapter_dir, budget_bytes=8 << 30, check_base=False)
             for s in ("lorakit", "lorakit_fcfs") if s in args.systems}

    # warm-up: one short request per system, so first-call costs don't land on the first trace
    warm = Trace(1, [Req(0, 0.0, adapter_name(needed[0]), list(range(5, 37)), 4)])
    results = []
    # interleaved: each repeat runs every N with all systems back to back (base beside N=100,
    # or the first N), so the ratios compare runs minutes apart, not a whole benchmark apart
    base_n = 100 if 100 in args.adapters else args.adapters[0]
    runs = [(r, s, None if s == "base" else n) for r in range(args.repeats) for n in args.adapters
            for s in args.systems if s != "base" or n == base_n]
    for repeat, sys_name, n in runs:
        trace = reset(traces[n if n is not None else args.adapters[0]])  # same prompts for every N
        counters = None
        for tr in (reset(warm), trace):
            if sys_name == "lorakit":
                counters = run_engine(model, tok, tr, args, pools[sys_name])
            elif sys_name == "lorakit_fcfs":
                counters = run_engine(model, tok, tr, args, pools[sys_name], schedule="fcfs")
            elif sys_name == "base":
                counters = run_engine(model, tok, tr, args, None)
            elif sys_name == "peft":
                run_peft(peft_model, tr, args, adapter_dir, pad_id, peft_loaded)
            else:
                run_merge(model, tr, args, adapter_dir, pad_id)
        m = metrics(trace, args.slo)
        m.update(system=sys_name, n_adapters=n, repeat=repeat)
        if counters is not None:
            m["engine_counters"] = counters
        results.append(m)
        print(f"[{repeat + 1}/{args.repeats}] {sys_name:>12} N={n!s:>5}: {m['throughput_tok_s']:7.1f} tok/s  "
              f"TTFT p50 {m['ttft_p50_s']:6.2f} s  TPOT {m['tpot_mean_ms']:6.1f} ms  SLO {m['slo_attainment'] * 100:5.1f}%  "
              f"({m['distinct_adapters']} adapters used)", flush=True)
        save(results, args)  # after every run: a cut-off benchmark keeps what it measured

    for pool in pools.values():
        pool.close()
    print_table(median_runs(results))
    summary = save(results, args)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if not isinstance(v, list) else f"{k}: {[round(x, 3) for x in v if x is not None]}")
    try:
        plot(median_runs(results), Path(args.out).with_suffix(".png"))
    except ImportError as e:  # a GPU box without matplotlib: the JSON is what matters
        print(f"no plot ({e})")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def save(results: list[dict], args) -> dict:
    """Write the JSON (summary ratios at the top level); returns the summary."""
    summary = summarise(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "serving", **summary,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
                           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "adapter_dir")},
               "results": median_runs(results), "all_runs": results}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return summary


def median_runs(results: list[dict]) -> list[dict]:
    """One row per (system, N): the repeat with the median throughput (the lower middle for
    an even count), with every repeat's throughput in `throughput_runs`."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["system"], r["n_adapters"]), []).append(r)
    out = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r["throughput_tok_s"])
        out.append({**runs[(len(runs) - 1) // 2], "throughput_runs": [r["throughput_tok_s"] for r in runs]})
    return out


def summarise(results: list[dict]) -> dict:
    """Ratios of the median runs; with repeats, also each repeat's own ratios (`..._runs`)."""
    out = _ratios(median_runs(results))
    repeats = sorted({r.get("repeat", 0) for r in results})
    if len(repeats) > 1:
        per = [_ratios([r for r in results if r.get("repeat", 0) == k]) for k in repeats]
        for key in list(out):
            out[f"{key}_runs"] = [p.get(key) for p in per]
    return out


def _ratios(results: list[dict]) -> dict:
    by = {(r["system"], r["n_adapters"]): r for r in results}
    out = {}
    for n in sorted({r["n_adapters"] for r in results if r["n_adapters"] is not None}):
        lk = by.get(("lorakit", n))
        if lk is None:
            continue
        if ("peft", n) in by:
            out[f"speedup_vs_peft_{n}"] = lk["throughput_tok_s"] / by[("peft", n)]["throughput_tok_s"]
            out[f"ttft_p50_ratio_{n}"] = lk["ttft_p50_s"] / by[("peft", n)]["ttft_p50_s"]
        if ("merge", n) in by:
            out[f"speedup_vs_merge_{n}"] = lk["throughput_tok_s"] / by[("merge", n)]["throughput_tok_s"]
        if ("base", None) in by:
            out[f"fraction_of_base_{n}"] = lk["throughput_tok_s"] / by[("base", None)]["throughput_tok_s"]
    return out


def print_table(results: list[dict]) -> None:
    print("| system | adapters | throughput (tok/s) | TTFT p50 (s) | TTFT p90 (s) | per-token (ms) | e2e p50 (s) "
          "| SLO | adapters used |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['n_adapters'] if r['n_adapters'] is not None else '-'} | "
              f"{r['throughput_tok_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p90_s']:.2f} | {r['tpot_mean_ms']:.1f} | "
              f"{r['e2e_p50_s']:.2f} | {r['slo_attainment'] * 100:.0f}% | {r['distinct_adapters']} |")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sys_name in SYSTEMS:
        pts = sorted((r["n_adapters"], r["throughput_tok_s"]) for r in results
                     if r["system"] == sys_name and r["n_adapters"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sys_name)
    base = [r for r in results if r["system"] == "base"]
    if base:
        ax.axhline(base[0]["throughput_tok_s"], color="gray", linestyle="--", label="base model (no adapters)")
    ax.set(xscale="log", xlabel="number of adapters N", ylabel="throughput (generated tokens/s)",
           title="Serving SmolLM2-135M with N LoRA adapters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
