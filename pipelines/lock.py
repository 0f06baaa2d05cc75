"""One writer per scheduled root: a lock file that a second scheduler meets (exit 2), and that a killed run
leaves behind as a *stale* lock, told apart by its holder's host and process id.

The lock is a file created with O_EXCL (atomic on local filesystems and on NFSv3+), holding JSON: pid, host,
start time and command line. A lock whose host is this machine and whose pid no longer runs is stale;
``obsfeed unlock ROOT`` removes it then, and refuses while its holder runs (or, on another host, without
``--force``: that process cannot be checked from here).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas import run_dir as rd
from schemas.errors import LockError


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
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # it runs, as another user
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started_at')} "
            f"({holder.get('command')})")


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold the lock of ``root`` for the block; raise LockError (exit 2) if another run holds it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root)
    payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)})
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        holder = read_lock(root) or {}
        alive = holder_alive(holder)
        if alive is False:
            raise LockError(f"{path}: stale lock left by {describe(holder)}, which is no longer running; check "
                            f"that day's status in the catalogue, then clear it with `obsfeed unlock {root}`") from None
        raise LockError(f"{path}: another run holds this root: {describe(holder)}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if read_lock(root) == json.loads(payload):      # never remove a lock that is not ours
                path.unlink()


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
    lock_path(root).unlink(missing_ok=True)
    return f"{lock_path(root)}: removed the lock of {describe(holder)}"
