"""Exposure logs with a target policy (obp-style): weights π_target / π_logging and the target policy's IPS and
SNIPS values, checked against a hand computation on a small log."""

import datetime as dt
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from estimators import weights as W
from estimators.fitted import fitted_clip
from pipelines import fit, ingest, score
from schemas import pointwise
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import ScoreConfig, parse_config
from schemas.errors import ConfigError, GateError
from schemas.run_dir import RunDir
from schemas.storage import read_dataset
from tests.conftest import config_text
from transforms.score import candidate_counts, target_probability

# A bandit log: prompt, response shown, logging propensity π0, reward (click), and a target policy's π_target.
# Candidates: A has 2 responses, B 3, C 1, so the uniform target is 1/2, 1/3, 1.
LOG = [("A", "a1", 0.5, 1, 0.9), ("A", "a2", 0.5, 0, 0.1), ("A", "a1", 0.5, 0, 0.9),
       ("B", "b1", 0.2, 1, 0.0), ("B", "b2", 0.5, 1, 1.0), ("B", "b3", 0.3, 0, 0.0),
       ("C", "c1", 1.0, 1, 1.0)]
# uniform: w = (1/2)/0.5 = 1 (x3), (1/3)/0.2 = 5/3, (1/3)/0.5 = 2/3, (1/3)/0.3 = 10/9, 1/1 = 1
#   Σ w·r = 1 + 5/3 + 2/3 + 1 = 13/3, Σ w = 3 + 31/9 + 1 = 67/9: IPS = (13/3)/7 = 13/21, SNIPS = 39/67
# column: w = 1.8, 0.2, 1.8, 0, 2, 0, 1: Σ w·r = 4.8, Σ w = 6.8: IPS = 4.8/7, SNIPS = 4.8/6.8
HAND = {"uniform": (13 / 21, 39 / 67), "column": (4.8 / 7, 4.8 / 6.8)}


def _units(log=LOG) -> pa.Table:
    return pa.table({un.PROMPT_ID: [r[0] for r in log], un.RESPONSE_ID: [r[1] for r in log],
                     "logged_p": [r[2] for r in log], un.LABEL: [float(r[3]) for r in log],
                     "pi_target": [r[4] for r in log], un.OBSERVED: pa.array([1] * len(log), pa.int8())})


@pytest.mark.parametrize("policy", ["uniform", "column"])
def test_target_policy_value_matches_the_hand_computation(policy):
    t = _units()
    cfg = ScoreConfig(target_policy=policy, target_column="pi_target" if policy == "column" else None)
    pi = target_probability(t, cfg, candidate_counts(t))
    w = t[un.OBSERVED].to_numpy() * pi / t["logged_p"].to_numpy()
    value = W.policy_value(w, t[un.LABEL].to_numpy())
    assert (value["ips"], value["snips"]) == pytest.approx(HAND[policy])


def test_candidates_are_distinct_responses_per_prompt():
    counts = candidate_counts(_units()).to_pydict()
    assert dict(zip(counts[un.PROMPT_ID], counts["n_candidates"], strict=True)) == {"A": 2, "B": 3, "C": 1}
    assert np.all(target_probability(_units(), ScoreConfig()) == 1)          # logging: weights as logged


def test_a_target_column_outside_0_1_is_refused_naming_it():
    t = _units().set_column(4, "pi_target", pa.array([0.5, 1.2, 0, 0, 1, 0, 1.0]))
    with pytest.raises(ValueError, match="score.target_column 'pi_target': 1 of 7"):
        target_probability(t, ScoreConfig(target_policy="column", target_column="pi_target"))


@pytest.mark.parametrize("extra", ['target_policy = "column"', 'target_column = "pi"', 'target_policy = "greedy"'])
def test_target_policy_settings_that_clash_are_refused(extra):
    with pytest.raises(ConfigError, match="key 'score"):
        parse_config(f'[input]\nimpressions = "x"\nsignals = "y"\n[score]\n{extra}\n')


@pytest.fixture(scope="module")
def exposure_log(tmp_path_factory) -> Path:
    """The hand log as impression and signal files, each round repeated 12 times (IPS and SNIPS are the same
    on the copies): an upvote is a click; impressions without one get label 0 (click-through framing)."""
    out = tmp_path_factory.mktemp("exposure")
    t0 = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    imps, sigs = [], []
    for copy in range(12):
        for i, (prompt, response, p0, reward, pi) in enumerate(LOG):
            iid = f"i{copy}-{i}"
            ts = t0 + dt.timedelta(minutes=copy * len(LOG) + i)
            imps.append({"impression_id": iid, "ts": ts.isoformat(), "user_id": f"u{(copy + i) % 5}",
                         "prompt_id": prompt, "response_id": response, "prompt": f"question {prompt}",
                         "response": f"answer {response} " + "word " * (i + copy % 3), "model_version": "m1",
                         "position": 0, "logged_p": p0, "pi_target": pi})
            if reward:
                sigs.append({"event_id": f"e{iid}", "impression_id": iid,
                             "ts": (ts + dt.timedelta(seconds=5)).isoformat(), "type": "upvote", "value": None})
    (out / "impressions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in imps))
    with gzip.open(out / "signals.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in sigs)
    return out


def _config(data: Path, **score_keys):
    text = config_text(data, fit={"categorical": ["model_version"], "folds": 2, "propensity_column": "logged_p",
                                  "max_rows": 1000}, ingest={"unobserved_label": 0.0}, score=score_keys)
    text = text.replace(f"{data}/impressions/*.parquet", f"{data}/impressions.jsonl")
    return parse_config(text.replace(f'truth = "{data}/truth.parquet"\n', ""))


@pytest.mark.parametrize("policy", ["uniform", "column"])
def test_the_score_stage_reports_the_target_policy_value(exposure_log: Path, tmp_path: Path, policy, hash_key):
    keys = {"target_policy": policy, **({"target_column": "pi_target"} if policy == "column" else {})}
    cfg = _config(exposure_log, **keys)
    run = RunDir(tmp_path / "run")
    ingest.execute(run, cfg)
    fit.execute(run, cfg)
    value = score.execute(run, cfg).to_manifest()["diagnostics"]["policy_value"]
    assert value["policy"] == policy and value["n"] == 12 * len(LOG)
    assert (value["ips"], value["snips"]) == pytest.approx(HAND[policy])
    t = read_dataset(
        run.path(rd.POINTWISE),
        ["prompt_id", "logged_p", "pi_target", pointwise.WEIGHT_IPS, pointwise.TARGET_DR, pointwise.IMPUTED, un.LABEL],
    )
    pi = {"A": 1 / 2, "B": 1 / 3, "C": 1.0}
    expected = (np.array([pi[x] for x in t["prompt_id"].to_pylist()]) if policy == "uniform"
                else t["pi_target"].to_numpy()) / t["logged_p"].to_numpy()
    np.testing.assert_allclose(t[pointwise.WEIGHT_IPS].to_numpy(), expected)
    # the DR target keeps the logging weights: a unit's reward does not depend on the policy
    w_log = 1 / np.maximum(t["logged_p"].to_numpy(), fitted_clip(run.path(rd.MODELS)))      # the floor fit chose
    imputed = t[pointwise.IMPUTED].to_numpy()
    np.testing.assert_allclose(t[pointwise.TARGET_DR].to_numpy(), imputed + w_log * (t[un.LABEL].to_numpy() - imputed))


def test_a_logging_policy_reports_the_logged_value(exposure_log: Path, tmp_path: Path, hash_key):
    cfg = _config(exposure_log)
    run = RunDir(tmp_path / "run")
    ingest.execute(run, cfg)
    fit.execute(run, cfg)
    value = score.execute(run, cfg).to_manifest()["diagnostics"]["policy_value"]
    r = np.array([row[3] for row in LOG], float)
    w = 1 / np.array([row[2] for row in LOG])
    assert value["policy"] == "logging"
    assert (value["ips"], value["snips"]) == pytest.approx((np.mean(w * r), np.sum(w * r) / np.sum(w)))


def test_a_target_column_with_a_bad_value_fails_score(exposure_log: Path, tmp_path: Path, hash_key):
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = (exposure_log / "impressions.jsonl").read_text().splitlines()
    first = json.loads(rows[0]) | {"pi_target": 1.5}
    (bad / "impressions.jsonl").write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    (bad / "signals.jsonl.gz").write_bytes((exposure_log / "signals.jsonl.gz").read_bytes())
    cfg = _config(bad, target_policy="column", target_column="pi_target")
    run = RunDir(tmp_path / "run")
    ingest.execute(run, cfg)
    fit.execute(run, cfg)
    with pytest.raises(GateError, match="score.target_column 'pi_target': 1 of 84"):
        score.execute(run, cfg)
