"""The data gates' expectation suites, derived from the Arrow schemas so that a gate cannot drift from its table.

A suite is plain data here (:class:`Suite`: Great Expectations' expectation names and arguments), so that a stage
can check every row without importing GX (``transforms/gates.py`` evaluates the same expectations with Arrow) and
still hand GX the very same suite (:meth:`Suite.to_gx`). GX is imported only there: its import alone takes
seconds, which every ``obsfeed`` command would otherwise pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from schemas import pairwise, pointwise
from schemas import units as un

if TYPE_CHECKING:
    import great_expectations as gx


@dataclass(frozen=True)
class Expectation:
    """One GX expectation: its snake_case type (``expect_column_values_to_not_be_null``) and its arguments."""

    type: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        k = self.kwargs
        return [c for c in (k.get("column"), k.get("column_A"), k.get("column_B")) if c] + list(
            k.get("column_list") or [])

    def label(self) -> str:
        """How a failure names it: ``type(column)``, as GX's results do."""
        return f"{self.type}({self.kwargs.get('column')})"


@dataclass(frozen=True)
class Suite:
    name: str
    expectations: tuple[Expectation, ...]

    def to_gx(self) -> gx.ExpectationSuite:
        """The same suite as a GX ``ExpectationSuite`` (imports GX)."""
        import great_expectations as gx

        def build(e: Expectation):       # expect_column_values_to_be_unique -> ExpectColumnValuesToBeUnique
            return getattr(gx.expectations, "".join(w.capitalize() for w in e.type.split("_")))(**e.kwargs)

        return gx.ExpectationSuite(name=self.name, expectations=[build(e) for e in self.expectations])


def _e(type_: str, **kwargs: Any) -> Expectation:
    return Expectation(type_, kwargs)


def units_suite(schema: pa.Schema) -> Suite:
    """The gate on ``units/``: required columns non-null, one row per impression, a valid observed flag and
    label, non-negative signal counts."""
    required = [f.name for f in schema if not f.nullable]
    counts = [f.name for f in schema if f.name.startswith(un.COUNT_PREFIX)]
    return Suite("units", (
        *(_e("expect_column_values_to_not_be_null", column=c) for c in required),
        _e("expect_column_values_to_be_unique", column=un.IMPRESSION_ID),
        _e("expect_column_values_to_be_in_set", column=un.OBSERVED, value_set=[0, 1]),
        _e("expect_column_values_to_be_between", column=un.LABEL, min_value=0, max_value=1),
        *(_e("expect_column_min_to_be_between", column=c, min_value=0) for c in counts),
    ))


_LARGEST = 1.7976931348623157e308   # the largest finite float: "between 0 and this" also refuses +inf


def pointwise_suite() -> Suite:
    """The gate on ``datasets/pointwise``: one row per impression, propensities in (0, 1], weights and targets
    finite (NaN counts as null), weights non-negative."""
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
    weights = (pointwise.WEIGHT_IPS, pointwise.WEIGHT_CLIPPED, pointwise.WEIGHT_SNIPS, pointwise.WEIGHT_STABILIZED)
    targets = (pointwise.TARGET_DR, pointwise.TARGET_NOISE_CORRECTED, pointwise.TARGET_DECONFOUNDED)
    between = "expect_column_values_to_be_between"
    return Suite("pointwise", (
        _e("expect_column_values_to_be_unique", column=un.IMPRESSION_ID),
        _e("expect_column_values_to_be_in_set", column=un.OBSERVED, value_set=[0, 1]),
        *(_e("expect_column_values_to_not_be_null", column=c) for c in finite),
        _e(between, column=pointwise.PROPENSITY, min_value=0, max_value=1, strict_min=True),
        *(_e(between, column=c, min_value=0, max_value=_LARGEST) for c in weights),
        *(_e(between, column=c, min_value=-_LARGEST, max_value=_LARGEST) for c in targets),
    ))


def pairwise_suite(min_margin: float) -> Suite:
    """The gate on ``datasets/pairwise``: two different units per pair, the chosen one's target above the
    rejected one's by at least ``min_margin``, finite non-negative weights, propensities in (0, 1]."""
    between = "expect_column_values_to_be_between"
    return Suite("pairwise", (
        _e("expect_select_column_values_to_be_unique_within_record",
           column_list=[pairwise.CHOSEN_ID, pairwise.REJECTED_ID]),
        _e("expect_column_pair_values_a_to_be_greater_than_b", column_A=pairwise.CHOSEN_TARGET,
           column_B=pairwise.REJECTED_TARGET),
        _e(between, column=pairwise.MARGIN, min_value=min_margin - 1e-9),
        _e("expect_column_values_to_not_be_null", column=pairwise.WEIGHT),
        _e(between, column=pairwise.WEIGHT, min_value=0, max_value=_LARGEST),
        *(_e(between, column=c, min_value=0, max_value=1, strict_min=True)
          for c in (pairwise.CHOSEN_PROPENSITY, pairwise.REJECTED_PROPENSITY)),
    ))


RAW_USER_COLUMNS = ("user_id",)
"""Columns that must never reach an output: the raw user id (units carry only its keyed hash)."""
RAW_ID_KEY = r'"user_id"\s*:\s*[^\s,}n]'
"""A quarantine record that still names the raw user id: a ``"user_id"`` key with a value other than null."""


def suite_columns(suite: Suite) -> list[str]:
    """The columns a suite reads, so that a gate loads only those (not the text)."""
    return sorted({c for e in suite.expectations for c in e.columns})
