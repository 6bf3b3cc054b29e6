"""One writer per folder: ``<folder>/writer.lock``, created with O_EXCL and holding the writer's
pid, host and start time. The project's only lock: a teacher cache (``cache_teacher``), a training
run folder (``train_student``), a LiT teacher folder (``train_lit``) and an export folder each
take it before they write.

A second writer into the same folder (including one with ``--overwrite``) stops with the caller's
error class (:class:`CacheLockedError` for caches, :class:`RunLockedError` for the other folders)
naming the other process before it touches any file. A lock left by a process that no longer
exists on this host (kill -9, power loss) is taken over with a warning; a lock of another host is
never taken over (its pid cannot be checked from here).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from distill.core.errors import CacheLockedError, DistillError, RunLockedError

LOCK_NAME = "writer.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _try_create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    return True


@contextlib.contextmanager
def writer_lock(out: Path, error: type[DistillError] = CacheLockedError) -> Iterator[Path]:
    """Hold ``out/writer.lock`` for the duration of the block (``out`` must exist); a live writer's
    lock raises ``error``."""
    out = Path(out)
    path = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        if _try_create(path, me):
            break
        other = _read(path)
        pid, host = other.get("pid"), other.get("host")
        if not other:  # being written right now, or unreadable: give the writer a moment
            time.sleep(0.2)
            other = _read(path)
            pid, host = other.get("pid"), other.get("host")
        if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
            print(f"warning: taking over stale lock {path} of process {pid} on {host} (no longer running)",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        who = f"process {pid} on host {host} (since {other.get('started', '?')})" if pid else "another process"
        raise error(f"{out} is being written by {who}; lock file {path}. Wait for it to finish, or "
                               "choose another --out; delete the lock file only if that process is gone")
    else:
        raise error(f"cannot take the writer lock {path}: it keeps reappearing")
    try:
        yield path
    finally:
        if _read(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(out: str | Path, error: type[DistillError] = RunLockedError) -> Iterator[Path]:
    """:func:`writer_lock` on an output folder that may not exist yet (a training run, a LiT teacher,
    an export): ``out`` is created first, and removed again when the block leaves it empty (a
    refused or failed first run leaves no folder behind)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with writer_lock(out, error):
            yield out
    finally:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
