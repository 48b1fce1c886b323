"""Atomic directory writes shared by adapter saves and the model cache.

A directory is built in a hidden temporary sibling, fsynced, and renamed into place, so a
process killed at any point leaves either the previous directory or the new one, never a
mix. Temporary siblings left by killed processes are removed by the next write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `dest`; on success it replaces `dest` atomically.

    On any error (or KeyboardInterrupt) the temp directory is removed and `dest` is untouched.
    If another process published `dest` concurrently, theirs is kept.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; results should read like any other dir
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # another process published first: keep theirs
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def remove_stale_temps(dest: Path) -> None:
    """Delete `.{name}.tmp-<pid>-*` / `.{name}.old-<pid>-*` siblings whose process is gone."""
    for kind in ("tmp", "old"):
        prefix = f".{dest.name}.{kind}-"
        for p in dest.parent.glob(prefix + "*"):
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not pid_alive(pid):
                if kind == "old" and not dest.exists():
                    continue  # the only surviving copy of an interrupted replace: keep it
                shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
