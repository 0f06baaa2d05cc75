"""Propensity of observation p(x) = P(o=1 | x): a calibrated, clipped sklearn classifier (docs/estimators.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from estimators.stacking import LinearThenBoosted
from estimators.weights import invalid_propensities

MODELS = ("logistic", "boosted")


class PropensityModel(ClassifierMixin, BaseEstimator):
    """P(observed=1 | x), calibrated (isotonic or sigmoid) and clipped away from 0 and 1.

    ``model`` is ``logistic`` or ``boosted`` (:class:`estimators.stacking.LinearThenBoosted`: gradient
    boosting over the logistic logit and the ``passthrough`` structured columns, for selection that interacts
    with who rates and what was shown). Calibration matters more than discrimination here: IPS divides by p̂,
    so a p̂ that is too small by a factor of two doubles a unit's weight. Cross-fitting is
    :func:`estimators.crossfit.crossfit`'s job.
    """

    def __init__(self, *, model: str = "logistic", calibration: str = "isotonic", C: float = 1.0,
                 passthrough: Sequence[int] | None = None, clip: float = 1e-3, random_state: int | None = 0):
        self.model = model
        self.passthrough = passthrough
        self.calibration = calibration
        self.C = C
        self.clip = clip
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, accept_sparse="csr")
        check_classification_targets(y)
        if type_of_target(y) != "binary":
            raise ValueError("Only binary classification is supported: y is the observed flag")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        base = (LogisticRegression(C=self.C, max_iter=2000, random_state=self.random_state)
                if self.model == "logistic" else
                LinearThenBoosted(C=self.C, passthrough=self.passthrough, random_state=self.random_state))
        self.model_ = CalibratedClassifierCV(base, method=self.calibration, cv=3).fit(X, y)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse="csr", reset=False)
        p = np.clip(self.model_.predict_proba(X)[:, 1], self.clip, 1 - self.clip)
        return np.column_stack([1 - p, p])

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        tags.input_tags.sparse = True
        return tags


def logged_propensity(values: np.ndarray, column: str) -> np.ndarray:
    """A logged propensity column as probabilities, refusing values that cannot weight a unit (missing, not a
    number, or outside (0, 1]): a logging policy that gave a unit no chance cannot be corrected for."""
    p = np.asarray(values, dtype=float)
    bad = invalid_propensities(p)
    if bad.any():
        raise ValueError(f"propensity column '{column}': {int(bad.sum())} of {p.size} values are missing or "
                         f"outside (0, 1] (e.g. {p[bad][0]!r})")
    return p
