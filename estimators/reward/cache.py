"""The train stage's rows, featurised once: pointwise units or preference pairs → a ``data.FeatureCache``.

Any table-like input (a ``pyarrow.Table``, a column mapping, a stream of record batches) is read in chunks of
``CHUNK_ROWS``; each chunk's loss inputs are checked (a bad value is named here, not found as a NaN loss later),
its texts encoded by the backbone's encoder (hashed n-grams, or tokens of the (prompt, response) pair), and its
rows split into training and validation by a hash of the prompt. Memory holds a chunk, never the dataset.
Truncated rows are counted in the cache's ``counts`` (tokens only), never dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from estimators.features import RESPONSE_LENGTH
from estimators.losses import INPUTS, LOSSES, OBSERVED_ONLY, PAIRWISE
from estimators.progress import progress_bar
from estimators.reward.data import Block, Chunk, FeatureCache
from estimators.reward.features import DenseSpec, fit_dense_spec
from schemas import impressions as imp
from schemas import pairwise, pointwise
from schemas import units as un
from schemas.config import TrainConfig
from schemas.errors import ConfigError, InputError

LOSS_COLUMNS = {
    "label": un.LABEL,
    "observed": un.OBSERVED,
    "weight": pointwise.WEIGHT_CLIPPED,
    "imputed": pointwise.IMPUTED,
}
"""Loss argument → pointwise column: every weighted loss uses the clipped IPS weight (snips self-normalises)."""
TEXT_COLUMNS = (imp.PROMPT_ID, imp.PROMPT, imp.RESPONSE)
PAIR_COLUMNS = (
    pairwise.PROMPT_ID,
    pairwise.PROMPT,
    pairwise.CHOSEN,
    pairwise.REJECTED,
    pairwise.WEIGHT,
    pairwise.MARGIN,
)
CHUNK_ROWS = 16_384
"""Rows encoded at a time while a cache is written: bounds memory, whatever the dataset's size."""
POINT, CHOSEN, REJECTED = "x", "chosen", "rejected"
TRUNCATION = ("prompt_truncated", "response_truncated")

Data = pa.Table | pa.RecordBatch | Mapping[str, Any]


class Encoder(Protocol):
    """Turns texts into one cache block: ``hashed.HashedEncoder`` or ``backbones.PairTokenizer``."""

    n_features: int
    pad_id: int
    needs: list[str]

    def encode(self, prompts: Sequence[str | None], responses: Sequence[str | None],
               columns: Mapping[str, Any] | None = None) -> Block: ...

    def meta(self) -> dict[str, Any]: ...


def required_columns(loss: str) -> list[str]:
    """The pointwise columns the trainer reads for ``loss`` (so a reader can ask for these only)."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    return [*TEXT_COLUMNS, *(LOSS_COLUMNS[k] for k in INPUTS[loss])]


def split_column(cfg: TrainConfig) -> str:
    """The column whose hash decides the held-out split of pointwise units (``train.val_by``)."""
    return imp.PROMPT_ID if cfg.val_by == "prompt" else imp.IMPRESSION_ID


def units_kind(loss: str) -> str:
    """Which rows a pointwise loss trains on: ``observed`` (losses.OBSERVED_ONLY) or ``all``; ``pairs`` for bt."""
    if loss in PAIRWISE:
        return "pairs"
    required_columns(loss)
    return "observed" if loss in OBSERVED_ONLY else "all"


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


def numeric(data: Data, name: str) -> np.ndarray:
    """float64 with nulls as NaN."""
    col = _column(data, name)
    if isinstance(col, pa.ChunkedArray | pa.Array):
        col = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(col, dtype=np.float64)


def strings(data: Data, name: str) -> list[str | None]:
    col = _column(data, name)
    return col.to_pylist() if isinstance(col, pa.ChunkedArray | pa.Array) else list(col)


def loss_inputs(data: Data, args: Sequence[str]) -> dict[str, np.ndarray]:
    """The loss arguments' columns as float32 arrays, checked: a bad value is named here, not found as a NaN loss
    later."""
    arrays = {arg: numeric(data, LOSS_COLUMNS[arg]) for arg in args}
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


def _count_truncation(counts: dict[str, int], block: Block) -> None:
    for name in TRUNCATION:
        mask = getattr(block, name, None)
        if mask is not None:
            counts[name] = counts.get(name, 0) + int(mask.sum())


def write_pointwise_cache(data: Data | Iterable[pa.RecordBatch], directory: Path | str, *, args: Sequence[str],
                          observed_only: bool, cfg: TrainConfig, encoder: Encoder, progress: bool = False,
                          ) -> FeatureCache:
    """Encode pointwise units chunk by chunk into a ``FeatureCache``: block ``x``, the loss arguments ``args`` as
    columns (their names: label, observed, weight, imputed), held out by prompt (``validation_mask``)."""
    args = list(dict.fromkeys(["label", "observed", *args]))
    counts = {"rows_read": 0, "observed": 0}
    bar = progress_bar(None, desc="  encoded", unit=" units", enabled=progress)

    def chunks() -> Iterator[Chunk]:
        for batch in record_batches(data):
            arrays = loss_inputs(batch, args)
            counts["rows_read"] += batch.num_rows
            counts["observed"] += int(arrays["observed"].sum())
            kept = np.flatnonzero(arrays["observed"] == 1) if observed_only else np.arange(batch.num_rows)
            if kept.size == 0:                             # e.g. a file's last short batch, all unrated
                continue
            prompts, responses = strings(batch, imp.PROMPT), strings(batch, imp.RESPONSE)
            block = encoder.encode([prompts[i] for i in kept], [responses[i] for i in kept],
                                   {c: numeric(batch, c)[kept] for c in encoder.needs})
            _count_truncation(counts, block)
            ids = strings(batch, split_column(cfg))
            yield Chunk({POINT: block}, {k: v[kept] for k, v in arrays.items()},
                        validation_mask([ids[i] for i in kept], cfg.val_fraction))
            bar.update(counts["rows_read"] - bar.n)

    with bar:
        return FeatureCache.write(chunks(), directory, n_features=encoder.n_features,
                                  extra={"units": "observed" if observed_only else "all", "counts": counts,
                                         **encoder.meta()})


def check_pair_features(numeric_columns: Sequence[str]) -> None:
    """A pair has texts only: of the numeric features, response_length is the one bt can use."""
    other = [c for c in numeric_columns if c != RESPONSE_LENGTH]
    if other:
        raise ConfigError(f"loss 'bt': the pairwise dataset has no {other} columns; only response_length and the "
                          "embedding can be features of a pair's responses")


def write_pair_cache(pairs: Data | Iterable[pa.RecordBatch], directory: Path | str, *, cfg: TrainConfig,
                     encoder: Encoder) -> FeatureCache:
    """Encode preference pairs into a ``FeatureCache``: blocks ``chosen`` and ``rejected`` (each with its prompt;
    text-derived features only, a pair has no other unit columns), columns weight and margin, held out by
    prompt."""
    counts = {"rows_read": 0}

    def chunks() -> Iterator[Chunk]:
        for batch in record_batches(pairs):
            names = batch.schema.names
            missing = [c for c in PAIR_COLUMNS if c not in names]
            if missing:
                raise InputError(f"reward model [bt]: column '{missing[0]}' missing from the pairwise data")
            weight, margin = numeric(batch, pairwise.WEIGHT), numeric(batch, pairwise.MARGIN)
            if not (np.isfinite(weight).all() and (weight >= 0).all() and np.isfinite(margin).all()):
                raise InputError("reward model [bt]: pair weights must be finite and >= 0, margins finite")
            counts["rows_read"] += batch.num_rows
            prompts = strings(batch, pairwise.PROMPT)
            blocks = {}
            for side, column in ((CHOSEN, pairwise.CHOSEN), (REJECTED, pairwise.REJECTED)):
                blocks[side] = encoder.encode(prompts, strings(batch, column))
                _count_truncation(counts, blocks[side])
            yield Chunk(blocks, {"weight": weight.astype(np.float32), "margin": margin.astype(np.float32)},
                        validation_mask(strings(batch, pairwise.PROMPT_ID), cfg.val_fraction))

    return FeatureCache.write(chunks(), directory, n_features=encoder.n_features,
                              extra={"units": "pairs", "counts": counts, **encoder.meta()})


def dense_spec(data: Data | Iterable[pa.RecordBatch], cfg: TrainConfig, *, pairs: bool = False) -> DenseSpec:
    """The dense block ``cfg`` asks for (``train.numeric``, ``train.embedding_model``), its standardisation fitted
    on ``data`` in one streaming pass (for pairs: over the chosen and the rejected responses)."""
    if not cfg.numeric and not cfg.embedding_model:
        return DenseSpec()
    batches: Iterable[pa.RecordBatch] = record_batches(data)
    if pairs:
        check_pair_features(cfg.numeric)
        batches = (
            pa.record_batch({"response": b.column(side)})
            for b in batches
            for side in (pairwise.CHOSEN, pairwise.REJECTED)
        )
    return fit_dense_spec(batches, numeric=cfg.numeric, embedding_model=cfg.embedding_model)


def truncation_counts(cache: FeatureCache) -> dict[str, int]:
    """Rows (pairs: responses) whose prompt or response lost tokens to ``train.max_length``: 0 for hashed."""
    counts = cache.meta.get("counts", {})
    return {name: int(counts.get(name, 0)) for name in TRUNCATION}
