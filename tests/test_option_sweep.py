"""Every documented option value runs: exit 0, or exit 2 with a ConfigError line, never an internal error (1).

The cases are generated from the pydantic config model (every Literal value, every boolean, every Literal in a
list), so a new option is covered without touching this file. Each case re-runs, on a copy of one complete tiny
run, the stages its section affects (ingest options: ingest; fit options: fit onwards; ...).
"""

from __future__ import annotations

import json
import shutil
import types
import typing
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipelines.orchestration.cli import main
from pipelines.sources.simulator import SCENARIOS, simulate, write
from schemas.config import Config
from tests.conftest import HASH_KEY_ENV, config_text

pytestmark = pytest.mark.e2e

STAGES_FOR = {"ingest": "ingest", "privacy": "ingest", "fit": "fit,score", "weights": "fit,score,train",
              "score": "score,train", "train": "train", "drift": "score", "output": "ingest,score"}
"""The stages that read an option of each config section (weights.clip is decided in fit; the base run trains ips
and naive, which read no fit option but the weights; sizes stay tiny: see SMALL)."""
SMALL = {"fit": {"categorical": ["model_version", "user_segment"], "folds": 2, "hash_features": 1024,
                 "confounder_controls": 5},
         "train": {"epochs": 1, "hash_features": 4096}}
NEEDS = {("fit", "noise", "fixed"): {"flip_rates": [0.2, 0.1]}}
"""Keys an option value needs beside it (without them the case is a ConfigError, which would not run it)."""


def _literals(annotation: object) -> list[object]:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return [v for a in typing.get_args(annotation) for v in _literals(a)]
    return []


def option_cases() -> list[tuple[str, str, object]]:
    """(section, key, value) for every value of a Literal/enum or boolean field other than the base run's."""
    cases = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for key, f in model.model_fields.items():
            default = SMALL.get(section, {}).get(key, f.get_default(call_default_factory=True))   # the base run's
            if f.annotation is bool:
                values: list[object] = [not default]
            elif typing.get_origin(f.annotation) is list:
                values = [[v] for v in _literals(typing.get_args(f.annotation)[0])]
            else:
                values = _literals(f.annotation)
            cases += [(section, key, v) for v in values if v != default]
    return cases


def test_the_sweep_covers_every_choice_of_the_config():
    cases = {(s, k) for s, k, _ in option_cases()}
    assert {("fit", "calibration"), ("weights", "clip"), ("weights", "stabilize"), ("score", "dr_variant"),
            ("train", "loss"), ("train", "baselines"),
            ("privacy", "allow_unkeyed"), ("ingest", "ts_unit"), ("drift", "gate")} <= cases
    assert set(STAGES_FOR) >= {s for s, _ in cases}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("sweep")
    scenario = replace(SCENARIOS["default"], n_impressions=1200, seed=21, dirty_share=0.01)
    write(simulate(scenario), tmp / "data", scenario=scenario)
    cfg = tmp / "cfg.toml"
    cfg.write_text(config_text(tmp / "data", **SMALL))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HASH_KEY_ENV, "test-key")
        assert main(["run", str(cfg), str(tmp / "run")]) == 0
    return tmp / "run", tmp / "data"


@pytest.mark.parametrize(("section", "key", "value"), option_cases(),
                         ids=[f"{s}.{k}={v}" for s, k, v in option_cases()])
def test_every_option_value_runs_or_is_a_config_error(base, tmp_path, capsys, monkeypatch, section, key, value):
    run, data = base
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    sections = {k: dict(v) for k, v in SMALL.items()}
    sections.setdefault(section, {})[key] = value
    sections[section].update(NEEDS.get((section, key, value), {}) if isinstance(value, str) else {})
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config_text(data, **sections))
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    capsys.readouterr()
    code = main(["run", str(cfg), str(copy), "--stages", STAGES_FOR[section], "--log-format", "json"])
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    last = records[-1] if records else {}
    assert code in (0, 2), last.get("traceback") or err[-3000:]
    if code == 2:
        assert last.get("error") == "ConfigError", last
