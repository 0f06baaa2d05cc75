"""Hashed word n-grams of text in Arrow: scikit-learn's ``HashingVectorizer`` without its per-document Python loop.

The hashed text block is most of the cost of featurising units (it was about 28 s of a 150 s fit at 200k units,
and the score stage hashes every unit). :class:`TextHasher` gives the matrix that
``HashingVectorizer(n_features, ngram_range=(1, ngram_max), alternate_sign=False, norm="l2")`` gives (same
tokens, same MurmurHash3 columns, same counts and norms; tested against it), computed with Arrow kernels and
numpy: lowercase, split on runs of non-word characters, keep tokens of two or more characters (sklearn's
``(?u)\\b\\w\\w+\\b``), join neighbours into n-grams, hash each distinct n-gram once, count per row.

Where it can differ from sklearn: Arrow lowercases character by character (utf8proc), Python's ``str.lower``
knows two contexts (a Greek final sigma, the Turkish dotted capital I); and "word character" is Arrow's
``[\\p{L}\\p{N}_]`` against Python's ``str.isalnum() or "_"``, which agree except for characters that one
Unicode version classifies and the other does not. Fit and score both use this class, so a unit gets the same
columns in both stages either way.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.preprocessing import normalize

NON_WORD = r"[^\p{L}\p{N}_]+"
CHUNK_ROWS = 8_192
"""Texts hashed per task: bounds the n-gram arrays' memory, and gives the threads work to share (8,192 hashed 200k
units in 1.9-2.6 s against 2.4-3.0 s for 16,384 on 2 cores: the smaller arrays stay in cache)."""

_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def murmurhash3_32(strings: pa.Array, seed: int = 0) -> np.ndarray:
    """Signed 32-bit MurmurHash3 (x86_32) of each string's UTF-8 bytes: ``sklearn.utils.murmurhash3_32`` of
    every element at once. Nulls hash as the empty string."""
    strings = strings.cast(pa.large_string())
    strings = pc.fill_null(strings, "") if strings.null_count else strings
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset:strings.offset + len(strings) + 1]
    raw = strings.buffers()[2]
    data = np.frombuffer(raw, np.uint8) if raw is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(8, np.uint8)])
    # The little-endian 4-byte word at every byte offset, as one unaligned view (a stride of one byte): each
    # round is one gather (six times faster than four aligned views, one per offset mod 4).
    words = np.ndarray(shape=(len(data) - 3,), dtype="<u4", buffer=data, strides=(1,))
    start, length = offsets[:-1], np.diff(offsets)
    blocks = length // 4
    # Longest first, so that each round's strings are a prefix. A stable sort of small integers is numpy's radix
    # sort (4x its sort of int64 here): the same order.
    order = np.argsort(-blocks.astype(np.int16) if len(blocks) and blocks.max() < 2**15 else -blocks, kind="stable")
    start_o, blocks_o = start[order], blocks[order]
    h = np.full(len(strings), np.uint32(seed), np.uint32)

    with np.errstate(over="ignore"):
        for b in range(int(blocks_o[0]) if len(blocks_o) else 0):
            n = int(np.searchsorted(-blocks_o, -b, side="left"))   # the strings with more than b blocks
            k = _rotl(words[start_o[:n] + 4 * b] * _C1, 15) * _C2
            h[:n] = _rotl(h[:n] ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64)
        h_out = np.empty_like(h)
        h_out[order] = h
        h = h_out
        rem = (length % 4).astype(np.uint32)
        has = rem > 0
        tail = words[start[has] + 4 * blocks[has]] & ((np.uint32(1) << (8 * rem[has])) - np.uint32(1))
        h[has] ^= _rotl(tail * _C1, 15) * _C2
        h ^= length.astype(np.uint32)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h.view(np.int32)


ASCII_WORD = np.full(256, ord(" "), np.uint8)
"""An ASCII byte as :func:`tokens` reads it: a word character lowercased (``[a-z0-9_]``), anything else a space."""
for _c in b"abcdefghijklmnopqrstuvwxyz0123456789_":
    ASCII_WORD[_c] = _c
    ASCII_WORD[bytes([_c]).upper()[0]] = _c


def ascii_words_spaced(texts: pa.Array) -> pa.Array:
    """ASCII texts lowercased with every non-word byte a space: what splitting on whitespace then splits as the
    regex :data:`NON_WORD` splits the lowercased texts (in ASCII, ``\\p{L}`` is ``[A-Za-z]`` and ``\\p{N}``
    ``[0-9]``), without the regex (a quarter of its time)."""
    texts = texts.cast(pa.large_string())
    offsets = np.frombuffer(texts.buffers()[1], np.int64)[texts.offset:texts.offset + len(texts) + 1]
    raw = texts.buffers()[2]
    data = np.frombuffer(raw, np.uint8)[offsets[0]:offsets[-1]] if raw is not None else np.zeros(0, np.uint8)
    return pa.LargeStringArray.from_buffers(len(texts), pa.py_buffer(offsets - offsets[0]),
                                            pa.py_buffer(ASCII_WORD[data]))


def tokens(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The lowercased words of two or more word characters of all texts, in order, and the row of each
    (sklearn's default analyser: ``(?u)\\b\\w\\w+\\b`` after ``str.lower``). All-ASCII texts are split
    without a regex (:func:`ascii_words_spaced`); the empty strings that splitting leaves are under two
    characters, so they go with the one-character words."""
    texts = pc.fill_null(texts, "")
    words = (pc.ascii_split_whitespace(ascii_words_spaced(texts)) if pc.all(pc.string_is_ascii(texts)).as_py()
             else pc.split_pattern_regex(pc.utf8_lower(texts), NON_WORD))
    flat, parent = pc.list_flatten(words), pc.list_parent_indices(words)
    keep = pc.greater_equal(pc.utf8_length(flat), 2)
    return flat.filter(keep).cast(pa.large_string()), np.asarray(parent.filter(keep))


def hashed_columns(texts: pa.Array, *, n_features: int, ngram_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every word n-gram (n = 1..ngram_max, words joined by one space) of each text, sorted by
    row; the column is ``|murmurhash3_32(n-gram)| % n_features``, sklearn's ``FeatureHasher`` indexing.

    Each distinct n-gram is built and hashed once: words are dictionary-encoded, and an n-gram is the pair
    (its first n-1 words' n-gram, its last word), numbered by ``np.unique``."""
    words, rows = tokens(texts)
    encoded = pc.dictionary_encode(words)
    vocab = encoded.dictionary
    word_id = np.asarray(encoded.indices).astype(np.int64)
    columns = np.full((len(words), ngram_max), -1, np.int64)      # [start position, n - 1]
    columns[:, 0] = (np.abs(murmurhash3_32(vocab).astype(np.int64)) % n_features)[word_id]
    gram_id, gram_text = word_id, vocab
    space = pa.scalar(" ", pa.large_string())
    for n in range(2, ngram_max + 1):
        m = len(words) - n + 1
        if m <= 0:
            break
        ok = (rows[n - 1:] == rows[:m]) & (gram_id[:m] >= 0)       # the n words lie in one text
        distinct, inverse = np.unique(gram_id[:m][ok] * len(vocab) + word_id[n - 1:][ok], return_inverse=True)
        text = pc.binary_join_element_wise(gram_text.take(pa.array(distinct // len(vocab))),
                                           vocab.take(pa.array(distinct % len(vocab))), space)
        columns[:m, n - 1][ok] = (np.abs(murmurhash3_32(text).astype(np.int64)) % n_features)[inverse]
        gram_id = np.full(len(words), -1, np.int64)
        gram_id[:m][ok] = inverse
        gram_text = text
    valid = columns >= 0
    return np.repeat(rows, valid.sum(axis=1)), columns[valid]


def hashed_counts(texts: pa.Array, *, n_features: int, ngram_max: int, dtype: type = np.float64) -> sp.csr_matrix:
    """Counts of each text's hashed n-grams (:func:`hashed_columns`): CSR, duplicates summed, indices sorted, as
    ``FeatureHasher`` gives them."""
    rows, cols = hashed_columns(texts, n_features=n_features, ngram_max=ngram_max)
    indptr = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(texts)), out=indptr[1:])
    X = sp.csr_matrix((np.ones(len(cols), dtype), cols.astype(np.int32), indptr), shape=(len(texts), n_features))
    X.sum_duplicates()
    return X


def stack_rows(parts: list[sp.csr_matrix], n_features: int) -> sp.csr_matrix:
    """Canonical CSR blocks of rows, one under the other (``sp.vstack`` without its general-case copies)."""
    if len(parts) == 1:
        return parts[0]
    ends = np.cumsum([p.nnz for p in parts])[:-1]
    indptr = np.concatenate([np.zeros(1, np.int64)] + [p.indptr[1:].astype(np.int64) + start
                                                       for p, start in zip(parts, np.r_[0, ends], strict=True)])
    X = sp.csr_matrix((np.concatenate([p.data for p in parts]), np.concatenate([p.indices for p in parts]), indptr),
                      shape=(int(sum(p.shape[0] for p in parts)), n_features))
    X.has_canonical_format = True
    return X


def as_arrow_strings(values) -> pa.Array:
    """A text column as an Arrow large_string array, nulls kept: Arrow arrays and Arrow-backed pandas columns
    without a Python string per row; other values as Python's ``str`` gives them."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif isinstance(getattr(values, "dtype", None), pd.ArrowDtype):
        values = pa.array(values.array)
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    elif not isinstance(values, pa.Array):
        try:
            values = pa.array(np.asarray(values, dtype=object), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            values = pa.array(pd.Series(values, dtype="object").map(lambda v: v if v is None else str(v)),
                              type=pa.large_string(), from_pandas=True)
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), pa.large_string())
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pa.array(pd.Series(values.to_pylist(), dtype="object").map(lambda v: v if v is None else str(v)),
                          type=pa.large_string())
    return values.cast(pa.large_string())


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TextHasher(TransformerMixin, BaseEstimator):
    """Stateless transformer from texts to L2-normalised hashed n-gram counts (see the module docstring).

    The same matrix as ``HashingVectorizer(n_features=n_features, ngram_range=(1, ngram_max),
    alternate_sign=False, norm="l2", dtype=dtype)``; ``fit`` learns nothing, so a saved featuriser applies to any
    new units.
    Texts are hashed in chunks of ``CHUNK_ROWS`` on ``n_threads`` threads (Arrow and numpy release the GIL;
    None: one per available core); the result does not depend on it.
    """

    def __init__(self, *, n_features: int = 2**14, ngram_max: int = 2, dtype: type = np.float64,
                 n_threads: int | None = None):
        self.n_features = n_features
        self.ngram_max = ngram_max
        self.dtype = dtype
        self.n_threads = n_threads

    def fit(self, X, y=None):
        if not (isinstance(self.n_features, int) and self.n_features >= 1):
            raise ValueError(f"n_features must be a positive int, got {self.n_features!r}")
        if not (isinstance(self.ngram_max, int) and self.ngram_max >= 1):
            raise ValueError(f"ngram_max must be a positive int, got {self.ngram_max!r}")
        self.n_features_out_ = self.n_features
        return self

    def transform(self, X) -> sp.csr_matrix:
        if isinstance(X, str):
            raise ValueError("TextHasher takes a column of texts, not one string")
        texts = as_arrow_strings(X)
        chunks = [texts.slice(i, CHUNK_ROWS) for i in range(0, len(texts), CHUNK_ROWS)] or [texts]
        count = lambda c: hashed_counts(c, n_features=self.n_features, ngram_max=self.ngram_max,  # noqa: E731
                                        dtype=self.dtype)
        threads = min(len(chunks), self.n_threads or available_cores())
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(count, chunks))
        else:
            parts = [count(c) for c in chunks]
        X = stack_rows(parts, self.n_features)
        return normalize(X, norm="l2", copy=False) if X.shape[0] else X

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return np.asarray([f"hash{i}" for i in range(self.n_features)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = False
        return tags
