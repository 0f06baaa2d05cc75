"""Propensity of observation p(x) = P(o=1 | x): a calibrated, clipped sklearn classifier (docs/estimators.md)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from estimators.stacking import LinearThenBoosted, logit
from estimators.weights import invalid_propensities

MODELS = ("logistic", "boosted")
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
"""The inverse L2 strengths ``C="cv"`` chooses from (:func:`choose_C`), strongest penalty first."""


def choose_C(X, y: np.ndarray, grid: Sequence[float] = C_GRID, *, folds: int = 2,
             random_state: int | None = 0) -> float:
    """The ``C`` of ``grid`` whose L2 logistic regression of ``y`` on ``X`` has the least ``folds``-fold
    cross-validated log loss.

    The path runs from the strongest penalty up, each fold's fit warm-started from its fit at the previous C,
    and stops at the first C that does worse than the best so far (the loss is unimodal in log C here), so the
    weakly penalised fits that take lbfgs the most iterations run only when they help. On the hashed-text design
    it predicts observation better than C = 1 (60k simulated units: C = 0.1, held-out AUC 0.763 against 0.750),
    but the estimators benchmark found that it weights worse (docs/estimators.md#propensity), so it is an option
    (``fit.propensity_C = "cv"``), not the default.
    """
    y = np.asarray(y)
    splits = [(np.sort(tr), np.sort(te)) for tr, te in
              StratifiedKFold(folds, shuffle=True, random_state=random_state).split(np.zeros(len(y)), y)]
    data = [(X[tr], y[tr], X[te], y[te]) for tr, te in splits]
    models = [LogisticRegression(C=grid[0], max_iter=2000, warm_start=True, random_state=random_state)
              for _ in splits]
    best, best_loss = grid[0], np.inf
    for C in grid:
        loss = sum(log_loss(y_te, m.set_params(C=C).fit(X_tr, y_tr).predict_proba(X_te)[:, 1], labels=[0, 1],
                            normalize=False) for m, (X_tr, y_tr, X_te, y_te) in zip(models, data, strict=True))
        if loss >= best_loss:
            break
        best, best_loss = C, loss
    return float(best)


class PropensityModel(ClassifierMixin, BaseEstimator):
    """P(observed=1 | x), calibrated (isotonic or sigmoid) and clipped away from 0 and 1.

    ``model`` is ``logistic`` or ``boosted`` (:class:`estimators.stacking.LinearThenBoosted`: gradient
    boosting over the logistic logit and the ``passthrough`` structured columns, for selection that interacts
    with who rates and what was shown). Calibration matters more than discrimination here: IPS divides by p̂,
    so a p̂ that is too small by a factor of two doubles a unit's weight. Cross-fitting is
    :func:`estimators.crossfit.crossfit`'s job.

    Calibration is fitted where the classifier did not look, so that no unit's calibrated score comes from a model
    that saw its label. On at most ``holdout_above`` units that is sklearn's ``CalibratedClassifierCV(cv=3)``:
    three classifiers, each calibrated on the third it was not fitted on, averaged. On more, two: one fitted on
    each half, calibrated (isotonic regression of its probability, or Platt's logistic map of its logit) on the
    other half, and averaged; the logistic one on the second half starts from the first half's solution. Half the
    cost of the nested calibration, where its three fits of the whole design were most of the fit stage, and the
    same ranking: in the estimators benchmark a single classifier fitted on two thirds and calibrated on the third
    lost 0.005-0.006 AUC (0.022 below the true propensity's under strong selection), the two halves gained about
    0.002 over the nested calibration. The switch is by size because on small samples the average of three
    is smoother (3,000 units: ECE 0.025–0.038 for one split against 0.020–0.024 for three, over four seeds; and
    fewer units at the propensity floor).

    ``dtype``: the logistic model's design is converted to it for fitting (the boosted model's stays as it is:
    float32 would round large counts that its bins split on). float32 by default: lbfgs on the sparse
    hashed-text design is the fit stage's largest cost, and in float32 its products are about 3x cheaper.
    Predictions take the design as it comes (float64 from the featuriser), so that they do not depend on the rows
    predicted together. The imputation model and the noise proxy stay float64: the anchor flip rates read extreme
    quantiles of the noise proxy's scores, which moved by 0.006 when it was fitted in float32.

    ``C``: the inverse L2 strength, or ``"cv"`` to choose it per fit from :data:`C_GRID` (:func:`choose_C`) on the
    rows the first classifier is fitted on (every row on the nested-calibration path): never the rows that
    calibrate that classifier, though they do calibrate the second one, so one number chosen on them reaches its
    calibration; the one chosen is ``C_``.
    """

    def __init__(self, *, model: str = "logistic", calibration: str = "isotonic", C: float | str = 1.0,
                 passthrough: Sequence[int] | None = None, clip: float = 1e-3, holdout_above: int = 20_000,
                 dtype: type = np.float32, random_state: int | None = 0):
        self.model = model
        self.passthrough = passthrough
        self.calibration = calibration
        self.C = C
        self.clip = clip
        self.holdout_above = holdout_above
        self.dtype = dtype
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, accept_sparse="csr")
        if self.model == "logistic":                       # fitted in float32; predict_proba keeps X's dtype
            X = X.astype(self.dtype, copy=False)
        check_classification_targets(y)
        if type_of_target(y) != "binary":
            raise ValueError("Only binary classification is supported: y is the observed flag")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.calibration not in ("isotonic", "sigmoid"):
            raise ValueError(f"calibration must be 'isotonic' or 'sigmoid', got {self.calibration!r}")
        if not (self.C == "cv" or (isinstance(self.C, numbers.Real) and not isinstance(self.C, bool)
                                   and self.C > 0)):
            raise ValueError(f"C must be a positive number or 'cv', got {self.C!r}")
        for fitted in ("model_", "bases_", "calibrators_"):        # a refit replaces the other path's attributes
            self.__dict__.pop(fitted, None)
        self.classes_, y01 = np.unique(y, return_inverse=True)
        small = X.shape[0] <= self.holdout_above
        halves = [] if small else [
            (np.sort(tr), np.sort(held)) for tr, held in
            StratifiedKFold(n_splits=2, shuffle=True, random_state=self.random_state).split(X, y)]
        if self.C == "cv":      # chosen on the rows the first classifier is fitted on (every row on the small path)
            X_c, y_c = (X[halves[0][0]], y01[halves[0][0]]) if halves else (X, y01)
            self.C_ = choose_C(X_c, y_c, random_state=self.random_state)
        else:
            self.C_ = float(self.C)
        base = (LogisticRegression(C=self.C_, max_iter=2000, random_state=self.random_state)
                if self.model == "logistic" else
                LinearThenBoosted(C=self.C_, passthrough=self.passthrough, random_state=self.random_state))
        if small:
            self.model_ = CalibratedClassifierCV(base, method=self.calibration, cv=3).fit(X, y)
            return self
        self.bases_, self.calibrators_ = [], []
        for train, held in halves:
            model = clone(base)
            if self.bases_ and self.model == "logistic":        # the second half starts from the first's solution
                model.set_params(warm_start=True)
                model.coef_, model.intercept_ = self.bases_[0].coef_.copy(), self.bases_[0].intercept_.copy()
            self.bases_.append(model.fit(X[train], y01[train]))   # rows in order: sparse products read memory in turn
            score = self._score(model, X[held])
            self.calibrators_.append(
                IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(score, y01[held])
                if self.calibration == "isotonic" else      # Platt: a logistic map of the logit
                LogisticRegression(C=np.inf).fit(score[:, None], y01[held]))
        return self

    def _score(self, model, X) -> np.ndarray:
        """A classifier's score its calibrator maps: its probability (isotonic) or logit (sigmoid)."""
        p = model.predict_proba(X)[:, 1]
        return p if self.calibration == "isotonic" else logit(p)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse="csr", reset=False)
        if hasattr(self, "model_"):          # the nested 3-fold calibration
            p = self.model_.predict_proba(X)[:, 1]
        else:
            p = np.mean([c.predict(self._score(m, X)) if self.calibration == "isotonic" else
                         c.predict_proba(self._score(m, X)[:, None])[:, 1]
                         for m, c in zip(self.bases_, self.calibrators_, strict=True)], axis=0)
        p = np.clip(np.asarray(p, dtype=np.float64), self.clip, 1 - self.clip)   # float64, as from a float64 design
        return np.column_stack([1 - p, p])

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

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
