"""The clean reward from an audit: E[r* | label, x] for rated units, E[r* | x] for the others, learnt on the audit.

Label error that depends on x (longer answers get more thumbs up, some raters are harsher than others) is not
class-conditional noise, and one pair of flip rates applied to every unit cannot undo it. A uniformly random audit
(units whose true reward r* an annotation team gave, rated by users or not) lets the map from what users gave to
the truth be learnt as a function of x, as CJE calibrates a judge score to an oracle slice:

* ``given``   ĉ(r, x) ≈ E[r* | r, x, o=1], on the observed audited units: what a rated unit's label means;
* ``unrated`` ĥ(x) ≈ E[r* | x, o=0], on the audited units nobody rated.

The unit's clean reward is ĉ where it was rated and ĥ where not, and its population mean is E[r*] when both are
calibrated: each stratum of the observed flag is calibrated on audited units *of that stratum*, so this needs
neither ignorable selection nor inverse-propensity weights (with weights, the few hundred rated audited units
would stand for the whole population, and their calibration error with them). The audit's own units give the
check: ``calibrated_mean`` puts a bootstrap of both calibrators into the interval, and PPI on the same audit is
the reference it must agree with.

x enters through a few dense columns, so that a few hundred audited units are enough: the logit of the imputation
model's E[r | x] (what the text says about the label) and the structured features (standardised numerics and
one-hot categoricals: length, position, model version, who rated); ``given`` adds the label and its interactions
with them, so the label's reliability may vary with x. Numpy in, numpy out; the models are
``estimators.imputation.ImputationModel`` (logistic, soft gold labels allowed), cross-fitted by
``estimators.crossfit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import expit
from threadpoolctl import threadpool_limits

from estimators.crossfit import crossfit, predict_by_fold
from estimators.imputation import ImputationModel

_EPS = 1e-4


def design(imputed: np.ndarray, structured: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    """The calibrators' input: [logit ε̂(x), structured] for ``unrated``; with ``label``, also [r, r·(…)] for
    ``given`` (unobserved units' NaN labels count as 0: ``given`` is only fitted and used on observed units)."""
    p = np.clip(np.asarray(imputed, dtype=float), _EPS, 1 - _EPS)
    Z = np.column_stack([np.log(p / (1 - p)), np.asarray(structured, dtype=float).reshape(len(p), -1)])
    if label is None:
        return Z
    r = np.nan_to_num(np.asarray(label, dtype=float))[:, None]
    return np.hstack([Z, r, r * Z])


@dataclass
class Calibration:
    """Cross-fitted calibrators and their out-of-fold outputs on the units they were fitted from."""

    given: list
    unrated: list
    reward_clean: np.ndarray      # ĉ(r, x) on observed units, ĥ(x) on the others
    imputed_clean: np.ndarray     # ĥ(x) on every unit: E[r* | x, o=0], as for a unit nobody rated

    def models(self) -> dict[str, list]:
        return {"given": self.given, "unrated": self.unrated}


def _given_rows(gold: np.ndarray, observed: np.ndarray) -> np.ndarray:
    return np.isfinite(gold) & (np.asarray(observed) == 1)


def _unrated_rows(gold: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """The audited units nobody rated; every audited unit when every unit is rated (the click-through framing,
    where ĥ is only the clean imputation E[r* | x])."""
    audited, unrated = np.isfinite(gold), np.asarray(observed) != 1
    return audited & unrated if unrated.any() else audited


def check_audit(gold: np.ndarray, observed: np.ndarray, min_per_class: int) -> None:
    """Refuse an audit too small to calibrate on: each calibrator needs ``min_per_class`` audited units with
    r* = 1 and with r* = 0 (soft gold values count by their weight), among the rows it is fitted on."""
    for name, rows in (("observed audited", _given_rows(gold, observed)),
                       ("unobserved audited", _unrated_rows(gold, observed))):
        pos, neg = float(np.sum(gold[rows])), float(np.sum(1 - gold[rows]))
        if min(pos, neg) < max(1, min_per_class):
            raise ValueError(f"calibrating the clean reward needs at least {max(1, min_per_class)} {name} units "
                             f"with each gold label; there are {pos:g} with r*=1 and {neg:g} with r*=0")


def fit_calibration(make_model: Callable[[], object], imputed: np.ndarray, structured: np.ndarray,
                    label: np.ndarray, observed: np.ndarray, gold: np.ndarray, fold: np.ndarray) -> Calibration:
    """Cross-fit ``given`` on the observed audited units and ``unrated`` on the unobserved audited ones (``gold``
    is NaN where a unit was not audited); every unit gets the out-of-fold outputs of its fold's models."""
    observed = np.asarray(observed) == 1
    gold = np.asarray(gold, dtype=float)
    target = np.nan_to_num(gold)
    given, given_models = crossfit(make_model(), design(imputed, structured, label), target, fold,
                                   fit_mask=_given_rows(gold, observed))
    unrated, unrated_models = crossfit(make_model(), design(imputed, structured), target, fold,
                                       fit_mask=_unrated_rows(gold, observed))
    return Calibration(given_models, unrated_models, np.where(observed, given, unrated), unrated)


def apply_calibration(models: dict[str, list], imputed: np.ndarray, structured: np.ndarray, label: np.ndarray,
                      observed: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reward_clean, imputed_clean) of new units from saved fold models (the score stage's side of
    :func:`fit_calibration`)."""
    unrated = predict_by_fold(models["unrated"], design(imputed, structured), fold)
    given = predict_by_fold(models["given"], design(imputed, structured, label), fold)
    return np.where(np.asarray(observed) == 1, given, unrated), unrated


def _bootstrap_means(make_model: Callable[[], object], Zg: np.ndarray, Zu: np.ndarray, Zg_rated: np.ndarray,
                     Zu_unrated: np.ndarray, gold: np.ndarray, observed: np.ndarray, audited: np.ndarray, n: int,
                     n_boot: int, rng: np.random.Generator) -> list[float]:
    """The mean clean reward under each of ``n_boot`` refits of both calibrators on resampled audited units."""
    means = []
    for _ in range(n_boot):
        rows = rng.choice(audited, size=audited.size, replace=True)
        rated, unrated = rows[observed[rows]], rows[_unrated_rows(gold, observed)[rows]]
        g, u = make_model(), make_model()
        try:
            g.fit(Zg[rated], gold[rated])
            u.fit(Zu[unrated], gold[unrated])
        except ValueError:                 # a resample with no rated or no unrated audited unit: skip it
            continue
        means.append((predicted_sum(g, Zg_rated) + predicted_sum(u, Zu_unrated)) / n)
    return means


def predicted_sum(model, Z: np.ndarray) -> float:
    """``model.predict(Z).sum()``. For a fitted logistic ``ImputationModel`` (what the fit stage calibrates with)
    and the bootstrap's finite float64 design, the same product and sigmoid without ``predict``'s two rounds of
    input checks, which were half of scoring the 200k units of the sample on each refit; 0 for no rows (a world
    where every unit is rated has no unrated one to score). Any other model goes through ``predict``."""
    if not (isinstance(model, ImputationModel) and model.model == "logistic"):
        return float(model.predict(Z).sum()) if Z.shape[0] else 0.0
    if model.constant_ is not None:
        return float(model.constant_ * Z.shape[0])
    linear = model.model_
    return float(expit(Z @ linear.coef_.T + linear.intercept_).sum())


def calibrated_mean(make_model: Callable[[], object], cal: Calibration, imputed: np.ndarray,
                    structured: np.ndarray, label: np.ndarray, observed: np.ndarray, gold: np.ndarray,
                    *, n_boot: int = 100, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """The mean clean reward with a normal CI whose variance has both parts: the units' own spread,
    var(reward)/n, and the calibration's, from ``n_boot`` refits of both calibrators on audited units resampled
    with replacement (with a few hundred audited units that part dominates: a CI without it would be
    overconfident)."""
    observed = np.asarray(observed) == 1
    gold = np.asarray(gold, dtype=float)
    target = cal.reward_clean
    n = target.size
    audited = np.flatnonzero(np.isfinite(gold))
    Zg, Zu = design(imputed, structured, label), design(imputed, structured)
    Zg_rated, Zu_unrated = Zg[observed], Zu[~observed]     # each calibrator scores only its own stratum
    rng = np.random.default_rng(seed)
    with threadpool_limits(limits=1, user_api="blas"):   # a few hundred rows: BLAS threads only cost (2x here)
        means = _bootstrap_means(make_model, Zg, Zu, Zg_rated, Zu_unrated, gold, observed, audited, n, n_boot, rng)
    if len(means) < max(10, n_boot // 2):
        raise ValueError(f"only {len(means)} of {n_boot} bootstrap refits of the calibration succeeded: the audit "
                         "is too small for an interval")
    estimate = float(target.mean())
    se_boot = float(np.std(means, ddof=1))
    se = float(np.sqrt(se_boot**2 + target.var(ddof=1) / n))
    z = float(stats.norm.ppf(0.5 + level / 2))
    return {"estimate": estimate, "se": se, "se_calibration": se_boot, "ci_low": estimate - z * se,
            "ci_high": estimate + z * se, "n": int(n), "n_audited": int(audited.size),
            "n_audited_observed": int(np.sum(observed[audited])), "n_boot": len(means)}
