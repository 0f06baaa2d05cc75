"""The catalogue of a scheduled root: one row per logical day, what an analyst or a scheduler checks first
(``ROOT/catalogue.parquet``; docs/run-directory.md#catalogue)."""

import pyarrow as pa

DATE = "date"
STATUS = "status"

RUNNING, OK, FAILED = "running", "ok", "failed"

SCHEMA = pa.schema(
    [
        pa.field(DATE, pa.date32(), nullable=False, metadata={"doc": "the logical day (UTC)"}),
        pa.field(STATUS, pa.string(), nullable=False, metadata={"doc": "running | ok | failed"}),
        pa.field("attempt", pa.int32(), nullable=False, metadata={"doc": "runs of this day so far"}),
        pa.field("started_at", pa.timestamp("us", "UTC")),
        pa.field("finished_at", pa.timestamp("us", "UTC")),
        pa.field("final", pa.bool_(), metadata={"doc": "run after the day's late window closed: no signal of it "
                                                       "can arrive later"}),
        pa.field("stages", pa.string(), metadata={"doc": "the stages run, comma-separated"}),
        pa.field("units", pa.int64()),
        pa.field("observed", pa.int64()),
        pa.field("signals_ok", pa.int64()),
        pa.field("quarantined", pa.int64()),
        pa.field("pointwise_rows", pa.int64()),
        pa.field("pairwise_rows", pa.int64()),
        pa.field("label_rate", pa.float64(), metadata={"doc": "mean label of the observed units"}),
        pa.field("ess_share", pa.float64(), metadata={
            "doc": "Kish ESS of the clipped weights (those the datasets carry) / observed units"}),
        pa.field("propensity_psi", pa.float64()),
        pa.field("label_rate_shift", pa.float64()),
        pa.field("signal_mix_shift", pa.float64()),
        pa.field("models_from", pa.string(), metadata={"doc": "where the scoring models came from (null: fitted "
                                                             "on this day)"}),
        pa.field("config_hash", pa.string()),
        pa.field("error", pa.string(), metadata={"doc": "why the last attempt failed"}),
    ],
    metadata={"obsfeed.table": "catalogue", "obsfeed.schema_version": "1"},
)
