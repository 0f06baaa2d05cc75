"""Score stage: apply the fitted models to every unit in Beam, write the pointwise and pairwise datasets."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from estimators import weights as W
from estimators.diagnostics import summary
from estimators.drift import breaches, compare, profile, signal_counts
from estimators.fitted import FittedModels
from estimators.propensity import logged_propensity
from schemas import pairwise, pointwise
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config, ScoreConfig, WeightsConfig
from schemas.errors import GateError, InputError
from schemas.manifest import dataset_sha256, describe_inputs
from schemas.run_dir import RunDir
from schemas.stages import ScoreCounts, ScoreResult
from schemas.storage import (
    commit_dir,
    count_rows,
    ensure_part,
    parquet_files,
    read_dataset,
    staging_dir,
)
from schemas.suites import pairwise_suite, pointwise_suite
from transforms import score as sc
from transforms.gates import gate_failures, prefetch_gx, raw_id_leaks
from transforms.read import ReadParts
from transforms.runner import pipeline
from transforms.shuffle import decode_table
from transforms.write import WriteBucketParts, WriteJson

PAIR_BUCKET_UNITS = 250_000
"""Units per prompt bucket of the pair builder, at most on average: the number of buckets grows with the data
(never below ``score.buckets``), so that one bucket's self-join fits in memory however many units there are."""


def pair_buckets(n_units: int, cfg: ScoreConfig) -> int:
    """How many prompt buckets (and pairwise part files) the pair builder uses for ``n_units`` units."""
    return max(cfg.buckets, -(-n_units // PAIR_BUCKET_UNITS))


def build(p: beam.Pipeline, cfg: Config, *, unit_files: Sequence[str], models_dir: str, pointwise_schema,
          run_id: str, pointwise_dir: str, pairwise_dir: str, scratch_dir: str, n_buckets: int,
          excluded_path: str | None = None, weighting: sc.Weighting | None = None) -> None:
    """units → scored row groups (spilled under ``scratch_dir``) + the global sums → pointwise, one row group at a
    time; the pair inputs bucketed by prompt (``n_buckets``) → pairs per bucket (spilled) + their global sum →
    pairwise. Only file paths and sums go through the runner's shuffles and side inputs, so no step holds more
    than one row group or one prompt bucket, whatever the size of the data (docs/performance.md).
    Each worker loads the fitted models from ``models_dir`` (``FittedModels``), the floor included.
    Under ``fit.positivity = "exclude"`` the units without overlap are dropped before any weight is normalised,
    and their numbers (units, observed units) are written to ``excluded_path``."""
    spill = {name: f"{scratch_dir}/{name}" for name in ("scored", "pair_inputs", "pairs")}
    for folder in spill.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    scored = (p | "ReadUnits" >> ReadParts(list(unit_files), groups=True)
              | "Score" >> beam.ParDo(sc.ScoreBatches(models_dir, fit=cfg.fit, run_id=run_id, spill_dir=spill["scored"],
                                                      weighting=weighting)))
    totals = (scored | "ObservedWeights" >> beam.Map(lambda b: ((b.part, b.group), b.weights))
              | "SumWeights" >> beam.CombineGlobally(sc.ExactSums(2)))
    sides = {"totals": beam.pvalue.AsSingleton(totals)}
    if cfg.weights.stabilize == "monotone":       # normalised and capped with the global (Σw, Σw², n)
        sums = (scored | "StabilizedWeights" >> beam.Map(lambda b: ((b.part, b.group), b.stabilized))
                | "SumStabilized" >> beam.CombineGlobally(sc.ExactSums(3)))
        sides["sums"] = beam.pvalue.AsSingleton(sums)
    pair_inputs = (scored | "KeyByPart" >> beam.Map(lambda b: (b.part, b))
                   | "GroupParts" >> beam.GroupByKey()
                   | "WritePointwise" >> beam.ParDo(
                       sc.WritePointwisePart(pointwise_dir, pointwise_schema, cfg.output, score=cfg.score,
                                             stabilize=cfg.weights.stabilize,
                                             max_variance=cfg.weights.max_weight_variance, pair_buckets=n_buckets,
                                             spill_dir=spill["pair_inputs"]), **sides))
    raw_pairs = (pair_inputs
                 | "GroupPrompts" >> beam.GroupByKey()
                 | "BuildPairs" >> beam.ParDo(sc.BuildPairs(cfg.score, run_id, spill["pairs"])))
    pair_totals = (raw_pairs | "PairWeights" >> beam.Map(lambda r: (r[0], r[2]))
                   | "SumPairWeights" >> beam.CombineGlobally(sc.ExactSums(2)))
    written = [
        raw_pairs
        | "NormalisePairs" >> beam.Map(
            lambda r, tot=None: (r[0], [sc.normalise_pairs(decode_table(r[1]), tot)]),
            tot=beam.pvalue.AsSingleton(pair_totals))
        | "WritePairwise" >> beam.ParDo(
            WriteBucketParts(pairwise_dir, pairwise.SCHEMA, [pairwise.PROMPT_ID, pairwise.CHOSEN_ID,
                                                             pairwise.REJECTED_ID], cfg.output, partitioned=True))
    ]
    if cfg.fit.positivity == "exclude":
        written.append(scored | "CountNoOverlap" >> beam.Map(lambda b: ((b.part, b.group), b.no_overlap))
                       | "SumNoOverlap" >> beam.CombineGlobally(sc.ExactSums(2))
                       | "NoOverlapDoc" >> beam.Map(lambda c: {"units": int(c[0]), "observed": int(c[1])})
                       | "WriteNoOverlap" >> beam.ParDo(WriteJson(excluded_path)))
    # One terminal step that every sink feeds (the pointwise writer feeds the pairs): a runner that computes only
    # the graph's last step (Beam 2.77's DaskRunner) still writes everything.
    _ = tuple(written) | "Written" >> beam.Flatten()


def execute(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> ScoreResult:
    unit_files = [str(f) for f in parquet_files(run.path(rd.UNITS))]
    models_dir = run.path(rd.MODELS)
    fitted = FittedModels.load(models_dir)       # every file fit wrote, checked before a unit is read
    fitted_column = fitted.weighting.get("propensity_column")
    if fitted_column != cfg.fit.propensity_column:
        raise InputError(f"{models_dir}: fitted with propensity_column = {fitted_column!r}, but the config says "
                         f"{cfg.fit.propensity_column!r}; re-run the fit stage")
    if cfg.fit.propensity_column:
        check_logged_propensity(unit_files, cfg.fit.propensity_column)
    wt = score_weighting(unit_files, fitted.weighting, cfg)
    schema = pointwise.pointwise_schema(pq.read_schema(unit_files[0]))
    # Both datasets are staged in one folder and replace datasets/ in one commit: a reader never sees a new
    # pointwise dataset beside an old pairwise one, and a killed run leaves the previous pair in place.
    final = run.path(rd.DATASETS)
    final_pw, final_pr = run.path(rd.POINTWISE), run.path(rd.PAIRWISE)
    tmp = staging_dir(final)
    tmp_pw, tmp_pr = tmp / final_pw.name, tmp / final_pr.name
    tmp_pw.mkdir()
    tmp_pr.mkdir()
    excluded_path = tmp / "_no_overlap.json"               # removed before the commit: not part of datasets/
    scratch = tmp / "_scratch"                              # spilled row groups and pairs, removed before the commit
    n_units = count_rows(run.path(rd.UNITS))
    prefetch_gx()                                         # imported while the pipeline runs, for the gates
    try:
        with pipeline(beam_args) as p:
            build(p, cfg, unit_files=unit_files, models_dir=str(models_dir), pointwise_schema=schema,
                  run_id=run.run_id, pointwise_dir=str(tmp_pw), pairwise_dir=str(tmp_pr), scratch_dir=str(scratch),
                  n_buckets=pair_buckets(n_units, cfg.score), excluded_path=str(excluded_path), weighting=wt)
        shutil.rmtree(scratch)
        ensure_part(tmp_pw, schema, cfg.output)                 # empty datasets are still datasets
        ensure_part(tmp_pr, pairwise.SCHEMA, cfg.output)
        n_points = count_rows(tmp_pw)
        overlap = overlap_diagnostics(tmp_pw, excluded_path, fitted.positivity, cfg)
        excluded_path.unlink(missing_ok=True)
        if n_units != n_points + overlap["excluded"]:
            raise RuntimeError(f"score lost units: {n_units} in, {n_points} out, {overlap['excluded']} excluded "
                               "for lack of overlap")
        diagnostics = weight_diagnostics(tmp_pw, fitted.clip, cfg.score, cfg.weights)
        diagnostics["positivity"] = overlap
        ess_share = diagnostics[pointwise.WEIGHT_IPS]["ess_share"]
        floor = cfg.weights.ips_min_ess_share
        if ess_share < floor:
            raise GateError(f"score: degenerate weights: the Kish ESS of the IPS weights is {ess_share:.4g} of the "
                            f"observed units, below weights.ips_min_ess_share = {floor:g}; the previous datasets are "
                            "left in place")
        output_gates(tmp_pw, tmp_pr, cfg.score.min_margin)
        diagnostics["drift"] = drift_check(tmp_pw, fitted.reference, cfg)
        content = {rd.POINTWISE: dataset_sha256(tmp_pw), rd.PAIRWISE: dataset_sha256(tmp_pr)}
        commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ScoreResult(inputs=describe_inputs(unit_files), outputs=[str(final_pw), str(final_pr)],
                       content_sha256=content,
                       counts=ScoreCounts(units=n_units, pointwise=n_points, excluded_no_overlap=overlap["excluded"],
                                          pairs=count_rows(final_pr)),
                       diagnostics=diagnostics)


def output_gates(pointwise_dir: Path, pairwise_dir: Path, min_margin: float) -> None:
    """The Great Expectations gates on the staged datasets, and no raw user id in either: a dataset that fails
    is not committed (exit code 2) and the previous one stays."""
    leaked = raw_id_leaks({rd.POINTWISE: pointwise_dir, rd.PAIRWISE: pairwise_dir})
    if leaked:
        raise GateError(f"score: {leaked}")
    for name, path, suite in ((rd.POINTWISE, pointwise_dir, pointwise_suite()),
                              (rd.PAIRWISE, pairwise_dir, pairwise_suite(min_margin))):
        if not count_rows(path):
            continue
        failures = gate_failures(parquet_files(path), suite)
        if failures:
            raise GateError(f"score: the {name} gate failed ({len(failures)} expectations): " + "; ".join(failures))


def score_weighting(unit_files: Sequence[str], fitted: dict[str, Any], cfg: Config) -> sc.Weighting:
    """The stabiliser's map from ``weights.json`` and the target policy's inputs, checked before scoring: a
    monotone stabiliser needs a fit that saved its map; a uniform target counts each prompt's candidate responses
    over every unit (a prompt-level figure no single batch has); a target column must exist and hold
    probabilities."""
    score = cfg.score
    monotone = None
    if cfg.weights.stabilize == "monotone":
        saved = fitted.get("stabilizer") or {}
        if saved.get("method") != "monotone":
            raise InputError("weights.stabilize = 'monotone', but the models were fitted without the monotone map; "
                             "re-run the fit stage")
        monotone = (saved["thresholds_x"], saved["thresholds_y"])
    candidates = None
    if score.target_policy == "uniform":
        candidates = sc.candidate_counts(ds.dataset(list(unit_files), format="parquet").to_table(
            columns=[un.PROMPT_ID, un.RESPONSE_ID]))
    elif score.target_policy == "column":
        if score.target_column not in pq.read_schema(unit_files[0]).names:
            raise InputError(f"{unit_files[0]}: score.target_column '{score.target_column}' is not in the units")
        t = ds.dataset(list(unit_files), format="parquet").to_table(columns=[score.target_column])
        try:
            sc.target_probability(t, score)
        except ValueError as e:
            raise GateError(f"score: {e}") from e
    return sc.Weighting(score=score, monotone=monotone, candidates=candidates)


def check_logged_propensity(unit_files: Sequence[str], column: str) -> None:
    """Every unit's logged propensity in (0, 1], checked from the data before scoring (exit code 2 if not)."""
    t = ds.dataset(list(unit_files), format="parquet").to_table(columns=[column])
    try:
        logged_propensity(t[column].to_numpy(zero_copy_only=False), column)
    except ValueError as e:
        raise GateError(f"score: {e}") from e


def drift_check(pointwise_dir: Path, reference: dict[str, Any] | None, cfg: Config) -> dict[str, Any] | None:
    """The scored units against the profile of the data the models were fitted on (``models/reference.json``;
    None for models fitted before it existed). A breach of a ``[drift]`` bound fails the stage (exit code 2,
    the previous datasets stay) when ``drift.gate`` is on; either way it is recorded."""
    if reference is None:
        return None
    t = read_dataset(pointwise_dir, [pointwise.PROPENSITY, un.OBSERVED, un.LABEL,
                                     *(un.count_column(k) for k in cfg.ingest.known_types)])
    day = profile(t[pointwise.PROPENSITY].to_numpy(), t[un.OBSERVED].to_numpy(),
                  t[un.LABEL].to_numpy(zero_copy_only=False).astype(float),
                  signal_counts(t, cfg.ingest.known_types), edges=reference["propensity_edges"])
    values = compare(reference, day)
    bounds = {"propensity_psi": cfg.drift.max_propensity_psi, "label_rate_shift": cfg.drift.max_label_rate_shift,
              "signal_mix_shift": cfg.drift.max_signal_mix_shift}
    failed = breaches(values, bounds)
    if failed and cfg.drift.gate:
        raise GateError(f"score: drift against the fit window {reference['first_day']}..{reference['last_day']}: "
                        + "; ".join(failed) + " (drift.gate = true; the previous datasets are left in place)")
    return {**values, "bounds": bounds, "breaches": failed, "gate": cfg.drift.gate,
            "reference": {k: reference[k] for k in ("first_day", "last_day", "units", "label_rate", "signal_mix")},
            "day": {k: day[k] for k in ("units", "label_rate", "signal_mix")}}


def overlap_diagnostics(pointwise_dir: Path, excluded_path: Path, positivity: dict[str, Any] | None, cfg: Config,
                        ) -> dict[str, Any]:
    """Units without overlap (``overlap_violation``): flagged in the written pointwise dataset, or, under
    ``fit.positivity = "exclude"``, counted by the pipeline as they were left out; with the strata fit found
    (``positivity``: the fit's overlap check, None for models fitted before it)."""
    check = positivity or {}
    out: dict[str, Any] = {"mode": cfg.fit.positivity, "floor": check.get("floor", cfg.fit.positivity_floor),
                           "violated": [{k: r[k] for k in ("column", "value", "why")}
                                        for r in check.get("violated", [])]}
    if cfg.fit.positivity == "exclude":
        counted = json.loads(excluded_path.read_text())
        return {**out, "flagged": 0, "excluded": counted["units"], "excluded_observed": counted["observed"]}
    t = read_dataset(pointwise_dir, [un.OBSERVED, pointwise.OVERLAP_VIOLATION])
    flag = t[pointwise.OVERLAP_VIOLATION].to_numpy(zero_copy_only=False).astype(bool)
    return {**out, "flagged": int(flag.sum()),
            "flagged_observed": int((flag & (t[un.OBSERVED].to_numpy() == 1)).sum()), "excluded": 0}


def weight_diagnostics(pointwise_dir: Path, clip: float, score: ScoreConfig | None = None,
                       weights: WeightsConfig | None = None) -> dict[str, Any]:
    """ESS, clipping (at ``clip``, the floor fit chose), concentration and tail index of the weights actually
    written (read back from the dataset), and the value of the policy the IPS weights evaluate
    (``score.target_policy``)."""
    score, weights = score or ScoreConfig(), weights or WeightsConfig()
    t = read_dataset(
        pointwise_dir,
        [
            un.OBSERVED,
            un.LABEL,
            pointwise.PROPENSITY,
            pointwise.WEIGHT_IPS,
            pointwise.WEIGHT_CLIPPED,
            pointwise.WEIGHT_SNIPS,
            pointwise.WEIGHT_STABILIZED,
        ],
    )
    o = t[un.OBSERVED].to_numpy() == 1
    p = t[pointwise.PROPENSITY].to_numpy()
    out: dict[str, Any] = {"n_observed": int(o.sum()), "clip": clip, "clipped": int(np.sum(o & (p < clip))),
                           "propensity": summary(p)}
    for name in (pointwise.WEIGHT_IPS, pointwise.WEIGHT_CLIPPED, pointwise.WEIGHT_SNIPS, pointwise.WEIGHT_STABILIZED):
        w = t[name].to_numpy()[o]
        tail = W.hill_tail_index(w)
        out[name] = {"ess": W.kish_ess(w), "ess_share": W.kish_ess(w) / max(1, o.sum()),
                     "top1pct_share": W.top_share(w), "tail_index": tail if np.isfinite(tail) else None,
                     **summary(w)}
    ws = t[pointwise.WEIGHT_STABILIZED].to_numpy()[o]
    out[pointwise.WEIGHT_STABILIZED].update(          # variance of the weights scaled to mean 1 (what the cap bounds)
        method=weights.stabilize, variance=float(np.var(ws / ws.mean())) if ws.size else None,
        max_weight_variance=weights.max_weight_variance if weights.stabilize == "monotone" else None)
    label = t[un.LABEL].to_numpy(zero_copy_only=False).astype(float)
    out["policy_value"] = {"policy": score.target_policy, "column": score.target_column,
                           **W.policy_value(t[pointwise.WEIGHT_IPS].to_numpy(), label),
                           "clipped": W.policy_value(t[pointwise.WEIGHT_CLIPPED].to_numpy(), label)}
    return out
