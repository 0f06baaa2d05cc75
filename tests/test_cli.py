"""Bad input: exit code 2, one line naming the file and the problem, and no run left looking complete."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.orchestration.cli import main
from schemas import run_dir as rd
from schemas.stages import (
    FitCounts,
    FitDiagnostics,
    FitResult,
    IngestDiagnostics,
    IngestResult,
    PropensityDiagnostics,
    ScoreCounts,
    ScoreDiagnostics,
    ScoreResult,
    TableCounts,
    WeightSummary,
)
from tests.conftest import config_text
from transforms.runner import beam_args_with_defaults


def _fails_with(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert all(n in line for n in needles), line
    assert not any("Traceback" in e for e in err)
    return line


def test_missing_config(tmp_path: Path, capsys):
    _fails_with(capsys, ["run", str(tmp_path / "nope.toml"), str(tmp_path / "run")], "nope.toml", "not found")


def test_malformed_config(tmp_path: Path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[input\nimpressions = 1\n")
    _fails_with(capsys, ["run", str(cfg), str(tmp_path / "run")], "cfg.toml", "malformed TOML")
    cfg.write_text(config_text(tmp_path, fit={"foldz": 3}))
    _fails_with(capsys, ["run", str(cfg), str(tmp_path / "run")], "cfg.toml", "unknown key 'fit.foldz'")


def test_missing_input_file(tmp_path: Path, capsys, hash_key):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(tmp_path / "absent"))
    _fails_with(capsys, ["run", str(cfg), str(tmp_path / "run")], "absent/impressions/*.parquet",
                "no impressions input file found")
    assert not (tmp_path / "run" / rd.SUCCESS).exists()


def test_missing_required_column(sim_small: Path, tmp_path: Path, capsys, hash_key):
    data = tmp_path / "data"
    (data / "impressions").mkdir(parents=True)
    for part in (sim_small / "impressions").glob("*.parquet"):
        pq.write_table(pq.read_table(part).drop(["user_id"]), data / "impressions" / part.name)
    (data / "signals.jsonl.gz").write_bytes((sim_small / "signals.jsonl.gz").read_bytes())
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(data))
    run = tmp_path / "run"
    _fails_with(capsys, ["run", str(cfg), str(run)], "part-00000.parquet", "required column 'user_id' is missing")
    assert not (run / rd.SUCCESS).exists() and not (run / rd.UNITS).exists()
    assert '"status": "failed"' in (run / rd.MANIFEST).read_text()


def test_stage_on_a_folder_that_is_not_a_run(tmp_path: Path, capsys):
    _fails_with(capsys, ["fit", str(tmp_path)], "config.toml", "not found")


def test_unknown_stage(tmp_path: Path, capsys, sim_small: Path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(sim_small))
    _fails_with(capsys, ["run", str(cfg), str(tmp_path / "run"), "--stages", "ingest,fitt"], "unknown stage 'fitt'")


@pytest.mark.parametrize(("given", "runner"), [
    ([], "--runner=FnApiRunner"), (["--runner=FlinkRunner"], "--runner=FlinkRunner"),
    (["--runner", "SparkRunner"], "SparkRunner")])
def test_runner_is_an_option(given, runner):
    args = beam_args_with_defaults(given)
    assert runner in args
    assert sum(a.startswith("--runner") for a in args) == 1


def test_the_default_runner_is_fnapi_with_the_callers_options_and_a_named_runner_is_kept():
    from transforms.runner import pipeline

    p = pipeline(["--experiments=obsfeed_probe", "--direct_running_mode=multi_processing"])
    assert type(p.runner).__name__ == "FnApiRunner"        # not DirectRunner, which first tries to download Prism
    assert "obsfeed_probe" in str(p.runner._provision_info.provision_info.pipeline_options)   # for its workers
    assert type(pipeline(["--runner=DirectRunner"]).runner).__name__ != "FnApiRunner"


def test_runs_lists_status_and_headline_figures(tmp_path: Path, capsys):
    def manifest(name: str, stages: dict) -> Path:
        run = tmp_path / name
        run.mkdir()
        (run / rd.MANIFEST).write_text(json.dumps({"run_id": name, "stages": stages}))
        return run

    ok = {"status": "ok", "started_at": "2026-11-30T01:00:00+00:00"}
    table = TableCounts(rows_in=1000, rows_ok=1000, rows_quarantined=0, rows_duplicate=0)
    ingest = IngestResult(counts={"impressions": table, "signals": table},
                          diagnostics=IngestDiagnostics(units=1000, observed=210, observed_rate=0.21)).to_manifest()
    fit = FitResult(counts=FitCounts(units=1000, sample=1000, sample_observed=210),
                    diagnostics=FitDiagnostics(propensity=PropensityDiagnostics(auc=0.754))).to_manifest()
    weights = WeightSummary(ess=130.2, ess_share=0.62)
    score = ScoreResult(counts=ScoreCounts(units=1000, pointwise=1000, excluded_no_overlap=0, pairs=321),
                        diagnostics=ScoreDiagnostics(n_observed=210, clip=0.05, clipped=3, weight_ips=weights,
                                                     weight_clipped=weights)).to_manifest()
    done = manifest("2026-11-29", {"ingest": {**ok, **ingest}, "fit": {**ok, **fit}, "score": {**ok, **score}})
    (done / rd.SUCCESS).write_text("{}")
    manifest("2026-11-30", {"ingest": {**ok, **ingest},
                            "fit": {"status": "failed", "started_at": "2026-11-30T02:00:00+00:00"}})
    manifest("2026-12-01", {"ingest": {**ok, **ingest}})
    (tmp_path / "not-a-run").mkdir()
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("run")
    assert lines[1].split()[:2] == ["2026-11-29", "complete"] and "0.754" in lines[1] and "321" in lines[1]
    assert "failed: fit" in lines[2] and "incomplete (ingest)" in lines[3]
    assert main(["runs", str(tmp_path / "missing")]) == 2


def test_a_record_from_another_version_leaves_its_figures_out_not_the_listing(tmp_path: Path, capsys):
    from pipelines.orchestration.summary import run_summary_lines
    from schemas.run_dir import RunDir

    run = tmp_path / "old"
    run.mkdir()
    (run / rd.MANIFEST).write_text(json.dumps({"run_id": "old", "stages": {
        "ingest": {"status": "ok", "started_at": "2026-11-30T01:00:00+00:00", "counts": {},
                   "diagnostics": {"units": 5}}}}))
    assert main(["runs", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:2] == ["old", "incomplete"] and "n/a" in out.splitlines()[1]
    assert "the ingest stage's record is not a IngestResult" in err
    assert not any(line.startswith("table") for line in run_summary_lines(RunDir(run)))
