"""``[score]``: what the score stage builds from the fitted models: DR variant, target policy, pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.config.base import Section

MOVED_TO_WEIGHTS = ("clip", "min_ess_share", "ips_min_ess_share", "stabilize", "max_weight_variance")
"""``[score]`` keys that moved to ``[weights]`` (the section fit reads, as fit decides them)."""
RENAMED = {"ess_floor": "ips_min_ess_share"}
"""Old ``[score]`` names of ``[weights]`` keys."""


class ScoreConfig(Section):
    """The score stage's own settings; the weights it applies were decided by fit (``[weights]``)."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        """A key that moved to ``[weights]`` is refused here, naming its new place (no silent default instead);
        a whole config moves them for an old file first (``Config``)."""
        if isinstance(data, dict):
            moved = [k for k in data if k in MOVED_TO_WEIGHTS or k in RENAMED]
            if moved:
                key = moved[0]
                raise ValueError(f"score.{key} is now weights.{RENAMED.get(key, key)}: the weights are decided by "
                                 f"the fit stage, which reads [weights]; move it there")
        return data

    pairs: Literal["all", "capped", "best_vs_worst"] = Field(
        "capped", description="which pairs of a prompt's units: every pair at least min_margin apart ('all'), "
        "the max_pairs_per_prompt widest-margin ones ('capped'), or the single widest ('best_vs_worst')")
    pair_target: Literal["label", "target_dr"] = Field(
        "label", description="what orders a pair: the observed label (observed units, SNIPS-weighted) or the DR "
        "pseudo-outcome (every unit, weight 1)")
    min_margin: float = Field(0.5, ge=0, description="smallest target difference that makes a pair")
    max_pairs_per_prompt: int = Field(6, ge=1, description="the cap of pairs = 'capped'")
    pair_weight: Literal["product", "min"] = Field(
        "product", description="a pair's weight from its units' weights (then normalised to mean 1)")
    buckets: int = Field(8, ge=1, le=4096)
    dr_variant: Literal["standard", "switch", "shrink"] = Field(
        "standard", description="the residual weight of target_dr (and the DR targets built on it): 'standard' "
        "weight_clipped; 'switch' (Switch-DR, Wang et al. 2017) the imputation alone where weight_clipped > "
        "switch_tau; 'shrink' (optimistic shrinkage, Su et al. 2020) lambda w / (w^2 + lambda), lambda = "
        "shrink_lambda")
    switch_tau: float = Field(20.0, gt=0, description="dr_variant = 'switch': the largest weight whose residual "
                              "is kept (20: units with p̂ below 5% are imputed only)")
    shrink_lambda: float = Field(400.0, gt=0, description="dr_variant = 'shrink': lambda (a weight w stays about "
                                 "w while w is well below sqrt(lambda) = 20; the shrunk weight is at most 10)")
    target_policy: Literal["logging", "uniform", "column"] = Field(
        "logging", description="the policy the weights evaluate (exposure logs, obp-style): 'logging' weights "
        "o / p̂ as logged; 'uniform' multiplies them by pi_target = 1 / (distinct responses of the unit's prompt in "
        "the data); 'column' by pi_target from target_column. The score stage reports the target policy's value "
        "(IPS, SNIPS) in its diagnostics; target_dr keeps the logging weights (a unit's reward does not depend "
        "on the policy)")
    target_column: str | None = Field(None, description="target_policy = 'column': the units column holding "
                                      "pi_target(response | prompt) in [0, 1]")

    @model_validator(mode="after")
    def _target_column_given(self) -> ScoreConfig:
        if (self.target_policy == "column") != (self.target_column is not None):
            raise ValueError("score.target_column must be given exactly when score.target_policy = 'column', got "
                             f"target_policy = {self.target_policy!r}, target_column = {self.target_column!r}")
        return self
