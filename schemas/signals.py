"""Input contract: one row per user action on an impression (docs/input-contract.md#signals)."""

import pyarrow as pa

from schemas.impressions import IMPRESSION_ID, TIMESTAMP, USER_ID

EVENT_ID = "event_id"
TS = "ts"
TYPE = "type"
VALUE = "value"
RATER = USER_ID
"""Optional: who gave the signal (the rater). Absent or null: the impression's user, as in logs where only the
person shown a response can rate it. Votes are aggregated per rater (``ingest.aggregate``); the id is used only
inside the join and, like the impressions' user id, never reaches an output (quarantine rows carry its
pseudonym)."""

SCHEMA = pa.schema(
    [
        pa.field(EVENT_ID, pa.string(), nullable=False),
        pa.field(IMPRESSION_ID, pa.string(), nullable=False),
        pa.field(TS, TIMESTAMP, nullable=False),
        pa.field(TYPE, pa.string(), nullable=False),
        pa.field(VALUE, pa.float64()),
        pa.field(RATER, pa.string()),
    ],
    metadata={"obsfeed.table": "signals", "obsfeed.schema_version": "1"},
)

REQUIRED = [f.name for f in SCHEMA if not f.nullable]
