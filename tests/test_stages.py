"""The stage contract (schemas/stages.py): what each stage declares, and typed results read back from a manifest."""

from __future__ import annotations

import pytest

from schemas import run_dir as rd
from schemas.errors import InputError
from schemas.stages import (
    FIT,
    INGEST,
    SPECS,
    TRAIN,
    FitCounts,
    FitDiagnostics,
    FitResult,
    IngestDiagnostics,
    IngestResult,
    PropensityDiagnostics,
    ReusedModels,
    ReusedModelsCounts,
    TableCounts,
    TrainResult,
    stage_record,
    stage_result,
)

RUN_DIR_NAMES = {v for k, v in vars(rd).items() if k.isupper() and isinstance(v, str)}


def _manifest(**stages: dict) -> dict:
    return {"run_id": "r", "stages": stages}


def _ingest() -> IngestResult:
    table = TableCounts(rows_in=10, rows_ok=8, rows_quarantined=1, rows_duplicate=1)
    return IngestResult(counts={"impressions": table, "signals": table},
                        diagnostics=IngestDiagnostics(units=8, observed=3, observed_rate=0.375,
                                                      label_source={"vote": 3}))


def test_every_stage_declares_run_directory_names_and_a_result_type():
    assert [s.name for s in SPECS] == ["ingest", "fit", "score", "train", "report"]
    for spec in SPECS:
        assert set(spec.inputs) | set(spec.outputs) <= RUN_DIR_NAMES, spec.name
        assert spec.outputs, f"{spec.name} writes nothing"
    produced = {name for s in SPECS for name in s.outputs}
    assert {name for s in SPECS for name in s.inputs} <= produced      # every input is some stage's output


def test_a_result_reads_back_as_recorded_detail_included():
    record = {"status": "ok", "wall_s": 1.5, **_ingest().to_manifest()}
    back = stage_result(_manifest(ingest=record), INGEST)
    assert back == _ingest() and back.quarantined == 2
    assert back.diagnostics.model_extra == {"label_source": {"vote": 3}}          # detail kept, not typed
    assert back.to_manifest() == _ingest().to_manifest()
    assert "rows_other_day" not in back.to_manifest()["counts"]["impressions"]   # only what the stage set
    assert stage_record(_manifest(ingest=record), "ingest").wall_s == 1.5


def test_a_stage_that_did_not_finish_ok_has_no_result():
    assert stage_result(_manifest(), INGEST) is None
    for status in ("running", "failed"):
        assert stage_result(_manifest(ingest={"status": status, **_ingest().to_manifest()}), INGEST) is None


def test_reused_models_are_told_from_a_fit():
    reused = ReusedModels(reused_from="/elsewhere/models", counts=ReusedModelsCounts(files=7)).to_manifest()
    assert isinstance(stage_result(_manifest(fit={"status": "ok", **reused}), FIT), ReusedModels)
    fit = FitResult(counts=FitCounts(units=8, sample=8, sample_observed=3),
                    diagnostics=FitDiagnostics(propensity=PropensityDiagnostics(auc=0.7))).to_manifest()
    assert isinstance(stage_result(_manifest(fit={"status": "ok", **fit}), FIT), FitResult)


def test_a_record_that_is_not_the_declared_result_is_an_input_error_naming_the_stage():
    broken = {"status": "ok", **_ingest().to_manifest()}
    del broken["diagnostics"]["observed"]
    with pytest.raises(InputError, match=r"the ingest stage's record is not a IngestResult \(diagnostics.observed"):
        stage_result(_manifest(ingest=broken), INGEST)


def test_train_counts_are_optional_and_an_older_empty_block_reads_as_none():
    assert "counts" not in TrainResult(diagnostics={}).to_manifest()          # bt alone: no pointwise counts
    old = stage_result(_manifest(train={"status": "ok", "counts": {}, "diagnostics": {"bt": {"val_loss": 0.6}}}),
                       TRAIN)
    assert old.counts is None and old.diagnostics["bt"].val_loss == 0.6


def test_peak_memory_is_the_stage_process_own_not_its_launchers():
    """Linux carries a parent's peak into a child's ru_maxrss across fork and exec: a stage launched by a process
    that once held 400 MB must not report 400 MB."""
    import subprocess
    import sys

    held = bytearray(400 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])                 # touched: resident
    code = "from pipelines.orchestration.registry import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    del held
    assert float(out) < 350, out
