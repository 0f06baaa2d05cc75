"""The reward-model trainer on CPU and, where there is one, on CUDA: same data, same model, same seed.

Run on a GPU machine to check the CUDA path and measure it against the CPU in the same run:
``python -m benchmarks.trainer_device [N_IMPRESSIONS] [OUT.json]``. The data are simulated (default scenario)
and turned into the pointwise columns the ``ips`` and ``naive`` losses read, with the simulator's true
propensity in the weight (this checks the trainer, not the estimators). It reports, per device and batch
size, training samples/s, the best validation loss and R² of the predictions against the true reward, and the
streaming loader's throughput against in-memory tensors on each device (``bench_trainer.bench_throughput``).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from estimators.reward.model import predict_reward
from estimators.reward.trainer import fit_reward_model
from pipelines.sources.simulator import SCENARIOS, simulate
from schemas.config import TrainConfig


def dataset(n: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Pointwise-shaped units from a simulation, and the true reward of each."""
    logs = simulate(replace(SCENARIOS["default"], n_impressions=n, seed=seed, dirty_share=0.0))
    imps, truth = logs.impressions.sort_by("impression_id"), logs.truth.sort_by("impression_id")
    o = truth["observed_true"].to_numpy().astype(np.int8)
    label = np.where(o == 1, truth["label_noisy"].to_numpy().astype(float), np.nan)
    p = truth["propensity_true"].to_numpy()
    table = pa.table({
        "impression_id": imps["impression_id"], "prompt_id": imps["prompt_id"], "prompt": imps["prompt"],
        "response": imps["response"], "observed": o, "label": pa.array(label, from_pandas=True),
        "weight_clipped": o / np.maximum(p, 0.02),
    })
    return table, truth["reward_true"].to_numpy()


def r2(pred: np.ndarray, true: np.ndarray) -> float:
    return float(1 - np.mean((pred - true) ** 2) / np.var(true))


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 100_000
    out = argv[1] if len(argv) > 1 else None
    table, reward = dataset(n)
    prompts, responses = table["prompt"].to_pylist(), table["response"].to_pylist()
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    result = {"impressions": n, "observed": int(table["observed"].to_numpy().sum()), "torch": torch.__version__,
              "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": []}
    for device in devices:
        for batch_size in (256, 4096):
            cfg = TrainConfig(device=device, batch_size=batch_size, epochs=8, patience=8,
                              lr=0.05 * (batch_size / 256) ** 0.5)
            for loss in ("naive", "ips"):
                started = time.perf_counter()
                model, metrics = fit_reward_model(table, loss=loss, cfg=cfg, progress=False)
                pred = predict_reward(model, prompts, responses)
                run = {"device": device, "batch_size": batch_size, "loss": loss,
                       "samples_per_s": metrics["samples_per_s"], "wall_s": time.perf_counter() - started,
                       "best_val_loss": metrics["best_val_loss"], "best_epoch": metrics["best_epoch"],
                       "r2_vs_true_reward": r2(pred, reward), "mean_prediction": float(pred.mean())}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
    result["true_mean_reward"] = float(reward.mean())
    from benchmarks.bench_trainer import bench_throughput

    result["throughput"] = bench_throughput(n)
    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
