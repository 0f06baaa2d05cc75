"""FittedModels: the fit stage's models folder written and read back through one handler, its file names those of
schemas.run_dir, and the propensity floor read from weights.json only."""

import json
from pathlib import Path

import numpy as np
import pytest

from estimators.features import feature_frame, make_featurizer
from estimators.fitted import FittedModels, fitted_clip
from estimators.noise import FlipRates
from schemas import run_dir as rd
from schemas.errors import InputError


def _fitted(**changes) -> FittedModels:
    frame = feature_frame({"prompt": ["a b", "c d"], "response": ["e", "f g"]}, text=["prompt", "response"],
                          numeric=[], categorical=[])
    featurizer = make_featurizer(numeric=[], categorical=[], hash_features=16).fit(frame)
    fields = dict(featurizer=featurizer, propensity=[[0.1, 0.2]], imputation=[[0.3], [0.4]],
                  noise={**FlipRates(0.1, 0.05, method="fixed", n=0).to_dict(), "estimates": {}},
                  weighting={"clip": 0.05, "method": "config", "stabilizer": None, "propensity_column": None},
                  confounding={"effects": [{"treatment": "response_length", "effect": 0.1}], "selection_evalue": {}},
                  positivity={"floor": 0.01, "violated": []}, reference={"units": 2})
    return FittedModels(**{**fields, **changes})


def test_save_then_load_gives_the_same_models_and_files(tmp_path: Path):
    fitted = _fitted()
    fitted.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [rd.FEATURIZER, rd.PROPENSITY, rd.IMPUTATION, rd.NOISE, rd.WEIGHTS, rd.POSITIVITY, rd.CONFOUNDING,
         rd.REFERENCE])
    assert (tmp_path / "a" / rd.WEIGHTS).read_text() == json.dumps(fitted.weighting, indent=2) + "\n"
    back = FittedModels.load(tmp_path / "a")
    assert (back.propensity, back.imputation, back.weighting, back.positivity, back.reference) == (
        fitted.propensity, fitted.imputation, fitted.weighting, fitted.positivity, fitted.reference)
    assert back.flip_rates == fitted.flip_rates and back.confounders == fitted.confounders
    assert back.clip == fitted_clip(tmp_path / "a") == 0.05
    frame = feature_frame({"prompt": ["a"], "response": ["b"]}, text=["prompt", "response"], numeric=[],
                          categorical=[])
    np.testing.assert_array_equal(back.featurizer.transform(frame).toarray(),
                                  fitted.featurizer.transform(frame).toarray())
    back.save(tmp_path / "b")                                     # the JSON files come back byte for byte
    for name in (rd.NOISE, rd.WEIGHTS, rd.POSITIVITY, rd.CONFOUNDING, rd.REFERENCE):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def test_optional_files_follow_what_was_fitted(tmp_path: Path):
    logged = _fitted(propensity=None, positivity=None, reference=None,
                     weighting={"clip": 0.0, "method": "none", "stabilizer": None, "propensity_column": "p_log"})
    logged.save(tmp_path)
    assert not (tmp_path / rd.PROPENSITY).exists() and not (tmp_path / rd.CALIBRATION).exists()
    back = FittedModels.load(tmp_path)                  # a logged propensity: no propensity model is needed
    assert back.propensity is None and back.positivity is None and back.reference is None and back.clip == 0.0


def test_a_missing_file_names_itself(tmp_path: Path):
    with pytest.raises(InputError, match=f"{rd.WEIGHTS}: fitted model not found"):
        FittedModels.load(tmp_path)
    _fitted().save(tmp_path)
    (tmp_path / rd.PROPENSITY).unlink()
    with pytest.raises(InputError, match=f"{rd.PROPENSITY}: fitted model not found"):
        FittedModels.load(tmp_path)
    calibrated = _fitted(noise={**FlipRates(0.0, 0.0, method="calibrate", n=10).to_dict()})
    calibrated.save(tmp_path)
    with pytest.raises(InputError, match=f"{rd.CALIBRATION}: fitted model not found"):
        FittedModels.load(tmp_path)
