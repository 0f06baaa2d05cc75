"""One logical day of a scheduled run (``ingest.day``): which rows it owns, which it only looks at.

A day D owns its impressions (``ts`` in [D, D+1)) and their signals that arrive by the end of the late window
(D+1+late_window). To tell a late signal of D from a signal of a neighbouring day, and an orphan from either,
the run also reads the neighbours: impressions and signals within ``late_window`` days either side of D are
*context*. Every input row then lands in exactly one day's outputs: a unit of D, a quarantine row of the day
its own ``ts`` falls in (an orphan signal, a malformed row), or, in every other day's run, the count
``rows_other_day``. Rows whose ``ts`` cannot be read belong to no day: each run that reads them quarantines
them (with input files per day, that is one run).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import polars as pl

OTHER_DAY = "rows_other_day"


@dataclass(frozen=True)
class DayWindow:
    day: dt.date
    late_window: int

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.day, dt.time(), tzinfo=dt.UTC)

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(days=1)

    @property
    def late_end(self) -> dt.datetime:
        """Signals of the day's impressions count until here (exclusive)."""
        return self.end + dt.timedelta(days=self.late_window)

    @property
    def context_start(self) -> dt.datetime:
        return self.start - dt.timedelta(days=self.late_window)

    def owns(self, ts: pl.Expr) -> pl.Expr:
        """Rows whose own ``ts`` is in the day (impressions of the day; quarantine rows it reports)."""
        return (ts >= self.start) & (ts < self.end)

    def in_context(self, ts: pl.Expr) -> pl.Expr:
        """Rows the day reads: its own, and those within ``late_window`` days either side."""
        return (ts >= self.context_start) & (ts < self.late_end)

    @staticmethod
    def of(day: dt.date | None, late_window: int) -> DayWindow | None:
        return None if day is None else DayWindow(day, late_window)
