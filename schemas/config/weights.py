"""``[weights]``: the inverse-propensity weights, decided by the fit stage (``models/weights.json``) and
applied by score."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from schemas.config.base import Section


class WeightsConfig(Section):
    """The inverse-propensity weights: the propensity floor, the degenerate-weights gate and the stabiliser.

    The fit stage decides on its sample what these ask for (the floor, under 'auto' its value; the monotone map)
    and writes it to ``models/weights.json``, which is from then on the only source of the floor; the score stage
    applies the stabiliser and checks the ESS again over every unit."""

    clip: float | Literal["auto", "none"] = Field(
        0.02, description="propensities are floored at clip for weight_clipped; 'auto' picks the smallest floor "
        "that keeps the Kish ESS of the clipped weights at min_ess_share of the observed units (on the fit "
        "sample); 'none': no floor (weight_clipped = weight_ips, e.g. for a logging policy's known propensities)")
    min_ess_share: float = Field(0.2, gt=0, le=1, description="the ESS share that clip = 'auto' keeps")
    ips_min_ess_share: float = Field(
        0.01, gt=0, le=1, description="fit and score fail (exit 2) when the Kish ESS of the IPS weights is below "
        "this share of the observed units (0.01 = 1%): no overlap, not a clipping matter")
    stabilize: Literal["none", "snips", "monotone"] = Field(
        "none", description="what weight_stabilized holds: 'none' = weight_clipped; 'snips' = weight_snips; "
        "'monotone' = isotonic-calibrated inverse propensities o / q(p̂) (q: increasing regression of observed on "
        "p̂ in the fit sample), monotone in p̂, self-normalised to mean 1 over observed units and blended toward 1 "
        "to meet max_weight_variance (van der Laan et al. 2024; CJE's SIMCal). 'monotone' needs some unobserved "
        "units (not the click-through framing)")
    max_weight_variance: float = Field(
        4.0, gt=0, description="stabilize = 'monotone': the variance cap of the mean-one weights over observed "
        "units (4 keeps a Kish ESS share of at least 1 / (1 + 4) = 20%)")

    @field_validator("clip")
    @classmethod
    def _clip_in_range(cls, v: float | str) -> float | str:
        if v not in ("auto", "none") and not 0 < v < 1:
            raise ValueError(f"clip must be in (0, 1), 'auto' or 'none', got {v}")
        return v
