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
from pipelines.manifest import read_manifest
from schemas import pointwise as pw
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config
from schemas.run_dir import RunDir
from transforms.io import atomic_dir, read_dataset


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
    st = manifest.get("stages", {})
    parts = [f"<h1>obsfeed run {html.escape(str(manifest.get('run_id')))}</h1>",
             f"<p>config hash <code>{manifest.get('config_hash', '')[:12]}</code>, "
             f"git <code>{html.escape(str(manifest.get('git_commit')))}</code></p>"]
    ok = {name for name, e in st.items() if e.get("status") == "ok"}   # a failed or killed stage has no figures
    funnel = _funnel(st)
    if funnel:
        parts.append("<h2>Funnel</h2>" + _table(funnel, ["step", "rows"]))
    if "ingest" in ok:
        counts = st["ingest"].get("counts", {})
        parts.append("<h2>Rows</h2>" + _table(
            [[t, c["rows_in"], c["rows_ok"], c["rows_quarantined"], c["rows_duplicate"], c.get("rows_other_day", "—")]
             for t, c in counts.items()],
            ["table", "rows in", "ok", "quarantined", "duplicate", "other days (scheduled run)"]))
        reasons = st["ingest"].get("diagnostics", {}).get("quarantine_reasons", {})
        parts.append("<h2>Quarantine reasons</h2>" + _table(list(reasons.items()), ["table:reason", "rows"]))
    reused = st.get("fit", {}).get("reused_from")
    if reused:
        parts.append(f"<p>Models fitted earlier, reused from <code>{html.escape(str(reused))}</code>.</p>")
    if "fit" in ok and not reused:
        p = st["fit"]["diagnostics"]["propensity"]
        parts.append("<h2>Propensity of observation</h2>" + _table(
            [["AUC (out-of-fold)", p["auc"]], ["ECE (out-of-fold)", p["ece"]], ["mean p̂", p["mean"]],
             ["observed rate", p["observed_rate"]], ["min p̂", p["distribution"]["min"]],
             ["max p̂", p["distribution"]["max"]]], ["figure", "value"]))
    for key in ("overlap", "calibration"):
        if key in figures:
            parts.append(f'<img src="{figures[key]}" alt="{key}">')
    if "fit" in ok and not reused:
        parts.append(_noise_section(st["fit"]["diagnostics"].get("flip_rates", {})))
        effects = st["fit"]["diagnostics"].get("confounders", [])
        if effects:
            parts.append("<h2>Confounder effects</h2>" + _table(
                [[e["treatment"], e.get("scale", ""), e["model"], e["effect"], e["ci_low"], e["ci_high"],
                  e.get("label_variance_share", float("nan")), e["n"]] for e in effects],
                ["confounder", "scale", "model", "effect", "95% CI low", "95% CI high", "label variance share",
                 "units"]))
        if "confounders" in figures:
            parts.append(f'<img src="{figures["confounders"]}" alt="confounder effects">')
        balance = st["fit"]["diagnostics"].get("balance", [])
        if balance:
            parts.append("<h2>Balance</h2>" + _table(
                [[b["column"], b["smd_before"], b["smd_after"]] for b in balance],
                ["column", "SMD before weighting", "SMD after weighting"]))
        if "balance" in figures:
            parts.append(f'<img src="{figures["balance"]}" alt="balance">')
    if "score" in ok:
        d = st["score"]["diagnostics"]
        rows = [[name, d[name]["ess"], d[name]["ess_share"], d[name]["top1pct_share"], d[name]["max"]]
                for name in (pw.WEIGHT_IPS, pw.WEIGHT_CLIPPED, pw.WEIGHT_SNIPS)]
        parts.append(f"<h2>Weights ({d['n_observed']} observed units, {d['clipped']} clipped)</h2>"
                     + _table(rows, ["weight", "Kish ESS", "ESS / n", "top-1% share", "max"]))
    if "weights" in figures:
        parts.append(f'<img src="{figures["weights"]}" alt="weights">')
    drift = st.get("score", {}).get("diagnostics", {}).get("drift") if "score" in ok else None
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
        rows = [[loss, m.get("best_epoch"), m.get("best_val_loss", m.get("val_loss")), m.get("n_train"),
                 m.get("val_r2_vs_truth", "—"), f"{m['samples_per_s']:,.0f}" if m.get("samples_per_s") else "—",
                 m.get("device")]
                for loss, m in reward.items()]
        parts.append("<h2>Reward models</h2>" + _table(rows, ["loss", "best epoch", "val loss", "train rows",
                                                              "val R² vs truth", "samples/s", "device"]))
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%;margin:.5em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>obsfeed report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _funnel(st: dict[str, Any]) -> list[list[Any]]:
    """Rows from the raw impressions to the pairs a trainer reads, as the stages counted them."""
    rows: list[list[Any]] = []
    ingest = st.get("ingest", {})
    imps = ingest.get("counts", {}).get("impressions")
    if imps:
        rows += [["impression rows read", imps["rows_in"]], ["quarantined", imps["rows_quarantined"]],
                 ["duplicates merged", imps["rows_duplicate"]]]
    units = ingest.get("diagnostics", {})
    if "units" in units:
        rows += [["units", units["units"]], ["observed units (labelled)", units["observed"]]]
    fit = st.get("fit", {}).get("counts", {})
    if fit:
        rows.append(["units in the fit sample", fit.get("sample")])
    score = st.get("score", {}).get("counts", {})
    if score:
        rows += [["pointwise rows", score.get("pointwise")], ["pairs", score.get("pairs")]]
    return rows


def _noise_section(flips: dict[str, Any]) -> str:
    """The flip rates the targets use, the estimates they were chosen from, and the audit's mean reward."""
    if not flips:
        return ""
    rows = [[f"used ({flips.get('method')})", flips.get("rho01"), flips.get("rho10"), flips.get("n")]]
    for name, e in (flips.get("estimates") or {}).items():
        if e:
            rows.append([name if e.get("se01") is None else f"{name} (se {e['se01']:.3f}, {e['se10']:.3f})",
                         e["rho01"], e["rho10"], e["n"]])
    out = "<h2>Label noise</h2>" + _table(rows, ["flip rates", "ρ01 = P(r=0 | r*=1)", "ρ10 = P(r=1 | r*=0)",
                                                    "units"])
    mr = flips.get("mean_reward")
    if mr:
        out += "<h3>Mean true label (audit)</h3>" + _table(
            [[k, v["estimate"], v["ci_low"], v["ci_high"]] for k, v in mr.items()],
            ["estimator", "estimate", "95% CI low", "95% CI high"])
    return out


def _reward_metrics(run: RunDir) -> dict[str, Any]:
    out = {}
    root = run.path(rd.REWARD_MODEL)
    for path in sorted([root / "metrics.json", *root.glob("baselines/*/metrics.json")]):
        if path.exists():
            m = json.loads(path.read_text())
            out[m.get("loss", path.parent.name)] = m
    return out


def run(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> dict[str, Any]:
    t = read_dataset(run.path(rd.POINTWISE), [un.OBSERVED, pw.PROPENSITY, pw.WEIGHT_IPS, pw.WEIGHT_CLIPPED])
    o = t[un.OBSERVED].to_numpy()
    p = t[pw.PROPENSITY].to_numpy()
    obs = o == 1
    figures = {"overlap": "overlap.png", "calibration": "calibration.png", "weights": "weights.png"}
    with atomic_dir(run.path(rd.REPORT)) as tmp:
        plot_overlap(p, o, tmp / figures["overlap"])
        plot_calibration(p, o, tmp / figures["calibration"])
        clip = float(json.loads(run.path(rd.WEIGHTS_FILE).read_text())["clip"])   # the floor fit chose
        plot_weights(t[pw.WEIGHT_IPS].to_numpy()[obs], t[pw.WEIGHT_CLIPPED].to_numpy()[obs], clip,
                     tmp / figures["weights"])
        fit_entry = read_manifest(run).get("stages", {}).get("fit", {})
        fit = fit_entry.get("diagnostics", {}) if fit_entry.get("status") == "ok" else {}
        if fit.get("confounders"):
            figures["confounders"] = "confounders.png"
            plot_confounders(fit["confounders"], tmp / figures["confounders"])
        if fit.get("balance"):
            figures["balance"] = "balance.png"
            plot_balance(fit["balance"], tmp / figures["balance"])
        (tmp / "index.html").write_text(render(read_manifest(run), figures, _reward_metrics(run)))
    return {"outputs": [str(run.path(rd.REPORT) / "index.html")], "counts": {"figures": len(figures)},
            "diagnostics": {}}
