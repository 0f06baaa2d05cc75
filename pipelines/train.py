"""Train stage: reward models on the pointwise dataset, the configured loss plus baseline losses to compare."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from estimators.reward_model import RewardModel, fit_reward_model, load_reward_model, save_reward_model
from schemas import pointwise as pw
from schemas import run_dir as rd
from schemas import units as un
from schemas.config import Config
from schemas.run_dir import RunDir
from transforms.io import atomic_dir, read_dataset

BASELINES = "baselines"
COLUMNS = [un.PROMPT_ID, un.PROMPT, un.RESPONSE, un.OBSERVED, un.LABEL, pw.WEIGHT_CLIPPED, pw.IMPUTED]


def losses_to_train(cfg: Config) -> list[str]:
    """The main loss first, then each baseline once."""
    return [cfg.train.loss, *dict.fromkeys(b for b in cfg.train.baselines if b != cfg.train.loss)]


def run(run: RunDir, cfg: Config, beam_args: Sequence[str] = ()) -> dict[str, Any]:
    table = read_dataset(run.path(rd.POINTWISE), COLUMNS)
    columns = {c: table[c].to_numpy(zero_copy_only=False) for c in COLUMNS}
    columns["weight"] = columns.pop(pw.WEIGHT_CLIPPED)
    columns["imputed"] = columns.pop(pw.IMPUTED)
    diagnostics: dict[str, Any] = {}
    with atomic_dir(run.path(rd.REWARD_MODEL)) as tmp:
        for i, loss in enumerate(losses_to_train(cfg)):
            model, metrics = fit_reward_model(columns, loss=loss, cfg=cfg.train)
            target = tmp if i == 0 else tmp / BASELINES / loss
            save_reward_model(model, target, {"loss": loss})
            (target / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            diagnostics[loss] = {"val_loss": metrics["best_val_loss"], "best_epoch": metrics["best_epoch"],
                                 "samples_per_s": metrics["samples_per_s"], "device": metrics["device"]}
    return {"outputs": [str(run.path(rd.REWARD_MODEL))],
            "counts": {"units": table.num_rows, "observed": int(columns["observed"].sum(dtype="int64"))},
            "diagnostics": diagnostics}


def load_models(run: RunDir) -> dict[str, RewardModel]:
    """Loss name → trained model, for the main model and each baseline."""
    root = run.path(rd.REWARD_MODEL)
    models = {json.loads((root / "config.json").read_text())["loss"]: load_reward_model(root)}
    for sub in sorted((root / BASELINES).glob("*")) if (root / BASELINES).exists() else []:
        models[sub.name] = load_reward_model(sub)
    return models
