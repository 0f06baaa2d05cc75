"""One interface over the two kinds of reward model: build one for a run, score texts, save, load.

Both kinds are ``nn.Module``s with the same surface: ``encode(prompts, responses, columns)`` makes a cache block
(hashed n-grams or tokens), ``forward`` takes that block on a device and returns one logit per row, ``scale`` and
``shift`` hold the post-hoc calibration, ``save(directory, record)`` writes a folder. A hashed model is a
``model.pt`` state dict with obsfeed's ``config.json``; a transformer model is a Hugging Face folder with
``obsfeed.json`` beside it, which ``AutoModelForSequenceClassification`` loads without obsfeed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from estimators.reward.backbones import HASHED, OBSFEED_FILE, PairTokenizer, load_saved_transformer, load_transformer
from estimators.reward.cache import POINT
from estimators.reward.data import Batch, DeviceBatch, DeviceBlock, FeatureCache
from estimators.reward.features import DenseSpec
from estimators.reward.hashed import CONFIG_FILE, HashedEncoder, HashedRewardModel
from schemas import run_dir as rd
from schemas.config import TrainConfig
from schemas.errors import InputError

RewardModel = HashedRewardModel | nn.Module
"""A trained reward model: ``HashedRewardModel`` or ``backbones.TransformerRewardModel``."""


def is_transformer(cfg: TrainConfig) -> bool:
    return cfg.backbone != HASHED


def new_encoder(cfg: TrainConfig, dense: DenseSpec | None = None) -> HashedEncoder | PairTokenizer:
    """What the cache encodes rows with for ``cfg``'s backbone: its n-gram featuriser or its tokenizer (loading
    only the tokenizer, and checking the folder, before any data is read)."""
    if not is_transformer(cfg):
        return HashedEncoder(hash_features=cfg.hash_features, ngram_max=cfg.ngram_max, dense=dense)
    from estimators.reward.backbones import check_backbone_folder, check_settings, load_tokenizer

    folder = check_backbone_folder(cfg.backbone)
    tokenizer = load_tokenizer(folder)
    check_settings(folder, max_length=cfg.max_length, lora_rank=cfg.lora_rank, trainable_layers=cfg.trainable_layers,
                   calibrate=cfg.calibrate, tokenizer=tokenizer)
    return PairTokenizer(tokenizer, cfg.max_length)


def new_model(cfg: TrainConfig, cache: FeatureCache) -> RewardModel:
    """A fresh model for ``cfg`` (seeded by ``train.seed``), on cpu, matching ``cache``'s encoding."""
    if is_transformer(cfg):
        if not cache.tokens:
            raise ValueError(f"{cache.directory}: a hashed-feature cache cannot train backbone {cfg.backbone}")
        return load_transformer(cfg.backbone, max_length=cfg.max_length, seed=cfg.seed, lora_rank=cfg.lora_rank,
                                lora_alpha=cfg.lora_alpha, trainable_layers=cfg.trainable_layers,
                                gradient_checkpointing=cfg.gradient_checkpointing)
    if cache.tokens:
        raise ValueError(f"{cache.directory}: a token cache cannot train the hashed backbone")
    with torch.random.fork_rng(devices=[]):                # seeded init, without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        return HashedRewardModel(hash_features=cfg.hash_features, ngram_max=cfg.ngram_max, hidden=cfg.hidden,
                                 dense=DenseSpec.from_dict(cache.meta.get("dense")), factors=cfg.factors)


def numeric_inputs(model: RewardModel) -> list[str]:
    """The numeric data columns a model reads besides the text: a hashed model's dense block; none for a
    transformer."""
    dense = getattr(model, "dense", None)
    return dense.needs if dense is not None else []


def logits(model: nn.Module, block: DeviceBlock) -> torch.Tensor:
    """The model's float32 logits for one block (the EmbeddingBag triple or the transformers keyword tensors)."""
    out = model(**block) if isinstance(block, dict) else model(*block)
    return out.float()


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict_logits(model: RewardModel, prompts: Sequence[str | None], responses: Sequence[str | None], *,
                   columns: Mapping[str, Sequence[float]] | None = None, batch_size: int | None = None,
                   ) -> np.ndarray:
    """The calibrated logit s'(x) of each (prompt, response), float64, computed on the model's device."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    batch_size = batch_size or (8192 if isinstance(model, HashedRewardModel) else 64)
    model.eval()
    device = device_of(model)
    out = [np.zeros(0)]
    with torch.no_grad():
        for start in range(0, len(responses), batch_size):
            part = slice(start, start + batch_size)
            block = model.encode(list(prompts[part]), list(responses[part]),
                                 {c: np.asarray(v, dtype=np.float64)[part] for c, v in (columns or {}).items()})
            batch = DeviceBatch.from_batch(Batch({POINT: block}, {}), pad_id=model.pad_id).to(device)
            out.append(logits(model, batch.features[POINT]).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def predict_reward(model: RewardModel, prompts: Sequence[str | None], responses: Sequence[str | None], *,
                   columns: Mapping[str, Sequence[float]] | None = None, batch_size: int | None = None,
                   ) -> np.ndarray:
    """Predicted P(label = 1 | x) = σ(s(x)) for each (prompt, response), float64, on the model's device.
    ``columns``: the numeric columns of a hashed model's dense block (``model.dense.needs``), if it has any."""
    s = predict_logits(model, prompts, responses, columns=columns, batch_size=batch_size)
    return 1.0 / (1.0 + np.exp(-s))


def score(model: RewardModel | Path | str, prompts: Sequence[str | None], responses: Sequence[str | None], *,
          columns: Mapping[str, Sequence[float]] | None = None, batch_size: int | None = None) -> np.ndarray:
    """Rewards P(label = 1 | x) of new (prompt, response) pairs: the Python entry point for a trained model, of
    either backbone.

    ``model`` is a model or a folder written by the train stage (``RUN/reward_model``, or
    ``RUN/reward_model/baselines/<loss>``), loaded with ``weights_only=True`` / safetensors.

    Example (after ``make demo``)::

        rewards = score("runs/demo/reward_model", ["How do I boil an egg?"], ["Simmer it for nine minutes."])
    """
    if isinstance(model, Path | str):
        model = load_reward_model(model)
    return predict_reward(model, list(prompts), list(responses), columns=columns, batch_size=batch_size)


def save_reward_model(model: RewardModel, record: Mapping[str, Any], directory: Path | str) -> None:
    """Write ``model`` and obsfeed's ``record`` (loss, role, settings) to ``directory`` (module docstring)."""
    model.save(Path(directory), dict(record))


def model_record(directory: Path | str) -> dict[str, Any]:
    """obsfeed's record of a saved model (loss, role, settings, the module's own configuration)."""
    directory = Path(directory)
    for name in (OBSFEED_FILE, CONFIG_FILE):
        if (directory / name).is_file():
            return json.loads((directory / name).read_text())
    raise InputError(f"{directory}: no reward model ({OBSFEED_FILE} or {CONFIG_FILE} missing)")


def load_reward_model(directory: Path | str) -> RewardModel:
    """A saved model of either backbone, on cpu, in eval mode; no pickle code runs."""
    directory = Path(directory)
    if (directory / OBSFEED_FILE).is_file():
        return load_saved_transformer(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise InputError(f"{directory}: no reward model ({OBSFEED_FILE} or {CONFIG_FILE} missing)")
    return HashedRewardModel.load(directory)


def reward_model_dirs(reward_model_dir: Path | str) -> list[Path]:
    """The saved model folders of a run's reward model: the main model first, then each baseline's."""
    root = Path(reward_model_dir)
    model_record(root)                                     # no model at all: say so
    return [root, *sorted(p for p in (root / rd.BASELINES).glob("*") if p.is_dir() and p.name != "__pycache__")]


def load_reward_models(reward_model_dir: Path | str) -> dict[str, RewardModel]:
    """Loss name → trained model (on cpu), the main model first, then each baseline: what train wrote, read back
    by evaluate and the benchmarks."""
    return {model_record(d)["loss"]: load_reward_model(d) for d in reward_model_dirs(reward_model_dir)}
