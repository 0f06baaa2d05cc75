"""A run directory is never mixed, stale or left half-written: one writer at a time (a lock), lineage that marks
the stages downstream of a re-run stage stale, outputs committed only after their gates, and a killed stage's
scratch found and removed by the next run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from estimators import weights as W
from pipelines.orchestration.cli import main
from pipelines.sources.simulator import SCENARIOS, simulate, write
from schemas import run_dir as rd
from schemas.config import parse_config
from schemas.manifest import tree_sha256
from schemas.stages import BY_NAME, STAGES
from schemas.storage import left_by_dead_writer, remove_dead_scratch, staging_dir, writer_tag
from tests.conftest import HASH_KEY_ENV, config_text

pytestmark = pytest.mark.e2e

TINY = {"fit": {"categorical": ["model_version", "user_segment"], "folds": 2, "hash_features": 1024,
                "confounder_controls": 5},
        "train": {"epochs": 1, "loss": "ips", "baselines": ["naive"], "hash_features": 4096}}


def _logs(out: Path, n: int, seed: int) -> Path:
    scenario = replace(SCENARIOS["default"], n_impressions=n, seed=seed, dirty_share=0.01)
    write(simulate(scenario), out, scenario=scenario)
    return out


def _config(tmp: Path, data: Path, name: str = "cfg.toml", **sections) -> Path:
    merged = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        merged.setdefault(k, {}).update(v)
    path = tmp / name
    path.write_text(config_text(data, **merged))
    return path


def _outputs(run: Path) -> dict[str, str | None]:
    return {name: tree_sha256(run / name) for name in dict.fromkeys(n for s in STAGES for n in BY_NAME[s].outputs)}


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in [*run.glob(".ingest-*"), *run.rglob(".*.tmp-*")])


def _env() -> dict[str, str]:
    return {**os.environ, HASH_KEY_ENV: "test-key"}


def _obsfeed(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.orchestration.cli", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A complete run on 1,500 simulated impressions (tiny models), its config, and a second, different log."""
    tmp = tmp_path_factory.mktemp("rundir")
    data, other = _logs(tmp / "data", 1500, 11), _logs(tmp / "other", 1500, 12)
    cfg = _config(tmp, data)
    run = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.orchestration.cli", "run", str(cfg), str(run)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (run / rd.SUCCESS).exists()
    noise = [line for line in proc.stderr.splitlines() if "WARNING" in line or "apitools" in line]
    assert noise == []                                           # the CLI is quiet: no library warning
    return run, cfg, other


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_an_ingest_only_rerun_with_new_input_marks_the_later_stages_stale(complete, tmp_path, capsys, monkeypatch):
    run, _, other = complete
    run = _copy(run, tmp_path / "run")
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    assert main(["run", str(_config(tmp_path, other)), str(run), "--stages", "ingest"]) == 0
    err = capsys.readouterr().err
    assert "stale: fit, score, train, report" in err
    assert not (run / rd.SUCCESS).exists()
    assert main(["runs", str(run)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "stale: fit,score,train,report" in line
    assert main(["run", str(_config(tmp_path, other)), str(run), "--stages", "fit,score"]) == 0
    capsys.readouterr()
    assert main(["runs", str(run)]) == 0
    assert "stale: train,report" in capsys.readouterr().out          # train still ran on the old datasets
    assert main(["run", str(_config(tmp_path, other)), str(run), "--stages", "train,report"]) == 0
    assert (run / rd.SUCCESS).exists()


def test_a_later_stage_run_with_other_settings_leaves_the_earlier_ones_stale(complete, tmp_path, capsys,
                                                                            monkeypatch):
    run, _, _ = complete
    run = _copy(run, tmp_path / "run")
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    data = Path(json.loads((run / rd.MANIFEST).read_text())["stages"]["ingest"]["inputs"][-1]["path"]).parent
    relabelled = _config(tmp_path, data, ingest={"explicit": ["upvote", "downvote"]})    # edits no longer explicit
    assert main(["run", str(relabelled), str(run), "--stages", "report"]) == 0
    assert not (run / rd.SUCCESS).exists()                  # units were labelled under the old rules
    assert "stale: ingest, fit, score, train" in capsys.readouterr().err


def test_the_same_input_again_is_not_stale(complete, tmp_path, capsys, monkeypatch):
    run, cfg, _ = complete
    run = _copy(run, tmp_path / "run")
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    assert main(["run", str(cfg), str(run), "--stages", "ingest"]) == 0     # same rows: same units, same hash
    assert (run / rd.SUCCESS).exists()


def test_a_second_writer_exits_2_naming_the_holder(complete, tmp_path, capsys, monkeypatch):
    _, cfg, other = complete
    run = tmp_path / "run"
    first = _obsfeed("run", cfg, run, "--stages", "ingest,fit,score")
    deadline = time.monotonic() + 120
    while not (run / rd.LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run must still hold the lock"
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    for second in (cfg, _config(tmp_path, other, "other.toml")):            # the same input, and another
        assert main(["run", str(second), str(run)]) == 2
        err = capsys.readouterr().err
        assert "another run holds" in err and f"pid {first.pid}" in err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert parse_config((run / rd.CONFIG).read_text()).input == parse_config(cfg.read_text()).input
    manifest = json.loads((run / rd.MANIFEST).read_text())
    read = {Path(i["path"]).parent.name for i in manifest["stages"]["ingest"]["inputs"]}
    assert read == {"impressions", cfg.parent.joinpath("data").name}      # its own input only
    assert not (run / rd.LOCK).exists()


def test_a_failed_ingest_gate_leaves_every_previous_output_as_it_was(complete, tmp_path, capsys, monkeypatch):
    run, _, other = complete
    run = _copy(run, tmp_path / "run")
    before = _outputs(run)
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    cfg = _config(tmp_path, other, ingest={"max_bad_fraction": 0.0})      # the dirt in the logs fails the gate
    assert main(["run", str(cfg), str(run), "--stages", "ingest"]) == 2
    err = capsys.readouterr().err
    assert "max_bad_fraction" in err and str(run / rd.FAILED_QUARANTINE) in err
    assert _outputs(run) == before                                          # quarantine/ included
    assert pl.read_parquet(run / rd.FAILED_QUARANTINE / "*.parquet").height > 0


def _wait_for_staging(run: Path, stage: str, proc: subprocess.Popen) -> None:
    """Until ``stage`` is writing: its scratch (ingest: spilled shuffle files) or its staging folder exists."""
    def writing() -> bool:
        if stage == "ingest":
            return any(p.is_file() for d in run.glob(".ingest-*") for p in d.rglob("*.arrow"))
        names = [n.split("/")[-1] for n in BY_NAME[stage].outputs]
        return any(any(run.rglob(f".{n}.tmp-*")) for n in names)

    deadline = time.monotonic() + 240
    while not writing():
        assert proc.poll() is None, f"{stage} ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{stage} never started writing"
        time.sleep(0.01)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_in_a_stage_keeps_the_previous_outputs_and_the_next_run_cleans_up(complete, tmp_path, stage, capsys,
                                                                                 monkeypatch):
    run = _copy(complete[0], tmp_path / "run")
    before = _outputs(run)
    proc = _obsfeed(stage, run)
    _wait_for_staging(run, stage, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _outputs(run) == before                                   # byte-identical previous outputs
    assert _leftovers(run), "a killed writer leaves its scratch behind"
    assert not (run / rd.SUCCESS).exists()
    # the lock of the killed run is stale: reported, then cleared by `obsfeed unlock`
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    assert main([stage, str(run)]) == 2 and "stale lock" in capsys.readouterr().err
    assert main(["unlock", str(run)]) == 0
    assert main([stage, str(run)]) == 0, capsys.readouterr().err
    assert _leftovers(run) == []
    manifest = json.loads((run / rd.MANIFEST).read_text())
    assert manifest["stages"][stage]["status"] == "ok"


def test_staging_clean_up_spares_a_live_writers_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "xn--bcher-kva-7")     # dashes and digits in the host
    final = tmp_path / "units"
    live = staging_dir(final)                                          # ours: alive
    host = writer_tag().split("@")[1]
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = tmp_path / f".units.tmp-{dead_pid}@{host}-0123456789ab"
    reused = tmp_path / f".units.tmp-{os.getpid()}@{host}-abcdef012345"   # our pid, not our folder: a restart
    elsewhere = tmp_path / ".units.tmp-1@another-host-0123456789ab"
    legacy = tmp_path / ".units.tmp-0123456789ab"                      # an older version's: writer unknown
    for d in (dead, reused, elsewhere, legacy):
        d.mkdir()
    assert left_by_dead_writer(dead) and left_by_dead_writer(reused)
    assert not any(map(left_by_dead_writer, (live, elsewhere, legacy)))
    staging_dir(final)
    assert live.exists() and elsewhere.exists() and legacy.exists() and not dead.exists() and not reused.exists()
    scratch = tmp_path / f".ingest-{dead_pid}@{host}-0123456789ab"
    scratch.mkdir()
    assert scratch in remove_dead_scratch(tmp_path) and not scratch.exists() and live.exists()


def test_prompts_with_one_response_refuse_bt_before_fit_and_empty_datasets_are_datasets(tmp_path, capsys,
                                                                                         monkeypatch):
    scenario = replace(SCENARIOS["clean"], n_impressions=400, responses_per_prompt=1, seed=5)
    data = tmp_path / "data"
    write(simulate(scenario), data, scenario=scenario)
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    cfg = _config(tmp_path, data, train={"loss": "ips", "baselines": ["bt"]})
    run = tmp_path / "run"
    assert main(["run", str(cfg), str(run)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no prompt has two responses with labels" in line and "'bt'" in line
    manifest = json.loads((run / rd.MANIFEST).read_text())
    assert set(manifest["stages"]) == {"ingest"}                        # refused before fit ran
    cfg = _config(tmp_path, data, "nobt.toml", train={"loss": "ips", "baselines": []})
    assert main(["run", str(cfg), str(run), "--stages", "fit,score"]) == 0
    parts = list((run / rd.PAIRWISE).glob("*.parquet"))
    assert len(parts) == 1
    pairs = pl.read_parquet(parts[0])
    assert pairs.height == 0 and {"prompt", "chosen", "rejected", "weight", "margin"} <= set(pairs.columns)
    capsys.readouterr()
    assert main(["train", str(run)]) == 0                                # nobt: ips trains on the pointwise data


def test_clip_none_weights_are_the_ips_weights():
    cfg = parse_config('[input]\nimpressions = "x"\nsignals = "y"\n[weights]\nclip = "none"\n')
    o, p = np.array([1.0, 0, 1, 1]), np.array([0.5, 0.2, 0.01, 0.6])
    chosen = W.choose_clip(o, p, cfg.weights)
    assert chosen["clip"] == 0.0 and chosen["method"] == "none"
    np.testing.assert_array_equal(W.clipped(o, p, chosen["clip"]), W.ips(o, p))


def test_the_ess_floor_message_is_in_the_unit_the_user_wrote():
    cfg = parse_config('[input]\nimpressions = "x"\nsignals = "y"\n[weights]\nips_min_ess_share = 0.9\n')
    with pytest.raises(Exception, match=r"weights.ips_min_ess_share = 0.9\b"):
        W.choose_clip(np.array([1.0, 1, 1, 0]), np.array([1e-4, 0.5, 0.9, 0.9]), cfg.weights)
    old = parse_config('[input]\nimpressions = "x"\nsignals = "y"\n[score]\ness_floor = 0.05\n')
    assert old.weights.ips_min_ess_share == 0.05                            # old frozen configs still read


def test_the_cli_is_quiet_unless_verbose(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.orchestration.cli", "fit", str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"obsfeed fit: {tmp_path / rd.CONFIG}: not found (is {tmp_path} a run directory made by `obsfeed run`?)"]


def test_every_run_directory_file_name_is_spelled_only_in_schemas_run_dir():
    """A stage that spells a run-directory file itself ("weights.json") can drift from the one that reads it: every
    such name (a value of schemas/run_dir.py with a dot or a slash) appears as a string in no other module."""
    import ast

    from schemas import run_dir

    names = {v for k, v in vars(run_dir).items() if k.isupper() and isinstance(v, str) and ("." in v or "/" in v)}
    root = Path(run_dir.__file__).resolve().parents[1]
    found = []
    for folder in ("pipelines", "transforms", "estimators", "schemas"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name == "run_dir.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not found, found
