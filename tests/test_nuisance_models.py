import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from estimators import nuisance, persist
from estimators.crossfit import Job, check_folds, crossfit, crossfit_jobs, predict_by_fold
from estimators.diagnostics import auc, expected_calibration_error
from estimators.features import feature_frame, make_featurizer, structured_columns
from estimators.imputation import ImputationModel
from estimators.nuisance import choices, option_grid
from estimators.propensity import PropensityModel
from estimators.stacking import LinearThenBoosted
from schemas.config import FitConfig


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 3000
    X = rng.normal(size=(n, 3))
    p = 1 / (1 + np.exp(-(X[:, 0] - 1.2)))
    o = (rng.random(n) < p).astype(int)
    y = (rng.random(n) < 1 / (1 + np.exp(-X[:, 1]))).astype(float)
    fold = (np.arange(n) % 3).astype(np.int16)
    return X, p, o, y, fold


def _expected_failures(estimator) -> dict[str, str]:
    if isinstance(estimator, LinearThenBoosted):
        # as for sklearn's own HistGradientBoosting: binning and inner folds see rows, not weights
        return {"check_sample_weight_equivalence_on_dense_data": "row repeats change the inner folds and bins",
                "check_sample_weight_equivalence_on_sparse_data": "row repeats change the inner folds and bins"}
    return {}


@parametrize_with_checks([PropensityModel(), PropensityModel(holdout_above=0),
                          LinearThenBoosted(max_iter=20, min_samples_leaf=5)],
                         expected_failed_checks=_expected_failures)
def test_sklearn_contract(estimator, check):
    check(estimator)


def test_propensity_is_calibrated_and_discriminates(data):
    X, p, o, _, fold = data
    oof, models = crossfit(PropensityModel(), X, o, fold)
    assert len(models) == 3 and np.isfinite(oof).all()
    assert expected_calibration_error(oof, o) < 0.04
    assert auc(oof, o) > auc(p, o) - 0.03


def test_propensity_calibrated_on_the_other_half_on_large_samples(data):
    """Above holdout_above units: two classifiers, each with its map fitted on the half it did not see, averaged
    (no nested CV)."""
    X, p, o, _, fold = data
    oof, models = crossfit(PropensityModel(holdout_above=1000), X, o, fold)
    assert all(not hasattr(m, "model_") and len(m.bases_) == len(m.calibrators_) == 2 for m in models)
    assert expected_calibration_error(oof, o) < 0.05 and auc(oof, o) > auc(p, o) - 0.03
    m = models[0]
    assert not np.array_equal(m.bases_[0].coef_, m.bases_[1].coef_)       # fitted on different halves
    small = PropensityModel().fit(X[:500], o[:500])
    assert hasattr(small, "model_") and not hasattr(small, "bases_")
    refit = PropensityModel(holdout_above=100).fit(X[:500], o[:500])
    assert not hasattr(refit.set_params(holdout_above=1000).fit(X[:500], o[:500]), "bases_")


@pytest.mark.parametrize("holdout_above", [20_000, 0])
@pytest.mark.parametrize("calibration", ["sigmoid", "isotonic"])
def test_crossfit_does_not_leak(data, holdout_above: int, calibration: str):
    X, _, o, _, fold = data
    model = PropensityModel(calibration=calibration, holdout_above=holdout_above)
    a, _ = crossfit(model, X, o, fold)
    flipped = o.copy()
    flipped[7] = 1 - flipped[7]
    b, _ = crossfit(model, X, flipped, fold)
    assert a[7] == b[7]                                   # a unit's score ignores its own label
    assert not np.allclose(a[fold != fold[7]], b[fold != fold[7]])


def test_fold_halves_split_the_other_folds_into_two_equal_arcs():
    from estimators.propensity import fold_halves

    for n_folds in (3, 5, 7, 9):
        halves = fold_halves(n_folds)
        for k, (first, second) in halves.items():
            assert len(first) == len(second) == (n_folds - 1) // 2 and not set(first) & set(second)
            assert set(first) | set(second) == set(range(n_folds)) - {k}
        assert len({arc for pair in halves.values() for arc in pair}) == n_folds   # each arc serves two folds
    for n_folds in (2, 4, 6):
        with pytest.raises(ValueError, match="odd"):
            fold_halves(n_folds)


@pytest.fixture(scope="module")
def five_folds():
    rng = np.random.default_rng(5)
    n = 5000
    X = sp.csr_matrix(rng.normal(size=(n, 4)))
    o = (rng.random(n) < 1 / (1 + np.exp(-(X[:, [0]].toarray().ravel() - 1)))).astype(int)
    return X, o, (np.arange(n) % 5).astype(np.int16)


@pytest.mark.parametrize("calibration", ["isotonic", "sigmoid"])
def test_propensity_crossfit_shares_each_classifier_between_two_folds(five_folds, calibration: str):
    """Above holdout_above, fold k's two classifiers are fitted on whole folds (its halves): K classifiers serve
    K folds. The fold models score their fold as the cross-fit did (what the score stage applies), no unit's
    score depends on its own label, and n_jobs changes nothing."""
    X, o, fold = five_folds
    model = PropensityModel(calibration=calibration, holdout_above=1000)
    oof, models = crossfit(model, X, o, fold)
    assert len(models) == 5 and len({id(b) for m in models for b in m.bases_}) == 5
    assert models[0].bases_[0] is models[3].bases_[1]            # folds 1+2: fold 0's first half, fold 3's second
    np.testing.assert_array_equal(predict_by_fold(models, X, fold), oof)
    assert expected_calibration_error(oof, o) < 0.05
    flipped = o.copy()
    flipped[7] = 1 - flipped[7]
    moved, _ = crossfit(model, X, flipped, fold)
    assert moved[7] == oof[7] and not np.allclose(moved[fold != fold[7]], oof[fold != fold[7]])
    two, _ = crossfit(model, X, o, fold, n_jobs=2)
    np.testing.assert_array_equal(two, oof)


def test_propensity_crossfit_fits_per_fold_where_it_cannot_share(five_folds, monkeypatch):
    """An even number of folds does not halve, and at most holdout_above training rows take the nested
    calibration: then each fold fits its own model. Under C="cv" a shared classifier chooses C on its own rows."""
    from estimators import propensity

    X, o, fold = five_folds
    _, models = crossfit(PropensityModel(holdout_above=1000), X, o, fold % 4)
    assert len({id(b) for m in models for b in m.bases_}) == 8
    _, models = crossfit(PropensityModel(holdout_above=4000), X, o, fold)
    assert all(hasattr(m, "model_") for m in models)
    seen, real = [], propensity.choose_C
    monkeypatch.setattr(propensity, "choose_C", lambda X, y, **kw: seen.append(len(y)) or real(X, y, **kw))
    _, models = crossfit(PropensityModel(C="cv", holdout_above=1000), X, o, fold)
    assert seen == [2000] * 5 and all(m.C_ == m.bases_[0].C for m in models)


def test_predict_by_fold_reproduces_out_of_fold_scores(data):
    X, _, o, y, fold = data
    oof, models = crossfit(ImputationModel(), X, y, fold, fit_mask=o == 1)
    np.testing.assert_allclose(predict_by_fold(models, X, fold), oof)
    assert auc(oof, y) > 0.65


def test_bad_folds_are_refused():
    with pytest.raises(ValueError, match="fold ids"):
        check_folds(np.array([0, 0, 2]))


def test_imputation_fits_soft_labels():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4000, 2))
    y = 1 / (1 + np.exp(-2 * X[:, 0]))                    # graded labels in (0, 1)
    pred = ImputationModel(C=100).fit(X, y).predict(X)
    assert np.corrcoef(pred, y)[0, 1] > 0.99
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        ImputationModel().fit(X, y + 1)


def _plateau_world(n: int, seed: int):
    """P(y=1 | x) = 0.1 + 0.7·clip(sigmoid(sparse text score) + leaning(segment)): a harsh segment pins many
    units at the floor 0.1 (an anchor plateau) that no single logit can represent."""
    rng = np.random.default_rng(seed)
    text = sp.random(n, 30, density=0.2, random_state=rng, format="csr")
    beta = rng.normal(0, 3, 30)
    harsh = (rng.random(n) < 0.3).astype(float)
    truth = 0.1 + 0.7 * np.clip(1 / (1 + np.exp(-text @ beta)) - 0.6 * harsh, 0, 1)
    y = (rng.random(n) < truth).astype(float)
    return sp.hstack([text, harsh[:, None]]).tocsr(), y, truth


def test_boosted_imputation_learns_the_interaction_and_the_floor_a_logit_cannot():
    X, y, truth = _plateau_world(12_000, 0)
    fold = np.arange(len(y)) % 3
    err = {}
    for model in ("logistic", "boosted"):
        oof, _ = crossfit(ImputationModel(model=model, passthrough=[30]), X, y, fold)
        err[model] = float(np.mean((oof - truth) ** 2))
        low, high = np.quantile(oof, [0.01, 0.99])
        if model == "boosted":                               # the anchors are the plateaus, not overshoots
            assert abs(low - 0.1) < 0.03 and abs(high - 0.8) < 0.03
        else:
            assert low < 0.07 and high > 0.85                # what a logit does at the extremes
    assert err["boosted"] < 0.6 * err["logistic"]


def test_boosted_models_are_seeded():
    X, y, _ = _plateau_world(3000, 1)
    a = ImputationModel(model="boosted", passthrough=[30], random_state=3).fit(X, y).predict(X)
    b = ImputationModel(model="boosted", passthrough=[30], random_state=3).fit(X, y).predict(X)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="model must be one of"):
        ImputationModel(model="forest").fit(X, y)


def test_featurizer_on_text_numeric_and_categorical():
    cols = {"prompt": ["how to sort", None], "response": ["use sorted builtin", "no idea"],
            "position": [0, None], "model_version": ["v1", None]}
    frame = feature_frame(cols, text=["prompt", "response"], numeric=["response_length", "position"],
                          categorical=["model_version"])
    assert frame["response_length"].tolist() == [3.0, 2.0]
    X = make_featurizer(numeric=["response_length", "position"], categorical=["model_version"],
                        hash_features=64).fit_transform(frame)
    assert sp.issparse(X) and X.shape == (2, 64 + 2 + 2)
    with pytest.raises(KeyError, match="'segment'"):
        feature_frame(cols, text=[], numeric=[], categorical=["segment"])


def _tiny_units(n: int = 120, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Unit columns that every default feature reads, observed flags and soft labels: enough rows for each class
    in every inner fold of the boosted models, few enough to fit every configurable model in seconds."""
    rng = np.random.default_rng(seed)
    words = np.array(["sort", "list", "fast", "slow", "why", "how", "code", "error"])
    columns = {"prompt": np.array([" ".join(rng.choice(words, 3)) for _ in range(n)], dtype=object),
               "response": np.array([" ".join(rng.choice(words, rng.integers(1, 8))) for _ in range(n)], dtype=object),
               "position": rng.integers(0, 5, n).astype(float), "model_version": rng.choice(["v1", "v2"], n)}
    o = (rng.random(n) < 0.5).astype(int)
    y = np.where(rng.random(n) < 0.1, 0.7, (rng.random(n) < 0.5).astype(float))
    return columns, o, y


def _key(estimator: BaseEstimator) -> str:
    return f"{type(estimator).__qualname__}{sorted(estimator.get_params(deep=False).items())}"


def _saved_by_the_fit_stage() -> list[tuple[str, object, object]]:
    """(what, fitted object, its input) for each distinct object that the fit stage saves under some
    ``option_grid()`` config, built by ``estimators.nuisance``."""
    columns, o, y = _tiny_units()
    saved: dict[str, tuple[str, object, object]] = {}
    designs: dict[str, tuple[object, list[int]]] = {}
    every, observed = np.ones(o.size, bool), o == 1    # the rows pipelines.fit fits each model on
    for fc in option_grid(hash_features=16):            # the hashed width changes no saved type
        feat = nuisance.featurizer(fc)
        fkey = _key(feat)
        if fkey not in designs:
            frame = feature_frame(columns, text=fc.text, numeric=fc.numeric, categorical=fc.categorical)
            designs[fkey] = feat.fit_transform(frame).tocsr(), structured_columns(feat)
            saved[fkey] = ("featurizer", feat, frame)
        X, passthrough = designs[fkey]
        for what, model, target, rows in (("propensity", nuisance.propensity_model(fc, passthrough), o, every),
                                          ("imputation", nuisance.imputation_model(fc, passthrough), y, observed)):
            key = fkey + _key(model)
            if key not in saved:                        # one fold model: fit.py's K folds add copies, not types
                saved[key] = (f"{what} {_key(model)}", [model.fit(X[rows], target[rows])], X)
    return list(saved.values())


def _outputs(obj, X) -> np.ndarray:
    """What the score stage gets from a saved object: the design matrix, or each fold model's full output."""
    if not isinstance(obj, list):
        return obj.transform(X).toarray()
    return np.stack([m.predict_proba(X) if hasattr(m, "predict_proba") else m.predict(X) for m in obj])


def test_option_grid_covers_every_choice():
    grid = list(option_grid())
    for name, field in FitConfig.model_fields.items():
        if choices(field.annotation):
            assert {getattr(fc, name) for fc in grid} == set(choices(field.annotation)), name
    assert "sigmoid" in choices(FitConfig.model_fields["calibration"].annotation)


def test_skops_allow_list_is_what_every_configurable_model_needs(tmp_path: Path):
    """Every object the fit stage can save round-trips through skops with identical outputs, and the union of
    their untrusted types is ALLOWED_TYPES: a new option value that brings in a new class fails here."""
    needed: set[str] = set()
    with threadpool_limits(1):                          # OpenMP threads cost tiny boosted models 5-10x
        saved = _saved_by_the_fit_stage()
        for i, (what, obj, X) in enumerate(saved):
            path = tmp_path / f"{i}.skops"
            persist.save(obj, path)
            types = set(persist.untrusted_types(path))
            assert types <= persist.ALLOWED_TYPES, f"{what} needs {sorted(types - persist.ALLOWED_TYPES)} allowed"
            needed |= types
            np.testing.assert_array_equal(_outputs(persist.load(path), X), _outputs(obj, X), err_msg=what)
    assert needed == persist.ALLOWED_TYPES, f"listed but never needed: {sorted(persist.ALLOWED_TYPES - needed)}"
    propensity = {(obj[0].model, obj[0].calibration) for what, obj, _ in saved if what.startswith("propensity")}
    options = [choices(FitConfig.model_fields[f].annotation) for f in ("propensity_model", "calibration")]
    assert propensity == set(itertools.product(*options)) and ("logistic", "sigmoid") in propensity


class _Unlisted(BaseEstimator):
    """A type skops does not know and ALLOWED_TYPES does not list."""

    def fit(self, X, y=None):
        self.seen_ = len(X)
        return self


def test_untrusted_types_are_refused(tmp_path: Path):
    persist.save(_Unlisted().fit(np.zeros((4, 1))), tmp_path / "m.skops")
    assert persist.untrusted_types(tmp_path / "m.skops") == ["tests.test_nuisance_models._Unlisted"]
    with pytest.raises(ValueError, match="refusing to load untrusted types"):
        persist.load(tmp_path / "m.skops")
    persist.save(ImputationModel().fit(np.eye(2), np.array([0.0, 1.0])), tmp_path / "ok.skops")
    assert isinstance(persist.load(tmp_path / "ok.skops"), ImputationModel)


def test_boosted_imputation_keeps_a_soft_labels_two_copies_in_one_inner_fold(monkeypatch):
    """A label of 0.7 becomes a 0.7-weighted positive and a 0.3-weighted negative copy of the row; the inner
    folds that make the honest logits must not split them (else a unit's logit comes from a model that saw it)."""
    seen = []
    original = LinearThenBoosted.fit

    def spy(self, X, y, sample_weight=None, groups=None):
        seen.append(groups)
        return original(self, X, y, sample_weight=sample_weight, groups=groups)

    monkeypatch.setattr(LinearThenBoosted, "fit", spy)
    X, y, _ = _plateau_world(3000, 2)
    soft = np.where(np.arange(y.size) % 3 == 0, 0.7, y)
    ImputationModel(model="boosted", passthrough=[30]).fit(X, soft)
    groups = seen[-1]
    assert groups is not None and np.bincount(groups).max() == 2        # the 0.7 rows, twice each
    ImputationModel(model="boosted", passthrough=[30]).fit(X, y)
    assert seen[-1] is None                                              # binary labels: one copy per unit


def test_folds_fitted_on_two_threads_are_the_folds_fitted_on_one():
    """fit.n_jobs only changes where the folds are fitted: the out-of-fold scores and the models are the same."""
    rng = np.random.default_rng(3)
    X = sp.random(600, 40, density=0.2, format="csr", random_state=3)
    o = (rng.random(600) < 1 / (1 + np.exp(-X @ rng.normal(size=40)))).astype(int)
    fold = np.arange(600) % 3
    model = PropensityModel(calibration="sigmoid")
    one, models_one = crossfit(model, X, o, fold)
    two, models_two = crossfit(model, X, o, fold, n_jobs=2)
    np.testing.assert_array_equal(one, two)
    for a, b in zip(models_one, models_two, strict=True):
        np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_crossfit_jobs_share_a_pool_and_give_each_jobs_own_crossfit(data):
    X, _, o, y, fold = data
    jobs = [Job(PropensityModel(calibration="sigmoid"), o), Job(ImputationModel(model="boosted"), y, o == 1)]
    together = crossfit_jobs(jobs, X, fold, n_jobs=2)
    for job, result in zip(jobs, together, strict=True):
        alone, models = crossfit(job.model, X, job.y, fold, fit_mask=job.fit_mask)
        np.testing.assert_array_equal(result.oof, alone)
        assert len(result.models) == len(models) == 3 and result.seconds > 0


def test_a_boosted_models_linear_stage_is_the_logistic_model(data):
    """The fit stage takes the logistic imputation model from the boosted noise proxy's fit: it must solve the
    regression that fitting ``logistic`` on the same rows solves, soft labels included. It starts from the inner
    models' mean, ``logistic`` from zero, so each stops within lbfgs's tolerance of the one optimum: both are
    checked against that optimum (solved to 1e-12), by their predictions and their penalised loss."""
    from sklearn.linear_model import LogisticRegression

    from estimators.imputation import fit_soft

    X, _, o, y, _ = data
    soft = np.where(np.arange(y.size) % 5 == 0, 0.6, y)

    def objective(model, target):
        p = model.predict_proba(X)[:, 1]
        return (np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p)))
                + np.sum(model.coef_ ** 2) / (2 * 0.5 * target.size))

    for target in (y, soft):
        boosted = ImputationModel(model="boosted", C=0.5, random_state=3).fit(X, target)
        logistic = ImputationModel(model="logistic", C=0.5, random_state=3).fit(X, target)
        optimum = fit_soft(LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000), X, target)
        linear = boosted.linear_part()
        assert linear.model_.get_params() == logistic.model_.get_params()      # same C and seed, no warm start
        for model in (linear, logistic):
            np.testing.assert_allclose(model.predict(X), optimum.predict_proba(X)[:, 1], atol=1e-3)
            assert abs(objective(model.model_, target) - objective(optimum, target)) < 1e-6
    constant = ImputationModel(model="boosted").fit(X, np.ones(y.size)).linear_part()
    assert constant.model == "logistic" and (constant.predict(X) == 1).all()
    with pytest.raises(ValueError, match="boosted"):
        ImputationModel().fit(X, y).linear_part()


def test_choose_C_penalises_a_wide_noisy_design_and_not_a_clean_narrow_one():
    """One informative column: with 2,000 columns of noise beside it a weak penalty fits the noise (the
    cross-validated loss prefers a stronger one); alone, the weakest penalty of the grid fits best."""
    from estimators.propensity import C_GRID, choose_C

    rng = np.random.default_rng(0)
    n = 2000
    signal = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-2 * signal))).astype(int)
    wide = sp.hstack([sp.csr_matrix(signal[:, None]), sp.random(n, 2000, density=0.02, random_state=0)]).tocsr()
    assert choose_C(wide, y) < choose_C(signal[:, None], y) == max(C_GRID)


def test_cv_chooses_C_on_the_first_classifiers_rows_only(data, monkeypatch):
    """The rows that calibrate the first classifier (its other half) never inform its C."""
    from estimators import propensity

    X, _, o, _, _ = data
    seen, real = [], propensity.choose_C
    monkeypatch.setattr(propensity, "choose_C", lambda X, y, **kw: seen.append(len(y)) or real(X, y, **kw))
    large = PropensityModel(C="cv", holdout_above=1000).fit(X, o)
    assert abs(seen[-1] - len(o) / 2) <= 1 and large.C_ in propensity.C_GRID
    assert large.bases_[0].C == large.bases_[1].C == large.C_
    small = PropensityModel(C="cv").fit(X[:500], o[:500])             # the nested calibration: every row
    assert seen[-1] == 500 and small.C_ in propensity.C_GRID
    assert PropensityModel(C=0.5).fit(X[:500], o[:500]).C_ == 0.5
    with pytest.raises(ValueError, match="C must be a positive number or 'cv'"):
        PropensityModel(C="auto").fit(X[:500], o[:500])


def test_propensity_fits_in_float32_and_predicts_from_the_design_as_given(data):
    X, _, o, _, _ = data
    m = PropensityModel(holdout_above=1000).fit(X, o)
    assert m.bases_[0].coef_.dtype == np.float32
    p = m.predict_proba(X)
    assert p.dtype == np.float64
    np.testing.assert_array_equal(m.predict_proba(X[:7]), p[:7])      # the rows predicted together do not matter
