import datetime as dt
from fractions import Fraction

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from schemas import pairwise, pointwise
from schemas.config import ScoreConfig
from transforms import score as sc
from transforms.score import add_snips, build_pairs, exact_sums, normalise_pairs


def _units() -> pl.DataFrame:
    return pl.DataFrame({
        "prompt_id": ["p", "p", "p", "p", "q", "q"],
        "impression_id": ["a", "b", "c", "d", "e", "f"],
        "prompt": ["P"] * 4 + ["Q"] * 2,
        "ts": [dt.datetime(2026, 11, 1, h, tzinfo=dt.UTC) for h in (1, 2, 3, 4, 5, 6)],
        "response": ["A", "B", "C", "D", "E", "F"],
        "observed": [1, 1, 1, 0, 1, 1],
        "label": [1.0, 0.0, 0.0, None, 1.0, 1.0],
        pointwise.WEIGHT_SNIPS: [2.0, 0.5, 1.0, 0.0, 1.0, 1.0],
        pointwise.TARGET_DR: [0.9, 0.1, 0.5, 0.6, 0.7, 0.2],
        pointwise.PROPENSITY: [0.5, 0.25, 0.2, 0.1, 0.4, 0.8],
    })


def test_all_pairs_by_label_with_product_weights():
    pairs = pl.from_arrow(build_pairs(_units(), ScoreConfig(min_margin=0.5), "run"))
    assert pairs.select(pairwise.CHOSEN_ID, pairwise.REJECTED_ID).rows() == [("a", "b"), ("a", "c")]
    assert pairs[pairwise.WEIGHT].to_list() == [1.0, 2.0] and pairs[pairwise.MARGIN].to_list() == [1.0, 1.0]
    assert pairs[pairwise.CHOSEN].to_list() == ["A", "A"] and pairs[pairwise.PROMPT].to_list() == ["P", "P"]
    assert (pairs[pairwise.CHOSEN_ID] != pairs[pairwise.REJECTED_ID]).all()
    assert pairs.select(pairwise.CHOSEN_PROPENSITY, pairwise.REJECTED_PROPENSITY).rows() == [(0.5, 0.25), (0.5, 0.2)]


def test_all_is_uncapped_capped_keeps_the_widest_and_pairs_need_texts():
    units = _units().with_columns(pl.when(pl.col("impression_id") == "c").then(None).otherwise(pl.col("response"))
                                  .alias("response"))
    every = pl.from_arrow(build_pairs(_units(), ScoreConfig(pairs="all", pair_target="target_dr", min_margin=0.0),
                                      "run"))
    assert every.filter(pl.col("prompt_id") == "p").height == 6          # 4 units: every ordered-by-target pair
    capped = pl.from_arrow(build_pairs(_units(), ScoreConfig(pairs="capped", pair_target="target_dr",
                                                             min_margin=0.0, max_pairs_per_prompt=2), "run"))
    assert capped.filter(pl.col("prompt_id") == "p")[pairwise.MARGIN].to_list() == pytest.approx([0.8, 0.5])
    no_text = pl.from_arrow(build_pairs(units, ScoreConfig(pairs="all", pair_target="target_dr", min_margin=0.0),
                                        "run"))
    assert "c" not in set(no_text[pairwise.CHOSEN_ID]) | set(no_text[pairwise.REJECTED_ID])
    assert no_text[pairwise.REJECTED].null_count() == 0 and no_text.height == 4


def test_dr_targets_pair_every_unit_and_respect_the_margin_and_cap():
    cfg = ScoreConfig(pair_target="target_dr", min_margin=0.3, max_pairs_per_prompt=2)
    pairs = pl.from_arrow(build_pairs(_units(), cfg, "run"))
    assert pairs.filter(pl.col("prompt_id") == "p").select(pairwise.CHOSEN_ID, pairwise.REJECTED_ID).rows() == [
        ("a", "b"), ("d", "b")]  # the two largest margins
    assert pairs.filter(pl.col("prompt_id") == "q").select(pairwise.CHOSEN_ID, pairwise.REJECTED_ID).rows() == [
        ("e", "f")
    ]
    assert (pairs[pairwise.MARGIN] >= 0.3 - 1e-12).all()
    best = pl.from_arrow(build_pairs(_units(), ScoreConfig(pair_target="target_dr", pairs="best_vs_worst",
                                                           min_margin=0.1), "run"))
    assert best.select(pairwise.CHOSEN_ID, pairwise.REJECTED_ID).rows() == [("a", "b"), ("e", "f")]


def test_min_rule_and_global_normalisation():
    pairs = build_pairs(_units(), ScoreConfig(min_margin=0.5, pair_weight="min"), "run")
    assert pairs[pairwise.WEIGHT].to_pylist() == [0.5, 1.0]
    normalised = normalise_pairs(pairs, (3.0, 4))                   # global mean 0.75 over 4 pairs
    np.testing.assert_allclose(normalised[pairwise.WEIGHT].to_numpy(), [0.5 / 0.75, 1.0 / 0.75])


def test_snips_uses_the_global_normaliser():
    t = pa.table({"observed": pa.array([1, 0, 1], pa.int8()), pointwise.WEIGHT_CLIPPED: [2.0, 0.0, 4.0],
                  pointwise.WEIGHT_SNIPS: [np.nan] * 3})
    out = add_snips(t, (12.0, 4))
    assert out[pointwise.WEIGHT_SNIPS].to_pylist() == [pytest.approx(2 / 3), 0.0, pytest.approx(4 / 3)]


def test_exact_sums_do_not_depend_on_order_and_count_a_replayed_batch_once():
    assert exact_sums([(1e16, 1), (1.0, 1), (-1e16, 1)], 2) == (1.0, 3)          # float addition would give 0.0
    fn = sc.ExactSums(2)
    one = fn.add_input(fn.create_accumulator(), ("x", (0.1, 1)))
    two = fn.add_input(fn.add_input(fn.create_accumulator(), ("y", (0.2, 1))), ("x", (0.1, 1)))   # x replayed
    assert fn.extract_output(fn.merge_accumulators([one, two])) == (float(Fraction(0.1) + Fraction(0.2)), 2)
    assert fn.extract_output(fn.merge_accumulators([two, one])) == fn.extract_output(fn.merge_accumulators([one, two]))
    with pytest.raises(ValueError, match="two different sums for batch 'x'"):
        fn.add_input(one, ("x", (0.3, 1)))
    assert fn.extract_output(fn.create_accumulator()) == (0, 0)
    inf = fn.extract_output(fn.add_input(fn.create_accumulator(), ("z", (float("inf"), 2))))
    assert inf == (float("inf"), 2)
