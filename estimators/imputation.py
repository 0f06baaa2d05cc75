"""Imputation model ε̂(x) ≈ E[label | x, o=1] for doubly robust estimates and the flip-rate anchors.

``logistic`` is one L2 logistic regression over the design matrix; ``boosted`` (fit's default) boosts its
honest logit together with the structured columns (:class:`estimators.stacking.LinearThenBoosted`), which
learns the interactions and the plateaus of P(label = 1 | x) at the flip rates that the anchors read off.
Formulas: docs/estimators.md#imputation-and-doubly-robust.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted, validate_data

from estimators.stacking import LinearThenBoosted

MODELS = ("logistic", "boosted")


def fit_soft(model, X, y: np.ndarray):
    """Fit a binary classifier on soft labels in [0, 1]: each row becomes a y-weighted positive and a
    (1 − y)-weighted negative copy (the cross-entropy with a soft target); zero-weight copies are dropped, so
    binary labels cost nothing extra."""
    targets = np.r_[np.ones(len(y)), np.zeros(len(y))]
    weights = np.r_[y, 1 - y]
    keep = weights > 0
    unit = np.r_[np.arange(len(y)), np.arange(len(y))][keep]      # the row of X behind each kept copy
    soft = bool(np.any((y > 0) & (y < 1)))             # then some units have two copies: keep them together
    extra = {"groups": unit} if soft and isinstance(model, LinearThenBoosted) else {}
    return model.fit(X[unit], targets[keep], sample_weight=weights[keep], **extra)   # one copy of the rows


class ImputationModel(RegressorMixin, BaseEstimator):
    """P(label = 1 | x) from soft labels in [0, 1] (a label of 0.7, e.g. edit-derived, is a 0.7-weighted
    positive), so binary and graded labels share a model. ``passthrough``: the columns of X (numeric and
    categorical blocks) that the ``boosted`` model's boosted stage sees beside the linear logit."""

    def __init__(self, *, model: str = "logistic", C: float = 1.0, passthrough: Sequence[int] | None = None,
                 random_state: int | None = 0):
        self.model = model
        self.C = C
        self.passthrough = passthrough
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, accept_sparse="csr", y_numeric=True)
        y = np.asarray(y, dtype=float)
        if np.any((y < 0) | (y > 1)):
            raise ValueError("labels must lie in [0, 1]")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        self.constant_ = None
        if np.all(y == 1) or np.all(y == 0):   # one class only: nothing to learn but the constant
            self.constant_ = float(y[0])
            return self
        model = (LogisticRegression(C=self.C, max_iter=2000, random_state=self.random_state)
                 if self.model == "logistic" else
                 LinearThenBoosted(C=self.C, passthrough=self.passthrough, random_state=self.random_state))
        self.model_ = fit_soft(model, X, y)
        return self

    def linear_part(self) -> ImputationModel:
        """A fitted ``boosted`` model's linear stage as the fitted ``logistic`` model of the same data: the same
        logistic regression (same C, seed, soft-label copies and weights) that ``logistic`` would fit, so the
        fit stage gets both models from one fit when it needs both (imputation and noise proxy). It was solved
        from the inner regressions' mean, so it matches ``logistic``'s fit to lbfgs's tolerance, not bit for bit."""
        check_is_fitted(self, "constant_")
        if self.model != "boosted":
            raise ValueError(f"linear_part needs a fitted boosted model, this one is {self.model!r}")
        out = ImputationModel(model="logistic", C=self.C, random_state=self.random_state)
        out.n_features_in_, out.constant_ = self.n_features_in_, self.constant_
        if hasattr(self, "feature_names_in_"):
            out.feature_names_in_ = self.feature_names_in_
        if self.constant_ is None:
            out.model_ = self.model_.linear_
        return out

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "constant_")
        X = validate_data(self, X, accept_sparse="csr", reset=False)
        if self.constant_ is not None:
            return np.full(X.shape[0], self.constant_)
        return self.model_.predict_proba(X)[:, 1]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
