"""Running stages into a run directory: each recorded in the manifest, ``_SUCCESS`` last (docs/run-directory.md)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config
from schemas.errors import InputError
from schemas.manifest import lineage, read_manifest, stale_stages, write_manifest
from schemas.run_dir import RunDir
from schemas.stages import BY_NAME, FIT, INGEST, REPORT, SCORE, STAGES, TRAIN, StageRecord, StageResult, stage_record
from schemas.storage import atomic_write_text, read_dataset, remove_dead_scratch

logger = logging.getLogger(__name__)

PACKAGES = ("obsfeed", "apache-beam", "pyarrow", "polars", "pandas", "scikit-learn", "econml", "torch", "skops",
            "great-expectations", "numpy", "scipy", "matplotlib")


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


def _high_water_kib() -> int | None:
    """This process's own peak resident memory since it started (Linux: ``VmHWM``), or None where unknown."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return int(line.split()[1]) if line else None


_INHERITED_KIB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if sys.platform != "darwin" else 0
"""``ru_maxrss`` when this module was imported. Linux carries a parent's peak through fork and exec into the
child's ``ru_maxrss`` (a stage launched by a process that once held 5 GB reports 5 GB), so the figure at start-up
is mostly the launcher's, not ours: it is what :func:`peak_rss_mb` discounts."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its waited-for children, in MiB: this process's own high-water mark
    (``VmHWM``; ``ru_maxrss`` where /proc is not there), and the children's ``ru_maxrss`` only where it exceeds what
    this process inherited from its launcher (see ``_INHERITED_KIB``)."""
    own_kib = _high_water_kib()
    if own_kib is None:
        own_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if sys.platform == "darwin":                                     # bytes there
        return round(max(own_kib, kids) / 1024 / 1024, 1)
    kids_kib = kids if kids > _INHERITED_KIB else 0
    return round(max(own_kib, kids_kib) / 1024, 1)


def record_stage(run: RunDir, stage: str, config_hash: str, work: Callable[[], StageResult],
                 consumes: Sequence[str] | None = None, settings: str | None = None) -> StageRecord:
    """Run ``work`` and record its typed result under ``stages.<stage>``, with status, timing, memory, versions
    and lineage: the content hashes of the run-directory inputs it consumed (``consumes``, by default the
    stage's declared inputs) and of the outputs it produced, and the digest of the settings it ran with.

    A failed stage is recorded as failed (then the error propagates), so a run is never left looking complete;
    its outputs were not committed, so the hashes of what it produced last time are kept.
    """
    spec = BY_NAME[stage]
    manifest = read_manifest(run)
    before = (manifest.get("stages", {}).get(stage) or {}).get("lineage") or {}
    consumed = lineage(run, spec.inputs if consumes is None else consumes)
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
        result = work()
        if not isinstance(result, (spec.result, *spec.recorded_instead)):
            raise TypeError(f"stage {stage} returned {type(result).__name__}, not its declared "
                            f"{spec.result.__name__}")
        entry.update(result.to_manifest())
        entry["status"] = "ok"
        entry["lineage"] = {"consumed": consumed, "produced": lineage(run, spec.outputs), "settings": settings}
    except BaseException as e:
        entry.update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        entry["wall_s"] = round(time.perf_counter() - started, 3)
        entry["peak_rss_mb"] = peak_rss_mb()
        manifest = read_manifest(run) | {k: v for k, v in manifest.items() if k != "stages"}
        manifest.setdefault("stages", {})[stage] = entry
        write_manifest(run, manifest)
    return StageRecord.model_validate(entry)


Executor = Callable[..., StageResult]
"""A stage's ``execute(run, cfg, beam_args, **options)``: it reads and writes only the run directory."""


def _ingest() -> Executor:
    from pipelines import ingest
    return ingest.execute


def _fit() -> Executor:
    from pipelines import fit
    return fit.execute


def _score() -> Executor:
    from pipelines import score
    return score.execute


def _train() -> Executor:
    from pipelines import train
    return train.execute


def _report() -> Executor:
    from pipelines import report
    return report.execute


EXECUTORS: dict[str, Callable[[], Executor]] = {
    INGEST.name: _ingest, FIT.name: _fit, SCORE.name: _score, TRAIN.name: _train, REPORT.name: _report,
}
"""Stage name → its executor, imported on first use (Beam and torch are heavy, and `obsfeed runs` needs neither)."""


PAIR_LOSSES = ("bt",)
"""Losses that train on the pairwise dataset."""


def why_no_pairs(units_dir: Path, cfg: Config) -> str | None:
    """Why the score stage can make no pair from these units, or None when some prompt has two candidates: two
    responses with a label (``score.pair_target = "label"``) or two responses at all (``"target_dr"``)."""
    t = read_dataset(units_dir, [un.PROMPT_ID, un.OBSERVED])
    if cfg.score.pair_target == "label":
        t = t.filter(pc.equal(t[un.OBSERVED], 1))
    per_prompt = pc.value_counts(t[un.PROMPT_ID]).field("counts") if t.num_rows else pa.array([], pa.int64())
    if pc.sum(pc.greater_equal(per_prompt, 2)).as_py():
        return None
    what = "two responses with labels" if cfg.score.pair_target == "label" else "two responses"
    return (f"no prompt has {what} (score.pair_target = {cfg.score.pair_target!r}), so the pairwise dataset "
            f"would be empty and loss 'bt' has nothing to train on")


def run_stages(run: RunDir, cfg: Config, stages: Sequence[str], beam_args: Sequence[str],
               options: dict[str, dict[str, Any]] | None = None) -> dict[str, StageRecord]:
    """Run ``stages`` in order, recording each in the manifest; ``_SUCCESS`` last, only if every stage is ok and
    none is stale (each ran on the outputs now in the run directory). The caller holds the run's lock.
    ``options``: stage name → keyword arguments for its executor (e.g. ``{"train": {"resume": True}}``)."""
    success = run.path(rd.SUCCESS)
    success.unlink(missing_ok=True)
    for path in remove_dead_scratch(run.root):
        logger.info(f"removed {path.name}, left by a killed run", extra={"event": "scratch_removed"})
    results = {}
    if "train" in stages:                                  # a bad backbone fails before ingest, not after fit
        from pipelines import train

        train.preflight(cfg)
    wants_pairs = "train" in stages and "score" in stages and any(
        loss in PAIR_LOSSES for loss in (cfg.train.loss, *cfg.train.baselines))
    for name in stages:
        if name == "fit" and wants_pairs and run.path(rd.UNITS).is_dir():       # refused before fit, not in train
            reason = why_no_pairs(run.path(rd.UNITS), cfg)
            if reason:
                raise InputError(f"{run.path(rd.UNITS)}: {reason}; drop it from train.loss/train.baselines")
        logger.info(f"{name}: started", extra={"stage": name, "event": "stage_started"})
        fn, kwargs = EXECUTORS[name](), (options or {}).get(name, {})
        results[name] = record_stage(run, name, cfg.digest(), lambda fn=fn, kw=kwargs: fn(run, cfg, beam_args, **kw),
                                     settings=cfg.stage_digest(name))
        logger.info(f"{name}: done in {results[name].wall_s:.1f}s",
                    extra={"stage": name, "event": "stage_done", "wall_s": results[name].wall_s})
    manifest = read_manifest(run)
    stale = stale_stages(manifest, STAGES, {s: cfg.stage_digest(s) for s in STAGES})
    if stale:
        logger.warning(f"stale: {', '.join(stale)} ran on outputs rewritten since, or with other settings; run "
                       f"{'them' if len(stale) > 1 else 'it'} again for a complete run",
                       extra={"event": "stale", "stages": stale})
    if all((e := stage_record(manifest, s)) is not None and e.status == "ok" for s in STAGES) and not stale:
        atomic_write_text(success, json.dumps({"run_id": run.run_id, "config_hash": cfg.digest(),
                                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return results


def freeze_config(run: RunDir, cfg: Config) -> None:
    """Keep the exact config used (input paths resolved) as ``RUN/config.toml``."""
    atomic_write_text(run.config_path, cfg.to_toml())
