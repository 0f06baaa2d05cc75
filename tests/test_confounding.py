"""DML confounder effects: the CI covers a known effect, and covers 0 when there is none."""

import numpy as np
import pytest

from estimators.confounding import ConfounderEffect, confounder_controls, deconfound


def _world(effect: float, n: int = 6000, seed: int = 0):
    """T depends on the controls, and so does Y: a naive regression of Y on T is confounded."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, 5))
    T = W[:, 0] + 0.5 * W[:, 1] + rng.normal(size=n)
    Y = effect * T + 0.8 * W[:, 0] - 0.4 * W[:, 2] + rng.normal(size=n)
    return Y, T, W


@pytest.mark.parametrize("effect", [0.3, 0.0])
def test_linear_dml_ci_covers_the_effect_where_naive_regression_is_biased(effect):
    Y, T, W = _world(effect)
    naive = np.polyfit(T, Y, 1)[0]
    assert abs(naive - effect) > 0.2                        # confounded by W[:, 0]
    est = ConfounderEffect(random_state=0).fit(Y, T, W)
    assert est.ci_low_ <= effect <= est.ci_high_
    assert est.ci_high_ - est.ci_low_ < 0.15
    assert est.to_dict()["n"] == Y.size


def test_causal_forest_dml_average_effect():
    Y, T, W = _world(0.3, n=3000)
    est = ConfounderEffect(model="causal_forest_dml", n_estimators=100, random_state=0).fit(Y, T, W)
    assert est.ci_low_ - 0.05 <= 0.3 <= est.ci_high_ + 0.05
    assert abs(est.effect_ - 0.3) < 0.1


def test_adjust_and_deconfound_remove_the_confounders_share():
    est = ConfounderEffect()
    est.effect_, est.t_ref_ = 0.5, 2.0
    np.testing.assert_allclose(est.adjust(np.array([1.0, 1.0]), np.array([2.0, 4.0])), [1.0, 0.0])
    out = deconfound(np.array([1.0, 1.0]), {"len": np.array([2.0, 4.0]), "pos": np.array([0.0, 1.0])},
                     [{"treatment": "len", "effect": 0.5, "t_ref": 2.0},
                      {"treatment": "pos", "effect": -1.0, "t_ref": 0.0}])
    np.testing.assert_allclose(out, [1.0, 1.0])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="differ in length"):
        ConfounderEffect().fit(np.ones(50), np.ones(40), np.ones((50, 2)))
    with pytest.raises(ValueError, match="varying T"):
        ConfounderEffect().fit(np.ones(50), np.ones(50), np.ones((50, 2)))


def test_inverse_propensity_weights_remove_the_collider_bias_of_selection():
    """Y is seen only on units selected on both quality and T; the controls see quality through noise. Among
    the selected, T and quality are anti-correlated, so the unweighted effect is biased low; weighting the
    selected units by 1/p estimates the population effect."""
    rng = np.random.default_rng(3)
    n = 60_000
    quality, T = rng.normal(size=n), rng.normal(size=n)
    Y = 0.3 * T + quality + rng.normal(size=n)
    p = 1 / (1 + np.exp(-(-1.0 + 1.5 * quality + 1.5 * T)))
    sel = rng.random(n) < p
    W = np.column_stack([quality + rng.normal(size=n), rng.normal(size=(n, 3))])
    plain = ConfounderEffect(random_state=0).fit(Y[sel], T[sel], W[sel])
    weighted = ConfounderEffect(random_state=0).fit(Y[sel], T[sel], W[sel], sample_weight=1 / p[sel])
    assert plain.ci_high_ < 0.3                                  # collider bias: the CI misses the effect
    assert weighted.ci_low_ <= 0.3 <= weighted.ci_high_
    assert weighted.to_dict()["weighted"] and not plain.to_dict()["weighted"]


def test_controls_project_the_text_proportions_without_copying_the_design():
    """confounder_controls = [SVD of the L1-normalised text block, other numerics, one-hots]; the SVD is fitted on
    svd_rows rows and applied to every row, as sklearn's transform of the normalised block would."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    from estimators.features import feature_frame, make_featurizer

    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"])
    n = 2000
    cols = {"prompt": [" ".join(rng.choice(words, 4)) for _ in range(n)],
            "response": [" ".join(rng.choice(words, rng.integers(0, 9))) for _ in range(n)],
            "position": rng.integers(0, 4, n).astype(float), "model_version": rng.choice(["a", "b", "c"], n)}
    kw = dict(numeric=["response_length", "position"], categorical=["model_version"])
    featurizer = make_featurizer(**kw, hash_features=128)
    X = featurizer.fit_transform(feature_frame(cols, text=["prompt", "response"], **kw))
    for svd_rows in (n, 500):
        W = confounder_controls(X, featurizer, numeric=kw["numeric"], treatment="response_length",
                                n_components=8, svd_rows=svd_rows)
        text = normalize(X[:, :128], norm="l1")
        rows = np.sort(np.random.default_rng(0).choice(n, svd_rows, replace=False)) if svd_rows < n else np.arange(n)
        svd = TruncatedSVD(8, random_state=0).fit(text[rows])
        np.testing.assert_allclose(W[:, :8], svd.transform(text), atol=1e-12)
        np.testing.assert_array_equal(W[:, 8], X[:, 129].toarray().ravel())            # position, not the length
        np.testing.assert_array_equal(W[:, 9:], X[:, 130:].toarray())                   # the one-hot versions
        assert W.shape == (n, 12)
        some = rng.random(n) < 0.3                  # only some rows' controls: the same rows of the full matrix
        np.testing.assert_array_equal(confounder_controls(X, featurizer, numeric=kw["numeric"], rows=some,
                                                          treatment="response_length", n_components=8,
                                                          svd_rows=svd_rows), W[some])
        np.testing.assert_array_equal(confounder_controls(X, featurizer, numeric=kw["numeric"],   # or their indices
                                                          rows=np.flatnonzero(some), treatment="response_length",
                                                          n_components=8, svd_rows=svd_rows), W[some])
