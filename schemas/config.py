"""The run config: a pydantic model loaded from TOML, one section per stage (DESIGN §4).

An unknown key is an error naming it; bounds and choices live on the fields, so a typo fails at load
time rather than inside a Beam worker at night.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from schemas.errors import ConfigError, InputError

LabelRule = float | Literal["value", "1 - value"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    impressions: list[str] = Field(min_length=1, description="files or globs, relative to the config file")
    signals: list[str] = Field(min_length=1)
    truth: str | None = Field(None, description="simulator ground truth, used only by `evaluate`")

    @field_validator("impressions", "signals", mode="before")
    @classmethod
    def _as_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


class IngestConfig(_Section):
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


class PrivacyConfig(_Section):
    key_env: str = Field("OBSFEED_HASH_KEY", description="environment variable holding the HMAC key")
    allow_unkeyed: bool = Field(False, description="hash user ids without a key (not pseudonymous!)")


class FitConfig(_Section):
    text: list[str] = Field(default_factory=lambda: ["prompt", "response"])
    numeric: list[str] = Field(
        default_factory=lambda: ["response_length", "position"],
        description="numeric features; response_length is derived from the response text",
    )
    categorical: list[str] = Field(default_factory=lambda: ["model_version"])
    hash_features: int = Field(2**14, ge=16, le=2**24, description="hashed text n-gram dimensions")
    ngram_max: int = Field(2, ge=1, le=3)
    propensity_model: Literal["logistic", "boosted"] = Field(
        "logistic", description="'boosted': HistGradientBoosting over the logistic model's honest logit and the "
        "numeric/categorical features (selection that interacts with who rates and what was shown); slower")
    propensity_column: str | None = Field(
        None, description="a units column holding a logged propensity of observation (a known, randomised "
        "logging policy, or a published estimate); used instead of fitting a propensity model")
    imputation_model: Literal["logistic", "boosted"] = Field(
        "logistic", description="the model of P(label=1 | x) behind the DR target; 'boosted' as for noise_proxy")
    noise_proxy: Literal["logistic", "boosted"] = Field(
        "boosted", description="the model of P(label=1 | x) whose out-of-fold scores give the anchor points and the "
        "PPI predictions; 'boosted' learns the rater x content interactions and the plateaus at the flip rates "
        "that a logit overshoots (the same fit as the imputation model's when both name one model)")
    calibration: Literal["isotonic", "sigmoid"] = "isotonic"
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic models")
    noise: Literal["auto", "calibrate", "audit", "anchor", "fixed", "none"] = Field(
        "auto", description="how the clean-reward target is built. 'calibrate': learn E[r* | label, x] on the "
        "rated audited units and E[r* | x] on the unrated audited ones (label_gold), cross-fitted; the unit's "
        "calibrated reward is the target (label error may depend on x). The flip-rate methods assume "
        "class-conditional noise: 'audit' counts the rates on observed units that also carry a gold label; "
        "'anchor' estimates them from quantiles of the noise proxy's out-of-fold scores; 'fixed' uses "
        "fit.flip_rates as given. 'auto' calibrates when the audit has min_audit rated and min_audit unrated "
        "audited units of each gold label, else applies anchor rates only when they are identified, else no "
        "correction; 'none' assumes clean labels (rho01 = rho10 = 0)")
    min_audit: int = Field(30, ge=1, description="audited units needed per gold label to audit or calibrate (for "
                           "calibrate: among the rated and among the unrated units each)")
    max_audit_se: float = Field(0.03, gt=0, le=0.5, description="no longer used ('auto' calibrates on an audit "
                                "instead of applying its flip rates; audit rates are judged by max_flip_ci_width); "
                                "still read so that older configs load")
    anchor_quantile: float = Field(0.01, gt=0, lt=0.5, description="quantile used as the anchor points")
    min_anchor_units: int = Field(
        20, ge=1, description="anchor flip rates are identified only with at least this many units in each "
        "anchor tail (anchor_quantile x the observed units of the fit sample): a quantile of a few scores is a guess")
    max_flip_ci_width: float = Field(
        0.1, gt=0, le=1, description="flip rates are identified only when each one's 95% CI (anchors: bootstrap "
        "over units, given the fitted proxy; audit: Wilson) is at most this wide")
    max_flip_sum: float = Field(
        0.8, gt=0, lt=1, description="flip rates are identified only when the upper bound of rho01 + rho10 (the "
        "sum of the CIs' upper ends) is at most this: the correction divides by 1 - rho01 - rho10")
    flip_rates: list[float] | None = Field(
        None, validate_default=True, description="[rho01, rho10], the flip rates of noise = 'fixed' (e.g. from "
        "an earlier audit): required then, refused otherwise; each in [0, 1), their sum < 1")
    confounders: list[str] = Field(
        default_factory=lambda: ["response_length"],
        description="numeric features whose effect on the label is estimated by DML and removed in "
        "target_deconfounded (response_length on the log scale); each must be in fit.numeric")
    confounder_model: Literal["linear_dml", "causal_forest_dml"] = "linear_dml"
    confounder_weighting: Literal["none", "ipw"] = Field(
        "none", description="'ipw' weights the observed units by their clipped inverse propensities in the DML "
        "fit (the population effect; removes collider bias when selection acts on quality and the confounder, "
        "but carries the propensity model's errors: see benchmarks/RESULTS.md)")
    confounder_controls: int = Field(50, ge=1, le=500, description="SVD components of the text used as controls")
    confounder_benchmark: float = Field(
        0.05, ge=0, lt=1, description="the strength of a hypothetical unmeasured confounder (partial R² with both "
        "the treatment and the label, c_t = c_y) at which confounding.json reports each effect's sensitivity bounds "
        "beside its robustness values")
    folds: int = Field(5, ge=2, le=20)
    max_rows: int = Field(200_000, ge=100)
    positivity: Literal["warn", "exclude", "fail"] = Field(
        "warn", description="what happens to units where overlap fails (a value of a fit.categorical column with "
        "fewer than min_stratum_observed observed units, or most of its propensities below positivity_floor; "
        "and every unit whose propensity is below positivity_floor), checked by fit on its sample: 'warn' keeps "
        "them, flagged in the pointwise column overlap_violation, and logs a warning; 'exclude' drops them from "
        "the pointwise and pairwise datasets (counted in the score stage's counts); 'fail' stops fit (exit 2) "
        "naming the failed strata (a propensity tail is a failed stratum when it holds more than "
        "positivity_max_tail_share of the sample)")
    positivity_floor: float = Field(
        0.01, gt=0, lt=0.5, description="propensity below which a unit has no practical overlap: its IPS weight "
        "would exceed 1/floor (100 at 0.01) and its DR target is the imputation model's extrapolation")
    min_stratum_observed: int = Field(
        5, ge=1, description="a categorical stratum (one value of a fit.categorical column) with fewer observed "
        "units than this, and some unobserved ones, fails overlap: its units' targets could not be checked "
        "against a label")
    positivity_max_tail_share: float = Field(
        0.05, ge=0, le=1, description="the share of the fit sample with a propensity below positivity_floor above "
        "which the tail itself is a failed stratum (fails fit under positivity = 'fail'); smaller tails are "
        "flagged unit by unit only (isotonic calibration puts a few units at the model's clip)")
    seed: int = 0

    @field_validator("flip_rates")
    @classmethod
    def _fixed_flip_rates(cls, v: list[float] | None, info: ValidationInfo) -> list[float] | None:
        noise = info.data.get("noise")
        if noise is None:                                    # fit.noise itself failed: that error is the one shown
            return v
        if noise == "fixed" and v is None:
            raise ValueError("fit.noise = 'fixed' needs fit.flip_rates = [rho01, rho10]")
        if noise != "fixed" and v is not None:
            raise ValueError(f"fit.flip_rates is used only by fit.noise = 'fixed' (fit.noise = {noise!r})")
        if v is None:
            return v
        if len(v) != 2:
            raise ValueError(f"fit.flip_rates must be two numbers [rho01, rho10], got {len(v)}")
        if not all(0 <= r < 1 for r in v):
            raise ValueError(f"fit.flip_rates must each be in [0, 1), got {v}")
        if v[0] + v[1] >= 1:
            raise ValueError(f"fit.flip_rates sum to {v[0] + v[1]:g} >= 1: the labels would carry no usable signal "
                             "(the correction divides by 1 - rho01 - rho10)")
        return v

    @model_validator(mode="after")
    def _confounders_are_numeric_features(self) -> FitConfig:
        missing = [c for c in self.confounders if c not in self.numeric]
        if missing:
            raise ValueError(f"fit.confounders names {missing}, which are not in fit.numeric")
        return self


class ScoreConfig(_Section):
    clip: float | Literal["auto", "none"] = Field(
        0.02, description="propensities are floored at clip for weight_clipped; 'auto' picks the smallest floor "
        "that keeps the Kish ESS of the clipped weights at min_ess_share of the observed units (on the fit "
        "sample); 'none': no floor (weight_clipped = weight_ips, e.g. for a logging policy's known propensities)")
    min_ess_share: float = Field(0.2, gt=0, le=1, description="the ESS share that clip = 'auto' keeps")
    ips_min_ess_share: float = Field(
        0.01, gt=0, le=1, description="fit and score fail (exit 2) when the Kish ESS of the IPS weights is below "
        "this share of the observed units (0.01 = 1%): no overlap, not a clipping matter")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        """``ess_floor``, this key's old name, still reads (run directories' frozen configs hold it)."""
        if isinstance(data, dict) and "ess_floor" in data:
            data = dict(data)
            if "ips_min_ess_share" in data:
                raise ValueError("score.ess_floor is the old name of score.ips_min_ess_share: give only the latter")
            data["ips_min_ess_share"] = data.pop("ess_floor")
        return data

    @field_validator("clip")
    @classmethod
    def _clip_in_range(cls, v: float | str) -> float | str:
        if v not in ("auto", "none") and not 0 < v < 1:
            raise ValueError(f"clip must be in (0, 1), 'auto' or 'none', got {v}")
        return v
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
    stabilize: Literal["none", "snips", "monotone"] = Field(
        "none", description="what weight_stabilized holds: 'none' = weight_clipped; 'snips' = weight_snips; "
        "'monotone' = isotonic-calibrated inverse propensities o / q(p̂) (q: increasing regression of observed on "
        "p̂ in the fit sample), monotone in p̂, self-normalised to mean 1 over observed units and blended toward 1 "
        "to meet max_weight_variance (van der Laan et al. 2024; CJE's SIMCal). 'monotone' needs some unobserved "
        "units (not the click-through framing)")
    max_weight_variance: float = Field(
        4.0, gt=0, description="stabilize = 'monotone': the variance cap of the mean-one weights over observed "
        "units (4 keeps a Kish ESS share of at least 1 / (1 + 4) = 20%)")
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


class TrainConfig(_Section):
    loss: Literal["naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr", "bt"] = "ips"
    baselines: list[Literal["naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr", "bt"]] = Field(
        default_factory=lambda: ["naive"], description="losses trained beside the main one, for comparison "
        "(causalrm_*: the noise-corrected loss with the fit stage's flip rates; bt: weighted Bradley-Terry on the "
        "pairwise dataset)")
    backbone: str = Field(
        "hashed", description="'hashed': obsfeed's bag of hashed n-grams (fast, learns little from real text); or "
        "a local Hugging Face model folder (config.json, safetensors weights, tokenizer; encoder or decoder), "
        "fine-tuned as AutoModelForSequenceClassification with one output; relative to the config file; never "
        "downloaded")
    max_length: int = Field(
        512, ge=2, description="transformer backbones: tokens per (prompt, response) pair; a longer pair loses "
        "prompt tokens from the left (only a response longer than this is cut), and is counted, never dropped")
    lora_rank: int = Field(0, ge=0, description="transformer backbones: > 0 trains LoRA adapters of this rank "
                           "on every linear layer (needs peft: pip install 'obsfeed[lora]') and the head")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling alpha; None: 2 x lora_rank")
    trainable_layers: int | None = Field(
        None, ge=0, description="transformer backbones: train only the top k layers and the head (0: the head "
        "only), the rest stays as pretrained; None: every layer. Makes CPU fine-tuning affordable")
    gradient_checkpointing: bool = Field(False, description="transformer backbones: recompute activations in "
                                         "the backward pass (less memory, about a third more time)")
    hash_features: int = Field(2**18, ge=16, le=2**24, description="hashed n-gram buckets of prompt + response")
    ngram_max: int = Field(1, ge=1, le=3, description="word n-grams up to this length (bigrams overfit small logs)")
    numeric: list[str] = Field(
        default_factory=list, description="pointwise numeric columns added as standardised features "
        "(response_length = log words of the response, derived). None by default: a reward model fed a "
        "confounder such as length can learn the bias it carries")
    embedding_model: str | None = Field(
        None, description="a local sentence-embedding model added as features: a sentence-transformers folder "
        "(needs that package) or a word-vector text file (GloVe/word2vec/fastText .vec); relative to the "
        "config file; never downloaded")
    hidden: int = Field(0, ge=0, description="0 = linear reward model over hashed n-grams")
    factors: int = Field(0, ge=0, description="k > 0 adds factorisation-machine pairwise interactions with k "
                         "factors; over user and item id tokens, matrix factorisation with biases")
    epochs: int | None = Field(None, ge=1, description="at most: early stopping on the validation loss usually ends "
                               "sooner; None: 30 for the hashed backbone, 3 for a transformer (the learning-rate "
                               "schedule spans these epochs)")
    batch_size: int = Field(256, ge=1, description="rows per process per micro-batch; an optimiser step takes "
                            "batch_size x grad_accumulation x processes rows")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches whose gradients add up to one step")
    lr: float | None = Field(None, gt=0, description="AdamW's peak learning rate; None: 0.05 for the hashed "
                             "backbone, 5e-5 for a transformer")
    lr_schedule: Literal["auto", "constant", "linear", "cosine"] = Field(
        "auto", description="after the warmup, the learning rate stays (constant) or decays to 0 over the "
        "epochs (linear, cosine); auto: constant for the hashed backbone, linear for a transformer")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="share of the steps with a linear warmup "
                                       "from 0; None: 0 for the hashed backbone, 0.1 for a transformer")
    max_grad_norm: float | None = Field(None, ge=0, description="clip the gradient's norm to this (0: no "
                                        "clipping); None: 0 for the hashed backbone, 1.0 for a transformer")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA (where the card supports it), fp32 on CPU")
    weight_decay: float = Field(1e-6, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    val_by: Literal["prompt", "unit"] = Field(
        "prompt", description="held-out split by prompt (a prompt's responses stay together: no leak through the "
        "prompt) or by unit (id data such as user x item ratings, where holding out whole users would make "
        "them cold-start)")
    patience: int = Field(2, ge=1)
    calibrate: Literal["none", "gold"] = Field(
        "none", description="'gold': after training, fit s' = a*s + b (a > 0, so rankings stay) on the units with "
        "an audited label (label_gold) by log-loss. Selection on the true label itself cannot be seen from x, so "
        "no weight from p(x) undoes it; a random audit can, and this puts P(r*=1|x) on its level. Every loss")
    allow_unidentified_noise: bool = Field(
        False, description="train the noise-aware losses (causalrm_*) with flip rates the fit stage marked as not "
        "identified (models/noise.json); false: train fails (exit 2) naming their intervals")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _backbone_settings(self) -> TrainConfig:
        if self.backbone != "hashed":
            used = [k for k in ("numeric", "embedding_model", "hidden", "factors") if getattr(self, k)]
            if used:
                raise ValueError(f"train.{used[0]} is a setting of the hashed backbone; a transformer backbone reads "
                                 "the (prompt, response) text only")
        else:
            used = [k for k in ("lora_rank", "trainable_layers", "gradient_checkpointing")
                    if getattr(self, k) not in (0, None, False)]
            if used:
                raise ValueError(f"train.{used[0]} is a setting of a transformer backbone; train.backbone is "
                                 "'hashed'")
        if self.lora_rank and self.trainable_layers is not None:
            raise ValueError("train.lora_rank and train.trainable_layers: choose one (LoRA already freezes the "
                             "backbone)")
        return self


class DriftConfig(_Section):
    """Drift of a day against the window its models were fitted on (scheduled runs; DESIGN §3)."""

    max_propensity_psi: float | None = Field(
        0.25, gt=0, description="population stability index of the day's propensities against the fit window's "
        "(10 quantile bins of the fit window; 0.1 is a shift worth a look, 0.25 a large one); None: not gated")
    max_label_rate_shift: float | None = Field(
        0.10, gt=0, le=1, description="absolute change of the observed units' mean label; None: not gated")
    max_signal_mix_shift: float | None = Field(
        0.20, gt=0, le=1, description="total variation distance between the signal-type mixes; None: not gated")
    gate: bool = Field(True, description="fail the day (exit 2) when a gated check exceeds its bound; false: "
                       "record and report only")


class OutputConfig(_Section):
    partition_by: Literal["none", "date"] = Field(
        "none", description="'date' writes the pointwise and pairwise datasets as date=YYYY-MM-DD/part-*.parquet "
        "(UTC date of ts; hive style, so polars, pyarrow.dataset, DuckDB and Spark can prune on it)")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    row_group_size: int = Field(131_072, ge=1024)


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("input", "ingest", "privacy", "output"),
    "fit": ("fit", "score"),
    "score": ("fit", "score", "drift", "output"),
    "train": ("train",),
    "report": (),
}
"""The config sections each stage reads (``Config.stage_digest``)."""


class Config(_Section):
    input: InputConfig
    ingest: IngestConfig = IngestConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    fit: FitConfig = FitConfig()
    score: ScoreConfig = ScoreConfig()
    train: TrainConfig = TrainConfig()
    drift: DriftConfig = DriftConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _pairs_can_exist(self) -> Config:
        """A pairwise loss is refused before any stage runs when the config alone says there will be no pair:
        labels lie in [0, 1], so no two differ by more than 1."""
        wants_pairs = "bt" in (self.train.loss, *self.train.baselines)
        if wants_pairs and self.score.pair_target == "label" and self.score.min_margin > 1:
            raise ValueError(f"train asks for loss 'bt', but no pair can exist: labels lie in [0, 1] and "
                             f"score.min_margin = {self.score.min_margin} > 1 with score.pair_target = 'label'")
        return self

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(exclude_none=True))

    def stage_digest(self, stage: str) -> str:
        """sha256 of the sections ``stage`` reads (``STAGE_SECTIONS``): recorded in its lineage, so that a stage
        that ran with other settings than the run's config now holds is stale."""
        dump = self.model_dump(mode="json", include=set(STAGE_SECTIONS.get(stage, ())),
                               exclude={"train": {"device"}})
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()

    def digest(self) -> str:
        """sha256 of the canonical JSON form: the config hash recorded in the manifest. ``train.device`` is left
        out: like the Beam runner, it says where to compute, not what (``obsfeed train --device`` overrides it)."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"train": {"device"}}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _describe(err: ValidationError, path: Path) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key '{where}'"
    if first["type"] == "missing":
        return f"{path}: missing key '{where}'"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{path}: key '{where}': {msg}" if where else f"{path}: {msg}"


def parse_config(text: str, *, path: Path | str = "<config>", base: Path | None = None) -> Config:
    """Parse TOML text into a :class:`Config`; input paths are resolved against ``base``."""
    path = Path(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from e
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, path)) from e
    if base is None:
        return cfg

    def resolve(p: str) -> str:
        return p if Path(p).is_absolute() else str((base / p).resolve())

    inp = cfg.input
    resolved = inp.model_copy(
        update={
            "impressions": [resolve(p) for p in inp.impressions],
            "signals": [resolve(p) for p in inp.signals],
            "truth": resolve(inp.truth) if inp.truth else None,
        }
    )
    paths = {"embedding_model": resolve(cfg.train.embedding_model)} if cfg.train.embedding_model else {}
    if cfg.train.backbone != "hashed":
        paths["backbone"] = resolve(cfg.train.backbone)
    train = cfg.train.model_copy(update=paths)
    return cfg.model_copy(update={"input": resolved, "train": train})


def load_config(path: Path | str) -> Config:
    """Load and validate a TOML config; relative input paths are relative to the config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    return parse_config(path.read_text(), path=path, base=path.parent.resolve())


DATE_FIELD = "{date}"
"""In an input path, the logical day of a scheduled run (YYYY-MM-DD): logs stored by day, e.g.
``logs/impressions/date={date}/*.parquet``, are then read for the days a run needs, not the whole history."""


def expand_inputs(patterns: list[str], *, what: str, day: dt.date | None = None, late_window: int = 0,
                  ) -> list[str]:
    """Expand files/globs/folders (:func:`_matches`) to a sorted list of files; none found is an error naming the
    pattern.

    A pattern with ``{date}`` is read for each day from ``day - late_window`` to ``day + late_window`` (the
    days whose rows a scheduled day owns or must see: ``transforms.window``); only ``day`` itself must
    have files. Without a ``day`` such a pattern is an error: it needs ``--date``.
    """
    files: list[str] = []
    for pattern in patterns:
        if DATE_FIELD in pattern:
            if day is None:
                raise ConfigError(f"{pattern}: an input path with {DATE_FIELD} needs a scheduled run (--date)")
            for offset in range(-late_window, late_window + 1):
                d = day + dt.timedelta(days=offset)
                found = _matches(pattern.replace(DATE_FIELD, d.isoformat()))
                if not found and offset == 0:
                    raise InputError(f"{pattern}: no {what} input file found for {d}")
                files.extend(found)
            continue
        matched = _matches(pattern)
        if not matched:
            raise InputError(f"{pattern}: no {what} input file found")
        files.extend(matched)
    return files


def _matches(pattern: str) -> list[str]:
    """The files of a file, glob or folder, sorted. A folder (or a folder a glob matches) is read as polars,
    pyarrow and DuckDB read a dataset: every data file below it, hive-style ``date=.../`` folders included,
    skipping entries whose name starts with '.' or '_' (``_SUCCESS``, ``.part-0.crc``, ``_temporary/``) and files
    of other formats. The formats are those of ``transforms.read.file_format``: keep the two lists alike."""
    formats = (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv", ".tsv")

    def is_data(name: str) -> bool:
        name = name.lower()
        for suffix in (".gz", ".bz2", ".zst"):
            name = name.removesuffix(suffix)
        return name.endswith(formats)

    files = []
    for found in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]):
        path = Path(found)
        if path.is_file():
            files.append(found)
        elif path.is_dir():
            files.extend(str(f) for f in path.rglob("*") if f.is_file() and is_data(f.name)
                         and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts))
    return sorted(files)
