"""Run a Great Expectations suite on an Arrow table and say which expectations failed."""

from __future__ import annotations

import logging

import great_expectations as gx
import pyarrow as pa
from great_expectations.data_context.types.base import ProgressBarsConfig

# GX sets this module's logger to INFO itself and announces a temporary docs folder on every context.
logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)


def failed_expectations(table: pa.Table, suite: gx.ExpectationSuite) -> list[str]:
    """Validate ``table`` against ``suite`` in an ephemeral GX context; one line per failed expectation."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("obsfeed")
             .add_dataframe_asset(suite.name)
             .add_batch_definition_whole_dataframe("all")
             .get_batch(batch_parameters={"dataframe": table.to_pandas()}))
    result = batch.validate(suite)
    failures = []
    for r in result.results:
        if not r.success:
            cfg = r.expectation_config
            detail = r.result.get("unexpected_count", r.result.get("observed_value", ""))
            failures.append(f"{cfg.type}({cfg.kwargs.get('column')}): {detail}")
    return failures
