"""Cross-fitting, written once: every out-of-fold score in obsfeed comes from here (docs/estimators.md)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.utils.parallel import Parallel, delayed
from threadpoolctl import threadpool_limits


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


@dataclass(frozen=True)
class Job:
    """One cross-fit: ``model`` predicting ``y``, its fold models trained on the rows of ``fit_mask`` only (all rows
    when None) while every row is scored by the model of its own fold."""

    model: Any
    y: np.ndarray
    fit_mask: np.ndarray | None = None


@dataclass
class Crossfit:
    """A job's out-of-fold scores, its fold models, and the seconds its fold tasks took (summed over threads)."""

    oof: np.ndarray
    models: list
    seconds: float


def _fold_task(model, X, y: np.ndarray, train: np.ndarray, test: np.ndarray, *,
               one_thread: bool) -> tuple[Any, np.ndarray, float]:
    start = time.perf_counter()
    # On a pool thread, the pool is the parallelism: a boosted model's own OpenMP threads on top of it (one per
    # core in each pool thread) made the nuisance models 3.8x slower on 2 cores.
    with threadpool_limits(limits=1, user_api="openmp") if one_thread else nullcontext():
        fitted = clone(model).fit(_rows(X, train), y[train])
        scores = predict_1d(fitted, _rows(X, test)) if test.any() else np.empty(0)
    return fitted, scores, time.perf_counter() - start


def crossfit_jobs(jobs: Sequence[Job], X, fold: np.ndarray, *, n_jobs: int = 1) -> list[Crossfit]:
    """Cross-fit several models on the same X and folds at once: their fold tasks (fit on the other folds, score
    the fold) share one pool of ``n_jobs`` threads (joblib; -1: one per core), so a slow fold of one model
    overlaps the others' folds. Threads, not processes: the sparse products, the solvers and the boosting release
    the GIL (two folds on 2 cores: 1.76x one thread), and threads share X instead of copying it. Each fold's
    model is the same for any ``n_jobs``: a fold depends only on its rows and the model's own seed."""
    ks = check_folds(fold)
    tasks = []
    for job in jobs:
        fit_mask = np.ones(len(job.y), bool) if job.fit_mask is None else job.fit_mask
        tasks += [(job.model, job.y, (fold != k) & fit_mask, fold == k) for k in ks]
    if n_jobs == 1:
        done = [_fold_task(model, X, y, train, test, one_thread=False) for model, y, train, test in tasks]
    else:
        with threadpool_limits(limits=1, user_api="blas"):        # BLAS's thread count is process-wide
            done = Parallel(n_jobs=n_jobs, prefer="threads")(
                delayed(_fold_task)(model, X, y, train, test, one_thread=True) for model, y, train, test in tasks)
    out = []
    for j, job in enumerate(jobs):
        oof = np.full(len(job.y), np.nan)
        mine = done[j * len(ks):(j + 1) * len(ks)]
        for k, (_, scores, _) in zip(ks, mine, strict=True):
            oof[fold == k] = scores
        out.append(Crossfit(oof, [m for m, _, _ in mine], sum(t for _, _, t in mine)))
    return out


def crossfit(model, X, y: np.ndarray, fold: np.ndarray, *,
             fit_mask: np.ndarray | None = None, n_jobs: int = 1) -> tuple[np.ndarray, list]:
    """Out-of-fold predictions: row i is scored by a clone fitted without fold[i] (one :func:`crossfit_jobs` job).

    ``fit_mask`` restricts which rows a fold model is trained on (e.g. observed units for the imputation
    model) while every row is still scored, by the model of its own fold.
    """
    result = crossfit_jobs([Job(model, y, fit_mask)], X, fold, n_jobs=n_jobs)[0]
    return result.oof, result.models


def predict_by_fold(models: list, X, fold: np.ndarray) -> np.ndarray:
    """Score each row with the model of its fold (the score-stage counterpart of :func:`crossfit`)."""
    out = np.full(fold.shape[0], np.nan)
    for k, m in enumerate(models):
        rows = fold == k
        if rows.any():
            out[rows] = predict_1d(m, _rows(X, rows))
    return out
