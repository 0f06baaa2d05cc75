"""Inverse-propensity weights and the doubly robust pseudo-outcome (docs/estimators.md). Numpy in, numpy out.

At the end, the fit stage's weighting policy (``choose_clip``, ``stabilizer_map``): the settings in, the floor
and the stabiliser's map that ``weights.json`` records out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression

from schemas.config import WeightsConfig
from schemas.errors import ConfigError, GateError


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


# --- Stabilised weights beyond clipping ------------------------------------------------------------------------

MONOTONE_FLOOR = 1e-3
"""Lower bound on the calibrated propensity q(p̂) of the monotone weights: a region of p̂ with no observed unit in
the fit sample gets q = 0, and a unit observed there later would otherwise weigh infinitely (1 / 1e-3 at most)."""


def monotone_map(observed: np.ndarray, propensity: np.ndarray, *,
                 floor: float = MONOTONE_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """q(p̂): the isotonic (non-decreasing) least-squares regression of the observed flag o on p̂ over *all* units,
    bounded below by ``floor``; returned as its thresholds (x, y), applied by :func:`monotone_weights`.

    The weights o / q(p̂) are then non-increasing in p̂ and, by the pool-adjacent-violators balancing property,
    those of each isotonic block sum to the block's size: a block with n_b units of which k_b are observed has
    q = k_b / n_b, so its k_b observed units weigh n_b / k_b each (van der Laan, Lin, Carone & Luedtke 2024,
    "Stabilized inverse probability weighting via isotonic calibration"; CJE's SIMCal is the same projection).
    Calibrating 1/p̂ this way cannot make the weights worse ordered than p̂, and it removes the extreme weights
    that a mis-calibrated tail of p̂ gives a handful of observed units.
    """
    _check(observed, propensity)
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    if not (observed == 1).any():
        raise ValueError("no observed unit: the monotone weights are undefined")
    iso = IsotonicRegression(increasing=True, y_min=floor, y_max=1.0, out_of_bounds="clip")
    iso.fit(propensity.astype(float), (observed == 1).astype(float))
    return np.asarray(iso.X_thresholds_, float), np.asarray(iso.y_thresholds_, float)


def monotone_weights(observed: np.ndarray, propensity: np.ndarray, thresholds_x: np.ndarray,
                     thresholds_y: np.ndarray) -> np.ndarray:
    """w = o / q(p̂) with q from :func:`monotone_map`'s thresholds: linear between them and constant beyond, as
    ``IsotonicRegression.predict`` with ``out_of_bounds="clip"`` does, so any unit (not only the fit sample's)
    gets its weight from the saved map."""
    _check(observed, propensity)
    x, y = np.asarray(thresholds_x, float), np.asarray(thresholds_y, float)
    if x.size == 0 or x.shape != y.shape or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0) or y[0] <= 0:
        raise ValueError("the monotone map's thresholds must be non-empty, non-decreasing and positive")
    return observed / np.interp(propensity, x, y)


def weight_sums(weights: np.ndarray, observed: np.ndarray) -> tuple[float, float, int]:
    """(Σw, Σw², n) over the observed units: what :func:`cap_variance` needs, summable across batches."""
    w = weights[observed == 1]
    return float(w.sum()), float((w**2).sum()), int(w.size)


def cap_variance(weights: np.ndarray, observed: np.ndarray, *, max_variance: float,
                 sums: tuple[float, float, int] | None = None) -> tuple[np.ndarray, float]:
    """Self-normalise the weights to mean one over observed units, then blend them toward 1,
    w ← 1 + λ(w − 1), with the largest λ ≤ 1 that keeps their variance over observed units ≤ ``max_variance``.

    With mean-one weights Var = Σw²/(n m²) − 1 (m = Σw/n), and blending scales it by λ², so
    λ = min(1, √(cap / Var)). The blend keeps mean one and the order of the weights (a monotone weight stays
    monotone), and the Kish ESS share is then 1 / (1 + Var) ≥ 1 / (1 + cap). ``sums`` = (Σw, Σw², n) lets a
    distributed caller pass the global sums instead of this batch's. Returns (weights, λ); unobserved units weigh 0.
    """
    if not max_variance > 0:
        raise ValueError(f"max_variance must be > 0, got {max_variance}")
    total, total_sq, n = weight_sums(weights, observed) if sums is None else sums
    if n == 0 or total <= 0:
        raise ValueError("no observed unit with positive weight: self-normalised weights are undefined")
    mean = total / n
    variance = max(0.0, total_sq / (n * mean**2) - 1.0)
    lam = 1.0 if variance <= max_variance else float(np.sqrt(max_variance / variance))
    w = weights / mean
    return np.where(observed == 1, 1.0 + lam * (w - 1.0), 0.0), lam


def dr_weights(weights: np.ndarray, *, variant: str = "standard", tau: float = np.inf,
               lam: float = np.inf) -> np.ndarray:
    """The weights a DR variant puts on each unit's residual (the pseudo-outcome is ε̂ + o·w'·(r − ε̂)).

    * ``standard``: w' = w;
    * ``switch``: w' = w where w ≤ τ, else 0, i.e. the imputation alone where the weight is extreme
      (Switch-DR: Wang, Agarwal & Dudík 2017, "Optimal and adaptive off-policy evaluation in contextual bandits");
    * ``shrink``: w' = λw / (w² + λ), at most √λ / 2 and ≈ w for w ≪ √λ (DR with optimistic shrinkage: Su,
      Dimakopoulou, Krishnamurthy & Dudík 2020, "Doubly robust off-policy evaluation with shrinkage").
    Both trade a bias bounded by the imputation's error on the heavy-weight units for much less variance.
    """
    if variant == "standard":
        return weights
    if variant == "switch":
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        return np.where(weights <= tau, weights, 0.0)
    if variant == "shrink":
        if not lam > 0:
            raise ValueError(f"lambda must be > 0, got {lam}")
        return weights if np.isinf(lam) else lam * weights / (weights**2 + lam)
    raise ValueError(f"unknown DR variant {variant!r}: choose standard, switch or shrink")


def hill_tail_index(weights: np.ndarray, *, k: int | None = None) -> float:
    """Hill estimator of the tail index α of the positive weights: 1 / mean_{i≤k} log(w_(i) / w_(k+1)) over the k
    largest (w_(1) ≥ w_(2) ≥ ...), k = ⌈√n⌉ by default (Hill 1975). A Pareto tail P(W > w) ∝ w^−α has α̂ → α; α ≤ 2
    means the weights' variance is not finite, so ESS and standard errors are unreliable (CJE gates on it).

    NaN with fewer than 3 positive weights; inf when the k + 1 largest are equal (no tail at all).
    """
    w = np.sort(weights[weights > 0])[::-1]
    n = w.size
    if n < 3:
        return float("nan")
    k = int(np.ceil(np.sqrt(n))) if k is None else int(k)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} positive weights, got {k}")
    mean_log = float(np.mean(np.log(w[:k] / w[k])))
    return float("inf") if mean_log <= 0 else 1.0 / mean_log


def policy_value(weights: np.ndarray, reward: np.ndarray) -> dict[str, float]:
    """The value of the policy the weights point to (w = o·π_target / π_logging), as obp reports it:
    IPS = mean over all logged units of w·r (unbiased when the logging propensities are right), and
    SNIPS = Σ w·r / Σ w (bounded by the rewards' range; biased O(1/n), far less variable)."""
    if weights.shape != reward.shape:
        raise ValueError(f"weights and reward differ in shape: {weights.shape} vs {reward.shape}")
    r = np.where(weights > 0, np.nan_to_num(reward), 0.0)   # an unobserved unit's null reward has weight 0
    total = float(weights.sum())
    return {"ips": float(np.sum(weights * r) / max(1, weights.size)),
            "snips": float(np.sum(weights * r) / total) if total > 0 else float("nan"),
            "n": int(weights.size), "weight_sum": total}


# --- the fit stage's weighting policy: the floor and the stabiliser's map, chosen once on the fit sample --------

def configured_clip(observed: np.ndarray, propensity: np.ndarray, settings: WeightsConfig) -> float:
    """The propensity floor the config asks for: a number, none (0), or ``auto_clip`` at ``min_ess_share``."""
    if settings.clip == "auto":
        return auto_clip(observed, propensity, settings.min_ess_share)
    return 0.0 if settings.clip == "none" else float(settings.clip)


def choose_clip(observed: np.ndarray, propensity: np.ndarray, settings: WeightsConfig) -> dict[str, Any]:
    """The propensity floor the score stage applies (from the config, or chosen on the sample's out-of-fold
    propensities), after refusing degenerate propensities (exit code 2) rather than clipping them away: what the
    fit stage writes to ``weights.json``, the only source of the floor after fit."""
    s = settings
    reason = degenerate_weights(observed, propensity, min_ess_share=s.ips_min_ess_share)
    if reason:
        raise GateError(f"fit: degenerate propensities: {reason} (weights.ips_min_ess_share = {s.ips_min_ess_share})")
    clip = min(configured_clip(observed, propensity, s), 1 - 1e-9)
    w = clipped(observed, propensity, clip)
    return {"clip": clip, "method": "auto" if s.clip == "auto" else "none" if s.clip == "none" else "config",
            "min_ess_share": s.min_ess_share if s.clip == "auto" else None,
            "sample_ess_share": kish_ess(w) / max(1, int(observed.sum())),
            "sample_clipped": int(np.sum((observed == 1) & (propensity < clip))),
            "stabilizer": stabilizer_map(observed, propensity, s)}


def stabilizer_map(observed: np.ndarray, propensity: np.ndarray, settings: WeightsConfig) -> dict[str, Any] | None:
    """For ``weights.stabilize = "monotone"``: the isotonic map q(p̂) fitted on the sample's out-of-fold propensities
    (its thresholds, which the score stage applies to every unit) and what the stabilised weights look like on the
    sample (the score stage normalises and caps them again over all units). None for the other stabilisers."""
    s = settings
    if s.stabilize != "monotone":
        return None
    if (observed == 1).all():
        raise ConfigError("weights.stabilize = 'monotone' calibrates the observed flag on p̂, but every unit of the fit "
                          "sample is observed (click-through framing): there is no selection to calibrate; use "
                          "'none' or 'snips'")
    x, y = monotone_map(observed, propensity)
    raw = monotone_weights(observed.astype(float), propensity, x, y)
    w, lam = cap_variance(raw, observed, max_variance=s.max_weight_variance)
    n_obs = int((observed == 1).sum())
    obs = w[observed == 1]
    tail = hill_tail_index(obs)
    return {"method": "monotone", "thresholds_x": x.tolist(), "thresholds_y": y.tolist(), "floor": MONOTONE_FLOOR,
            "max_weight_variance": s.max_weight_variance, "sample_lambda": lam,
            "sample_variance": float(np.mean((obs - 1) ** 2)), "sample_ess_share": kish_ess(obs) / n_obs,
            "sample_max": float(obs.max()), "sample_tail_index": tail if np.isfinite(tail) else None}
