"""Unit features for the nuisance models: hashed text n-grams, scaled numerics, one-hot categoricals.

The text part is a stateless hasher (:class:`estimators.text_hashing.TextHasher`, sklearn's ``HashingVectorizer``
computed in Arrow), so the featuriser is tiny to save and applies to any
number of new units in the score stage ("fit small, score big").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from estimators.text_hashing import TextHasher, as_arrow_strings, available_cores
from schemas.config import FitConfig

TEXT = "_text"
RESPONSE_LENGTH = "response_length"
"""Derived numeric feature: number of whitespace-separated words of the response (a verbosity confounder)."""


def input_columns(*, text: list[str], numeric: list[str], categorical: list[str]) -> list[str]:
    """The unit columns :func:`feature_frame` reads (``response_length`` is derived from ``response``)."""
    return sorted({*text, *(c for c in numeric if c != RESPONSE_LENGTH), *categorical, "response"})


WHITESPACE = r"[\t\n\v\f\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
"""The characters ``str.split()`` splits on (``str.isspace``), as an RE2 class: words are counted in Arrow."""


ASCII_SPACE = np.isin(np.arange(256), [9, 10, 11, 12, 13, 28, 29, 30, 31, 32])
"""The bytes ``str.split()`` splits on among ASCII characters (``\\t\\n\\v\\f\\r``, ``\\x1c``-``\\x1f``, space)."""


def word_counts(values) -> np.ndarray:
    """``len(text.split())`` of each text (0 for a missing one): for ASCII texts, from the word starts in their
    bytes, 65,536 texts at a time (a third of the regex's time, which was most of featurising a unit's numbers);
    else by an Arrow regex."""
    if isinstance(values, pa.ChunkedArray):
        return np.concatenate([word_counts(c) for c in values.chunks]) if values.num_chunks else np.zeros(0)
    texts = pc.fill_null(as_arrow_strings(values), "")
    if len(texts) == 0 or not pc.all(pc.string_is_ascii(texts)).as_py():
        return pc.count_substring_regex(texts, f"[^{WHITESPACE[1:-1]}]+").to_numpy(zero_copy_only=False) \
            .astype(float)
    return np.concatenate([_ascii_word_counts(texts.slice(i, 65_536)) for i in range(0, len(texts), 65_536)])


def _ascii_word_counts(texts: pa.Array) -> np.ndarray:
    offsets = np.frombuffer(texts.buffers()[1], np.int64)[texts.offset:texts.offset + len(texts) + 1]
    raw = texts.buffers()[2]
    data = np.frombuffer(raw, np.uint8)[offsets[0]:offsets[-1]] if raw is not None else np.zeros(0, np.uint8)
    space = data <= 32                                 # every ASCII space is; other control bytes are rare
    if not ASCII_SPACE[data[space]].all():
        space = ASCII_SPACE[data]
    starts = ~space                                    # a word starts at a non-space after a space ...
    starts[1:] &= space[:-1]
    first, nonempty = offsets[:-1] - offsets[0], np.diff(offsets) > 0
    starts[first[nonempty]] = ~space[first[nonempty]]  # ... or at its text's first byte
    at = np.flatnonzero(starts)
    return (np.searchsorted(at, offsets[1:] - offsets[0]) - np.searchsorted(at, first)).astype(float)


def feature_frame(columns: dict[str, np.ndarray | list | pa.Array], *, text: list[str], numeric: list[str],
                  categorical: list[str]) -> pd.DataFrame:
    """The model input frame from unit columns: concatenated text, derived length, numerics, categoricals.

    The text stays an Arrow column (``pd.ArrowDtype``), which the hasher reads without a Python string per row."""
    n = len(next(iter(columns.values())))
    out: dict[str, object] = {}
    parts = [pc.fill_null(as_arrow_strings(columns[c]), "") for c in text if c in columns]
    joined = pc.binary_join_element_wise(*parts, pa.scalar(" ", pa.large_string())) if len(parts) > 1 else \
        parts[0] if parts else pa.array([""] * n, pa.large_string())
    out[TEXT] = pd.Series(pd.arrays.ArrowExtensionArray(joined))
    for c in numeric:
        if c == RESPONSE_LENGTH and c not in columns:
            out[c] = word_counts(columns["response"]) if "response" in columns else np.zeros(n)
        else:
            if c not in columns:
                raise KeyError(f"feature column '{c}' is not in the units table")
            values = columns[c]
            values = values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array | pa.ChunkedArray) \
                else values
            out[c] = pd.to_numeric(pd.Series(values), errors="coerce").astype(float).to_numpy()
    for c in categorical:
        if c not in columns:
            raise KeyError(f"feature column '{c}' is not in the units table")
        values = columns[c]
        values = values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array | pa.ChunkedArray) else values
        out[c] = pd.Series(values, dtype="object").fillna("<null>").astype(str).to_numpy()
    return pd.DataFrame(out)


def design(table: pa.Table, fit: FitConfig) -> pd.DataFrame:
    """The featuriser's input frame from a units table, converting only the columns it reads (not every unit
    column): what fit, score and the placebo check all feed the featuriser."""
    names = input_columns(text=fit.text, numeric=fit.numeric, categorical=fit.categorical)
    return feature_frame({c: table[c] for c in names if c in table.column_names},
                         text=fit.text, numeric=fit.numeric, categorical=fit.categorical)


def treatment_values(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric confounder as a treatment: ``response_length`` on the log scale (verbosity effects are
    roughly linear in log length), any other numeric column as it is; missing values → the median."""
    values = frame[name].to_numpy(dtype=float)
    if name == RESPONSE_LENGTH:
        values = np.log(np.maximum(values, 1.0))
    if np.isnan(values).any():
        values = np.where(np.isnan(values), np.nanmedian(values) if np.isfinite(values).any() else 0.0, values)
    return values


def make_featurizer(*, numeric: list[str], categorical: list[str], hash_features: int = 2**14,
                    ngram_max: int = 2) -> ColumnTransformer:
    """An unfitted sklearn transformer from :func:`feature_frame` output to a sparse design matrix."""
    parts = [("text", TextHasher(n_features=hash_features, ngram_max=ngram_max), TEXT)]
    if numeric:
        parts.append(("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric))
    if categorical:
        parts.append(("categorical", OneHotEncoder(handle_unknown="ignore"), categorical))
    return SparseColumnTransformer(parts, sparse_threshold=1.0)


class SparseColumnTransformer(ColumnTransformer):
    """A ``ColumnTransformer`` that stacks its blocks as CSR (:func:`stack_columns`): with the numeric block
    dense, sklearn's ``sparse.hstack`` goes through COO (3.5 s of 8 at 200k units). The same matrix either way.
    (float64 stays: in float32 the logistic models' line searches took up to 1.5x the iterations, which ate the
    cheaper products.)"""

    def _hstack(self, Xs, *, n_samples):
        if self.sparse_output_ and Xs:
            return stack_columns([sp.csr_matrix(X) for X in Xs])
        return super()._hstack(Xs, n_samples=n_samples)


STACK_ROWS = 16_384
"""Rows per task of :func:`stack_columns`: its index arrays stay small (a version that built them for all rows at
once was slower than scipy's: the first touch of fresh memory is expensive here, docs/performance.md)."""


def stack_columns(blocks: list[sp.csr_matrix], n_threads: int | None = None) -> sp.csr_matrix:
    """CSR blocks of columns side by side: the arrays of ``sp.hstack(blocks).tocsr()``, written straight into
    the result by ``n_threads`` threads (None: one per available core), ``STACK_ROWS`` rows at a time (numpy
    releases the GIL while it copies). scipy concatenates the blocks' entries first and then interleaves them
    on one thread: 0.9 s of featurising 200k units, 0.7 s more than this. Each entry goes to its row's start in
    the result, plus its row's entries in the blocks before it, plus its place in its own row."""
    n = blocks[0].shape[0]
    if any(b.shape[0] != n for b in blocks):
        raise ValueError(f"blocks differ in their number of rows: {[b.shape[0] for b in blocks]}")
    widths = [b.shape[1] for b in blocks]
    offsets = np.cumsum([0, *widths[:-1]])
    counts = [np.diff(b.indptr) for b in blocks]
    nnz = int(sum(b.nnz for b in blocks))
    index = np.int32 if max(nnz, sum(widths)) < 2**31 else np.int64
    indptr = np.zeros(n + 1, index)
    np.cumsum(np.sum(counts, axis=0), out=indptr[1:])
    data = np.empty(nnz, np.result_type(*(b.dtype for b in blocks)))
    indices = np.empty(nnz, index)

    def rows(first: int) -> None:
        last = min(n, first + STACK_ROWS)
        start = indptr[first:last].astype(np.int64)       # where each row's entries of the next block go
        for b, offset, count in zip(blocks, offsets, counts, strict=True):
            lo, hi = int(b.indptr[first]), int(b.indptr[last])
            dest = np.repeat(start - b.indptr[first:last], count[first:last])
            dest += np.arange(lo, hi)
            data[dest] = b.data[lo:hi]
            indices[dest] = b.indices[lo:hi] + offset
            start += count[first:last]

    starts = range(0, n, STACK_ROWS)
    threads = min(len(starts), n_threads or available_cores())
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(rows, starts))
    else:
        for first in starts:
            rows(first)
    return sp.csr_matrix((data, indices, indptr), shape=(n, sum(widths)))


def structured_columns(featurizer: ColumnTransformer) -> list[int]:
    """Indices of a fitted featuriser's numeric and one-hot columns: what a boosted model sees beside the text
    logit (:class:`estimators.stacking.LinearThenBoosted`)."""
    blocks = featurizer.output_indices_
    return [i for name in ("numeric", "categorical") if name in blocks
            for i in range(blocks[name].start, blocks[name].stop)]
