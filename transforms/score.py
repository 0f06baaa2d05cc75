"""Score units with the fitted models, then build the pairwise dataset (docs/estimators.md).

Pure table functions (``add_scores``, ``add_snips``, ``build_pairs``) do the work and are unit-tested
directly; the DoFns only load models once per worker and call them, as Beam's RunInference does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import apache_beam as beam
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from estimators import positivity as pos
from estimators import weights as W
from estimators.calibration import apply_calibration
from estimators.confounding import deconfound
from estimators.crossfit import predict_by_fold
from estimators.features import design, structured_columns, treatment_values
from estimators.fitted import FittedModels
from estimators.noise import corrected_target, posterior_clean
from estimators.propensity import logged_propensity
from schemas import pairwise, pointwise
from schemas import units as un
from schemas.config import FitConfig, OutputConfig, ScoreConfig
from schemas.hashing import fold_of
from schemas.storage import PartWriter, part_name
from transforms.join import split_by_bucket
from transforms.shuffle import decode_table, spill_table


@dataclass(frozen=True)
class Weighting:
    """What ``add_scores`` needs beyond the fitted models: the ``[score]`` DR variant and target policy, the fit
    stage's monotone map (thresholds of q(p̂), ``weights.json``; given exactly when ``weights.stabilize`` is
    'monotone') and, for a uniform target, each prompt's number of candidate responses (:func:`candidate_counts`
    over every unit, computed before scoring)."""

    score: ScoreConfig = field(default_factory=ScoreConfig)
    monotone: tuple[list[float], list[float]] | None = None
    candidates: pa.Table | None = None


CANDIDATES = "n_candidates"


def candidate_counts(table: pa.Table) -> pa.Table:
    """(prompt_id, n_candidates): the number of distinct responses logged for each prompt, the action set a
    uniform target policy draws from."""
    counts = table.select([un.PROMPT_ID, un.RESPONSE_ID]).group_by(un.PROMPT_ID).aggregate(
        [(un.RESPONSE_ID, "count_distinct")])
    return counts.rename_columns([un.PROMPT_ID, CANDIDATES])


def target_probability(table: pa.Table, score: ScoreConfig, candidates: pa.Table | None = None) -> np.ndarray:
    """π_target(response | prompt) of each unit: 1 for the logging policy (weights as logged), 1 / the prompt's
    candidate count for a uniform target, or the ``score.target_column`` values (which must lie in [0, 1])."""
    n = table.num_rows
    if score.target_policy == "logging":
        return np.ones(n)
    if score.target_policy == "column":
        pi = table[score.target_column].to_numpy(zero_copy_only=False).astype(float)
        bad = ~np.isfinite(pi) | (pi < 0) | (pi > 1)
        if bad.any():
            raise ValueError(f"score.target_column '{score.target_column}': {int(bad.sum())} of {n} values are "
                             f"missing or outside [0, 1] (e.g. {pi[bad][0]!r})")
        return pi
    if candidates is None:
        raise ValueError("score.target_policy = 'uniform' needs the prompts' candidate counts")
    idx = pc.index_in(table[un.PROMPT_ID], value_set=candidates[un.PROMPT_ID])
    if idx.null_count:
        raise ValueError(f"{idx.null_count} units' prompts are missing from the candidate counts")
    return 1.0 / candidates[CANDIDATES].take(idx).to_numpy().astype(float)


def add_scores(table: pa.Table, models: FittedModels, *, fit: FitConfig, run_id: str,
               weighting: Weighting | None = None) -> pa.Table:
    """Units → units + propensity, IPS/clipped weights (floored at the fitted ``models.clip``), imputation and DR
    pseudo-outcome, fold, run id.

    Each unit is scored by the fold model that did not see it (fold = salted hash of its id), so the scores
    of the units in the fit sample are out-of-fold, as in :func:`estimators.crossfit.crossfit`. The weight
    columns carry π_target (``score.target_policy``); the DR targets keep the logging weights, since a unit's
    reward does not depend on the policy. ``weight_stabilized`` holds its raw value here (see add_stabilized).
    """
    wt = weighting or Weighting()
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
    w_clip = W.clipped(o, p, models.clip)
    pi = target_probability(table, wt.score, wt.candidates)
    stabilized = pi * (W.monotone_weights(o, p, *wt.monotone) if wt.monotone is not None else w_clip)
    w_dr = W.dr_weights(w_clip, variant=wt.score.dr_variant, tau=wt.score.switch_tau, lam=wt.score.shrink_lambda)
    treatments = {e["treatment"]: treatment_values(frame, e["treatment"]) for e in models.confounders}
    dr = W.dr_pseudo_outcome(label, o, w_dr, imputed)
    clean = clean_targets(models, dr=dr, label=label, observed=o, imputed=imputed,
                          structured=X[:, structured_columns(models.featurizer)].toarray(), fold=fold,
                          treatments=treatments)
    cols = {
        pointwise.PROPENSITY: p,
        pointwise.WEIGHT_IPS: pi * W.ips(o, p),
        pointwise.WEIGHT_CLIPPED: pi * w_clip,
        pointwise.WEIGHT_SNIPS: np.full(n, np.nan),          # needs the global normaliser: see add_snips
        pointwise.WEIGHT_STABILIZED: stabilized,             # monotone: normalised globally, see add_stabilized
        pointwise.IMPUTED: imputed,
        pointwise.TARGET_DR: dr,
        **clean,
        pointwise.OVERLAP_VIOLATION: overlap_violation(models, frame, p, fit),
        pointwise.FOLD: fold,
        pointwise.RUN_ID: np.full(n, run_id, dtype=object),
    }
    for f in pointwise.SCORE_FIELDS:
        table = table.append_column(f, pa.array(cols[f.name], f.type))
    return table


def clean_targets(models: FittedModels, *, dr: np.ndarray, label: np.ndarray, observed: np.ndarray, imputed: np.ndarray,
                  structured: np.ndarray, fold: np.ndarray, treatments: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The clean-reward columns: with the audit's calibrators (``estimators.calibration``), the unit's clean
    reward ĉ(r, x) (observed) or ĥ(x) (not), which is then also the target: each stratum of the observed flag is
    calibrated on its own audited units, so no inverse-propensity weight is needed; with flip rates, the
    class-conditional correction (r − ρ10)/(1 − ρ01 − ρ10) of the DR target (unbiased, not clipped: clipping would
    bias its mean), the corrected imputation clipped to [0, 1] as π = P(r* = 1 | x), and for rated units the
    posterior P(r* = 1 | r, x) from π (``estimators.noise.posterior_clean``).

    Under calibration the deconfounded target is the calibrated one: the audit already maps the label's
    confounder-driven part (e.g. verbosity bias) to r*, so removing the label's confounder effects again would
    count them twice."""
    if models.calibration is not None:
        reward, imputed_clean = apply_calibration(models.calibration, imputed, structured, label, observed, fold)
        return {
            pointwise.TARGET_NOISE_CORRECTED: reward,
            pointwise.TARGET_DECONFOUNDED: reward,
            pointwise.REWARD_CLEAN: reward,
            pointwise.IMPUTED_CLEAN: imputed_clean,
        }
    rho01, rho10 = models.flip_rates.rho01, models.flip_rates.rho10
    imputed_clean = np.clip(corrected_target(imputed, rho01, rho10), 0, 1)
    rated = posterior_clean(label, imputed_clean, rho01, rho10)
    return {
        pointwise.TARGET_NOISE_CORRECTED: corrected_target(dr, rho01, rho10),
        pointwise.TARGET_DECONFOUNDED: corrected_target(deconfound(dr, treatments, models.confounders), rho01, rho10),
        pointwise.REWARD_CLEAN: np.where(observed == 1, rated, imputed_clean),
        pointwise.IMPUTED_CLEAN: imputed_clean,
    }


def overlap_violation(models: FittedModels, frame, propensity: np.ndarray, fit: FitConfig) -> np.ndarray:
    """Units without overlap: p̂ below the floor the fit stage checked with, or a value of a categorical column in
    a stratum that failed there (models fitted before the check: the configured floor only)."""
    check = models.positivity or {"floor": fit.positivity_floor, "violated": []}
    strata = {c: frame[c].to_numpy() for c in frame.columns if c in {r["column"] for r in check["violated"]}}
    return pos.violation_mask(strata, propensity, check["violated"], floor=check["floor"])


def overlap_counts(table: pa.Table) -> tuple[int, int]:
    """(units, observed units) without overlap in one scored batch."""
    flag = table[pointwise.OVERLAP_VIOLATION].to_numpy(zero_copy_only=False).astype(bool)
    return int(flag.sum()), int((flag & (table[un.OBSERVED].to_numpy() == 1)).sum())


def drop_overlap_violations(table: pa.Table) -> pa.Table:
    """The scored units with overlap (``fit.positivity = "exclude"``): the others leave every weighted output."""
    return table.filter(pc.invert(table[pointwise.OVERLAP_VIOLATION]))


def observed_weight_sum(table: pa.Table) -> tuple[float, int]:
    """(Σ weight_clipped over observed units, number of observed units) of one batch."""
    o = table[un.OBSERVED].to_numpy() == 1
    return float(table[pointwise.WEIGHT_CLIPPED].to_numpy()[o].sum()), int(o.sum())


def add_snips(table: pa.Table, totals: tuple[float, int]) -> pa.Table:
    """Fill ``weight_snips`` with the clipped weights self-normalised by the *global* observed mean."""
    o = table[un.OBSERVED].to_numpy()
    w = W.self_normalise(table[pointwise.WEIGHT_CLIPPED].to_numpy(), o, total=totals[0], n_observed=totals[1])
    i = table.schema.get_field_index(pointwise.WEIGHT_SNIPS)
    return table.set_column(i, table.schema.field(i), pa.array(w, pa.float64()))


def stabilized_sums(table: pa.Table) -> tuple[float, float, int]:
    """(Σw, Σw², n) of the raw ``weight_stabilized`` over one batch's observed units."""
    return W.weight_sums(table[pointwise.WEIGHT_STABILIZED].to_numpy(), table[un.OBSERVED].to_numpy())


def _exact(x) -> int | Fraction | str:
    """A number as an exact value: an int, a float as the fraction it is, a non-finite float as its name."""
    if isinstance(x, (int, np.integer)):
        return int(x)
    return Fraction(float(x)) if np.isfinite(x) else repr(float(x))


class ExactSums(beam.CombineFn):
    """Element-wise sums of the ``width``-tuples of numbers (weight sums and counts) of ``(key, tuple)`` elements,
    each key counted once and exactly.

    Exactly: each float is added as the fraction it is and the total rounded once, so the sum does not depend on
    the order in which a runner combines partial results, and every runner and partitioning writes the same
    weights, to the bit (non-finite values are summed apart, as floats). Once: a key (a row group, a prompt
    bucket) seen again with the same numbers is the same batch replayed, not another one (Beam 2.77's DaskRunner
    hands a side input's combiner some elements more than once); the same key with other numbers is an error.
    Empty input gives zeros."""

    def __init__(self, width: int):
        self._width = width

    def create_accumulator(self) -> dict:
        return {}

    @staticmethod
    def _put(acc: dict, key, values: tuple) -> None:
        if acc.setdefault(key, values) != values:
            raise ValueError(f"two different sums for batch {key!r}: {acc[key]} and {values}")

    def add_input(self, acc: dict, element) -> dict:
        key, values = element
        self._put(acc, key, tuple(_exact(x) for x in values))
        return acc

    def merge_accumulators(self, accumulators) -> dict:
        out: dict = {}
        for acc in accumulators:
            for key, values in acc.items():
                self._put(out, key, values)
        return out

    def extract_output(self, acc: dict) -> tuple:
        exact, special = [0] * self._width, [0.0] * self._width
        for values in acc.values():
            for i, v in enumerate(values):
                if isinstance(v, str):
                    special[i] += float(v)
                else:
                    exact[i] += v
        return tuple(int(e) if isinstance(e, int) and sp == 0 else float(e) + sp for e, sp in zip(exact, special,
                                                                                                strict=True))


def exact_sums(values: Iterable[tuple], width: int) -> tuple:
    """:class:`ExactSums` over ``values`` (one batch each) in one process: what the pipeline computes."""
    fn = ExactSums(width)
    return fn.extract_output(fn.merge_accumulators([fn.add_input(fn.create_accumulator(), (i, v))
                                                    for i, v in enumerate(values)]))


def add_stabilized(table: pa.Table, sums: tuple[float, float, int] | None = None, *, method: str,
                   max_variance: float) -> pa.Table:
    """Finish ``weight_stabilized``: weight_clipped as it is ('none'), weight_snips ('snips'), or the raw monotone
    weights self-normalised and blended toward 1 under the variance cap with the *global* sums ('monotone')."""
    if method == "none":
        return table
    i = table.schema.get_field_index(pointwise.WEIGHT_STABILIZED)
    if method == "snips":
        w = table[pointwise.WEIGHT_SNIPS].to_numpy()
    else:
        w, _ = W.cap_variance(table[pointwise.WEIGHT_STABILIZED].to_numpy(), table[un.OBSERVED].to_numpy(),
                              max_variance=max_variance, sums=sums)
    return table.set_column(i, table.schema.field(i), pa.array(w, pa.float64()))


def build_pairs(units: pl.DataFrame, cfg: ScoreConfig, run_id: str) -> pa.Table:
    """Preference pairs within each prompt whose targets differ by at least ``cfg.min_margin``.

    ``pair_target = "label"`` pairs observed units by their label, weighted by their SNIPS weights;
    ``"target_dr"`` pairs every unit by its DR pseudo-outcome (already bias-corrected, unit weight 1).
    The raw pair weight (product or min of the unit weights) is normalised later over all pairs.
    """
    target = pl.col(un.LABEL) if cfg.pair_target == "label" else pl.col(pointwise.TARGET_DR)
    unit_weight = pl.col(pointwise.WEIGHT_SNIPS) if cfg.pair_target == "label" else pl.lit(1.0)
    df = units.filter(pl.col(un.OBSERVED) == 1) if cfg.pair_target == "label" else units
    # A pair without texts is no use to a trainer (TRL reads prompt/chosen/rejected as they are).
    df = df.filter(pl.col(un.PROMPT).is_not_null() & pl.col(un.RESPONSE).is_not_null() & target.is_not_null())
    df = df.select(
        un.PROMPT_ID,
        un.IMPRESSION_ID,
        un.TS,
        un.PROMPT,
        un.RESPONSE,
        pointwise.PROPENSITY,
        target.alias("t"),
        unit_weight.alias("w"),
    )
    pairs = (df.join(df, on=un.PROMPT_ID, suffix="_r")
             .filter((pl.col("t") - pl.col("t_r")) >= max(cfg.min_margin, 1e-12))
             .with_columns((pl.col("t") - pl.col("t_r")).alias(pairwise.MARGIN)))
    pairs = pairs.sort([un.PROMPT_ID, pairwise.MARGIN, un.IMPRESSION_ID, f"{un.IMPRESSION_ID}_r"],
                       descending=[False, True, False, False])     # widest margins first, ties by id
    if cfg.pairs != "all":
        keep = 1 if cfg.pairs == "best_vs_worst" else cfg.max_pairs_per_prompt
        pairs = pairs.group_by(un.PROMPT_ID, maintain_order=True).head(keep)
    combine = (pl.col("w") * pl.col("w_r")) if cfg.pair_weight == "product" else pl.min_horizontal("w", "w_r")
    out = pairs.select(
        pl.col(un.PROMPT_ID),
        pl.min_horizontal(un.TS, f"{un.TS}_r").alias(pairwise.TS),
        pl.col(un.PROMPT).alias(pairwise.PROMPT),
        pl.col(un.RESPONSE).alias(pairwise.CHOSEN),
        pl.col(f"{un.RESPONSE}_r").alias(pairwise.REJECTED),
        pl.col(un.IMPRESSION_ID).alias(pairwise.CHOSEN_ID),
        pl.col(f"{un.IMPRESSION_ID}_r").alias(pairwise.REJECTED_ID),
        pl.col("t").alias(pairwise.CHOSEN_TARGET),
        pl.col("t_r").alias(pairwise.REJECTED_TARGET),
        pl.col(pointwise.PROPENSITY).alias(pairwise.CHOSEN_PROPENSITY),
        pl.col(f"{pointwise.PROPENSITY}_r").alias(pairwise.REJECTED_PROPENSITY),
        pl.col(pairwise.MARGIN),
        combine.alias(pairwise.WEIGHT),
        pl.lit(run_id).alias(pairwise.RUN_ID),
    )
    return out.to_arrow().cast(pairwise.SCHEMA)


def pair_weight_sum(table: pa.Table) -> tuple[float, int]:
    return float(np.sum(table[pairwise.WEIGHT].to_numpy())), table.num_rows


def normalise_pairs(table: pa.Table, totals: tuple[float, int]) -> pa.Table:
    """Pair weights divided by their global mean, so they average 1 over all pairs."""
    total, count = totals
    mean = total / count if count and total > 0 else 1.0
    i = table.schema.get_field_index(pairwise.WEIGHT)
    return table.set_column(i, table.schema.field(i), pa.array(table[pairwise.WEIGHT].to_numpy() / mean, pa.float64()))


PAIR_COLUMNS = (un.PROMPT_ID, un.IMPRESSION_ID, un.TS, un.PROMPT, un.RESPONSE, pointwise.PROPENSITY, un.OBSERVED,
                un.LABEL, pointwise.TARGET_DR, pointwise.WEIGHT_SNIPS)


def pair_inputs(table: pa.Table, cfg: ScoreConfig) -> pa.Table:
    """The columns (and, for label pairs, the observed rows) of the scored units that :func:`build_pairs` reads:
    what travels to the pair builder instead of the whole pointwise table."""
    t = table.select(list(PAIR_COLUMNS))
    return t.filter(pc.equal(t[un.OBSERVED], 1)) if cfg.pair_target == "label" else t


@dataclass(frozen=True)
class ScoredBatch:
    """One scored row group of a units part, spilled to ``path`` (Arrow IPC), with its shares of the global sums:
    units (and observed units) without overlap before any exclusion, (Σ weight_clipped, n) over the observed
    units kept, and (Σw, Σw², n) of the raw weight_stabilized. Only this small record travels through the
    runner; the rows stay in the file until the part is written."""

    part: int
    group: int
    path: str
    no_overlap: tuple[int, int]
    weights: tuple[float, int]
    stabilized: tuple[float, float, int]


class ScoreBatches(beam.DoFn):
    """((part, row group), units table) → :class:`ScoredBatch`: the units scored (:func:`add_scores`), those without
    overlap dropped under ``fit.positivity = "exclude"``, the result spilled under ``spill_dir``. The fitted models
    are loaded once per worker in ``setup`` (``FittedModels.load``: the path travels with the DoFn, not the
    models), as Beam's RunInference does."""

    def __init__(self, models_dir: Path | str, *, fit: FitConfig, run_id: str, spill_dir: str,
                 weighting: Weighting | None = None):
        self._models_dir, self._fit, self._run_id = str(models_dir), fit, run_id
        self._spill, self._weighting = spill_dir, weighting
        self._models: FittedModels | None = None

    def setup(self):
        self._models = FittedModels.load(self._models_dir)

    def process(self, element):
        (part, group), table = element
        scored = add_scores(table, self._models, fit=self._fit, run_id=self._run_id, weighting=self._weighting)
        no_overlap = overlap_counts(scored)
        if self._fit.positivity == "exclude":
            scored = drop_overlap_violations(scored)
        yield ScoredBatch(part, group, spill_table(scored, self._spill, part), no_overlap,
                          observed_weight_sum(scored), stabilized_sums(scored))


class WritePointwisePart(beam.DoFn):
    """(part, [ScoredBatch]) → the part's pointwise file(s), one row group at a time in the units part's row order
    (ingest writes it sorted by impression_id), with the global SNIPS normaliser ``totals`` and, for a monotone
    stabiliser, the global ``sums`` (side inputs). What it emits is each finished row group's pair inputs
    (:func:`pair_inputs`), bucketed by prompt and spilled, as (bucket, path): memory holds one row group, however
    large the part. (One output only: Beam 2.77's DaskRunner mixes a ParDo's tagged outputs.)"""

    def __init__(self, directory: str, schema: pa.Schema, output: OutputConfig, *, score: ScoreConfig,
                 stabilize: str, max_variance: float, pair_buckets: int, spill_dir: str):
        self._dir, self._schema, self._output, self._score = directory, schema, output, score
        self._stabilize, self._max_variance = stabilize, max_variance
        self._pair_buckets, self._spill = pair_buckets, spill_dir

    def process(self, element, totals, sums=None):
        part, batches = element
        writer = PartWriter(self._dir, part_name(part), self._schema, self._output, self._output.partition_by)
        for batch in sorted(batches, key=lambda b: b.group):
            table = decode_table(batch.path)
            if not table.num_rows:
                continue
            table = add_stabilized(add_snips(table, totals), sums, method=self._stabilize,
                                   max_variance=self._max_variance)
            writer.write(table)
            rows = pair_inputs(table, self._score)
            for bucket, sub in split_by_bucket(rows, rows[un.PROMPT_ID], self._pair_buckets):
                yield bucket, spill_table(sub, self._spill, bucket)
        writer.close()


class BuildPairs(beam.DoFn):
    """(bucket of prompt_id, [pair-input tables or their spilled paths]) → (bucket, raw pairs table spilled under
    ``spill_dir``, (Σ weight, n pairs)): the sums make the global normaliser without reading the pairs again."""

    def __init__(self, cfg: ScoreConfig, run_id: str, spill_dir: str):
        self._cfg, self._run_id, self._spill = cfg, run_id, spill_dir

    def process(self, element):
        bucket, tables = element
        tables = [t for t in map(decode_table, tables) if t.num_rows]
        if tables:
            pairs = build_pairs(pl.from_arrow(pa.concat_tables(tables)), self._cfg, self._run_id)
            if pairs.num_rows:
                yield bucket, spill_table(pairs, self._spill, bucket), pair_weight_sum(pairs)
