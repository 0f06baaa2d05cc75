"""Vote aggregation benchmark (issue 17): several raters per reply, `ingest.aggregate = "mean"` against "latest".

The simulator's ``three_raters`` scenario (the default world, three raters on every observed impression, each with
their own leaning and noise draws) for seeds 0, 1, 2; for each seed the pipeline runs twice on the same logs,
once per aggregate (ingest, fit, score, train with the ips loss and the naive baseline), and ``obsfeed evaluate``
gives each reward model's R² against ``reward_true`` over every unit. "latest" keeps whichever vote came last
(one rater's, by chance); "mean" keeps the three votes as a soft label, which halves the label variance the
reward model has to average away.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from typing import Any

import numpy as np

from benchmarks.bench_estimators import CACHE
from benchmarks.bench_estimators import CONFIG as ESTIMATORS_CONFIG
from pipelines import evaluate
from pipelines.orchestration.cli import main as cli
from pipelines.sources.simulator import SCENARIOS, simulate, write
from schemas.config import load_config
from schemas.run_dir import RunDir

AGGREGATES = ("latest", "mean")
LOSSES = ("ips", "naive")

CONFIG = ESTIMATORS_CONFIG + """[ingest]
aggregate = "{aggregate}"
[train]
loss = "ips"
baselines = ["naive"]
hash_features = 65536
seed = {seed}
"""
"""The estimator benchmark's config (simulated inputs, default fit) with the aggregate and a small trainer."""


def bench_votes(n: int = 20_000, seeds: tuple[int, ...] = (0, 1, 2), raters: int = 3) -> dict[str, Any]:
    """Reward-model R² vs r* for each seed, aggregate and loss, and the units' votes distribution."""
    logging.disable(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    work = CACHE / "votes-work"
    work.mkdir(parents=True, exist_ok=True)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        scenario = replace(SCENARIOS["three_raters"], n_impressions=n, seed=seed, raters_per_impression=raters)
        data = CACHE / f"votes-{n}-raters{raters}-seed{seed}"
        if not (data / "truth.parquet").exists():
            write(simulate(scenario), data, scenario=scenario)
        result: dict[str, Any] = {"seed": seed}
        for aggregate in AGGREGATES:
            print(f"  seed {seed}, aggregate = {aggregate} ...", flush=True)
            cfg_path = work / "cfg.toml"
            cfg_path.write_text(CONFIG.format(data=data, fit="", aggregate=aggregate, seed=seed))
            run = work / "run"
            shutil.rmtree(run, ignore_errors=True)
            if cli(["run", str(cfg_path), str(run), "--stages", "ingest,fit,score,train"]) != 0:
                raise RuntimeError(f"seed {seed}, aggregate {aggregate}: the pipeline failed")
            ev = evaluate.execute(RunDir(run), load_config(cfg_path))
            result[aggregate] = {loss: ev["reward"]["by_loss"][loss]["r2"] for loss in LOSSES}
            result["units"], result["observed"] = ev["units"], _observed(RunDir(run))
        per_seed.append(result)
    shutil.rmtree(work, ignore_errors=True)
    return {"impressions": n, "raters": raters, "seeds": list(seeds), "per_seed": per_seed}


def _observed(run: RunDir) -> int:
    from schemas.manifest import read_manifest
    from schemas.stages import INGEST, stage_result

    return stage_result(read_manifest(run), INGEST).diagnostics.observed


def votes_table(result: dict[str, Any]) -> list[str]:
    """R² vs r* per loss and aggregate (mean ± sd over the seeds, and each seed), and mean − latest per seed."""
    rows = ["| loss | aggregate | R² vs r* (mean ± sd) | per seed | mean − latest, per seed | mean better in |",
            "|---|---|---|---|---|---|"]
    for loss in LOSSES:
        r2 = {a: np.array([s[a][loss] for s in result["per_seed"]]) for a in AGGREGATES}
        diff = r2["mean"] - r2["latest"]
        for a in AGGREGATES:
            gain = (", ".join(f"{d:+.3f}" for d in diff), f"{int((diff > 0).sum())} of {diff.size} seeds") \
                if a == "mean" else ("—", "—")
            rows.append(f"| {loss} | {a} | {r2[a].mean():.3f} ± {r2[a].std(ddof=1):.3f} "
                        f"| {', '.join(f'{v:.3f}' for v in r2[a])} | {gain[0]} | {gain[1]} |")
    return rows
