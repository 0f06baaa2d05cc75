import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from pipelines.sources.simulator import LOGGED_PROPENSITY, SCENARIOS, Scenario, simulate, write
from schemas import truth as tr


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path):
    s = Scenario(n_impressions=800, seed=3)
    for name in ("a", "b"):
        write(simulate(s), tmp_path / name, scenario=s)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    write(simulate(replace(s, seed=4)), tmp_path / "c", scenario=s)
    assert _digest(tmp_path / "a")["truth.parquet"] != _digest(tmp_path / "c")["truth.parquet"]


def test_truth_is_consistent_with_the_scenario():
    s = replace(SCENARIOS["default"], n_impressions=40_000, seed=1, dirty_share=0.0)
    t = simulate(s).truth.to_pydict()
    reward, clean = np.array(t[tr.REWARD_TRUE]), np.array(t[tr.LABEL_CLEAN])
    p, o = np.array(t[tr.PROPENSITY_TRUE]), np.array(t[tr.OBSERVED_TRUE])
    assert abs(clean.mean() - reward.mean()) < 0.01                  # r* ~ Bernoulli(reward_true)
    assert abs(o.mean() - p.mean()) < 0.01                           # o ~ Bernoulli(propensity_true)
    assert np.corrcoef(p, reward)[0, 1] > 0.1                        # alpha < 1: good answers get rated more



def test_without_confounding_the_given_label_is_the_clean_one_flipped():
    s = replace(SCENARIOS["no_confounding"], n_impressions=40_000, seed=2, dirty_share=0.0)
    t = simulate(s).truth.to_pydict()
    clean, noisy = np.array(t[tr.LABEL_CLEAN]), np.array(t[tr.LABEL_NOISY])
    assert abs(np.mean(noisy[clean == 1] == 0) - s.rho01) < 0.01
    assert abs(np.mean(noisy[clean == 0] == 1) - s.rho10) < 0.01


def test_dirt_comes_in_known_numbers():
    s = Scenario(n_impressions=2000, seed=0, dirty_share=0.01)
    logs = simulate(s)
    assert logs.impressions.num_rows == 2000 + 2 * 20               # duplicates + rows missing user_id
    types = logs.signals["type"].to_pylist()
    orphans = sum(i.startswith("gone") for i in logs.signals["impression_id"].to_pylist())
    missing = logs.signals["event_id"].null_count
    assert types.count("thumbs_sideways") == orphans == missing > 0


def test_gold_audits_a_random_share_with_the_clean_label_and_changes_no_other_draw():
    s = replace(SCENARIOS["default"], n_impressions=20_000, seed=5, dirty_share=0.0)
    logs = simulate(s)
    sig = logs.signals.to_pandas()
    gold = sig[sig["type"] == "gold"]
    assert gold["impression_id"].is_unique and abs(len(gold) / 20_000 - s.gold_share) < 0.005
    truth = logs.truth.to_pandas().set_index("impression_id")
    audited = truth.loc[gold["impression_id"]]
    assert (gold["value"].to_numpy() == audited[tr.LABEL_CLEAN].to_numpy()).all()
    assert abs(audited[tr.OBSERVED_TRUE].mean() - truth[tr.OBSERVED_TRUE].mean()) < 0.03   # not selected on o
    without = simulate(replace(s, gold_share=0.0))
    assert without.truth.equals(logs.truth)
    assert without.signals.equals(logs.signals.filter(pc.not_equal(logs.signals["type"], "gold")))


def test_a_logged_propensity_is_the_true_one():
    logs = simulate(Scenario(n_impressions=1000, seed=0, dirty_share=0.0, log_propensity=True))
    assert logs.impressions[LOGGED_PROPENSITY].to_pylist() == logs.truth[tr.PROPENSITY_TRUE].to_pylist()
    assert LOGGED_PROPENSITY not in simulate(Scenario(n_impressions=1000)).impressions.column_names


def test_scenario_validation():
    with pytest.raises(ValueError, match="flip rates"):
        Scenario(rho01=0.6, rho10=0.4)
    with pytest.raises(ValueError, match="alpha"):
        Scenario(alpha=0.0)
    with pytest.raises(ValueError, match="gold_share"):
        Scenario(gold_share=1.5)
