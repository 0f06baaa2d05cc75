"""`manifest.json`: what each stage read, wrote, counted and measured (docs/run-directory.md), and the content hashes
(lineage) that tell a stale stage from a current one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from schemas import run_dir as rd
from schemas.run_dir import RunDir
from schemas.stages import BY_NAME, StageResult, StageSpec
from schemas.storage import atomic_write_text


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


def _spec(name: str) -> StageSpec:
    """A stage's declaration; a name the manifest holds but no stage declares reads and writes nothing."""
    return BY_NAME.get(name) or StageSpec(name=name, inputs=(), outputs=(), result=StageResult)


def stale_stages(manifest: dict[str, Any], order: Sequence[str], settings: dict[str, str] | None = None,
                 ) -> list[str]:
    """The stages recorded ok whose inputs are not what they consumed: an input rewritten since by its
    producer (its recorded output hash differs), or produced by a stage that is itself stale; or that ran with
    other settings than ``settings`` (stage → ``Config.stage_digest`` of the run's config now). A stage
    recorded before lineage existed is stale once a stage it reads from has run with lineage."""
    stages = manifest.get("stages", {})
    producer = {name: s for s in order for name in _spec(s).outputs}
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
            upstream = {producer.get(name) for name in _spec(s).inputs}
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


def read_manifest(run: RunDir) -> dict[str, Any]:
    path = run.path(rd.MANIFEST)
    return json.loads(path.read_text()) if path.exists() else {"run_id": run.run_id, "stages": {}}


def write_manifest(run: RunDir, manifest: dict[str, Any]) -> None:
    atomic_write_text(run.path(rd.MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
