"""Imputation model ε̂(x) ≈ E[label | x, o=1] for doubly robust estimates (DESIGN §5)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted, validate_data


class ImputationModel(RegressorMixin, BaseEstimator):
    """Logistic regression on soft labels in [0, 1], predicting E[label | x].

    A label of 0.7 (e.g. an edit-derived label) is fitted as a 0.7-weighted positive plus a 0.3-weighted
    negative copy of the row: the cross-entropy with a soft target, so binary and graded labels share a model.
    """

    def __init__(self, *, C: float = 1.0, random_state: int | None = 0):
        self.C = C
        self.random_state = random_state

    def fit(self, X, y):
        X, y = validate_data(self, X, y, accept_sparse="csr", y_numeric=True)
        y = np.asarray(y, dtype=float)
        if np.any((y < 0) | (y > 1)):
            raise ValueError("labels must lie in [0, 1]")
        stacked = sp.vstack([X, X]).tocsr() if sp.issparse(X) else np.vstack([X, X])
        targets = np.r_[np.ones(len(y)), np.zeros(len(y))]
        weights = np.r_[y, 1 - y]
        keep = weights > 0
        self.constant_ = None
        if np.unique(targets[keep]).size < 2:  # all labels equal: nothing to learn but the constant
            self.constant_ = float(y.mean())
            return self
        self.model_ = LogisticRegression(C=self.C, max_iter=2000, random_state=self.random_state)
        self.model_.fit(stacked[keep], targets[keep], sample_weight=weights[keep])
        return self

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
