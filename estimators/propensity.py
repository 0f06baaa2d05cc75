"""Propensity of observation p(x) = P(o=1 | x): a calibrated, clipped sklearn classifier (docs/estimators.md)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data

from estimators.crossfit import Plan
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

    def _check_params(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.calibration not in ("isotonic", "sigmoid"):
            raise ValueError(f"calibration must be 'isotonic' or 'sigmoid', got {self.calibration!r}")
        if not (self.C == "cv" or (isinstance(self.C, numbers.Real) and not isinstance(self.C, bool)
                                   and self.C > 0)):
            raise ValueError(f"C must be a positive number or 'cv', got {self.C!r}")

    def _base(self, C: float):
        """The unfitted classifier at inverse L2 strength ``C``."""
        return (LogisticRegression(C=C, max_iter=2000, random_state=self.random_state) if self.model == "logistic"
                else LinearThenBoosted(C=C, passthrough=self.passthrough, random_state=self.random_state))

    def _calibrator(self, score: np.ndarray, y01: np.ndarray):
        """The map from a classifier's scores on rows it did not see to probabilities: isotonic regression of its
        probability, or Platt's logistic map of its logit."""
        if self.calibration == "isotonic":
            return IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(score, y01)
        return LogisticRegression(C=np.inf).fit(score[:, None], y01)

    def fit(self, X, y):
        X, y = validate_data(self, X, y, accept_sparse="csr")
        if self.model == "logistic":                       # fitted in float32; predict_proba keeps X's dtype
            X = X.astype(self.dtype, copy=False)
        check_classification_targets(y)
        if type_of_target(y) != "binary":
            raise ValueError("Only binary classification is supported: y is the observed flag")
        self._check_params()
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
        base = self._base(self.C_)
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
            self.calibrators_.append(self._calibrator(self._score(model, X[held]), y01[held]))
        return self

    def crossfit_plan(self, X, y, fold: np.ndarray, *, fit_mask: np.ndarray | None = None) -> Plan | None:
        """The cross-fit of this model with each classifier shared by two folds (``estimators.crossfit``'s hook).

        Fold k's model is what :meth:`fit` on the other folds' rows builds above ``holdout_above`` rows, two
        classifiers each calibrated on the half the other was fitted on, except that the halves are sets of
        whole folds (:func:`fold_halves`) instead of a stratified split of the rows. With K odd each such set is
        one fold's first half and another fold's second half, so K classifiers serve the K folds instead of 2K
        (for 5 folds: one classifier on each pair of neighbouring folds, 0+1, 1+2, ..., 4+0). Every unit is still
        scored by classifiers and calibrators that never saw it. None (``fit`` per fold) with an even number of
        folds, with a ``fit_mask``, or where a fold's training rows are at most ``holdout_above`` (the nested path).
        Under ``C="cv"`` each classifier chooses its own C on its rows; a fold model's ``C_`` is its first's."""
        ks = np.unique(fold)
        if (len(ks) < 3 or len(ks) % 2 == 0 or (fit_mask is not None and not np.all(fit_mask))
                or min(int(np.sum(fold != k)) for k in ks) <= self.holdout_above):
            return None
        self._check_params()
        X = check_array(X, accept_sparse="csr")
        y = column_or_1d(y)
        check_classification_targets(y)
        if type_of_target(y) != "binary":
            raise ValueError("Only binary classification is supported: y is the observed flag")
        classes, y01 = np.unique(y, return_inverse=True)
        halves = fold_halves(len(ks))
        arcs = sorted({arc for pair in halves.values() for arc in pair})
        rows = {arc: np.isin(fold, arc) for arc in arcs}

        def assemble(done: list[tuple[Any, np.ndarray]]) -> tuple[np.ndarray, list]:
            fitted = dict(zip(arcs, done, strict=True))     # arc -> (classifier, its scores on the other rows)
            oof, models = np.full(len(y01), np.nan), []
            for k in ks:
                first, second = halves[int(k)]
                model = clone(self)
                model.classes_, model.n_features_in_ = classes, X.shape[1]
                model.bases_ = [fitted[first][0], fitted[second][0]]
                model.calibrators_ = [self._calibrator(fitted[a][1][rows[b]], y01[rows[b]])
                                      for a, b in ((first, second), (second, first))]
                model.C_ = float(model.bases_[0].C)
                test = fold == k
                oof[test] = model._calibrated([fitted[first][1][test], fitted[second][1][test]])
                models.append(model)
            return oof, models
        return Plan([partial(self._fit_on, X, y01, rows[arc]) for arc in arcs], assemble)

    def _fit_on(self, X, y01: np.ndarray, rows: np.ndarray) -> tuple[Any, np.ndarray]:
        """A classifier fitted on ``rows`` (C chosen on them under ``C="cv"``) and its scores on every other row
        (NaN on its own)."""
        fit_X = X[rows].astype(self.dtype, copy=False) if self.model == "logistic" else X[rows]
        C = choose_C(fit_X, y01[rows], random_state=self.random_state) if self.C == "cv" else float(self.C)
        model = self._base(C).fit(fit_X, y01[rows])
        # Scored from the design as it comes, as predict_proba. A logistic model scores every row of a CSR design
        # (a row's product does not depend on the others there): one product over all rows is cheaper than
        # copying the other rows out.
        if self.model == "logistic" and sp.issparse(X):
            scores = self._score(model, X)
            scores[rows] = np.nan
        else:
            scores = np.full(len(y01), np.nan)
            scores[~rows] = self._score(model, X[~rows])
        return model, scores

    def _score(self, model, X) -> np.ndarray:
        """A classifier's score its calibrator maps: its probability (isotonic) or logit (sigmoid)."""
        p = model.predict_proba(X)[:, 1]
        return p if self.calibration == "isotonic" else logit(p)

    def _calibrated(self, scores: list[np.ndarray]) -> np.ndarray:
        """The mean of the calibrated classifiers' probabilities from their ``scores``, clipped."""
        p = np.mean([c.predict(s) if self.calibration == "isotonic" else c.predict_proba(s[:, None])[:, 1]
                     for c, s in zip(self.calibrators_, scores, strict=True)], axis=0)
        return np.clip(np.asarray(p, dtype=np.float64), self.clip, 1 - self.clip)   # float64, as from float64 X

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse="csr", reset=False)
        if hasattr(self, "model_"):          # the nested 3-fold calibration
            p = np.clip(np.asarray(self.model_.predict_proba(X)[:, 1], dtype=np.float64), self.clip, 1 - self.clip)
        else:
            p = self._calibrated([self._score(m, X) for m in self.bases_])
        return np.column_stack([1 - p, p])

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        tags.input_tags.sparse = True
        return tags


def fold_halves(n_folds: int) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """For each fold k of an odd ``n_folds`` K >= 3, two halves of the other folds: the two arcs of (K-1)/2
    folds that follow k on the cycle 0, 1, ..., K-1. Each arc is the first half of one fold and the second half
    of another, so there are only K distinct halves. (With K even the other K-1 folds do not halve.)

    >>> fold_halves(5)[0], fold_halves(5)[3]
    (((1, 2), (3, 4)), ((4, 0), (1, 2)))
    """
    if n_folds < 3 or n_folds % 2 == 0:
        raise ValueError(f"the other folds halve only for an odd number of folds >= 3, got {n_folds}")
    h = (n_folds - 1) // 2
    arc = lambda start: tuple((start + i) % n_folds for i in range(h))  # noqa: E731
    return {k: (arc(k + 1), arc(k + 1 + h)) for k in range(n_folds)}


def logged_propensity(values: np.ndarray, column: str) -> np.ndarray:
    """A logged propensity column as probabilities, refusing values that cannot weight a unit (missing, not a
    number, or outside (0, 1]): a logging policy that gave a unit no chance cannot be corrected for."""
    p = np.asarray(values, dtype=float)
    bad = invalid_propensities(p)
    if bad.any():
        raise ValueError(f"propensity column '{column}': {int(bad.sum())} of {p.size} values are missing or "
                         f"outside (0, 1] (e.g. {p[bad][0]!r})")
    return p
