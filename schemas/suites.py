"""Great Expectations suites, derived from the Arrow schemas so that a gate cannot drift from its table.

GX is imported when a suite is built, not with this module: its import alone takes seconds, which every
``obsfeed`` command would otherwise pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from schemas import units as un

if TYPE_CHECKING:
    import great_expectations as gx


def units_suite(schema: pa.Schema) -> gx.ExpectationSuite:
    """The gate on ``units/``: required columns non-null, one row per impression, a valid observed flag and
    label, non-negative signal counts."""
    import great_expectations as gx

    required = [f.name for f in schema if not f.nullable]
    counts = [f.name for f in schema if f.name.startswith(un.COUNT_PREFIX)]
    return gx.ExpectationSuite(name="units", expectations=[
        *(gx.expectations.ExpectColumnValuesToNotBeNull(column=c) for c in required),
        gx.expectations.ExpectColumnValuesToBeUnique(column=un.IMPRESSION_ID),
        gx.expectations.ExpectColumnValuesToBeInSet(column=un.OBSERVED, value_set=[0, 1]),
        gx.expectations.ExpectColumnValuesToBeBetween(column=un.LABEL, min_value=0, max_value=1),
        *(gx.expectations.ExpectColumnMinToBeBetween(column=c, min_value=0) for c in counts),
    ])


def suite_columns(suite: gx.ExpectationSuite) -> list[str]:
    """The columns a suite reads, so that a gate loads only those (not the text)."""
    return sorted({e.column for e in suite.expectations})
