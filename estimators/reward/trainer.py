"""The reward trainer: one loop for every loss of ``losses.REGISTRY``, pointwise or pairwise, on either backbone.

A step: the global batch (``batch_size`` × ``grad_accumulation`` × processes rows, streamed from the cache) is cut
into micro-batches; each process runs its own, in bf16 autocast on CUDA, and adds its gradient scaled by its
share of the step's rows, so the step's gradient is that of the whole batch's mean loss whatever the number of
processes or micro-batches (exactly, for the losses that are means over rows). Then gradient clipping, AdamW, and
the learning-rate schedule (linear warmup, then constant, linear or cosine decay). Each epoch ends with the
validation loss; training stops after ``patience`` epochs without a better one and keeps the best state.
Checkpoints: the whole state after every epoch (``Checkpoint``); a resumed run sees the same batches (orders and
dropout are seeded by seed, epoch and rank) and ends, on CPU, bit-identical to one that never stopped.
Across processes (``distributed``): DistributedDataParallel, each rank its slice of every global batch, rank 0
alone writing.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from estimators.losses import INPUTS, NOISE_AWARE, PAIRWISE, REGISTRY, batch_loss, bradley_terry, denominator_mass
from estimators.progress import progress_bar
from estimators.reward import distributed as ddp
from estimators.reward.cache import (
    CHOSEN,
    POINT,
    REJECTED,
    Data,
    dense_spec,
    truncation_counts,
    units_kind,
    write_pair_cache,
    write_pointwise_cache,
)
from estimators.reward.data import (
    TRAIN,
    VAL,
    Batch,
    DeviceBatch,
    FeatureCache,
    StreamingBatches,
    concat_blocks,
    prefetch,
)
from estimators.reward.hashed import HashedRewardModel
from estimators.reward.model import RewardModel, is_transformer, logits, new_encoder, new_model
from schemas.config import TrainConfig
from schemas.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

AUTO = {"hashed": {"lr": 0.05, "lr_schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0, "epochs": 30},
        "transformer": {"lr": 5e-5, "lr_schedule": "linear", "warmup_ratio": 0.1, "max_grad_norm": 1.0, "epochs": 3}}
"""What ``None`` / ``auto`` mean for each backbone: a linear bag of n-grams wants a large constant rate; a
pretrained transformer the usual fine-tuning recipe (Devlin et al. 2019; transformers' Trainer defaults)."""


def optimisation(cfg: TrainConfig) -> dict[str, Any]:
    """The epochs, learning rate, schedule, warmup share and clipping norm (0: none) for ``cfg``, ``auto``/None
    resolved for its backbone."""
    auto = AUTO["transformer" if is_transformer(cfg) else "hashed"]
    return {"epochs": cfg.epochs if cfg.epochs is not None else auto["epochs"],
            "lr": cfg.lr if cfg.lr is not None else auto["lr"],
            "lr_schedule": cfg.lr_schedule if cfg.lr_schedule != "auto" else auto["lr_schedule"],
            "warmup_ratio": cfg.warmup_ratio if cfg.warmup_ratio is not None else auto["warmup_ratio"],
            "max_grad_norm": cfg.max_grad_norm if cfg.max_grad_norm is not None else auto["max_grad_norm"]}


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """The multiple of the peak rate for optimiser step ``step`` (0-based) of ``total``: (step+1)/warmup during the
    warmup (no step at rate 0), then 1 (constant) or a linear / cosine decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; asking for cuda without one is the user's to fix. Under torchrun,
    each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if name == "cuda" and ddp.launched():
        return torch.device("cuda", ddp.local_rank())
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where ``train.precision`` asks for it (auto: on CUDA cards that support it), else None (fp32)."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else None              # emulated bf16 (pre-Ampere) is slower than fp32


@contextmanager
def small_op_threads(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the hashed model's CPU training on one intra-op thread, restoring the caller's setting afterwards.

    A hashed batch is a few thousand non-zeros: too small to gain from threads, while OpenMP's spin-waiting on 2
    shared cores made epochs 20-35x slower (measured: 2,000 vs 70,000 samples/s) whenever another process was
    busy. A transformer's matrix products do gain from threads: it keeps them.
    """
    if device.type != "cpu" or not isinstance(model, HashedRewardModel):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Checkpoint:
    """Where the trainer saves its state after every epoch, and whether to continue from a saved one.

    ``fingerprint`` names what the state was trained on (loss, settings, input hashes): a checkpoint with
    another fingerprint is refused, never silently continued. Only rank 0 writes it; every rank reads it.
    """

    path: Path
    fingerprint: str
    resume: bool = False

    def load(self) -> dict[str, Any] | None:
        if not (self.resume and self.path.is_file()):
            return None
        state = torch.load(self.path, weights_only=True, map_location="cpu")
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(f"{self.path}: checkpoint was written for other inputs or settings; run without "
                             "--resume to start over")
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        if not ddp.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, self.path)


def _check_splits(name: str, cache: FeatureCache) -> None:
    train, val = cache.rows(TRAIN), cache.rows(VAL)
    if train == 0 or val == 0:
        raise InputError(f"reward model [{name}]: {train} units to train on and {val} to validate on (of "
                         f"{cache.meta['counts']['rows_read']}); need some of each")


def check_truncation(cache: FeatureCache, cfg: TrainConfig) -> None:
    """Refuse a ``max_length`` that cuts every response: the model would never see one whole."""
    counts = cache.meta.get("counts", {})
    rows = cache.rows(TRAIN) + cache.rows(VAL)
    rows *= 2 if cache.meta.get("units") == "pairs" else 1
    if rows and counts.get("response_truncated", 0) >= rows:
        raise ConfigError(f"train.max_length = {cfg.max_length} is below the shortest response: every response "
                          "was cut to fit")


def _tokens(batch: DeviceBatch) -> int:
    """Real (unpadded) tokens in a batch of token blocks; 0 for sparse blocks. Counted on the host copy, so that a
    GPU step does not wait for it."""
    return sum(int(b["attention_mask"].sum()) for b in batch.features.values() if isinstance(b, dict))


class _Objective:
    """A loss's training value for a batch of rows: the loss function of the registry on the model's logits."""

    def __init__(self, loss: str, flip_rates: tuple[float, float] | None, pad_id: int):
        self.loss, self.pad_id = loss, pad_id
        self.pairwise = loss in PAIRWISE
        self.scalars = dict(zip(("rho01", "rho10"), flip_rates, strict=True)) if loss in NOISE_AWARE else {}

    def logits(self, net: nn.Module, batch: DeviceBatch) -> dict[str, torch.Tensor]:
        if not self.pairwise:
            return {POINT: logits(net, batch.features[POINT])}
        both = logits(net, concat_blocks(batch.features[CHOSEN], batch.features[REJECTED], self.pad_id))
        return {CHOSEN: both[:batch.size], REJECTED: both[batch.size:]}

    def value(self, scores: Mapping[str, torch.Tensor], columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.pairwise:
            return bradley_terry(scores[CHOSEN], scores[REJECTED], columns["weight"], columns["margin"])
        return batch_loss(self.loss, scores[POINT], {**columns, **self.scalars})

    def __call__(self, net: nn.Module, batch: DeviceBatch) -> torch.Tensor:
        return self.value(self.logits(net, batch), batch.columns)


def score_split(model: nn.Module, objective: _Objective, cache: FeatureCache, split: str, device: torch.device,
                batch_size: int, dtype: torch.dtype | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Logits of every block and the columns of a whole split, on cpu, in file order (no gradients). Across
    processes, batch i is scored by rank i mod world and the results gathered, so every rank gets all of them."""
    source = StreamingBatches(cache, split, batch_size=batch_size, shuffle=False)
    world, rank = ddp.world_size(), ddp.rank()
    mine: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i, host in enumerate(source.epoch(0)):
            if i % world != rank:
                continue
            batch = DeviceBatch.from_batch(host, pad_id=cache.pad_id).to(device)
            scores = objective.logits(model, batch)
            mine.append(({b: v.float().cpu() for b, v in scores.items()},
                         {c: v.cpu() for c, v in batch.columns.items()}))
    parts = ddp.gather(mine)
    ordered = [parts[i % world][i // world] for i in range(sum(len(p) for p in parts))]
    blocks, columns = ordered[0][0].keys(), ordered[0][1].keys()
    return ({b: torch.cat([o[0][b] for o in ordered]) for b in blocks},
            {c: torch.cat([o[1][c] for o in ordered]) for c in columns})


def _micro_batches(host: Batch, loss: str, cfg: TrainConfig, pad_id: int, pin: bool,
                   ) -> list[tuple[DeviceBatch, float]]:
    """This rank's micro-batches of one global batch, each with its share of the step's risk mass × processes:
    the factor that makes the processes' averaged, accumulated gradient the gradient of the whole batch's risk
    (the mass is rows for a mean over rows, Σ o for naive, Σ o·w for snips: ``LossSpec.denominator``). The batch is
    cut into ``grad_accumulation`` chunks and each chunk into one slice per rank; a rank whose slice of the last,
    short batch is empty runs one row at share 0, so that every rank takes part in every gradient exchange."""
    n, world, rank = len(host), ddp.world_size(), ddp.rank()
    total = denominator_mass(loss, host.columns)
    per_chunk = cfg.batch_size * world
    out = []
    for a in range(cfg.grad_accumulation):
        start = min(a * per_chunk + rank * cfg.batch_size, n)
        stop = min(start + cfg.batch_size, n, (a + 1) * per_chunk)
        if stop > start:
            part = host.rows(start, stop)
            share = world * denominator_mass(loss, part.columns) / total if total > 0 else 0.0
            out.append((DeviceBatch.from_batch(part, pin=pin, pad_id=pad_id), share))
        elif a == 0 or world > 1:
            out.append((DeviceBatch.from_batch(host.rows(0, 1), pin=pin, pad_id=pad_id), 0.0))
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train and every buffer, copied to cpu: all a best state or a checkpoint needs, since
    frozen weights stay as loaded (a full copy of a LoRA or top-layers model would be mostly frozen weights)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in frozen}


def freeze_pair_bias(model: nn.Module) -> None:
    """A pairwise loss sees s(chosen) − s(rejected): the output bias cancels, its gradient is rounding noise, and
    AdamW would turn that noise into steps of ±lr. It stays at its initial value."""
    if isinstance(model, HashedRewardModel):
        model.bias.requires_grad_(False)
        return
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == 1 and m.bias is not None:
            m.bias.requires_grad_(False)


def _train(model: nn.Module, name: str, objective: _Objective, cache: FeatureCache, device: torch.device, *,
           cfg: TrainConfig, progress: bool, checkpoint: Checkpoint | None = None,
           ) -> tuple[list[dict[str, float]], int, dict[str, Any]]:
    """Epochs until ``cfg.patience`` pass without a better validation loss; leaves ``model`` in its best state and
    returns (per-epoch history, best epoch, the optimisation settings used)."""
    world = ddp.world_size()
    settings = optimisation(cfg)
    epochs = settings["epochs"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=cfg.weight_decay)
    step_rows = cfg.batch_size * cfg.grad_accumulation * world
    steps_per_epoch = math.ceil(cache.rows(TRAIN) / step_rows)
    total = steps_per_epoch * epochs
    warmup = math.ceil(settings["warmup_ratio"] * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: lr_factor(
        s, total=total, warmup=warmup, schedule=settings["lr_schedule"]))
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = autocast_dtype(cfg, device)
    source = StreamingBatches(cache, TRAIN, batch_size=step_rows, seed=cfg.seed)
    pin = device.type == "cuda"
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, done = float("inf"), 0, {}, False
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"], strict=False)
        optimiser.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, best_loss, best_epoch = saved["history"], saved["best_loss"], saved["best_epoch"]
        best_state, done = saved["best_state"], saved["done"]
        if progress and ddp.is_main():
            logger.info(f"  [{name}] resumed after epoch {len(history)}{' (finished)' if done else ''}",
                        extra={"event": "training_resumed", "loss": name, "epoch": len(history)})
    show = progress and ddp.is_main()
    for epoch in range(len(history) + 1, epochs + 1):
        if done:
            break
        torch.manual_seed(hash((cfg.seed, epoch, ddp.rank())) % 2**63)   # dropout: the same after a resume
        model.train()
        t0, running, seen, tokens = time.perf_counter(), 0.0, 0, 0
        with progress_bar(source.num_rows, desc=f"  [{name}] epoch {epoch}", unit=" samples", unit_scale=True,
                          enabled=show) as bar:
            for parts in prefetch(_micro_batches(b, objective.loss, cfg, cache.pad_id, pin)
                                  for b in source.epoch(epoch)):
                for i, (host, share) in enumerate(parts):
                    batch = host.to(device)
                    sync = nullcontext() if world == 1 or i == len(parts) - 1 else net.no_sync()
                    with sync:
                        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                            value = objective(net, batch)
                        (value * share).backward()
                    if share:
                        running += float(value.detach()) * batch.size
                        seen += batch.size
                        tokens += _tokens(host)
                if settings["max_grad_norm"]:
                    nn.utils.clip_grad_norm_(params, settings["max_grad_norm"])
                optimiser.step()
                scheduler.step()
                optimiser.zero_grad(set_to_none=True)
                bar.update(sum(h.size for h, share in parts if share) * world)
        seconds = time.perf_counter() - t0
        totals = ddp.gather((running, seen, tokens))
        running, seen, tokens = (sum(t[k] for t in totals) for k in range(3))
        val_loss = _validation_loss(model, objective, cache, device, cfg, dtype)
        history.append({"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                        "seconds": seconds, "samples": seen, "samples_per_s": seen / max(seconds, 1e-9),
                        "tokens_per_s": tokens / max(seconds, 1e-9), "lr": scheduler.get_last_lr()[0]})
        improved = ddp.broadcast(val_loss < best_loss)     # rank 0 decides, so no rank can stop alone
        if improved:
            best_loss, best_epoch = val_loss, epoch
            best_state = trainable_state(model)
        if show:
            rate = f"{history[-1]['samples_per_s']:,.0f} samples/s"
            if tokens:
                rate += f", {history[-1]['tokens_per_s']:,.0f} tokens/s"
            logger.info(f"  [{name}] epoch {epoch}/{epochs}: train {history[-1]['train_loss']:.4f}  "
                        f"val {val_loss:.4f}{' *' if improved else '  '}  {rate}",
                        extra={"event": "epoch_done", "loss": name, "epoch": epoch,
                               "train_loss": history[-1]["train_loss"], "val_loss": val_loss,
                               "improved": bool(improved), "samples_per_s": history[-1]["samples_per_s"]})
        done = epoch - best_epoch >= cfg.patience or epoch == epochs
        if checkpoint is not None:
            checkpoint.save({"model": trainable_state(model), "optimizer": optimiser.state_dict(),
                             "scheduler": scheduler.state_dict(), "history": history, "best_loss": best_loss,
                             "best_epoch": best_epoch, "best_state": best_state, "done": done})
    if not best_state:                                     # every validation loss was NaN: say so, do not save it
        raise FloatingPointError(f"reward model [{name}]: validation loss was never finite: {history}")
    model.load_state_dict(best_state, strict=False)
    model.eval()
    return history, best_epoch, {**settings, "warmup_steps": warmup, "total_steps": total, "step_rows": step_rows,
                                 "processes": world, "autocast": str(dtype).removeprefix("torch.") if dtype else None}


def _validation_loss(model: nn.Module, objective: _Objective, cache: FeatureCache, device: torch.device,
                     cfg: TrainConfig, dtype: torch.dtype | None) -> float:
    scores, columns = score_split(model, objective, cache, VAL, device, _eval_batch(cfg), dtype)
    return float(objective.value(scores, columns))


def _eval_batch(cfg: TrainConfig) -> int:
    return cfg.batch_size * (8 if not is_transformer(cfg) else 2)


def build_cache(data: Data, directory: Path, *, loss: str, cfg: TrainConfig) -> FeatureCache:
    """Encode a table-like input for ``loss`` into a cache (the train stage writes its own, from Parquet)."""
    kind = units_kind(loss)
    if kind == "pairs":
        encoder = new_encoder(cfg, dense_spec(data, cfg, pairs=True) if not is_transformer(cfg) else None)
        return write_pair_cache(data, directory, cfg=cfg, encoder=encoder)
    encoder = new_encoder(cfg, dense_spec(data, cfg) if not is_transformer(cfg) else None)
    return write_pointwise_cache(data, directory, args=INPUTS[loss], observed_only=kind == "observed", cfg=cfg,
                                 encoder=encoder)


def fit_reward_model(data: Data | FeatureCache, *, loss: str, cfg: TrainConfig, progress: bool = True,
                     flip_rates: tuple[float, float] | None = None, checkpoint: Checkpoint | None = None,
                     ) -> tuple[RewardModel, dict[str, Any]]:
    """Train a reward model with ``loss`` (any of ``losses.REGISTRY``) on ``cfg.backbone``; early stopping on a
    held-out split of prompts.

    ``data`` is a ``FeatureCache`` (what the train stage streams: ``cache.write_pointwise_cache`` or, for a pairwise
    loss, ``write_pair_cache``), or a ``pyarrow.Table`` / mapping of column name → array with the columns of
    ``cache.required_columns(loss)`` (pairs: ``cache.PAIR_COLUMNS``), encoded into a temporary cache first.
    ``naive``, ``ips``, ``snips`` and ``causalrm_ips`` train on the observed units only (``losses.OBSERVED_ONLY``),
    the other pointwise losses on every unit. ``flip_rates`` (ρ01, ρ10) are required by the noise-aware losses.
    Returns the model in its best validation state, on the training device, and its metrics (per-epoch history,
    counts, truncation, device, throughput, optimisation).
    """
    if loss not in REGISTRY:
        raise ConfigError(f"unknown loss {loss!r}; choose from {sorted(REGISTRY)}")
    kind = units_kind(loss)
    if loss in NOISE_AWARE and flip_rates is None:
        raise ConfigError(f"loss {loss!r} needs the fitted flip rates (models/noise.json from the fit stage)")
    if not isinstance(data, FeatureCache):
        with tempfile.TemporaryDirectory(prefix="obsfeed-features-") as tmp:
            started = time.perf_counter()
            cache = build_cache(data, Path(tmp), loss=loss, cfg=cfg)
            model, metrics = fit_reward_model(cache, loss=loss, cfg=cfg, progress=progress, flip_rates=flip_rates,
                                              checkpoint=checkpoint)
            return model, {**metrics, "featurize_s": time.perf_counter() - started - metrics["wall_s"]}
    cache = data
    needs = ("weight", "margin") if kind == "pairs" else INPUTS[loss]
    if cache.meta.get("units") != kind or not set(needs) <= set(cache.columns):
        raise ValueError(f"loss {loss!r} needs a cache of {kind} units with {list(needs)}; this one has "
                         f"{cache.meta.get('units')} units with {cache.columns}")
    _check_splits(loss, cache)
    if cache.tokens:
        check_truncation(cache, cfg)
    device = resolve_device(cfg.device)
    ddp.init(device.type)
    started = time.perf_counter()
    model = new_model(cfg, cache).to(device)
    if loss in PAIRWISE:
        freeze_pair_bias(model)
    objective = _Objective(loss, flip_rates, cache.pad_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if progress and ddp.is_main():
        rows = "pairs" if kind == "pairs" else "units"
        logger.info(f"  [{loss}] {cache.rows(TRAIN):,} train / {cache.rows(VAL):,} validation {rows} "
                    f"({'observed only' if kind == 'observed' else 'all'}), backbone {model.backbone_kind}, "
                    f"{trainable:,} trainable parameters, {device}"
                    f"{f' x {ddp.world_size()} processes' if ddp.world_size() > 1 else ''}",
                    extra={"event": "training_started", "loss": loss, "device": str(device),
                           "processes": ddp.world_size()})
    seeded = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with seeded, small_op_threads(model, device):
        history, best_epoch, settings = _train(model, loss, objective, cache, device, cfg=cfg, progress=progress,
                                               checkpoint=checkpoint)
        extra: dict[str, Any] = {}
        if kind == "pairs":
            scores, _ = score_split(model, objective, cache, VAL, device, _eval_batch(cfg), autocast_dtype(cfg, device))
            extra["val_pair_accuracy"] = float((scores[CHOSEN] > scores[REJECTED]).float().mean())
    counts = cache.meta["counts"]
    trained_s = sum(h["seconds"] for h in history)
    return model, {
        "loss": loss, "flip_rates": list(flip_rates) if loss in NOISE_AWARE else None, "backbone": model.config(),
        "best_epoch": best_epoch, "best_val_loss": history[best_epoch - 1]["val_loss"], "epochs_run": len(history),
        "stopped_early": len(history) < settings["epochs"], "history": history,
        "samples_per_s": sum(h["samples"] for h in history) / max(trained_s, 1e-9),
        "tokens_per_s": sum(h["tokens_per_s"] * h["seconds"] for h in history) / max(trained_s, 1e-9),
        "units": kind, "n_rows": counts["rows_read"], "n_train": cache.rows(TRAIN), "n_val": cache.rows(VAL),
        "truncated": truncation_counts(cache), "trainable_parameters": trainable,
        "parameters": sum(p.numel() for p in model.parameters()), "optimisation": settings, **extra,
        "device": str(device), "wall_s": time.perf_counter() - started,
    }


def fit_pairwise_reward_model(pairs: Data | FeatureCache, *, cfg: TrainConfig, progress: bool = True,
                              checkpoint: Checkpoint | None = None) -> tuple[RewardModel, dict[str, Any]]:
    """``fit_reward_model`` with the weighted Bradley–Terry loss −w·log σ(s(chosen) − s(rejected) − margin) on
    preference pairs. The same model class as the pointwise losses, so it scores single responses the same way."""
    return fit_reward_model(pairs, loss="bt", cfg=cfg, progress=progress, checkpoint=checkpoint)

