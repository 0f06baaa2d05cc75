"""Fit and score scaling: this commit's fit and score stages against a baseline commit's, in the same run.

For each size, the simulator's default world is ingested once (this commit's ingest), then the fit stage and the
score stage run on copies of that run directory, each as ``obsfeed run --stages <stage>`` in a fresh process: once
with this checkout's code and once with the baseline commit's (a ``git worktree`` of it put first on PYTHONPATH,
so the same installed libraries run the other code). The figures are the manifest's ``wall_s`` and
``peak_rss_mb`` of each stage and, for this commit's fit, its ``seconds`` per part and the thread-seconds of each
nuisance model; the ratios are this commit over the baseline, measured alternately in one run.

Score's memory at 4x the largest size: the simulator cannot build 4M impressions on this machine (about 21 GB), so
the largest size's units are copied four times (each copy's ``impression_id`` and ``prompt_id`` suffixed, so every
unit and prompt is new; each part four times as large, as ingest would write it) and scored with this commit's code
and the same fitted models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.bench_estimators import CONFIG
from pipelines.sources.simulator import SCENARIOS, simulate, write
from schemas.config import OutputConfig
from schemas.storage import write_part

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
SIZES = (50_000, 200_000, 1_000_000)
SCALE_UP = 4
"""Score's memory is measured again on the largest size's units copied this many times."""
BASELINE = os.environ.get("OBSFEED_BENCH_BASELINE", "954be9f")
"""The commit the ratios are against: the last one before issue 20's fit and score work."""

def simulated(n: int) -> Path:
    out = CACHE / f"fit-{n}-seed0"
    if not (out / "truth.parquet").exists():
        scenario = replace(SCENARIOS["default"], n_impressions=n)
        write(simulate(scenario), out, scenario=scenario)
    return out


def baseline_tree(ref: str) -> Path:
    """A worktree of ``ref`` under the cache (made once per commit)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = CACHE / f"baseline-{sha}"
    if not (tree / "pipelines").exists():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def run_stage(code: Path, cfg: Path, run: Path, stage: str) -> dict[str, Any]:
    """One stage in a fresh process running the code under ``code``; its manifest record."""
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "pipelines.orchestration.cli", "run", str(cfg), str(run),
                           "--stages", stage], cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{stage} at {code} failed:\n{done.stderr[-3000:]}")
    return json.loads((run / "manifest.json").read_text())["stages"][stage]


def bench_fit(sizes: tuple[int, ...] = SIZES, baseline: str = BASELINE) -> dict[str, Any]:
    old = baseline_tree(baseline)
    work = CACHE / "fit-work"
    rows = []
    for n in sizes:
        data = simulated(n)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cfg = work / "cfg.toml"
        cfg.write_text(CONFIG.format(data=data, fit=""))   # the estimators benchmark's config
        ingested = work / "ingested"
        print(f"  {n:,} impressions: ingest ...", flush=True)
        run_stage(ROOT, cfg, ingested, "ingest")
        row: dict[str, Any] = {"impressions": n}
        for name, code in (("baseline", old), ("this", ROOT)):
            run = work / name
            shutil.copytree(ingested, run)
            for stage in ("fit", "score"):
                print(f"  {n:,} impressions: {stage}, {name} code ...", flush=True)
                record = run_stage(code, cfg, run, stage)
                row[f"{stage}_{name}"] = {"wall_s": record["wall_s"], "peak_rss_mb": record["peak_rss_mb"],
                                          "seconds": record.get("diagnostics", {}).get("seconds"),
                                          "model_seconds": record.get("diagnostics", {}).get("model_seconds"),
                                          "units": record.get("counts", {}).get("units"),
                                          "sample": record.get("counts", {}).get("sample")}
            if name == "this" and n == max(sizes):
                scaled = work / "scaled"
                replicate_run(run, scaled, SCALE_UP)
                print(f"  {n * SCALE_UP:,} units (copies): score, this code ...", flush=True)
                record = run_stage(ROOT, cfg, scaled, "score")
                row["score_scaled"] = {"units": record["counts"]["units"], "wall_s": record["wall_s"],
                                       "peak_rss_mb": record["peak_rss_mb"]}
                shutil.rmtree(scaled)
            shutil.rmtree(run)
        rows.append(row)
        print(f"    fit {row['fit_this']['wall_s']:.1f} s against {row['fit_baseline']['wall_s']:.1f} s, score "
              f"{row['score_this']['wall_s']:.1f} s against {row['score_baseline']['wall_s']:.1f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"baseline": baseline, "rows": rows}


def replicate_run(run: Path, out: Path, copies: int) -> None:
    """``out``: ``run``'s models and manifest, and its units with each part holding ``copies`` copies of its rows,
    ids suffixed ``-c<k>`` (new units and new prompts), sorted by impression_id as ingest writes a part."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("units", "datasets", "reward_model", "report"))
    (out / "units").mkdir()
    for part in sorted((run / "units").glob("*.parquet")):
        table = pq.read_table(part)
        tables = []
        for k in range(copies):
            t = table
            for col in ("impression_id", "prompt_id"):
                i = t.schema.get_field_index(col)
                ids = pc.binary_join_element_wise(t[col].cast(pa.string()), pa.scalar(f"c{k}"), "-")
                t = t.set_column(i, t.schema.field(i), ids.cast(t.schema.field(i).type))
            tables.append(t)
        write_part(pa.concat_tables(tables).sort_by("impression_id"), out / "units" / part.name, OutputConfig())


def fit_table(result: dict[str, Any]) -> list[str]:
    """RESULTS.md rows: times (absolute seconds are printed beside the ratio only for the fit target, which the
    issue states in seconds), ratios against the baseline, peak RSS per stage, and the share of fit per part."""
    lines = ["| impressions | fit sample | fit s (baseline s) | fit this / baseline | score s (baseline s) | "
             "score this / baseline | fit + score s | peak RSS fit MB (baseline) | peak RSS score MB (baseline) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f, fb, s, sb = r["fit_this"], r["fit_baseline"], r["score_this"], r["score_baseline"]
        lines.append(f"| {r['impressions']:,} | {f['sample']:,} | {f['wall_s']:.1f} ({fb['wall_s']:.1f}) | "
                     f"{f['wall_s'] / fb['wall_s']:.2f} | {s['wall_s']:.1f} ({sb['wall_s']:.1f}) | "
                     f"{s['wall_s'] / sb['wall_s']:.2f} | {f['wall_s'] + s['wall_s']:.1f} | "
                     f"{f['peak_rss_mb']:,.0f} ({fb['peak_rss_mb']:,.0f}) | "
                     f"{s['peak_rss_mb']:,.0f} ({sb['peak_rss_mb']:,.0f}) |")
    scaled = [r for r in result["rows"] if "score_scaled" in r]
    for r in scaled:
        big, base = r["score_scaled"], r["score_this"]
        lines += ["", f"Score's peak memory with the data ({r['impressions']:,} units against {big['units']:,}: the "
                  f"same units copied {big['units'] // r['score_this']['units']} times, this commit's code): "
                  f"{base['peak_rss_mb']:,.0f} MB against {big['peak_rss_mb']:,.0f} MB, a ratio of "
                  f"{big['peak_rss_mb'] / base['peak_rss_mb']:.2f} (target ≤ 1.3); time ratio "
                  f"{big['wall_s'] / base['wall_s']:.2f} for {big['units'] / base['units']:.0f}x the units."]
    parts = sorted({p for r in result["rows"] for p in (r["fit_this"]["seconds"] or {})})
    lines += ["", "Share of this commit's fit wall time per part (the rest: reading, sampling, diagnostics); "
              "nuisance models' thread-seconds per job:", "",
              "| impressions | " + " | ".join(parts) + " | propensity thread-s | outcome thread-s |",
              "|---|" + "---|" * (len(parts) + 2)]
    for r in result["rows"]:
        f = r["fit_this"]
        shares = [f"{(f['seconds'] or {}).get(p, 0) / f['wall_s']:.0%}" for p in parts]
        ms = f["model_seconds"] or {}
        lines.append(f"| {r['impressions']:,} | " + " | ".join(shares)
                     + f" | {ms.get('propensity', 0):.1f} | {ms.get('outcome', 0):.1f} |")
    return lines
