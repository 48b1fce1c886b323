"""Load test of `lorakit serve`: 64 concurrent clients on loopback, valid and bad requests mixed.

A real server process (`lorakit serve`, SmolLM2-135M, 8 PEFT-format adapters with ranks 8-64
on q/k/v/o, written by benchmarks/serving.py's `write_adapter`) listens on 127.0.0.1. After a
short warm-up, ``--clients`` asyncio clients (httpx) send requests back to back for
``--duration`` seconds, each request drawn (seeded) from this mix:

    completion        valid /v1/completions, one of the adapters or the base model, 4-16 tokens
    chat-stream       valid /v1/chat/completions with stream=true (SSE must end with [DONE])
    unknown-adapter   a well-formed request naming an adapter that does not exist -> 404
    traversal         model "../etc" or "a/../../b"                                  -> 400
    malformed         not JSON / JSON of the wrong shape / max_tokens = -1 / temperature "hot" -> 4xx

A valid request fails if it gets anything but 200 (429 "queue full" included: the queue is
sized for this load), times out, or a stream does not end with [DONE]. A bad request must get
a 4xx; a 5xx, a 200 or a timeout counts against it. The server's resident memory (VmRSS of the
process) is sampled every second; we report it after the warm-up, its peak, and at the end.

Run (about 2 minutes):
    PYTHONPATH=src .venv/bin/python benchmarks/load_test.py
    PYTHONPATH=src .venv/bin/python benchmarks/load_test.py --clients 16 --duration 20

Prints a table and writes benchmarks/results/load_test.json. Exits 1 if any valid request
failed or any bad request got something other than a 4xx.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import write_adapter  # a sibling benchmark script

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = {"completion": 0.45, "chat-stream": 0.15, "unknown-adapter": 0.15, "traversal": 0.1, "malformed": 0.15}
VALID = ("completion", "chat-stream")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load after the warm-up")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "load_test.json"))
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def make_request(kind: str, rng: random.Random, names: list[str], base: str) -> tuple[str, dict]:
    """(path, httpx kwargs) of one request of `kind`."""
    model = rng.choice([*names, base])
    n = rng.randint(4, 16)
    if kind == "completion":
        return "/v1/completions", {"json": {"model": model, "prompt": "Mulungu anati, " * rng.randint(1, 20),
                                            "max_tokens": n, "temperature": 0}}
    if kind == "chat-stream":
        return "/v1/chat/completions", {"json": {"model": model, "stream": True, "max_tokens": n,
                                                 "messages": [{"role": "user", "content": "Moni! Muli bwanji?"}]}}
    if kind == "unknown-adapter":
        return "/v1/completions", {"json": {"model": f"no-such-adapter-{rng.randint(0, 10**6)}", "prompt": "hi",
                                            "max_tokens": 4}}
    if kind == "traversal":
        return "/v1/completions", {"json": {"model": rng.choice(["../etc", "a/../../b", "/etc/passwd", ".."]),
                                            "prompt": "hi", "max_tokens": 4}}
    bad = rng.choice([
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        {"json": ["a", "list"]},
        {"json": {"model": base, "prompt": "hi", "max_tokens": -1}},
        {"json": {"model": base, "prompt": "hi", "temperature": "hot"}},
        {"json": {"model": base}},
        {"json": {"model": base, "messages": "not a list"}, "path": "/v1/chat/completions"},
    ])
    return bad.pop("path", "/v1/completions"), bad


async def client(i: int, http, args, deadline: float, names: list[str], base: str, log: list) -> None:
    import httpx

    rng = random.Random(args.seed * 1000 + i)
    kinds, weights = zip(*KINDS.items())
    while time.perf_counter() < deadline:
        kind = rng.choices(kinds, weights)[0]
        path, kw = make_request(kind, rng, names, base)
        t0 = time.perf_counter()
        status, ok, note = None, False, ""
        try:
            if kind == "chat-stream":
                async with http.stream("POST", path, timeout=args.timeout, **kw) as resp:
                    status = resp.status_code
                    body = "".join([chunk async for chunk in resp.aiter_text()])
                ok = status == 200 and body.rstrip().endswith("data: [DONE]")
                note = "" if ok else body[-200:]
            else:
                resp = await http.post(path, timeout=args.timeout, **kw)
                status = resp.status_code
                if kind in VALID:
                    ok = status == 200 and bool(resp.json()["choices"][0]["text"] is not None)
                else:
                    ok = 400 <= status < 500 and "error" in resp.json()
                note = "" if ok else resp.text[:200]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            note = f"{type(e).__name__}: {e}"
        log.append({"kind": kind, "status": status, "ok": ok, "seconds": time.perf_counter() - t0, "note": note})


async def run_load(args, port: int, names: list[str], base: str, pid: int) -> tuple[list, list]:
    import httpx

    log: list[dict] = []
    rss: list[tuple[float, float]] = []
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as http:
        t0 = time.perf_counter()
        deadline = t0 + args.duration

        async def sample():
            while True:
                rss.append((time.perf_counter() - t0, rss_mb(pid)))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(client(i, http, args, deadline, names, base, log) for i in range(args.clients)))
        sampler.cancel()
        rss.append((time.perf_counter() - t0, rss_mb(pid)))
    return log, rss


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx
    import torch

    from lorakit.models import load_model

    model, _ = load_model(args.model)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    base = getattr(model.config, "_name_or_path", None) or args.model
    del model
    sargs = argparse.Namespace(ranks=[8, 16, 32, 64], seed=args.seed, model=args.model)
    with tempfile.TemporaryDirectory(prefix="lorakit-load-") as tmp:
        for j in range(args.adapters):
            write_adapter(Path(tmp), j, sargs, shapes)
        names = sorted(p.name for p in Path(tmp).iterdir() if not p.name.startswith("."))
        port = free_port()
        cmd = [sys.executable, "-m", "lorakit.cli", "serve", "--model", args.model, "--adapters", tmp,
               "--port", str(port), "--max-batch", str(args.max_batch)]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "LORAKIT_API_KEY": ""})
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                if server.poll() is not None:
                    raise RuntimeError(f"server exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError("server did not come up in 300 s")
            base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            for name in [*names, base]:  # warm-up: every adapter loaded once, first-call costs paid
                r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "Moni", "max_tokens": 2},
                               timeout=120)
                r.raise_for_status()
            rss_start = rss_mb(server.pid)
            print(f"server up (pid {server.pid}, {rss_start:.0f} MB RSS after warm-up); "
                  f"{args.clients} clients for {args.duration:.0f} s", flush=True)
            log, rss = asyncio.run(run_load(args, port, names, base, server.pid))
            metrics_text = httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()
            try:
                server_log, _ = server.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server_log, _ = server.communicate()

    by = defaultdict(list)
    for e in log:
        by[e["kind"]].append(e)
    rows = []
    for kind in KINDS:
        es = by.get(kind, [])
        secs = sorted(e["seconds"] for e in es)
        statuses = defaultdict(int)
        for e in es:
            statuses[str(e["status"])] += 1
        rows.append({"kind": kind, "requests": len(es), "as_expected": sum(e["ok"] for e in es),
                     "unexpected": sum(not e["ok"] for e in es), "statuses": dict(statuses),
                     "p50_s": statistics.median(secs) if secs else None,
                     "p95_s": secs[min(len(secs) - 1, int(0.95 * len(secs)))] if secs else None,
                     "examples_of_unexpected": [e["note"] for e in es if not e["ok"]][:3]})
    failed_valid = sum(r["unexpected"] for r in rows if r["kind"] in VALID)
    bad_not_4xx = sum(r["unexpected"] for r in rows if r["kind"] not in VALID)
    rss_end, rss_peak = rss[-1][1], max(v for _, v in rss)
    half = rss[len(rss) // 2][1]  # growth over the second half of the run: ~0 once the working set is reached

    print("| request kind | sent | as expected | unexpected | status codes | p50 (s) | p95 (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p50 = f"{r['p50_s']:.2f}" if r["p50_s"] is not None else "-"
        p95 = f"{r['p95_s']:.2f}" if r["p95_s"] is not None else "-"
        print(f"| {r['kind']} | {r['requests']} | {r['as_expected']} | {r['unexpected']} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} | {p50} | {p95} |")
    valid_done = sum(r["as_expected"] for r in rows if r["kind"] in VALID)
    print(f"valid requests failed: {failed_valid}; bad requests not answered 4xx: {bad_not_4xx}; "
          f"{valid_done / args.duration:.2f} valid requests/s")
    print(f"server RSS: {rss_start:.0f} MB after warm-up, peak {rss_peak:.0f} MB, end {rss_end:.0f} MB "
          f"({rss_end - rss_start:+.0f} MB; second half of the run {rss_end - half:+.0f} MB)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "load_test", "failed_valid_requests": failed_valid, "bad_requests_not_4xx": bad_not_4xx,
               "rss_start_mb": rss_start, "rss_peak_mb": rss_peak, "rss_end_mb": rss_end,
               "rss_second_half_growth_mb": rss_end - half,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cpu_count": os.cpu_count()},
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "kinds": rows,
               "rss_samples": rss, "server_metrics_tail": metrics_text[-2000:], "server_log_tail": (server_log or "")[-3000:]}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if failed_valid == 0 and bad_not_4xx == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
