"""Scheduled runs: one logical day at a time into one root, with Hive partitions that accumulate.

    ROOT/units/date=D/, quarantine/date=D/, datasets/pointwise/date=D/, datasets/pairwise/date=D/
    ROOT/days/D/            the day's run directory: config.toml, manifest.json, models/, reward_model/, report/
    ROOT/fits/A_B/          models fitted on the days A..B (``fit_window``), for ``--models-from``
    ROOT/catalogue.parquet  one row per day: status, counts, headline diagnostics, drift
    ROOT/.obsfeed.lock      held while anything writes the root

A day is computed in ``ROOT/.work/D`` (ingest reads the day's impressions and their signals up to
``ingest.late_window`` days later: ``transforms.window``), then published: each partition of the day replaces
the previous one by renames (``schemas.storage.commit_dir``: a reader sees the old day or the new one, never a
half-written one), the run directory goes to ``days/D``, and the catalogue row turns ``ok`` last. A day that
failed or was killed is ``failed`` or ``running`` in the catalogue and is simply run again; a backfill skips
the days already ``ok`` unless forced. The layout and its guarantees: docs/run-directory.md#scheduled-root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.orchestration.catalogue import day_row, read_catalogue, upsert
from pipelines.orchestration.lock import holder_alive, read_lock, root_lock
from pipelines.orchestration.registry import freeze_config, record_stage, run_stages
from schemas import catalogue as cat
from schemas import run_dir as rd
from schemas.config import Config, load_config
from schemas.errors import ConfigError, InputError
from schemas.manifest import describe_inputs, read_manifest, write_manifest
from schemas.run_dir import RunDir
from schemas.stages import INGEST, SCORE, DriftSummary, ReusedModels, ReusedModelsCounts, stage_result
from schemas.storage import commit_dir, parquet_files, recover_dir
from transforms.window import DayWindow

logger = logging.getLogger(__name__)

MODELS_MARKER = rd.WEIGHTS
"""A file every fitted ``models/`` folder has: how a ``--models-from`` path is recognised."""


def days_between(first: dt.date, last: dt.date) -> list[dt.date]:
    if last < first:
        raise ConfigError(f"--to {last} is before --from {first}")
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def partition(root: Path, name: str, day: dt.date) -> Path:
    return Path(root) / name / f"{rd.DATE_PARTITION}={day.isoformat()}"


def day_dir(root: Path, day: dt.date) -> Path:
    return Path(root) / rd.DAYS / day.isoformat()


def models_folder(path: Path) -> Path:
    """The fitted ``models/`` folder that ``path`` names: the folder itself, or a run / day / fit directory
    that holds one."""
    path = Path(path)
    for candidate in (path, path / rd.MODELS):
        if (candidate / MODELS_MARKER).is_file():
            return candidate
    raise InputError(f"{path}: no fitted models here (expected {rd.MODELS}/{MODELS_MARKER}: a run, day or fit "
                     "directory, or its models folder)")


def day_config(cfg: Config, day: dt.date) -> Config:
    """The config of one day's run: ingest restricted to the day, outputs unpartitioned (the day is the
    partition)."""
    return cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"day": day}),
                                  "output": cfg.output.model_copy(update={"partition_by": "none"})})


def plan(root: Path, days: Sequence[dt.date], *, force: bool) -> list[dict[str, Any]]:
    """What a run over ``days`` would do with each: run it, or skip it (already ok, and not forced)."""
    out = []
    for day in days:
        row = day_row(root, day)
        status = row[cat.STATUS] if row else None
        action = "skip" if status == cat.OK and not force else "run"
        out.append({"day": day.isoformat(), "action": action, "status": status,
                    "attempts": row["attempt"] if row else 0})
    return out


def dry_run(cfg: Config, root: Path, days: Sequence[dt.date], *, force: bool, models_from: Path | None,
            stages: Sequence[str]) -> dict[str, Any]:
    """Validate the config and inputs, and say what a run would do; writes nothing."""
    from schemas import impressions as imp
    from schemas import signals as sig
    from transforms.read import check_columns, input_files

    steps = plan(root, days, force=force)
    impressions: set[str] = set()
    signals: set[str] = set()
    for step in steps:
        if step["action"] == "run":                     # each day's own inputs ({date} paths), checked
            day_imps, day_sigs = input_files(day_config(cfg, dt.date.fromisoformat(step["day"])))
            step["impression_files"], step["signal_files"] = len(day_imps), len(day_sigs)
            impressions.update(day_imps)
            signals.update(day_sigs)
    check_columns(sorted(impressions), imp.SCHEMA)
    check_columns(sorted(signals), sig.SCHEMA)
    holder = read_lock(root)
    lock = "free" if holder is None else {True: "held", False: "stale", None: "held (other host)"}[
        holder_alive(holder)]
    return {"root": str(root), "impression_files": len(impressions), "signal_files": len(signals),
            "late_window": cfg.ingest.late_window, "stages": list(stages), "lock": lock,
            "models_from": str(models_folder(models_from)) if models_from else None, "days": steps}


def run_days(cfg: Config, root: Path, days: Sequence[dt.date], *, stages: Sequence[str], beam_args: Sequence[str],
             options: dict[str, dict[str, Any]] | None = None, force: bool = False,
             models_from: Path | None = None) -> list[dict[str, Any]]:
    """Run each of ``days`` in order under the root's lock (days already ok are skipped unless ``force``);
    stops at the first day that fails, which stays ``failed`` in the catalogue. Returns each day's row."""
    root = Path(root).resolve()
    models = models_folder(models_from) if models_from else None
    rows = []
    with root_lock(root):
        for item in plan(root, days, force=force):
            day = dt.date.fromisoformat(item["day"])
            if item["action"] == "skip":
                logger.info(f"{day}: already ok, skipped (--force to run it again)",
                            extra={"day": str(day), "event": "day_skipped"})
                rows.append(day_row(root, day))
                continue
            rows.append(run_day(cfg, root, day, stages=stages, beam_args=beam_args, options=options,
                                models=models))
    return rows


def run_day(cfg: Config, root: Path, day: dt.date, *, stages: Sequence[str], beam_args: Sequence[str],
            options: dict[str, dict[str, Any]] | None = None, models: Path | None = None) -> dict[str, Any]:
    """Compute ``day`` in the work folder and publish it; the catalogue says running, then ok or failed."""
    day_cfg = day_config(cfg, day)
    work = RunDir(Path(root) / rd.WORK / day.isoformat())
    shutil.rmtree(work.root, ignore_errors=True)             # a killed attempt's leftovers: start the day afresh
    work.root.mkdir(parents=True)
    previous = day_row(root, day)
    started = dt.datetime.now(dt.UTC)
    upsert(root, day, {cat.STATUS: cat.RUNNING, "attempt": (previous or {}).get("attempt", 0) + 1,
                       "started_at": started, "finished_at": None, "error": None, "stages": ",".join(stages),
                       "models_from": str(models) if models else None, "config_hash": day_cfg.digest()})
    logger.info(f"{day}: started ({', '.join(stages)}{'; models from ' + str(models) if models else ''})",
                extra={"day": str(day), "event": "day_started"})
    try:
        freeze_config(work, day_cfg)
        to_run = list(stages)
        if models is not None:
            _reuse_models(work, day_cfg, models)
            to_run = [s for s in to_run if s != "fit"]
        run_stages(work, day_cfg, to_run, beam_args, options)
        manifest = read_manifest(work)
        manifest["schedule"] = {"day": day.isoformat(), "late_window": cfg.ingest.late_window,
                                "models_from": str(models) if models else None,
                                "partitions": {name: str(partition(root, name, day)) for name in rd.PARTITIONED}}
        write_manifest(work, manifest)
        publish(work, root, day)
    except BaseException as e:
        upsert(root, day, {cat.STATUS: cat.FAILED, "finished_at": dt.datetime.now(dt.UTC),
                           "error": f"{type(e).__name__}: {e}"[:2000]})
        logger.error(f"{day}: failed: {type(e).__name__}: {e}", extra={"day": str(day), "event": "day_failed"})
        raise
    row = upsert(root, day, {cat.STATUS: cat.OK, "finished_at": dt.datetime.now(dt.UTC),
                             "final": dt.datetime.now(dt.UTC) >= DayWindow(day, cfg.ingest.late_window).late_end,
                             **headline(manifest)})
    logger.info(f"{day}: ok, {row['units'] or 0:,} units, {row['observed'] or 0:,} observed",
                extra={"day": str(day), "event": "day_done", "units": row["units"], "observed": row["observed"]})
    return row


def _reuse_models(work: RunDir, cfg: Config, models: Path) -> None:
    """Copy fitted models into the day's run directory and record them as its fit stage."""
    def reuse() -> ReusedModels:
        shutil.copytree(models, work.path(rd.MODELS))
        files = sorted(p for p in work.path(rd.MODELS).iterdir() if p.is_file())
        return ReusedModels(inputs=describe_inputs(sorted(p for p in models.iterdir() if p.is_file())),
                            outputs=[str(work.path(rd.MODELS))], reused_from=str(models),
                            counts=ReusedModelsCounts(files=len(files)), diagnostics={})

    logger.info(f"fit: reusing the models in {models}", extra={"stage": "fit", "event": "models_reused"})
    record_stage(work, "fit", cfg.digest(), reuse, consumes=())      # fitted elsewhere: nothing of this day


def publish(work: RunDir, root: Path, day: dt.date) -> None:
    """Swap the day's partitions into the dataset roots, then its run directory into ``days/D``.

    Each swap is atomic; the day as a whole is not (a crash between two swaps leaves some partitions new),
    which is why the catalogue row turns ok only after the last one, and a day not ok is run again. A
    partition this run did not produce (e.g. ``--stages ingest``) is removed: it would not match the new units.
    """
    for name in rd.PARTITIONED:
        target = partition(root, name, day)
        recover_dir(target)                               # a swap a killed run left half done
        staged = work.path(name)
        if staged.is_dir():
            commit_dir(staged, target)
        elif target.exists():
            gone = target.with_name(f".{target.name}.drop-{uuid.uuid4().hex[:12]}")
            os.replace(target, gone)
            shutil.rmtree(gone)
    recover_dir(day_dir(root, day))
    commit_dir(work.root, day_dir(root, day))
    with contextlib.suppress(OSError):                    # other days' work may be there
        (Path(root) / rd.WORK).rmdir()


def headline(manifest: dict[str, Any]) -> dict[str, Any]:
    """The catalogue's figures for a day, from the typed results its manifest recorded (None where a stage did
    not run)."""
    ingest, score = stage_result(manifest, INGEST), stage_result(manifest, SCORE)
    drift = (score.diagnostics.drift if score else None) or DriftSummary()
    return {
        "units": ingest.counts["impressions"].rows_ok if ingest else None,
        "signals_ok": ingest.counts["signals"].rows_ok if ingest else None,
        "quarantined": ingest.quarantined if ingest else None,
        "observed": ingest.diagnostics.observed if ingest else None,
        "label_rate": ingest.diagnostics.mean_label_observed if ingest else None,
        "pointwise_rows": score.counts.pointwise if score else None,
        "pairwise_rows": score.counts.pairs if score else None,
        "ess_share": score.diagnostics.ess_share if score else None,
        "propensity_psi": drift.propensity_psi,
        "label_rate_shift": drift.label_rate_shift,
        "signal_mix_shift": drift.signal_mix_shift,
    }


def fit_window(root: Path, first: dt.date, last: dt.date, beam_args: Sequence[str] = (),
               config: Path | None = None) -> Path:
    """Fit models on the units of the days ``first``..``last`` already published under ``root``; returns the
    fit directory (``ROOT/fits/<first>_<last>``), which ``--models-from`` accepts. The config is ``config``,
    or the last day's frozen one (without its day)."""
    root = Path(root).resolve()
    ok = {r[cat.DATE] for r in read_catalogue(root) if r[cat.STATUS] == cat.OK}
    days = [d for d in days_between(first, last) if d in ok and partition(root, rd.UNITS, d).is_dir()]
    if not days:
        raise InputError(f"{root}: no day between {first} and {last} is ok in the catalogue")
    source = config or day_dir(root, days[-1]) / rd.CONFIG
    if not Path(source).is_file():
        raise InputError(f"{source}: config not found (pass --config)")
    cfg = load_config(source)
    cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"day": None})})
    target = Path(root) / rd.FITS / f"{first.isoformat()}_{last.isoformat()}"
    with root_lock(root):
        shutil.rmtree(target, ignore_errors=True)
        run = RunDir(target)
        for d in days:                                   # hard links: no copy, and a later re-run of a day
            dest = run.path(rd.UNITS) / f"{rd.DATE_PARTITION}={d.isoformat()}"   # replaces files, not these
            dest.mkdir(parents=True)
            for f in parquet_files(partition(root, rd.UNITS, d)):
                _link_or_copy(f, dest / f.name)
        freeze_config(run, cfg)
        logger.info(f"fit: {len(days)} days ({days[0]}..{days[-1]}) into {target}", extra={"event": "fit_window"})
        run_stages(run, cfg, ["fit"], beam_args)
    return target


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)

