"""The audit-calibrated clean reward (estimators.calibration) on a world whose label error depends on x."""

import numpy as np
import pytest
from sklearn.dummy import DummyRegressor

from estimators.calibration import (
    apply_calibration,
    calibrated_mean,
    check_audit,
    design,
    fit_calibration,
    predicted_sum,
)
from estimators.imputation import ImputationModel


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _world(n: int, seed: int, audit_share: float = 0.05):
    """Quality q drives r*; users' labels flip with rates that depend on length z (verbosity: long answers get
    thumbs up they do not deserve) and on the rater segment s (harsh raters turn good answers down); selection
    depends on q, z and s. The imputation is the true E[r | x, o=1], so only the calibration is under test."""
    rng = np.random.default_rng(seed)
    q, z, s = rng.normal(size=n), rng.normal(size=n), (rng.random(n) < 0.4).astype(float)
    reward = _sigmoid(1.5 * q)
    clean = (rng.random(n) < reward).astype(float)
    up = 0.05 + 0.35 * (z > 0)                 # P(r=1 | r*=0, x)
    down = 0.05 + 0.35 * s                     # P(r=0 | r*=1, x)
    u = rng.random(n)
    label = np.where(clean == 1, (u >= down).astype(float), (u < up).astype(float))
    p = _sigmoid(-1.0 + 1.2 * q + 0.5 * z + 0.8 * s)
    observed = (rng.random(n) < p).astype(int)
    imputed = reward * (1 - down) + (1 - reward) * up
    gold = np.where(rng.random(n) < audit_share, clean, np.nan)
    structured = np.column_stack([z, z > 0, s])
    fold = rng.integers(0, 5, n)
    return dict(reward=reward, clean=clean, label=np.where(observed == 1, label, np.nan), observed=observed,
                propensity=p, imputed=imputed, gold=gold, structured=structured, fold=fold)


def _make():
    return ImputationModel(model="logistic", C=1.0)


def test_design_columns():
    Z = design(np.array([0.5, 0.9]), np.array([[1.0], [2.0]]))
    np.testing.assert_allclose(Z, [[0.0, 1.0], [np.log(9), 2.0]])
    Zg = design(np.array([0.5, 0.9]), np.array([[1.0], [2.0]]), label=np.array([1.0, np.nan]))
    np.testing.assert_allclose(Zg, [[0.0, 1.0, 1.0, 0.0, 1.0], [np.log(9), 2.0, 0.0, 0.0, 0.0]])


def test_predicted_sum_is_the_sum_of_the_models_predictions():
    """The bootstrap's shortcut past predict's input checks gives predict's sum, to the last bit."""
    w = _world(20_000, seed=4)
    Z = design(w["imputed"], w["structured"], w["label"])
    rows = np.flatnonzero(np.isfinite(w["gold"]))
    fitted = _make().fit(Z[rows], w["gold"][rows])
    for part in (Z, Z[w["observed"] == 1], Z[:1]):
        assert predicted_sum(fitted, part) == fitted.predict(part).sum()
    constant = _make().fit(Z[:10], np.ones(10))
    assert predicted_sum(constant, Z) == constant.predict(Z).sum() == Z.shape[0]
    assert predicted_sum(fitted, Z[:0]) == 0.0                                     # no unit to score
    other = DummyRegressor(strategy="constant", constant=0.25).fit(Z[:10], np.zeros(10))
    assert predicted_sum(other, Z) == other.predict(Z).sum()                      # any other model: predict's sum


def test_calibrated_mean_when_every_unit_is_rated():
    """Click-through logs rate every unit: ĥ is then fitted on every audited unit and scores none, and the
    interval is the given calibrator's alone (it used to fail scoring the empty unrated stratum)."""
    w = _world(20_000, seed=5)
    rng = np.random.default_rng(5)
    observed = np.ones_like(w["observed"])
    label = (rng.random(observed.size) < w["imputed"]).astype(float)
    cal = fit_calibration(_make, w["imputed"], w["structured"], label, observed, w["gold"], w["fold"])
    mean = calibrated_mean(_make, cal, w["imputed"], w["structured"], label, observed, w["gold"], n_boot=30)
    assert mean["n_boot"] == 30 and mean["se_calibration"] > 0 and mean["n_audited_observed"] == mean["n_audited"]
    assert mean["ci_low"] <= w["reward"].mean() <= mean["ci_high"]


def test_calibrated_target_recovers_the_clean_mean():
    w = _world(40_000, seed=3)
    cal = fit_calibration(_make, w["imputed"], w["structured"], w["label"], w["observed"], w["gold"], w["fold"])
    mean = calibrated_mean(_make, cal, w["imputed"], w["structured"], w["label"], w["observed"], w["gold"], n_boot=40)
    truth = w["reward"].mean()
    assert mean["ci_low"] <= truth <= mean["ci_high"]
    assert abs(mean["estimate"] - truth) < 3 * mean["se"]
    assert mean["se_calibration"] > 0 and mean["n_boot"] >= 20
    # per unit, the calibrated reward of a rated unit is closer to E[r* | x] than its label is
    rated = w["observed"] == 1
    assert (np.mean((cal.reward_clean[rated] - w["reward"][rated]) ** 2)
            < np.mean((w["label"][rated] - w["reward"][rated]) ** 2))


def test_saved_fold_models_reproduce_the_out_of_fold_outputs():
    w = _world(6000, seed=1, audit_share=0.2)
    cal = fit_calibration(_make, w["imputed"], w["structured"], w["label"], w["observed"], w["gold"], w["fold"])
    reward, imputed = apply_calibration(cal.models(), w["imputed"], w["structured"], w["label"], w["observed"],
                                        w["fold"])
    np.testing.assert_allclose(reward, cal.reward_clean)
    np.testing.assert_allclose(imputed, cal.imputed_clean)
    assert np.all((reward >= 0) & (reward <= 1))


def test_soft_gold_labels_are_weights_not_errors():
    w = _world(4000, seed=2, audit_share=0.3)
    gold = np.where(np.isfinite(w["gold"]), 0.8 * w["gold"] + 0.1, np.nan)      # graded verdicts in (0, 1)
    cal = fit_calibration(_make, w["imputed"], w["structured"], w["label"], w["observed"], gold, w["fold"])
    assert np.all(np.isfinite(cal.reward_clean))
    unrated = (w["observed"] == 0) & np.isfinite(gold)
    assert abs(cal.imputed_clean[w["observed"] == 0].mean() - gold[unrated].mean()) < 0.03


def test_an_audit_without_both_gold_labels_among_rated_units_is_refused():
    gold = np.array([1.0, 1.0, 0.0, np.nan, 1.0])
    observed = np.array([1, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="observed audited units with each gold label"):
        check_audit(gold, observed, 1)
    check_audit(np.array([1.0, 0.0, 1.0, 0.0]), np.array([1, 1, 0, 0]), 1)
    with pytest.raises(ValueError, match="at least 1 unobserved audited units"):
        check_audit(np.array([1.0, 0.0, 1.0, 1.0]), np.array([1, 1, 0, 0]), 1)
    check_audit(np.array([1.0, 0.0, 1.0, 0.0]), np.array([1, 1, 1, 1]), 2)     # all rated: ĥ on every audit
    with pytest.raises(ValueError, match="at least 3 observed audited units"):
        check_audit(np.array([1.0, 0.0, 1.0, 0.0]), np.array([1, 1, 1, 1]), 3)
