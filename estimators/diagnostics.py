"""Diagnostics of fitted models: calibration error, discrimination, overlap, and a reward model's error against a
known truth. Numpy in, numpy out."""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score


def expected_calibration_error(p: np.ndarray, y: np.ndarray, *, bins: int = 15) -> float:
    """ECE with equal-mass bins: Σ_b (n_b/n) |mean(y_b) − mean(p_b)|.

    Equal-mass bins keep every bin populated when most propensities are small, unlike equal-width bins.
    """
    p, y = np.asarray(p, float), np.asarray(y, float)
    order = np.argsort(p, kind="stable")
    err = 0.0
    for idx in np.array_split(order, bins):
        if idx.size:
            err += idx.size * abs(y[idx].mean() - p[idx].mean())
    return float(err / p.size)


def auc(p: np.ndarray, y: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present."""
    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if np.unique(y).size == 2 else None


def reliability(p: np.ndarray, y: np.ndarray, *, bins: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Mean prediction and observed rate per equal-mass bin (for calibration plots)."""
    order = np.argsort(p, kind="stable")
    parts = [idx for idx in np.array_split(order, bins) if idx.size]
    return np.array([p[i].mean() for i in parts]), np.array([y[i].mean() for i in parts])


def summary(values: np.ndarray) -> dict[str, float]:
    """Min, quartiles, max and mean of an array, as plain floats for the manifest."""
    q = np.quantile(values, [0, 0.01, 0.25, 0.5, 0.75, 0.99, 1])
    return {"min": float(q[0]), "p01": float(q[1]), "p25": float(q[2]), "median": float(q[3]),
            "p75": float(q[4]), "p99": float(q[5]), "max": float(q[6]), "mean": float(np.mean(values))}


def regression_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MSE, MAE and R² of predictions against the true values (docs/evaluation.md#metrics)."""
    err = pred - truth
    return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err))),
            "r2": float(1 - np.sum(err**2) / np.sum((truth - truth.mean()) ** 2))}


def pairwise_accuracy(group: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Share of within-group pairs with different truth that ``pred`` orders the same way (ties count ½)."""
    df = pl.DataFrame({"g": group, "p": pred, "t": truth})
    pairs = df.join(df, on="g", suffix="_b").filter(pl.col("t") > pl.col("t_b"))
    if pairs.height == 0:
        return None
    right = (pairs["p"] > pairs["p_b"]).cast(pl.Float64) + 0.5 * (pairs["p"] == pairs["p_b"]).cast(pl.Float64)
    return float(right.mean())


def ndcg_at_k(group: np.ndarray, pred: np.ndarray, relevance: np.ndarray, *, k: int = 5) -> float | None:
    """Mean over groups (e.g. users) of NDCG@k of ``pred``'s order against binary or graded ``relevance``;
    groups with no relevant item are left out (their NDCG is undefined), as in the Coat protocol. None if none
    is left. Ties in ``pred`` keep the input order."""
    df = pl.DataFrame({"g": group, "p": pred, "r": relevance.astype(float)}).with_row_index("i")
    ranked = df.sort(["g", "p", "i"], descending=[False, True, False]).with_columns(
        rank=pl.int_range(pl.len()).over("g") + 1)
    ideal = df.sort(["g", "r"], descending=[False, True]).with_columns(rank=pl.int_range(pl.len()).over("g") + 1)

    def dcg(frame: pl.DataFrame) -> pl.DataFrame:
        return (frame.filter(pl.col("rank") <= k)
                .group_by("g").agg(dcg=(pl.col("r") / (pl.col("rank") + 1).log(2)).sum()))

    scores = dcg(ranked).join(dcg(ideal).rename({"dcg": "ideal"}), on="g").filter(pl.col("ideal") > 0)
    return float((scores["dcg"] / scores["ideal"]).mean()) if scores.height else None
