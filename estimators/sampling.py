"""The fit sample: "fit small, score big" fits the nuisance models on at most ``fit.max_rows`` units.

The sample is chosen by a hash of each unit's id, not by a random generator, so the same units give the same
sample on any machine and in any order; the fit stage and the placebo check draw the same one.
"""

from __future__ import annotations

import numpy as np

from schemas.hashing import sample_rank


def stratified_sample(ids: np.ndarray, observed: np.ndarray, max_rows: int) -> np.ndarray:
    """Indices of at most ``max_rows`` units, the same share of each observed stratum, chosen by id hash."""
    if ids.size <= max_rows:
        return np.arange(ids.size)
    rank = sample_rank(ids)
    keep = []
    for o in (0, 1):
        idx = np.flatnonzero(observed == o)
        k = int(round(max_rows * idx.size / ids.size))
        keep.append(idx[np.argsort(rank[idx], kind="stable")[:k]])
    return np.sort(np.concatenate(keep))
