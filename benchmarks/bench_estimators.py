"""Estimator benchmark: ingest → fit → score → evaluate on simulator scenarios whose truth is known.

For each scenario (selection strength α, flip rates, confounding, size) it records what issue 5 asks to
show: propensity AUC against the true propensity's AUC and ECE, the bias of the weighted mean label as a share
of the naive bias, the anchor-point flip-rate estimates against the simulated ones, and whether the 95% CI of
the length effect covers the simulated verbosity effect (or 0 without confounding).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines import evaluate
from pipelines.cli import main as cli
from pipelines.simulate import SCENARIOS, Scenario, simulate, write
from schemas.config import load_config
from schemas.run_dir import RunDir

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Case:
    name: str
    scenario: Scenario


def cases(n: int) -> list[Case]:
    base = SCENARIOS["default"]
    return [
        Case("default (α 0.5, ρ 0.2/0.1)", replace(base, n_impressions=n)),
        Case("strong selection (α 0.1)", replace(SCENARIOS["strong_selection"], n_impressions=n)),
        Case("flips ρ 0.1/0.2", replace(base, n_impressions=n, rho01=0.1, rho10=0.2)),
        Case("no confounding", replace(SCENARIOS["no_confounding"], n_impressions=n)),
        Case("default, N/4", replace(base, n_impressions=n // 4)),
    ]


CONFIG = """[input]
impressions = "{data}/impressions/*.parquet"
signals = "{data}/signals.jsonl.gz"
truth = "{data}/truth.parquet"
[privacy]
allow_unkeyed = true
[fit]
categorical = ["model_version", "user_segment"]
"""


def run_case(case: Case, work: Path) -> dict[str, Any]:
    s = case.scenario
    data = CACHE / f"est-{s.n_impressions}-a{s.alpha}-r{s.rho01}-{s.rho10}-v{s.verbosity}-l{s.length_selection}"
    if not (data / "truth.parquet").exists():
        write(simulate(s), data, scenario=s)
    cfg_path = work / "cfg.toml"
    cfg_path.write_text(CONFIG.format(data=data))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    if cli(["run", str(cfg_path), str(run), "--stages", "ingest,fit,score"]) != 0:
        raise RuntimeError(f"{case.name}: the pipeline failed")
    ev = evaluate.run(RunDir(run), load_config(cfg_path))
    p, m, fr = ev["propensity"], ev["mean_label"], ev["flip_rates"]
    (length,) = [c for c in ev["confounders"] if c["treatment"] == "response_length"]
    naive = abs(m["bias"]["naive"])
    return {
        "case": case.name, "impressions": s.n_impressions, "units": ev["units"],
        "auc": p["auc"], "auc_true": p["auc_true"], "ece": p["ece"],
        "bias_naive": m["bias"]["naive"], "snips_share": abs(m["bias"]["snips"]) / naive,
        "dr_share": abs(m["bias"]["dr"]) / naive,
        "rho01": fr["estimated"]["rho01"], "rho10": fr["estimated"]["rho10"],
        "rho01_true": fr["true"]["rho01"], "rho10_true": fr["true"]["rho10"],
        "length_effect": length["effect"], "ci": (length["ci_low"], length["ci_high"]),
        "length_true": length["true"], "covered": length["covered"],
    }


def bench_estimators(n: int = 200_000) -> list[dict[str, Any]]:
    logging.disable(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    work = CACHE / "est-work"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases(n):
        print(f"  {case.name} ...", flush=True)
        rows.append(run_case(case, work))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def estimators_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| scenario | impressions | AUC (true p's AUC) | ECE | naive bias | SNIPS / naive | DR / naive "
            "| ρ̂01 (true) | ρ̂10 (true) | length effect [95% CI] | simulated | covered |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['impressions']:,} | {r['auc']:.3f} ({r['auc_true']:.3f}) | {r['ece']:.4f} "
            f"| {r['bias_naive']:+.4f} | {r['snips_share']:.0%} | {r['dr_share']:.0%} "
            f"| {r['rho01']:.3f} ({r['rho01_true']:.2f}) | {r['rho10']:.3f} ({r['rho10_true']:.2f}) "
            f"| {r['length_effect']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {r['length_true']:.4f} "
            f"| {'yes' if r['covered'] else 'no'} |")
    return lines
