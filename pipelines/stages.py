"""Running stages into a run directory: each recorded in the manifest, ``_SUCCESS`` last (DESIGN §3-§4)."""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.logs import log
from pipelines.manifest import read_manifest, record_stage
from schemas import run_dir as rd
from schemas.config import Config
from schemas.run_dir import RunDir
from transforms.io import atomic_write_text

STAGES = ("ingest", "fit", "score", "train", "report")


def stage_function(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run(run_dir, cfg, beam_args)`` of a stage, imported lazily (torch and Beam are heavy)."""
    return importlib.import_module(f"pipelines.{name}").run


def run_stages(run: RunDir, cfg: Config, stages: Sequence[str], beam_args: Sequence[str],
               options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ``stages`` in order, recording each in the manifest; ``_SUCCESS`` last, only if every stage is ok.
    ``options``: stage name → keyword arguments for its ``run`` (e.g. ``{"train": {"resume": True}}``)."""
    success = run.path(rd.SUCCESS)
    success.unlink(missing_ok=True)
    results = {}
    for name in stages:
        log(f"{name}: started", stage=name, event="stage_started")
        fn, kwargs = stage_function(name), (options or {}).get(name, {})
        results[name] = record_stage(run, name, cfg.digest(), lambda fn=fn, kw=kwargs: fn(run, cfg, beam_args, **kw))
        log(f"{name}: done in {results[name]['wall_s']:.1f}s", stage=name, event="stage_done",
            wall_s=results[name]["wall_s"])
    manifest = read_manifest(run)
    if all(manifest.get("stages", {}).get(s, {}).get("status") == "ok" for s in STAGES):
        atomic_write_text(success, json.dumps({"run_id": run.run_id, "config_hash": cfg.digest(),
                                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return results


def freeze_config(run: RunDir, cfg: Config) -> None:
    """Keep the exact config used (input paths resolved) as ``RUN/config.toml``."""
    atomic_write_text(run.config_path, cfg.to_toml())
