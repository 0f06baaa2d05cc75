"""Label noise (docs/estimators.md, CausalRM): flip rates ρ01 = P(r=0 | r*=1), ρ10 = P(r=1 | r*=0), their estimates,
and the corrected targets. Numpy in, numpy out.

Under class-conditional flips P(r=1 | x) = ρ10 + (1 − ρ01 − ρ10)·P(r*=1 | x), so wherever P(r*=1 | x) is 0 or
1 ("anchor points") the noisy rate reveals a flip rate. A proxy model's extreme scores are noisy, so the
anchors are high and low quantiles of its (out-of-fold) scores, not the raw max and min.

Each estimate carries a confidence interval, and ``identify`` decides whether it is precise enough to correct
targets with: a rate read off a handful of extreme scores is a guess, and dividing by 1 − ρ01 − ρ10 amplifies it.
``noise_model`` is the policy on top: which of these rates the targets use under ``fit.noise``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from scipy import stats

from estimators.calibration import check_audit
from schemas.config import FitConfig
from schemas.errors import ConfigError


@dataclass(frozen=True)
class FlipRates:
    """Flip rates, how they were estimated, their confidence intervals (``level``; (low, high) per rate), the
    audit's standard errors, and whether they are identified (``identify``) with the reason why or why not."""

    rho01: float
    rho10: float
    method: str
    n: int
    se01: float | None = None
    se10: float | None = None
    ci01: tuple[float, float] | None = None
    ci10: tuple[float, float] | None = None
    level: float | None = None
    identified: bool = True
    why: str = ""

    def __post_init__(self) -> None:
        check_flip_rates(self.rho01, self.rho10)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlipRates:
        """The rates from a dict that may carry more (``models/noise.json`` also holds the other estimates). A
        file written before rates carried intervals reads as it was used then: applied, with no interval."""
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for ci in ("ci01", "ci10"):
            if kw.get(ci) is not None:
                kw[ci] = (float(kw[ci][0]), float(kw[ci][1]))
        if "identified" not in d:
            kw["why"] = "not assessed (written before flip rates carried intervals)"
        return cls(**kw)

    def interval_text(self) -> str:
        """'rho01 = 0.080 (95% CI [0.010, 0.310]), rho10 = ...': the rates as a message names them."""
        level = f"{self.level:.0%} " if self.level else ""

        def one(name: str, rate: float, ci: tuple[float, float] | None) -> str:
            return f"{name} = {rate:.3f}" + (f" ({level}CI [{ci[0]:.3f}, {ci[1]:.3f}])" if ci else " (no interval)")
        return f"{one('rho01', self.rho01, self.ci01)}, {one('rho10', self.rho10, self.ci10)}"


UNJUDGED = {"identified": False, "why": "not judged yet (estimators.noise.identify)"}
"""What an estimate says about itself before ``identify`` has weighed its intervals."""


def check_flip_rates(rho01: float, rho10: float) -> None:
    """Refuse rates that cannot be corrected for: each in [0, 1) and ρ01 + ρ10 < 1 (else the noisy label
    carries no information about the true one, or is anti-correlated with it)."""
    if not (0 <= rho01 < 1 and 0 <= rho10 < 1):
        raise ValueError(f"flip rates must be in [0, 1), got rho01={rho01}, rho10={rho10}")
    if rho01 + rho10 >= 1:
        raise ValueError(f"rho01 + rho10 = {rho01 + rho10:.3f} >= 1: the labels carry no usable signal; "
                         "a noise correction would divide by a non-positive number")


def anchor_flip_rates(scores: np.ndarray, quantile: float = 0.01, *, n_boot: int = 200, level: float = 0.95,
                      seed: int = 0) -> FlipRates:
    """ρ̂01 = 1 − q_{1−quantile}(P̂(r=1|x)), ρ̂10 = q_{quantile}(P̂(r=1|x)) over ``scores``, a proxy model's
    out-of-fold P̂(r=1 | x) on labelled units. Biased towards larger rates when no x is a true anchor.

    The intervals are percentile intervals of ``n_boot`` bootstrap resamples of the units (seeded). They
    condition on the fitted proxy: its scores are held fixed, so the proxy's own fitting error and the
    estimator's bias (no true anchors) are not in them; they say how much the quantiles move with the units."""
    scores = np.asarray(scores, dtype=float)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("anchor flip rates need finite proxy scores for at least one labelled unit")
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
    hi, lo = np.quantile(scores, [1 - quantile, quantile])
    boot_lo, boot_hi = bootstrap_quantiles(scores, (quantile, 1 - quantile), n_boot=n_boot, seed=seed)
    return FlipRates(rho01=float(np.clip(1 - hi, 0, 1)), rho10=float(np.clip(lo, 0, 1)),
                     method=f"anchor_quantile_{quantile:g}", n=int(scores.size),
                     ci01=_percentile_interval(np.clip(1 - boot_hi, 0, 1), level),
                     ci10=_percentile_interval(np.clip(boot_lo, 0, 1), level), level=level, **UNJUDGED)


def bootstrap_quantiles(values: np.ndarray, quantiles: tuple[float, ...], *, n_boot: int = 200, seed: int = 0,
                        max_cells: int = 2**21) -> np.ndarray:
    """``quantiles`` of ``n_boot`` resamples (with replacement) of ``values``: shape (len(quantiles), n_boot).
    Resamples are drawn ``max_cells`` values at a time, so memory stays bounded on a large fit sample."""
    values = np.asarray(values, dtype=float)
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    rows = max(1, max_cells // values.size)
    out = [np.quantile(values[rng.integers(0, values.size, size=(min(rows, n_boot - start), values.size))],
                       quantiles, axis=1)
           for start in range(0, n_boot, rows)]
    return np.concatenate(out, axis=1)


def _percentile_interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def audit_flip_rates(label: np.ndarray, gold: np.ndarray, min_per_class: int = 1, *,
                     level: float = 0.95) -> FlipRates:
    """Flip rates counted on a gold-labelled audit subset: ρ̂01 = mean of 1 − r among r*=1, ρ̂10 = mean of r
    among r*=0 (for binary labels, the shares of flipped ones), with Agresti-Coull standard errors and Wilson
    intervals (``wilson_interval``). Gold labels other than exactly 0 or 1 are not counted."""
    label, gold = np.asarray(label, dtype=float), np.asarray(gold, dtype=float)
    pos, neg = gold == 1, gold == 0
    if min(pos.sum(), neg.sum()) < max(1, min_per_class):
        raise ValueError(f"the audit subset needs at least {max(1, min_per_class)} labelled units with each gold "
                         f"label to estimate both flip rates; it has {int(pos.sum())} with r*=1 and "
                         f"{int(neg.sum())} with r*=0")
    r01, r10 = float(np.mean(1 - label[pos])), float(np.mean(label[neg]))
    n1, n0 = int(pos.sum()), int(neg.sum())
    ci01, ci10 = (tuple(float(b) for b in wilson_interval(r * n, n, level)) for r, n in ((r01, n1), (r10, n0)))
    return FlipRates(rho01=r01, rho10=r10, method="audit", n=n1 + n0,
                     se01=_agresti_coull_se(r01, n1), se10=_agresti_coull_se(r10, n0),
                     ci01=ci01, ci10=ci10, level=level, **UNJUDGED)


def wilson_interval(successes: np.ndarray | float, n: np.ndarray | int, level: float = 0.95,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval for a binomial proportion (vectorised; ``successes`` may be fractional, e.g. a
    sum of soft labels). Unlike the Wald interval p ± z·se it keeps its coverage near the nominal level for
    small n and for rates near 0, which is where flip rates live, and it is never empty at 0 flips seen."""
    k, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    if np.any(n <= 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("a binomial interval needs n > 0 and 0 <= successes <= n")
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def _agresti_coull_se(rate: float, n: int) -> float:
    """Standard error of a proportion with two pseudo-successes and two pseudo-failures added: unlike the
    plain binomial one it is not 0 when no flip was seen (30 clean audits do not prove a rate of 0)."""
    shrunk = (rate * n + 2) / (n + 4)
    return float(np.sqrt(shrunk * (1 - shrunk) / (n + 4)))


def identify(rates: FlipRates, *, tail_units: float | None, min_tail_units: float, max_ci_width: float,
             max_sum: float) -> FlipRates:
    """``rates`` with ``identified`` and ``why`` set: identified when every criterion holds, namely at least
    ``min_tail_units`` units in each anchor tail (``tail_units`` = quantile·n; None for an audit, where the
    counts are in the intervals), each rate's interval at most ``max_ci_width`` wide, and the upper bound of
    ρ01 + ρ10 (the sum of the intervals' upper ends, conservative) at most ``max_sum``, so that the correction's
    divisor 1 − ρ01 − ρ10 is clearly positive. Rates without intervals are not identified."""
    held: list[str] = []
    failed: list[str] = []

    def check(ok: bool, text: str) -> None:
        (held if ok else failed).append(text)

    if tail_units is not None:
        check(tail_units >= min_tail_units, f"{tail_units:.1f} units in each anchor tail (at least "
                                            f"{min_tail_units:g} needed)")
    if rates.ci01 is None or rates.ci10 is None:
        failed.append("no confidence interval")
    else:
        for name, (lo, hi) in (("rho01", rates.ci01), ("rho10", rates.ci10)):
            check(hi - lo <= max_ci_width, f"{name} interval [{lo:.3f}, {hi:.3f}] is {hi - lo:.3f} wide "
                                           f"(at most {max_ci_width:g})")
        upper = rates.ci01[1] + rates.ci10[1]
        check(upper <= max_sum, f"upper bound of rho01 + rho10 {upper:.3f} (at most {max_sum:g})")
    why = "identified: " + "; ".join(held) if not failed else "not identified: " + "; ".join(failed)
    if not failed and tail_units is not None:
        # the bootstrap holds the fitted proxy fixed: neither its error nor the anchors' bias (no x need be a true
        # anchor) is in the intervals, so "identified" is a statement about sampling noise only
        why += " (intervals given the fitted proxy: its error and the anchors' bias are not in them)"
    return replace(rates, identified=not failed, why=why)


def corrected_target(label: np.ndarray, rho01: float, rho10: float) -> np.ndarray:
    """(r − ρ10) / (1 − ρ01 − ρ10): unbiased for P(r*=1 | x) under class-conditional flips (also for a
    linear pseudo-outcome of r, such as the DR target)."""
    check_flip_rates(rho01, rho10)
    return (np.asarray(label, dtype=float) - rho10) / (1 - rho01 - rho10)


def posterior_clean(label: np.ndarray, prior: np.ndarray, rho01: float, rho10: float) -> np.ndarray:
    """P(r* = 1 | r, x) under class-conditional flips, by Bayes with π = P(r* = 1 | x) (``prior``):
    (1 − ρ01)·π / [(1 − ρ01)·π + ρ10·(1 − π)] for r = 1 and ρ01·π / [ρ01·π + (1 − ρ10)·(1 − π)] for r = 0; a soft
    label y mixes the two. Unlike the corrected label (r − ρ10)/(1 − ρ01 − ρ10), which is unbiased but lies outside
    [0, 1] (so clipping it returns the label itself), this is the unit's clean reward given its label.

    >>> posterior_clean(np.array([1.0, 0.0]), np.array([0.5, 0.5]), 0.2, 0.1).round(4).tolist()
    [0.8889, 0.1818]
    """
    check_flip_rates(rho01, rho10)
    y = np.nan_to_num(np.asarray(label, dtype=float))
    pi = np.clip(np.asarray(prior, dtype=float), 0.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        up = (1 - rho01) * pi / ((1 - rho01) * pi + rho10 * (1 - pi))
        down = rho01 * pi / (rho01 * pi + (1 - rho10) * (1 - pi))
    up, down = np.where(np.isfinite(up), up, pi), np.where(np.isfinite(down), down, pi)    # 0/0: π stays
    return y * up + (1 - y) * down


def mean_ci(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """The plain mean with a normal CI: what an audit alone says, to set PPI's interval against."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        raise ValueError("a mean with a CI needs at least 2 values")
    estimate, se = float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))
    z = float(stats.norm.ppf(0.5 + level / 2))
    return {"estimate": estimate, "se": se, "ci_low": estimate - z * se, "ci_high": estimate + z * se,
            "n": int(values.size)}


def ppi_mean(gold: np.ndarray, predicted_gold: np.ndarray, predicted_all: np.ndarray,
             level: float = 0.95, power_tuning: bool = True) -> dict[str, float]:
    """Prediction-powered estimate of the mean of r* (Angelopoulos et al. 2023) with a normal CI.

    ``gold`` and ``predicted_gold`` are the audited units' true labels and predictions, ``predicted_all`` the
    predictions on the other units. The estimate is λ·mean(f over all) + mean(r* − λ·f over gold): λ = 1 is
    plain PPI, λ = 0 the audit's own mean; ``power_tuning`` picks the variance-minimising λ (PPI++, Angelopoulos,
    Duchi & Zrnic 2023) clipped to [0, 1], so a poor predictor cannot make the interval wider than the audit's.
    """
    gold, predicted_gold, predicted_all = (np.asarray(a, dtype=float) for a in (gold, predicted_gold, predicted_all))
    n, big_n = gold.size, predicted_all.size
    if n < 2 or big_n < 2:
        raise ValueError("PPI needs at least 2 gold and 2 predicted units")
    lam = 1.0
    if power_tuning:
        var_f = predicted_gold.var(ddof=1)
        cov = np.cov(gold, predicted_gold, ddof=1)[0, 1]
        lam = float(np.clip(cov / ((1 + n / big_n) * var_f), 0, 1)) if var_f > 0 else 0.0
    rectifier = gold - lam * predicted_gold
    estimate = float(lam * predicted_all.mean() + rectifier.mean())
    se = float(np.sqrt(lam**2 * predicted_all.var(ddof=1) / big_n + rectifier.var(ddof=1) / n))
    z = float(stats.norm.ppf(0.5 + level / 2))
    return {"estimate": estimate, "se": se, "ci_low": estimate - z * se, "ci_high": estimate + z * se,
            "n_gold": n, "n_all": big_n, "lambda": lam}


def noise_model(scores: np.ndarray, label: np.ndarray, gold: np.ndarray, observed: np.ndarray,
                fc: FitConfig) -> tuple[FlipRates, dict[str, Any]]:
    """Flip rates for the noise-corrected target, and what else the labels say about noise.

    Anchors come from the noise proxy's out-of-fold P̂(r=1 | x) (``scores``) on the observed units, with bootstrap
    intervals; the audit from observed units that also carry a gold label, with Wilson intervals. Each estimate is
    judged identified or not (``identify``, thresholds from ``fit``). "auto" calibrates on an audit big enough for
    it (rates 0 here: the calibration replaces them), else applies the anchor rates only if they are identified,
    else no correction, saying why. An explicit "anchor" or "audit" is applied even when not identified (flagged:
    the fit stage warns with :func:`unidentified_warning`, and the train stage refuses such rates for the
    noise-aware losses unless told otherwise); one that cannot be estimated at all is a ConfigError. With gold
    labels on a uniformly random audit sample, the mean true reward also gets a prediction-powered estimate (the
    noise-corrected imputation over all units, rectified on the audited ones) beside the audit-only mean.
    """
    audited = observed & np.isfinite(gold)
    diag: dict[str, Any] = {"audited_units": int(np.isfinite(gold).sum()), "audited_observed": int(audited.sum()),
                            "identification": {"min_anchor_units": fc.min_anchor_units,
                                               "max_flip_ci_width": fc.max_flip_ci_width,
                                               "max_flip_sum": fc.max_flip_sum}}
    estimates: dict[str, FlipRates | None] = {"anchor": None, "audit": None}
    errors: dict[str, str] = {}
    wanted = () if fc.noise == "none" else ("anchor", "audit")      # both, whichever is used: the report compares
    judged = {"min_tail_units": fc.min_anchor_units, "max_ci_width": fc.max_flip_ci_width,
              "max_sum": fc.max_flip_sum}
    for name in wanted:
        try:
            if name == "anchor":
                est = anchor_flip_rates(scores[observed], fc.anchor_quantile, seed=fc.seed)
                estimates[name] = identify(est, tail_units=fc.anchor_quantile * est.n, **judged)
            else:
                estimates[name] = identify(audit_flip_rates(label[audited], gold[audited], fc.min_audit),
                                           tail_units=None, **judged)
        except ValueError as e:
            errors[name] = str(e)
    if fc.noise in ("anchor", "audit") and estimates[fc.noise] is None:   # the configured method cannot run here
        raise ConfigError(f"fit.noise = {fc.noise!r} cannot be estimated on these units ({errors[fc.noise]}); "
                          "choose another fit.noise ('auto' falls back to no correction, saying why)")
    diag["estimates"] = {k: v.to_dict() if v else None for k, v in estimates.items()}
    diag["errors"] = errors
    chosen = _chosen_flip_rates(estimates, errors, gold, observed, fc)
    gold_units = np.isfinite(gold)
    if gold_units.sum() >= 2 and (~gold_units).sum() >= 2:
        # PPI is valid with any predictor; under calibration the audit's rates make a better one than none.
        ppi_rates = (estimates["audit"] or chosen) if chosen.method == "calibrate" else chosen
        reward = np.clip(corrected_target(scores, ppi_rates.rho01, ppi_rates.rho10), 0, 1)
        diag["mean_reward"] = {"ppi": ppi_mean(gold[gold_units], reward[gold_units], reward[~gold_units]),
                               "gold_only": mean_ci(gold[gold_units])}
    return chosen, diag


def unidentified_warning(chosen: FlipRates) -> str | None:
    """What the fit stage warns about rates that are not identified (None when they are): the reason no
    correction is applied, or that the rates ``fit.noise`` asked for are applied although not identified."""
    if chosen.identified:
        return None
    if chosen.method == "none":
        return chosen.why
    return (f"applying {chosen.method} flip rates as fit.noise asks, but they are {chosen.why} "
            f"({chosen.interval_text()})")


def _chosen_flip_rates(estimates: dict[str, FlipRates | None], errors: dict[str, str], gold: np.ndarray,
                       observed: np.ndarray, fc: FitConfig) -> FlipRates:
    """The rates the targets use under ``fit.noise`` (see ``noise_model``)."""
    if fc.noise == "fixed":
        return FlipRates(*fc.flip_rates, method="fixed", n=0, why="given (fit.flip_rates)")
    if fc.noise == "none":
        return FlipRates(0.0, 0.0, method="none", n=0, why="fit.noise = 'none': labels assumed clean")
    if fc.noise in ("anchor", "audit"):
        return estimates[fc.noise]
    audit_problem = None
    try:
        check_audit(gold, observed.astype(int), fc.min_audit)
    except ValueError as e:
        audit_problem = str(e)
    if fc.noise == "calibrate" or audit_problem is None:
        return FlipRates(0.0, 0.0, method="calibrate", n=int((observed & np.isfinite(gold)).sum()),
                         why="calibrated on the audit: E[r* | label, x] replaces flip rates")
    anchor = estimates["anchor"]
    if anchor is not None and anchor.identified:
        return anchor
    failed = [f"anchor rates {anchor.why} ({anchor.interval_text()})" if anchor is not None
              else f"anchor rates: {errors.get('anchor', 'not estimated')}",
              f"no audit to calibrate on ({audit_problem})"]
    return FlipRates(0.0, 0.0, method="none", n=0, identified=False,
                     why="no noise correction: " + "; ".join(failed))
