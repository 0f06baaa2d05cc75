"""Running stages into a run directory: each recorded in the manifest, ``_SUCCESS`` last (DESIGN §3-§4)."""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.logs import log
from pipelines.manifest import read_manifest, record_stage, stale_stages
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config
from schemas.errors import InputError
from schemas.run_dir import RunDir
from transforms.io import atomic_write_text, read_dataset, remove_dead_scratch

STAGES = ("ingest", "fit", "score", "train", "report")


def stage_function(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run(run_dir, cfg, beam_args)`` of a stage, imported lazily (torch and Beam are heavy)."""
    return importlib.import_module(f"pipelines.{name}").run


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
               options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ``stages`` in order, recording each in the manifest; ``_SUCCESS`` last, only if every stage is ok and
    none is stale (each ran on the outputs now in the run directory). The caller holds the run's lock.
    ``options``: stage name → keyword arguments for its ``run`` (e.g. ``{"train": {"resume": True}}``)."""
    success = run.path(rd.SUCCESS)
    success.unlink(missing_ok=True)
    for path in remove_dead_scratch(run.root):
        log(f"removed {path.name}, left by a killed run", event="scratch_removed")
    results = {}
    if "train" in stages:                                  # a bad backbone fails before ingest, not after fit
        importlib.import_module("pipelines.train").preflight(cfg)
    wants_pairs = "train" in stages and "score" in stages and any(
        loss in PAIR_LOSSES for loss in (cfg.train.loss, *cfg.train.baselines))
    for name in stages:
        if name == "fit" and wants_pairs and run.path(rd.UNITS).is_dir():       # refused before fit, not in train
            reason = why_no_pairs(run.path(rd.UNITS), cfg)
            if reason:
                raise InputError(f"{run.path(rd.UNITS)}: {reason}; drop it from train.loss/train.baselines")
        log(f"{name}: started", stage=name, event="stage_started")
        fn, kwargs = stage_function(name), (options or {}).get(name, {})
        results[name] = record_stage(run, name, cfg.digest(), lambda fn=fn, kw=kwargs: fn(run, cfg, beam_args, **kw),
                                     settings=cfg.stage_digest(name))
        log(f"{name}: done in {results[name]['wall_s']:.1f}s", stage=name, event="stage_done",
            wall_s=results[name]["wall_s"])
    manifest = read_manifest(run)
    stale = stale_stages(manifest, STAGES, {s: cfg.stage_digest(s) for s in STAGES})
    if stale:
        log(f"stale: {', '.join(stale)} ran on outputs rewritten since, or with other settings; run "
            f"{'them' if len(stale) > 1 else 'it'} again for a complete run", level="warning", event="stale",
            stages=stale)
    if all(manifest.get("stages", {}).get(s, {}).get("status") == "ok" for s in STAGES) and not stale:
        atomic_write_text(success, json.dumps({"run_id": run.run_id, "config_hash": cfg.digest(),
                                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return results


def freeze_config(run: RunDir, cfg: Config) -> None:
    """Keep the exact config used (input paths resolved) as ``RUN/config.toml``."""
    atomic_write_text(run.config_path, cfg.to_toml())
