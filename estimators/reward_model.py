"""The torch reward model over hashed text n-grams, its training loop, and save/load (DESIGN §6).

Features: prompt and response are hashed separately (``HashingVectorizer``, l1-normalised word n-grams), so the
model sees the *share* of each n-gram in each text; the sparse rows feed ``nn.EmbeddingBag(mode="sum")``
directly (indices, offsets, per-sample weights), which is a linear model when ``hidden == 0``. Nothing is
fitted outside torch, so a saved state_dict plus its config rebuilds the model exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import HashingVectorizer
from torch import nn

from estimators.losses import OBSERVED_ONLY, batch_loss
from schemas.config import TrainConfig

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


def featurize(prompts: Sequence[str | None], responses: Sequence[str | None], *, hash_features: int,
              ngram_max: int) -> sp.csr_matrix:
    """Sparse [prompt n-grams | response n-grams] rows, each half l1-normalised (width 2·hash_features)."""
    vec = HashingVectorizer(n_features=hash_features, ngram_range=(1, ngram_max), alternate_sign=False,
                            norm="l1", dtype=np.float32)
    p = vec.transform(["" if t is None else t for t in prompts])
    r = vec.transform(["" if t is None else t for t in responses])
    return sp.hstack([p, r], format="csr", dtype=np.float32)


class RewardModel(nn.Module):
    """s(x) = bag of n-gram embeddings → (ReLU → Linear when hidden > 0) → one logit."""

    def __init__(self, *, hash_features: int, ngram_max: int = 2, hidden: int = 0):
        super().__init__()
        self.hash_features, self.ngram_max, self.hidden = hash_features, ngram_max, hidden
        self.bag = nn.EmbeddingBag(2 * hash_features, hidden or 1, mode="sum")
        if hidden == 0:
            nn.init.zeros_(self.bag.weight)
        else:
            nn.init.normal_(self.bag.weight, std=0.1)
        self.head = nn.Linear(hidden, 1) if hidden else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        h = self.bag(indices, offsets, per_sample_weights=values)
        if self.head is not None:
            h = self.head(torch.relu(h))
        return h.squeeze(-1) + self.bias

    def config(self) -> dict[str, int]:
        return {"hash_features": self.hash_features, "ngram_max": self.ngram_max, "hidden": self.hidden}


def _to_tensors(X: sp.csr_matrix, device: torch.device, pin: bool) -> tuple[torch.Tensor, ...]:
    indices = torch.from_numpy(X.indices.astype(np.int64))
    offsets = torch.from_numpy(X.indptr[:-1].astype(np.int64))
    values = torch.from_numpy(X.data.astype(np.float32))
    if pin:
        indices, offsets, values = indices.pin_memory(), offsets.pin_memory(), values.pin_memory()
    return tuple(t.to(device, non_blocking=pin) for t in (indices, offsets, values))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def validation_mask(prompt_ids: Sequence[str], fraction: float) -> np.ndarray:
    """True for units in the held-out split: a stable hash of the prompt, so a prompt's responses stay together."""
    def h(s: str) -> float:
        return int.from_bytes(hashlib.blake2b(f"val:{s}".encode(), digest_size=8).digest(), "little") / 2**64

    cache: dict[str, bool] = {}
    return np.array([cache.setdefault(p, h(p) < fraction) for p in prompt_ids], dtype=bool)


def _model_input(X: sp.csr_matrix, rows: np.ndarray, device: torch.device, pin: bool):
    return _to_tensors(X[rows], device, pin)


def _targets(arrays: dict[str, np.ndarray], rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v[rows], dtype=torch.float32, device=device) for k, v in arrays.items()}


def _evaluate(model: RewardModel, loss: str, X, arrays, rows, device, pin, batch_size: int) -> float:
    """Loss over ``rows`` in batches, weighted by batch size (the per-unit risk estimate)."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            r = rows[start:start + batch_size]
            logits = model(*_model_input(X, r, device, pin)).float()
            total += float(batch_loss(loss, logits, _targets(arrays, r, device))) * r.size
            n += r.size
    return total / max(n, 1)


def fit_reward_model(columns: dict[str, Sequence], *, loss: str, cfg: TrainConfig, progress: bool = True,
                     ) -> tuple[RewardModel, dict[str, Any]]:
    """Train a reward model with ``loss`` on pointwise columns; early stopping on a held-out prompt split.

    ``columns`` needs prompt_id, prompt, response, observed, label and, for the weighted losses, weight
    (clipped IPS weight) and imputed (cross-fitted E[label | x, o=1]).
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    pin = device.type == "cuda"
    observed = np.asarray(columns["observed"], dtype=np.float32)
    keep = observed == 1 if loss in OBSERVED_ONLY else np.ones(observed.size, bool)
    X = featurize(columns["prompt"], columns["response"], hash_features=cfg.hash_features,
                  ngram_max=cfg.ngram_max)
    arrays = {"label": np.asarray(columns["label"], dtype=np.float32), "observed": observed}
    if loss != "naive":
        arrays["weight"] = np.asarray(columns["weight"], dtype=np.float32)
    if loss == "dr":
        arrays["imputed"] = np.asarray(columns["imputed"], dtype=np.float32)
    val = validation_mask(list(columns["prompt_id"]), cfg.val_fraction)
    train_rows, val_rows = np.flatnonzero(keep & ~val), np.flatnonzero(keep & val)
    if train_rows.size == 0 or val_rows.size == 0:
        raise ValueError(f"loss {loss!r}: no units to train or validate on ({train_rows.size}/{val_rows.size})")

    model = RewardModel(hash_features=cfg.hash_features, ngram_max=cfg.ngram_max, hidden=cfg.hidden).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best = (float("inf"), -1, None)
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        t0, seen, running = time.perf_counter(), 0, 0.0
        order = train_rows[torch.randperm(train_rows.size, generator=generator).numpy()]
        for start in range(0, order.size, cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(*_model_input(X, rows, device, pin))
            value = batch_loss(loss, logits.float(), _targets(arrays, rows, device))
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            optimiser.step()
            running += float(value.detach()) * rows.size
            seen += rows.size
        val_loss = _evaluate(model, loss, X, arrays, val_rows, device, pin, 8 * cfg.batch_size)
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        history.append({"epoch": epoch, "train_loss": running / seen, "val_loss": val_loss, "samples_per_s": rate})
        if progress:
            print(f"  [{loss}] epoch {epoch + 1}/{cfg.epochs}: train {running / seen:.4f}, val {val_loss:.4f}, "
                  f"{rate:,.0f} samples/s", file=sys.stderr, flush=True)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    wall = time.perf_counter() - started
    return model.cpu(), {
        "loss": loss, "best_epoch": best[1], "best_val_loss": best[0], "history": history,
        "n_train": int(train_rows.size), "n_val": int(val_rows.size),
        "n_observed_train": int(observed[train_rows].sum()), "device": str(device), "wall_s": wall,
        "samples_per_s": float(np.mean([h["samples_per_s"] for h in history])),
    }


def predict_reward(model: RewardModel, prompts: Sequence[str | None], responses: Sequence[str | None], *,
                   batch_size: int = 8192) -> np.ndarray:
    """Predicted P(label = 1 | x) for each (prompt, response)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(responses), batch_size):
            X = featurize(prompts[start:start + batch_size], responses[start:start + batch_size],
                          hash_features=model.hash_features, ngram_max=model.ngram_max)
            out.append(torch.sigmoid(model(*_to_tensors(X, device, False))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def save_reward_model(model: RewardModel, directory: Path | str, extra: dict[str, Any] | None = None) -> None:
    """``model.pt`` (state_dict only, loadable with ``weights_only=True``) and ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({**model.config(), **(extra or {})}, indent=2) + "\n")


def load_reward_model(directory: Path | str) -> RewardModel:
    directory = Path(directory)
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    model = RewardModel(hash_features=cfg["hash_features"], ngram_max=cfg["ngram_max"], hidden=cfg["hidden"])
    model.load_state_dict(torch.load(directory / MODEL_FILE, weights_only=True, map_location="cpu"))
    return model.eval()
