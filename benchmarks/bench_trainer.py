"""Trainer benchmarks (issue 7): loader throughput, and every loss against the simulator's true reward.

* **throughput**: samples/s of the streaming loop (feature cache on disk → block + buffer shuffle → read-ahead
  thread → device) divided by samples/s of the same model and step on the same rows held whole on the device
  (``InMemoryBatches``), measured in one run, per device and batch size. 1.0 means the loader costs nothing.
* **losses**: the pipeline (ingest, fit, score) on the default scenario for 3 simulation seeds, then the train
  stage with every loss; R², MSE and within-prompt pairwise accuracy against ``reward_true`` on the validation
  prompts (metrics.json ``truth``), mean ± sd over the seeds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_estimators import CACHE
from benchmarks.bench_estimators import CONFIG as ESTIMATORS_CONFIG
from estimators.losses import batch_loss
from estimators.reward.cache import POINT, write_pointwise_cache
from estimators.reward.data import TRAIN, InMemoryBatches, StreamingBatches, stream
from estimators.reward.hashed import HashedRewardModel
from estimators.reward.model import logits, new_encoder
from estimators.reward.trainer import small_op_threads
from pipelines.cli import main as cli
from pipelines.simulate import SCENARIOS, simulate, write
from pipelines.train import METRICS_FILE, model_dir
from schemas import run_dir as rd
from schemas.config import TrainConfig

LOSSES = ("naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr", "bt")


# --- throughput ---------------------------------------------------------------------------------------------------

def _epochs(model: torch.nn.Module, batches, device: torch.device, epochs: int, lr: float) -> tuple[float, int]:
    """Seconds and samples of ``epochs`` passes of ips training over ``batches(epoch)``."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    seen = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in batches(epoch):
            value = batch_loss("ips", logits(model, batch.features[POINT]), batch.columns)
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            seen += batch.size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, seen


def bench_throughput(n: int, *, epochs: int = 2, rounds: int = 3) -> dict[str, Any]:
    """Streaming vs in-memory samples/s on the default scenario's rated units (what ``ips`` trains on): the median
    of ``rounds`` alternating measurements of ``epochs`` epochs each."""
    from benchmarks.trainer_device import dataset

    table, _ = dataset(n)
    runs = []
    with tempfile.TemporaryDirectory(prefix="obsfeed-bench-") as tmp:
        cfg = TrainConfig(hash_features=2**18)
        started = time.perf_counter()
        cache = write_pointwise_cache(table, Path(tmp) / "cache", args=("label", "observed", "weight"),
                                      observed_only=True, cfg=cfg, encoder=new_encoder(cfg))
        featurize_s = time.perf_counter() - started
        devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
        for device_name in devices:
            device = torch.device(device_name)
            for batch_size in (256, 4096):
                row: dict[str, Any] = {"device": device_name, "batch_size": batch_size}
                speeds: dict[str, list[float]] = {"in_memory": [], "streaming": []}
                for _ in range(rounds):                           # alternate, so drift hits both alike
                    for name in speeds:
                        if name == "in_memory":
                            source = InMemoryBatches(cache, TRAIN, batch_size=batch_size, device=device)
                            batches = source.epoch
                        else:
                            streaming = StreamingBatches(cache, TRAIN, batch_size=batch_size)
                            batches = lambda e, s=streaming, d=device: stream(s, e, d)  # noqa: E731
                        torch.manual_seed(0)
                        model = HashedRewardModel(hash_features=cfg.hash_features).to(device)
                        with small_op_threads(model, device):
                            seconds, seen = _epochs(model, batches, device, epochs, lr=0.05)
                        speeds[name].append(seen / seconds)
                for name, values in speeds.items():
                    row[f"{name}_samples_per_s"] = float(np.median(values))
                row["ratio"] = row["streaming_samples_per_s"] / row["in_memory_samples_per_s"]
                runs.append(row)
                print(f"  {device_name} batch {batch_size}: streaming / in-memory = {row['ratio']:.2f}", flush=True)
    return {"impressions": n, "train_rows": cache.rows(TRAIN), "epochs": epochs, "rounds": rounds,
            "featurize_s": featurize_s,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": runs}


def throughput_table(result: dict[str, Any]) -> list[str]:
    lines = ["| device | batch | streaming / in-memory samples/s | target |", "|---|---|---|---|"]
    for r in result["runs"]:
        device = f"cuda ({result['gpu']})" if r["device"] == "cuda" else "cpu (2 cores)"
        lines.append(f"| {device} | {r['batch_size']:,} | {r['ratio']:.2f} | ≥ 0.8 |")
    return lines


# --- losses against the truth -----------------------------------------------------------------------------------

CONFIG = ESTIMATORS_CONFIG + """[train]
loss = "causalrm_dr"
baselines = {baselines}
hash_features = 65536
seed = {seed}
"""
"""The estimator benchmark's config (simulated inputs, default fit) plus a train section with every loss."""


def mean_sd(per_seed: list[dict[str, dict[str, float]]], names: Sequence[str], keys: Sequence[str],
            ) -> dict[str, dict[str, tuple[float, float]]]:
    """name → metric → (mean, sample sd) over the seeds' results."""
    return {name: {k: (float(np.mean(v)), float(np.std(v, ddof=1))) for k in keys
                   for v in [[s[name][k] for s in per_seed]]} for name in names}


def bench_losses(n: int, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    logging.disable(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    work = CACHE / "trainer-work"
    work.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in seeds:
        scenario = replace(SCENARIOS["default"], n_impressions=n, seed=seed)
        data = CACHE / f"trainer-{n}-seed{seed}"
        if not (data / "truth.parquet").exists():
            write(simulate(scenario), data, scenario=scenario)
        cfg_path = work / "cfg.toml"
        baselines = json.dumps([loss for loss in LOSSES if loss != "causalrm_dr"])
        cfg_path.write_text(CONFIG.format(data=data, fit="", seed=seed, baselines=baselines))
        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        print(f"  seed {seed}: pipeline and {len(LOSSES)} losses ...", flush=True)
        if cli(["run", str(cfg_path), str(run), "--stages", "ingest,fit,score,train"]) != 0:
            raise RuntimeError(f"seed {seed}: the pipeline failed")
        root = run / rd.REWARD_MODEL
        result = {}
        for loss in LOSSES:
            metrics = json.loads((model_dir(root, loss, main=loss == "causalrm_dr") / METRICS_FILE).read_text())
            result[loss] = {**metrics["truth"], "samples_per_s": metrics["samples_per_s"],
                            "epochs_run": metrics["epochs_run"]}
        per_seed.append(result)
    shutil.rmtree(work, ignore_errors=True)
    summary = mean_sd(per_seed, LOSSES, ("r2", "mse", "mae", "pairwise_accuracy"))
    return {"impressions": n, "seeds": list(seeds), "per_seed": per_seed, "summary": summary,
            "val_units": [s["naive"]["units"] for s in per_seed]}


def losses_table(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    naive_r2 = s["naive"]["r2"][0]
    lines = ["| loss | R² vs r* | R² − naive | MSE | MAE | pair accuracy |", "|---|---|---|---|---|---|"]
    for loss, m in s.items():
        lines.append(f"| {loss} | {m['r2'][0]:.3f} ± {m['r2'][1]:.3f} | {m['r2'][0] - naive_r2:+.3f} "
                     f"| {m['mse'][0]:.4f} ± {m['mse'][1]:.4f} | {m['mae'][0]:.4f} ± {m['mae'][1]:.4f} "
                     f"| {m['pairwise_accuracy'][0]:.3f} ± {m['pairwise_accuracy'][1]:.3f} |")
    return lines
