"""Estimator benchmark: ingest → fit → score → evaluate on simulator scenarios whose truth is known.

For each scenario (selection strength α, flip rates, confounding, audit, size) it records the mean clean reward
E[r*] and every estimate's bias against it (``clean_table``: the naive mean label, SNIPS and DR of the label, the
clean-reward target, the audit's PPI++ and calibrated means with their CIs), then the selection diagnostics
(``estimators_table``): propensity AUC and ECE, the bias of the weighted mean label against the mean *label* (the
secondary figure: what selection correction alone targets), the flip-rate estimates against the simulated
ones, and whether the 95% CI of the length effect covers the simulated verbosity effect.
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
from pipelines.orchestration.cli import main as cli
from pipelines.sources.simulator import LOGGED_PROPENSITY, SCENARIOS, Scenario, simulate, write
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
        Case("default, no audit", replace(base, n_impressions=n, gold_share=0.0)),
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


STABILISED = """[weights]
stabilize = "monotone"
"""
"""The benchmark's weight_stabilized is the monotone one; the DR variants are rebuilt by evaluate at the default
switch_tau and shrink_lambda (target_dr stays the standard one, so the other columns are unchanged)."""


def run_case(case: Case, work: Path) -> dict[str, Any]:
    s = case.scenario
    key = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:12]
    data = CACHE / f"est-{s.n_impressions}-{key}"
    if not (data / "truth.parquet").exists():
        write(simulate(s), data, scenario=s)
    cfg_path = work / "cfg.toml"
    cfg_path.write_text(CONFIG.format(data=data, fit=case.fit) + STABILISED)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    if cli(["run", str(cfg_path), str(run), "--stages", "ingest,fit,score"]) != 0:
        raise RuntimeError(f"{case.name}: the pipeline failed")
    ev = evaluate.execute(RunDir(run), load_config(cfg_path))
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
        "stabilised": ev["stabilised"],
        "clean": ev["clean_reward"], "noise": fr["estimated"],
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


CLEAN_COLUMNS = (("snips", "SNIPS of the label"), ("dr", "DR of the label"),
                 ("noise_corrected", "clean target (mean of target_noise_corrected)"))


def clean_table(rows: list[dict[str, Any]]) -> list[str]:
    """The mean clean reward E[r*] (mean reward_true over all units) and each estimate's bias, with its share of the
    naive bias: what the clean-reward target is for. The audit's own interval estimates (PPI++, and the
    calibration's mean with its bootstrap CI) with whether they cover the truth."""
    head = ("| scenario | impressions | fit.noise used | E[r*] | naive bias | "
            + " | ".join(f"{t} bias (share of naive)" for _, t in CLEAN_COLUMNS)
            + " | PPI++ [95% CI] | calibrated mean [95% CI] |")
    lines = [head, "|" + "---|" * (7 + len(CLEAN_COLUMNS))]
    for r in rows:
        c = r["clean"]
        cells = [f"{c['bias'][k]:+.4f} ({c['share_of_naive'][k]:.0%})" for k, _ in CLEAN_COLUMNS]
        intervals = []
        for key in ("ppi", "calibrated"):
            e = ((r["noise"] or {}).get("mean_reward") or {}).get(key)
            intervals.append(f"{e['estimate']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}] "
                             f"({'covers' if e['ci_low'] <= c['true'] <= e['ci_high'] else 'MISSES'})"
                             if e else "—")
        method = c["method"] + ("" if (r["noise"] or {}).get("identified", True) else " (not identified)")
        lines.append(f"| {r['case']} | {r['impressions']:,} | {method} | {c['true']:.4f} | {c['bias']['naive']:+.4f} | "
                     + " | ".join(cells) + " | " + " | ".join(intervals) + " |")
    return lines


def estimators_table(rows: list[dict[str, Any]]) -> list[str]:
    """Selection and confounding diagnostics; the biases here are against the mean *label* (what selection
    correction alone targets), a secondary figure beside ``clean_table``."""
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


STABILISED_COLUMNS = (("clipped", "clipped IPS"), ("snips", "SNIPS"), ("stabilized", "monotone"),
                      ("dr_standard", "DR"), ("dr_switch", "Switch-DR"), ("dr_shrink", "DR-shrink"))


def stabilised_table(rows: list[dict[str, Any]]) -> list[str]:
    """Bias of the weighted mean label with each weight stabiliser and DR variant, against the mean label (what
    selection correction targets), ± its se and as a share of the naive bias; the share against E[r*] below it;
    then the monotone weights' ESS share, max and Hill tail index."""
    head = ("| scenario | naive bias (label; r*) | " + " | ".join(f"{t} bias ± se (share; r* share)"
                                                               for _, t in STABILISED_COLUMNS)
            + " | monotone ESS / n, max, tail index |")
    lines = [head, "|" + "---|" * (3 + len(STABILISED_COLUMNS))]
    for r in rows:
        s = r["stabilised"]
        cells = []
        for key, _ in STABILISED_COLUMNS:
            se = s["se"].get(key)
            cells.append(f"{s['bias_label'][key]:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
                         + f" ({s['share_of_naive_label'][key]:.0%}; {s['share_of_naive_reward'][key]:.0%})")
        w = s["weights"]
        tail = f"{w['tail_index']:.2f}" if w["tail_index"] is not None else "—"
        lines.append(f"| {r['case']} | {s['bias_label']['naive']:+.4f}; {s['bias_reward']['naive']:+.4f} | "
                     + " | ".join(cells) + f" | {w['ess_share']:.2f}, {w['max']:.1f}, {tail} |")
    return lines
