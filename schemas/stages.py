"""The stage contract, in the spirit of TFX's component = spec + executor.

Each stage is declared here once by a :class:`StageSpec`: its name, the run-directory entries it reads, the ones
it writes, and the type of the result it returns. The executor (``pipelines/<stage>.py: execute``) returns that
typed result; the manifest records it (``StageRecord``) and every reader — the CLI's summary, ``obsfeed runs``,
the scheduled runs' catalogue, the report — reads the typed fields back through :func:`stage_result`, not string
keys. Stages meet only in the run directory: no stage imports another, and this module imports no stage.

The figures of a result are typed where a reader uses them; the rest of each diagnostics block (the report's
detail tables) is kept as recorded (``extra="allow"``), so the manifest's JSON is the same as the result's dump.
See docs/architecture.md#stage-contract.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas import run_dir as rd
from schemas.errors import InputError


class _Record(BaseModel):
    """Keys a reader does not use are kept as recorded, so a dump gives back the manifest's JSON."""

    model_config = ConfigDict(extra="allow")


class InputFile(BaseModel):
    """One input file a stage read: what lineage and a later audit compare."""

    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str
    bytes: int


class StageResult(BaseModel):
    """What every stage returns: the files it read and wrote, its counts and its diagnostics."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[InputFile] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)

    def to_manifest(self) -> dict[str, Any]:
        """The result as the manifest records it (JSON types; only what the stage set)."""
        return self.model_dump(mode="json", exclude_unset=True)


# --- ingest ---------------------------------------------------------------------------------------------------

class TableCounts(_Record):
    """One raw table's rows: ``rows_in = rows_ok + rows_quarantined + rows_duplicate (+ rows_other_day)``."""

    rows_in: int
    rows_ok: int
    rows_quarantined: int
    rows_duplicate: int
    rows_other_day: int | None = None
    """Rows that belong to another day of a scheduled run (absent for a plain run)."""


class IngestDiagnostics(_Record):
    units: int
    observed: int
    observed_rate: float
    mean_label_observed: float | None = None
    quarantine_reasons: dict[str, int] = Field(default_factory=dict)
    votes: dict[str, Any] | None = None


class IngestResult(StageResult):
    counts: dict[str, TableCounts]
    diagnostics: IngestDiagnostics

    @property
    def quarantined(self) -> int:
        return sum(c.rows_quarantined for c in self.counts.values())


# --- fit ------------------------------------------------------------------------------------------------------

class FitCounts(_Record):
    units: int
    sample: int
    sample_observed: int


class PropensityDiagnostics(_Record):
    """The out-of-fold propensity model's quality and range."""

    auc: float | None = None
    ece: float | None = None
    distribution: dict[str, Any] = Field(default_factory=dict)


class FitDiagnostics(_Record):
    propensity: PropensityDiagnostics
    flip_rates: dict[str, Any] = Field(default_factory=dict)
    confounders: list[dict[str, Any]] = Field(default_factory=list)
    balance: list[dict[str, Any]] = Field(default_factory=list)


class FitResult(StageResult):
    counts: FitCounts
    diagnostics: FitDiagnostics


class ReusedModelsCounts(_Record):
    files: int


class ReusedModels(StageResult):
    """The fit stage of a scheduled day scored with models fitted elsewhere (``--models-from``): copied, not fitted,
    so there is no propensity diagnostic of this day."""

    reused_from: str
    counts: ReusedModelsCounts
    diagnostics: dict[str, Any] = Field(default_factory=dict)


# --- score ----------------------------------------------------------------------------------------------------

class ScoreCounts(_Record):
    units: int
    pointwise: int
    excluded_no_overlap: int
    pairs: int


class WeightSummary(_Record):
    """Kish effective sample size and concentration of one weight column over the observed units."""

    ess: float
    ess_share: float
    top1pct_share: float | None = None


class DriftSummary(_Record):
    propensity_psi: float | None = None
    label_rate_shift: float | None = None
    signal_mix_shift: float | None = None


class ScoreDiagnostics(_Record):
    n_observed: int
    clip: float
    """The propensity floor the weights were clipped at: fit's choice, read from ``models/weights.json``."""
    clipped: int
    weight_ips: WeightSummary
    weight_clipped: WeightSummary
    drift: DriftSummary | None = None

    @property
    def ess_share(self) -> float:
        """The headline ESS share (summary, ``obsfeed runs``, the catalogue): that of the clipped weights, the
        ones the datasets carry into training."""
        return self.weight_clipped.ess_share


class ScoreResult(StageResult):
    content_sha256: dict[str, str] = Field(default_factory=dict)
    counts: ScoreCounts
    diagnostics: ScoreDiagnostics


# --- train ----------------------------------------------------------------------------------------------------

class TrainCounts(_Record):
    rows: int
    observed: int


class RewardModelFit(_Record):
    """One trained loss: its best validation loss and epoch (and R² vs r* on simulated data)."""

    val_loss: float | None = None
    best_epoch: int | None = None
    val_r2_vs_truth: float | None = None


class TrainResult(StageResult):
    counts: TrainCounts | None = None
    """None when no pointwise loss was trained (``bt`` alone), and on a torchrun rank other than 0, which writes
    nothing; left out of the manifest then (older versions recorded ``{}``, read as None)."""
    diagnostics: dict[str, RewardModelFit] = Field(default_factory=dict)
    """Loss name → its fit (the main loss and each baseline)."""

    @field_validator("counts", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == {} else value


# --- report ---------------------------------------------------------------------------------------------------

class ReportCounts(_Record):
    figures: int


class ReportResult(StageResult):
    counts: ReportCounts
    diagnostics: dict[str, Any] = Field(default_factory=dict)


# --- the specs ------------------------------------------------------------------------------------------------

class StageSpec(BaseModel):
    """A stage's declaration: what it reads and writes in the run directory, and what it returns.

    ``inputs`` are hashed before the stage runs and ``outputs`` after it (lineage: a stage whose inputs were
    rewritten since is stale); outputs are committed only after the stage's gates pass."""

    model_config = ConfigDict(frozen=True)
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    result: type[StageResult]
    recorded_instead: tuple[type[StageResult], ...] = ()
    """Other results the manifest may hold for this stage (fit: :class:`ReusedModels`)."""


INGEST = StageSpec(name="ingest", inputs=(), outputs=(rd.UNITS, rd.QUARANTINE), result=IngestResult)
FIT = StageSpec(name="fit", inputs=(rd.UNITS,), outputs=(rd.MODELS,), result=FitResult,
                recorded_instead=(ReusedModels,))
SCORE = StageSpec(name="score", inputs=(rd.UNITS, rd.MODELS), outputs=(rd.DATASETS,), result=ScoreResult)
TRAIN = StageSpec(name="train", inputs=(rd.DATASETS, rd.MODELS), outputs=(rd.REWARD_MODEL,), result=TrainResult)
REPORT = StageSpec(name="report", inputs=(rd.UNITS, rd.QUARANTINE, rd.MODELS, rd.DATASETS, rd.REWARD_MODEL),
                   outputs=(rd.REPORT,), result=ReportResult)

SPECS: tuple[StageSpec, ...] = (INGEST, FIT, SCORE, TRAIN, REPORT)
"""The stages of a run, in order."""
STAGES: tuple[str, ...] = tuple(s.name for s in SPECS)
BY_NAME: dict[str, StageSpec] = {s.name: s for s in SPECS}


# --- reading results back -------------------------------------------------------------------------------------

class StageRecord(BaseModel):
    """A stage's entry in ``manifest.json``: the result's fields plus how the attempt went."""

    model_config = ConfigDict(extra="allow")
    status: str
    """running | ok | failed."""
    started_at: str = ""
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    pid: int | None = None
    host: str | None = None
    error: str | None = None
    lineage: dict[str, Any] | None = None


def stage_record(manifest: dict[str, Any], name: str) -> StageRecord | None:
    """The manifest's record of stage ``name``, or None if it never ran."""
    entry = manifest.get("stages", {}).get(name)
    return StageRecord.model_validate(entry) if entry else None


def stage_result(manifest: dict[str, Any], spec: StageSpec) -> Any:
    """The typed result of ``spec``'s stage as the manifest recorded it (``spec.result``, or one of
    ``spec.recorded_instead``), or None unless it finished ok. A record that is not that type (another version's
    manifest) is an InputError naming the stage."""
    entry = manifest.get("stages", {}).get(spec.name) or {}
    if entry.get("status") != "ok":
        return None
    record = set(StageRecord.model_fields)
    fields = {k: v for k, v in entry.items() if k not in record}
    kind = next((k for k in spec.recorded_instead                     # its own keys are there
                 if set(k.model_fields) - set(spec.result.model_fields) <= set(fields)), spec.result)
    try:
        return kind.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(f"manifest: the {spec.name} stage's record is not a {kind.__name__} "
                         f"({'.'.join(map(str, first['loc']))}: {first['msg']}); was it written by another version "
                         f"of obsfeed? Run the stage again") from None
