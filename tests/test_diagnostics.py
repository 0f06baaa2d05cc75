"""Ranking and regression diagnostics against hand-computed values and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from estimators.diagnostics import ndcg_at_k, regression_metrics


def test_ndcg_by_hand_and_groups_without_relevant_items_left_out():
    group = np.array(["a", "a", "a", "b", "b", "c", "c"])
    pred = np.array([0.9, 0.8, 0.1, 0.5, 0.4, 0.7, 0.2])
    rel = np.array([0, 1, 1, 0, 0, 1, 0])
    a = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))          # 0.6934; b has no relevant item
    assert ndcg_at_k(group, pred, rel, k=5) == pytest.approx((a + 1.0) / 2)
    assert ndcg_at_k(group, pred, rel, k=1) == pytest.approx((0.0 + 1.0) / 2)
    assert ndcg_at_k(group[3:5], pred[3:5], rel[3:5]) is None


def test_ndcg_matches_scikit_learn_per_group():
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(40), 16)
    pred, rel = rng.random(group.size), (rng.random(group.size) < 0.3).astype(int)
    expected = [ndcg_score([rel[group == g]], [pred[group == g]], k=5) for g in range(40) if rel[group == g].any()]
    assert ndcg_at_k(group, pred, rel, k=5) == pytest.approx(np.mean(expected))


def test_regression_metrics():
    m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert m["mse"] == pytest.approx(4 / 3) and m["mae"] == pytest.approx(2 / 3)
    assert m["r2"] == pytest.approx(1 - 4 / (((np.array([1, 2, 5]) - 8 / 3) ** 2).sum()))
