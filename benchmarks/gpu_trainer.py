"""The transformer reward trainer on a GPU at realistic sizes: one prepared script, at most ~8 minutes on one card.

``python -m benchmarks.gpu_trainer [OUT.json] [--smoke]``. It carries nothing: each backbone is built here from its
config with random weights (throughput does not depend on the weights), with a small word-level tokenizer (the
cache's token ids are drawn at random over the model's whole vocabulary, so the tokenizer only supplies the pad id).

Per backbone (a BERT-base-size encoder, 110M parameters, and a ~0.5B-parameter Qwen2-style decoder):
* the trainer's own loop (``fit_reward_model``, one epoch of ``ips``, bf16 autocast): samples/s, real tokens/s,
  peak GPU memory, and model FLOP utilisation = 6 · parameters · tokens/s ÷ the card's dense bf16 peak (the
  Kaplan et al. 6N rule; attention FLOPs not counted, so a lower bound);
* the loader's efficiency: the same step fed by the streaming loader vs the split held in memory, alternated;
* with two or more GPUs: the same epoch under ``torchrun --nproc-per-node 2`` (each process half the batch), and
  its samples/s against one process.

``--smoke`` runs the same code at toy sizes on any device (CPU included), to check the script before spending
device time. The HH-RLHF accuracy block runs on CUDA through ``make bench-real`` (it picks the GPU when present).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_trainer import _alternate
from estimators.reward.cache import POINT
from estimators.reward.data import Chunk, FeatureCache, Ragged
from estimators.reward.model import new_model
from estimators.reward.trainer import fit_reward_model
from schemas.config import TrainConfig

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
"""Dense bf16 tensor-core peak FLOP/s by card (vendor data sheets, without sparsity)."""

SIZES = {
    "bert-base": {"kind": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                  "rows": 4096, "max_length": 512, "batch_size": 32},
    "qwen2-0.5b": {"kind": "qwen2", "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                   "max_position_embeddings": 4096, "tie_word_embeddings": True,
                   "rows": 2048, "max_length": 512, "batch_size": 16},
}
SMOKE = {"rows": 96, "max_length": 32, "batch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 500, "num_key_value_heads": 1}


def build_folder(name: str, spec: dict[str, Any], folder: Path) -> Path:
    """A random-weight sequence-classification folder for ``spec``, with a tiny word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForSequenceClassification, BertConfig, PreTrainedTokenizerFast, Qwen2Config

    keys = {k: v for k, v in spec.items() if k not in ("kind", "rows", "max_length", "batch_size")}
    config = (BertConfig if spec["kind"] == "bert" else Qwen2Config)(num_labels=1, pad_token_id=0, **keys)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(100)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


def token_cache(spec: dict[str, Any], folder: Path, seed: int = 0) -> FeatureCache:
    """``rows`` rated units of random tokens, lengths uniform in [max_length/4, max_length], 5% held out."""
    rng = np.random.default_rng(seed)
    n, width = spec["rows"], spec["max_length"]
    lengths = rng.integers(width // 4, width + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(2, spec["vocab_size"], int(offsets[-1])).astype(np.int32)
    label = (rng.random(n) < 0.5).astype(np.float32)
    chunk = Chunk({POINT: Ragged(ids, offsets)}, {"label": label, "observed": np.ones(n, np.float32),
                                                  "weight": rng.uniform(1, 3, n).astype(np.float32)},
                  rng.random(n) < 0.05)
    return FeatureCache.write([chunk], folder, n_features=spec["vocab_size"],
                              extra={"units": "observed", "counts": {"rows_read": n}, "backbone": "transformer",
                                     "pad_token_id": 0})


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measure(name: str, spec: dict[str, Any], tmp: Path, device: str) -> dict[str, Any]:
    folder = build_folder(name, spec, tmp / name)
    cache = token_cache(spec, tmp / f"{name}-cache")
    cfg = TrainConfig(backbone=str(folder), max_length=spec["max_length"], batch_size=spec["batch_size"],
                      epochs=1, device=device, lr=1e-5)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model, metrics = fit_reward_model(cache, loss="ips", cfg=cfg, progress=False)
    wall = time.perf_counter() - started
    params = metrics["parameters"]
    peak = peak_flops()
    row = {"backbone": name, "parameters": params, "rows": spec["rows"], "max_length": spec["max_length"],
           "batch_size": spec["batch_size"], "samples_per_s": metrics["samples_per_s"],
           "tokens_per_s": metrics["tokens_per_s"], "autocast": metrics["optimisation"]["autocast"],
           "epoch_s": metrics["history"][0]["seconds"], "wall_s": wall,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
           "mfu": 6 * params * metrics["tokens_per_s"] / peak if peak else None}
    del model
    loader = _alternate(lambda: new_model(cfg, cache), cache, torch.device(device), spec["batch_size"], epochs=1,
                        rounds=1, lr=1e-5)
    row["streaming_over_in_memory"] = loader["ratio"]
    if device == "cuda" and torch.cuda.device_count() >= 2:
        row["ddp"] = ddp_ratio(folder, cache, spec, row["samples_per_s"])
    print(json.dumps(row), flush=True)
    return row


def ddp_ratio(folder: Path, cache: FeatureCache, spec: dict[str, Any], one: float) -> dict[str, Any]:
    """samples/s of 2 processes (half the batch each: the same global batch) over 1 process."""
    out = cache.directory.parent / "ddp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "benchmarks.gpu_trainer", "--worker", str(folder), str(cache.directory), str(spec["max_length"]),
               str(spec["batch_size"] // 2), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    two = json.loads(out.read_text())["samples_per_s"]
    return {"processes": 2, "samples_per_s": two, "ratio_over_one": two / one}


def worker(folder: str, cache_dir: str, max_length: str, batch_size: str, out: str) -> None:
    """One torchrun rank of ``ddp_ratio``: rank 0 writes the metrics."""
    from estimators.reward import distributed as ddp

    cfg = TrainConfig(backbone=folder, max_length=int(max_length), batch_size=int(batch_size), epochs=1,
                      device="cuda", lr=1e-5)
    _, metrics = fit_reward_model(FeatureCache(cache_dir), loss="ips", cfg=cfg, progress=False)
    if ddp.is_main():
        Path(out).write_text(json.dumps(metrics, default=str))
    ddp.close()


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        worker(*argv[1:6])
        return
    smoke = "--smoke" in argv
    paths = [a for a in argv if not a.startswith("--")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                              "peak_bf16_flops": peak_flops(), "smoke": smoke, "runs": []}
    with tempfile.TemporaryDirectory(prefix="obsfeed-gpu-") as tmp:
        for name, spec in SIZES.items():
            spec = {**spec, **SMOKE} if smoke else spec
            result["runs"].append(measure(name, spec, Path(tmp), device))
    text = json.dumps(result, indent=2)
    print(text)
    if paths:
        Path(paths[0]).write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
