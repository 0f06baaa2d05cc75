"""Run a Great Expectations suite on an Arrow table and say which expectations failed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import great_expectations as gx


def failed_expectations(table: pa.Table, suite: gx.ExpectationSuite) -> list[str]:
    """Validate ``table`` against ``suite`` in an ephemeral GX context; one line per failed expectation.

    GX is imported here (seconds), so that only a stage that runs a gate pays for it.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX sets this logger to INFO itself and announces a temporary docs folder on every context.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas("obsfeed")
             .add_dataframe_asset(suite.name)
             .add_batch_definition_whole_dataframe("all")
             .get_batch(batch_parameters={"dataframe": table.to_pandas()}))
    # Pass/fail alone is the cheap question; the details (counts of unexpected values) only when it failed.
    if batch.validate(suite, result_format="BOOLEAN_ONLY").success:
        return []
    result = batch.validate(suite, result_format="SUMMARY")
    failures = []
    for r in result.results:
        if not r.success:
            cfg = r.expectation_config
            detail = r.result.get("unexpected_count", r.result.get("observed_value", ""))
            failures.append(f"{cfg.type}({cfg.kwargs.get('column')}): {detail}")
    return failures
