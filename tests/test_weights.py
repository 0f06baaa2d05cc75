import numpy as np
import pytest

from estimators import weights as W


def test_formulas_on_hand_computed_values():
    o = np.array([1, 0, 1, 1])
    p = np.array([0.5, 0.2, 0.01, 1.0])
    np.testing.assert_allclose(W.ips(o, p), [2.0, 0.0, 100.0, 1.0])
    clipped = W.clipped(o, p, 0.05)
    np.testing.assert_allclose(clipped, [2.0, 0.0, 20.0, 1.0])
    snips = W.self_normalise(clipped, o)
    np.testing.assert_allclose(snips, np.array([2.0, 0.0, 20.0, 1.0]) / (23 / 3))
    assert snips[o == 1].mean() == pytest.approx(1.0)
    label, imputed = np.array([1.0, np.nan, 0.0, 1.0]), np.array([0.6, 0.3, 0.2, 0.9])
    np.testing.assert_allclose(W.dr_pseudo_outcome(label, o, clipped, imputed),
                               [0.6 + 2 * 0.4, 0.3, 0.2 + 20 * (-0.2), 0.9 + 0.1])


def test_global_normaliser_overrides_the_batch():
    w, o = np.array([1.0, 3.0]), np.array([1, 1])
    np.testing.assert_allclose(W.self_normalise(w, o, total=8.0, n_observed=4), [0.5, 1.5])


@pytest.mark.parametrize("bad", [0.0, -0.1, np.nan, 1.5])
def test_degenerate_propensities_are_refused(bad):
    with pytest.raises(ValueError, match="not in \\(0, 1\\]"):
        W.ips(np.array([1, 1]), np.array([0.5, bad]))


def test_ess_and_concentration():
    assert W.kish_ess(np.ones(10)) == pytest.approx(10)
    assert W.kish_ess(np.r_[np.ones(9), 0.0]) == pytest.approx(9)
    assert W.kish_ess(np.r_[100.0, np.ones(99)]) < 5
    assert W.top_share(np.r_[100.0, np.ones(99)]) == pytest.approx(100 / 199)


def test_ips_and_dr_are_unbiased_under_known_propensities():
    rng = np.random.default_rng(0)
    n = 200_000
    x = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-x))).astype(float)
    p = 1 / (1 + np.exp(-(x - 1)))                               # good answers are rated more often
    o = (rng.random(n) < p).astype(int)
    truth = y.mean()
    naive_bias = abs(y[o == 1].mean() - truth)
    assert naive_bias > 0.05
    assert abs(np.sum(W.ips(o, p) * y) / n - truth) < 0.1 * naive_bias
    wrong_imputation = np.full(n, 0.9)                           # DR survives a bad outcome model
    assert abs(W.dr_pseudo_outcome(y, o, W.ips(o, p), wrong_imputation).mean() - truth) < 0.1 * naive_bias


def _brute_force_clip(o, p, share):
    """The definition, checked candidate by candidate: smallest observed p̂ whose floor keeps the ESS."""
    for lam in np.sort(p[o == 1]):
        if W.kish_ess(W.clipped(o, p, lam) if lam < 1 else o / np.maximum(p, lam)) >= share * (o == 1).sum() - 1e-9:
            return lam
    raise AssertionError("no candidate")


@pytest.mark.parametrize("share", [0.05, 0.3, 0.6, 0.9, 1.0])
def test_auto_clip_is_the_smallest_floor_that_keeps_the_ess(share):
    rng = np.random.default_rng(4)
    p = np.clip(rng.beta(0.6, 3.0, size=400), 1e-4, 1)
    o = (rng.random(400) < p).astype(float)
    lam = W.auto_clip(o, p, share)
    assert lam == pytest.approx(_brute_force_clip(o, p, share))
    w = o / np.maximum(p, lam)
    assert W.kish_ess(w) >= share * o.sum() * (1 - 1e-9)
    below = np.sort(p[o == 1])
    below = below[below < lam]
    if below.size:                                   # the next smaller candidate would not keep the ESS
        assert W.kish_ess(o / np.maximum(p, below[-1])) < share * o.sum()


def test_auto_clip_leaves_balanced_weights_alone_and_reaches_uniform_weights():
    o, p = np.array([1.0, 1, 1, 0]), np.array([0.5, 0.5, 0.5, 0.1])
    assert W.auto_clip(o, p, 1.0) == 0.5                      # already equal weights: nothing to clip
    o, p = np.array([1.0, 1, 1]), np.array([0.01, 0.5, 0.9])
    assert W.auto_clip(o, p, 1.0) == 0.9                      # ESS = all observed needs equal weights
    with pytest.raises(ValueError, match="min_ess_share"):
        W.auto_clip(o, p, 0.0)


def test_degenerate_weights_are_named_not_clipped():
    o = np.array([1.0, 0, 1, 1])
    assert W.degenerate_weights(o, np.array([0.5, 0.2, 0.4, 0.6]), min_ess_share=0.1) is None
    assert "NaN or outside (0, 1]" in W.degenerate_weights(o, np.array([0.5, np.nan, 0.4, 0.6]), min_ess_share=0.1)
    assert "NaN or outside (0, 1]" in W.degenerate_weights(o, np.array([0.5, 0.2, 0.0, 0.6]), min_ess_share=0.1)
    p = np.array([1e-6, 0.2, 0.9, 0.9])                        # one weight dwarfs the rest: ESS ≈ 1 of 3
    assert "below the floor" in W.degenerate_weights(o, p, min_ess_share=0.5)
    assert "nothing to weight" in W.degenerate_weights(np.zeros(4), np.full(4, 0.5), min_ess_share=0.1)
