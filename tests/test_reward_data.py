"""The trainer's data path: feature cache round trip, streamed shuffled batches, read-ahead thread."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from estimators.reward.data import (
    TRAIN,
    VAL,
    Chunk,
    FeatureCache,
    InMemoryBatches,
    StreamingBatches,
    csr_to_lists,
    lists_to_csr,
    prefetch,
    stream,
)


def _chunks(n_chunks: int = 5, rows: int = 1000, seed: int = 0):
    """Row r of the whole stream has feature column r % 50 with value r (so a row can be recognised), a
    column ``row`` = r, and every 10th row held out."""
    for c in range(n_chunks):
        r = np.arange(c * rows, (c + 1) * rows)
        X = sp.csr_matrix((r.astype(np.float32), (np.arange(rows), r % 50)), shape=(rows, 64))
        yield Chunk({"x": X}, {"row": r.astype(np.float32)}, r % 10 == 0)


@pytest.fixture
def cache(tmp_path: Path) -> FeatureCache:
    return FeatureCache.write(_chunks(), tmp_path / "cache", n_features=64, block_rows=256,
                              extra={"counts": {"rows_read": 5000}})


def test_lists_round_trip_a_sliced_csr():
    X = sp.random(40, 30, density=0.2, format="csr", dtype=np.float32, random_state=0)
    idx, val = csr_to_lists(X)
    back = lists_to_csr(idx.slice(7, 20), val.slice(7, 20), 30)
    assert (back != X[7:27]).nnz == 0 and back.shape == (20, 30)


def test_cache_splits_by_the_held_out_mask(cache: FeatureCache):
    assert (cache.rows(TRAIN), cache.rows(VAL)) == (4500, 500)
    assert cache.blocks == ["x"] and cache.columns == ["row"] and cache.meta["counts"]["rows_read"] == 5000
    source = StreamingBatches(cache, VAL, batch_size=64, shuffle=False)
    rows = np.concatenate([b.columns["row"] for b in source.epoch()])
    assert rows.tolist() == list(range(0, 5000, 10))                  # validation in file order


def test_every_row_once_per_epoch_with_its_own_features_in_a_seeded_order(cache: FeatureCache):
    source = StreamingBatches(cache, TRAIN, batch_size=100, seed=3, buffer_rows=600)
    orders = []
    for epoch in (1, 2, 1):
        batches = list(source.epoch(epoch))
        assert all(len(b) == 100 for b in batches[:-1])
        rows = np.concatenate([b.columns["row"] for b in batches]).astype(int)
        for b in batches:                                               # features travel with their row
            X, r = b.features["x"], b.columns["row"]
            assert np.array_equal(X.indices, r.astype(int) % 50) and np.array_equal(X.data, r)
        assert sorted(rows.tolist()) == [r for r in range(5000) if r % 10]
        orders.append(rows)
    assert not np.array_equal(orders[0], orders[1]) and np.array_equal(orders[0], orders[2])


def test_shuffle_streams_from_a_bounded_buffer(cache: FeatureCache):
    """The first batch is drawn from the first buffer (a few blocks), not from the whole split: the loader
    never holds the dataset."""
    source = StreamingBatches(cache, TRAIN, batch_size=50, seed=0, buffer_rows=500)
    first = next(source.epoch(0)).columns["row"].astype(int)

    def blocks(rows: np.ndarray) -> set[int]:
        """Each chunk's 900 training rows were written as blocks of 256, 256, 256 and 132 rows."""
        position = rows % 1000 - (rows % 1000 // 10 + 1)                  # among the chunk's training rows
        return set((rows // 1000 * 4 + position // 256).tolist())

    assert len(blocks(first)) <= 3                                       # the buffer: >= 500 rows, whole blocks
    whole = StreamingBatches(cache, TRAIN, batch_size=50, seed=0, buffer_rows=10**6)
    assert len(blocks(next(whole.epoch(0)).columns["row"].astype(int))) > 5


def test_in_memory_batches_are_the_same_rows(cache: FeatureCache):
    source = InMemoryBatches(cache, TRAIN, batch_size=128, device=torch.device("cpu"), seed=1)
    rows = []
    for b in source.epoch(0):
        indices, offsets, values = b.features["x"]
        assert offsets[0] == 0 and torch.equal(values[offsets], b.columns["row"])   # one value per row here
        rows += b.columns["row"].int().tolist()
    assert sorted(rows) == [r for r in range(5000) if r % 10]


def test_stream_gives_device_tensors(cache: FeatureCache):
    batch = next(stream(StreamingBatches(cache, VAL, batch_size=32, shuffle=False), 0, torch.device("cpu")))
    indices, offsets, values = batch.features["x"]
    assert batch.size == 32 and indices.dtype == offsets.dtype == torch.int32 and offsets.tolist() == list(range(32))
    assert values.tolist() == batch.columns["row"].tolist() == [float(r) for r in range(0, 320, 10)]


def test_prefetch_passes_errors_through_and_stops_when_closed():
    def failing():
        yield 1
        raise OSError("disk gone")

    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    it = prefetch(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    count = len(produced)
    assert count < 10 and len(produced) == count                        # the producer stopped


def test_empty_split_and_bad_sizes(tmp_path: Path):
    cache = FeatureCache.write(_chunks(1, 10), tmp_path / "c", n_features=64)
    assert cache.rows(VAL) == 1 and list(StreamingBatches(cache, VAL, batch_size=4).epoch()) != []
    with pytest.raises(ValueError, match="batch_size"):
        StreamingBatches(cache, TRAIN, batch_size=0)
    assert pa.__version__                                                # pyarrow is the cache's only format
