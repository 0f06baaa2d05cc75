"""Input contract: one row per response shown to a user (docs/input-contract.md#impressions)."""

import pyarrow as pa

IMPRESSION_ID = "impression_id"
TS = "ts"
USER_ID = "user_id"
PROMPT_ID = "prompt_id"
RESPONSE_ID = "response_id"
PROMPT = "prompt"
RESPONSE = "response"
MODEL_VERSION = "model_version"
POSITION = "position"

TIMESTAMP = pa.timestamp("us", tz="UTC")

SCHEMA = pa.schema(
    [
        pa.field(IMPRESSION_ID, pa.string(), nullable=False),
        pa.field(TS, TIMESTAMP, nullable=False),
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(PROMPT_ID, pa.string(), nullable=False),
        pa.field(RESPONSE_ID, pa.string(), nullable=False),
        pa.field(PROMPT, pa.string()),
        pa.field(RESPONSE, pa.string()),
        pa.field(MODEL_VERSION, pa.string()),
        pa.field(POSITION, pa.int32(), metadata={"min": "0"}),   # "min": smaller values are out of range
    ],
    metadata={"obsfeed.table": "impressions", "obsfeed.schema_version": "1"},
)
"""Declared columns; any other column is kept and may be named in the config as a feature."""

REQUIRED = [f.name for f in SCHEMA if not f.nullable]
