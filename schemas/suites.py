"""Great Expectations suites, derived from the Arrow schemas so that a gate cannot drift from its table.

GX is imported when a suite is built, not with this module: its import alone takes seconds, which every
``obsfeed`` command would otherwise pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from schemas import pairwise, pointwise
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


_LARGEST = 1.7976931348623157e308   # the largest finite float: "between 0 and this" also refuses +inf


def pointwise_suite() -> gx.ExpectationSuite:
    """The gate on ``datasets/pointwise``: one row per impression, propensities in (0, 1], weights and targets
    finite (NaN reads as null in the gate's frame), weights non-negative."""
    import great_expectations as gx

    E = gx.expectations
    finite = [
        pointwise.WEIGHT_IPS,
        pointwise.WEIGHT_CLIPPED,
        pointwise.WEIGHT_SNIPS,
        pointwise.WEIGHT_STABILIZED,
        pointwise.TARGET_DR,
        pointwise.TARGET_NOISE_CORRECTED,
        pointwise.TARGET_DECONFOUNDED,
        pointwise.PROPENSITY,
    ]
    return gx.ExpectationSuite(
        name="pointwise",
        expectations=[
            E.ExpectColumnValuesToBeUnique(column=un.IMPRESSION_ID),
            E.ExpectColumnValuesToBeInSet(column=un.OBSERVED, value_set=[0, 1]),
            *(E.ExpectColumnValuesToNotBeNull(column=c) for c in finite),
            E.ExpectColumnValuesToBeBetween(column=pointwise.PROPENSITY, min_value=0, max_value=1, strict_min=True),
            *(
                E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=_LARGEST)
                for c in (
                    pointwise.WEIGHT_IPS,
                    pointwise.WEIGHT_CLIPPED,
                    pointwise.WEIGHT_SNIPS,
                    pointwise.WEIGHT_STABILIZED,
                )
            ),
            *(
                E.ExpectColumnValuesToBeBetween(column=c, min_value=-_LARGEST, max_value=_LARGEST)
                for c in (pointwise.TARGET_DR, pointwise.TARGET_NOISE_CORRECTED, pointwise.TARGET_DECONFOUNDED)
            ),
        ],
    )


def pairwise_suite(min_margin: float) -> gx.ExpectationSuite:
    """The gate on ``datasets/pairwise``: two different units per pair, the chosen one's target above the
    rejected one's by at least ``min_margin``, finite non-negative weights, propensities in (0, 1]."""
    import great_expectations as gx

    E = gx.expectations
    return gx.ExpectationSuite(name="pairwise", expectations=[
        E.ExpectSelectColumnValuesToBeUniqueWithinRecord(column_list=[pairwise.CHOSEN_ID, pairwise.REJECTED_ID]),
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A=pairwise.CHOSEN_TARGET, column_B=pairwise.REJECTED_TARGET),
        E.ExpectColumnValuesToBeBetween(column=pairwise.MARGIN, min_value=min_margin - 1e-9),
        E.ExpectColumnValuesToNotBeNull(column=pairwise.WEIGHT),
        E.ExpectColumnValuesToBeBetween(column=pairwise.WEIGHT, min_value=0, max_value=_LARGEST),
        *(E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1, strict_min=True)
          for c in (pairwise.CHOSEN_PROPENSITY, pairwise.REJECTED_PROPENSITY)),
    ])


RAW_USER_COLUMNS = ("user_id",)
"""Columns that must never reach an output: the raw user id (units carry only its keyed hash)."""
RAW_ID_KEY = r'"user_id"\s*:\s*[^\s,}n]'
"""A quarantine record that still names the raw user id: a ``"user_id"`` key with a value other than null."""


def suite_columns(suite: gx.ExpectationSuite) -> list[str]:
    """The columns a suite reads, so that a gate loads only those (not the text)."""
    cols: set[str] = set()
    for e in suite.expectations:
        for attr in ("column", "column_A", "column_B"):
            if getattr(e, attr, None):
                cols.add(getattr(e, attr))
        cols.update(getattr(e, "column_list", None) or [])
    return sorted(cols)
