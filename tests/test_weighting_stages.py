"""Fit chooses the propensity floor and refuses degenerate propensities; score applies the floor and fails,
keeping the previous datasets, when the weights have no effective sample left."""

from pathlib import Path

import numpy as np
import pytest

from estimators import weights as W
from pipelines import fit, ingest, score
from schemas import pointwise as pw
from schemas import run_dir as rd
from schemas.config import parse_config
from schemas.errors import GateError
from schemas.run_dir import RunDir
from tests.conftest import HASH_KEY_ENV, config_text
from transforms.io import read_dataset


@pytest.fixture(scope="module")
def fitted(sim_small: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("weighting")
    text = config_text(sim_small, score={"clip": "auto", "min_ess_share": 0.5})
    cfg = parse_config(text)
    run = RunDir(root / "run")
    mp = pytest.MonkeyPatch()
    mp.setenv(HASH_KEY_ENV, "k")
    try:
        ingest.run(run, cfg)
        diagnostics = fit.run(run, cfg)["diagnostics"]
    finally:
        mp.undo()
    return run, text, diagnostics


def test_auto_clip_keeps_the_configured_ess_share(fitted):
    run, text, diagnostics = fitted
    chosen = diagnostics["weights"]
    assert chosen["method"] == "auto" and 0 < chosen["clip"] < 1
    assert chosen["sample_ess_share"] >= 0.5 - 1e-9
    out = score.run(run, parse_config(text))["diagnostics"]
    assert out["clip"] == chosen["clip"]
    t = read_dataset(run.path(rd.POINTWISE), ["observed", pw.WEIGHT_CLIPPED, pw.WEIGHT_IPS])
    o = t["observed"].to_numpy() == 1
    # The sample is most units here, so the population's ESS share is close to the sample's.
    assert W.kish_ess(t[pw.WEIGHT_CLIPPED].to_numpy()[o]) / o.sum() >= 0.45
    assert W.kish_ess(t[pw.WEIGHT_IPS].to_numpy()[o]) / o.sum() < 0.5      # unclipped weights would not


def test_degenerate_weights_fail_score_and_keep_the_previous_datasets(fitted):
    run, text, _ = fitted
    score.run(run, parse_config(text))
    before = read_dataset(run.path(rd.POINTWISE))
    with pytest.raises(GateError, match="degenerate weights: the Kish ESS of the IPS weights is"):
        score.run(run, parse_config(text.replace("[score]\n", "[score]\ness_floor = 0.99\n")))
    assert read_dataset(run.path(rd.POINTWISE)).equals(before)


def test_fit_refuses_degenerate_propensities_instead_of_clipping_them():
    cfg = parse_config('[input]\nimpressions = "x"\nsignals = "y"\n[score]\nclip = "auto"\ness_floor = 0.5\n')
    o = np.array([1.0, 0, 1, 1])
    with pytest.raises(GateError, match="NaN or outside"):
        fit.choose_clip(o, np.array([0.5, np.nan, 0.4, 0.6]), cfg)
    with pytest.raises(GateError, match="below the floor"):
        fit.choose_clip(o, np.array([1e-7, 0.5, 0.9, 0.9]), cfg)
    assert fit.choose_clip(o, np.array([0.5, 0.2, 0.4, 0.6]), cfg)["method"] == "auto"
