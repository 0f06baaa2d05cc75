"""Cross-fitting, written once: every out-of-fold score in obsfeed comes from here (docs/estimators.md)."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.utils.parallel import Parallel, delayed


def _rows(X, mask: np.ndarray):
    return X[mask] if not hasattr(X, "iloc") else X.iloc[np.flatnonzero(mask)]


def predict_1d(model, X) -> np.ndarray:
    """P(y=1|x) for a classifier, the prediction for a regressor."""
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)[:, 1]
    return np.asarray(model.predict(X), dtype=float)


def check_folds(fold: np.ndarray) -> np.ndarray:
    ks = np.unique(fold)
    if len(ks) < 2 or not np.array_equal(ks, np.arange(len(ks))):
        raise ValueError(f"fold ids must be 0..K-1 with K >= 2, got {ks[:10]}")
    return ks


def _fit_fold(model, X, y: np.ndarray):
    return clone(model).fit(X, y)


def crossfit(model, X, y: np.ndarray, fold: np.ndarray, *,
             fit_mask: np.ndarray | None = None, n_jobs: int = 1) -> tuple[np.ndarray, list]:
    """Out-of-fold predictions: row i is scored by a clone fitted without fold[i].

    ``fit_mask`` restricts which rows a fold model is trained on (e.g. observed units for the imputation
    model) while every row is still scored, by the model of its own fold. ``n_jobs`` fits the folds in that
    many processes (joblib): each fold's model is the same as in one process, since a fold depends only on its
    rows and the model's own seed.
    """
    ks = check_folds(fold)
    fit_mask = np.ones(len(y), bool) if fit_mask is None else fit_mask
    trains = [(fold != k) & fit_mask for k in ks]
    if n_jobs == 1:
        models = [_fit_fold(model, _rows(X, t), y[t]) for t in trains]
    else:
        models = Parallel(n_jobs=n_jobs)(delayed(_fit_fold)(model, _rows(X, t), y[t]) for t in trains)
    oof = np.full(len(y), np.nan)
    for k, m in zip(ks, models, strict=True):
        rows = fold == k
        if rows.any():
            oof[rows] = predict_1d(m, _rows(X, rows))
    return oof, models


def predict_by_fold(models: list, X, fold: np.ndarray) -> np.ndarray:
    """Score each row with the model of its fold (the score-stage counterpart of :func:`crossfit`)."""
    out = np.full(fold.shape[0], np.nan)
    for k, m in enumerate(models):
        rows = fold == k
        if rows.any():
            out[rows] = predict_1d(m, _rows(X, rows))
    return out
