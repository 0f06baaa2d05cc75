"""Bad input: exit code 2, one line naming the file and the problem, and no run left looking complete."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.cli import beam_args_with_defaults, main
from schemas import run_dir as rd
from tests.conftest import config_text


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
    ([], "--runner=DirectRunner"), (["--runner=FlinkRunner"], "--runner=FlinkRunner"),
    (["--runner", "SparkRunner"], "SparkRunner")])
def test_runner_is_an_option(given, runner):
    args = beam_args_with_defaults(given)
    assert runner in args
    assert sum(a.startswith("--runner") for a in args) == 1
