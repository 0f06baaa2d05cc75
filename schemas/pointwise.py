"""Units plus propensities, weights and targets: the pointwise training dataset (docs/run-directory.md#pointwise)."""

import pyarrow as pa

PROPENSITY = "propensity"
WEIGHT_IPS = "weight_ips"
WEIGHT_SNIPS = "weight_snips"
WEIGHT_CLIPPED = "weight_clipped"
WEIGHT_STABILIZED = "weight_stabilized"
TARGET_DR = "target_dr"
TARGET_NOISE_CORRECTED = "target_noise_corrected"
TARGET_DECONFOUNDED = "target_deconfounded"
IMPUTED = "imputed"
REWARD_CLEAN = "reward_clean"
IMPUTED_CLEAN = "imputed_clean"
OVERLAP_VIOLATION = "overlap_violation"
FOLD = "fold"
RUN_ID = "run_id"

SCORE_FIELDS = [
    pa.field(PROPENSITY, pa.float64(), nullable=False, metadata={"doc": "cross-fitted calibrated P(observed=1|x)"}),
    pa.field(WEIGHT_IPS, pa.float64(), nullable=False,
             metadata={"doc": "observed / propensity (times pi_target under score.target_policy)"}),
    pa.field(WEIGHT_CLIPPED, pa.float64(), nullable=False,
             metadata={"doc": "observed / max(propensity, clip) (times pi_target under score.target_policy)"}),
    pa.field(WEIGHT_SNIPS, pa.float64(), nullable=False,
             metadata={"doc": "weight_clipped normalised to mean 1 over observed units"}),
    pa.field(WEIGHT_STABILIZED, pa.float64(), nullable=False,
             metadata={"doc": "score.stabilize: weight_clipped (none), weight_snips (snips), or observed / "
                       "q(propensity) with q the fit stage's isotonic map, mean 1 over observed units, blended toward "
                       "1 to meet score.max_weight_variance (monotone: non-increasing in propensity)"}),
    pa.field(IMPUTED, pa.float64(), nullable=False, metadata={"doc": "cross-fitted E[label | x, observed=1]"}),
    pa.field(TARGET_DR, pa.float64(), nullable=False,
             metadata={"doc": "doubly robust pseudo-outcome imputed + w * (label - imputed), w = weight_clipped of "
                       "the logging policy, switched or shrunk by score.dr_variant"}),
    pa.field(TARGET_NOISE_CORRECTED, pa.float64(), nullable=False,
             metadata={"doc": "the target of the clean reward r*: with an audit (fit.noise = calibrate), reward_clean "
                       "(each observed stratum calibrated on its own audited units: no weights needed); with flip "
                       "rates, (target_dr - rho10) / (1 - rho01 - rho10), which assumes class-conditional noise"}),
    pa.field(TARGET_DECONFOUNDED, pa.float64(), nullable=False,
             metadata={"doc": "target_dr minus the fitted confounder effects theta * (T - T_ref), then noise-corrected"
                       " like target_noise_corrected; under calibrate equal to target_noise_corrected (the audit "
                       "already maps the label's confounded part to r*)"}),
    pa.field(REWARD_CLEAN, pa.float64(), nullable=False,
             metadata={"doc": "the unit's clean reward in [0, 1]: calibrate: E[r* | label, x] for rated units, "
                       "E[r* | x] for unrated ones (fitted on unrated audited units); flip rates: the posterior "
                       "P(r* = 1 | label, x) for rated units, imputed_clean for the others"}),
    pa.field(IMPUTED_CLEAN, pa.float64(), nullable=False,
             metadata={"doc": "E[r* | x] in [0, 1] as for a unit nobody rated: the audit's unrated calibrator "
                       "(calibrate) or the corrected imputation (flip rates), clipped"}),
    pa.field(OVERLAP_VIOLATION, pa.bool_(), nullable=False,
             metadata={"doc": "the unit lacks overlap: its propensity is below fit.positivity_floor, or its value of a "
                       "fit.categorical column is a stratum the fit stage found failing (models/positivity.json); "
                       "always false when fit.positivity = 'exclude' (those units are left out)"}),
    pa.field(FOLD, pa.int16(), nullable=False, metadata={"doc": "cross-fitting fold: hash(impression_id) % K"}),
    pa.field(RUN_ID, pa.string(), nullable=False, metadata={"doc": "the run that scored the unit"}),
]


def pointwise_schema(units: pa.Schema) -> pa.Schema:
    """The pointwise schema: every units column, then the score columns."""
    return pa.schema(
        [*units, *SCORE_FIELDS], metadata={"obsfeed.table": "pointwise", "obsfeed.schema_version": "1"}
    )
