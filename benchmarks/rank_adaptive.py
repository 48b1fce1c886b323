"""Rank-adaptive LoRA methods vs LoRA (r=8) and full fine-tuning, at a matched parameter budget.

The rows of issue 4 -- LoRA r=8, DyLoRA, SoRA, AdaLoRA, IncreLoRA, TriAdaptLoRA, CoDyRA
(dynamic rank-selective LoRA), S2-LoRA (at LoRA's parameter count and at LoRA's rank) and full
fine-tuning -- on BBC News with MiniLM-L6 (accuracy) and Chichewa with SmolLM2-135M (held-out
bits per byte): trainable parameters, final metric, step time, peak RSS and the final
per-module ranks read off each trained adapter (non-zero gates, rank patterns, DyLoRA's
maximum rank). It is ``benchmarks/methods.py`` with ``--family rank_adaptive`` and its own
output files; that file's docstring describes the protocol and the budget matching.

Rows that ``benchmarks/methods.py`` already ran with identical settings are copied from
results/methods.json (``--reuse``), so after the full methods run this takes seconds; alone it
takes about 25 minutes on 2 CPU cores.

Run:
    PYTHONPATH=src .venv/bin/python benchmarks/rank_adaptive.py
    PYTHONPATH=src .venv/bin/python benchmarks/rank_adaptive.py --methods lora,adalora --steps-bbc 4 --steps-lm 3

Prints a table per task and writes benchmarks/results/rank_adaptive.json (+ rank_adaptive.png);
every option of methods.py applies (``--tasks``, ``--methods``, ``--steps-bbc``, ``--fresh``, ...).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _methods_benchmark():
    spec = importlib.util.spec_from_file_location("lorakit_benchmark_methods", HERE / "methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = _methods_benchmark()
    defaults = ["--family", "rank_adaptive", "--out", str(bench.RESULTS / "rank_adaptive.json"),
                # rows methods.py already ran with the same settings are copied, not rerun
                "--reuse", str(bench.RESULTS / "methods.json")]
    return bench.main(defaults + argv)  # later flags win: --out / --family can still be given


if __name__ == "__main__":
    raise SystemExit(main())
