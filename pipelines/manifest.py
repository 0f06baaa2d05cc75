"""`manifest.json`: what each stage read, wrote, counted and measured (DESIGN §3)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from schemas import run_dir as rd
from schemas.run_dir import RunDir
from transforms.io import atomic_write_text

PACKAGES = ("obsfeed", "apache-beam", "pyarrow", "polars", "pandas", "scikit-learn", "econml", "torch", "skops",
            "great-expectations", "numpy", "scipy", "matplotlib")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_inputs(paths: Iterable[Path | str]) -> list[dict[str, Any]]:
    return [{"path": str(p), "sha256": sha256_file(p), "bytes": Path(p).stat().st_size} for p in paths]


def dataset_sha256(directory: Path | str) -> str:
    """One hash of a dataset's content: every Parquet file's relative path and bytes, in path order. Two runs
    that wrote the same rows into the same files have the same hash."""
    return tree_sha256(directory, "*.parquet") or hashlib.sha256().hexdigest()


def tree_sha256(directory: Path | str, pattern: str = "*") -> str | None:
    """One hash of a folder's content (every ``pattern`` file's relative path and bytes, hidden names skipped,
    in path order); None when it does not exist. What lineage compares: same hash, same content."""
    root = Path(directory)
    if not root.exists():
        return None
    if root.is_file():
        return sha256_file(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob(pattern) if p.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def lineage(run: RunDir, names: Iterable[str]) -> dict[str, str | None]:
    """The content hash of each run-directory output in ``names``."""
    return {name: tree_sha256(run.path(name)) for name in names}


def stale_stages(manifest: dict[str, Any], order: Sequence[str], settings: dict[str, str] | None = None,
                 ) -> list[str]:
    """The stages recorded ok whose inputs are not what they consumed: an input rewritten since by its
    producer (its recorded output hash differs), or produced by a stage that is itself stale; or that ran with
    other settings than ``settings`` (stage → ``Config.stage_digest`` of the run's config now). A stage
    recorded before lineage existed is stale once a stage it reads from has run with lineage."""
    stages = manifest.get("stages", {})
    producer = {name: s for s in order for name in rd.STAGE_OUTPUTS.get(s, ())}
    produced: dict[str, str | None] = {}
    for s in order:
        produced.update(((stages.get(s) or {}).get("lineage") or {}).get("produced") or {})
    stale: list[str] = []
    for s in order:
        entry = stages.get(s) or {}
        if entry.get("status") != "ok":
            continue
        lineage = entry.get("lineage")
        if lineage is None:                                  # recorded before lineage: stale once it matters
            upstream = {producer.get(name) for name in rd.STAGE_INPUTS.get(s, ())}
            if any(u in stale or ((stages.get(u) or {}).get("lineage") or {}).get("produced") for u in upstream):
                stale.append(s)
            continue
        consumed = lineage.get("consumed") or {}
        recorded = lineage.get("settings")
        if (settings is not None and recorded is not None and settings.get(s) not in (None, recorded)) or any(
                producer.get(name) in stale or (name in produced and produced[name] != h)
                for name, h in consumed.items()):
            stale.append(s)
    return stale


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its waited-for children, in MiB (Linux: ru_maxrss in KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024 / 1024
    return round(max(own, kids) * scale, 1)


def read_manifest(run: RunDir) -> dict[str, Any]:
    path = run.path(rd.MANIFEST)
    return json.loads(path.read_text()) if path.exists() else {"run_id": run.run_id, "stages": {}}


def write_manifest(run: RunDir, manifest: dict[str, Any]) -> None:
    atomic_write_text(run.path(rd.MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def record_stage(run: RunDir, stage: str, config_hash: str, work: Callable[[], dict[str, Any]],
                 consumes: Sequence[str] | None = None, settings: str | None = None) -> dict[str, Any]:
    """Run ``work`` and record its result under ``stages.<stage>``, with status, timing, memory, versions and
    lineage: the content hashes of the run-directory inputs it consumed (``consumes``, by default
    ``STAGE_INPUTS[stage]``) and of the outputs it produced, and the digest of the settings it ran with.

    A failed stage is recorded as failed (then the error propagates), so a run is never left looking complete;
    its outputs were not committed, so the hashes of what it produced last time are kept.
    """
    manifest = read_manifest(run)
    before = (manifest.get("stages", {}).get(stage) or {}).get("lineage") or {}
    consumed = lineage(run, rd.STAGE_INPUTS.get(stage, ()) if consumes is None else consumes)
    manifest.update({"run_id": run.run_id, "config_hash": config_hash, "versions": versions(),
                     "git_commit": git_commit()})
    started = time.perf_counter()
    entry: dict[str, Any] = {"started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    # Recorded as running first: a process killed mid-stage (no `finally` runs) then leaves "running" with a pid
    # that is gone, which `obsfeed runs` reports as killed, instead of the previous run's "ok".
    entry["lineage"] = {"consumed": None, "produced": before.get("produced")}
    manifest.setdefault("stages", {})[stage] = {**entry, "status": "running", "pid": os.getpid(),
                                                "host": platform.node()}
    write_manifest(run, manifest)
    try:
        entry.update(work())
        entry["status"] = "ok"
        entry["lineage"] = {"consumed": consumed, "produced": lineage(run, rd.STAGE_OUTPUTS.get(stage, ())),
                            "settings": settings}
    except BaseException as e:
        entry.update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        entry["wall_s"] = round(time.perf_counter() - started, 3)
        entry["peak_rss_mb"] = peak_rss_mb()
        manifest = read_manifest(run) | {k: v for k, v in manifest.items() if k != "stages"}
        manifest.setdefault("stages", {})[stage] = entry
        write_manifest(run, manifest)
    return entry
