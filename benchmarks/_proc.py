"""Process-memory helpers shared by the benchmarks (Linux /proc; None / False elsewhere)."""

from __future__ import annotations

import ctypes
import gc
import sys
from pathlib import Path


def log(msg: str) -> None:
    """Progress to stderr (children report results on stdout or in files)."""
    print(msg, file=sys.stderr, flush=True)


def vm_mb(field: str) -> float | None:
    """VmRSS / VmHWM / ... of this process in MB, or None where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """VmHWM := current RSS (Linux >= 4.0), so later peaks are the measured steps' own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_and_reset_peak() -> bool:
    """Give freed heap back to the OS (tcmalloc's ReleaseFreeMemory, glibc's malloc_trim: e.g.
    weights a variant dropped), then reset the peak; False where the peak cannot be reset."""
    gc.collect()
    for lib, fn in ((None, "MallocExtension_ReleaseFreeMemory"), ("libc.so.6", "malloc_trim")):
        try:
            f = getattr(ctypes.CDLL(lib), fn)
        except (OSError, AttributeError):
            continue
        f(0) if fn == "malloc_trim" else f()
    return reset_peak_rss()
