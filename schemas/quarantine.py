"""Rejected input rows, with why and where they came from (docs/input-contract.md): nothing is silently dropped."""

import pyarrow as pa

TABLE = "table"
SOURCE_FILE = "source_file"
ROW_NUMBER = "row_number"
REASON = "reason"
RECORD = "record"

SCHEMA = pa.schema(
    [
        pa.field(TABLE, pa.string(), nullable=False, metadata={"doc": "impressions or signals"}),
        pa.field(SOURCE_FILE, pa.string(), nullable=False),
        pa.field(ROW_NUMBER, pa.int64(), nullable=False, metadata={"doc": "0-based row (line) in the file"}),
        pa.field(REASON, pa.string(), nullable=False, metadata={"doc": "machine-readable reason"}),
        pa.field(RECORD, pa.string(), nullable=False, metadata={"doc": "the original record as JSON text"}),
    ],
    metadata={"obsfeed.table": "quarantine", "obsfeed.schema_version": "1"},
)

# Reasons (a closed vocabulary, so analysts can group by them).
MISSING_REQUIRED = "missing_required:{column}"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_SIGNAL_TYPE = "unknown_signal_type"
VALUE_OUT_OF_RANGE = "value_out_of_range"
ORPHAN_SIGNAL = "orphan_signal"
MALFORMED_RECORD = "malformed_record"  # the record itself could not be parsed; ``record`` holds its raw text
TIME_TRAVEL = "time_travel"
BAD_TYPE = "bad_type:{column}"  # a value that does not convert to the column's contract type
