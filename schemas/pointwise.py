"""Units plus propensities, weights and targets: the pointwise training dataset (DESIGN §3, §5)."""

import pyarrow as pa

PROPENSITY = "propensity"
WEIGHT_IPS = "weight_ips"
WEIGHT_SNIPS = "weight_snips"
WEIGHT_CLIPPED = "weight_clipped"
TARGET_DR = "target_dr"
TARGET_NOISE_CORRECTED = "target_noise_corrected"
TARGET_DECONFOUNDED = "target_deconfounded"
IMPUTED = "imputed"
FOLD = "fold"
RUN_ID = "run_id"

SCORE_FIELDS = [
    pa.field(PROPENSITY, pa.float64(), nullable=False, metadata={"doc": "cross-fitted calibrated P(observed=1|x)"}),
    pa.field(WEIGHT_IPS, pa.float64(), nullable=False, metadata={"doc": "observed / propensity"}),
    pa.field(WEIGHT_CLIPPED, pa.float64(), nullable=False,
             metadata={"doc": "observed / max(propensity, clip)"}),
    pa.field(WEIGHT_SNIPS, pa.float64(), nullable=False,
             metadata={"doc": "weight_clipped normalised to mean 1 over observed units"}),
    pa.field(IMPUTED, pa.float64(), nullable=False, metadata={"doc": "cross-fitted E[label | x, observed=1]"}),
    pa.field(TARGET_DR, pa.float64(), nullable=False,
             metadata={"doc": "doubly robust pseudo-outcome imputed + weight_clipped * (label - imputed)"}),
    pa.field(TARGET_NOISE_CORRECTED, pa.float64(), nullable=False,
             metadata={"doc": "(target_dr - rho10) / (1 - rho01 - rho10) with the fit stage's flip rates"}),
    pa.field(TARGET_DECONFOUNDED, pa.float64(), nullable=False,
             metadata={"doc": "target_dr minus the fitted confounder effects theta * (T - T_ref), then noise-corrected"
                       " like target_noise_corrected"}),
    pa.field(FOLD, pa.int16(), nullable=False, metadata={"doc": "cross-fitting fold: hash(impression_id) % K"}),
    pa.field(RUN_ID, pa.string(), nullable=False, metadata={"doc": "the run that scored the unit"}),
]


def pointwise_schema(units: pa.Schema) -> pa.Schema:
    """The pointwise schema: every units column, then the score columns."""
    return pa.schema(
        [*units, *SCORE_FIELDS], metadata={"obsfeed.table": "pointwise", "obsfeed.schema_version": "1"}
    )
