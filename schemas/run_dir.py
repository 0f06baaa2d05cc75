"""Names inside a run directory (DESIGN §3). Every stage reads and writes only here."""

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

PROPENSITY_MODEL = "models/propensity.skops"
IMPUTATION_MODEL = "models/imputation.skops"
NOISE_MODEL = "models/noise.json"


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
