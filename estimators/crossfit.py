"""Cross-fitting, written once: every out-of-fold score in obsfeed comes from here (docs/estimators.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
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


@dataclass(frozen=True)
class Plan:
    """A cross-fit as independent tasks (run on the shared pool) and the step that turns their results, in task
    order, into (out-of-fold scores, fold models). The default plan fits one clone per fold; a model that can
    share work between folds offers its own through a ``crossfit_plan(X, y, fold, fit_mask=...)`` method
    (``estimators.propensity.PropensityModel``: one classifier serves two folds), returning None where it cannot."""

    tasks: list[Callable[[], Any]]
    assemble: Callable[[list[Any]], tuple[np.ndarray, list]]


@dataclass
class Crossfit:
    """A job's out-of-fold scores, its fold models, and the seconds its tasks took (summed over threads)."""

    oof: np.ndarray
    models: list
    seconds: float


def _fit_and_score(model, X, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[Any, np.ndarray]:
    fitted = clone(model).fit(_rows(X, train), y[train])
    return fitted, predict_1d(fitted, _rows(X, test)) if test.any() else np.empty(0)


def fold_plan(job: Job, X, fold: np.ndarray) -> Plan:
    """One task per fold k: a clone of the model fitted on the other folds' rows (within ``fit_mask``), scoring
    fold k."""
    ks = check_folds(fold)
    fit_mask = np.ones(len(job.y), bool) if job.fit_mask is None else job.fit_mask
    tasks = [partial(_fit_and_score, job.model, X, job.y, (fold != k) & fit_mask, fold == k) for k in ks]

    def assemble(done: list[tuple[Any, np.ndarray]]) -> tuple[np.ndarray, list]:
        oof = np.full(len(job.y), np.nan)
        for k, (_, scores) in zip(ks, done, strict=True):
            oof[fold == k] = scores
        return oof, [m for m, _ in done]
    return Plan(tasks, assemble)


def plan_of(job: Job, X, fold: np.ndarray) -> Plan:
    """The model's own plan where it offers one, else :func:`fold_plan`."""
    own = getattr(job.model, "crossfit_plan", None)
    plan = own(X, job.y, fold, fit_mask=job.fit_mask) if own is not None else None
    return plan if plan is not None else fold_plan(job, X, fold)


def _timed(task: Callable[[], Any], *, one_thread: bool) -> tuple[Any, float]:
    start = time.perf_counter()
    # On a pool thread, the pool is the parallelism: a boosted model's own OpenMP threads on top of it (one per
    # core in each pool thread) made the nuisance models 3.8x slower on 2 cores.
    with threadpool_limits(limits=1, user_api="openmp") if one_thread else nullcontext():
        result = task()
    return result, time.perf_counter() - start


def crossfit_jobs(jobs: Sequence[Job], X, fold: np.ndarray, *, n_jobs: int = 1) -> list[Crossfit]:
    """Cross-fit several models on the same X and folds at once: their tasks (:class:`Plan`; by default, fit on
    the other folds and score the fold) share one pool of ``n_jobs`` threads (joblib; -1: one per core), so a
    slow fold of one model overlaps the others' folds. Threads, not processes: the sparse products, the solvers
    and the boosting release the GIL (two folds on 2 cores: 1.76x one thread), and threads share X instead of
    copying it. Each fold's model is the same for any ``n_jobs``: a task depends only on its rows and the
    model's own seed."""
    check_folds(fold)
    plans = [plan_of(job, X, fold) for job in jobs]
    tasks = [task for plan in plans for task in plan.tasks]
    if n_jobs == 1:
        done = [_timed(task, one_thread=False) for task in tasks]
    else:
        with threadpool_limits(limits=1, user_api="blas"):        # BLAS's thread count is process-wide
            done = Parallel(n_jobs=n_jobs, prefer="threads")(
                delayed(_timed)(task, one_thread=True) for task in tasks)
    out, start = [], 0
    for plan in plans:
        mine = done[start:start + len(plan.tasks)]
        start += len(plan.tasks)
        begun = time.perf_counter()
        oof, models = plan.assemble([result for result, _ in mine])
        out.append(Crossfit(oof, models, sum(t for _, t in mine) + time.perf_counter() - begun))
    return out


def crossfit(model, X, y: np.ndarray, fold: np.ndarray, *,
             fit_mask: np.ndarray | None = None, n_jobs: int = 1) -> tuple[np.ndarray, list]:
    """Out-of-fold predictions: row i is scored by a model fitted without fold[i] (one :func:`crossfit_jobs` job).

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
