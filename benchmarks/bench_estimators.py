"""Estimator benchmark: ingest → fit → score → evaluate on simulator scenarios whose truth is known.

For each scenario (selection strength α, flip rates, confounding, size) it records what issue 5 asks to
show: propensity AUC against the true propensity's AUC and ECE, the bias of the weighted mean label as a share
of the naive bias, the anchor-point flip-rate estimates against the simulated ones, and whether the 95% CI of
the length effect covers the simulated verbosity effect (or 0 without confounding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pipelines import evaluate
from pipelines.cli import main as cli
from pipelines.simulate import LOGGED_PROPENSITY, SCENARIOS, Scenario, simulate, write
from schemas.config import load_config
from schemas.run_dir import RunDir

CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Case:
    name: str
    scenario: Scenario
    fit: str = ""          # extra [fit] lines of the config


def cases(n: int) -> list[Case]:
    base = SCENARIOS["default"]
    return [
        Case("default (α 0.5, ρ 0.2/0.1)", replace(base, n_impressions=n)),
        Case("strong selection (α 0.1)", replace(SCENARIOS["strong_selection"], n_impressions=n)),
        Case("strong selection, logged propensity", replace(SCENARIOS["strong_selection"], n_impressions=n,
                                                            log_propensity=True),
             fit=f'propensity_column = "{LOGGED_PROPENSITY}"'),
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
{fit}
"""


def run_case(case: Case, work: Path) -> dict[str, Any]:
    s = case.scenario
    key = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:12]
    data = CACHE / f"est-{s.n_impressions}-{key}"
    if not (data / "truth.parquet").exists():
        write(simulate(s), data, scenario=s)
    cfg_path = work / "cfg.toml"
    cfg_path.write_text(CONFIG.format(data=data, fit=case.fit))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    if cli(["run", str(cfg_path), str(run), "--stages", "ingest,fit,score"]) != 0:
        raise RuntimeError(f"{case.name}: the pipeline failed")
    ev = evaluate.run(RunDir(run), load_config(cfg_path))
    p, m, fr, mr = ev["propensity"], ev["mean_label"], ev["flip_rates"], ev["mean_reward"]
    (length,) = [c for c in ev["confounders"] if c["treatment"] == "response_length"]
    naive = abs(m["bias"]["naive"])
    anchor, audit = fr["estimated"]["estimates"]["anchor"], fr["estimated"]["estimates"]["audit"]
    return {
        "case": case.name, "impressions": s.n_impressions, "units": ev["units"],
        "auc": p["auc"], "auc_true": p["auc_true"], "ece": p["ece"],
        "bias": m["bias"], "se": m["se"],
        "snips_share": abs(m["bias"]["snips"]) / naive, "dr_share": abs(m["bias"]["dr"]) / naive,
        "anchor": (anchor["rho01"], anchor["rho10"]), "rho_true": (fr["true"]["rho01"], fr["true"]["rho10"]),
        "audit": (audit["rho01"], audit["rho10"]) if audit else None, "audit_n": audit["n"] if audit else 0,
        "audit_reference": (fr["clean_vs_given_observed"]["rho01"], fr["clean_vs_given_observed"]["rho10"]),
        "mean_reward": mr,
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
    head = ("| scenario | impressions | AUC (true p's AUC) | ECE | naive bias | SNIPS bias ± se (share of naive) "
            "| DR bias ± se (share) | anchors ρ̂01, ρ̂10 (simulated) | audit ρ̂01, ρ̂10 (given vs r* on observed) "
            "| mean r*: true, PPI [95% CI] | length effect [95% CI] | simulated | covered |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        b, se = r["bias"], r["se"]
        audit = (f"{r['audit'][0]:.3f}, {r['audit'][1]:.3f} ({r['audit_reference'][0]:.3f}, "
                 f"{r['audit_reference'][1]:.3f}; n {r['audit_n']})" if r["audit"] else "too few audited")
        mr = r["mean_reward"]
        ppi = (f"{mr['true']:.4f}, {mr['ppi']['estimate']:.4f} [{mr['ppi']['ci_low']:.4f}, "
               f"{mr['ppi']['ci_high']:.4f}]" if mr else "no audit")
        lines.append(
            f"| {r['case']} | {r['impressions']:,} | {r['auc']:.3f} ({r['auc_true']:.3f}) | {r['ece']:.4f} "
            f"| {b['naive']:+.4f} | {b['snips']:+.4f} ± {se['snips']:.4f} ({r['snips_share']:.0%}) "
            f"| {b['dr']:+.4f} ± {se['dr']:.4f} ({r['dr_share']:.0%}) "
            f"| {r['anchor'][0]:.3f}, {r['anchor'][1]:.3f} ({r['rho_true'][0]:.2f}, {r['rho_true'][1]:.2f}) "
            f"| {audit} | {ppi} "
            f"| {r['length_effect']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | {r['length_true']:.4f} "
            f"| {'yes' if r['covered'] else 'no'} |")
    return lines
