"""One row per impression after ingest: the unit every estimator and dataset is built on (docs/run-directory.md)."""

from collections.abc import Iterable

import pyarrow as pa

from schemas.impressions import (
    IMPRESSION_ID,
    MODEL_VERSION,
    POSITION,
    PROMPT,
    PROMPT_ID,
    RESPONSE,
    RESPONSE_ID,
    TIMESTAMP,
    TS,
)

USER_HASH = "user_hash"
OBSERVED = "observed"
LABEL = "label"
LABEL_SOURCE = "label_source"
LABEL_GOLD = "label_gold"
N_VOTES = "n_votes"
COUNT_PREFIX = "n_"

BASE_FIELDS = [
    pa.field(IMPRESSION_ID, pa.string(), nullable=False, metadata={"doc": "one response shown once: the unit"}),
    pa.field(PROMPT_ID, pa.string(), nullable=False, metadata={"doc": "the prompt the response answers"}),
    pa.field(RESPONSE_ID, pa.string(), nullable=False, metadata={"doc": "the response shown"}),
    pa.field(USER_HASH, pa.string(), nullable=False,
             metadata={"doc": "keyed HMAC-SHA256 of the user id (privacy.key_env); the raw id is never kept"}),
    pa.field(TS, TIMESTAMP, nullable=False, metadata={"doc": "when the response was shown (UTC)"}),
    pa.field(PROMPT, pa.string(), metadata={"doc": "prompt text"}),
    pa.field(RESPONSE, pa.string(), metadata={"doc": "response text"}),
    pa.field(MODEL_VERSION, pa.string(), metadata={"doc": "the model that wrote the response"}),
    pa.field(POSITION, pa.int32(), metadata={"doc": "rank of the response on the page (0 = first)"}),
    pa.field(OBSERVED, pa.int8(), nullable=False, metadata={"doc": "1 when a label-bearing signal exists"}),
    pa.field(LABEL, pa.float64(), metadata={"doc": "resolved label in [0, 1]; null when unobserved. With "
                                            "ingest.aggregate = 'mean' the mean of the raters' votes (a soft "
                                            "label), shrunk by ingest.prior when one is set"}),
    pa.field(LABEL_SOURCE, pa.string(), metadata={"doc": "signal type that set the label; 'mean_of_votes' or "
                                                  "'majority_of_votes' when two or more raters' votes were "
                                                  "combined"}),
    pa.field(N_VOTES, pa.int32(), nullable=False,
             metadata={"doc": "number of raters whose explicit vote counted (each rater's latest one); 0 when "
                       "the label is implicit or absent"}),
    pa.field(LABEL_GOLD, pa.float64(), metadata={"doc": "audited (gold) label in [0, 1] from the latest gold "
                                                 "signal; null when the unit was not audited"}),
]


def count_column(signal_type: str) -> str:
    """Name of the per-unit count of signals of ``signal_type``."""
    return f"{COUNT_PREFIX}{signal_type}"


def units_schema(signal_types: Iterable[str], extra: Iterable[pa.Field] = ()) -> pa.Schema:
    """The units schema for a config's signal types; ``extra`` are impression feature columns kept."""
    counts = [pa.field(count_column(t), pa.int32(), nullable=False,
                       metadata={"doc": f"number of valid '{t}' signals on the unit"}) for t in sorted(signal_types)]
    return pa.schema(
        [*BASE_FIELDS, *counts, *extra],
        metadata={"obsfeed.table": "units", "obsfeed.schema_version": "1"},
    )
