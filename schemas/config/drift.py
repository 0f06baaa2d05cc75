"""``[drift]``: the bounds a scheduled day's data is held to against its models' fit window."""

from __future__ import annotations

from pydantic import Field

from schemas.config.base import Section


class DriftConfig(Section):
    """Drift of a day against the window its models were fitted on (scheduled runs; docs/run-directory.md#drift)."""

    max_propensity_psi: float | None = Field(
        0.25, gt=0, description="population stability index of the day's propensities against the fit window's "
        "(10 quantile bins of the fit window; 0.1 is a shift worth a look, 0.25 a large one); None: not gated")
    max_label_rate_shift: float | None = Field(
        0.10, gt=0, le=1, description="absolute change of the observed units' mean label; None: not gated")
    max_signal_mix_shift: float | None = Field(
        0.20, gt=0, le=1, description="total variation distance between the signal-type mixes; None: not gated")
    gate: bool = Field(True, description="fail the day (exit 2) when a gated check exceeds its bound; false: "
                       "record and report only")
