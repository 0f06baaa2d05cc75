"""The summary table printed at the end of a run, read back from the manifest (what was recorded)."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas import run_dir as rd
from schemas import stages
from schemas.errors import InputError
from schemas.manifest import read_manifest, stale_stages
from schemas.run_dir import RunDir
from schemas.stages import FitResult, StageSpec, stage_record, stage_result

logger = logging.getLogger(__name__)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def run_summary_lines(run: RunDir) -> list[str]:
    m = read_manifest(run)
    stage_result = _readable(run)
    lines = [f"run {m.get('run_id')} at {run.root}"]
    ingest = stage_result(m, stages.INGEST)
    if ingest is not None:
        lines.append(f"{'table':<12}{'rows in':>10}{'ok':>10}{'quarantined':>13}{'duplicate':>11}")
        for table, c in ingest.counts.items():
            lines.append(f"{table:<12}{c.rows_in:>10}{c.rows_ok:>10}{c.rows_quarantined:>13}{c.rows_duplicate:>11}")
        d = ingest.diagnostics
        lines.append(f"units {d.units}, observed {d.observed} ({d.observed_rate:.1%})")
    fit = stage_result(m, stages.FIT)
    if isinstance(fit, FitResult):
        p = fit.diagnostics.propensity
        lines.append(f"propensity (out-of-fold): AUC {_fmt(p.auc)}, ECE {_fmt(p.ece, 4)}, "
                     f"range [{_fmt(p.distribution.get('min'))}, {_fmt(p.distribution.get('max'))}]")
    score = stage_result(m, stages.SCORE)
    if score is not None:
        d = score.diagnostics
        w = d.weight_clipped
        lines.append(f"weights: ESS {w.ess:.0f} of {d.n_observed} observed ({d.ess_share:.1%}), "
                     f"{d.clipped} clipped at {d.clip}, top 1% carry {_fmt_share(w.top1pct_share)}")
        lines.append(f"pairs: {score.counts.pairs}")
    train = stage_result(m, stages.TRAIN)
    if train is not None:
        for loss, d in train.diagnostics.items():
            lines.append(f"reward model [{loss}]: val loss {_fmt(d.val_loss, 4)}, best epoch {d.best_epoch}")
    lines.append("outputs: " + ", ".join(str(run.path(n)) for n in (rd.UNITS, rd.QUARANTINE, rd.POINTWISE,
                                                                      rd.PAIRWISE, rd.REWARD_MODEL)))
    lines.append(f"report: {run.path(rd.REPORT) / rd.REPORT_PAGE}")
    lines.append(f"complete: {'yes' if run.path(rd.SUCCESS).exists() else 'no (_SUCCESS missing)'}")
    return lines


def _readable(run: RunDir) -> Callable[[dict[str, Any], StageSpec], Any]:
    """``stage_result`` for the summary: a record another version wrote is left out (with a warning), not the
    end of the command whose work is already done."""
    def read(manifest: dict[str, Any], spec: StageSpec) -> Any:
        try:
            return stage_result(manifest, spec)
        except InputError as e:
            logger.warning("%s: %s", run.root, e)
            return None
    return read


def _fmt_share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


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
    return {s: cfg.stage_digest(s) for s in stages.STAGES}


def run_status(run: RunDir, manifest: dict[str, Any]) -> str:
    """``complete`` (``_SUCCESS`` present), ``running: <stage>``, ``killed: <stage>`` (recorded as running by a
    process that is gone), ``failed: <stage>``, ``stale: <stages>`` (ran on outputs rewritten since), or
    ``incomplete (<stages done>)``."""
    if run.path(rd.SUCCESS).exists():
        return "complete"
    recorded = manifest.get("stages", {})
    order = (*stages.STAGES, *sorted(set(recorded) - set(stages.STAGES)))
    entries = {name: e for name in order if (e := stage_record(manifest, name)) is not None}
    for name, e in entries.items():
        if e.status == "running":
            return f"running: {name}" if _alive(e.pid, e.host) else f"killed: {name}"
    failed = [name for name, e in entries.items() if e.status == "failed"]
    if failed:
        return f"failed: {failed[0]}"
    stale = stale_stages(manifest, stages.STAGES, _settings(run))
    if stale:
        return f"stale: {','.join(stale)}"
    done = [name for name, e in entries.items() if e.status == "ok"]
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
        try:
            ingest, fit, score = (stage_result(m, spec) for spec in (stages.INGEST, stages.FIT, stages.SCORE))
        except InputError as e:                         # one unreadable record: that run's figures only are n/a
            logger.warning("%s: %s", run.root, e)
            ingest = fit = score = None
        auc = fit.diagnostics.propensity.auc if isinstance(fit, FitResult) else None
        last = max((e.started_at for name in m.get("stages", {}) if (e := stage_record(m, name))), default="")
        lines.append(f"{str(m.get('run_id', run.root.name))[:23]:<24}{run_status(run, m)[:35]:<36}{last:<22}"
                     f"{_fmt(ingest and ingest.diagnostics.units):>9}"
                     f"{_fmt(ingest and ingest.diagnostics.observed_rate, 3):>10}{_fmt(auc):>7}"
                     f"{_fmt(score and score.diagnostics.ess_share, 2):>7}{_fmt(score and score.counts.pairs):>8}")
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
