"""How strong unmeasured confounding would have to be to explain a result away. Numpy in, numpy out.

The confounder effects' robustness values come from EconML (``ConfounderEffect``); here is the E-value of the
selection correction: the weighted vs naive mean label of the observed units, as a risk ratio.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats


def e_value(rr: float) -> float:
    """E-value of a risk ratio (VanderWeele & Ding 2017, "Sensitivity analysis in observational research:
    introducing the E-value", Ann. Intern. Med. 167(4)): E = RR + sqrt(RR·(RR − 1)) for RR ≥ 1, and the same
    of 1/RR for RR < 1. The minimum strength, on the risk-ratio scale, with which an unmeasured confounder would
    have to be associated with both the "treatment" and the outcome to explain the ratio away.

    >>> round(e_value(2.0), 4), round(e_value(0.5), 4), e_value(1.0)
    (3.4142, 3.4142, 1.0)
    """
    if not (rr > 0 and math.isfinite(rr)):
        raise ValueError(f"a risk ratio must be positive and finite, got {rr}")
    rr = rr if rr >= 1 else 1 / rr
    return float(rr + math.sqrt(rr * (rr - 1)))


def e_value_ci(low: float, high: float) -> float:
    """E-value of a risk ratio's confidence interval: that of the limit closer to 1, or 1 when the interval
    includes 1 (no confounding is needed to move it to the null) (VanderWeele & Ding 2017).

    >>> e_value_ci(1.5, 2.5) == e_value(1.5), e_value_ci(0.4, 0.8) == e_value(0.8), e_value_ci(0.9, 1.2)
    (True, True, 1.0)
    """
    if not 0 < low <= high:
        raise ValueError(f"a risk ratio's interval must satisfy 0 < low <= high, got [{low}, {high}]")
    if low <= 1 <= high:
        return 1.0
    return e_value(low if low > 1 else high)


def weighted_vs_naive_ratio(label: np.ndarray, weight: np.ndarray, *, alpha: float = 0.05) -> dict[str, Any]:
    """RR = (Σ w·y / Σ w) / mean(y) over the observed units (``label`` y, weights w, e.g. clipped 1/p̂), with
    its CI and E-values: how far the selection correction moves the label rate, and how strong a confounder of
    selection and label that the weights miss would have to be to produce that move on its own.

    CI by the delta method on log RR, the weights taken as given: with A = Σ w·y / Σ w and B = ȳ, unit i's
    influence on log RR is (w_i / w̄)(y_i − A)/A − (y_i − B)/B, and se = sd(influence)/√n (both means are on
    the same units, so their covariance is in it).
    """
    y, w = np.asarray(label, dtype=float), np.asarray(weight, dtype=float)
    if y.shape != w.shape or y.ndim != 1:
        raise ValueError(f"label and weight must be 1-d arrays of one length, got {y.shape} and {w.shape}")
    if y.size < 2 or not (np.all(np.isfinite(y)) and np.all(np.isfinite(w)) and np.all(w >= 0)) or w.sum() <= 0:
        raise ValueError("a weighted vs naive ratio needs at least 2 units with finite labels and non-negative "
                         "weights of positive sum")
    naive, weighted = float(y.mean()), float(np.average(y, weights=w))
    if naive <= 0 or weighted <= 0:
        raise ValueError(f"a risk ratio needs positive mean labels, got naive {naive:.4g}, weighted {weighted:.4g}")
    rr = weighted / naive
    influence = (w / w.mean()) * (y - weighted) / weighted - (y - naive) / naive
    se = float(influence.std(ddof=1) / np.sqrt(y.size))
    z = float(stats.norm.ppf(1 - alpha / 2))
    low, high = rr * math.exp(-z * se), rr * math.exp(z * se)
    return {"naive": naive, "weighted": weighted, "rr": rr, "log_rr_se": se, "ci_low": low, "ci_high": high,
            "alpha": alpha, "e_value": e_value(rr), "e_value_ci": e_value_ci(low, high), "n": int(y.size),
            "ci_method": "delta method on log RR (weights fixed)"}


def weighted_minus_naive(label: np.ndarray, weight: np.ndarray, *, alpha: float = 0.05) -> dict[str, Any]:
    """D = Σ w·y / Σ w − mean(y) over the same units, with a delta-method CI (weights taken as given: unit i's
    influence is (w_i / w̄)(y_i − A) − (y_i − ȳ), se = sd/√n). Under a selection that does not depend on the
    label, weighting has nothing to correct and D is 0 up to noise (the placebo check)."""
    y, w = np.asarray(label, dtype=float), np.asarray(weight, dtype=float)
    if y.shape != w.shape or y.ndim != 1 or y.size < 2 or w.sum() <= 0:
        raise ValueError(f"need 1-d label and weight arrays of one length >= 2 with positive weight sum, got "
                         f"{y.shape} and {w.shape}")
    naive, weighted = float(y.mean()), float(np.average(y, weights=w))
    influence = (w / w.mean()) * (y - weighted) - (y - naive)
    se = float(influence.std(ddof=1) / np.sqrt(y.size))
    z = float(stats.norm.ppf(1 - alpha / 2))
    d = weighted - naive
    return {"naive": naive, "weighted": weighted, "difference": d, "se": se, "ci_low": d - z * se,
            "ci_high": d + z * se, "n": int(y.size)}


def strata_codes(columns: list[np.ndarray], n: int) -> np.ndarray:
    """One integer code per distinct combination of the categorical ``columns`` (missing is its own value);
    all zeros when there are none."""
    if not columns:
        return np.zeros(n, dtype=int)
    keys = np.array(["\x1f".join("\x00" if v is None else str(v) for v in row) for row in zip(*columns, strict=True)])
    return np.unique(keys, return_inverse=True)[1]


def permute_within_strata(values: np.ndarray, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` shuffled among the units of each stratum: what they say beyond the stratum is destroyed, their
    distribution within it kept (a placebo treatment).

    >>> out = permute_within_strata(np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1]), np.random.default_rng(0))
    >>> sorted(out[:2].tolist()), sorted(out[2:].tolist())
    ([1, 2], [3, 4])
    """
    values, strata = np.asarray(values), np.asarray(strata)
    out = values.copy()
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        out[idx] = values[rng.permutation(idx)]
    return out


def stratified_flag(strata: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A 0/1 flag with round(share · n_s) ones at random among the n_s units of each stratum: a selection that
    depends on nothing, with the same share in every stratum (so the strata's composition cannot differ
    between selected and all units, and weighting has nothing to correct)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    strata = np.asarray(strata)
    flag = np.zeros(strata.size, dtype=int)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        flag[rng.choice(idx, size=int(round(share * idx.size)), replace=False)] = 1
    return flag
