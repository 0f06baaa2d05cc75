"""Inverse-propensity weights and the doubly robust pseudo-outcome (DESIGN §5). Numpy in, numpy out."""

from __future__ import annotations

import numpy as np


def invalid_propensities(propensity: np.ndarray) -> np.ndarray:
    """Mask of propensities that cannot weight a unit: NaN/inf or outside (0, 1]."""
    return ~np.isfinite(propensity) | (propensity <= 0) | (propensity > 1)


def _check(observed: np.ndarray, propensity: np.ndarray) -> None:
    if observed.shape != propensity.shape:
        raise ValueError(f"observed and propensity differ in shape: {observed.shape} vs {propensity.shape}")
    bad = int(invalid_propensities(propensity).sum())
    if bad:
        raise ValueError(f"{bad} propensities are not in (0, 1]: IPS weights would be undefined")


def ips(observed: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """w = o / p̂ (Horvitz–Thompson): unbiased for full-population means when p̂ is right."""
    _check(observed, propensity)
    return observed / propensity


def clipped(observed: np.ndarray, propensity: np.ndarray, clip: float) -> np.ndarray:
    """w = o / max(p̂, λ): bounded weights, trading a little bias for much less variance (λ = 0: no floor)."""
    _check(observed, propensity)
    if not 0 <= clip < 1:
        raise ValueError(f"clip must be in [0, 1), got {clip}")
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


def auto_clip(observed: np.ndarray, propensity: np.ndarray, min_ess_share: float) -> float:
    """The smallest floor λ on p̂ whose clipped weights o/max(p̂, λ) keep Kish ESS ≥ ``min_ess_share`` × the
    number of observed units: the least biased clipping that still leaves that much effective data.

    Exact: with the observed p̂ sorted, flooring at the k-th smallest gives Σw = k/λ + Σ_{i≥k} 1/p̂_i and
    Σw² = k/λ² + Σ_{i≥k} 1/p̂_i², so every candidate's ESS comes from two cumulative sums. λ = max p̂ makes
    the weights equal (ESS = all observed), so an answer always exists for a share ≤ 1.
    """
    _check(observed, propensity)
    if not 0 < min_ess_share <= 1:
        raise ValueError(f"min_ess_share must be in (0, 1], got {min_ess_share}")
    p = np.sort(propensity[observed == 1])
    m = p.size
    if m == 0:
        raise ValueError("no observed unit: there are no weights to clip")
    inv, inv2 = 1.0 / p, 1.0 / p**2
    tail1 = np.concatenate([np.cumsum(inv[::-1])[::-1], [0.0]])     # Σ_{i≥k} 1/p_i, k = 0..m
    tail2 = np.concatenate([np.cumsum(inv2[::-1])[::-1], [0.0]])
    k = np.arange(m)                                                  # floor at p[k]: units 0..k-1 raised to it
    ess = (k / p + tail1[k]) ** 2 / (k / p**2 + tail2[k])
    ok = np.flatnonzero(ess >= min_ess_share * m * (1 - 1e-12))
    return float(p[ok[0]])


def degenerate_weights(observed: np.ndarray, propensity: np.ndarray, *, min_ess_share: float) -> str | None:
    """Why these propensities cannot weight the observed units (None when they can): a p̂ that is NaN or
    outside (0, 1], or a Kish ESS of the IPS weights below ``min_ess_share`` of the observed units. A stage
    fails on this rather than clipping silently: such weights mean the propensity model or the overlap is
    broken, and a clip would hide it."""
    bad = invalid_propensities(propensity)
    if bad.any():
        return (f"{int(bad.sum())} of {propensity.size} propensities are NaN or outside (0, 1] "
                f"(e.g. {propensity[bad][0]!r}): inverse-propensity weights are undefined")
    n_obs = int((observed == 1).sum())
    if n_obs == 0:
        return "no unit is observed: there is nothing to weight"
    ess = kish_ess(observed / propensity)
    if ess < min_ess_share * n_obs:
        return (f"Kish ESS of the IPS weights is {ess:.1f}, {ess / n_obs:.2%} of the {n_obs} observed units, "
                f"below the floor of {min_ess_share:g} of them: the propensities have almost no overlap")
    return None
