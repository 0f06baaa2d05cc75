"""Shared fixtures: small seeded simulations and configs that point at them."""

from __future__ import annotations

import os

# One OpenMP thread for the boosted models (before scikit-learn starts its thread pool): the suite's own processes
# already keep both cores busy, and OpenMP threads that spin-wait for a busy core made a tiny boosted fit 5-10x
# slower (fit on 2,000 units: 22 s with the default, 2.7 s with one thread, on a loaded 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402

from pipelines.sources.simulator import SCENARIOS, simulate, write  # noqa: E402

HASH_KEY_ENV = "OBSFEED_TEST_HASH_KEY"


@pytest.fixture(autouse=True)
def cli_logging() -> Iterator[None]:
    """obsfeed's log records on stderr as the CLI shows them, also for a test that calls a stage directly (a
    ``main()`` inside the test sets up its own, for its command)."""
    from pipelines.orchestration.logs import configure_logging

    with configure_logging("text"):
        yield


def config_text(data: Path, **sections: dict[str, object]) -> str:
    """A run config for simulated logs in ``data``; ``sections`` override keys, e.g. fit={"folds": 3}."""
    base: dict[str, dict[str, object]] = {
        "input": {"impressions": f"{data}/impressions/*.parquet", "signals": f"{data}/signals.jsonl.gz",
                  "truth": f"{data}/truth.parquet"},
        "privacy": {"key_env": HASH_KEY_ENV},
        "fit": {"categorical": ["model_version", "user_segment"], "folds": 3},
        "train": {"epochs": 6},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml(v)}")
    return "\n".join(lines) + "\n"


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


@pytest.fixture(scope="session")
def sim_small(tmp_path_factory) -> Path:
    """4,000 simulated impressions with the default scenario's selection, noise and dirt."""
    out = tmp_path_factory.mktemp("sim_small")
    scenario = replace(SCENARIOS["default"], n_impressions=4000, seed=7, dirty_share=0.01)
    write(simulate(scenario), out, scenario=scenario)
    return out


@pytest.fixture()
def hash_key(monkeypatch) -> str:
    monkeypatch.setenv(HASH_KEY_ENV, "test-key")
    return "test-key"


@contextmanager
def module_hash_key() -> Iterator[None]:
    """The test HMAC key in the environment while a module-scoped fixture runs stages (``monkeypatch`` and the
    ``hash_key`` fixture are function-scoped)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HASH_KEY_ENV, "k")
        yield


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A tiny random BERT reward-model folder (tests/backbones.py), built once per session. transformers is imported
    here, not at the top, so sessions that never ask for a backbone do not pay its import."""
    from tests.backbones import tiny_encoder

    return tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A tiny random Llama causal-LM folder (tests/backbones.py), built once per session."""
    from tests.backbones import tiny_decoder

    return tiny_decoder(tmp_path_factory.mktemp("tiny_decoder"))


@pytest.fixture
def crash_then_resume(monkeypatch):
    """``fit(checkpoint) -> (model, metrics)`` run once until a crash in epoch ``epoch`` (the epochs before it
    checkpointed), then again with ``resume=True``: what a resumed run ends with. Returns a function of
    (fit, path, epoch=3)."""
    from estimators.reward.data import StreamingBatches
    from estimators.reward.trainer import Checkpoint

    def run(fit, path: Path, epoch: int = 3):
        real_epoch = StreamingBatches.epoch

        def killed(self, e=0):
            if e == epoch and self.shuffle:
                raise RuntimeError("killed")
            return real_epoch(self, e)

        with monkeypatch.context() as mp:
            mp.setattr(StreamingBatches, "epoch", killed)
            with pytest.raises(RuntimeError, match="killed"):
                fit(Checkpoint(path, "fp"))
        return fit(Checkpoint(path, "fp", resume=True))

    return run
