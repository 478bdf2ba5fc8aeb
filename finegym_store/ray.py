"""Ray Data: a datasource that reads a .fgs file straight into a Dataset.

    import finegym_store.ray
    ds = finegym_store.ray.read_store("train.fgs", columns=["label", "i3d"])
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        batch["i3d"]                # (64, 12, 2048) float32

Each read task covers a contiguous range of instances and opens the store
where it runs: the file is mapped on that node, and the task hands Ray Arrow
arrays over exactly its range of the mapping (no per-row work, no copy until
Ray serialises the block into its object store). The path must therefore name
the same file on every node of the cluster, as with any local file read by
Ray. Feature columns are ``arrow.fixed_shape_tensor`` columns, which Ray turns
into (B, T, C) ndarrays; with segment sampling (``num_segments``), the task
gathers (B, K * clip_len, C) with the store's C++ gather instead.

ray is imported here only: ``pip install "finegym-store[ray]"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import ray
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError('finegym_store.ray needs Ray Data: pip install "finegym-store[ray]"') from None

from .arrow import INSTANCE_FIELDS
from .loader import SAMPLINGS, check_count, check_sampling

if TYPE_CHECKING:
    import pyarrow as pa

    from .store import Store, Strings

__all__ = ["read_store", "StoreDatasource", "Sampling"]

#: Most bytes of data per read task (and so per block) by default: large
#: blocks keep Ray's fixed cost per block (scheduling, object store entries,
#: metadata) small against the data.
BLOCK_BYTES = 64 << 20




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


def _tensor(values: np.ndarray) -> pa.Array:
    """A (B, T, C) array as an arrow.fixed_shape_tensor array over its bytes."""
    import pyarrow as pa

    b, t, c = values.shape
    vt = _value_type(values.dtype)
    flat = pa.Array.from_buffers(vt, b * t * c, [None, _buffer(values)])
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


def _field_type(store: Store, name: str, sampling: Sampling | None) -> pa.DataType:
    import pyarrow as pa

    if name in ("id", "video"):
        return pa.large_utf8()
    if name in INSTANCE_FIELDS:
        return pa.int32()
    col = store.column(name)
    if sampling is not None:
        dt = np.dtype(sampling.dtype) if sampling.dtype is not None else col.dtype
        return pa.fixed_shape_tensor(_value_type(dt), [sampling.segments(store, name), col.channels])
    vt = _value_type(col.dtype)
    if col.ragged:
        return pa.large_list(pa.list_(vt, col.channels))
    assert col.segments is not None
    return pa.fixed_shape_tensor(vt, [col.segments, col.channels])


def schema(store: Store, names: Sequence[str], sampling: Sampling | None = None) -> pa.Schema:
    """The Arrow schema of the blocks :func:`read_store` gives."""
    import pyarrow as pa

    return pa.schema([pa.field(n, _field_type(store, n, sampling), nullable=False) for n in names])


def range_table(store: Store, names: Sequence[str], start: int, stop: int, sampling: Sampling | None = None,
                threads: int | None = None) -> pa.Table:
    """Instances [start, stop) of ``store`` as an Arrow table whose buffers
    are exactly that range of the mapping (gathered when ``sampling``)."""
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
            arrays.append(_tensor(sampling.gather(store, n, idx, threads)))
        elif store.column(n).ragged:
            arrays.append(_ragged(store, n, start, stop))
        else:
            arrays.append(_tensor(store.column(n).values[start:stop]))
    return pa.Table.from_arrays(arrays, schema=schema(store, names, sampling))


def _task_threads() -> int:
    """The CPUs Ray assigned to the running task (at least 1)."""
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - outside a task: one thread
        cpus = 1.0
    return max(1, int(cpus))


def _read(path: str, names: list[str], start: int, stop: int, sampling: Sampling | None,
          threads: int | None) -> Iterator[pa.Table]:
    from .store import open as open_store

    store = open_store(path)
    if len(store) < stop:
        raise ValueError(f"{path} holds {len(store)} instances, but the dataset was planned for at least {stop}; "
                         "the file changed after read_store() (or differs between nodes)")
    # One block per task: Ray would merge smaller ones (a copy) into blocks
    # of its target size, and slices larger ones without copying.
    yield range_table(store, names, start, stop, sampling, threads if threads is not None else _task_threads())


# -- the datasource ---------------------------------------------------------------------


def _select(store: Store, columns: Sequence[str] | str | None) -> list[str]:
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


class StoreDatasource(ray.data.Datasource):
    """A ``ray.data.Datasource`` over one .fgs file; see :func:`read_store`."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None,
                 sampling: Sampling | None = None, threads: int | None = None) -> None:
        super().__init__()
        from .store import open as open_store

        store = open_store(path)
        self._path = os.path.abspath(store.path)
        self._names = _select(store, columns)
        self._projection_map: dict[str, str] | None = None
        self._sampling = sampling
        self._num_rows = len(store)
        self._threads = None if threads is None else check_count(threads, "threads", 1)
        if sampling is not None:
            for n in self._names:
                if n in store.columns:
                    # Arguments the column can't serve fail here, not in a read task.
                    sampling.gather(store, n, np.zeros(0, np.int64), 1)
        self._row_bytes = {n: self._bytes_per_row(store, n) for n in self._names}
        self._schema = schema(store, self._names, sampling)

    def _bytes_per_row(self, store: Store, name: str) -> int:
        n = max(1, len(store))
        if name in ("id", "video"):
            s = store.ids if name == "id" else store.meta.video
            return 8 + math.ceil(int(s.offsets[-1]) / n)
        if name in INSTANCE_FIELDS:
            return 4
        col = store.column(name)
        if self._sampling is not None:
            dt = np.dtype(self._sampling.dtype) if self._sampling.dtype is not None else col.dtype
            return self._sampling.segments(store, name) * col.channels * dt.itemsize
        return math.ceil(col.values.nbytes / n) + (8 if col.ragged else 0)

    # -- Datasource API ------------------------------------------------------------
    def get_name(self) -> str:
        return "FinegymStore"

    def supports_projection_pushdown(self) -> bool:
        return True

    def columns(self) -> list[str]:
        """The columns the read gives, after any projection Ray pushed down."""
        wanted = self._get_data_columns()
        if wanted is None:
            return list(self._names)
        return [n for n in self._names if n in wanted]

    def row_bytes(self) -> int:
        return sum(self._row_bytes[n] for n in self.columns())

    def estimate_inmemory_data_size(self) -> int:
        return self._num_rows * self.row_bytes()

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        import pyarrow as pa

        names = self.columns()
        n = self._num_rows
        tasks = max(1, min(int(parallelism), n))
        bounds = np.linspace(0, n, tasks + 1).round().astype(np.int64).tolist()
        row_bytes = self.row_bytes()
        sch = pa.schema([self._schema.field(c) for c in names])
        out = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop <= start and n:
                continue
            meta = BlockMetadata(num_rows=stop - start, size_bytes=int((stop - start) * row_bytes),
                                          exec_stats=None, input_files=(self._path,))
            fn = partial(_read, self._path, names, start, stop, self._sampling, self._threads)
            out.append(ReadTask(fn, meta, schema=sch, per_task_row_limit=per_task_row_limit))
        return out


def read_store(
    path: str | os.PathLike[str],
    *,
    columns: Sequence[str] | str | None = None,
    num_segments: int | None = None,
    mode: str = "test",
    seed: int = 0,
    epoch: int = 0,
    clip_len: int = 1,
    dtype: Any = None,
    sampling: str = "mmaction2",
    threads: int | None = None,
    **read_args: Any,
) -> ray.data.Dataset:
    """A ``ray.data.Dataset`` read straight from a .fgs file; see README,
    "Ray Data and Spark".

    ``columns`` selects and orders any of id, label, the parsed id fields and
    the feature columns (default: all); ``ds.select_columns(...)`` is pushed
    into the read as well. Feature columns come out of ``iter_batches(
    batch_format="numpy")`` as (B, T, C) arrays. With ``num_segments`` (K),
    each read task gathers (B, K * clip_len, C) instead, sampled as
    :meth:`finegym_store.Store.gather` does with ``mode``, ``seed``,
    ``epoch``, ``clip_len``, ``dtype`` and ``sampling``; a Dataset is one
    epoch's sampling (iterating it again gives the same segments), so build
    one per epoch for ``mode="train"``.

    Read tasks cover contiguous instance ranges and each opens the file where
    it runs, so ``path`` must name the same file on every node; a task gives
    one block. ``threads`` is the gather's threads per task (default: the
    CPUs Ray gave the task).
    Everything else (``override_num_blocks``, ``concurrency``, ``num_cpus``,
    ``ray_remote_args``, ...) goes to ``ray.data.read_datasource``; without
    ``override_num_blocks`` there is one read task per cluster CPU, or more
    where that makes blocks over 64 MiB."""
    spec = None
    if num_segments is not None or mode != "test" or clip_len != 1 or dtype is not None or sampling != "mmaction2":
        spec = Sampling(num_segments=num_segments, mode=mode, seed=seed, epoch=epoch, clip_len=clip_len,
                        dtype=None if dtype is None else str(np.dtype(dtype)), sampling=sampling)
    source = StoreDatasource(path, columns, spec, threads)
    if "override_num_blocks" not in read_args and "parallelism" not in read_args:
        if not ray.is_initialized():
            ray.init()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        by_size = math.ceil(source.estimate_inmemory_data_size() / BLOCK_BYTES)
        read_args["override_num_blocks"] = max(1, min(max(cpus, by_size), source._num_rows))
    return ray.data.read_datasource(source, **read_args)
