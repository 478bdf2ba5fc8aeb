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
into (B, T, C) ndarrays; with a :class:`~finegym_store.SegmentSpec`, the task
gathers (B, K * clip_len, C) with the store's C++ gather instead.

ray is imported here only: ``pip install "finegym-store[ray]"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
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

from . import _args
from ._ranges import Sampling, bytes_per_row, range_table, schema, select
from .spec import SegmentSpec

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["read_store", "StoreDatasource"]

#: Most bytes of data per read task (and so per block) by default: large
#: blocks keep Ray's fixed cost per block (scheduling, object store entries,
#: metadata) small against the data.
BLOCK_BYTES = 64 << 20


def _task_threads() -> int:
    """The CPUs Ray assigned to the running task (at least 1)."""
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


class StoreDatasource(ray.data.Datasource):
    """A ``ray.data.Datasource`` over one .fgs file; see :func:`read_store`."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None,
                 sampling: Sampling | None = None, threads: int | None = None) -> None:
        super().__init__()
        from .store import open as open_store

        store = open_store(path)
        self._path = os.path.abspath(store.path)
        self._names = select(store, columns)
        self._projection_map: dict[str, str] | None = None
        self._sampling = sampling
        self._num_rows = len(store)
        self._threads = _args.optional_count(threads, "threads", 1)
        if sampling is not None:
            for n in self._names:
                if n in store.columns:
                    # Arguments the column can't serve fail here, not in a read task.
                    sampling.gather(store, n, np.zeros(0, np.int64), 1)
        self._row_bytes = {n: bytes_per_row(store, n, sampling) for n in self._names}
        self._schema = schema(store, self._names, sampling)

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
    spec: SegmentSpec | None = None,
    epoch: int = 0,
    threads: int | None = None,
    **read_args: Any,
) -> ray.data.Dataset:
    """A ``ray.data.Dataset`` read straight from a .fgs file; see README,
    "Ray Data and Spark".

    ``columns`` selects and orders any of id, label, the parsed id fields and
    the feature columns (default: all); ``ds.select_columns(...)`` is pushed
    into the read as well. Feature columns come out of ``iter_batches(
    batch_format="numpy")`` as (B, T, C) arrays. With a ``spec``
    (:class:`finegym_store.SegmentSpec` with num_segments K, or a dtype),
    each read task gathers (B, K * clip_len, C) instead, exactly as
    ``store.gather(column, indices, spec=spec, epoch=epoch)``; a Dataset is
    one epoch's sampling (iterating it again gives the same segments), so
    build one per epoch for train-mode specs.

    Read tasks cover contiguous instance ranges and each opens the file where
    it runs, so ``path`` must name the same file on every node; a task gives
    one block. ``threads`` is the gather's threads per task (default: the
    CPUs Ray gave the task). Everything else (``override_num_blocks``,
    ``concurrency``, ``num_cpus``, ``ray_remote_args``, ...) goes to
    ``ray.data.read_datasource``; without ``override_num_blocks`` there is
    one read task per cluster CPU, or more where that makes blocks over
    64 MiB."""
    source = StoreDatasource(path, columns, Sampling.of(spec, epoch), threads)
    if "override_num_blocks" not in read_args and "parallelism" not in read_args:
        if not ray.is_initialized():
            ray.init()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        by_size = math.ceil(source.estimate_inmemory_data_size() / BLOCK_BYTES)
        read_args["override_num_blocks"] = max(1, min(max(cpus, by_size), source._num_rows))
    return ray.data.read_datasource(source, **read_args)
