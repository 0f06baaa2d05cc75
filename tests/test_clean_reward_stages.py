"""fit.noise = 'calibrate' through the stages: the calibrators are fitted on the audit, the score stage's clean
reward and its DR target come from them, and the noise-aware losses train on the calibrated columns."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipelines import evaluate, fit, ingest, score, train
from pipelines.sources.simulator import SCENARIOS, simulate, write
from schemas import pointwise
from schemas import run_dir as rd
from schemas import truth as tr
from schemas.config import parse_config
from schemas.errors import ConfigError
from schemas.run_dir import RunDir
from schemas.storage import read_dataset
from tests.conftest import config_text, module_hash_key


@pytest.fixture(scope="module")
def audited_logs(tmp_path_factory) -> Path:
    """6,000 impressions of the default world with a 15% random audit (~180 audited rated units, ~730 unrated)."""
    out = tmp_path_factory.mktemp("audited")
    scenario = replace(SCENARIOS["default"], n_impressions=6000, seed=11, gold_share=0.15)
    write(simulate(scenario), out, scenario=scenario)
    return out


@pytest.fixture(scope="module")
def scored(audited_logs: Path, tmp_path_factory):
    text = config_text(audited_logs, fit={"noise": "calibrate"},
                       train={"loss": "causalrm_dr", "baselines": ["dr"], "epochs": 4})
    cfg = parse_config(text)
    run = RunDir(tmp_path_factory.mktemp("calibrate") / "run")
    with module_hash_key():
        ingest.execute(run, cfg)
        fitted = fit.execute(run, cfg)
        score.execute(run, cfg)
    return run, cfg, fitted


def test_fit_saves_the_calibrators_and_a_clean_mean_with_its_interval(scored):
    run, _, fitted = scored
    noise = json.loads(run.path(rd.NOISE_MODEL).read_text())
    assert noise["method"] == "calibrate" and (noise["rho01"], noise["rho10"]) == (0.0, 0.0)
    assert (run.path(rd.MODELS) / rd.CALIBRATION).exists()
    mean = noise["mean_reward"]["calibrated"]
    assert mean["ci_low"] < mean["estimate"] < mean["ci_high"] and mean["se_calibration"] > 0
    assert fitted.to_manifest()["diagnostics"]["flip_rates"]["mean_reward"]["calibrated"] == mean


def test_score_builds_the_clean_target_from_the_calibrators(scored, audited_logs: Path):
    run, cfg, _ = scored
    d = pl.from_arrow(read_dataset(run.path(rd.POINTWISE))).join(
        pl.read_parquet(audited_logs / "truth.parquet"), on="impression_id")
    reward, imputed = d[pointwise.REWARD_CLEAN].to_numpy(), d[pointwise.IMPUTED_CLEAN].to_numpy()
    assert np.all((reward >= 0) & (reward <= 1)) and np.all((imputed >= 0) & (imputed <= 1))
    unrated = d["observed"].to_numpy() == 0
    np.testing.assert_allclose(reward[unrated], imputed[unrated])
    np.testing.assert_allclose(d[pointwise.TARGET_NOISE_CORRECTED].to_numpy(), reward)
    np.testing.assert_allclose(d[pointwise.TARGET_DECONFOUNDED].to_numpy(), reward)
    # every unit is in the fit sample here, so the pointwise target is the fit stage's out-of-fold one
    mean = json.loads(run.path(rd.NOISE_MODEL).read_text())["mean_reward"]["calibrated"]
    assert d[pointwise.TARGET_NOISE_CORRECTED].mean() == pytest.approx(mean["estimate"], abs=1e-9)
    true = d[tr.REWARD_TRUE].mean()
    assert mean["ci_low"] <= true <= mean["ci_high"]
    ppi = json.loads(run.path(rd.NOISE_MODEL).read_text())["mean_reward"]["ppi"]
    assert ppi["ci_low"] <= mean["estimate"] <= ppi["ci_high"]            # agrees with PPI on the same audit
    assert mean["agrees_with_ppi"] is True
    clean = evaluate.clean_reward_estimates(d, json.loads(run.path(rd.NOISE_MODEL).read_text()))
    assert clean["estimates"]["noise_corrected"] == pytest.approx(mean["estimate"])
    assert set(clean["share_of_naive"]) >= {"naive", "snips", "dr", "noise_corrected", "ppi", "calibrated"}


def test_noise_aware_losses_train_on_the_calibrated_columns(scored, monkeypatch):
    run, cfg, _ = scored
    read: list[dict] = []
    original = train._stream

    def spy(files, columns, rename=None):
        read.append(dict(rename or {}))
        return original(files, columns, rename)

    monkeypatch.setattr(train, "_stream", spy)
    train.execute(run, cfg)
    assert {v for r in read for v in r.values()} == {pointwise.REWARD_CLEAN}
    assert {} in read                                      # the 'dr' baseline reads the label itself
    assert train.calibrated(run)


def test_an_explicit_calibration_without_an_audit_is_a_config_error(sim_small: Path, tmp_path: Path, hash_key):
    cfg = parse_config(config_text(sim_small, fit={"noise": "calibrate", "min_audit": 10_000}))
    run = RunDir(tmp_path / "run")
    ingest.execute(run, cfg)
    with pytest.raises(ConfigError, match="fit.noise = 'calibrate'.*fit.min_audit = 10000"):
        fit.execute(run, cfg)
