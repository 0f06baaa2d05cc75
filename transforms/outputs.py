"""Several outputs from one DoFn, kept apart on every runner: each output is a :class:`Tagged` element of the
DoFn's one output, and :class:`SplitTags` routes them, one FlatMap per output.

Why not Beam's own tagged outputs (``ParDo(...).with_outputs``): Beam 2.77's DaskRunner puts every output of a
ParDo in one bag and hands all of them to each consumer of any tag (tests/test_dask_runner.py says where), so a
stage built on them cannot run there. Routing by a field of the element is plain ParDos, which every runner
translates. On the local runner the routing steps are fused into the producer's stage and see only its few,
large elements (tables and counts), and the routed PCollections carry the Arrow coders of their element type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import apache_beam as beam
import pyarrow as pa

from transforms.shuffle import decode_batch, decode_table, encode_table


class Tagged:
    """``value`` for the output named ``tag`` of a DoFn with several outputs (see :class:`SplitTags`)."""

    __slots__ = ("tag", "value")

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value

    def __repr__(self) -> str:
        return f"Tagged({self.tag!r}, {type(self.value).__name__})"

    def __reduce__(self) -> tuple[type, tuple[str, Any]]:
        return Tagged, (self.tag, self.value)


_TABLE, _BATCH, _KEYED, _OTHER = b"T", b"B", b"K", b"P"


def _is_keyed_table(value: Any) -> bool:
    """An (int key, table) pair with a plain int key that fits 8 bytes, as a bucket key always is; any other
    pair (a bool or numpy key, a bigger int) is encoded whole by the primitives coder, types intact."""
    return (isinstance(value, tuple) and len(value) == 2 and type(value[0]) is int
            and -(1 << 63) <= value[0] < (1 << 63) and isinstance(value[1], pa.Table))


class TaggedCoder(beam.coders.Coder):
    """Beam coder for :class:`Tagged` elements: the tag, then a table, a record batch or an (int key, table)
    pair as Arrow IPC bytes, and any other value with Beam's primitives coder. Its size estimate encodes no
    table (see ``transforms.shuffle.ArrowTableCoder`` for why that matters)."""

    def __init__(self):
        self._values = beam.coders.FastPrimitivesCoder()

    def encode(self, value: Tagged) -> bytes:
        tag, v = value.tag.encode(), value.value
        if isinstance(v, pa.Table):
            kind, body = _TABLE, encode_table(v)
        elif isinstance(v, pa.RecordBatch):
            kind, body = _BATCH, encode_table(v)
        elif _is_keyed_table(v):
            kind, body = _KEYED, v[0].to_bytes(8, "big", signed=True) + encode_table(v[1])
        else:
            kind, body = _OTHER, self._values.encode(v)
        return len(tag).to_bytes(2, "big") + tag + kind + body

    def decode(self, encoded: bytes) -> Tagged:
        n = int.from_bytes(encoded[:2], "big")
        tag, kind, body = encoded[2:2 + n].decode(), encoded[2 + n:3 + n], encoded[3 + n:]
        if kind == _OTHER:
            return Tagged(tag, self._values.decode(body))
        if kind == _KEYED:
            return Tagged(tag, (int.from_bytes(body[:8], "big", signed=True), decode_table(body[8:])))
        if kind == _BATCH:
            return Tagged(tag, decode_batch(body))
        if kind != _TABLE:
            raise ValueError(f"not an encoded Tagged element: kind byte {kind!r}")
        return Tagged(tag, decode_table(body))

    def estimate_size(self, value: Tagged) -> int:
        v = value.value
        if isinstance(v, pa.Table | pa.RecordBatch):
            return v.nbytes
        if _is_keyed_table(v):
            return 8 + v[1].nbytes
        return self._values.estimate_size(v)

    def is_deterministic(self) -> bool:
        return False            # tables may encode differently when equal: never a grouping key

    def to_type_hint(self) -> type:
        return Tagged


beam.coders.registry.register_coder(Tagged, TaggedCoder)


def _select(element: Tagged, tag: str, known: frozenset[str]) -> Iterator[Any]:
    if element.tag == tag:
        yield element.value
    elif element.tag not in known:            # an output no step reads would be lost without a word
        raise ValueError(f"an output tagged {element.tag!r}, which no step reads (tags: {sorted(known)})")


class SplitTags(beam.PTransform):
    """A PCollection of :class:`Tagged` → ``{tag: PCollection of its values}``, for the tags of ``types`` (tag →
    element type, which picks the routed PCollection's coder). A tag not in ``types`` is an error."""

    def __init__(self, types: Mapping[str, Any]):
        super().__init__()
        self._types = dict(types)

    def expand(self, tagged: beam.PCollection) -> dict[str, beam.PCollection]:
        known = frozenset(self._types)
        return {tag: tagged | f"Select_{tag}" >> beam.FlatMap(_select, tag, known).with_output_types(t)
                for tag, t in self._types.items()}
