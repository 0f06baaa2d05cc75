"""The placebo check: refit on the units with the causal signal destroyed on purpose.

Two placebos, each randomised within the strata of the categorical features (``fit.categorical``) with
``fit.seed``, on the fit stage's sample and with its model builders:

* each confounder treatment shuffled among the observed units of its stratum, and its DML effect refitted:
  a shuffled treatment has no effect, so the CI should cover 0;
* a placebo selection among the observed units (they all have labels): a flag with the run's observed share
  in every stratum, at random within it; the propensity model refitted on it, and the weighted vs naive mean
  label of the placebo-selected compared: a selection that depends on nothing leaves weighting nothing to
  correct, so the difference should be 0 within its CI.

An effect or difference away from 0 here is produced by the method (leaks, overfitted nuisances, controls that
encode the treatment), not by the data. Reported, not gated; needs no ground truth. The run directory is read
by ``obsfeed evaluate --placebo`` (``pipelines.evaluate``), which hands the units and the fitted floor here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import stats

from estimators import nuisance
from estimators import weights as W
from estimators.confounding import SENSITIVITY_ALPHA, ConfounderEffect, confounder_controls
from estimators.crossfit import crossfit
from estimators.diagnostics import auc
from estimators.features import design, structured_columns, treatment_values
from estimators.propensity import logged_propensity
from estimators.sampling import sample_units
from estimators.sensitivity import permute_within_strata, strata_codes, stratified_flag, weighted_minus_naive
from schemas import units as un
from schemas.config import FitConfig, WeightsConfig
from schemas.hashing import fold_of


def placebo_check(units: pa.Table, fc: FitConfig, weighting: WeightsConfig, *, clip: float | None = None,
                  fitted_effects: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Both placebos on the fit sample of ``units`` (see the module docstring). ``clip``: the floor the fit stage
    chose (``weights.json``); None (not fitted yet) chooses one as ``weighting`` asks, without fit's gates.
    ``fitted_effects``: the fit stage's confounder effects, shown beside the placebo's. Each part that cannot be
    fitted on these units records why instead of failing the command."""
    sample = sample_units(units, fc.max_rows)
    o = sample[un.OBSERVED].to_numpy().astype(int)
    obs = o == 1
    y = np.nan_to_num(sample[un.LABEL].to_numpy(zero_copy_only=False).astype(float))
    fold = fold_of(sample[un.IMPRESSION_ID], fc.folds)
    frame = design(sample, fc)
    featurizer = nuisance.featurizer(fc)
    X = featurizer.fit_transform(frame).tocsr()
    structured = structured_columns(featurizer)
    present = [c for c in fc.categorical if c in sample.column_names]
    strata = strata_codes([sample[c].to_numpy(zero_copy_only=False) for c in present], sample.num_rows)
    rng = np.random.default_rng(fc.seed)
    fitted = {e["treatment"]: e for e in fitted_effects}

    weights = None
    if fc.confounder_weighting == "ipw" and fc.confounders:      # the confounder fit's weights, as fit builds them
        p = (logged_propensity(sample[fc.propensity_column].to_numpy(zero_copy_only=False), fc.propensity_column)
             if fc.propensity_column else crossfit(nuisance.propensity_model(fc, structured), X, o, fold)[0])
        weights = W.clipped(o.astype(float), p, clip if clip is not None else W.configured_clip(o, p, weighting))
    effects = []
    for name in fc.confounders:
        t = treatment_values(frame, name)
        shuffled = permute_within_strata(t[obs], strata[obs], rng)
        controls = confounder_controls(X, featurizer, numeric=fc.numeric, treatment=name,
                                       n_components=fc.confounder_controls, random_state=fc.seed)[obs]
        row: dict[str, Any] = {"treatment": name, "model": fc.confounder_model}
        if name in fitted:
            row["fitted_effect"] = fitted[name]["effect"]
        try:
            est = ConfounderEffect(model=fc.confounder_model, random_state=fc.seed).fit(
                y[obs], shuffled, controls, sample_weight=None if weights is None else weights[obs])
        except ValueError as e:
            effects.append({**row, "error": str(e)})
            continue
        se = (est.ci_high_ - est.ci_low_) / (2 * stats.norm.ppf(1 - SENSITIVITY_ALPHA / 2))
        effects.append({**row, "effect": est.effect_, "ci_low": est.ci_low_, "ci_high": est.ci_high_, "se": se,
                        "zero_inside": est.ci_low_ <= 0 <= est.ci_high_, "n": est.n_})
    return {"seed": fc.seed, "strata": present, "n_strata": int(np.unique(strata).size),
            "sample": int(sample.num_rows), "observed": int(obs.sum()), "confounders": effects,
            "selection": _placebo_selection(X[obs], y[obs], strata[obs], fold[obs], float(o.mean()), structured,
                                            clip, fc, weighting, rng)}


def _placebo_selection(X, y: np.ndarray, strata: np.ndarray, fold: np.ndarray, share: float, structured,
                       clip: float | None, fc: FitConfig, weighting: WeightsConfig, rng: np.random.Generator,
                       ) -> dict[str, Any]:
    """The placebo selection on the observed units: flag, refitted propensity, weighted − naive mean label."""
    out: dict[str, Any] = {"share": share}
    try:
        s = stratified_flag(strata, share, rng)
        if min(s.sum(), (1 - s).sum()) < 2 * fc.folds:
            raise ValueError(f"a placebo selection of {int(s.sum())} of {s.size} observed units is too small to fit "
                             f"a propensity on ({fc.folds} folds)")
        p = crossfit(nuisance.propensity_model(fc, structured), X, s, fold)[0]
        # Without a fitted floor: the one fit would choose, without its gates (degenerate propensities, the
        # monotone map's needs): a placebo is reported, never a reason to stop.
        clip = clip if clip is not None else W.configured_clip(s, p, weighting)
        w = W.clipped(s.astype(float), p, clip)
        sel = s == 1
        d = weighted_minus_naive(y[sel], w[sel])
    except ValueError as e:
        return {**out, "error": str(e)}
    return {**out, "n_selected": int(sel.sum()), "propensity_auc": auc(p, s), "clip": clip, **d,
            "zero_inside": d["ci_low"] <= 0 <= d["ci_high"]}
