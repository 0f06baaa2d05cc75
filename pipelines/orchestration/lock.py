"""One writer per run directory or scheduled root: a lock file that a second run meets (exit 2), and that a
killed run leaves behind as a *stale* lock, told apart by its holder's host and process id.

The lock is a file holding JSON (pid, host, start time, command line), written under a temporary name and
hard-linked into place (atomic, and it fails if a lock exists, on local filesystems and NFS alike). A lock
whose host is this machine and whose pid no longer runs is stale; ``obsfeed unlock ROOT`` removes it then,
and refuses while its holder runs (or, on another host, without ``--force``: that process cannot be checked
from here). SIGTERM, what schedulers send on a timeout, unwinds the run: the day is marked failed and the lock
freed; only SIGKILL or a crash of the machine leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas import run_dir as rd
from schemas.errors import LockError
from schemas.storage import process_alive

_HELD: dict[Path, str] = {}
"""Locks this process holds (path → start time): a lock with our pid that is not here is a dead process's."""


def lock_path(root: Path) -> Path:
    return Path(root) / rd.LOCK


def read_lock(root: Path) -> dict[str, Any] | None:
    """The lock's holder, or None when there is no lock (an unreadable lock reads as an unknown holder)."""
    try:
        return json.loads(lock_path(root).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started_at": None, "command": "unreadable lock file"}


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """True / False for a holder on this host; None when it cannot be told from here (another host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    if holder["pid"] == os.getpid():      # ours, or a restarted container's that reused our pid
        return holder.get("started_at") in _HELD.values()
    return process_alive(holder["pid"], holder["host"])


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')} "
            f"({holder.get('command')})")


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold the lock of ``root`` (a run directory or a scheduled root) for the block; raise LockError (exit 2)
    if another run holds it."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root)
    payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)})
    # Written whole under a temporary name, then hard-linked to the lock's name (atomic, fails if it exists):
    # nobody ever reads a half-written lock, and a kill leaves either no lock or a complete one.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(payload)
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        holder = read_lock(root) or {}
        alive = holder_alive(holder)
        if alive is False:
            raise LockError(f"{path}: stale lock left by {describe(holder)}, which is no longer running; check "
                            f"what it left (`obsfeed runs {root}`), then clear it with `obsfeed unlock {root}`"
                            ) from None
        raise LockError(f"{path}: another run holds {root}: {describe(holder)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _HELD[path] = json.loads(payload)["started_at"]
    handle = threading.current_thread() is threading.main_thread()     # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if handle else None
    try:
        yield
    finally:
        _HELD.pop(path, None)
        if handle:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        with contextlib.suppress(FileNotFoundError):
            if read_lock(root) == json.loads(payload):      # never remove a lock that is not ours
                path.unlink()


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def unlock(root: Path, *, force: bool = False) -> str:
    """Remove a stale lock of ``root`` and say whose it was; refuse a live holder, and one on another host
    unless ``force``."""
    holder = read_lock(root)
    if holder is None:
        return f"{lock_path(root)}: no lock"
    alive = holder_alive(holder)
    if alive is True:
        raise LockError(f"{lock_path(root)}: held by a running process: {describe(holder)}; not removed")
    if alive is None and not force:
        raise LockError(f"{lock_path(root)}: held by {describe(holder)}, which cannot be checked from "
                        f"{socket.gethostname()}; make sure it has stopped, then pass --force")
    if read_lock(root) != holder:                          # taken over since we looked: not ours to remove
        raise LockError(f"{lock_path(root)}: the lock changed while checking it; run unlock again")
    lock_path(root).unlink(missing_ok=True)
    return f"{lock_path(root)}: removed the lock of {describe(holder)}"
