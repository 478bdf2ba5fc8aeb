"""Arrow tables over one range of a store's instances, optionally with
segment sampling: what the Ray Data and Spark read tasks hand their engine
(finegym_store.ray, finegym_store.spark). Needs pyarrow.

Every buffer is exactly the range's bytes of the mapping (string and ragged
offsets rebased, a few bytes per row), never the whole column, so an engine
that serialises the table copies that range and nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _args
from .arrow import INSTANCE_FIELDS
from .arrow import select_columns as select
from .spec import SegmentSpec

if TYPE_CHECKING:
    import pyarrow as pa

    from .store import Store, Strings

__all__ = ["Sampling", "select", "schema", "range_table", "bytes_per_row"]


@dataclass(frozen=True)
class Sampling:
    """What a read task gathers: a :class:`~finegym_store.SegmentSpec` and
    the epoch that keys its train-mode segments. Picklable; one value
    travels with every read task."""

    spec: SegmentSpec
    epoch: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, SegmentSpec):
            raise TypeError(f"spec must be a finegym_store.SegmentSpec, got {type(self.spec).__name__}")
        object.__setattr__(self, "epoch", _args.count(self.epoch, "epoch"))

    @staticmethod
    def of(spec: SegmentSpec | None, epoch: int) -> Sampling | None:
        """None when ``spec`` takes every segment as stored (no gather needed)."""
        if spec is None:
            _args.count(epoch, "epoch")
            return None
        if not isinstance(spec, SegmentSpec):
            raise TypeError(f"spec must be a finegym_store.SegmentSpec, got {type(spec).__name__}")
        if spec.num_segments is None and spec.dtype is None:
            _args.count(epoch, "epoch")
            return None
        return Sampling(spec, epoch)

    def gather(self, store: Store, column: str, indices: Any, threads: int | None) -> np.ndarray:
        return store.gather(column, indices, spec=self.spec, epoch=self.epoch, threads=threads)

    def dtype(self, store: Store, column: str) -> np.dtype:
        return np.dtype(self.spec.dtype) if self.spec.dtype is not None else store.column(column).dtype

    def segments(self, store: Store, column: str) -> int:
        """Rows per instance a gather of ``column`` gives (K * clip_len, or T)."""
        rows = self.spec.rows
        if rows is None:
            col = store.column(column)
            if col.ragged:
                raise ValueError(f"{store.path}: column {column!r} is ragged (T varies per instance); "
                                 "gathering it needs spec.num_segments")
            assert col.length is not None
            return col.length
        return rows


# -- Arrow arrays over one range of instances -----------------------------------------


def _buffer(view: np.ndarray) -> pa.Buffer:
    import pyarrow as pa

    return pa.foreign_buffer(view.ctypes.data, view.nbytes, base=view)


def _primitive(view: np.ndarray, type_: pa.DataType) -> pa.Array:
    import pyarrow as pa

    return pa.Array.from_buffers(type_, len(view), [None, _buffer(np.ascontiguousarray(view))])


def _strings(strings: Strings, start: int, stop: int) -> pa.Array:
    import pyarrow as pa

    offsets = strings.offsets[start : stop + 1]
    first, last = int(offsets[0]), int(offsets[-1])
    data = strings.data[first:last]
    return pa.Array.from_buffers(pa.large_utf8(), stop - start,
                                 [None, _buffer(offsets - first), _buffer(data)])


def _value_type(dtype: np.dtype) -> pa.DataType:
    import pyarrow as pa

    return {np.dtype(np.float32): pa.float32(), np.dtype(np.float16): pa.float16()}[np.dtype(dtype)]


def _tensor(values: np.ndarray, nested: bool = False) -> pa.Array:
    """A (B, T, C) array over its bytes: an arrow.fixed_shape_tensor array,
    or fixed_size_list<fixed_size_list<value, C>, T> when ``nested``."""
    import pyarrow as pa

    b, t, c = values.shape
    vt = _value_type(values.dtype)
    flat = pa.Array.from_buffers(vt, b * t * c, [None, _buffer(values)])
    if nested:
        return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, c), t)
    storage = pa.FixedSizeListArray.from_arrays(flat, t * c)
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(vt, [t, c]), storage)


def _ragged(store: Store, name: str, start: int, stop: int) -> pa.Array:
    import pyarrow as pa

    col = store.column(name)
    offsets = col.offsets
    assert offsets is not None
    offsets = offsets[start : stop + 1]
    first, last = int(offsets[0]), int(offsets[-1])
    vt = _value_type(col.dtype)
    rows = col.values[first:last]
    flat = pa.Array.from_buffers(vt, rows.size, [None, _buffer(rows)])
    inner = pa.FixedSizeListArray.from_arrays(flat, col.channels)
    return pa.Array.from_buffers(pa.large_list(inner.type), stop - start, [None, _buffer(offsets - first)],
                                 children=[inner])


def _field_type(store: Store, name: str, sampling: Sampling | None, nested: bool) -> pa.DataType:
    import pyarrow as pa

    if name in ("id", "video"):
        return pa.large_utf8()
    if name in INSTANCE_FIELDS:
        return pa.int32()
    col = store.column(name)
    if sampling is not None:
        return _tensor_type(_value_type(sampling.dtype(store, name)), sampling.segments(store, name), col.channels,
                            nested)
    vt = _value_type(col.dtype)
    if col.ragged:
        return pa.large_list(pa.list_(vt, col.channels))
    assert col.length is not None
    return _tensor_type(vt, col.length, col.channels, nested)


def _tensor_type(vt: pa.DataType, t: int, c: int, nested: bool) -> pa.DataType:
    import pyarrow as pa

    return pa.list_(pa.list_(vt, c), t) if nested else pa.fixed_shape_tensor(vt, [t, c])


def schema(store: Store, names: Sequence[str], sampling: Sampling | None = None, nested: bool = False) -> pa.Schema:
    """The schema of :func:`range_table`'s tables."""
    import pyarrow as pa

    return pa.schema([pa.field(n, _field_type(store, n, sampling, nested), nullable=False) for n in names])


def range_table(store: Store, names: Sequence[str], start: int, stop: int, sampling: Sampling | None = None,
                threads: int | None = None, nested: bool = False) -> pa.Table:
    """Instances [start, stop) of ``store`` as an Arrow table whose buffers
    are exactly that range of the mapping, or gathered (B, K * clip_len, C)
    on ``threads`` threads with ``sampling``. Fixed-T and gathered features
    are arrow.fixed_shape_tensor, or nested fixed_size_lists when
    ``nested``; ragged ones large_list<fixed_size_list<value, C>>."""
    import pyarrow as pa

    meta = store.meta
    arrays = []
    for n in names:
        if n == "id":
            arrays.append(_strings(store.ids, start, stop))
        elif n == "video":
            arrays.append(_strings(meta.video, start, stop))
        elif n == "label":
            arrays.append(_primitive(store.labels[start:stop], pa.int32()))
        elif n in INSTANCE_FIELDS:
            arrays.append(_primitive(getattr(meta, n)[start:stop], pa.int32()))
        elif sampling is not None:
            idx = np.arange(start, stop, dtype=np.int64)
            arrays.append(_tensor(sampling.gather(store, n, idx, threads), nested))
        elif store.column(n).ragged:
            arrays.append(_ragged(store, n, start, stop))
        else:
            arrays.append(_tensor(store.column(n).values[start:stop], nested))
    return pa.Table.from_arrays(arrays, schema=schema(store, names, sampling, nested))


def bytes_per_row(store: Store, name: str, sampling: Sampling | None = None) -> int:
    """Bytes of one instance of a field in a range table (average for strings
    and ragged columns, offsets included)."""
    import math

    n = max(1, len(store))
    if name in ("id", "video"):
        s = store.ids if name == "id" else store.meta.video
        return 8 + math.ceil(int(s.offsets[-1]) / n)
    if name in INSTANCE_FIELDS:
        return 4
    col = store.column(name)
    if sampling is not None:
        return sampling.segments(store, name) * col.channels * sampling.dtype(store, name).itemsize
    return math.ceil(col.values.nbytes / n) + (8 if col.ragged else 0)


