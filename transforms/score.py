"""Score units with the fitted models, then build the pairwise dataset (DESIGN §5).

Pure table functions (``add_scores``, ``add_snips``, ``build_pairs``) do the work and are unit-tested
directly; the DoFns only load models once per worker and call them, as Beam's RunInference does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import polars as pl
import pyarrow as pa

from estimators import persist
from estimators import weights as W
from estimators.confounding import deconfound
from estimators.crossfit import predict_by_fold
from estimators.features import feature_frame, input_columns, treatment_values
from estimators.noise import FlipRates, corrected_target
from estimators.propensity import logged_propensity
from schemas import pairwise as pr
from schemas import pointwise as pw
from schemas import units as un
from schemas.config import FitConfig, ScoreConfig
from schemas.hashing import fold_of
from transforms.io import decode_table


@dataclass(frozen=True)
class Models:
    featurizer: Any
    propensity: list | None             # None: the propensity is a logged column (see add_scores)
    imputation: list
    flip_rates: FlipRates
    confounders: list[dict]

    @classmethod
    def load(cls, paths: dict[str, str]) -> Models:
        flips = json.loads(Path(paths["noise"]).read_text())
        models = (persist.load(paths[k]) if k in paths else None for k in ("featurizer", "propensity", "imputation"))
        return cls(*models, flip_rates=FlipRates.from_dict(flips),
                   confounders=json.loads(Path(paths["confounding"]).read_text()))


def design(table: pa.Table, fit: FitConfig):
    """The featuriser's input frame, converting only the columns it reads (not every unit column)."""
    names = input_columns(text=fit.text, numeric=fit.numeric, categorical=fit.categorical)
    return feature_frame({c: table[c].to_numpy(zero_copy_only=False) for c in names if c in table.column_names},
                         text=fit.text, numeric=fit.numeric, categorical=fit.categorical)


def add_scores(table: pa.Table, models: Models, *, fit: FitConfig, clip: float, run_id: str) -> pa.Table:
    """Units → units + propensity, IPS/clipped weights, imputation and DR pseudo-outcome, fold, run id.

    Each unit is scored by the fold model that did not see it (fold = salted hash of its id), so the scores
    of the units in the fit sample are out-of-fold, as in :func:`estimators.crossfit.crossfit`.
    """
    n = table.num_rows
    fold = fold_of(table[un.IMPRESSION_ID], len(models.imputation))
    frame = design(table, fit)
    X = models.featurizer.transform(frame).tocsr()
    if models.propensity is None:
        p = logged_propensity(table[fit.propensity_column].to_numpy(zero_copy_only=False), fit.propensity_column)
    else:
        p = predict_by_fold(models.propensity, X, fold)
    imputed = predict_by_fold(models.imputation, X, fold)
    o = table[un.OBSERVED].to_numpy().astype(float)
    label = table[un.LABEL].to_numpy(zero_copy_only=False).astype(float)
    w_clip = W.clipped(o, p, clip)
    rho01, rho10 = models.flip_rates.rho01, models.flip_rates.rho10
    treatments = {e["treatment"]: treatment_values(frame, e["treatment"]) for e in models.confounders}
    cols = {
        pw.PROPENSITY: p,
        pw.WEIGHT_IPS: W.ips(o, p),
        pw.WEIGHT_CLIPPED: w_clip,
        pw.WEIGHT_SNIPS: np.full(n, np.nan),          # needs the global normaliser: see add_snips
        pw.IMPUTED: imputed,
        pw.TARGET_DR: (dr := W.dr_pseudo_outcome(label, o, w_clip, imputed)),
        pw.TARGET_NOISE_CORRECTED: corrected_target(dr, rho01, rho10),
        pw.TARGET_DECONFOUNDED: corrected_target(deconfound(dr, treatments, models.confounders), rho01, rho10),
        pw.FOLD: fold,
        pw.RUN_ID: np.full(n, run_id, dtype=object),
    }
    for f in pw.SCORE_FIELDS:
        table = table.append_column(f, pa.array(cols[f.name], f.type))
    return table


def observed_weight_sum(table: pa.Table) -> tuple[float, int]:
    """(Σ weight_clipped over observed units, number of observed units) of one batch."""
    o = table[un.OBSERVED].to_numpy() == 1
    return float(table[pw.WEIGHT_CLIPPED].to_numpy()[o].sum()), int(o.sum())


def sum_tuples(values: Iterable[tuple[float, int]]) -> tuple[float, int]:
    """Combiner for (sum, count) pairs; associative, so Beam may apply it to partial results."""
    total, count = 0.0, 0
    for s, c in values:
        total, count = total + s, count + c
    return total, count


def add_snips(table: pa.Table, totals: tuple[float, int]) -> pa.Table:
    """Fill ``weight_snips`` with the clipped weights self-normalised by the *global* observed mean."""
    o = table[un.OBSERVED].to_numpy()
    w = W.self_normalise(table[pw.WEIGHT_CLIPPED].to_numpy(), o, total=totals[0], n_observed=totals[1])
    i = table.schema.get_field_index(pw.WEIGHT_SNIPS)
    return table.set_column(i, table.schema.field(i), pa.array(w, pa.float64()))


def build_pairs(units: pl.DataFrame, cfg: ScoreConfig, run_id: str) -> pa.Table:
    """Preference pairs within each prompt whose targets differ by at least ``cfg.min_margin``.

    ``pair_target = "label"`` pairs observed units by their label, weighted by their SNIPS weights;
    ``"target_dr"`` pairs every unit by its DR pseudo-outcome (already bias-corrected, unit weight 1).
    The raw pair weight (product or min of the unit weights) is normalised later over all pairs.
    """
    target = pl.col(un.LABEL) if cfg.pair_target == "label" else pl.col(pw.TARGET_DR)
    unit_weight = pl.col(pw.WEIGHT_SNIPS) if cfg.pair_target == "label" else pl.lit(1.0)
    df = units.filter(pl.col(un.OBSERVED) == 1) if cfg.pair_target == "label" else units
    # A pair without texts is no use to a trainer (TRL reads prompt/chosen/rejected as they are).
    df = df.filter(pl.col(un.PROMPT).is_not_null() & pl.col(un.RESPONSE).is_not_null() & target.is_not_null())
    df = df.select(un.PROMPT_ID, un.IMPRESSION_ID, un.TS, un.PROMPT, un.RESPONSE, pw.PROPENSITY, target.alias("t"),
                   unit_weight.alias("w"))
    pairs = (df.join(df, on=un.PROMPT_ID, suffix="_r")
             .filter((pl.col("t") - pl.col("t_r")) >= max(cfg.min_margin, 1e-12))
             .with_columns((pl.col("t") - pl.col("t_r")).alias(pr.MARGIN)))
    pairs = pairs.sort([un.PROMPT_ID, pr.MARGIN, un.IMPRESSION_ID, f"{un.IMPRESSION_ID}_r"],
                       descending=[False, True, False, False])     # widest margins first, ties by id
    if cfg.pairs != "all":
        keep = 1 if cfg.pairs == "best_vs_worst" else cfg.max_pairs_per_prompt
        pairs = pairs.group_by(un.PROMPT_ID, maintain_order=True).head(keep)
    combine = (pl.col("w") * pl.col("w_r")) if cfg.pair_weight == "product" else pl.min_horizontal("w", "w_r")
    out = pairs.select(
        pl.col(un.PROMPT_ID), pl.min_horizontal(un.TS, f"{un.TS}_r").alias(pr.TS),
        pl.col(un.PROMPT).alias(pr.PROMPT), pl.col(un.RESPONSE).alias(pr.CHOSEN),
        pl.col(f"{un.RESPONSE}_r").alias(pr.REJECTED), pl.col(un.IMPRESSION_ID).alias(pr.CHOSEN_ID),
        pl.col(f"{un.IMPRESSION_ID}_r").alias(pr.REJECTED_ID), pl.col("t").alias(pr.CHOSEN_TARGET),
        pl.col("t_r").alias(pr.REJECTED_TARGET), pl.col(pw.PROPENSITY).alias(pr.CHOSEN_PROPENSITY),
        pl.col(f"{pw.PROPENSITY}_r").alias(pr.REJECTED_PROPENSITY), pl.col(pr.MARGIN), combine.alias(pr.WEIGHT),
        pl.lit(run_id).alias(pr.RUN_ID),
    )
    return out.to_arrow().cast(pr.PAIRWISE)


def pair_weight_sum(table: pa.Table) -> tuple[float, int]:
    return float(np.sum(table[pr.WEIGHT].to_numpy())), table.num_rows


def normalise_pairs(table: pa.Table, totals: tuple[float, int]) -> pa.Table:
    """Pair weights divided by their global mean, so they average 1 over all pairs."""
    total, count = totals
    mean = total / count if count and total > 0 else 1.0
    i = table.schema.get_field_index(pr.WEIGHT)
    return table.set_column(i, table.schema.field(i), pa.array(table[pr.WEIGHT].to_numpy() / mean, pa.float64()))


class AddScores(beam.DoFn):
    """(part, units table) → (part, scored table); models are loaded once per worker in ``setup``."""

    def __init__(self, model_paths: dict[str, str], *, fit: FitConfig, clip: float, run_id: str):
        self._paths, self._fit, self._clip, self._run_id = dict(model_paths), fit, clip, run_id
        self._models: Models | None = None

    def setup(self):
        self._models = Models.load(self._paths)

    def process(self, element):
        part, table = element
        yield part, add_scores(table, self._models, fit=self._fit, clip=self._clip, run_id=self._run_id)


class BuildPairs(beam.DoFn):
    """(bucket of prompt_id, [pointwise tables]) → (bucket, raw pairs table)."""

    def __init__(self, cfg: ScoreConfig, run_id: str):
        self._cfg, self._run_id = cfg, run_id

    def process(self, element):
        bucket, tables = element
        tables = [t for t in map(decode_table, tables) if t.num_rows]
        if tables:
            pairs = build_pairs(pl.from_arrow(pa.concat_tables(tables)), self._cfg, self._run_id)
            if pairs.num_rows:
                yield bucket, pairs
