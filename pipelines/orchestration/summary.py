"""The summary table printed at the end of a run, read back from the manifest (what was recorded)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from schemas import run_dir as rd
from schemas.manifest import read_manifest, stale_stages
from schemas.run_dir import RunDir


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def run_summary_lines(run: RunDir) -> list[str]:
    m = read_manifest(run)
    st = m.get("stages", {})
    lines = [f"run {m.get('run_id')} at {run.root}"]
    if "ingest" in st and st["ingest"].get("status") == "ok":
        lines.append(f"{'table':<12}{'rows in':>10}{'ok':>10}{'quarantined':>13}{'duplicate':>11}")
        for table, c in st["ingest"]["counts"].items():
            lines.append(f"{table:<12}{c['rows_in']:>10}{c['rows_ok']:>10}{c['rows_quarantined']:>13}"
                         f"{c['rows_duplicate']:>11}")
        d = st["ingest"]["diagnostics"]
        lines.append(f"units {d['units']}, observed {d['observed']} ({d['observed_rate']:.1%})")
    if "fit" in st and st["fit"].get("status") == "ok":
        p = st["fit"]["diagnostics"]["propensity"]
        lines.append(f"propensity (out-of-fold): AUC {_fmt(p['auc'])}, ECE {_fmt(p['ece'], 4)}, "
                     f"range [{_fmt(p['distribution']['min'])}, {_fmt(p['distribution']['max'])}]")
    if "score" in st and st["score"].get("status") == "ok":
        d = st["score"]["diagnostics"]
        w = d["weight_clipped"]
        lines.append(f"weights: ESS {w['ess']:.0f} of {d['n_observed']} observed ({w['ess_share']:.1%}), "
                     f"{d['clipped']} clipped at {d['clip']}, top 1% carry {w['top1pct_share']:.1%}")
        lines.append(f"pairs: {st['score']['counts']['pairs']}")
    if "train" in st and st["train"].get("status") == "ok":
        for loss, d in st["train"]["diagnostics"].items():
            lines.append(f"reward model [{loss}]: val loss {_fmt(d.get('val_loss'), 4)}, "
                         f"best epoch {d.get('best_epoch')}")
    lines.append("outputs: " + ", ".join(str(run.path(n)) for n in (rd.UNITS, rd.QUARANTINE, rd.POINTWISE,
                                                                      rd.PAIRWISE, rd.REWARD_MODEL)))
    lines.append(f"report: {run.path(rd.REPORT) / rd.REPORT_PAGE}")
    lines.append(f"complete: {'yes' if run.path(rd.SUCCESS).exists() else 'no (_SUCCESS missing)'}")
    return lines


def print_run_summary(run: RunDir) -> None:
    print("\n".join(run_summary_lines(run)))


def _alive(pid: int | None, host: str | None) -> bool:
    """Whether the process that recorded a stage as running still exists (assumed so on another host)."""
    if pid is None:
        return False
    if host is not None and host != platform.node():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _settings(run: RunDir) -> dict[str, str] | None:
    """Each stage's settings digest under the run's config now (None when it cannot be read)."""
    from schemas.config import load_config
    from schemas.errors import ConfigError

    try:
        cfg = load_config(run.config_path)
    except (ConfigError, OSError):
        return None
    from pipelines.orchestration.registry import STAGES

    return {s: cfg.stage_digest(s) for s in STAGES}


def run_status(run: RunDir, manifest: dict[str, Any]) -> str:
    """``complete`` (``_SUCCESS`` present), ``running: <stage>``, ``killed: <stage>`` (recorded as running by a
    process that is gone), ``failed: <stage>``, ``stale: <stages>`` (ran on outputs rewritten since), or
    ``incomplete (<stages done>)``."""
    if run.path(rd.SUCCESS).exists():
        return "complete"
    from pipelines.orchestration.registry import STAGES

    recorded = manifest.get("stages", {})
    stages = {name: recorded[name] for name in (*STAGES, *sorted(set(recorded) - set(STAGES))) if name in recorded}
    for name, e in stages.items():
        if e.get("status") == "running":
            return f"running: {name}" if _alive(e.get("pid"), e.get("host")) else f"killed: {name}"
    failed = [name for name, e in stages.items() if e.get("status") == "failed"]
    if failed:
        return f"failed: {failed[0]}"
    stale = stale_stages(manifest, STAGES, _settings(run))
    if stale:
        return f"stale: {','.join(stale)}"
    done = [name for name, e in stages.items() if e.get("status") == "ok"]
    return f"incomplete ({','.join(done) or 'nothing done'})"


def runs_table(root: Path) -> list[str]:
    """One line per run under ``root`` (folders holding a manifest, and ``root`` itself if it is a run), with
    its status and headline figures, read from each manifest."""
    root = Path(root)
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    runs = [RunDir(p) for p in candidates if (p / rd.MANIFEST).exists()]
    header = (f"{'run':<24}{'status':<36}{'last stage at':<22}{'units':>9}{'observed':>10}{'AUC':>7}{'ESS':>7}"
              f"{'pairs':>8}")
    lines = [header]
    for run in runs:
        m = read_manifest(run)
        st = m.get("stages", {})
        ing = st.get("ingest", {}).get("diagnostics", {})
        auc = st.get("fit", {}).get("diagnostics", {}).get("propensity", {}).get("auc")
        ess = st.get("score", {}).get("diagnostics", {}).get("weight_clipped", {}).get("ess_share")
        pairs = st.get("score", {}).get("counts", {}).get("pairs")
        last = max((e.get("started_at", "") for e in st.values()), default="")
        lines.append(f"{str(m.get('run_id', run.root.name))[:23]:<24}{run_status(run, m)[:35]:<36}{last:<22}"
                     f"{_fmt(ing.get('units')):>9}{_fmt(ing.get('observed_rate'), 3):>10}{_fmt(auc):>7}"
                     f"{_fmt(ess, 2):>7}{_fmt(pairs):>8}")
    if not runs:
        lines.append(f"(no runs under {root})")
    return lines


def catalogue_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The days of a scheduled run as a table: status, counts and the drift figures."""
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    out = [f"{'date':<10}  {'status':<7}  {'units':>9}  {'observed':>9}  {'label':>6}  {'ESS':>6}  {'PSI':>6}  "
           f"{'Δlabel':>6}  {'Δmix':>6}  models"]
    for r in rows:
        out.append(f"{r['date']!s:<10}  {r['status']:<7}  {f(r['units'], ',d'):>9}  {f(r['observed'], ',d'):>9}  "
                   f"{f(r['label_rate'], '.3f'):>6}  {f(r['ess_share'], '.1%'):>6}  "
                   f"{f(r['propensity_psi'], '.3f'):>6}  "
                   f"{f(r['label_rate_shift'], '.3f'):>6}  {f(r['signal_mix_shift'], '.3f'):>6}  "
                   f"{'reused' if r['models_from'] else 'fitted'}")
    return out
