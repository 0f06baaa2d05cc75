"""Inverse-propensity weights and the doubly robust pseudo-outcome (DESIGN §5). Numpy in, numpy out."""

from __future__ import annotations

import numpy as np


def _check(observed: np.ndarray, propensity: np.ndarray) -> None:
    if observed.shape != propensity.shape:
        raise ValueError(f"observed and propensity differ in shape: {observed.shape} vs {propensity.shape}")
    if not np.all(np.isfinite(propensity)) or np.any(propensity <= 0) or np.any(propensity > 1):
        bad = int(np.sum(~np.isfinite(propensity) | (propensity <= 0) | (propensity > 1)))
        raise ValueError(f"{bad} propensities are not in (0, 1]: IPS weights would be undefined")


def ips(observed: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """w = o / p̂ (Horvitz–Thompson): unbiased for full-population means when p̂ is right."""
    _check(observed, propensity)
    return observed / propensity


def clipped(observed: np.ndarray, propensity: np.ndarray, clip: float) -> np.ndarray:
    """w = o / max(p̂, λ): bounded weights, trading a little bias for much less variance."""
    _check(observed, propensity)
    if not 0 < clip < 1:
        raise ValueError(f"clip must be in (0, 1), got {clip}")
    return observed / np.maximum(propensity, clip)


def self_normalise(weights: np.ndarray, observed: np.ndarray, *, total: float | None = None,
                   n_observed: int | None = None) -> np.ndarray:
    """SNIPS: weights divided by their mean over observed units, so they average 1 there.

    ``total``/``n_observed`` let a distributed caller pass the global sums instead of this batch's.
    """
    total = float(weights[observed == 1].sum()) if total is None else total
    n_observed = int((observed == 1).sum()) if n_observed is None else n_observed
    if n_observed == 0 or total <= 0:
        raise ValueError("no observed unit with positive weight: self-normalised weights are undefined")
    return weights / (total / n_observed)


def dr_pseudo_outcome(label: np.ndarray, observed: np.ndarray, weight: np.ndarray, imputed: np.ndarray) -> np.ndarray:
    """ε̂ + o·w·(r − ε̂): unbiased if either the propensity (w = 1/p) or the imputation ε̂ is right."""
    residual = np.where(observed == 1, np.nan_to_num(label) - imputed, 0.0)
    return imputed + weight * residual


def kish_ess(weights: np.ndarray) -> float:
    """Kish effective sample size (Σw)² / Σw² of the positive weights."""
    w = weights[weights > 0]
    return float(w.sum() ** 2 / (w**2).sum()) if w.size else 0.0


def top_share(weights: np.ndarray, q: float = 0.01) -> float:
    """Share of the total weight carried by the top ``q`` fraction of positive-weight units."""
    w = np.sort(weights[weights > 0])[::-1]
    if not w.size:
        return 0.0
    k = max(1, int(np.ceil(q * w.size)))
    return float(w[:k].sum() / w.sum())
