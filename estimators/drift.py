"""Drift of a day's data against the data its models were fitted on (scheduled runs; docs/run-directory.md#drift).

Pure functions: a *profile* summarises a batch of units (propensity bins, observed label rate, signal mix), and
``compare`` measures a day's profile against the fit window's. The statistics are the usual ones for model
monitoring: the population stability index (PSI) of the propensities on the fit window's decile bins, the
absolute change of the mean observed label, and the total variation distance between signal-type mixes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import units as un

PSI_FLOOR = 1e-4
"""Bin shares are floored here before the log: an empty bin on one side would make the PSI infinite."""


def quantile_edges(values: np.ndarray, bins: int = 10) -> list[float]:
    """Inner edges of ``bins`` equal-count bins of ``values`` (duplicates dropped: a point mass is one bin)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite values to bin")
    return sorted(set(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]).tolist()))


def bin_shares(values: np.ndarray, edges: list[float]) -> list[float]:
    """Share of ``values`` in each bin (−∞, e1), [e1, e2), …, [ek, ∞)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
    return (counts / max(v.size, 1)).tolist()


def psi(expected: list[float], actual: list[float]) -> float:
    """Population stability index Σ (a − e)·ln(a / e) over bins (0: same; > 0.25: a large shift)."""
    e = np.maximum(np.asarray(expected, dtype=float), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=float), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """½ Σ |p − q| over the union of keys (0: same mix, 1: disjoint)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in {*p, *q})


def signal_counts(units: pa.Table, known_types: Sequence[str]) -> dict[str, float]:
    """Signals per type over a table of units, from its ``n_<type>`` columns."""
    return {t: float(pc.sum(units[un.count_column(t)]).as_py() or 0) for t in known_types
            if un.count_column(t) in units.column_names}


def profile(propensity: np.ndarray, observed: np.ndarray, label: np.ndarray, signal_counts: Mapping[str, float],
            *, edges: list[float] | None = None, bins: int = 10) -> dict[str, Any]:
    """What ``compare`` needs of a batch of units: propensity bin shares (on ``edges``, or on this batch's own
    deciles when it is the reference), the observed rate and mean observed label, the signal-type shares."""
    o = np.asarray(observed).astype(bool)
    y = np.asarray(label, dtype=float)[o]
    edges = quantile_edges(propensity, bins) if edges is None else list(edges)
    total = float(sum(signal_counts.values()))
    return {"units": int(o.size), "observed_rate": float(o.mean()) if o.size else float("nan"),
            "label_rate": float(np.nanmean(y)) if np.isfinite(y).any() else float("nan"),
            "propensity_edges": edges, "propensity_shares": bin_shares(propensity, edges),
            "signal_mix": {k: v / total for k, v in sorted(signal_counts.items()) if v} if total else {}}


def compare(reference: Mapping[str, Any], day: Mapping[str, Any]) -> dict[str, float]:
    """The day's drift against the reference profile (``day`` binned on the reference's edges)."""
    if list(day["propensity_edges"]) != list(reference["propensity_edges"]):
        raise ValueError("the day's propensities must be binned on the reference's edges")
    return {"propensity_psi": psi(reference["propensity_shares"], day["propensity_shares"]),
            "label_rate_shift": abs(day["label_rate"] - reference["label_rate"]),
            "signal_mix_shift": total_variation(reference["signal_mix"], day["signal_mix"])}


def breaches(drift: Mapping[str, float], bounds: Mapping[str, float | None]) -> list[str]:
    """The checks whose value exceeds its bound (a bound of None is not checked; a NaN value is a breach:
    a day with no rated units cannot show that its label rate held)."""
    out = []
    for name, bound in bounds.items():
        if bound is None:
            continue
        value = drift[name]
        if not np.isfinite(value) or value > bound:
            out.append(f"{name} = {value:.3f} > {bound}")
    return out
