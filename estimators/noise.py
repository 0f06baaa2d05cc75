"""Label noise (DESIGN §5, CausalRM): flip rates ρ01 = P(r=0 | r*=1), ρ10 = P(r=1 | r*=0), their estimates,
and the corrected targets. Numpy in, numpy out.

Under class-conditional flips P(r=1 | x) = ρ10 + (1 − ρ01 − ρ10)·P(r*=1 | x), so wherever P(r*=1 | x) is 0 or
1 ("anchor points") the noisy rate reveals a flip rate. A proxy model's extreme scores are noisy, so the
anchors are high and low quantiles of its (out-of-fold) scores, not the raw max and min.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class FlipRates:
    """Estimated flip rates, how they were estimated, and (from an audit) their standard errors."""

    rho01: float
    rho10: float
    method: str
    n: int
    se01: float | None = None
    se10: float | None = None

    def __post_init__(self) -> None:
        check_flip_rates(self.rho01, self.rho10)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FlipRates:
        """The rates from a dict that may carry more (``models/noise.json`` also holds the other estimates)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def check_flip_rates(rho01: float, rho10: float) -> None:
    """Refuse rates that cannot be corrected for: each in [0, 1) and ρ01 + ρ10 < 1 (else the noisy label
    carries no information about the true one, or is anti-correlated with it)."""
    if not (0 <= rho01 < 1 and 0 <= rho10 < 1):
        raise ValueError(f"flip rates must be in [0, 1), got rho01={rho01}, rho10={rho10}")
    if rho01 + rho10 >= 1:
        raise ValueError(f"rho01 + rho10 = {rho01 + rho10:.3f} >= 1: the labels carry no usable signal; "
                         "a noise correction would divide by a non-positive number")


def anchor_flip_rates(scores: np.ndarray, quantile: float = 0.01) -> FlipRates:
    """ρ̂01 = 1 − q_{1−quantile}(P̂(r=1|x)), ρ̂10 = q_{quantile}(P̂(r=1|x)) over ``scores``, a proxy model's
    out-of-fold P̂(r=1 | x) on labelled units. Biased towards larger rates when no x is a true anchor."""
    scores = np.asarray(scores, dtype=float)
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("anchor flip rates need finite proxy scores for at least one labelled unit")
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must be in (0, 0.5), got {quantile}")
    hi, lo = np.quantile(scores, [1 - quantile, quantile])
    return FlipRates(rho01=float(np.clip(1 - hi, 0, 1)), rho10=float(np.clip(lo, 0, 1)),
                     method=f"anchor_quantile_{quantile:g}", n=int(scores.size))


def audit_flip_rates(label: np.ndarray, gold: np.ndarray, min_per_class: int = 1) -> FlipRates:
    """Flip rates counted on a gold-labelled audit subset: ρ̂01 = mean of 1 − r among r*=1, ρ̂10 = mean of r
    among r*=0 (for binary labels, the shares of flipped ones), with Agresti-Coull standard errors. Gold labels
    other than exactly 0 or 1 are not counted."""
    label, gold = np.asarray(label, dtype=float), np.asarray(gold, dtype=float)
    pos, neg = gold == 1, gold == 0
    if min(pos.sum(), neg.sum()) < max(1, min_per_class):
        raise ValueError(f"the audit subset needs at least {max(1, min_per_class)} labelled units with each gold "
                         f"label to estimate both flip rates; it has {int(pos.sum())} with r*=1 and "
                         f"{int(neg.sum())} with r*=0")
    r01, r10 = float(np.mean(1 - label[pos])), float(np.mean(label[neg]))
    return FlipRates(rho01=r01, rho10=r10, method="audit", n=int(pos.sum() + neg.sum()),
                     se01=_agresti_coull_se(r01, int(pos.sum())), se10=_agresti_coull_se(r10, int(neg.sum())))


def _agresti_coull_se(rate: float, n: int) -> float:
    """Standard error of a proportion with two pseudo-successes and two pseudo-failures added: unlike the
    plain binomial one it is not 0 when no flip was seen (30 clean audits do not prove a rate of 0)."""
    shrunk = (rate * n + 2) / (n + 4)
    return float(np.sqrt(shrunk * (1 - shrunk) / (n + 4)))


def corrected_target(label: np.ndarray, rho01: float, rho10: float) -> np.ndarray:
    """(r − ρ10) / (1 − ρ01 − ρ10): unbiased for P(r*=1 | x) under class-conditional flips (also for a
    linear pseudo-outcome of r, such as the DR target)."""
    check_flip_rates(rho01, rho10)
    return (np.asarray(label, dtype=float) - rho10) / (1 - rho01 - rho10)


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
