"""``[ingest]``: what each signal type means (labels, votes, audit), and how raw rows become units."""

from __future__ import annotations

import datetime as dt
import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from schemas.config.base import Section

LabelRule = float | Literal["value", "1 - value"]
"""How a signal type gives a label: a number, or its value ('value', '1 - value')."""


class IngestConfig(Section):
    labels: dict[str, LabelRule] = Field(
        default_factory=lambda: {"upvote": 1.0, "downvote": 0.0, "edit": "1 - value", "copy": 1.0,
                                 "regenerate": 0.0},
        description="signal type -> label: a number, 'value' or '1 - value'",
    )
    explicit: list[str] = Field(
        default_factory=lambda: ["upvote", "downvote", "edit"],
        description="explicit types (votes): each rater's latest one counts, and ingest.aggregate combines the "
        "raters; implicit labels count only when a unit has no explicit vote",
    )
    aggregate: Literal["latest", "mean", "majority"] = Field(
        "mean", description="how the raters' votes on a unit make its label (a signal's rater is its user_id, "
        "or the impression's user when absent or null; a rater's own mind changes are one vote, their latest). "
        "'mean': the mean of the raters' labels, a soft label in [0, 1] (optionally shrunk by ingest.prior); the "
        "default, because it keeps every rater's evidence and, with one rater per unit, equals 'latest', the "
        "label logs with one rater always had. 'latest': the latest vote of any rater (order-dependent: most of "
        "the evidence is dropped). 'majority': 1 or 0 by the majority of the raters (a soft label counts for the "
        "side of 0.5 it is on, 0.5 itself abstains), 0.5 on a tie")
    prior: tuple[float, float] | None = Field(
        None, description="Beta(a, b) prior [a, b] (both > 0) shrinking the mean of a unit's n votes: label = "
        "(sum of labels + a) / (n + a + b), so units with few votes move towards a / (a + b) ([1, 1] is Laplace's "
        "rule); only with aggregate = 'mean'. None: the plain mean")
    observe: list[str] | None = Field(
        None, description="types whose presence makes a unit observed (default: the explicit ones)"
    )
    other_types: list[str] = Field(
        default_factory=lambda: ["click", "share", "report", "follow_up", "dwell"],
        description="known types that carry no label; they are counted on the unit",
    )
    gold: str | None = Field(
        "gold", description="signal type carrying an audited (gold) label in its value: recorded as label_gold, "
        "never as the user's label, and it does not make a unit observed; null: no audit signals")
    unobserved_label: float | None = Field(
        None, ge=0, le=1, description="click-through framing: label given to units with no signal"
    )
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    ts_unit: Literal["auto", "s", "ms", "us", "iso"] = Field(
        "auto", description="how a timestamp given as a number is read: epoch seconds, milliseconds or "
        "microseconds, 'auto' (by magnitude, per value: < 1e11 seconds, < 1e14 ms, < 1e17 us, else ns) or 'iso' "
        "(numbers are bad_timestamp). Strings are ISO-8601 in any case: a date and time, or a date alone (its "
        "midnight UTC)")
    day: dt.date | None = Field(
        None, description="process one logical day (UTC): its impressions, and their signals up to late_window "
        "days after the day ends; set by `obsfeed run --date`. None: every row of the input")
    late_window: int = Field(3, ge=0, le=366, description="days after a day's end that its signals may arrive")
    buckets: int = Field(8, ge=1, le=4096, description="hash buckets for the shuffle and output files")
    shuffle: Literal["files", "beam"] = Field(
        "files",
        description="how bucketed tables reach their bucket: 'files' writes them to Arrow files in a scratch "
        "folder of the run and shuffles only the paths (fast, memory bounded by a bucket; the folder must be "
        "visible to every worker), 'beam' sends them through the runner's shuffle as Arrow IPC bytes (for "
        "cluster runners without a shared filesystem)",
    )

    @model_validator(mode="after")
    def _check_types(self) -> IngestConfig:
        for name, types in (("explicit", self.explicit), ("observe", self.observe or [])):
            unknown = sorted(set(types) - set(self.labels))
            if unknown:
                raise ValueError(f"ingest.{name} names types without a label rule: {unknown}")
        if self.gold is not None and self.gold in {*self.labels, *self.other_types}:
            raise ValueError(f"ingest.gold type '{self.gold}' must not also be a label or other type")
        clash = sorted(set(self.other_types) & set(self.labels))
        if "votes" in {*self.labels, *self.other_types, self.gold}:     # its count column would be n_votes
            raise ValueError("ingest: a signal type may not be called 'votes' (its count column would clash with "
                             "the units column n_votes); rename it")
        if self.prior is not None and self.aggregate != "mean":
            raise ValueError(f"ingest.prior shrinks a mean of votes: it needs ingest.aggregate = 'mean', not "
                             f"{self.aggregate!r}")
        if clash:
            raise ValueError(f"ingest.other_types repeats label-bearing types: {clash}")
        for t, rule in self.labels.items():
            if isinstance(rule, float) and not 0 <= rule <= 1:
                raise ValueError(f"ingest.labels.{t} must be in [0, 1], got {rule}")
        return self

    @field_validator("prior")
    @classmethod
    def _prior_is_positive(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not all(math.isfinite(x) and x > 0 for x in v):
            raise ValueError(f"ingest.prior must be [a, b] with both a > 0 and b > 0, got {list(v)}")
        return v

    @property
    def observe_types(self) -> list[str]:
        return list(self.explicit) if self.observe is None else list(self.observe)

    @property
    def known_types(self) -> list[str]:
        return sorted({*self.labels, *self.other_types, *([self.gold] if self.gold else [])})

    @property
    def value_types(self) -> list[str]:
        """Types whose value must be a number in [0, 1]: labels read from the value, and gold labels."""
        return sorted({*(t for t, rule in self.labels.items() if isinstance(rule, str)),
                       *([self.gold] if self.gold else [])})
