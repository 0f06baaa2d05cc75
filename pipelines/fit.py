"""Fit stage: cross-fitted, calibrated propensity and imputation models on a sample of units (DESIGN §5).

"Fit small, score big": models are fitted here on at most ``fit.max_rows`` units (stratified by observed),
saved with skops, and applied to every unit by the score stage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from estimators import nuisance, persist
from estimators import weights as W
from estimators.balance import balance_table
from estimators.confounding import ConfounderEffect, confounder_controls
from estimators.crossfit import crossfit
from estimators.diagnostics import auc, expected_calibration_error, summary
from estimators.drift import profile, signal_counts
from estimators.features import RESPONSE_LENGTH, input_columns, structured_columns, treatment_values
from estimators.noise import FlipRates, anchor_flip_rates, audit_flip_rates, corrected_target, mean_ci, ppi_mean
from estimators.propensity import logged_propensity
from pipelines.manifest import describe_inputs
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config, FitConfig
from schemas.errors import ConfigError, GateError, InputError
from schemas.hashing import fold_of, sample_rank
from schemas.run_dir import RunDir
from transforms.io import atomic_dir, parquet_files, read_dataset
from transforms.score import design

FEATURIZER = "featurizer.skops"
PROPENSITY = "propensity.skops"
IMPUTATION = "imputation.skops"
CONFOUNDING = "confounding.json"
NOISE = "noise.json"
WEIGHTS = "weights.json"
REFERENCE = "reference.json"
"""The fit sample's profile (``estimators.drift.profile``) and date range: what later days are compared with."""


def stratified_sample(ids: np.ndarray, observed: np.ndarray, max_rows: int) -> np.ndarray:
    """Indices of at most ``max_rows`` units, the same share of each observed stratum, chosen by id hash."""
    if ids.size <= max_rows:
        return np.arange(ids.size)
    rank = sample_rank(ids)
    keep = []
    for o in (0, 1):
        idx = np.flatnonzero(observed == o)
        k = int(round(max_rows * idx.size / ids.size))
        keep.append(idx[np.argsort(rank[idx], kind="stable")[:k]])
    return np.sort(np.concatenate(keep))


def noise_model(scores: np.ndarray, label: np.ndarray, gold: np.ndarray, observed: np.ndarray,
                fc: FitConfig) -> tuple[FlipRates, dict[str, Any]]:
    """Flip rates for the noise-corrected target, and what else the labels say about noise.

    Anchors come from the noise proxy's out-of-fold P̂(r=1 | x) (``scores``) on the observed units; the audit from
    observed units that also carry a gold label (under "auto", only when its standard errors are at most
    ``fit.max_audit_se``). With gold labels on a uniformly random audit sample, the
    mean true reward also gets a prediction-powered estimate (the noise-corrected imputation over all units,
    rectified on the audited ones) beside the audit-only mean. Rates that cannot be corrected for, or an
    audit asked for but too small, fail the stage (exit code 2).
    """
    audited = observed & np.isfinite(gold)
    diag: dict[str, Any] = {"audited_units": int(np.isfinite(gold).sum()), "audited_observed": int(audited.sum())}
    estimates: dict[str, FlipRates | None] = {"anchor": None, "audit": None}
    errors: dict[str, str] = {}
    wanted = {"auto": ("anchor", "audit"), "anchor": ("anchor",), "audit": ("audit",), "none": ()}[fc.noise]
    for name in wanted:
        try:
            estimates[name] = (anchor_flip_rates(scores[observed], fc.anchor_quantile) if name == "anchor"
                               else audit_flip_rates(label[audited], gold[audited], fc.min_audit))
        except ValueError as e:
            errors[name] = str(e)
    if wanted and not any(estimates[n] for n in wanted):     # under "auto", one usable estimate is enough
        why = "; ".join(f"{k}: {v}" for k, v in errors.items())
        if fc.noise != "auto":                               # the configured method cannot run on these units
            raise ConfigError(f"fit.noise = {fc.noise!r} cannot be estimated on these units ({why}); choose "
                              "another fit.noise ('auto' falls back to the other method)")
        raise GateError(f"fit: flip rates ({fc.noise}): {why}")
    diag["estimates"] = {k: v.to_dict() if v else None for k, v in estimates.items()}
    diag["errors"] = errors
    audit = estimates["audit"]
    precise = audit is not None and max(audit.se01, audit.se10) <= fc.max_audit_se
    if fc.noise == "auto" and audit is not None and not precise and estimates["anchor"] is not None:
        audit = None                       # reported above, but too noisy to correct every target with
    chosen = audit or estimates["anchor"] or FlipRates(0.0, 0.0, method="none", n=0)
    gold_units = np.isfinite(gold)
    if gold_units.sum() >= 2 and (~gold_units).sum() >= 2:
        reward = np.clip(corrected_target(scores, chosen.rho01, chosen.rho10), 0, 1)
        diag["mean_reward"] = {"ppi": ppi_mean(gold[gold_units], reward[gold_units], reward[~gold_units]),
                               "gold_only": mean_ci(gold[gold_units])}
    return chosen, diag


def confounder_effects(X, featurizer, frame, label: np.ndarray, observed: np.ndarray, weights: np.ndarray,
                       fc: FitConfig) -> list[dict[str, Any]]:
    """DML effect (95% CI) of each configured confounder on the label of the observed units of the sample;
    with ``fit.confounder_weighting = "ipw"`` weighted by their clipped inverse propensities."""
    effects = []
    for name in fc.confounders:
        controls = confounder_controls(X, featurizer, numeric=fc.numeric, treatment=name,
                                       n_components=fc.confounder_controls, random_state=fc.seed)
        t = treatment_values(frame, name)
        try:
            est = ConfounderEffect(model=fc.confounder_model, random_state=fc.seed).fit(
                label[observed], t[observed], controls[observed],
                sample_weight=weights[observed] if fc.confounder_weighting == "ipw" else None)
        except ValueError as e:
            raise GateError(f"fit: confounder '{name}': {e}") from e
        effects.append({"treatment": name, "scale": "log" if name == RESPONSE_LENGTH else "identity",
                        **est.to_dict()})
    return effects


def choose_clip(observed: np.ndarray, propensity: np.ndarray, cfg: Config) -> dict[str, Any]:
    """The propensity floor the score stage applies (from the config, or chosen on the sample's out-of-fold
    propensities), after refusing degenerate propensities (exit code 2) rather than clipping them away."""
    sc = cfg.score
    reason = W.degenerate_weights(observed, propensity, min_ess_share=sc.ips_min_ess_share)
    if reason:
        raise GateError(f"fit: degenerate propensities: {reason} (score.ips_min_ess_share = {sc.ips_min_ess_share})")
    if sc.clip == "auto":
        clip = W.auto_clip(observed, propensity, sc.min_ess_share)
    else:
        clip = 0.0 if sc.clip == "none" else float(sc.clip)
    clip = min(clip, 1 - 1e-9)
    w = W.clipped(observed, propensity, clip)
    return {"clip": clip, "method": "auto" if sc.clip == "auto" else "none" if sc.clip == "none" else "config",
            "min_ess_share": sc.min_ess_share if sc.clip == "auto" else None,
            "sample_ess_share": W.kish_ess(w) / max(1, int(observed.sum())),
            "sample_clipped": int(np.sum((observed == 1) & (propensity < clip)))}


def reference_profile(sample: pa.Table, propensity: np.ndarray, observed: np.ndarray, label: np.ndarray, cfg: Config,
                      ) -> dict[str, Any]:
    """The drift reference of the fitted models: the sample's profile and the UTC dates its units span."""
    span = pc.min_max(pc.strftime(sample[un.TS], format="%Y-%m-%d")).as_py()
    return {"first_day": span["min"], "last_day": span["max"],
            **profile(propensity, observed, label, signal_counts(sample, cfg.ingest.known_types))}


def run(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> dict[str, Any]:
    fc = cfg.fit
    units = read_dataset(run.path(rd.UNITS))
    missing = [c for c in input_columns(text=fc.text, numeric=fc.numeric, categorical=fc.categorical)
               if c not in units.column_names]
    if missing:
        raise InputError(f"{run.path(rd.UNITS)}: feature column '{missing[0]}' named in [fit] is not in the units")
    ids = units[un.IMPRESSION_ID].to_numpy(zero_copy_only=False)
    observed_all = units[un.OBSERVED].to_numpy()
    if fc.propensity_column and fc.propensity_column not in units.column_names:
        raise InputError(f"{run.path(rd.UNITS)}: fit.propensity_column '{fc.propensity_column}' is not in the units")
    if observed_all.min() == observed_all.max() and not fc.propensity_column:
        raise InputError(f"{run.path(rd.UNITS)}: every unit has observed = {observed_all[0]}; a propensity of "
                         "observation cannot be fitted (click-through logs need fit.propensity_column)")
    sample = units.take(stratified_sample(ids, observed_all, fc.max_rows))
    o = sample[un.OBSERVED].to_numpy().astype(int)
    label = sample[un.LABEL].to_numpy(zero_copy_only=False)
    fold = fold_of(sample[un.IMPRESSION_ID], fc.folds)

    frame = design(sample, fc)
    featurizer = nuisance.featurizer(fc)      # built where the skops allow-list test builds them (estimators.nuisance)
    X = featurizer.fit_transform(frame).tocsr()          # one pass over the text (hashing is most of the cost)
    structured = structured_columns(featurizer)
    if fc.propensity_column:
        try:
            p_oof, p_models = logged_propensity(
                sample[fc.propensity_column].to_numpy(zero_copy_only=False), fc.propensity_column), None
        except ValueError as e:
            raise GateError(f"fit: {e}") from e
    else:
        p_oof, p_models = crossfit(nuisance.propensity_model(fc, structured), X, o, fold)
    y = np.nan_to_num(label.astype(float))
    m_oof, m_models = crossfit(nuisance.imputation_model(fc, structured), X, y, fold, fit_mask=o == 1)

    obs = o == 1
    gold = sample[un.LABEL_GOLD].to_numpy(zero_copy_only=False).astype(float) \
        if un.LABEL_GOLD in sample.column_names else np.full(len(o), np.nan)
    proxy_oof = m_oof if fc.noise_proxy == fc.imputation_model else crossfit(
        nuisance.imputation_model(fc, structured, model=fc.noise_proxy), X, y, fold, fit_mask=obs)[0]
    flips, noise_diag = noise_model(proxy_oof, y, gold, obs, fc)
    weighting = {**choose_clip(o, p_oof, cfg), "propensity_column": fc.propensity_column}
    w_clip = W.clipped(o.astype(float), p_oof, weighting["clip"])
    effects = confounder_effects(X, featurizer, frame, y, obs, w_clip, fc)
    balance = balance_table({c: treatment_values(frame, c) for c in fc.numeric}, o, w_clip)
    with atomic_dir(run.path(rd.MODELS)) as tmp:
        persist.save(featurizer, tmp / FEATURIZER)
        if p_models is not None:
            persist.save(p_models, tmp / PROPENSITY)
        persist.save(m_models, tmp / IMPUTATION)
        (tmp / NOISE).write_text(json.dumps({**flips.to_dict(), **noise_diag}, indent=2) + "\n")
        (tmp / WEIGHTS).write_text(json.dumps(weighting, indent=2) + "\n")
        (tmp / CONFOUNDING).write_text(json.dumps(effects, indent=2) + "\n")
        (tmp / REFERENCE).write_text(json.dumps(reference_profile(sample, p_oof, o, label, cfg), indent=2) + "\n")
    return {
        "inputs": describe_inputs(parquet_files(run.path(rd.UNITS))),
        "outputs": [str(run.path(rd.MODELS))],
        "counts": {"units": units.num_rows, "sample": sample.num_rows, "sample_observed": int(obs.sum())},
        "diagnostics": {
            "propensity": {"auc": auc(p_oof, o), "ece": expected_calibration_error(p_oof, o),
                           "mean": float(p_oof.mean()), "observed_rate": float(o.mean()),
                           "distribution": summary(p_oof), "folds": fc.folds, "calibration": fc.calibration,
                           "source": f"column {fc.propensity_column}" if fc.propensity_column else "model"},
            "imputation": {"auc": auc(m_oof[obs], np.round(y[obs])),
                           "mse": float(np.mean((m_oof[obs] - y[obs]) ** 2))},
            "flip_rates": {**flips.to_dict(), **noise_diag},
            "weights": weighting,
            "confounders": effects,
            "balance": balance,
        },
    }
