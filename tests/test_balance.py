"""Balance: true inverse-propensity weights remove the observed units' imbalance."""

import numpy as np
import pytest

from estimators.balance import balance_table, smd


def test_true_weights_restore_balance():
    rng = np.random.default_rng(0)
    length = rng.normal(0, 1, 200_000)
    p = 1 / (1 + np.exp(-(-1.0 + 0.8 * length)))             # longer responses are rated more
    o = (rng.random(length.size) < p).astype(float)
    row = balance_table({"length": length}, o, o / p)[0]
    assert row["column"] == "length" and row["smd_before"] > 0.3
    assert abs(row["smd_after"]) < 0.02


def test_smd_hand_computed_and_errors():
    x, o = np.array([0.0, 2.0, 4.0, 6.0]), np.array([0, 0, 1, 1])
    pooled = np.sqrt((1.0 + 5.0) / 2)                          # var over observed (4, 6) = 1; population = 5
    assert smd(x, o) == pytest.approx((5.0 - 3.0) / pooled)
    assert smd(np.ones(4), o) == 0.0
    with pytest.raises(ValueError):
        smd(x, np.zeros(4))
