"""Positivity (overlap) checks: where the propensity of observation is zero or close to it, so that IPS weights
explode and a DR target is the imputation model's extrapolation, not a correction anchored on observed labels.

Two views, both on the fit sample: each value of each categorical feature (a *stratum*), and the propensity tail
(units with p̂ below a floor, whatever their stratum). A stratum fails overlap when it has almost no observed
units, or when most of its p̂ lies below the floor; the tail fails when it holds more than a set share of the
units (a few tail units are expected: isotonic calibration puts p̂ at the model's clip where no observed unit
is near). Units of a failed stratum and units below the floor are flagged one by one (:func:`violation_mask`).
Trimming units with p̂ below a floor is Crump, Hotz, Imbens & Mitnik (2009), "Dealing with limited overlap in
estimation of average treatment effects", Biometrika 96(1).

Numpy in, JSON-safe dicts out (the manifest and ``models/positivity.json`` hold them as they are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TAIL_COLUMN = "propensity"
"""The ``column`` of the tail row: its ``value`` is ``"< floor"``."""
MOST = 0.5
"""A stratum fails when more than this share of its p̂ is below the floor ("most of it")."""


def _stratum(column: str, value: str, mask: np.ndarray, observed: np.ndarray, propensity: np.ndarray,
             floor: float) -> dict[str, Any]:
    p = propensity[mask]
    return {"column": column, "value": value, "units": int(mask.sum()), "observed": int(observed[mask].sum()),
            "mean_propensity": float(p.mean()) if p.size else None,
            "min_propensity": float(p.min()) if p.size else None,
            "share_below_floor": float(np.mean(p < floor)) if p.size else 0.0}


def strata_table(strata: Mapping[str, Sequence[str] | np.ndarray], observed: np.ndarray, propensity: np.ndarray, *,
                 floor: float, min_observed: int, max_tail_share: float) -> list[dict[str, Any]]:
    """One row per (categorical column, value) and a last row for the tail p̂ < ``floor``.

    Each row: column, value, units, observed, mean and min p̂, share of p̂ below the floor, ``violated`` and
    ``why`` (None when not violated). A stratum is violated when almost none of it is observed: fewer than
    ``min_observed`` observed units *and* fewer than ``floor`` × its units (a small stratum observed at an ordinary
    rate is rare, not without overlap; nothing to extrapolate when all are observed), or when more than half
    (:data:`MOST`) of its p̂ is below ``floor``. The tail is violated when it holds more than ``max_tail_share`` of
    all units.

    >>> rows = strata_table({"v": ["a"] * 4 + ["b"] * 200 + ["c"] * 10}, np.r_[[1] * 4, [0] * 200, [1, 1] + [0] * 8],
    ...                     np.r_[[.5] * 4, [.2] * 200, [.2] * 10], floor=0.01, min_observed=5, max_tail_share=0.05)
    >>> [(r["value"], r["violated"]) for r in rows]
    [('a', False), ('b', True), ('c', False), ('< 0.01', False)]
    """
    o = np.asarray(observed).astype(int)
    p = np.asarray(propensity, dtype=float)
    if o.shape != p.shape:
        raise ValueError(f"observed and propensity differ in length: {o.size} vs {p.size}")
    if not 0 <= floor < 1:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    rows = []
    for column, values in strata.items():
        values = np.asarray(values, dtype=object).astype(str)
        if values.shape != p.shape:
            raise ValueError(f"stratum column '{column}' has {values.size} values for {p.size} units")
        uniq, inverse = np.unique(values, return_inverse=True)
        for k, value in enumerate(uniq):
            row = _stratum(column, str(value), inverse == k, o, p, floor)
            why = []
            if row["observed"] < min_observed and row["observed"] < floor * row["units"]:
                why.append(f"{row['observed']} of {row['units']} units observed (fewer than {min_observed} and "
                           f"than {floor:g} of its units)")
            if row["share_below_floor"] > MOST:
                why.append(f"{row['share_below_floor']:.0%} of its p̂ below the floor {floor:g}")
            rows.append({**row, "violated": bool(why), "why": "; ".join(why) or None})
    tail = _stratum(TAIL_COLUMN, f"< {floor:g}", p < floor, o, p, floor)
    share = tail["units"] / max(1, p.size)
    violated = share > max_tail_share
    rows.append({**tail, "violated": violated,
                 "why": f"{tail['units']} units ({share:.1%}) have p̂ below the floor {floor:g}, more than "
                        f"{max_tail_share:.1%}" if violated else None})
    return rows


def violated_strata(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The violated rows of :func:`strata_table`, as they are."""
    return [dict(r) for r in rows if r["violated"]]


def violation_mask(strata: Mapping[str, Sequence[str] | np.ndarray], propensity: np.ndarray,
                   violated: Sequence[Mapping[str, Any]], *, floor: float) -> np.ndarray:
    """True for each unit with p̂ below ``floor`` or whose value of a column lies in a violated stratum.

    Columns named by ``violated`` but absent from ``strata`` flag nobody (the rows come from the fit stage; the
    caller passes the categorical columns it has).

    >>> violation_mask({"v": ["a", "b", "b"]}, np.array([.5, .5, .001]), [{"column": "v", "value": "a"}],
    ...                floor=0.01).tolist()
    [True, False, True]
    """
    p = np.asarray(propensity, dtype=float)
    flagged = p < floor
    for column, values in strata.items():
        bad = [r["value"] for r in violated if r["column"] == column and column != TAIL_COLUMN]
        if bad:
            flagged |= np.isin(np.asarray(values, dtype=object).astype(str), np.array(bad, dtype=str))
    return flagged


def describe(rows: Sequence[Mapping[str, Any]]) -> str:
    """The violated strata on one line: ``column = 'value' (why)``, separated by semicolons."""
    return "; ".join(f"{r['column']} = {r['value']!r} ({r['why']})" for r in rows)
