"""Stabilised weights beyond clipping: the isotonic (monotone) weights, the variance cap, the DR variants, the
Hill tail index, and a small run with stabilize = "monotone" and dr_variant = "switch"."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.isotonic import IsotonicRegression

from estimators import weights as W
from pipelines import evaluate, fit, ingest, score
from pipelines.orchestration.cli import main
from pipelines.report import render
from schemas import pointwise
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import parse_config
from schemas.errors import ConfigError, InputError
from schemas.run_dir import RunDir
from schemas.storage import read_dataset
from tests.conftest import config_text, module_hash_key
from transforms.score import add_stabilized, exact_sums, stabilized_sums

# Hand case: PAV pools the violating pair (0.2, 0.3) -> blocks {0.1}, {0.2, 0.3}, {0.4, 0.5, 0.6}
P_HAND = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
O_HAND = np.array([0.0, 1, 0, 1, 1, 1])


def test_monotone_weights_balance_each_isotonic_block_on_a_hand_case():
    x, y = W.monotone_map(O_HAND, P_HAND)
    q = np.interp(P_HAND, x, y)
    np.testing.assert_allclose(q, [W.MONOTONE_FLOOR, 0.5, 0.5, 1, 1, 1])
    w = W.monotone_weights(O_HAND, P_HAND, x, y)
    np.testing.assert_allclose(w, [0, 2, 0, 1, 1, 1])
    # each block with an observed unit: its observed units' weights sum to the block's size
    assert w[1:3].sum() == pytest.approx(2) and w[3:].sum() == pytest.approx(3)
    # mean one, then the cap: normalised weights 1.6, .8, .8, .8 have variance 0.12; a cap of 0.03 needs λ = 0.5
    capped, lam = W.cap_variance(w, O_HAND, max_variance=0.03)
    assert lam == pytest.approx(0.5)
    np.testing.assert_allclose(capped, [0, 1.3, 0, 0.9, 0.9, 0.9])
    same, lam1 = W.cap_variance(w, O_HAND, max_variance=0.12 + 1e-9)       # a cap that does not bind: λ = 1
    assert lam1 == 1.0
    np.testing.assert_allclose(same, [0, 1.6, 0, 0.8, 0.8, 0.8])


def test_the_saved_map_predicts_what_isotonic_regression_predicts():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.9, 3000)
    o = (rng.uniform(size=p.size) < p).astype(float)
    x, y = W.monotone_map(o, p)
    iso = IsotonicRegression(y_min=W.MONOTONE_FLOOR, y_max=1.0, out_of_bounds="clip").fit(p, o)
    new = np.concatenate([rng.uniform(0, 1, 500), [0.0001, 0.999]])            # unseen units, and beyond the range
    np.testing.assert_allclose(np.interp(new, x, y), iso.predict(new))


@pytest.mark.parametrize("cap", [0.2, 1.0, 100.0])
def test_monotone_weights_keep_mean_one_are_monotone_and_meet_the_cap(cap):
    rng = np.random.default_rng(1)
    p_true = rng.beta(0.6, 3.0, 8000).clip(0.002, 1)
    o = (rng.uniform(size=p_true.size) < p_true).astype(float)
    p_hat = np.clip(p_true * rng.lognormal(0, 0.5, p_true.size), 1e-3, 1)    # a noisy propensity model
    x, y = W.monotone_map(o, p_hat)
    raw = W.monotone_weights(o, p_hat, x, y)
    q = np.interp(p_hat, x, y)
    for value in np.unique(q[o == 1]):                # balancing: each block's observed weights sum to its size
        block = q == value
        assert raw[block].sum() == pytest.approx(block.sum())
    w, lam = W.cap_variance(raw, o, max_variance=cap)
    obs = o == 1
    assert w[obs].mean() == pytest.approx(1.0)
    assert np.all(w[~obs] == 0)
    assert np.var(w[obs]) <= cap * (1 + 1e-9)
    order = np.argsort(p_hat[obs], kind="stable")
    assert np.all(np.diff(w[obs][order]) <= 1e-12)                           # non-increasing in p̂
    assert 0 < lam <= 1
    assert (lam < 1) == (np.var(raw[obs] / raw[obs].mean()) > cap)


def test_global_sums_make_batches_agree_with_the_whole():
    rng = np.random.default_rng(2)
    o = (rng.uniform(size=200) < 0.4).astype(float)
    raw = o * rng.pareto(2.0, 200) + o
    whole, _ = W.cap_variance(raw, o, max_variance=0.5)
    batches = [pa.table({un.OBSERVED: pa.array(o[s], pa.int8()), pointwise.WEIGHT_STABILIZED: raw[s]})
               for s in (slice(0, 70), slice(70, 200))]
    sums = exact_sums((stabilized_sums(b) for b in batches), 3)
    out = np.concatenate([add_stabilized(b, sums, method="monotone", max_variance=0.5)[pointwise.WEIGHT_STABILIZED]
                          .to_numpy() for b in batches])
    np.testing.assert_allclose(out, whole)


def test_dr_variants_on_hand_values():
    w = np.array([0.0, 2.0, 10.0, 40.0])
    np.testing.assert_array_equal(W.dr_weights(w), w)
    np.testing.assert_array_equal(W.dr_weights(w, variant="switch", tau=10.0), [0, 2, 10, 0])
    np.testing.assert_allclose(W.dr_weights(w, variant="shrink", lam=100.0),
                               [0, 200 / 104, 1000 / 200, 4000 / 1700])
    label, o, imputed = np.array([np.nan, 1, 0, 1]), np.array([0.0, 1, 1, 1]), np.full(4, 0.5)
    # Switch-DR: the weight-40 unit keeps its imputation alone
    np.testing.assert_allclose(W.dr_pseudo_outcome(label, o, W.dr_weights(w, variant="switch", tau=10.0), imputed),
                               [0.5, 1.5, -4.5, 0.5])
    for bad in ({"variant": "switch", "tau": 0.0}, {"variant": "shrink", "lam": -1.0}, {"variant": "other"}):
        with pytest.raises(ValueError):
            W.dr_weights(w, **bad)


@pytest.mark.parametrize("alpha", [1.5, 3.0])
def test_hill_estimator_recovers_a_pareto_tail_index(alpha):
    rng = np.random.default_rng(3)
    draws = 1.0 + rng.pareto(alpha, 100_000)                     # Pareto(α) with scale 1: P(W > w) = w^-α
    assert W.hill_tail_index(draws) == pytest.approx(alpha, rel=0.15)
    assert W.hill_tail_index(draws, k=5000) == pytest.approx(alpha, rel=0.1)


def test_hill_estimator_edge_cases():
    assert W.hill_tail_index(np.full(100, 2.0)) == float("inf")           # equal weights: no tail
    assert np.isnan(W.hill_tail_index(np.array([0.0, 1.0, 2.0])))       # fewer than 3 positive weights
    with pytest.raises(ValueError, match="k must be"):
        W.hill_tail_index(np.arange(1.0, 11.0), k=10)


@pytest.mark.parametrize("extra, key", [('stabilize = "isotonic"', "weights.stabilize"),
                                        ("max_weight_variance = 0", "weights.max_weight_variance"),
                                        ("switch_tau = -1", "score.switch_tau"),
                                        ("shrink_lambda = 0", "score.shrink_lambda"),
                                        ('dr_variant = "switchdr"', "score.dr_variant")])
def test_bad_stabiliser_settings_are_refused_naming_the_key(extra, key):
    section = key.split(".")[0]
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        parse_config(f'[input]\nimpressions = "x"\nsignals = "y"\n[{section}]\n{extra}\n')


@pytest.fixture(scope="module")
def monotone_run(sim_small: Path, tmp_path_factory):
    text = config_text(sim_small, weights={"stabilize": "monotone", "max_weight_variance": 1.5},
                       score={"dr_variant": "switch", "switch_tau": 8.0})
    cfg = parse_config(text)
    run = RunDir(tmp_path_factory.mktemp("stabilize") / "run")
    with module_hash_key():
        ingest.execute(run, cfg)
        fitted = fit.execute(run, cfg).to_manifest()["diagnostics"]["weights"]
        scored = score.execute(run, cfg).to_manifest()
        evaluated = evaluate.execute(run, cfg)
    return run, cfg, fitted, scored, evaluated


def test_a_monotone_switch_run_writes_monotone_mean_one_weights(monotone_run):
    run, cfg, fitted, score_record, evaluated = monotone_run
    scored = score_record["diagnostics"]
    saved = json.loads((run.path(rd.MODELS) / rd.WEIGHTS).read_text())["stabilizer"]
    assert saved["method"] == "monotone" and len(saved["thresholds_x"]) == len(saved["thresholds_y"]) >= 2
    assert fitted["stabilizer"]["thresholds"] == len(saved["thresholds_x"])     # the manifest: figures, no arrays
    assert fitted["stabilizer"]["sample_variance"] <= 1.5 * (1 + 1e-9)
    t = read_dataset(run.path(rd.POINTWISE), [un.OBSERVED, un.LABEL, pointwise.PROPENSITY, pointwise.WEIGHT_STABILIZED,
                                              pointwise.WEIGHT_CLIPPED, pointwise.IMPUTED, pointwise.TARGET_DR])
    o = t[un.OBSERVED].to_numpy() == 1
    p, w = t[pointwise.PROPENSITY].to_numpy(), t[pointwise.WEIGHT_STABILIZED].to_numpy()
    assert t[pointwise.WEIGHT_STABILIZED].null_count == 0
    assert w[o].mean() == pytest.approx(1.0)
    assert np.all(w[~o] == 0)
    order = np.argsort(p[o], kind="stable")
    assert np.all(np.diff(w[o][order]) <= 1e-9)                   # non-increasing in the propensity
    assert np.var(w[o]) <= cfg.weights.max_weight_variance * (1 + 1e-9)
    # target_dr is Switch-DR: the imputation alone where the clipped weight exceeds τ
    w_clip, imputed = t[pointwise.WEIGHT_CLIPPED].to_numpy(), t[pointwise.IMPUTED].to_numpy()
    label = t[un.LABEL].to_numpy(zero_copy_only=False).astype(float)
    switched = o & (w_clip > 8.0)
    assert switched.any()
    np.testing.assert_allclose(t[pointwise.TARGET_DR].to_numpy()[switched], imputed[switched])
    np.testing.assert_allclose(t[pointwise.TARGET_DR].to_numpy(),
                               W.dr_pseudo_outcome(label, o.astype(float), np.where(w_clip <= 8.0, w_clip, 0), imputed))
    d = scored[pointwise.WEIGHT_STABILIZED]
    assert d["method"] == "monotone" and d["variance"] <= 1.5 * (1 + 1e-9)
    assert d["max"] == pytest.approx(w[o].max()) and d["ess_share"] == pytest.approx(1 / (1 + np.var(w[o])))
    assert "tail_index" in d and "tail_index" in scored[pointwise.WEIGHT_IPS]
    page = render({"run_id": "r", "stages": {"score": {"status": "ok", **score_record}}}, {}, {})
    assert "weight_stabilized (monotone)" in page and "tail index (Hill)" in page
    st = evaluated["stabilised"]
    assert st["estimates"]["stabilized"] == pytest.approx(np.average(label[o], weights=w[o]))
    assert st["estimates"]["dr_switch"] == pytest.approx(t[pointwise.TARGET_DR].to_numpy().mean())
    assert set(st["share_of_naive_label"]) >= {"clipped", "snips", "stabilized", "dr_standard", "dr_switch",
                                               "dr_shrink"}


def test_score_refuses_a_monotone_stabiliser_without_the_fitted_map(monotone_run, tmp_path: Path):
    run, cfg, *_ = monotone_run
    text = config_text(Path(cfg.input.truth).parent)
    with pytest.raises(InputError, match="without the monotone map"):
        score.score_weighting([], {"clip": 0.02, "stabilizer": None}, parse_config(
            text + '[weights]\nstabilize = "monotone"\n'))


def test_fit_refuses_a_monotone_stabiliser_when_every_unit_is_observed():
    cfg = parse_config('[input]\nimpressions = "x"\nsignals = "y"\n[weights]\nstabilize = "monotone"\n')
    with pytest.raises(ConfigError, match="every unit of the fit sample is observed"):
        W.stabilizer_map(np.ones(4), np.array([0.2, 0.4, 0.6, 0.8]), cfg.weights)


def test_the_cli_exits_2_naming_a_bad_stabiliser(tmp_path: Path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[input]\nimpressions = "x"\nsignals = "y"\n[weights]\nstabilize = "isotonic"\n')
    assert main(["run", str(cfg), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights.stabilize" in err[0], err
