"""Votes of several raters: per-rater resolution, aggregation (latest, mean, majority, Beta prior), n_votes, soft
labels downstream, the simulator's raters_per_impression, and rater ids that never reach an output."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from estimators.losses import INPUTS, LOSSES, NOISE_AWARE, naive
from pipelines.ingest import votes_diagnostics
from pipelines.orchestration.cli import main
from pipelines.sources.simulator import _SEGMENT_LEANING, _SEGMENTS, SCENARIOS, SEGMENT, Scenario, simulate, write
from schemas import pairwise, pointwise
from schemas import quarantine as qr
from schemas import run_dir as rd
from schemas import signals as sig
from schemas import truth as tr
from schemas import units as un
from schemas.config import ScoreConfig, parse_config
from tests.conftest import HASH_KEY_ENV, config_text
from transforms.gates import raw_id_leaks
from transforms.join import MAJORITY_OF_VOTES, MEAN_OF_VOTES, build_units, resolve_labels
from transforms.privacy import pseudonym
from transforms.read import FILE_INDEX, ROW_NUMBER
from transforms.score import build_pairs
from transforms.validate import quarantine_rows

RULES = {"upvote": 1.0, "downvote": 0.0, "edit": "1 - value", "copy": 1.0, "regenerate": 0.0}
EXPLICIT = ["upvote", "downvote", "edit"]
OBSERVE = [*EXPLICIT, "copy", "regenerate"]


def _t(s: int) -> dt.datetime:
    return dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=s)


def _signals(rows) -> pl.DataFrame:
    """(impression, seconds, type, value, rater) rows; event ids in row order."""
    return pl.DataFrame([(f"e{j:03d}", i, _t(s), t, v, u) for j, (i, s, t, v, u) in enumerate(rows)],
                        schema={"event_id": pl.String, "impression_id": pl.String, "ts": pl.Datetime("us", "UTC"),
                                "type": pl.String, "value": pl.Float64, "user_id": pl.String}, orient="row")


VOTES = _signals([
    ("a", 1, "upvote", None, "u1"), ("a", 5, "downvote", None, "u1"),    # u1 changes their mind: one vote, 0
    ("a", 2, "upvote", None, "u2"), ("a", 3, "upvote", None, "u3"),     # votes 0, 1, 1; the latest is u1's 0
    ("b", 1, "upvote", None, "u1"), ("b", 2, "downvote", None, "u2"),   # a tie
    ("c", 1, "edit", 0.25, "u1"), ("c", 2, "edit", 0.5, "u2"),          # soft votes 0.75 and 0.5
    ("d", 1, "copy", None, None), ("d", 2, "regenerate", None, None),   # implicit only: the latest, 0
    ("e", 1, "copy", None, None), ("e", 2, "downvote", None, "u9"),     # a vote wins over implicit signals
    ("f", 1, "click", None, "u1"),                                      # not a label-bearing type
])


def _resolved(aggregate: str, prior=None, signals: pl.DataFrame = VOTES) -> dict[str, tuple]:
    out = resolve_labels(signals, RULES, EXPLICIT, OBSERVE, aggregate=aggregate, prior=prior)
    return {r[un.IMPRESSION_ID]: (r[un.LABEL], r[un.LABEL_SOURCE], r[un.N_VOTES]) for r in out.to_dicts()}


def test_latest_is_the_last_vote_of_any_rater():
    assert _resolved("latest") == {"a": (0.0, "downvote", 3), "b": (0.0, "downvote", 2), "c": (0.5, "edit", 2),
                                   "d": (0.0, "regenerate", 0), "e": (0.0, "downvote", 1)}


def test_mean_averages_each_raters_latest_vote():
    got = _resolved("mean")
    assert got["a"] == pytest.approx((2 / 3, MEAN_OF_VOTES, 3))          # the mind change is not a 4th vote
    assert got["b"] == (0.5, MEAN_OF_VOTES, 2) and got["c"] == (0.625, MEAN_OF_VOTES, 2)
    assert got["d"] == (0.0, "regenerate", 0) and got["e"] == (0.0, "downvote", 1)
    assert "f" not in got


def test_majority_breaks_ties_at_one_half_and_soft_votes_count_for_their_side():
    got = _resolved("majority")
    assert got["a"] == (1.0, MAJORITY_OF_VOTES, 3) and got["b"] == (0.5, MAJORITY_OF_VOTES, 2)
    assert got["c"] == (1.0, MAJORITY_OF_VOTES, 2)           # 0.75 is an up vote, 0.5 abstains
    three_way = _signals([("x", 1, "upvote", None, "u1"), ("x", 2, "downvote", None, "u2"),
                          ("x", 3, "edit", 0.5, "u3")])
    assert _resolved("majority", signals=three_way)["x"][0] == 0.5


@pytest.mark.parametrize(("prior", "expected"), [((1.0, 1.0), (2 + 1) / (3 + 2)), ((2.0, 8.0), (2 + 2) / (3 + 10)),
                                                 ((0.5, 0.5), 2.5 / 4)])
def test_a_beta_prior_shrinks_the_mean_towards_its_own(prior, expected):
    got = _resolved("mean", prior)
    assert got["a"][0] == pytest.approx(expected)
    assert got["e"][0] == pytest.approx(prior[0] / (1 + sum(prior)))         # one down vote
    assert got["d"][0] == 0.0                                                 # implicit labels are not shrunk
    with pytest.raises(ValueError, match="prior"):
        _resolved("majority", prior)


def test_one_rater_per_unit_gives_the_same_labels_whatever_the_aggregate():
    """The default ('mean') changes nothing for logs with one rater per unit; 'majority' only hardens soft votes."""
    single = VOTES.filter(pl.col("user_id").is_in(["u1"]) | pl.col("user_id").is_null()).drop("user_id")
    latest = _resolved("latest", signals=single)
    assert latest == _resolved("mean", signals=single)
    assert latest["a"] == (0.0, "downvote", 1) and latest["c"] == (0.75, "edit", 1)
    assert _resolved("majority", signals=single) == {**latest, "c": (1.0, "edit", 1)}


def _impressions(ids_users: list[tuple[str, str]]) -> pl.DataFrame:
    n = len(ids_users)
    return pl.DataFrame({"impression_id": [i for i, _ in ids_users], "ts": [_t(0)] * n,
                         "user_id": [u for _, u in ids_users], "prompt_id": ["p"] * n,
                         "response_id": [f"r{j}" for j in range(n)], FILE_INDEX: [0] * n, ROW_NUMBER: list(range(n))})


def test_a_null_rater_is_the_impressions_user_and_no_rater_id_reaches_the_units():
    imps = _impressions([("a", "alice"), ("b", "bob"), ("z", "zoe")])
    sigs = _signals([
        ("a", 1, "upvote", None, None), ("a", 2, "downvote", None, "alice"),   # one rater: alice changed her mind
        ("a", 3, "upvote", None, "carol"),
        ("b", 1, "upvote", None, None),
    ])
    units = pl.from_arrow(build_units(imps, sigs, rules=RULES, explicit=EXPLICIT, observe=EXPLICIT,
                                      known_types=sorted(RULES), unobserved_label=None, hash_key=b"k",
                                      units_schema=un.units_schema(sorted(RULES)), aggregate="mean"))
    rows = {r[un.IMPRESSION_ID]: r for r in units.to_dicts()}
    assert (rows["a"][un.LABEL], rows["a"][un.N_VOTES]) == (0.5, 2)
    assert (rows["b"][un.LABEL], rows["b"][un.N_VOTES], rows["b"][un.LABEL_SOURCE]) == (1.0, 1, "upvote")
    assert (rows["z"][un.OBSERVED], rows["z"][un.N_VOTES], rows["z"][un.LABEL]) == (0, 0, None)
    assert units[un.N_VOTES].dtype == pl.Int32 and units[un.N_VOTES].null_count() == 0
    assert "user_id" not in units.columns
    assert not {"alice", "bob", "carol", "zoe"} & {v for c in units.columns if units[c].dtype == pl.String
                                                  for v in units[c].to_list()}


def test_old_logs_without_rater_ids_and_units_without_signals():
    imps = _impressions([("a", "alice"), ("b", "bob")])
    kw = {"rules": RULES, "explicit": EXPLICIT, "observe": EXPLICIT, "known_types": sorted(RULES),
          "unobserved_label": None, "hash_key": None, "units_schema": un.units_schema(sorted(RULES))}
    sigs = VOTES.filter(pl.col("impression_id") == "a").drop("user_id")     # every vote: the impression's user
    units = pl.from_arrow(build_units(imps, sigs, **kw)).sort(un.IMPRESSION_ID)
    assert units.select(un.LABEL, un.N_VOTES).rows() == [(0.0, 1), (None, 0)]
    empty = pl.from_arrow(build_units(imps, None, **kw))
    assert empty[un.N_VOTES].to_list() == [0, 0] and empty[un.OBSERVED].to_list() == [0, 0]
    click = pl.from_arrow(build_units(imps, None, **{**kw, "unobserved_label": 0.0}))   # click-through framing
    assert click[un.N_VOTES].to_list() == [0, 0] and click[un.LABEL].to_list() == [0.0, 0.0]


def test_the_votes_diagnostic_bins_units_by_their_votes(tmp_path):
    pq.write_table(pa.table({un.N_VOTES: pa.array([0, 0, 1, 2, 3, 5, 9], pa.int32())}), tmp_path / "part-0.parquet")
    cfg = parse_config('[input]\nimpressions = "i"\nsignals = "s"\n[ingest]\nprior = [1, 3]\n')
    got = votes_diagnostics(tmp_path, cfg)
    assert got["units_by_votes"] == {"0": 2, "1": 1, "2": 1, "3": 1, "4": 0, "5+": 2}
    assert got["mean_votes_of_voted_units"] == pytest.approx(20 / 5) and got["units_with_several_votes"] == 4
    assert (got["aggregate"], got["prior"]) == ("mean", [1.0, 3.0])


# --- soft labels downstream ---------------------------------------------------------------------------------------

def _loss_batch(label: torch.Tensor) -> dict[str, torch.Tensor | float]:
    n = label.numel()
    g = torch.Generator().manual_seed(0)
    return {"label": label, "observed": torch.tensor([1, 1, 0, 1, 1, 0, 1, 1][:n]),
            "weight": 1 + 3 * torch.rand(n, generator=g), "imputed": torch.rand(n, generator=g),
            "rho01": 0.2, "rho10": 0.1}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_takes_soft_labels_as_mixtures_of_hard_ones(name):
    """A soft label y is worth y of a 1 and 1 − y of a 0: every risk is affine in the labels (BCE is linear in its
    target, and so is the noise-corrected loss), which is what makes a mean of votes a valid target."""
    logits = torch.linspace(-2, 2, 8, dtype=torch.float64)
    y = torch.tensor([2 / 3, 0.25, float("nan"), 0.5, 1.0, float("nan"), 0.0, 1 / 3], dtype=torch.float64)
    hard1, hard0 = torch.where(y.isnan(), y, 1.0), torch.where(y.isnan(), y, 0.0)

    def risk(label):
        batch = _loss_batch(label)
        args = {k: batch[k] for k in (*INPUTS[name], *(("rho01", "rho10") if name in NOISE_AWARE else ()))}
        return LOSSES[name](logits, **args)

    for lam in (0.3, 0.8):
        mixed = torch.where(y.isnan(), y, lam * torch.ones_like(y))
        assert torch.isclose(risk(mixed), lam * risk(hard1) + (1 - lam) * risk(hard0), atol=1e-12)
    assert torch.isfinite(risk(y))


def test_a_soft_label_is_fitted_as_its_probability():
    """The BCE minimiser of a unit labelled 2/3 (two raters up, one down) is P = 2/3: its gradient is 0 there."""
    s = torch.tensor([math.log(2.0)], requires_grad=True)                     # logit(2/3)
    naive(s, torch.tensor([2 / 3]), torch.tensor([1])).backward()
    assert abs(float(s.grad)) < 1e-6


def test_pairs_from_soft_labels_keep_their_margin():
    units = pl.DataFrame({
        "prompt_id": ["p"] * 4, "impression_id": ["a", "b", "c", "d"], "prompt": ["P"] * 4,
        "ts": [_t(h) for h in range(4)], "response": ["A", "B", "C", "D"], "observed": [1, 1, 1, 1],
        "label": [1.0, 2 / 3, 1 / 3, 0.0], pointwise.WEIGHT_SNIPS: [1.0] * 4, pointwise.TARGET_DR: [0.5] * 4,
        pointwise.PROPENSITY: [0.5] * 4})
    pairs = pl.from_arrow(build_pairs(units, ScoreConfig(pairs="all", min_margin=0.5), "run"))
    assert sorted(pairs.select(pairwise.CHOSEN_ID, pairwise.REJECTED_ID).rows()) == [("a", "c"), ("a", "d"), ("b", "d")]
    assert pairs[pairwise.MARGIN].to_numpy() == pytest.approx(pairs[pairwise.CHOSEN_TARGET].to_numpy()
                                                        - pairs[pairwise.REJECTED_TARGET].to_numpy())
    assert sorted(pairs[pairwise.MARGIN].to_list()) == pytest.approx([2 / 3, 2 / 3, 1.0])


# --- the simulator's raters -----------------------------------------------------------------------------------

def test_the_simulator_adds_independent_raters_and_keeps_the_truth():
    one = Scenario(n_impressions=4000, seed=3, dirty_share=0.0, gold_share=0.0)
    three = replace(one, raters_per_impression=3)
    a, b = simulate(one), simulate(three)
    assert b.truth.equals(a.truth) and sig.RATER not in a.signals.column_names
    votes = pl.from_arrow(b.signals).filter(pl.col("type").is_in(["upvote", "downvote"]))
    users = pl.from_arrow(b.impressions).select("impression_id", pl.col("user_id").alias("own"))
    per = (votes.join(users, on="impression_id").group_by("impression_id")
           .agg(pl.col("user_id").n_unique().alias("raters"), (pl.col("user_id") == pl.col("own")).any().alias("own")))
    observed = int(np.sum(b.truth[tr.OBSERVED_TRUE].to_numpy()))
    assert per.height == observed and (per["raters"] == 3).all() and per["own"].all()
    # The raters' deciding votes: the impression's user's is label_noisy, the others' are independent of it.
    last = (votes.sort("ts").group_by(["impression_id", "user_id"]).agg(pl.col("type").last())
            .join(users, on="impression_id").with_columns((pl.col("type") == "upvote").alias("up")))
    truth = pl.from_arrow(b.truth).select("impression_id", tr.LABEL_NOISY, tr.REWARD_TRUE)
    own = last.filter(pl.col("user_id") == pl.col("own")).join(truth, on="impression_id")
    assert (own["up"].cast(pl.Int8) == own[tr.LABEL_NOISY]).all()
    others = last.filter(pl.col("user_id") != pl.col("own")).join(truth, on="impression_id")
    agree = float((others["up"].cast(pl.Int8) == others[tr.LABEL_NOISY]).mean())
    assert 0.5 < agree < 0.8, agree                     # both follow reward_true, with their own noise
    # ... and each follows the label model with their own segment's leaning: P(up) = (1 − ρ01) p + ρ10 (1 − p).
    imps = pl.from_arrow(b.impressions)
    segment = imps.group_by("user_id").agg(pl.col(SEGMENT).first())
    lean = dict(zip(_SEGMENTS.tolist(), (three.rater_leaning * _SEGMENT_LEANING).tolist(), strict=True))
    z_len = (np.log(imps["response"].str.split(" ").list.len().to_numpy()) - np.log(35)) / 0.5
    shown = imps.select("impression_id", pl.Series("z_len", z_len))
    expect = (others.join(segment, on="user_id").join(shown, on="impression_id")
              .with_columns(pl.col(SEGMENT).replace_strict(lean).alias("lean")))
    p = np.clip((expect[tr.REWARD_TRUE] + three.verbosity * expect["z_len"] + expect["lean"]).to_numpy(), 0.001,
                0.999)
    p_up = (1 - three.rho01) * p + three.rho10 * (1 - p)
    assert expect.height > 0.95 * others.height
    assert abs(expect["up"].mean() - p_up.mean()) < 0.04, (expect["up"].mean(), p_up.mean())
    with pytest.raises(ValueError, match="raters_per_impression"):
        Scenario(raters_per_impression=0)


# --- end to end -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rated(tmp_path_factory) -> tuple[Path, Path, set[str]]:
    """A small three-rater run, ingest to report, and every raw user id of its inputs."""
    tmp = tmp_path_factory.mktemp("votes")
    scenario = replace(SCENARIOS["three_raters"], n_impressions=1200, seed=11, dirty_share=0.01)
    logs = simulate(scenario)
    write(logs, tmp / "data", scenario=scenario)
    raw_ids = {u for t in (logs.impressions, logs.signals) for u in t["user_id"].to_pylist() if u}
    cfg = tmp / "cfg.toml"
    cfg.write_text(config_text(tmp / "data", ingest={"aggregate": "mean"},
                               fit={"folds": 2, "hash_features": 1024, "confounder_controls": 5}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HASH_KEY_ENV, "test-key")
        assert main(["run", str(cfg), str(tmp / "run"), "--stages", "ingest,fit,score,report"]) == 0
    return tmp / "run", tmp / "data", raw_ids


def test_three_raters_end_to_end_give_soft_labels_and_a_votes_table(rated):
    run, _, _ = rated
    units = pl.read_parquet(run / rd.UNITS / "*.parquet")
    obs = units.filter(pl.col(un.OBSERVED) == 1)
    assert (obs[un.N_VOTES] == 3).all() and (units.filter(pl.col(un.OBSERVED) == 0)[un.N_VOTES] == 0).all()
    thirds = obs[un.LABEL] * 3
    assert ((thirds - thirds.round()).abs() < 1e-9).all()
    assert set((thirds.round() / 3).unique().round(6)) == {0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0}
    votes = json.loads((run / rd.MANIFEST).read_text())["stages"]["ingest"]["diagnostics"]["votes"]
    assert votes["aggregate"] == "mean" and votes["units_by_votes"]["3"] == obs.height
    assert sum(votes["units_by_votes"].values()) == units.height
    points = pl.read_parquet(run / rd.POINTWISE / "*.parquet")
    assert un.N_VOTES in points.columns and points[un.N_VOTES].sum() == units[un.N_VOTES].sum()
    report = (run / rd.REPORT / "index.html").read_text()
    assert "Votes per unit" in report and f"<td>3</td><td>{obs.height}</td>" in report


def test_no_rater_id_reaches_any_output(rated):
    run, _, raw_ids = rated
    assert any(r.startswith("u") for r in raw_ids) and len(raw_ids) > 50
    quarantine = pl.read_parquet(run / rd.QUARANTINE / "*.parquet")
    bad_signals = quarantine.filter(pl.col("table") == "signals")[qr.RECORD]
    assert bad_signals.len() > 0 and bad_signals.str.contains('"user_hash":"[0-9a-f]{32}"').all()   # pseudonyms
    found = set()
    for path in run.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            assert "user_id" not in table.column_names, path
            for name in table.column_names:
                if pa.types.is_string(table.schema.field(name).type):
                    values = table[name].to_pylist()
                    found |= raw_ids & set(values)
                    found |= {u for v in values if v and "user_id" in v for u in raw_ids if u in v}
        elif path.suffix in (".json", ".html", ".toml", ".txt"):
            text = path.read_text()
            found |= {u for u in raw_ids if u in text}
    assert not found, sorted(found)[:5]


def test_a_raters_id_in_a_rejected_signal_becomes_its_pseudonym(tmp_path):
    """A signal's rater id goes the way of the impressions' user id: quarantine records carry the pseudonym, and
    the raw-id gate refuses a record that still names it."""
    raw = VOTES.head(2).with_columns(pl.lit(0).alias(FILE_INDEX), pl.int_range(2).alias(ROW_NUMBER))
    rows = quarantine_rows(raw, pl.Series(["orphan_signal"] * 2), "signals", ["s.jsonl"], b"key")
    records = rows[qr.RECORD].to_pylist()
    assert all(f'"user_hash":"{pseudonym("u1", b"key")}"' in r and "u1" not in r for r in records)   # hex: no 'u'
    pq.write_table(rows, tmp_path / "ok.parquet")
    assert raw_id_leaks({"quarantine": tmp_path}) is None
    leaked = rows.set_column(rows.schema.get_field_index(qr.RECORD), qr.RECORD,
                             pa.array([r.replace('"user_hash"', '"user_id"') for r in records]))
    pq.write_table(leaked, tmp_path / "ok.parquet")
    assert "raw user id" in raw_id_leaks({"quarantine": tmp_path})


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ingest", "needles"), [
    ({"aggregate": "avg"}, ("ingest.aggregate", "'latest', 'mean' or 'majority'")),
    ({"prior": [0, 1]}, ("ingest.prior", "a > 0 and b > 0")),
    ({"prior": [1, -2.5]}, ("ingest.prior", "a > 0 and b > 0")),
    ({"prior": [1, 1], "aggregate": "majority"}, ("ingest.prior", "aggregate = 'mean'")),
    ({"prior": [1, 1], "aggregate": "latest"}, ("ingest.prior", "aggregate = 'mean'")),
    ({"other_types": ["votes"]}, ("ingest", "n_votes")),
])
def test_bad_aggregation_settings_exit_2_naming_the_key(tmp_path, capsys, hash_key, ingest, needles):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(tmp_path / "data", ingest=ingest))
    assert main(["run", str(cfg), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err
