"""Report stage: one HTML page an analyst can open, with the plots beside it as PNG files.

Everything on the page is read back from the run directory (manifest, datasets, reward-model metrics),
so the report shows what the stages wrote, not what they meant to write.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API needs no GUI backend and no global pyplot state

from estimators.diagnostics import reliability
from estimators.fitted import fitted_clip
from schemas import pointwise
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config
from schemas.manifest import read_manifest
from schemas.run_dir import RunDir
from schemas.stages import (
    FIT,
    INGEST,
    SCORE,
    FitResult,
    IngestResult,
    ReportCounts,
    ReportResult,
    ReusedModels,
    ScoreResult,
    stage_result,
)
from schemas.storage import atomic_dir, read_dataset


def plot_overlap(p: np.ndarray, o: np.ndarray, path: Path) -> None:
    """Propensity histograms of observed vs unobserved units: weights explode where they do not overlap."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    bins = np.linspace(0, 1, 41)
    ax.hist(p[o == 0], bins=bins, alpha=0.6, density=True, label=f"unobserved (n={int((o == 0).sum())})")
    ax.hist(p[o == 1], bins=bins, alpha=0.6, density=True, label=f"observed (n={int((o == 1).sum())})")
    ax.set(xlabel="estimated propensity p̂(x)", ylabel="density", title="Propensity overlap")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_calibration(p: np.ndarray, o: np.ndarray, path: Path) -> None:
    """Reliability diagram of the propensity model (equal-mass bins)."""
    mean_p, rate = reliability(p, o.astype(float), bins=15)
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.plot(mean_p, rate, marker="o")
    top = max(mean_p.max(), rate.max()) * 1.1
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean p̂ in bin", ylabel="observed rate in bin",
           title="Propensity calibration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_weights(w_ips: np.ndarray, w_clip: np.ndarray, clip: float, path: Path) -> None:
    """Distribution of IPS weights of observed units (log scale), raw vs clipped."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    top = max(w_ips.max(initial=1.0), 1.0 / clip if clip > 0 else 1.0, 1.0)
    bins = np.logspace(0, np.log10(top * 1.05), 50)
    ax.hist(w_ips, bins=bins, alpha=0.6, label="IPS 1/p̂")
    ax.hist(w_clip, bins=bins, alpha=0.6, label=f"clipped (p̂ ≥ {clip})" if clip > 0 else "clipped (no floor)")
    ax.set(xscale="log", yscale="log", xlabel="weight", ylabel="observed units", title="Weight distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_confounders(effects: Sequence[dict[str, Any]], path: Path) -> None:
    """Each confounder's estimated effect on the label with its 95% CI (a forest plot); 0 = no effect."""
    fig = Figure(figsize=(6, 1.6 + 0.5 * len(effects)))
    ax = fig.subplots()
    y = np.arange(len(effects))
    est = np.array([e["effect"] for e in effects])
    lo, hi = np.array([e["ci_low"] for e in effects]), np.array([e["ci_high"] for e in effects])
    ax.errorbar(est, y, xerr=[est - lo, hi - est], fmt="o", capsize=4)
    ax.axvline(0, c="grey", ls="--", lw=1)
    ax.set_yticks(y, [f"{e['treatment']} ({e.get('scale', 'identity')})" for e in effects])
    ax.set(xlabel="effect on the label (95% CI)", title="Confounder effects (DML)", ylim=(-0.6, len(effects) - 0.4))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_balance(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Standardised mean differences of the observed units vs all units, before and after weighting (a "love
    plot"): weighting should move every point towards 0; |SMD| > 0.1 is the usual warning line."""
    fig = Figure(figsize=(6, 2.2 + 0.5 * len(rows)))
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.scatter([r["smd_before"] for r in rows], y, label="before weighting", marker="o")
    ax.scatter([r["smd_after"] for r in rows], y, label="after weighting", marker="s")
    for x in (-0.1, 0.1):
        ax.axvline(x, c="grey", ls=":", lw=1)
    ax.axvline(0, c="grey", lw=1)
    ax.set_yticks(y, [r["column"] for r in rows])
    ax.set(xlabel="standardised mean difference (observed − all)", title="Balance", ylim=(-0.6, len(rows) + 0.4))
    ax.legend(loc="upper center", ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(x: Any) -> str:
        return html.escape(f"{x:.4g}" if isinstance(x, float) else str(x))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(manifest: dict[str, Any], figures: dict[str, str], reward: dict[str, Any]) -> str:
    # Each stage's typed result as the manifest recorded it: None for a stage that failed, was killed or never ran
    # (it has no figures).
    ingest, fit, score = (stage_result(manifest, spec) for spec in (INGEST, FIT, SCORE))
    parts = [f"<h1>obsfeed run {html.escape(str(manifest.get('run_id')))}</h1>",
             f"<p>config hash <code>{manifest.get('config_hash', '')[:12]}</code>, "
             f"git <code>{html.escape(str(manifest.get('git_commit')))}</code></p>"]
    funnel = _funnel(ingest, fit, score)
    if funnel:
        parts.append("<h2>Funnel</h2>" + _table(funnel, ["step", "rows"]))
    if ingest is not None:
        parts.append("<h2>Rows</h2>" + _table(
            [[t, c.rows_in, c.rows_ok, c.rows_quarantined, c.rows_duplicate,
              "—" if c.rows_other_day is None else c.rows_other_day] for t, c in ingest.counts.items()],
            ["table", "rows in", "ok", "quarantined", "duplicate", "other days (scheduled run)"]))
        reasons = ingest.diagnostics.quarantine_reasons
        parts.append("<h2>Quarantine reasons</h2>" + _table(list(reasons.items()), ["table:reason", "rows"]))
        parts.append(_votes_section(ingest.diagnostics.votes))
    if isinstance(fit, ReusedModels):
        parts.append(f"<p>Models fitted earlier, reused from <code>{html.escape(fit.reused_from)}</code>.</p>")
    fitted = fit if isinstance(fit, FitResult) else None
    if fitted is not None:
        p = fitted.diagnostics.propensity
        parts.append("<h2>Propensity of observation</h2>" + _table(
            [["AUC (out-of-fold)", p.auc], ["ECE (out-of-fold)", p.ece], ["mean p̂", p.model_extra["mean"]],
             ["observed rate", p.model_extra["observed_rate"]], ["min p̂", p.distribution["min"]],
             ["max p̂", p.distribution["max"]]], ["figure", "value"]))
    for key in ("overlap", "calibration"):
        if key in figures:
            parts.append(f'<img src="{figures[key]}" alt="{key}">')
    parts.append(_positivity_section((fitted.diagnostics.model_extra or {}).get("positivity") if fitted else None,
                                     (score.diagnostics.model_extra or {}).get("positivity") if score else None))
    if fitted is not None:
        diagnostics = fitted.diagnostics.model_dump()
        parts.append(_noise_section(fitted.diagnostics.flip_rates))
        parts.append(_confounder_section(diagnostics))
        if "confounders" in figures:
            parts.append(f'<img src="{figures["confounders"]}" alt="confounder effects">')
        balance = fitted.diagnostics.balance
        if balance:
            parts.append("<h2>Balance</h2>" + _table(
                [[b["column"], b["smd_before"], b["smd_after"]] for b in balance],
                ["column", "SMD before weighting", "SMD after weighting"]))
        if "balance" in figures:
            parts.append(f'<img src="{figures["balance"]}" alt="balance">')
    if score is not None:
        parts.append(_weights_section(score.diagnostics.model_dump()))
    if "weights" in figures:
        parts.append(f'<img src="{figures["weights"]}" alt="weights">')
    drift = score.diagnostics.drift.model_dump() if score is not None and score.diagnostics.drift else None
    if drift:
        ref = drift["reference"]
        parts.append(f"<h2>Drift against the fit window {ref['first_day']} … {ref['last_day']}</h2>" + _table(
            [[name, drift[name], drift["bounds"].get(name) if drift["bounds"].get(name) is not None else "—"]
             for name in ("propensity_psi", "label_rate_shift", "signal_mix_shift")],
            ["check", "value", "bound"])
            + _table([["units", ref["units"], drift["day"]["units"]],
                      ["mean observed label", ref["label_rate"], drift["day"]["label_rate"]]],
                     ["", "fit window", "this run"]))
    if reward:
        rows = [[loss, m.get("backbone", "hashed"), m.get("best_epoch"), m.get("best_val_loss", m.get("val_loss")),
                 m.get("n_train"), _truncated(m.get("truncated")), m.get("val_r2_vs_truth", "—"),
                 f"{m['samples_per_s']:,.0f}" if m.get("samples_per_s") else "—", m.get("device")]
                for loss, m in reward.items()]
        parts.append("<h2>Reward models</h2>" + _table(rows, [
            "loss", "backbone", "best epoch", "val loss", "train rows", "truncated to max_length (prompt / response)",
            "val R² vs truth", "samples/s", "device"]))
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%;margin:.5em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>obsfeed report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _funnel(ingest: IngestResult | None, fit: FitResult | ReusedModels | None, score: ScoreResult | None,
            ) -> list[list[Any]]:
    """Rows from the raw impressions to the pairs a trainer reads, as the stages counted them."""
    rows: list[list[Any]] = []
    imps = ingest.counts.get("impressions") if ingest is not None else None
    if imps:
        rows += [["impression rows read", imps.rows_in], ["quarantined", imps.rows_quarantined],
                 ["duplicates merged", imps.rows_duplicate]]
    if ingest is not None:
        rows += [["units", ingest.diagnostics.units], ["observed units (labelled)", ingest.diagnostics.observed]]
    if isinstance(fit, FitResult):
        rows.append(["units in the fit sample", fit.counts.sample])
    if score is not None:
        if score.counts.excluded_no_overlap:
            rows.append(["units left out (no overlap, fit.positivity = exclude)", score.counts.excluded_no_overlap])
        rows += [["pointwise rows", score.counts.pointwise], ["pairs", score.counts.pairs]]
    return rows


def _truncated(counts: dict[str, int] | None) -> str:
    """Rows whose prompt / response lost tokens to train.max_length (kept, not dropped); — for hashed n-grams."""
    if not counts:
        return "—"
    return f"{counts.get('prompt_truncated', 0):,} / {counts.get('response_truncated', 0):,}"


def _votes_section(votes: dict[str, Any] | None) -> str:
    """Units by the number of raters whose votes make their label, and how the votes were combined: a label
    resting on one vote is as noisy as that rater."""
    if not votes:
        return ""
    by = votes["units_by_votes"]
    total = sum(by.values())
    prior = votes.get("prior")
    how = f"ingest.aggregate = {votes['aggregate']}" + (f", prior Beta({prior[0]:g}, {prior[1]:g})" if prior else "")
    rows = [[k, v, v / total if total else 0.0] for k, v in by.items()]
    return (f"<h2>Votes per unit</h2><p>{html.escape(how)}; {votes['units_with_several_votes']} units rated by "
            f"two or more raters, {votes['mean_votes_of_voted_units']:.3g} votes per voted unit on average.</p>"
            + _table(rows, ["raters' votes", "units", "share"]))


def _confounder_section(diag: dict[str, Any]) -> str:
    """The confounder effects with their robustness values and bounds at the benchmark strength, and the E-value
    of the selection correction: how strong unmeasured confounding would have to be to explain each away."""
    out = ""
    effects = diag.get("confounders", [])
    if effects:
        def rv(e: dict[str, Any], key: str) -> Any:
            sens = e.get("sensitivity")
            if sens is None:
                return "—"                                     # fitted before the sensitivity analysis
            return e[key] if sens.get("supported") else "not supported"

        out += "<h2>Confounder effects</h2>" + _table(
            [[e["treatment"], e.get("scale", ""), e["model"], e["effect"], e["ci_low"], e["ci_high"],
              rv(e, "rv_estimate"), rv(e, "rv_ci"), e.get("label_variance_share", float("nan")), e["n"]]
             for e in effects],
            ["confounder", "scale", "model", "effect", "95% CI low", "95% CI high", "RV(estimate→0)", "RV(CI→0)",
             "label variance share", "units"])
        out += ("<p>RV: the partial R² an unmeasured confounder would need with both the confounder-treatment and "
                "the label (EconML, Chernozhukov et al. 2022) for the worst-case bias to move the estimate to 0, "
                "or its 95% CI to include 0 (0: the CI includes 0 already).</p>")
        bench = [e for e in effects if (e.get("sensitivity") or {}).get("supported")]
        if bench:
            out += "<h3>Sensitivity bounds at a benchmark confounder</h3>" + _table(
                [[e["treatment"], e["sensitivity"]["benchmark"]["c_y"], e["sensitivity"]["theta"],
                  e["sensitivity"]["benchmark"]["theta_low"], e["sensitivity"]["benchmark"]["theta_high"],
                  e["sensitivity"]["benchmark"]["ci_low"], e["sensitivity"]["benchmark"]["ci_high"]] for e in bench],
                ["confounder", "partial R² (c_y = c_t)", "θ (residual regression)", "bound low", "bound high",
                 "95% CI low", "95% CI high"])
        for e in effects:
            reason = (e.get("sensitivity") or {}).get("reason")
            if reason:
                out += f"<p>{html.escape(e['treatment'])}: robustness values {html.escape(reason)}.</p>"
    ev = diag.get("selection_evalue")
    if ev:
        out += "<h3>E-value of the selection correction</h3>"
        if ev.get("supported"):
            out += _table([["weighted / naive mean label", ev["weighted"], ev["naive"], ev["rr"], ev["ci_low"],
                            ev["ci_high"], ev["e_value"], ev["e_value_ci"], ev["n"]]],
                          ["contrast", "weighted", "naive", "RR", "95% CI low", "95% CI high", "E-value",
                           "E-value (CI)", "observed units"])
            out += ("<p>E-value (VanderWeele &amp; Ding 2017): the risk ratio an unmeasured confounder would need "
                    "with both selection and the label to produce the weighted vs naive difference by itself; "
                    f"CI by the {html.escape(ev['ci_method'])}.</p>")
        else:
            out += f"<p>Not computed: {html.escape(ev['reason'])}.</p>"
    return out


def _positivity_section(check: dict[str, Any] | None, done: dict[str, Any] | None) -> str:
    """A warning table of the strata where the fit stage found no overlap (``check``: its positivity diagnostics;
    none: nothing), and what became of their units in the score stage (``done``): a DR target there is the
    imputation model's extrapolation."""
    if not check or not check.get("violated"):
        return ""
    rows = [[r["column"], r["value"], r["units"], r["observed"],
             "—" if r["mean_propensity"] is None else r["mean_propensity"],
             "—" if r["min_propensity"] is None else r["min_propensity"], r["share_below_floor"], r["why"]]
            for r in check["violated"]]
    fate = ("" if not done else f" Score: {done['excluded']} units left out of the datasets." if done["excluded"]
            else f" Score: {done['flagged']} units flagged in {pointwise.OVERLAP_VIOLATION}.")
    return (f"<h2>Positivity: overlap fails</h2><p><strong>Warning:</strong> {len(rows)} strata of the fit sample "
            f"have (almost) no observed units or propensities below {check['floor']:g}; weights there are "
            f"unbounded and DR targets are extrapolation (fit.positivity = {html.escape(check['mode'])}).{fate}</p>"
            + _table(rows, ["column", "value", "units", "observed", "mean p̂", "min p̂",
                            f"share p̂ < {check['floor']:g}", "why"]))


NOISE_ASSUMPTION = {
    "calibrate": "calibrated on the audit: E[r* | label, x] and E[r* | x] learned on the audited units (the label's "
                 "error may depend on x); flip rates are not applied",
    "none": "no flip-rate correction",
}
"""What the clean-reward target of each fit.noise method rests on; any other method applies flip rates."""
FLIP_ASSUMPTION = ("flip-rate correction: assumes class-conditional noise (a label's error depends on r* only, not "
                   "on x: not on length, rater or model version)")


def _weights_section(d: dict[str, Any]) -> str:
    """ESS, concentration, max and Hill tail index of each weight column (α ≤ 2: the weights' variance is not
    finite), the stabiliser beside clipping, and the value of the policy the weights evaluate."""
    names = [
        n
        for n in (pointwise.WEIGHT_IPS, pointwise.WEIGHT_CLIPPED, pointwise.WEIGHT_SNIPS, pointwise.WEIGHT_STABILIZED)
        if n in d
    ]

    def tail(x: float | None) -> Any:
        return "—" if x is None else x

    rows = [[name + (f" ({d[name]['method']})" if "method" in d[name] else ""), d[name]["ess"], d[name]["ess_share"],
             d[name]["top1pct_share"], d[name]["max"], tail(d[name].get("tail_index"))] for name in names]
    html_ = (f"<h2>Weights ({d['n_observed']} observed units, {d['clipped']} clipped)</h2>"
             + _table(rows, ["weight", "Kish ESS", "ESS / n", "top-1% share", "max", "tail index (Hill)"]))
    v = d.get("policy_value")
    if v:
        html_ += (f"<p>Value of the {html.escape(str(v['policy']))} policy"
                  + (f" (column {html.escape(str(v['column']))})" if v.get("column") else "")
                  + f": IPS {v['ips']:.4g}, SNIPS {v['snips']:.4g} over {v['n']} logged units.</p>")
    return html_


def _noise_section(flips: dict[str, Any]) -> str:
    """The flip rates the targets use and the estimates beside them, each with its interval and whether it is
    identified (and why not), what the correction assumes, and the audit's mean reward."""
    if not flips:
        return ""

    def interval(e: dict[str, Any], ci: str) -> str:
        bounds = e.get(ci)
        return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "—"

    def row(name: str, e: dict[str, Any]) -> list[Any]:
        identified = {True: "yes", False: "no"}.get(e.get("identified"), "not assessed")
        return [name, e["rho01"], interval(e, "ci01"), e["rho10"], interval(e, "ci10"), e["n"], identified,
                e.get("why", "")]

    method = flips.get("method")
    rows = [row(f"used ({method})", flips)]
    errors = flips.get("errors") or {}
    for name, e in (flips.get("estimates") or {}).items():
        rows.append(row(name, e) if e else [name, "—", "—", "—", "—", "—", "not estimated", errors.get(name, "")])
    level = next((e["level"] for e in [flips, *(flips.get("estimates") or {}).values()] if e and e.get("level")),
                 0.95)
    out = ("<h2>Label noise</h2>"
           f"<p>Clean-reward target: {html.escape(NOISE_ASSUMPTION.get(method, FLIP_ASSUMPTION))}.</p>"
           + _table(rows, ["flip rates", "ρ01 = P(r=0 | r*=1)", f"ρ01 {level:.0%} CI", "ρ10 = P(r=1 | r*=0)",
                           f"ρ10 {level:.0%} CI", "units", "identified", "why"]))
    if method in NOISE_ASSUMPTION and any((flips.get("estimates") or {}).values()):
        out += ("<p>The flip-rate estimates are reported, not applied; applying them (fit.noise = 'anchor' or "
                "'audit') would assume class-conditional noise.</p>")
    mr = flips.get("mean_reward")
    if mr:
        out += "<h3>Mean true label (audit)</h3>" + _table(
            [[k, v["estimate"], v["ci_low"], v["ci_high"]] for k, v in mr.items()],
            ["estimator", "estimate", "95% CI low", "95% CI high"])
    return out


def _reward_metrics(run: RunDir) -> dict[str, Any]:
    out = {}
    root = run.path(rd.REWARD_MODEL)
    for path in sorted([root / rd.REWARD_METRICS, *root.glob(f"{rd.BASELINES}/*/{rd.REWARD_METRICS}")]):
        if path.exists():
            m = json.loads(path.read_text())
            out[m.get("loss", path.parent.name)] = m
    return out


def execute(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> ReportResult:
    t = read_dataset(
        run.path(rd.POINTWISE), [un.OBSERVED, pointwise.PROPENSITY, pointwise.WEIGHT_IPS, pointwise.WEIGHT_CLIPPED]
    )
    o = t[un.OBSERVED].to_numpy()
    p = t[pointwise.PROPENSITY].to_numpy()
    obs = o == 1
    figures = {"overlap": "overlap.png", "calibration": "calibration.png", "weights": "weights.png"}
    with atomic_dir(run.path(rd.REPORT)) as tmp:
        plot_overlap(p, o, tmp / figures["overlap"])
        plot_calibration(p, o, tmp / figures["calibration"])
        clip = fitted_clip(run.path(rd.MODELS))                 # the floor fit chose: weights.json, never the config
        plot_weights(t[pointwise.WEIGHT_IPS].to_numpy()[obs], t[pointwise.WEIGHT_CLIPPED].to_numpy()[obs], clip,
                     tmp / figures["weights"])
        manifest = read_manifest(run)
        fit = stage_result(manifest, FIT)
        if isinstance(fit, FitResult) and fit.diagnostics.confounders:
            figures["confounders"] = "confounders.png"
            plot_confounders(fit.diagnostics.confounders, tmp / figures["confounders"])
        if isinstance(fit, FitResult) and fit.diagnostics.balance:
            figures["balance"] = "balance.png"
            plot_balance(fit.diagnostics.balance, tmp / figures["balance"])
        (tmp / rd.REPORT_PAGE).write_text(render(manifest, figures, _reward_metrics(run)))
    return ReportResult(outputs=[str(run.path(rd.REPORT) / rd.REPORT_PAGE)],
                        counts=ReportCounts(figures=len(figures)), diagnostics={})
