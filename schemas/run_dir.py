"""Names inside a run directory (docs/run-directory.md). Every stage reads and writes only here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.toml"
UNITS = "units"
QUARANTINE = "quarantine"
MODELS = "models"
DATASETS = "datasets"
POINTWISE = "datasets/pointwise"
PAIRWISE = "datasets/pairwise"
REWARD_MODEL = "reward_model"
REPORT = "report"
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
EVALUATION = "evaluation.json"
CHECKPOINTS = "checkpoints"
"""Per-stage state kept across a failed attempt so that a rerun can resume (train: checkpoints/train/<loss>)."""

# A scheduled root (`obsfeed run --date`): the datasets above as Hive partitions ``<dataset>/date=YYYY-MM-DD/``,
# each day's run directory (config, manifest, models, reward model, report) under ``days/YYYY-MM-DD``.
PARTITIONED = (UNITS, QUARANTINE, POINTWISE, PAIRWISE)
DAYS = "days"
FITS = "fits"
"""Models fitted on a window of days (``obsfeed fit ROOT --from --to``): ``fits/<first>_<last>/``."""
CATALOGUE = "catalogue.parquet"
LOCK = ".obsfeed.lock"
WORK = ".work"
"""Where a day is computed before its partitions are swapped in (hidden: dataset readers never look here)."""
DATE_PARTITION = "date"

FAILED_QUARANTINE = "failed/quarantine"
"""The quarantine of the latest ingest that failed its gates: for inspection; ``quarantine/`` stays as it was."""

# Inside MODELS: what the fit stage writes and score, train, report and evaluate read.
FEATURIZER = "featurizer.skops"
PROPENSITY = "propensity.skops"
IMPUTATION = "imputation.skops"
CONFOUNDING = "confounding.json"
NOISE = "noise.json"
CALIBRATION = "calibration.skops"
"""The clean-reward calibrators (``estimators.calibration``), saved when fit.noise resolves to 'calibrate'."""
WEIGHTS = "weights.json"
POSITIVITY = "positivity.json"
"""The overlap check of the fit sample (``positivity_check``): the strata that fail it, which score flags."""
REFERENCE = "reference.json"
"""The fit sample's profile (``estimators.drift.profile``) and date range: what later days are compared with."""
NOISE_MODEL = f"{MODELS}/{NOISE}"
WEIGHTS_FILE = f"{MODELS}/{WEIGHTS}"
"""The propensity floor the fit stage chose (``clip``): the only source of it after fit."""
POSITIVITY_FILE = f"{MODELS}/{POSITIVITY}"
"""The fit sample's overlap check: every categorical stratum and the propensity tail, and those that fail."""

# Inside REWARD_MODEL: the main model's folder, each baseline's under BASELINES/<loss>/, each with its metrics.
BASELINES = "baselines"
REWARD_METRICS = "metrics.json"
TRAIN_CHECKPOINT = "checkpoint.pt"
"""A loss's training state after its last epoch, under CHECKPOINTS/train/<loss>/."""
REPORT_PAGE = "index.html"
"""The report inside REPORT."""


@dataclass(frozen=True)
class RunDir:
    """A run directory; paths are derived, never hard-coded by the stages."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def run_id(self) -> str:
        return self.root.name
