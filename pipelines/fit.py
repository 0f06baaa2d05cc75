"""Fit stage: cross-fitted, calibrated propensity and imputation models on a sample of units (docs/estimators.md).

"Fit small, score big": models are fitted here on at most ``fit.max_rows`` units (stratified by observed),
saved as one ``models/`` folder (``estimators.fitted.FittedModels``: skops and JSON), and applied to every unit
by the score stage. The policy (noise model, propensity floor, stabiliser map) lives in ``estimators``; this
module reads the units, calls it, and writes what it decided.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from estimators import nuisance
from estimators import positivity as pos
from estimators import weights as W
from estimators.balance import balance_table
from estimators.calibration import Calibration, calibrated_mean, check_audit, fit_calibration
from estimators.confounding import ConfounderEffect, confounder_controls
from estimators.crossfit import Crossfit, Job, crossfit_jobs, predict_by_fold
from estimators.diagnostics import auc, expected_calibration_error, summary
from estimators.drift import profile, signal_counts
from estimators.features import RESPONSE_LENGTH, design, input_columns, structured_columns, treatment_values
from estimators.fitted import FittedModels
from estimators.noise import noise_model, unidentified_warning
from estimators.propensity import logged_propensity
from estimators.sampling import sample_units
from estimators.sensitivity import weighted_vs_naive_ratio
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config, FitConfig
from schemas.errors import ConfigError, GateError, InputError
from schemas.hashing import fold_of
from schemas.manifest import describe_inputs
from schemas.run_dir import RunDir
from schemas.stages import FitCounts, FitResult
from schemas.storage import atomic_dir, parquet_files, read_dataset

logger = logging.getLogger(__name__)


def clean_reward_model(imputed: np.ndarray, structured: np.ndarray, label: np.ndarray, observed: np.ndarray,
                       gold: np.ndarray, fold: np.ndarray, fc: FitConfig) -> tuple[Calibration, dict[str, Any]]:
    """The audit's calibration of the clean reward (E[r* | label, x] for rated units, E[r* | x] for the others)
    cross-fitted on the sample, and its population mean with a CI that includes the calibration's own
    uncertainty. An audit too small to calibrate on is a ConfigError (exit 2): 'auto' only calibrates when it
    is big enough."""
    try:
        check_audit(gold, observed, fc.min_audit)
    except ValueError as e:
        raise ConfigError(f"fit.noise = 'calibrate': {e} (fit.min_audit = {fc.min_audit}); choose another "
                          "fit.noise") from e
    make = lambda: nuisance.calibration_model(fc)  # noqa: E731
    cal = fit_calibration(make, imputed, structured, label, observed, gold, fold)
    try:
        mean = calibrated_mean(make, cal, imputed, structured, label, observed, gold, seed=fc.seed)
    except ValueError as e:
        raise GateError(f"fit: clean-reward calibration: {e}") from e
    return cal, mean


def confounder_effects(X, featurizer, frame, label: np.ndarray, observed: np.ndarray, weights: np.ndarray,
                       fc: FitConfig) -> list[dict[str, Any]]:
    """DML effect (95% CI) of each configured confounder on the label of the observed units of the sample;
    with ``fit.confounder_weighting = "ipw"`` weighted by their clipped inverse propensities. Each carries
    EconML's robustness values (``rv_estimate``, ``rv_ci``) and its bounds at ``fit.confounder_benchmark``."""
    effects = []
    for name in fc.confounders:
        controls = confounder_controls(X, featurizer, numeric=fc.numeric, treatment=name,   # of the observed units
                                       n_components=fc.confounder_controls, random_state=fc.seed, rows=observed)
        t = treatment_values(frame, name)
        try:
            est = ConfounderEffect(model=fc.confounder_model, benchmark=fc.confounder_benchmark,
                                   random_state=fc.seed).fit(
                label[observed], t[observed], controls,
                sample_weight=weights[observed] if fc.confounder_weighting == "ipw" else None)
        except ValueError as e:
            raise GateError(f"fit: confounder '{name}': {e}") from e
        effects.append({"treatment": name, "scale": "log" if name == RESPONSE_LENGTH else "identity",
                        **est.to_dict()})
    return effects


def selection_evalue(label: np.ndarray, observed: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """The E-value of the selection correction: RR = weighted (clipped IPS, self-normalised) / naive mean label
    of the sample's observed units, with its delta-method CI (``estimators.sensitivity``). A label rate of 0
    has no ratio: then the reason is recorded instead (fit does not fail over a diagnostic)."""
    try:
        return {"supported": True, **weighted_vs_naive_ratio(label[observed], weights[observed])}
    except ValueError as e:
        return {"supported": False, "reason": str(e)}


def manifest_weighting(weighting: dict[str, Any]) -> dict[str, Any]:
    """weights.json for the manifest: the monotone map's thresholds stay in the file (hundreds of numbers), the
    figures about them are kept."""
    stab = weighting.get("stabilizer")
    if not stab:
        return weighting
    return {**weighting, "stabilizer": {k: v for k, v in stab.items() if not k.startswith("thresholds_")}
            | {"thresholds": len(stab["thresholds_x"])}}


def positivity_check(frame, observed: np.ndarray, propensity: np.ndarray, fc: FitConfig,
                     ) -> tuple[dict[str, Any], np.ndarray]:
    """Overlap per value of each ``fit.categorical`` column and in the propensity tail, on the sample's
    (out-of-fold or logged) propensities (``estimators.positivity``), and which sample units lack it. Failed
    strata are a warning under ``fit.positivity = "warn"`` and "exclude", and fail the stage (exit code 2) under
    "fail"."""
    strata = {c: frame[c].to_numpy() for c in fc.categorical}
    table = pos.strata_table(strata, observed, propensity, floor=fc.positivity_floor,
                             min_observed=fc.min_stratum_observed, max_tail_share=fc.positivity_max_tail_share)
    violated = pos.violated_strata(table)
    flagged = pos.violation_mask(strata, propensity, violated, floor=fc.positivity_floor)
    out = {"mode": fc.positivity, "floor": fc.positivity_floor, "min_stratum_observed": fc.min_stratum_observed,
           "max_tail_share": fc.positivity_max_tail_share, "strata_checked": len(table) - 1,
           "violated": violated, "tail": table[-1], "sample_units_flagged": int(flagged.sum()),
           "sample_observed_flagged": int((flagged & (observed == 1)).sum()), "strata": table}
    if violated and fc.positivity == "fail":
        raise GateError(f"fit: positivity: overlap fails in {pos.describe(violated)} (fit.positivity = 'fail'; "
                        "'warn' keeps and flags these units, 'exclude' drops them from the weighted outputs)")
    if fc.positivity == "exclude" and flagged.all():
        raise GateError(f"fit: positivity: no unit of the sample has overlap ({pos.describe(violated)}), so "
                        "fit.positivity = 'exclude' would leave nothing to weight")
    if violated:
        logger.warning(f"fit: overlap fails in {pos.describe(violated)}; fit.positivity = {fc.positivity!r}: their "
                       "units are " + ("flagged in overlap_violation" if fc.positivity == "warn"
                                       else "left out of the datasets by score"),
                       extra={"stage": "fit", "event": "positivity"})
    return out, flagged


def reference_profile(sample: pa.Table, propensity: np.ndarray, observed: np.ndarray, label: np.ndarray, cfg: Config,
                      ) -> dict[str, Any]:
    """The drift reference of the fitted models: the sample's profile and the UTC dates its units span."""
    span = pc.min_max(sample[un.TS])          # the first and last instants' days: a day string per unit took 0.4 s
    day = {end: pc.strftime(span[end], format="%Y-%m-%d").as_py() for end in ("min", "max")}
    return {"first_day": day["min"], "last_day": day["max"],
            **profile(propensity, observed, label, signal_counts(sample, cfg.ingest.known_types))}


@contextmanager
def timed(seconds: dict[str, float], part: str) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[part]``: the manifest's account of where fit spends its time."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[part] = round(seconds.get(part, 0.0) + time.perf_counter() - start, 3)


def outcome_job(X, y: np.ndarray, observed: np.ndarray, structured: list[int], fc: FitConfig) -> Job:
    """The one cross-fit behind both the imputation model and the noise proxy, on the observed units: the model
    they both name, or the ``boosted`` one when they differ (the ``logistic`` one is its linear stage)."""
    model = fc.imputation_model if fc.noise_proxy == fc.imputation_model else "boosted"
    return Job(nuisance.imputation_model(fc, structured, model=model), y, observed)


def outcome_models(result: Crossfit, X, fold: np.ndarray, fc: FitConfig) -> tuple[tuple[np.ndarray, list], np.ndarray]:
    """(imputation out-of-fold scores, its fold models) and the noise proxy's out-of-fold scores from
    :func:`outcome_job`'s cross-fit. When one is ``logistic`` and the other ``boosted``, the logistic one is the
    boosted one's linear stage: the same regression on the same rows (``ImputationModel.linear_part``)."""
    fitted = (result.oof, result.models)
    if fc.noise_proxy == fc.imputation_model:
        return fitted, result.oof
    linear_models = [m.linear_part() for m in result.models]
    linear = (predict_by_fold(linear_models, X, fold), linear_models)
    return (fitted, linear[0]) if fc.imputation_model == "boosted" else (linear, result.oof)


def execute(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> FitResult:
    fc = cfg.fit
    units = read_dataset(run.path(rd.UNITS))
    missing = [c for c in input_columns(text=fc.text, numeric=fc.numeric, categorical=fc.categorical)
               if c not in units.column_names]
    if missing:
        raise InputError(f"{run.path(rd.UNITS)}: feature column '{missing[0]}' named in [fit] is not in the units")
    observed_all = units[un.OBSERVED].to_numpy()
    if fc.propensity_column and fc.propensity_column not in units.column_names:
        raise InputError(f"{run.path(rd.UNITS)}: fit.propensity_column '{fc.propensity_column}' is not in the units")
    if observed_all.min() == observed_all.max() and not fc.propensity_column:
        raise InputError(f"{run.path(rd.UNITS)}: every unit has observed = {observed_all[0]}; a propensity of "
                         "observation cannot be fitted (click-through logs need fit.propensity_column)")
    sample = sample_units(units, fc.max_rows)
    o = sample[un.OBSERVED].to_numpy().astype(int)
    label = sample[un.LABEL].to_numpy(zero_copy_only=False)
    fold = fold_of(sample[un.IMPRESSION_ID], fc.folds)

    seconds: dict[str, float] = {}
    with timed(seconds, "featurize"):
        frame = design(sample, fc)
        featurizer = nuisance.featurizer(fc)   # built where the skops allow-list test builds them (estimators.nuisance)
        X = featurizer.fit_transform(frame).tocsr()         # the text is hashed once, for every model below
    structured = structured_columns(featurizer)
    y = np.nan_to_num(label.astype(float))
    obs = o == 1
    jobs = {"outcome": outcome_job(X, y, obs, structured, fc)}
    if fc.propensity_column:
        try:
            p_oof, p_models = logged_propensity(
                sample[fc.propensity_column].to_numpy(zero_copy_only=False), fc.propensity_column), None
        except ValueError as e:
            raise GateError(f"fit: {e}") from e
    else:
        jobs["propensity"] = Job(nuisance.propensity_model(fc, structured), o)
    with timed(seconds, "nuisance_models"):     # both models' folds on one pool of threads
        fitted = dict(zip(jobs, crossfit_jobs(list(jobs.values()), X, fold, n_jobs=fc.n_jobs), strict=True))
        if "propensity" in fitted:
            p_oof, p_models = fitted["propensity"].oof, fitted["propensity"].models
        (m_oof, m_models), proxy_oof = outcome_models(fitted["outcome"], X, fold, fc)
    model_seconds = {name: round(f.seconds, 3) for name, f in fitted.items()}
    overlap, no_overlap = positivity_check(frame, o, p_oof, fc)

    gold = sample[un.LABEL_GOLD].to_numpy(zero_copy_only=False).astype(float) \
        if un.LABEL_GOLD in sample.column_names else np.full(len(o), np.nan)
    with timed(seconds, "noise_model"):
        flips, noise_diag = noise_model(proxy_oof, y, gold, obs, fc)
    if warning := unidentified_warning(flips):
        logger.warning(f"fit: {warning}", extra={"event": "flip_rates_not_identified"})
    weighting = {**W.choose_clip(o, p_oof, cfg.weights), "propensity_column": fc.propensity_column}
    w_clip = W.clipped(o.astype(float), p_oof, weighting["clip"])

    def effects_of_confounders():
        return confounder_effects(X, featurizer, frame, y, obs, w_clip, fc)

    # The confounder effects and the clean-reward calibration need only what is fitted above: with a second
    # thread they run side by side, and "confounders" is the wall time they add once the calibration is done.
    with ThreadPoolExecutor(1, thread_name_prefix="fit-confounders") as side:
        pending = side.submit(effects_of_confounders) if fc.n_jobs != 1 else None
        calibration = None
        if flips.method == "calibrate":
            with timed(seconds, "clean_reward_calibration"):
                calibration, calibrated = clean_reward_model(m_oof, X[:, structured].toarray(), y, o, gold, fold, fc)
            ppi = noise_diag.get("mean_reward", {}).get("ppi")
            if ppi is not None:              # the same audit's PPI interval is the reference the calibration must meet
                calibrated["agrees_with_ppi"] = bool(calibrated["ci_low"] <= ppi["ci_high"]
                                                     and ppi["ci_low"] <= calibrated["ci_high"])
                if not calibrated["agrees_with_ppi"]:
                    logger.warning(f"fit: the calibrated mean clean reward {calibrated['estimate']:.4f} "
                                   f"[{calibrated['ci_low']:.4f}, {calibrated['ci_high']:.4f}] and PPI's "
                                   f"{ppi['estimate']:.4f} [{ppi['ci_low']:.4f}, {ppi['ci_high']:.4f}] do not overlap: "
                                   "the calibrators may be misspecified",
                                   extra={"event": "calibration_disagrees_with_ppi"})
            noise_diag.setdefault("mean_reward", {})["calibrated"] = calibrated
        with timed(seconds, "confounders"):
            effects = pending.result() if pending is not None else effects_of_confounders()
    evalue = selection_evalue(y, obs, w_clip)
    balance = balance_table({c: treatment_values(frame, c) for c in fc.numeric}, o, w_clip)
    # The drift reference describes what score writes: under "exclude", the units with overlap only.
    keep = ~no_overlap if fc.positivity == "exclude" else np.ones(len(o), bool)
    reference = reference_profile(sample.filter(pa.array(keep)), p_oof[keep], o[keep], label[keep], cfg)
    fitted = FittedModels(featurizer=featurizer, propensity=p_models, imputation=m_models,
                          noise={**flips.to_dict(), **noise_diag}, weighting=weighting,
                          confounding={"effects": effects, "selection_evalue": evalue},
                          calibration=calibration.models() if calibration is not None else None,
                          positivity=overlap, reference=reference)
    with timed(seconds, "save"), atomic_dir(run.path(rd.MODELS)) as tmp:
        fitted.save(tmp)
    return FitResult(
        inputs=describe_inputs(parquet_files(run.path(rd.UNITS))),
        outputs=[str(run.path(rd.MODELS))],
        counts=FitCounts(units=units.num_rows, sample=sample.num_rows, sample_observed=int(obs.sum())),
        diagnostics={
            "propensity": {"auc": auc(p_oof, o), "ece": expected_calibration_error(p_oof, o),
                           "mean": float(p_oof.mean()), "observed_rate": float(o.mean()),
                           "distribution": summary(p_oof), "folds": fc.folds, "calibration": fc.calibration,
                           "source": f"column {fc.propensity_column}" if fc.propensity_column else "model"},
            "imputation": {"auc": auc(m_oof[obs], np.round(y[obs])),
                           "mse": float(np.mean((m_oof[obs] - y[obs]) ** 2))},
            "flip_rates": {**flips.to_dict(), **noise_diag},
            "weights": manifest_weighting(weighting),
            "positivity": {k: v for k, v in overlap.items() if k != "strata"},   # every stratum: models/positivity.json
            "confounders": effects,
            "selection_evalue": evalue,
            "balance": balance,
            "seconds": seconds,
            "model_seconds": model_seconds,
        },
    )
