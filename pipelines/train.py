"""Train stage: reward models on the pointwise dataset, the configured loss plus baselines to compare.

Layout written, atomically as one directory::

    RUN/reward_model/{model.pt, config.json, metrics.json}                 cfg.train.loss (hashed backbone)
    RUN/reward_model/baselines/<loss>/{model.pt, config.json, metrics.json} each other loss in cfg.train.baselines

With a transformer backbone each model folder is a Hugging Face folder (config.json, model.safetensors, the
tokenizer's files) with ``obsfeed.json`` and ``metrics.json`` beside it.

Data: the datasets are streamed in record batches and featurised once per kind of rows (observed units, all
units, pairs) into a feature cache under ``RUN/checkpoints/train/``; each epoch streams the cache back.
Checkpoints: every model's state after every epoch goes to ``RUN/checkpoints/train/<loss>/``; ``resume=True``
(``obsfeed train RUN --resume``) continues from them after a failure, provided the inputs and the settings
are the same (a fingerprint is checked). The folder is removed once the stage has committed its output.
Truth: when ``[input].truth`` exists (the simulator's), metrics.json also scores the model on the validation
prompts against ``reward_true``.
Processes: under ``torchrun`` (``obsfeed train RUN --nproc N`` launches it), every rank trains its slice of each
batch (``estimators.reward.distributed``); rank 0 alone writes caches, checkpoints and the output.
The design: docs/reward-trainer.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.dataset as ds

from estimators.diagnostics import pairwise_accuracy, regression_metrics
from estimators.features import RESPONSE_LENGTH
from estimators.losses import INPUTS, NOISE_AWARE
from estimators.noise import FlipRates
from estimators.reward import distributed as ddp
from estimators.reward.cache import (
    PAIR_COLUMNS,
    check_pair_features,
    dense_spec,
    required_columns,
    split_column,
    units_kind,
    validation_mask,
    write_pair_cache,
    write_pointwise_cache,
)
from estimators.reward.calibrate import calibrate_on_gold
from estimators.reward.data import FeatureCache
from estimators.reward.model import (
    RewardModel,
    is_transformer,
    new_encoder,
    numeric_inputs,
    predict_reward,
    save_reward_model,
)
from estimators.reward.trainer import Checkpoint, fit_reward_model, resolve_device
from schemas import pairwise, pointwise
from schemas import run_dir as rd
from schemas import truth as tr
from schemas import units as un
from schemas.config import Config
from schemas.errors import ConfigError, InputError
from schemas.manifest import describe_inputs
from schemas.run_dir import RunDir
from schemas.stages import TrainCounts, TrainResult
from schemas.storage import atomic_dir, count_rows, parquet_files

logger = logging.getLogger(__name__)

READ_ROWS = 16_384
"""Rows per record batch read from the datasets: memory is bounded by this and the loader's buffer."""


def losses_to_train(cfg: Config) -> list[str]:
    """The main loss first, then each baseline once (a baseline equal to the main loss is skipped)."""
    return [cfg.train.loss, *dict.fromkeys(b for b in cfg.train.baselines if b != cfg.train.loss)]


def model_dir(root: Path, loss: str, *, main: bool) -> Path:
    """Where the model for ``loss`` lives under ``root`` (RUN/reward_model or its staging copy)."""
    return root if main else root / rd.BASELINES / loss


def checkpoint_root(run: RunDir) -> Path:
    return run.path(rd.CHECKPOINTS) / "train"


def flip_rates(run: RunDir, *, allow_unidentified: bool = False, quiet: bool = False) -> tuple[float, float]:
    """(ρ01, ρ10) that the fit stage chose, for the noise-aware losses. Rates the fit stage marked as not
    identified are a ConfigError naming their intervals, unless ``allow_unidentified``
    (``train.allow_unidentified_noise``): a loss that corrects every label with them would learn their error."""
    path = run.path(rd.NOISE_MODEL)
    if not path.exists():
        raise InputError(f"{path}: flip rates not found (run the fit stage first)")
    rates = FlipRates.from_dict(json.loads(path.read_text()))
    if not rates.identified:
        what = (f"fit applied no flip-rate correction ({rates.why.removeprefix('no noise correction: ')}), so a "
                "noise-aware loss would train as its plain counterpart" if rates.method == "none" else
                f"the {rates.method} flip rates {rates.interval_text()} are {rates.why}")
        if not allow_unidentified:
            raise ConfigError(f"{path}: {what}; set train.allow_unidentified_noise = true to train the noise-aware "
                              "losses anyway, or choose losses without a noise correction")
        if not quiet:
            logger.warning(f"train: {what}; used as train.allow_unidentified_noise = true",
                           extra={"stage": "train", "event": "flip_rates_not_identified"})
    return rates.rho01, rates.rho10


CLEAN = "+clean"
"""Suffix of a cache kind whose label and imputation are the audit-calibrated clean reward (CLEAN_COLUMNS)."""
CLEAN_COLUMNS = {un.LABEL: pointwise.REWARD_CLEAN, pointwise.IMPUTED: pointwise.REWARD_CLEAN}
"""Under fit.noise = 'calibrate', the noise-aware losses read the unit's calibrated clean reward in place of both
the label and the imputation, with flip rates 0: causalrm_ips is then the IPS risk of E[r* | label, x] on the
rated units, and causalrm_dr (label = imputation) the plain risk mean ℓ(s, reward_clean) over every unit, which is
the population's clean risk when the calibrators are right (each stratum of the observed flag is calibrated on
its own audited units). The noise-corrected BCE at rates ρ is the BCE at the corrected target
(r − ρ10)/(1 − ρ01 − ρ10), so both routes train on a clean-reward target; the calibrated one lets the label's error
depend on x."""


def calibrated(run: RunDir) -> bool:
    """Whether the fit stage calibrated the clean reward on an audit (models/noise.json method 'calibrate')."""
    path = run.path(rd.NOISE_MODEL)
    return path.exists() and json.loads(path.read_text()).get("method") == "calibrate"


def _stream(files: Sequence[Path], columns: Sequence[str], rename: dict[str, str] | None = None):
    """Record batches of ``columns`` from Parquet ``files``, READ_ROWS at a time (nothing else in memory);
    ``rename`` reads a column from another one of the dataset (name → source column)."""
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    rename = rename or {}
    missing = [rename.get(c, c) for c in columns if rename.get(c, c) not in dataset.schema.names]
    if missing:
        raise InputError(f"{files[0].parent}: column '{missing[0]}' missing from the dataset")
    if rename:
        return dataset.to_batches(columns={c: ds.field(rename.get(c, c)) for c in columns}, batch_size=READ_ROWS)
    return dataset.to_batches(columns=list(columns), batch_size=READ_ROWS)


def _fingerprint(loss: str, cfg: Config, inputs: list[dict[str, Any]], rates: tuple[float, float] | None) -> str:
    """What a checkpoint was trained on: the loss, the train settings (not the device), the flip rates and the
    input files' hashes."""
    settings = cfg.train.model_dump(exclude={"loss", "baselines", "device"})
    files = {}
    for key in ("embedding_model", "backbone"):              # a replaced model file must not resume silently
        path = Path(getattr(cfg.train, key) or "")
        if getattr(cfg.train, key) and path.exists():
            stats = [f.stat() for f in sorted(path.glob("*"))] if path.is_dir() else [path.stat()]
            files[key] = [[st.st_size, st.st_mtime_ns] for st in stats]
    payload = {"loss": loss, "train": settings, "flip_rates": rates, "inputs": [i["sha256"] for i in inputs],
               "processes": ddp.world_size(),              # the global batch, and so the schedule, depends on it
               "embedding_file": files.get("embedding_model"), "backbone_files": files.get("backbone")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def preflight(cfg: Config, run: RunDir | None = None) -> None:
    """The train settings that can be checked without data (a transformer backbone's folder, tokenizer, lengths,
    LoRA's peft, a head for calibration): a ConfigError before any stage of the run spends time. With ``run``,
    also the fit stage's flip rates that the noise-aware losses would need."""
    if is_transformer(cfg.train):
        new_encoder(cfg.train)
    if run is not None and any(loss in NOISE_AWARE for loss in losses_to_train(cfg)):
        flip_rates(run, allow_unidentified=cfg.train.allow_unidentified_noise, quiet=True)


def execute(run: RunDir, cfg: Config, beam_args: Sequence[str] = (), *, resume: bool = False) -> TrainResult:
    """Train every loss of ``losses_to_train(cfg)`` and write RUN/reward_model; ``beam_args`` are unused here.

    ``resume``: continue each loss from its last checkpoint (a loss that had finished is not trained again).
    Under torchrun, every rank calls this; rank 0 returns the stage's result, the others an empty one.
    """
    try:
        return _train_all(run, cfg, resume=resume)
    finally:
        ddp.close()


def _train_all(run: RunDir, cfg: Config, *, resume: bool) -> TrainResult:
    losses = losses_to_train(cfg)
    noise_rates = flip_rates(run, allow_unidentified=cfg.train.allow_unidentified_noise) \
        if any(loss in NOISE_AWARE for loss in losses) else None          # refused before anything trains
    clean = calibrated(run)
    kinds = {loss: units_kind(loss) + (CLEAN if clean and loss in NOISE_AWARE else "") for loss in losses}
    point_files = parquet_files(run.path(rd.POINTWISE))
    if not point_files:
        raise InputError(f"{run.path(rd.POINTWISE)}: pointwise dataset has no Parquet files")
    pair_files = parquet_files(run.path(rd.PAIRWISE)) if "pairs" in kinds.values() else []
    if "pairs" in kinds.values() and not pair_files:
        raise InputError(f"{run.path(rd.PAIRWISE)}: pairwise dataset has no Parquet files")
    if "pairs" in kinds.values() and not count_rows(run.path(rd.PAIRWISE)):
        raise InputError(f"{run.path(rd.PAIRWISE)}: the pairwise dataset is empty: no prompt has two responses "
                         f"whose {cfg.score.pair_target} differs by score.min_margin = {cfg.score.min_margin}; "
                         "loss 'bt' has nothing to train on")
    if "pairs" in kinds.values():
        check_pair_features(cfg.train.numeric)             # before any loss trains, not after
    inputs = describe_inputs([*point_files, *pair_files])
    ddp.init(resolve_device(cfg.train.device).type)
    encoder = new_encoder(cfg.train) if is_transformer(cfg.train) else None   # a bad backbone folder: exit 2 now
    root = checkpoint_root(run)
    if ddp.is_main():
        if not resume:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root / ".cache", ignore_errors=True)
    caches: dict[str, FeatureCache] = {}
    numeric = [c for c in cfg.train.numeric if c != RESPONSE_LENGTH]

    def cache_for(kind: str) -> FeatureCache:
        """Encode once per kind of rows, with the columns every loss of that kind needs (rank 0 writes, the other
        ranks wait and read it)."""
        if kind in caches:
            return caches[kind]
        directory = root / ".cache" / kind
        if ddp.is_main():
            started = time.perf_counter()
            if kind == "pairs":
                dense = (
                    None
                    if encoder
                    else dense_spec(_stream(pair_files, [pairwise.CHOSEN, pairwise.REJECTED]), cfg.train, pairs=True)
                )
                caches[kind] = write_pair_cache(_stream(pair_files, PAIR_COLUMNS), directory, cfg=cfg.train,
                                                encoder=encoder or new_encoder(cfg.train, dense))
            else:
                mine = [loss for loss, k in kinds.items() if k == kind]
                args = list(dict.fromkeys(a for loss in mine for a in INPUTS[loss]))
                columns = list(dict.fromkeys([*(c for loss in mine for c in required_columns(loss)), *numeric,
                                              split_column(cfg.train)]))
                rename = CLEAN_COLUMNS if kind.endswith(CLEAN) else None
                caches[kind] = write_pointwise_cache(_stream(point_files, columns, rename), directory, args=args,
                                                     observed_only=kind.startswith("observed"), cfg=cfg.train,
                                                     encoder=encoder or new_encoder(cfg.train, point_dense()),
                                                     progress=True)
            logger.info(f"train: encoded {kind} rows in {time.perf_counter() - started:.1f}s"
                        f"{_truncation_note(caches[kind])}", extra={"stage": "train", "event": "cache_encoded"})
        ddp.barrier()
        caches.setdefault(kind, FeatureCache(directory))
        return caches[kind]

    @functools.cache
    def point_dense():
        """The pointwise dense block's standardisation: one pass over the dataset, only if a hashed cache needs it."""
        return dense_spec(_stream(point_files, [un.RESPONSE, *numeric]), cfg.train)

    gold: pl.DataFrame | None = None                       # the audited units, read once if calibrate = gold
    train_cfg = cfg.train.model_dump(exclude={"loss", "baselines"})
    diagnostics: dict[str, Any] = {}
    models: dict[str, tuple[RewardModel, dict[str, Any], Path]] = {}
    output = atomic_dir(run.path(rd.REWARD_MODEL)) if ddp.is_main() else contextlib.nullcontext(None)
    with output as tmp:
        for i, loss in enumerate(losses):
            if ddp.is_main():
                logger.info(f"train: {loss} ({'main' if i == 0 else 'baseline'}, {i + 1}/{len(losses)})",
                            extra={"stage": "train", "event": "loss_started"})
            started = time.perf_counter()
            rates = noise_rates if loss in NOISE_AWARE else None
            checkpoint = Checkpoint(root / loss / rd.TRAIN_CHECKPOINT, _fingerprint(loss, cfg, inputs, rates), resume)
            cache = cache_for(kinds[loss])
            model, metrics = fit_reward_model(cache, loss=loss, cfg=cfg.train, flip_rates=rates,
                                              checkpoint=checkpoint)
            if not ddp.is_main():                          # rank 0 calibrates, scores and writes
                continue
            if cfg.train.calibrate == "gold":
                if gold is None:
                    gold = _gold_units(point_files, numeric)
                metrics["calibration"] = _calibrate(model, gold, loss)
            target = model_dir(tmp, loss, main=i == 0)
            save_reward_model(model, {"loss": loss, "role": "main" if i == 0 else "baseline", "train": train_cfg},
                              target)
            models[loss] = (model.to("cpu"), metrics, target)   # the device is the next loss's
            del model
            diagnostics[loss] = {"val_loss": metrics["best_val_loss"], "best_epoch": metrics["best_epoch"],
                                 "epochs_run": metrics["epochs_run"], "n_train": metrics["n_train"],
                                 "n_val": metrics["n_val"], "samples_per_s": metrics["samples_per_s"],
                                 "device": metrics["device"], "wall_s": time.perf_counter() - started,
                                 "backbone": metrics["backbone"].get("source", "hashed"),
                                 **({"truncated": metrics["truncated"]} if is_transformer(cfg.train) else {})}
            if "calibration" in metrics:
                diagnostics[loss]["calibration"] = metrics["calibration"]
        if ddp.is_main():
            truth = _truth_metrics({loss: m for loss, (m, _, _) in models.items()}, cfg, point_files)
            for loss, (_, metrics, target) in models.items():
                metrics["truth"] = truth.get(loss)
                if metrics["truth"]:
                    diagnostics[loss]["val_r2_vs_truth"] = metrics["truth"]["r2"]
                (target / rd.REWARD_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    ddp.barrier()
    if not ddp.is_main():
        return TrainResult()
    shutil.rmtree(root, ignore_errors=True)                # committed: nothing left to resume
    with contextlib.suppress(OSError):
        root.parent.rmdir()                                # RUN/checkpoints, if no other stage keeps state there
    counts = next((c.meta["counts"] for k, c in caches.items() if k != "pairs"), None)
    result = TrainResult(inputs=inputs, outputs=[str(run.path(rd.REWARD_MODEL))], diagnostics=diagnostics)
    if counts:                                             # bt alone reads no pointwise cache: no counts recorded
        result.counts = TrainCounts(rows=counts["rows_read"], observed=counts["observed"])
    return result


def _truncation_note(cache: FeatureCache) -> str:
    counts = cache.meta.get("counts", {})
    cut = {k: counts[k] for k in ("prompt_truncated", "response_truncated") if counts.get(k)}
    if not cut:
        return ""
    return " (kept whole but truncated to train.max_length: " + ", ".join(
        f"{v:,} {k.split('_')[0]}s" for k, v in cut.items()) + ")"


def _gold_units(point_files: Sequence[Path], numeric: Sequence[str]) -> pl.DataFrame:
    """The units with an audited label (``label_gold`` not null): prompt, response, gold label, numeric columns."""
    dataset = ds.dataset([str(f) for f in point_files], format="parquet")
    if un.LABEL_GOLD not in dataset.schema.names:
        raise InputError(f"{point_files[0].parent}: train.calibrate = 'gold' but the dataset has no "
                         f"'{un.LABEL_GOLD}' column")
    frame = pl.from_arrow(dataset.to_table(columns=[un.PROMPT, un.RESPONSE, un.LABEL_GOLD, *numeric],
                                           filter=ds.field(un.LABEL_GOLD).is_valid()))
    if frame.height == 0:
        raise InputError(f"{point_files[0].parent}: train.calibrate = 'gold' but no unit has an audited label "
                         f"(map a signal type to ingest.gold)")
    return frame


def _calibrate(model: RewardModel, gold: pl.DataFrame, loss: str) -> dict[str, float]:
    fitted = calibrate_on_gold(model, gold[un.PROMPT].to_list(), gold[un.RESPONSE].to_list(),
                               gold[un.LABEL_GOLD].to_numpy(),
                               columns={c: gold[c].to_numpy() for c in numeric_inputs(model)})
    logger.info(f"train: {loss} calibrated on {fitted['n_gold']:,} audited units: s' = {fitted['scale']:.3f}*s "
                f"{fitted['shift']:+.3f} (log-loss {fitted['val_loss_before']:.4f} -> "
                f"{fitted['val_loss_after']:.4f})", extra={"stage": "train", "event": "calibrated_on_gold"})
    return fitted


def _truth_metrics(models: dict[str, RewardModel], cfg: Config, point_files: Sequence[Path],
                   ) -> dict[str, dict[str, Any]]:
    """Loss → MSE/MAE/R² vs ``reward_true`` and pairwise accuracy within prompts, on the validation prompts'
    units (all of them, rated or not), when the config names a ground-truth file that exists; else {}.

    One streaming pass scores every model batch by batch, keeping only (impression id, prompt id, predictions)
    of the validation units; the truth file is read for those ids only.
    """
    truth_path = Path(cfg.input.truth) if cfg.input.truth else None
    if truth_path is None or not truth_path.is_file() or not models:
        return {}
    numeric = list(dict.fromkeys(c for m in models.values() for c in numeric_inputs(m)))
    held: list[pl.DataFrame] = []
    for batch in _stream(point_files, [un.IMPRESSION_ID, un.PROMPT_ID, un.PROMPT, un.RESPONSE, *numeric]):
        frame = pl.from_arrow(batch)
        held_out = validation_mask(frame[split_column(cfg.train)].to_list(), cfg.train.val_fraction)
        frame = frame.filter(pl.Series(held_out))
        if frame.height == 0:
            continue
        prompts, responses = frame[un.PROMPT].to_list(), frame[un.RESPONSE].to_list()
        columns = {c: frame[c].to_numpy() for c in numeric}
        held.append(frame.select(un.IMPRESSION_ID, un.PROMPT_ID).with_columns(
            pl.Series(loss, predict_reward(m, prompts, responses, columns=columns)) for loss, m in models.items()))
    if not held:
        return {}
    preds = pl.concat(held)
    d = (pl.scan_parquet(truth_path).select(tr.IMPRESSION_ID, tr.REWARD_TRUE)
         .join(preds.lazy(), left_on=tr.IMPRESSION_ID, right_on=un.IMPRESSION_ID, how="inner").collect())
    if d.height == 0:
        return {}
    r_true, group = d[tr.REWARD_TRUE].to_numpy(), d[un.PROMPT_ID].to_numpy()
    out = {}
    for loss in models:
        pred = d[loss].to_numpy()
        out[loss] = {"split": "validation", "units": d.height, **regression_metrics(pred, r_true),
                     "pairwise_accuracy": pairwise_accuracy(group, pred, r_true),
                     "mean_prediction": float(np.mean(pred)), "mean_true": float(np.mean(r_true))}
    return out
