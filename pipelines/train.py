"""Train stage (DESIGN §6): reward models on the pointwise dataset, the configured loss plus baselines to compare.

Layout written, atomically as one directory::

    RUN/reward_model/{model.pt, config.json, metrics.json}                 cfg.train.loss
    RUN/reward_model/baselines/<loss>/{model.pt, config.json, metrics.json} each other loss in cfg.train.baselines

Fit small: the columns the losses need are read into memory once (a linear model over hashed n-grams needs no
more than that at the sizes a nightly run sees); the Beam score stage is where scale lives.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from estimators.losses import NOISE_AWARE
from estimators.noise import FlipRates
from estimators.reward_model import (
    CONFIG_FILE,
    PAIR_COLUMNS,
    RewardModel,
    fit_pairwise_reward_model,
    fit_reward_model,
    load_reward_model,
    required_columns,
    save_reward_model,
)
from pipelines.manifest import describe_inputs
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config
from schemas.errors import InputError
from schemas.run_dir import RunDir
from transforms.io import atomic_dir, parquet_files, read_dataset

BASELINES = "baselines"
METRICS_FILE = "metrics.json"


def losses_to_train(cfg: Config) -> list[str]:
    """The main loss first, then each baseline once (a baseline equal to the main loss is skipped)."""
    return [cfg.train.loss, *dict.fromkeys(b for b in cfg.train.baselines if b != cfg.train.loss)]


def model_dir(root: Path, loss: str, *, main: bool) -> Path:
    """Where the model for ``loss`` lives under ``root`` (RUN/reward_model or its staging copy)."""
    return root if main else root / BASELINES / loss


def flip_rates(run: RunDir) -> tuple[float, float]:
    """(ρ01, ρ10) that the fit stage chose, for the noise-aware losses."""
    path = run.path(rd.NOISE_MODEL)
    if not path.exists():
        raise InputError(f"{path}: flip rates not found (run the fit stage first)")
    rates = FlipRates.from_dict(json.loads(path.read_text()))
    return rates.rho01, rates.rho10


def run(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Train every loss of ``losses_to_train(cfg)`` and write RUN/reward_model; ``beam_args`` are unused here."""
    losses = losses_to_train(cfg)
    columns = list(dict.fromkeys(c for loss in losses if loss != "bt" for c in required_columns(loss)))
    table = read_dataset(run.path(rd.POINTWISE), columns or [un.OBSERVED])
    if table.num_rows == 0:
        raise InputError(f"{run.path(rd.POINTWISE)}: pointwise dataset is empty")
    pairs = read_dataset(run.path(rd.PAIRWISE), list(PAIR_COLUMNS)) if "bt" in losses else None
    if pairs is not None and pairs.num_rows == 0:
        raise InputError(f"{run.path(rd.PAIRWISE)}: no pairs to train the bt loss on")
    train_cfg = cfg.train.model_dump(exclude={"loss", "baselines"})
    diagnostics: dict[str, Any] = {}
    with atomic_dir(run.path(rd.REWARD_MODEL)) as tmp:
        for i, loss in enumerate(losses):
            print(f"train: {loss} ({'main' if i == 0 else 'baseline'}, {i + 1}/{len(losses)})", file=sys.stderr,
                  flush=True)
            started = time.perf_counter()
            if loss == "bt":
                model, metrics = fit_pairwise_reward_model(pairs, cfg=cfg.train)
            else:
                model, metrics = fit_reward_model(table, loss=loss, cfg=cfg.train,
                                                  flip_rates=flip_rates(run) if loss in NOISE_AWARE else None)
            target = model_dir(tmp, loss, main=i == 0)
            save_reward_model(model, {"loss": loss, "role": "main" if i == 0 else "baseline", "train": train_cfg},
                              target)
            (target / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
            diagnostics[loss] = {"val_loss": metrics["best_val_loss"], "best_epoch": metrics["best_epoch"],
                                 "epochs_run": metrics["epochs_run"], "n_train": metrics["n_train"],
                                 "n_val": metrics["n_val"], "samples_per_s": metrics["samples_per_s"],
                                 "device": metrics["device"], "wall_s": time.perf_counter() - started}
    inputs = parquet_files(run.path(rd.POINTWISE))
    if pairs is not None:
        inputs += parquet_files(run.path(rd.PAIRWISE))
    return {"inputs": describe_inputs(inputs),
            "outputs": [str(run.path(rd.REWARD_MODEL))],
            "counts": {"rows": table.num_rows, "observed": int(pc.sum(table[un.OBSERVED]).as_py() or 0)},
            "diagnostics": diagnostics}


def load_models(run: RunDir) -> dict[str, RewardModel]:
    """Loss name → trained model (on cpu), the main model first, then each baseline."""
    root = run.path(rd.REWARD_MODEL)
    if not (root / CONFIG_FILE).is_file():
        raise InputError(f"{root}: no reward model (has the train stage run?)")
    dirs = [root, *sorted(p for p in (root / BASELINES).glob("*") if (p / CONFIG_FILE).is_file())]
    return {json.loads((d / CONFIG_FILE).read_text())["loss"]: load_reward_model(d) for d in dirs}
