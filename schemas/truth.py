"""Simulator ground truth, one row per impression (docs/evaluation.md#simulator)."""

import pyarrow as pa

from schemas.impressions import IMPRESSION_ID

REWARD_TRUE = "reward_true"
PROPENSITY_TRUE = "propensity_true"
LABEL_CLEAN = "label_clean"
LABEL_NOISY = "label_noisy"
OBSERVED_TRUE = "observed_true"
LENGTH_EFFECT_TRUE = "length_effect_true"

SCHEMA = pa.schema(
    [
        pa.field(IMPRESSION_ID, pa.string(), nullable=False),
        pa.field(REWARD_TRUE, pa.float64(), nullable=False, metadata={"doc": "P(r*=1 | x)"}),
        pa.field(PROPENSITY_TRUE, pa.float64(), nullable=False, metadata={"doc": "P(observed=1 | x)"}),
        pa.field(LABEL_CLEAN, pa.int8(), nullable=False, metadata={"doc": "r* ~ Bernoulli(reward_true)"}),
        pa.field(LABEL_NOISY, pa.int8(), nullable=False,
                 metadata={"doc": "the label a user would give (verbosity bias, then flips)"}),
        pa.field(OBSERVED_TRUE, pa.int8(), nullable=False, metadata={"doc": "whether feedback was given"}),
        pa.field(LENGTH_EFFECT_TRUE, pa.float64(), nullable=False,
                 metadata={"doc": "d P(label_noisy=1 | x) / d log(response words): the verbosity bias at x"}),
    ],
    metadata={"obsfeed.table": "truth", "obsfeed.schema_version": "1"},
)
