"""Input contract: one row per user action on an impression (DESIGN §2)."""

import pyarrow as pa

from schemas.impressions import IMPRESSION_ID, TIMESTAMP

EVENT_ID = "event_id"
TS = "ts"
TYPE = "type"
VALUE = "value"

SIGNALS = pa.schema(
    [
        pa.field(EVENT_ID, pa.string(), nullable=False),
        pa.field(IMPRESSION_ID, pa.string(), nullable=False),
        pa.field(TS, TIMESTAMP, nullable=False),
        pa.field(TYPE, pa.string(), nullable=False),
        pa.field(VALUE, pa.float64()),
    ],
    metadata={"obsfeed.table": "signals", "obsfeed.schema_version": "1"},
)

REQUIRED = [f.name for f in SIGNALS if not f.nullable]
