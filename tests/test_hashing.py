"""Stable hashes: the vectorised hash equals the byte-by-byte definition, whatever the input's shape."""

import numpy as np
import pyarrow as pa
import pytest

from schemas.hashing import bucket_of, fold_of, sample_rank, stable_hash64

MASK = 2**64 - 1


def reference(value: str | None, salt: str = "") -> int:
    """FNV-1a 64 over the UTF-8 bytes of salt + value, then SplitMix64's finaliser: one byte at a time."""
    h = 0xCBF29CE484222325
    for byte in (salt + (value or "")).encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
    return h ^ (h >> 31)


VALUES = ["", "a", "b", "héllo wörld", "imp-000000123", None, "x" * 70, "日本語のID"]


@pytest.mark.parametrize("salt", ["", "fold:"])
def test_matches_the_byte_by_byte_definition(salt):
    assert [int(h) for h in stable_hash64(VALUES, salt=salt)] == [reference(v, salt) for v in VALUES]


def test_same_hash_from_lists_arrays_slices_and_chunks():
    arr = pa.array(["pad", *VALUES, "pad"])
    expected = [reference(v) for v in VALUES]
    assert [int(h) for h in stable_hash64(arr.slice(1, len(VALUES)))] == expected
    chunked = pa.chunked_array([pa.array(VALUES[:3]), pa.array(VALUES[3:])])
    assert [int(h) for h in stable_hash64(chunked)] == expected
    assert stable_hash64([]).shape == (0,)
    assert [int(h) for h in stable_hash64(pa.array(["", ""]))] == [reference("")] * 2


def test_buckets_and_folds_are_balanced_and_salted():
    ids = pa.array([f"imp-{i:07d}" for i in range(40_000)])
    buckets, folds = bucket_of(ids, 16), fold_of(ids, 5)
    assert buckets.min() >= 0 and buckets.max() < 16
    counts = np.bincount(buckets, minlength=16)
    assert counts.min() > 0.9 * counts.mean()                     # ~2,500 per bucket; 10% is ~5 sd
    assert np.bincount(folds, minlength=5).min() > 0.95 * 8_000
    assert abs(np.corrcoef(buckets % 5, folds)[0, 1]) < 0.05       # the salt makes folds independent
    assert sample_rank(ids[:3]).dtype == np.uint64


def test_stratified_sample_keeps_each_strata_share_and_reads_arrow_ids():
    """The fit sample: sorted indices, each observed stratum's share kept, the same from Python strings and from
    a chunked Arrow column (what the fit stage passes), and ids and flags of different lengths refused."""
    from estimators.sampling import sample_units, stratified_sample

    strings = [f"imp-{i:06d}" for i in range(10_000)]
    observed = (np.arange(10_000) % 4 == 0).astype(int)
    idx = stratified_sample(np.array(strings, dtype=object), observed, 2_000)
    assert np.all(np.diff(idx) > 0) and idx.size == 2_000 and observed[idx].sum() == 500
    chunked = pa.chunked_array([pa.array(strings[:3_000]), pa.array(strings[3_000:])])
    np.testing.assert_array_equal(stratified_sample(chunked, observed, 2_000), idx)
    np.testing.assert_array_equal(stratified_sample(chunked, observed, 10_000), np.arange(10_000))
    with pytest.raises(ValueError, match="length"):
        stratified_sample(chunked, observed[:-1], 2_000)
    units = pa.table({"impression_id": chunked, "observed": observed, "row": np.arange(10_000)})
    assert sample_units(units, 2_000).equals(units.take(idx))                # the same rows, in the same order
