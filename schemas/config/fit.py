"""``[fit]``: the features and nuisance models the fit stage fits, the noise model, confounders and overlap."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from schemas.config.base import Section


class FitConfig(Section):
    text: list[str] = Field(default_factory=lambda: ["prompt", "response"])
    numeric: list[str] = Field(
        default_factory=lambda: ["response_length", "position"],
        description="numeric features; response_length is derived from the response text",
    )
    categorical: list[str] = Field(default_factory=lambda: ["model_version"])
    hash_features: int = Field(2**14, ge=16, le=2**24, description="hashed text n-gram dimensions")
    ngram_max: int = Field(2, ge=1, le=3)
    propensity_model: Literal["logistic", "boosted"] = Field(
        "logistic", description="'boosted': HistGradientBoosting over the logistic model's honest logit and the "
        "numeric/categorical features (selection that interacts with who rates and what was shown); slower")
    propensity_column: str | None = Field(
        None, description="a units column holding a logged propensity of observation (a known, randomised "
        "logging policy, or a published estimate); used instead of fitting a propensity model")
    imputation_model: Literal["logistic", "boosted"] = Field(
        "logistic", description="the model of P(label=1 | x) behind the DR target; 'boosted' as for noise_proxy")
    noise_proxy: Literal["logistic", "boosted"] = Field(
        "boosted", description="the model of P(label=1 | x) whose out-of-fold scores give the anchor points and the "
        "PPI predictions; 'boosted' learns the rater x content interactions and the plateaus at the flip rates "
        "that a logit overshoots (the same fit as the imputation model's when both name one model)")
    calibration: Literal["isotonic", "sigmoid"] = "isotonic"
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic models")
    propensity_C: Annotated[float, Field(gt=0)] | Literal["cv"] | None = Field(
        None, description="inverse L2 strength of the propensity model's logistic stage: None for fit.C, a number, "
        "or 'cv' to choose it in each fold from 0.01, 0.03, 0.1, 0.3, 1 by 2-fold cross-validated log loss on the "
        "rows its first classifier is fitted on (which the second one's calibration also uses). 'cv' ranks and "
        "calibrates better on simulated logs (AUC 0.763 against 0.756, ECE 0.0014 against 0.0064) but leaves SNIPS "
        "more of the selection bias of the mean label (29% of the naive bias against 5%): the stronger penalty "
        "shrinks the text directions that carry it")
    noise: Literal["auto", "calibrate", "audit", "anchor", "fixed", "none"] = Field(
        "auto", description="how the clean-reward target is built. 'calibrate': learn E[r* | label, x] on the "
        "rated audited units and E[r* | x] on the unrated audited ones (label_gold), cross-fitted; the unit's "
        "calibrated reward is the target (label error may depend on x). The flip-rate methods assume "
        "class-conditional noise: 'audit' counts the rates on observed units that also carry a gold label; "
        "'anchor' estimates them from quantiles of the noise proxy's out-of-fold scores; 'fixed' uses "
        "fit.flip_rates as given. 'auto' calibrates when the audit has min_audit rated and min_audit unrated "
        "audited units of each gold label, else applies anchor rates only when they are identified, else no "
        "correction; 'none' assumes clean labels (rho01 = rho10 = 0)")
    min_audit: int = Field(30, ge=1, description="audited units needed per gold label to audit or calibrate (for "
                           "calibrate: among the rated and among the unrated units each)")
    max_audit_se: float = Field(0.03, gt=0, le=0.5, description="no longer used ('auto' calibrates on an audit "
                                "instead of applying its flip rates; audit rates are judged by max_flip_ci_width); "
                                "still read so that older configs load")
    anchor_quantile: float = Field(0.01, gt=0, lt=0.5, description="quantile used as the anchor points")
    min_anchor_units: int = Field(
        20, ge=1, description="anchor flip rates are identified only with at least this many units in each "
        "anchor tail (anchor_quantile x the observed units of the fit sample): a quantile of a few scores is a guess")
    max_flip_ci_width: float = Field(
        0.1, gt=0, le=1, description="flip rates are identified only when each one's 95% CI (anchors: bootstrap "
        "over units, given the fitted proxy; audit: Wilson) is at most this wide")
    max_flip_sum: float = Field(
        0.8, gt=0, lt=1, description="flip rates are identified only when the upper bound of rho01 + rho10 (the "
        "sum of the CIs' upper ends) is at most this: the correction divides by 1 - rho01 - rho10")
    flip_rates: list[float] | None = Field(
        None, validate_default=True, description="[rho01, rho10], the flip rates of noise = 'fixed' (e.g. from "
        "an earlier audit): required then, refused otherwise; each in [0, 1), their sum < 1")
    confounders: list[str] = Field(
        default_factory=lambda: ["response_length"],
        description="numeric features whose effect on the label is estimated by DML and removed in "
        "target_deconfounded (response_length on the log scale); each must be in fit.numeric")
    confounder_model: Literal["linear_dml", "causal_forest_dml"] = "linear_dml"
    confounder_weighting: Literal["none", "ipw"] = Field(
        "none", description="'ipw' weights the observed units by their clipped inverse propensities in the DML "
        "fit (the population effect; removes collider bias when selection acts on quality and the confounder, "
        "but carries the propensity model's errors: see benchmarks/RESULTS.md)")
    confounder_controls: int = Field(50, ge=1, le=500, description="SVD components of the text used as controls")
    confounder_benchmark: float = Field(
        0.05, ge=0, lt=1, description="the strength of a hypothetical unmeasured confounder (partial R² with both "
        "the treatment and the label, c_t = c_y) at which confounding.json reports each effect's sensitivity bounds "
        "beside its robustness values")
    folds: int = Field(5, ge=2, le=20)
    max_rows: int = Field(200_000, ge=100)
    n_jobs: int = Field(-1, ge=-1, description="threads that fit the cross-fitting folds at once (joblib; -1: one "
                        "per core; not 0). The fitted models and every figure are the same for any value: each fold "
                        "depends only on its rows and the seed")
    positivity: Literal["warn", "exclude", "fail"] = Field(
        "warn", description="what happens to units where overlap fails (a value of a fit.categorical column with "
        "fewer than min_stratum_observed observed units, or most of its propensities below positivity_floor; "
        "and every unit whose propensity is below positivity_floor), checked by fit on its sample: 'warn' keeps "
        "them, flagged in the pointwise column overlap_violation, and logs a warning; 'exclude' drops them from "
        "the pointwise and pairwise datasets (counted in the score stage's counts); 'fail' stops fit (exit 2) "
        "naming the failed strata (a propensity tail is a failed stratum when it holds more than "
        "positivity_max_tail_share of the sample)")
    positivity_floor: float = Field(
        0.01, gt=0, lt=0.5, description="propensity below which a unit has no practical overlap: its IPS weight "
        "would exceed 1/floor (100 at 0.01) and its DR target is the imputation model's extrapolation")
    min_stratum_observed: int = Field(
        5, ge=1, description="a categorical stratum (one value of a fit.categorical column) with fewer observed "
        "units than this, and some unobserved ones, fails overlap: its units' targets could not be checked "
        "against a label")
    positivity_max_tail_share: float = Field(
        0.05, ge=0, le=1, description="the share of the fit sample with a propensity below positivity_floor above "
        "which the tail itself is a failed stratum (fails fit under positivity = 'fail'); smaller tails are "
        "flagged unit by unit only (isotonic calibration puts a few units at the model's clip)")
    seed: int = 0

    @field_validator("flip_rates")
    @classmethod
    def _fixed_flip_rates(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        noise = info.data.get("noise")
        if noise is None:                                    # fit.noise itself failed: that error is the one shown
            return v
        if noise == "fixed" and v is None:
            raise ValueError("fit.noise = 'fixed' needs fit.flip_rates = [rho01, rho10]")
        if noise != "fixed" and v is not None:
            raise ValueError(f"fit.flip_rates is used only by fit.noise = 'fixed' (fit.noise = {noise!r})")
        if v is None:
            return v
        if len(v) != 2:
            raise ValueError(f"fit.flip_rates must be two numbers [rho01, rho10], got {len(v)}")
        if not all(0 <= r < 1 for r in v):
            raise ValueError(f"fit.flip_rates must each be in [0, 1), got {v}")
        if v[0] + v[1] >= 1:
            raise ValueError(f"fit.flip_rates sum to {v[0] + v[1]:g} >= 1: the labels would carry no usable signal "
                             "(the correction divides by 1 - rho01 - rho10)")
        return v

    @field_validator("n_jobs")
    @classmethod
    def _some_threads(cls, v: int) -> int:
        if v == 0:
            raise ValueError("fit.n_jobs = 0 runs nothing: use a positive count, or -1 for one thread per core")
        return v

    @model_validator(mode="after")
    def _confounders_are_numeric_features(self) -> FitConfig:
        missing = [c for c in self.confounders if c not in self.numeric]
        if missing:
            raise ValueError(f"fit.confounders names {missing}, which are not in fit.numeric")
        return self
