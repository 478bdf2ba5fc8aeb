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
from typing import TYPE_CHECKING

import numpy as np

from .arrow import INSTANCE_FIELDS
from .loader import check_count, check_sampling

if TYPE_CHECKING:
    import pyarrow as pa

    from .store import Store, Strings

__all__ = ["Sampling", "select", "schema", "range_table", "bytes_per_row"]


@dataclass(frozen=True)
class Sampling:
    """Segment sampling done by each read task: the arguments of
    :meth:`finegym_store.Store.gather` but the indices. Picklable; one value
    travels with every read task."""

    num_segments: int | None = None
    mode: str = "test"
    seed: int = 0
    epoch: int = 0
    clip_len: int = 1
    dtype: str | None = None
    sampling: str = "mmaction2"

    def __post_init__(self) -> None:
        check_sampling(self.mode, self.sampling)
        if self.num_segments is not None:
            check_count(self.num_segments, "num_segments", 1)
        check_count(self.seed, "seed", 0)
        check_count(self.epoch, "epoch", 0)
        check_count(self.clip_len, "clip_len", 1)
        if self.dtype is not None and np.dtype(self.dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")

    def gather(self, store: Store, column: str, indices: np.ndarray, threads: int | None) -> np.ndarray:
        return store.gather(column, indices, num_segments=self.num_segments, mode=self.mode, seed=self.seed,
                            epoch=self.epoch, clip_len=self.clip_len, dtype=self.dtype, threads=threads,
                            sampling=self.sampling)

    def segments(self, store: Store, column: str) -> int:
        """K * clip_len: the segments per instance a gather of ``column`` gives."""
        if self.num_segments is None:
            col = store.column(column)
            if col.ragged:
                raise ValueError(f"{store.path}: column {column!r} is ragged (T varies per instance); "
                                 "a gather over it needs num_segments")
            assert col.segments is not None
            return col.segments * self.clip_len
        return self.num_segments * self.clip_len


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
        dt = np.dtype(sampling.dtype) if sampling.dtype is not None else col.dtype
        return _tensor_type(_value_type(dt), sampling.segments(store, name), col.channels, nested)
    vt = _value_type(col.dtype)
    if col.ragged:
        return pa.large_list(pa.list_(vt, col.channels))
    assert col.segments is not None
    return _tensor_type(vt, col.segments, col.channels, nested)


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
        dt = np.dtype(sampling.dtype) if sampling.dtype is not None else col.dtype
        return sampling.segments(store, name) * col.channels * dt.itemsize
    return math.ceil(col.values.nbytes / n) + (8 if col.ragged else 0)


def select(store: Store, columns: Sequence[str] | str | None) -> list[str]:
    available = list(INSTANCE_FIELDS) + list(store.columns)
    clash = set(INSTANCE_FIELDS) & set(store.columns)
    if clash:
        raise ValueError(f"{store.path}: feature column {sorted(clash)[0]!r} has the name of an instance field "
                         f"({', '.join(INSTANCE_FIELDS)}); it cannot be read beside it")
    if columns is None:
        return available
    if isinstance(columns, str):
        columns = [columns]
    out: list[str] = []
    for c in columns:
        if c not in available:
            raise KeyError(f"no column {c!r} in {store.path}; columns: {', '.join(available)}")
        if c not in out:
            out.append(c)
    return out
