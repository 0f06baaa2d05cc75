"""The run config: a pydantic model loaded from TOML, one section per stage (docs/cli.md#config).

An unknown key is an error naming it; bounds and choices live on the fields, so a typo fails at load
time rather than inside a Beam worker at night. Each section is a module of this package, named as the
section (``schemas/config/fit.py`` holds ``[fit]``); here are the root ``Config``, which stage reads which
section (``STAGE_SECTIONS``, for the stage digests) and the loaders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from pathlib import Path

import tomli_w
from pydantic import ValidationError, model_validator

from schemas.config.base import Section
from schemas.config.drift import DriftConfig
from schemas.config.fit import FitConfig
from schemas.config.ingest import IngestConfig, LabelRule
from schemas.config.input import DATE_FIELD, InputConfig, expand_inputs
from schemas.config.output import OutputConfig
from schemas.config.privacy import PrivacyConfig
from schemas.config.score import MOVED_TO_WEIGHTS, RENAMED, ScoreConfig
from schemas.config.train import TrainConfig
from schemas.config.weights import WeightsConfig
from schemas.errors import ConfigError

__all__ = ["DATE_FIELD", "MOVED_TO_WEIGHTS", "STAGE_SECTIONS", "Config", "DriftConfig", "FitConfig", "IngestConfig",
           "InputConfig", "LabelRule", "OutputConfig", "PrivacyConfig", "ScoreConfig", "Section", "TrainConfig",
           "WeightsConfig", "expand_inputs", "load_config", "parse_config"]


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("input", "ingest", "privacy", "output"),
    "fit": ("fit", "weights"),
    "score": ("fit", "weights", "score", "drift", "output"),
    "train": ("train",),
    "report": (),
}
"""The config sections each stage reads (``Config.stage_digest``)."""
logger = logging.getLogger(__name__)


class Config(Section):
    input: InputConfig
    ingest: IngestConfig = IngestConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    fit: FitConfig = FitConfig()
    weights: WeightsConfig = WeightsConfig()
    score: ScoreConfig = ScoreConfig()
    train: TrainConfig = TrainConfig()
    drift: DriftConfig = DriftConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _weights_moved_out_of_score(cls, data: object) -> object:
        """A config written before ``[weights]`` existed (a run directory's frozen ``config.toml``) still reads:
        its weight keys under ``[score]`` (and ``score.ess_floor``, the old name of ``ips_min_ess_share``) are
        read as ``[weights]`` with a warning. Set in both places, they are an error: which one holds is not
        for us to guess."""
        if not isinstance(data, dict) or not isinstance(data.get("score"), dict):
            return data
        score = dict(data["score"])
        old = [k for k in score if k in MOVED_TO_WEIGHTS or k in RENAMED]
        twice = [k for k in old if k in RENAMED and RENAMED[k] in old]
        if twice:
            raise ValueError(f"score.{twice[0]} is the old name of score.{RENAMED[twice[0]]} (now "
                             f"weights.{RENAMED[twice[0]]}): give only the latter")
        moved = {RENAMED.get(k, k): score.pop(k) for k in old}
        if not moved:
            return data
        weights = dict(data.get("weights") or {})
        both = sorted(set(moved) & set(weights))
        if both:
            raise ValueError(f"weights.{both[0]} is set twice, in [weights] and (under its old place) in [score]; "
                             "keep the one in [weights]")
        logger.warning("config: %s read as %s: the weights are decided by the fit stage, which reads [weights]; "
                       "move them there", ", ".join(f"score.{k}" for k in old),
                       ", ".join(f"weights.{k}" for k in moved))
        return {**data, "score": score, "weights": {**weights, **moved}}

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
