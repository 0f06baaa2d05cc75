"""The torch reward model over hashed text n-grams, its training loop, and save/load (DESIGN §6).

Features: hashed word n-grams of ``prompt + " " + response`` (``HashingVectorizer``, l1-normalised: the model
sees the share of each n-gram in the text). The sparse rows feed ``nn.EmbeddingBag(mode="sum")`` directly
(indices, offsets, per-sample weights): a linear model when ``hidden == 0``, and nothing densified on the way
to a GPU. Nothing is fitted outside torch, so a state_dict plus ``config.json`` rebuilds the model exactly.

Data path: any table-like input is featurised once, chunk by chunk, into a ``reward_data.FeatureCache`` on local
disk, and every epoch streams it back (blocks shuffled, rows shuffled in a buffer, read ahead in a thread):
memory holds a buffer, never the dataset. Training checkpoints every epoch and can resume (``Checkpoint``).
No Beam, and no paths except the cache, checkpoints and save/load.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from estimators.features import RESPONSE_LENGTH
from estimators.losses import INPUTS, LOSSES, NOISE_AWARE, OBSERVED_ONLY, PAIRWISE, batch_loss, bradley_terry
from estimators.reward_data import TRAIN, VAL, Batch, Chunk, DeviceBatch, FeatureCache, StreamingBatches, stream
from estimators.reward_features import FEATURES, DenseSpec, features, fit_dense_spec
from schemas import impressions as imp
from schemas import pairwise as pr
from schemas import pointwise as pw
from schemas import units as un
from schemas.config import TrainConfig
from schemas.errors import ConfigError, InputError

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
LOSS_COLUMNS = {"label": un.LABEL, "observed": un.OBSERVED, "weight": pw.WEIGHT_CLIPPED, "imputed": pw.IMPUTED}
"""Loss argument → pointwise column: every weighted loss uses the clipped IPS weight (snips self-normalises)."""
TEXT_COLUMNS = (imp.PROMPT_ID, imp.PROMPT, imp.RESPONSE)

Data = pa.Table | pa.RecordBatch | Mapping[str, Any]


def required_columns(loss: str) -> list[str]:
    """The pointwise columns ``fit_reward_model`` reads for ``loss`` (so a reader can ask for these only)."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    return [*TEXT_COLUMNS, *(LOSS_COLUMNS[k] for k in INPUTS[loss])]


class RewardModel(nn.Module):
    """s(x) = bag of n-gram embeddings (+ ReLU → Linear when hidden > 0) → one logit; P(label=1|x) = σ(s).

    ``dense``: the optional dense block (``reward_features.DenseSpec``), columns ``hash_features`` on of the
    same bag: a linear term in the dense features.
    ``factors`` = k > 0 adds a factorisation machine's pairwise term (Rendle 2010), ½ Σ_f [(Σ_j x_j v_jf)² −
    Σ_j x_j² v_jf²] = Σ_{j<l} x_j x_l ⟨v_j, v_l⟩, in O(nnz·k) with two bags. Over a user token and an item token
    this is matrix factorisation with biases: the model for id-based data such as Coat.
    """

    def __init__(self, *, hash_features: int, ngram_max: int = 1, hidden: int = 0, dense: DenseSpec | None = None,
                 factors: int = 0):
        super().__init__()
        self.hash_features, self.ngram_max, self.hidden, self.factors = hash_features, ngram_max, hidden, factors
        self.dense = dense or DenseSpec()
        self.bag = nn.EmbeddingBag(hash_features + self.dense.dim, hidden or 1, mode="sum")
        if hidden == 0:
            nn.init.zeros_(self.bag.weight)            # a linear model: start from "every n-gram is neutral"
            self.head = None
        else:
            nn.init.normal_(self.bag.weight, std=1.0)  # l1-normalised rows: a bag is a mean, of scale ~std
            self.head = nn.Linear(hidden, 1, bias=False)   # ``bias`` below is the one intercept
        self.pairs = None
        if factors:
            self.pairs = nn.EmbeddingBag(hash_features + self.dense.dim, factors, mode="sum")
            nn.init.normal_(self.pairs.weight, std=0.1)
        self.bias = nn.Parameter(torch.zeros(1))
        # The post-hoc affine calibration of the logit (``calibrate``): identity until fitted, saved with the model.
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("shift", torch.zeros(1))

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Logits for a CSR batch: ``indices``/``values`` = its column ids and values, ``offsets`` = indptr[:-1]."""
        h = self.bag(indices, offsets, per_sample_weights=values)
        if self.head is not None:
            h = self.head(torch.relu(h))
        out = h.squeeze(-1) + self.bias
        if self.pairs is not None:
            total = self.pairs(indices, offsets, per_sample_weights=values)
            squares = F.embedding_bag(indices, self.pairs.weight ** 2, offsets, mode="sum",
                                      per_sample_weights=values ** 2)
            out = out + 0.5 * (total ** 2 - squares).sum(-1)
        return self.scale * out + self.shift

    def config(self) -> dict[str, Any]:
        """What ``load_reward_model`` needs to rebuild the module before loading its state_dict."""
        return {"features": FEATURES, "hash_features": self.hash_features, "ngram_max": self.ngram_max,
                "hidden": self.hidden, "factors": self.factors, "dense": self.dense.to_dict()}

    def features(self, prompts: Sequence[str | None], responses: Sequence[str | None],
                 columns: Mapping[str, Any] | None = None) -> sp.csr_matrix:
        """This model's input rows for raw texts (and the numeric columns its dense block reads)."""
        return features(prompts, responses, hash_features=self.hash_features, ngram_max=self.ngram_max,
                        dense=self.dense, columns=columns)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; asking for cuda without one is the user's to fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


@contextmanager
def _small_op_threads(device: torch.device) -> Iterator[None]:
    """Run the training loop's CPU ops on one intra-op thread, restoring the caller's setting afterwards.

    A batch is a few thousand non-zeros: too small to gain from threads, while OpenMP's spin-waiting on 2 shared
    cores made epochs 20-35x slower (measured: 2,000 vs 70,000 samples/s) whenever another process was busy.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def validation_mask(prompt_ids: Sequence[str], fraction: float) -> np.ndarray:
    """True for held-out units: blake2b of the prompt id, so a prompt's responses stay on one side, in every process.

    Python's ``hash()`` of a string changes with PYTHONHASHSEED; this does not.
    """
    cache: dict[str, bool] = {}

    def held_out(p: str) -> bool:
        if p not in cache:
            digest = hashlib.blake2b(p.encode(), digest_size=8, person=b"obsfeed-val").digest()
            cache[p] = int.from_bytes(digest, "little") < fraction * 2**64
        return cache[p]

    return np.fromiter((held_out(str(p)) for p in prompt_ids), dtype=bool, count=len(prompt_ids))


def _column(data: Data, name: str) -> pa.ChunkedArray | np.ndarray | Sequence:
    arrow = isinstance(data, pa.Table | pa.RecordBatch)
    columns = data.schema.names if arrow else data.keys()
    if name not in columns:
        raise InputError(f"reward model: column {name!r} missing (have {sorted(columns)})")
    return data.column(name) if arrow else data[name]


def _numeric(data: Data, name: str) -> np.ndarray:
    """float64 with nulls as NaN."""
    col = _column(data, name)
    if isinstance(col, pa.ChunkedArray | pa.Array):
        col = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(col, dtype=np.float64)


def _strings(data: Data, name: str) -> list[str | None]:
    col = _column(data, name)
    return col.to_pylist() if isinstance(col, pa.ChunkedArray | pa.Array) else list(col)


def _loss_inputs(data: Data, args: Sequence[str]) -> dict[str, np.ndarray]:
    """The loss arguments' columns as float32 arrays, checked: a bad value is named here, not found as a NaN loss
    later."""
    arrays = {arg: _numeric(data, LOSS_COLUMNS[arg]) for arg in args}
    o = arrays["observed"]
    if not np.isin(o, (0, 1)).all():
        raise InputError(f"reward model: {un.OBSERVED} must be 0/1, got {np.unique(o[~np.isin(o, (0, 1))])[:5]}")
    obs = o == 1
    checks = [("label", obs, 0.0, 1.0), ("weight", obs, 0.0, np.inf), ("imputed", np.ones_like(obs), 0.0, 1.0)]
    for arg, rows, lo, hi in checks:
        if arg in arrays:
            v = arrays[arg][rows]
            bad = ~np.isfinite(v) | (v < lo) | (v > hi)
            if bad.any():
                raise InputError(f"reward model: {bad.sum()} rows of {LOSS_COLUMNS[arg]!r} are not in [{lo}, {hi}]"
                                 f"{' on observed units' if rows is obs else ''}, e.g. {v[bad][:3].tolist()}")
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _csr_batch(X: sp.csr_matrix, device: torch.device, pin: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, offsets, values) of a CSR block, the EmbeddingBag inputs; pinned + async copy on CUDA."""
    batch = DeviceBatch.from_batch(Batch({"x": X}, {}), pin=pin)
    return batch.to(device).features["x"]


# --- data: any table-like input → record batches → a feature cache (reward_data) ---------------------------------

CHUNK_ROWS = 16_384
"""Rows featurised at a time while a cache is written: bounds memory, whatever the dataset's size."""
POINT, CHOSEN, REJECTED = "x", "chosen", "rejected"
PAIR_COLUMNS = (pr.PROMPT_ID, pr.PROMPT, pr.CHOSEN, pr.REJECTED, pr.WEIGHT, pr.MARGIN)


def record_batches(data: Data | Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """A table, a column mapping or a stream of record batches, as record batches of at most CHUNK_ROWS rows."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, Mapping):
        data = pa.table({k: (v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(list(v) if not
                             isinstance(v, np.ndarray) else v, from_pandas=True)) for k, v in data.items()})
    if isinstance(data, pa.Table):
        yield from data.to_batches(max_chunksize=CHUNK_ROWS)
        return
    for batch in data:
        for start in range(0, batch.num_rows, CHUNK_ROWS):
            yield batch.slice(start, CHUNK_ROWS)


def split_column(cfg: TrainConfig) -> str:
    """The column whose hash decides the held-out split of pointwise units (``train.val_by``)."""
    return imp.PROMPT_ID if cfg.val_by == "prompt" else imp.IMPRESSION_ID


def units_kind(loss: str) -> str:
    """Which rows a pointwise loss trains on: ``observed`` (losses.OBSERVED_ONLY) or ``all``; ``pairs`` for bt."""
    if loss in PAIRWISE:
        return "pairs"
    required_columns(loss)
    return "observed" if loss in OBSERVED_ONLY else "all"


def write_pointwise_cache(data: Data | Iterable[pa.RecordBatch], directory: Path | str, *, args: Sequence[str],
                          observed_only: bool, cfg: TrainConfig, dense: DenseSpec | None = None,
                          progress: bool = False) -> FeatureCache:
    """Featurise pointwise units chunk by chunk into a ``FeatureCache``: block ``x`` (with the ``dense`` block
    if any), the loss arguments ``args`` as columns (their names: label, observed, weight, imputed), held out by
    prompt (``validation_mask``)."""
    dense = dense or DenseSpec()
    args = list(dict.fromkeys(["label", "observed", *args]))
    counts = {"rows_read": 0, "observed": 0}

    def chunks() -> Iterator[Chunk]:
        for batch in record_batches(data):
            arrays = _loss_inputs(batch, args)
            counts["rows_read"] += batch.num_rows
            counts["observed"] += int(arrays["observed"].sum())
            kept = np.flatnonzero(arrays["observed"] == 1) if observed_only else np.arange(batch.num_rows)
            if kept.size == 0:                             # e.g. a file's last short batch, all unrated
                continue
            prompts, responses = _strings(batch, imp.PROMPT), _strings(batch, imp.RESPONSE)
            numeric = {c: _numeric(batch, c)[kept] for c in dense.needs}
            X = features([prompts[i] for i in kept], [responses[i] for i in kept], hash_features=cfg.hash_features,
                         ngram_max=cfg.ngram_max, dense=dense, columns=numeric)
            ids = _strings(batch, split_column(cfg))
            yield Chunk({POINT: X}, {k: v[kept] for k, v in arrays.items()},
                        validation_mask([ids[i] for i in kept], cfg.val_fraction))
            if progress:
                print(f"\r  featurised {counts['rows_read']:,} units", end="", file=sys.stderr, flush=True)

    cache = FeatureCache.write(chunks(), directory, n_features=cfg.hash_features + dense.dim,
                               extra={"units": "observed" if observed_only else "all", "counts": counts,
                                      "dense": dense.to_dict()})
    if progress:
        print(file=sys.stderr, flush=True)
    return cache


def check_pair_features(numeric: Sequence[str]) -> None:
    """A pair has texts only: of the numeric features, response_length is the one bt can use."""
    other = [c for c in numeric if c != RESPONSE_LENGTH]
    if other:
        raise ConfigError(f"loss 'bt': the pairwise dataset has no {other} columns; only response_length and the "
                          "embedding can be features of a pair's responses")


def write_pair_cache(pairs: Data | Iterable[pa.RecordBatch], directory: Path | str, *, cfg: TrainConfig,
                     dense: DenseSpec | None = None) -> FeatureCache:
    """Featurise preference pairs into a ``FeatureCache``: blocks ``chosen`` and ``rejected`` (each with its
    prompt, and the ``dense`` block: text-derived features only, a pair has no other unit columns), columns
    weight and margin, held out by prompt."""
    dense = dense or DenseSpec()
    check_pair_features(dense.needs)
    counts = {"rows_read": 0}

    def chunks() -> Iterator[Chunk]:
        for batch in record_batches(pairs):
            names = batch.schema.names
            missing = [c for c in PAIR_COLUMNS if c not in names]
            if missing:
                raise InputError(f"reward model [bt]: column '{missing[0]}' missing from the pairwise data")
            weight, margin = _numeric(batch, pr.WEIGHT), _numeric(batch, pr.MARGIN)
            if not (np.isfinite(weight).all() and (weight >= 0).all() and np.isfinite(margin).all()):
                raise InputError("reward model [bt]: pair weights must be finite and >= 0, margins finite")
            counts["rows_read"] += batch.num_rows
            prompts = _strings(batch, pr.PROMPT)
            yield Chunk({side: features(prompts, _strings(batch, column), hash_features=cfg.hash_features,
                                        ngram_max=cfg.ngram_max, dense=dense)
                         for side, column in ((CHOSEN, pr.CHOSEN), (REJECTED, pr.REJECTED))},
                        {"weight": weight.astype(np.float32), "margin": margin.astype(np.float32)},
                        validation_mask(_strings(batch, pr.PROMPT_ID), cfg.val_fraction))

    return FeatureCache.write(chunks(), directory, n_features=cfg.hash_features + dense.dim,
                              extra={"units": "pairs", "counts": counts, "dense": dense.to_dict()})


def dense_spec(data: Data | Iterable[pa.RecordBatch], cfg: TrainConfig, *, pairs: bool = False) -> DenseSpec:
    """The dense block ``cfg`` asks for (``train.numeric``, ``train.embedding_model``), its standardisation fitted
    on ``data`` in one streaming pass (for pairs: over the chosen and the rejected responses)."""
    if not cfg.numeric and not cfg.embedding_model:
        return DenseSpec()
    batches: Iterable[pa.RecordBatch] = record_batches(data)
    if pairs:
        check_pair_features(cfg.numeric)
        batches = (pa.record_batch({"response": b.column(side)}) for b in batches for side in (pr.CHOSEN, pr.REJECTED))
    return fit_dense_spec(batches, numeric=cfg.numeric, embedding_model=cfg.embedding_model)


# --- training --------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """Where ``_train`` saves its state after every epoch, and whether to continue from a saved one.

    ``fingerprint`` names what the state was trained on (loss, settings, input hashes): a checkpoint with
    another fingerprint is refused, never silently continued.
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, self.path)


def _check_splits(name: str, cache: FeatureCache) -> None:
    train, val = cache.rows(TRAIN), cache.rows(VAL)
    if train == 0 or val == 0:
        raise InputError(f"reward model [{name}]: {train} units to train on and {val} to validate on (of "
                         f"{cache.meta['counts']['rows_read']}); need some of each")


def _new_model(cfg: TrainConfig, device: torch.device, cache: FeatureCache) -> RewardModel:
    with torch.random.fork_rng(devices=[]):                # seeded init, without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = RewardModel(hash_features=cfg.hash_features, ngram_max=cfg.ngram_max, hidden=cfg.hidden,
                            dense=DenseSpec.from_dict(cache.meta.get("dense")), factors=cfg.factors)
    return model.to(device)


def _logits(model: RewardModel, block: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device,
            ) -> torch.Tensor:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(*block).float()


def _score_split(model: RewardModel, cache: FeatureCache, split: str, device: torch.device, batch_size: int,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Logits of every block and the columns of a whole split, on cpu, in file order (no gradients)."""
    source = StreamingBatches(cache, split, batch_size=batch_size, shuffle=False)
    logits: dict[str, list[torch.Tensor]] = {b: [] for b in cache.blocks}
    columns: dict[str, list[torch.Tensor]] = {c: [] for c in cache.columns}
    model.eval()
    with torch.no_grad():
        for batch in stream(source, 0, device):
            for b, block in batch.features.items():
                logits[b].append(_logits(model, block, device).cpu())
            for c, v in batch.columns.items():
                columns[c].append(v.cpu())
    return {b: torch.cat(v) for b, v in logits.items()}, {c: torch.cat(v) for c, v in columns.items()}


CALIBRATION_SCALE = (1e-3, 10.0)
"""Bounds on the calibration slope a: below, a constant predictor; above, a few separable units, or a risk with
no finite minimiser (the noise-corrected loss is unbounded below along a), could push a to infinity."""


def calibrate_logits(loss: str, logits: torch.Tensor, columns: Mapping[str, torch.Tensor],
                     scalars: Mapping[str, float] | None = None) -> dict[str, float]:
    """The affine map s' = a·s + b, a in ``CALIBRATION_SCALE``, that minimises ``loss``'s risk of the units in
    ``columns`` (Platt scaling; with ``naive`` on audited labels, the plain log-loss against r*).

    A monotone map leaves every ranking as it is but sets the level and spread of P(r=1|x); on a model that
    learned little (a small a) it pulls the scores to that level. Returns a, b and the risk before and after
    (the identity when the fit does not lower the risk).
    """
    s = logits.detach().to(torch.float64)
    cols = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in columns.items()}
    extra = dict(scalars or {})
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    lo, hi = (float(np.log(x)) for x in CALIBRATION_SCALE)

    def risk() -> torch.Tensor:
        return batch_loss(loss, log_a.clamp(lo, hi).exp() * s + b, {**cols, **extra})

    with torch.no_grad():
        before = float(risk())
    optimiser = torch.optim.LBFGS([log_a, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = risk()
        value.backward()
        return value

    optimiser.step(closure)
    with torch.no_grad():
        after = float(risk())
    a = min(max(float(log_a.detach().clamp(lo, hi).exp()), CALIBRATION_SCALE[0]), CALIBRATION_SCALE[1])
    if not (np.isfinite(after) and after <= before):       # keep the identity rather than a worse or broken map
        return {"scale": 1.0, "shift": 0.0, "val_loss_before": before, "val_loss_after": before}
    return {"scale": a, "shift": float(b.detach()), "val_loss_before": before, "val_loss_after": after}


def calibrate_on_gold(model: RewardModel, prompts: Sequence[str | None], responses: Sequence[str | None],
                      gold: np.ndarray, *, columns: Mapping[str, Sequence[float]] | None = None) -> dict[str, float]:
    """Fit ``model``'s output map s' = a·s + b on audited units (gold labels r* in [0, 1]) by log-loss, and set it.

    Why: self-selection on the true label (users rate good answers more) is invisible in x, so no propensity
    p(x) can undo it, and flip corrections then move the level the wrong way; a random audit sees r* directly.
    Two parameters on a few hundred audited units; the model's own weights stay as trained.
    """
    gold = np.asarray(gold, dtype=np.float64)
    if gold.size == 0 or not np.isfinite(gold).all() or ((gold < 0) | (gold > 1)).any():
        raise ValueError(f"gold labels: need at least one, each in [0, 1] (got {gold.size} labels)")
    model.scale.fill_(1.0)
    model.shift.fill_(0.0)
    p = predict_reward(model, prompts, responses, columns=columns).clip(1e-12, 1 - 1e-12)
    fitted = calibrate_logits("naive", torch.tensor(np.log(p / (1 - p))),
                              {"label": torch.tensor(gold), "observed": torch.ones(gold.size, dtype=torch.int8)})
    model.scale.fill_(fitted["scale"])
    model.shift.fill_(fitted["shift"])
    return {**fitted, "n_gold": int(gold.size), "mean_gold": float(gold.mean())}


def fit_reward_model(data: Data | FeatureCache, *, loss: str, cfg: TrainConfig, progress: bool = True,
                     flip_rates: tuple[float, float] | None = None, checkpoint: Checkpoint | None = None,
                     ) -> tuple[RewardModel, dict[str, Any]]:
    """Train a reward model with ``loss`` on pointwise units; early stopping on a held-out split of prompts.

    ``data`` is a ``FeatureCache`` from ``write_pointwise_cache`` (what the train stage streams), or a
    ``pyarrow.Table`` / mapping of column name → array with the columns of ``required_columns(loss)`` (names
    from ``schemas``; ``label`` null/NaN where unobserved), featurised into a temporary cache first.
    ``naive``, ``ips``, ``snips`` and ``causalrm_ips`` train on the observed units only (the others contribute 0
    to them; ``losses.OBSERVED_ONLY``), the others on every unit. The validation loss is the training loss on
    the held-out prompts. ``flip_rates`` (ρ01, ρ10) are required by the noise-aware losses
    (``losses.NOISE_AWARE``). Returns the model in its best validation state, on the training device, and its
    metrics (per-epoch history, counts, device, throughput).
    """
    kind = units_kind(loss)
    if loss in NOISE_AWARE and flip_rates is None:
        raise ConfigError(f"loss {loss!r} needs the fitted flip rates (models/noise.json from the fit stage)")
    if not isinstance(data, FeatureCache):
        with tempfile.TemporaryDirectory(prefix="obsfeed-features-") as tmp:
            started = time.perf_counter()
            cache = write_pointwise_cache(data, tmp, args=INPUTS[loss], observed_only=kind == "observed", cfg=cfg,
                                          dense=dense_spec(data, cfg))
            model, metrics = fit_reward_model(cache, loss=loss, cfg=cfg, progress=progress, flip_rates=flip_rates,
                                              checkpoint=checkpoint)
            return model, {**metrics, "featurize_s": time.perf_counter() - started - metrics["wall_s"]}
    cache = data
    if cache.meta.get("units") != kind or not set(INPUTS[loss]) <= set(cache.columns):
        raise ValueError(f"loss {loss!r} needs a cache of {kind} units with {INPUTS[loss]}; this one has "
                         f"{cache.meta.get('units')} units with {cache.columns}")
    _check_splits(loss, cache)
    scalars = dict(zip(("rho01", "rho10"), flip_rates, strict=True)) if loss in NOISE_AWARE else {}
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    model = _new_model(cfg, device, cache)
    if progress:
        print(f"  [{loss}] {cache.rows(TRAIN):,} train / {cache.rows(VAL):,} validation units "
              f"({'observed only' if kind == 'observed' else 'all'}), {cache.n_features:,} features, {device}",
              file=sys.stderr, flush=True)

    def step_loss(batch: DeviceBatch) -> torch.Tensor:
        return batch_loss(loss, _logits(model, batch.features[POINT], device), {**batch.columns, **scalars})

    def val_loss() -> float:
        logits, columns = _score_split(model, cache, VAL, device, 8 * cfg.batch_size)
        return float(batch_loss(loss, logits[POINT], {**columns, **scalars}))

    with _small_op_threads(device):
        history, best_epoch = _train(model, loss, step_loss, val_loss, cache, device, cfg=cfg, progress=progress,
                                     checkpoint=checkpoint)
    counts = cache.meta["counts"]
    return model, {
        "loss": loss, "flip_rates": list(flip_rates) if loss in NOISE_AWARE else None,
        **_history_metrics(history, best_epoch, cfg), "units": kind,
        "n_rows": counts["rows_read"], "n_train": cache.rows(TRAIN), "n_val": cache.rows(VAL),
        "device": str(device), "wall_s": time.perf_counter() - started,
    }


def _history_metrics(history: list[dict[str, float]], best_epoch: int, cfg: TrainConfig) -> dict[str, Any]:
    trained_s = sum(h["seconds"] for h in history)
    return {"best_epoch": best_epoch, "best_val_loss": history[best_epoch - 1]["val_loss"],
            "epochs_run": len(history), "stopped_early": len(history) < cfg.epochs, "history": history,
            "samples_per_s": sum(h["samples"] for h in history) / max(trained_s, 1e-9)}


def _train(model: RewardModel, name: str, step_loss: Callable[[DeviceBatch], torch.Tensor],
           val_loss_fn: Callable[[], float], cache: FeatureCache, device: torch.device, *, cfg: TrainConfig,
           progress: bool, checkpoint: Checkpoint | None = None) -> tuple[list[dict[str, float]], int]:
    """Epochs of minibatches streamed from ``cache`` until ``cfg.patience`` epochs pass without a better validation
    loss; leaves ``model`` in its best state and returns (per-epoch history, best epoch).

    ``step_loss(batch)`` is the training loss of a minibatch, ``val_loss_fn()`` the validation loss: the
    pointwise and the pairwise trainers share this loop. After each epoch the whole state (model, optimiser,
    best state, history) goes to ``checkpoint``; a resumed run continues after the last saved epoch and, since
    batch orders are seeded by epoch, ends where an uninterrupted run would. Progress: a live bar with
    samples/s on a terminal, and one line per epoch (losses, samples/s) in any case.
    """
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    source = StreamingBatches(cache, TRAIN, batch_size=cfg.batch_size, seed=cfg.seed)
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, done = float("inf"), 0, {}, False
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimizer"])
        history, best_loss, best_epoch = saved["history"], saved["best_loss"], saved["best_epoch"]
        best_state, done = saved["best_state"], saved["done"]
        if progress:
            print(f"  [{name}] resumed after epoch {len(history)}{' (finished)' if done else ''}", file=sys.stderr,
                  flush=True)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if done:
            break
        model.train()
        t0, running, seen = time.perf_counter(), 0.0, 0
        with tqdm(total=source.num_rows, desc=f"  [{name}] epoch {epoch}", unit=" samples", unit_scale=True,
                  leave=False, disable=not (progress and sys.stderr.isatty()), file=sys.stderr) as bar:
            for batch in stream(source, epoch, device):
                value = step_loss(batch)
                optimiser.zero_grad(set_to_none=True)
                value.backward()
                optimiser.step()
                running += float(value.detach()) * batch.size
                seen += batch.size
                bar.update(batch.size)
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            val_loss = val_loss_fn()
        history.append({"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                        "seconds": seconds, "samples": seen, "samples_per_s": seen / max(seconds, 1e-9)})
        improved = val_loss < best_loss
        if improved:
            best_loss, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress:
            print(f"  [{name}] epoch {epoch}/{cfg.epochs}: train {history[-1]['train_loss']:.4f}  "
                  f"val {val_loss:.4f}{' *' if improved else '  '}  {history[-1]['samples_per_s']:,.0f} samples/s",
                  file=sys.stderr, flush=True)
        done = epoch - best_epoch >= cfg.patience or epoch == cfg.epochs
        if checkpoint is not None:
            checkpoint.save({"model": model.state_dict(), "optimizer": optimiser.state_dict(), "history": history,
                             "best_loss": best_loss, "best_epoch": best_epoch, "best_state": best_state,
                             "done": done})
    if not best_state:                                     # every validation loss was NaN: say so, do not save it
        raise FloatingPointError(f"reward model [{name}]: validation loss was never finite: {history}")
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch


def fit_pairwise_reward_model(pairs: Data | FeatureCache, *, cfg: TrainConfig, progress: bool = True,
                              checkpoint: Checkpoint | None = None) -> tuple[RewardModel, dict[str, Any]]:
    """Train a reward model on preference pairs with the weighted Bradley–Terry loss
    −w·log σ(s(chosen) − s(rejected) − margin) (``losses.bradley_terry``); early stopping on a held-out split of
    prompts. The same model class as the pointwise losses, so it scores single responses the same way.
    ``pairs``: a ``FeatureCache`` from ``write_pair_cache``, or a table / mapping with ``PAIR_COLUMNS``."""
    if not isinstance(pairs, FeatureCache):
        with tempfile.TemporaryDirectory(prefix="obsfeed-features-") as tmp:
            cache = write_pair_cache(pairs, tmp, cfg=cfg, dense=dense_spec(pairs, cfg, pairs=True))
            return fit_pairwise_reward_model(cache, cfg=cfg, progress=progress, checkpoint=checkpoint)
    cache = pairs
    _check_splits("bt", cache)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    model = _new_model(cfg, device, cache)

    def pair_loss(batch: DeviceBatch) -> torch.Tensor:
        chosen, rejected = (_logits(model, batch.features[b], device) for b in (CHOSEN, REJECTED))
        return bradley_terry(chosen, rejected, batch.columns["weight"], batch.columns["margin"])

    def val_scores() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return _score_split(model, cache, VAL, device, 8 * cfg.batch_size)

    def val_loss() -> float:
        logits, columns = val_scores()
        return float(bradley_terry(logits[CHOSEN], logits[REJECTED], columns["weight"], columns["margin"]))

    with _small_op_threads(device):
        history, best_epoch = _train(model, "bt", pair_loss, val_loss, cache, device, cfg=cfg, progress=progress,
                                     checkpoint=checkpoint)
        logits, _ = val_scores()
    return model, {
        "loss": "bt", **_history_metrics(history, best_epoch, cfg), "units": "pairs",
        "n_rows": cache.meta["counts"]["rows_read"], "n_train": cache.rows(TRAIN), "n_val": cache.rows(VAL),
        "val_pair_accuracy": float((logits[CHOSEN] > logits[REJECTED]).float().mean()), "device": str(device),
        "wall_s": time.perf_counter() - started,
    }


def predict_reward(model: RewardModel, prompts: Sequence[str | None], responses: Sequence[str | None], *,
                   columns: Mapping[str, Sequence[float]] | None = None, batch_size: int = 8192) -> np.ndarray:
    """Predicted P(label = 1 | x) = σ(s(x)) for each (prompt, response), float64, on the model's device.
    ``columns``: the numeric columns of the model's dense block (``model.dense.needs``), if it has any."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    model.eval()
    device = next(model.parameters()).device
    out = [np.zeros(0)]
    with torch.no_grad():
        for start in range(0, len(responses), batch_size):
            part = slice(start, start + batch_size)
            X = model.features(prompts[part], responses[part],
                               {c: np.asarray(v, dtype=np.float64)[part] for c, v in (columns or {}).items()})
            out.append(torch.sigmoid(model(*_csr_batch(X, device, False)).float()).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def score(model: RewardModel | Path | str, prompts: Sequence[str | None], responses: Sequence[str | None], *,
          columns: Mapping[str, Sequence[float]] | None = None, batch_size: int = 8192) -> np.ndarray:
    """Rewards P(label = 1 | x) of new (prompt, response) pairs: the Python entry point for a trained model.

    ``model`` is a ``RewardModel`` or a folder written by the train stage (``RUN/reward_model``, or
    ``RUN/reward_model/baselines/<loss>``), loaded with ``weights_only=True``.

    Example (after ``make demo``)::

        rewards = score("runs/demo/reward_model", ["How do I boil an egg?"], ["Simmer it for nine minutes."])
    """
    if not isinstance(model, RewardModel):
        model = load_reward_model(model)
    return predict_reward(model, list(prompts), list(responses), columns=columns, batch_size=batch_size)


def save_reward_model(model: RewardModel, cfg_dict: Mapping[str, Any], directory: Path | str) -> None:
    """``model.pt`` (state_dict only: loadable with ``weights_only=True``) and ``config.json``.

    ``config.json`` = ``cfg_dict`` (e.g. the loss and the train config) plus ``"model"``: the module's own
    hyper-parameters, which are what ``load_reward_model`` rebuilds it from.
    """
    if "model" in cfg_dict:
        raise ValueError("cfg_dict must not have a 'model' key: it is the module's own configuration")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({**cfg_dict, "model": model.config()}, indent=2) + "\n")


def load_reward_model(directory: Path | str) -> RewardModel:
    """Rebuild from ``config.json`` and load ``model.pt`` with ``weights_only=True`` (no pickle code runs), on cpu."""
    directory = Path(directory)
    cfg = json.loads((directory / CONFIG_FILE).read_text()).get("model", {})
    if cfg.get("features") != FEATURES:                    # also a config.json from before "model" was recorded
        raise InputError(f"{directory}: model was trained on features {cfg.get('features')!r} (None: older obsfeed), "
                         f"this code makes {FEATURES!r}; re-run the train stage")
    model = RewardModel(hash_features=cfg["hash_features"], ngram_max=cfg["ngram_max"], hidden=cfg["hidden"],
                        dense=DenseSpec.from_dict(cfg.get("dense")), factors=cfg.get("factors", 0))
    state = torch.load(directory / MODEL_FILE, weights_only=True, map_location="cpu")
    for name, identity in (("scale", torch.ones(1)), ("shift", torch.zeros(1))):
        state.setdefault(name, identity)                    # saved before calibration existed: the identity map
    model.load_state_dict(state)
    return model.eval()
