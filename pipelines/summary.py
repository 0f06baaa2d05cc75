"""The summary table printed at the end of a run, read back from the manifest (what was recorded)."""

from __future__ import annotations

from typing import Any

from pipelines.manifest import read_manifest
from schemas import run_dir as rd
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
    lines.append(f"report: {run.path(rd.REPORT) / 'index.html'}")
    lines.append(f"complete: {'yes' if run.path(rd.SUCCESS).exists() else 'no (_SUCCESS missing)'}")
    return lines


def print_run_summary(run: RunDir) -> None:
    print("\n".join(run_summary_lines(run)))
