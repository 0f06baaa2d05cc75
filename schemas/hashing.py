"""Stable hashes of ids: the same on every worker, machine and Python process (unlike built-in ``hash()``).

Buckets for the shuffle and cross-fitting folds are part of the contract (fold = hash(impression_id) % K),
so they must not depend on PYTHONHASHSEED or on a library version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def stable_hash64(values: Iterable[str | None]) -> np.ndarray:
    """64-bit BLAKE2b of each UTF-8 string (None hashes like the empty string), as uint64.

    >>> int(stable_hash64(["a"])[0]) == int(stable_hash64(["a"])[0])
    True
    """
    values = list(values)
    uniq = {v: int.from_bytes(hashlib.blake2b((v or "").encode(), digest_size=8).digest(), "little")
            for v in set(values)}
    return np.fromiter((uniq[v] for v in values), dtype=np.uint64, count=len(values))


def bucket_of(values: Iterable[str | None], buckets: int) -> np.ndarray:
    """Bucket in [0, buckets) of each id."""
    return (stable_hash64(values) % np.uint64(buckets)).astype(np.int64)


def fold_of(ids: Iterable[str | None], folds: int) -> np.ndarray:
    """Cross-fitting fold of each unit: a salted stable hash, so folds are independent of shuffle buckets."""
    return (stable_hash64(f"fold:{i}" for i in ids) % np.uint64(folds)).astype(np.int16)


def sample_rank(ids: Iterable[str | None]) -> np.ndarray:
    """A deterministic pseudo-random rank per id, for reproducible sampling without a shared RNG state."""
    return stable_hash64(f"sample:{i}" for i in ids)
