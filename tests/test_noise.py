"""Flip rates and noise-corrected targets (docs/estimators.md): formulas, unbiasedness, anchors, audit and PPI."""

import numpy as np
import pytest

from estimators.noise import (
    FlipRates,
    anchor_flip_rates,
    audit_flip_rates,
    check_flip_rates,
    corrected_target,
    noise_model,
    ppi_mean,
)
from schemas.config import FitConfig
from schemas.errors import ConfigError


def _flip(rng, clean, rho01, rho10):
    u = rng.random(clean.size)
    return np.where(clean == 1, (u >= rho01).astype(float), (u < rho10).astype(float))


def test_corrected_target_formula_and_identity_without_noise():
    r = np.array([0.0, 1.0, 0.5])
    np.testing.assert_allclose(corrected_target(r, 0.2, 0.1), (r - 0.1) / 0.7)
    np.testing.assert_allclose(corrected_target(r, 0.0, 0.0), r)


@pytest.mark.parametrize("rho01, rho10", [(0.2, 0.1), (0.1, 0.2), (0.3, 0.0)])
def test_corrected_target_is_unbiased_under_simulated_flips(rho01, rho10):
    rng = np.random.default_rng(0)
    q = rng.beta(2, 2, size=400_000)                   # P(r*=1 | x)
    noisy = _flip(rng, (rng.random(q.size) < q).astype(float), rho01, rho10)
    assert abs(noisy.mean() - q.mean()) > 0.02         # the noise does bias the plain mean
    assert corrected_target(noisy, rho01, rho10).mean() == pytest.approx(q.mean(), abs=0.005)


@pytest.mark.parametrize("rho01, rho10", [(0.5, 0.5), (0.7, 0.4), (1.0, 0.0), (-0.1, 0.2)])
def test_uncorrectable_rates_are_refused(rho01, rho10):
    with pytest.raises(ValueError):
        check_flip_rates(rho01, rho10)
    with pytest.raises(ValueError):
        corrected_target(np.ones(2), rho01, rho10)


@pytest.mark.parametrize("rho01, rho10", [(0.2, 0.1), (0.1, 0.2)])
def test_anchor_quantiles_recover_the_rates_from_a_proxy_with_anchors(rho01, rho10):
    rng = np.random.default_rng(1)
    q = np.concatenate([rng.uniform(0, 1, 5000), np.zeros(200), np.ones(200)])   # some x are sure
    proxy = rho10 + (1 - rho01 - rho10) * q + rng.normal(0, 0.01, q.size)       # a good proxy's scores
    est = anchor_flip_rates(proxy, quantile=0.01)
    assert (est.rho01, est.rho10) == pytest.approx((rho01, rho10), abs=0.02)
    assert est.method == "anchor_quantile_0.01" and est.n == q.size


def test_audit_counts_and_standard_errors():
    gold = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    label = np.array([1, 0, 1, 1, 0, 1, 0, 0, 0])
    est = audit_flip_rates(label, gold)
    assert (est.rho01, est.rho10) == (0.25, 0.2)
    assert est.se01 == pytest.approx(np.sqrt(3 / 8 * 5 / 8 / 8))        # Agresti-Coull: (1 + 2) / (4 + 4)
    assert est.se10 == pytest.approx(np.sqrt(1 / 3 * 2 / 3 / 9))        # (1 + 2) / (5 + 4)
    clean = audit_flip_rates(np.r_[np.ones(30), np.zeros(30)], np.r_[np.ones(30), np.zeros(30)])
    assert clean.rho01 == clean.rho10 == 0 and clean.se01 > 0.03      # > max_audit_se: 0 flips seen is not 0
    with pytest.raises(ValueError, match="each gold label"):
        audit_flip_rates(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="at least 5"):
        audit_flip_rates(label, gold, min_per_class=5)
    soft = audit_flip_rates(np.array([0.5, 1.0, 0.25, 0.0]), np.array([1, 1, 0, 0]))   # graded labels count
    assert (soft.rho01, soft.rho10) == (0.25, 0.125)
    with pytest.raises(ValueError, match="no usable signal"):
        FlipRates(0.6, 0.5, "x", 1)


def test_ppi_mean_hand_computed_and_covers_the_truth():
    out = ppi_mean(np.array([1.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.5]), np.array([0.4, 0.6, 0.5, 0.5]),
                   power_tuning=False)
    assert out["estimate"] == pytest.approx(0.5 + (0.5 - 0.5 + 0.5) / 3) and out["lambda"] == 1.0
    tuned = ppi_mean(np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.8, 0.2, 0.6, 0.4]), np.array([0.3, 0.5, 0.9]))
    lam = np.cov([1, 0, 1, 0], [0.8, 0.2, 0.6, 0.4])[0, 1] / ((1 + 4 / 3) * np.var([0.8, 0.2, 0.6, 0.4], ddof=1))
    lam = min(lam, 1.0)
    assert tuned["lambda"] == pytest.approx(lam)
    assert tuned["estimate"] == pytest.approx(lam * np.mean([0.3, 0.5, 0.9]) + np.mean(
        np.array([1.0, 0, 1, 0]) - lam * np.array([0.8, 0.2, 0.6, 0.4])))
    useless = ppi_mean(np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.2, 0.8, 0.2, 0.8]), np.array([0.5, 0.5]))
    assert useless["lambda"] == 0.0 and useless["estimate"] == 0.5       # anti-correlated: the audit alone
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(300):                               # a biased predictor; the rectifier removes the bias
        x = rng.random(3000)
        gold_all = (rng.random(x.size) < x).astype(float)
        pred = np.clip(x + 0.1, 0, 1)
        idx = rng.choice(x.size, 200, replace=False)
        res = ppi_mean(gold_all[idx], pred[idx], pred)
        covered += res["ci_low"] <= 0.5 <= res["ci_high"]
    assert 0.91 <= covered / 300 <= 0.99


def _audited_world(n: int, n_gold: int, seed: int = 0):
    """Units with P(r*=1|x) = q, noisy labels with flips (0.2, 0.1), all observed, gold on a random subset."""
    rng = np.random.default_rng(seed)
    q = np.concatenate([rng.uniform(0, 1, n - 200), np.zeros(100), np.ones(100)])
    star = (rng.random(n) < q).astype(float)
    flip = rng.random(n)
    label = np.where(star == 1, flip >= 0.2, flip < 0.1).astype(float)
    gold = np.full(n, np.nan)
    idx = rng.choice(n, n_gold, replace=False)
    gold[idx] = star[idx]
    return 0.1 + 0.7 * q, label, gold, star


@pytest.mark.parametrize("method, n_gold, expected", [("auto", 1500, "calibrate"), ("auto", 40, "anchor_quantile_0.01"),
                                                     ("auto", 120, "calibrate"),   # 30+ audited units per gold label
                                                     ("audit", 120, "audit"), ("audit", 1500, "audit"),
                                                     ("anchor", 1500, "anchor_quantile_0.01"), ("none", 1500, "none")])
def test_fit_calibrates_on_an_audit_large_enough_else_anchors(method, n_gold, expected):
    scores, label, gold, star = _audited_world(6000, n_gold)
    fc = FitConfig(noise=method, min_audit=30)
    flips, diag = noise_model(scores, label, gold, np.ones(label.size, bool), fc)
    assert flips.method == expected
    if n_gold == 120:
        assert diag["estimates"]["audit"]["se10"] > 0.03              # measured, reported, but not used by auto
    if expected == "audit" and n_gold > 1000:
        assert (flips.rho01, flips.rho10) == pytest.approx((0.2, 0.1), abs=3 * max(flips.se01, flips.se10))
        assert diag["estimates"]["anchor"]["method"] == "anchor_quantile_0.01"   # both reported
    ppi, alone = diag["mean_reward"]["ppi"], diag["mean_reward"]["gold_only"]
    assert alone["estimate"] == pytest.approx(np.nanmean(gold))
    assert ppi["n_gold"] == n_gold and ppi["n_all"] == label.size - n_gold
    if method != "none":
        assert ppi["ci_low"] <= star.mean() <= ppi["ci_high"]
        assert ppi["se"] < alone["se"]                 # the predictions carry information the audit lacks


def test_auto_calibrates_when_anchors_fail_and_corrects_nothing_without_either():
    scores, label, gold, _ = _audited_world(6000, 2000)
    flat = np.full(scores.size, 0.55)                  # no anchors: rho01 + rho10 = 0.45 + 0.55 = 1
    flips, diag = noise_model(flat, label, gold, np.ones(label.size, bool), FitConfig(noise="auto"))
    assert flips.method == "calibrate" and "anchor" in diag["errors"]
    flips, diag = noise_model(flat, label, np.full(label.size, np.nan), np.ones(label.size, bool),
                              FitConfig(noise="auto"))
    assert (flips.method, flips.rho01, flips.rho10, flips.identified) == ("none", 0.0, 0.0, False)
    assert "anchor rates" in flips.why and "no audit" in flips.why and "anchor" in diag["errors"]


def test_an_audit_that_is_asked_for_but_too_small_fails_the_stage():
    scores, label, gold, _ = _audited_world(3000, 20)
    with pytest.raises(ConfigError, match="at least 30"):          # fit.noise names a method these units cannot feed
        noise_model(scores, label, gold, np.ones(label.size, bool), FitConfig(noise="audit", min_audit=30))


def test_posterior_clean_reward_is_bayes_under_class_conditional_flips():
    """P(r* = 1 | r, x) from π = P(r* = 1 | x): the doctest's hand values, and its mean over the labels a unit
    could get is π again (the posterior of a calibrated prior averages to the prior)."""
    import doctest

    from estimators import noise
    from estimators.noise import posterior_clean

    assert doctest.testmod(noise).failed == 0
    pi = np.linspace(0.01, 0.99, 25)
    rho01, rho10 = 0.2, 0.1
    p_up = pi * (1 - rho01) + (1 - pi) * rho10                      # P(r = 1 | x)
    mean = p_up * posterior_clean(np.ones_like(pi), pi, rho01, rho10) + \
        (1 - p_up) * posterior_clean(np.zeros_like(pi), pi, rho01, rho10)
    np.testing.assert_allclose(mean, pi)
    soft = posterior_clean(np.full_like(pi, 0.3), pi, rho01, rho10)
    np.testing.assert_allclose(soft, 0.3 * posterior_clean(np.ones_like(pi), pi, rho01, rho10)
                               + 0.7 * posterior_clean(np.zeros_like(pi), pi, rho01, rho10))
    assert posterior_clean(np.array([1.0]), np.array([0.0]), 0.0, 0.0)[0] == 0.0          # 0/0 keeps π
