"""Covariate balance: standardised mean differences (SMD) between the observed units and the whole
population, before and after weighting. Numpy in, numpy out.

Selection makes the observed units unlike the population (e.g. longer responses are rated more); good
inverse-propensity weights make the weighted observed units look like the population again (|SMD| < 0.1 is
the usual rule of thumb).
"""

from __future__ import annotations

import numpy as np


def _weighted_mean_var(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    mean = float(np.average(x, weights=w))
    return mean, float(np.average((x - mean) ** 2, weights=w))


def smd(x: np.ndarray, observed: np.ndarray, weights: np.ndarray | None = None) -> float:
    """(mean over observed, weighted by ``weights``) − (population mean), over the pooled standard deviation."""
    x, observed = np.asarray(x, dtype=float), np.asarray(observed)
    sel = observed == 1
    if not sel.any():
        raise ValueError("no observed unit: balance is undefined")
    w = np.ones(int(sel.sum())) if weights is None else np.asarray(weights, dtype=float)[sel]
    m_obs, v_obs = _weighted_mean_var(x[sel], w)
    m_all, v_all = float(x.mean()), float(x.var())
    pooled = np.sqrt((v_obs + v_all) / 2)
    return 0.0 if pooled == 0 else (m_obs - m_all) / pooled


def balance_table(columns: dict[str, np.ndarray], observed: np.ndarray, weights: np.ndarray) -> list[dict]:
    """One row per confounder: SMD of the observed units before and after weighting."""
    return [{"column": name, "smd_before": smd(x, observed), "smd_after": smd(x, observed, weights)}
            for name, x in columns.items()]
