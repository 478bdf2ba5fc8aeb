"""Reading a store: ``finegym_store.open(path)`` returns a :class:`Store`.

Everything here is a view into the memory mapping owned by the C++ reader;
arrays are read-only and keep the mapping alive on their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from . import _core
from .errors import FormatError
from .loader import Loader, as_indices, check_count, check_sampling

__all__ = ["Store", "Column", "Strings", "Meta", "Classes", "open"]


_S = _core.SECTIONS  # the schema's section names, spelled once in C++ (format.hpp)


class Strings(Sequence[str]):
    """A read-only sequence of str over an Arrow large_utf8 pair of sections
    (int64 offsets + UTF-8 bytes). Decodes on access; nothing is copied up front.

    Offsets are the reader's copy, validated when the store was opened; string
    bytes are copied out of the mapping by the C++ core, so a file truncated
    while open raises OSError naming it instead of crashing."""

    def __init__(self, reader: _core.Reader, name: str, where: str = "string column") -> None:
        self._reader = reader
        self._data_name = name + _S["data_suffix"]
        self._offsets = reader.section(name + _S["offsets_suffix"])
        self._where = where

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} strings")
        i = int(i) % n
        return self._decode(self._reader.read_bytes(self._data_name, int(self._offsets[i]), int(self._offsets[i + 1])))

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self._where}: string bytes are not valid UTF-8 ({e.reason}); "
                              "the store is damaged (run `finegym-store verify`)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_list())

    def to_list(self) -> list[str]:
        """All strings at once (one copy and decode of the whole data buffer)."""
        o = self._offsets.tolist()
        text = self._reader.read_bytes(self._data_name, 0, o[-1])
        return [self._decode(text[o[i] : o[i + 1]]) for i in range(len(o) - 1)]

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def data(self) -> np.ndarray:
        """A view of the UTF-8 bytes in the mapping (not guarded: see docs/FORMAT.md, "Files changed while open")."""
        return self._reader.section(self._data_name)

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"Strings([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


@dataclass(frozen=True)
class Meta:
    """Fields parsed from FineGym element ids, one entry per instance. Ids that
    do not follow the pattern have video '' and -1 in every time field."""

    video: Strings
    event_start: np.ndarray
    event_end: np.ndarray
    element_start: np.ndarray
    element_end: np.ndarray


@dataclass(frozen=True)
class Classes:
    """The label hierarchy stored from a categories file, one entry per class."""

    label: np.ndarray
    glabel: np.ndarray
    set: np.ndarray
    event: Strings
    name: Strings


class Column:
    """One feature column: ``len(col)`` instances of (T, C) rows.

    ``col[i]`` is a read-only (T_i, C) view; for fixed-T columns a slice gives
    an (n, T, C) view and an integer array gives a copy (numpy fancy indexing).
    """

    def __init__(self, reader: _core.Reader, name: str, dtype: str, segments: int | None, channels: int,
                 remote: Any = None) -> None:
        # The reader, not the Store: no reference cycle, so dropping the last
        # reference to a Store unmaps the file at once (not at the next GC).
        self._reader = reader
        self.name = name
        self.dtype = np.dtype(dtype)
        self.segments = segments
        self.channels = channels
        # A remote store's row map (finegym_store.remote.RowMap): every read of
        # feature bytes fetches them into the cache first. None when local.
        self._remote = remote

    def _fetch(self, indices: Any = None) -> None:
        """Remote stores: fetch the rows of ``indices`` (all when None) into the cache."""
        if self._remote is not None:
            cache = self._remote.cache
            if indices is None:
                cache.ensure_blocks(cache.column_blocks(self.name))
            else:
                cache.ensure_blocks(self._remote.blocks(indices))

    @property
    def nbytes(self) -> int:
        """Bytes of the column's feature section (nothing is read)."""
        name = _S["feature_prefix"] + self.name
        return next(int(s["length"]) for s in self._reader.sections() if s["name"] == name)

    @property
    def ragged(self) -> bool:
        """True when T varies per instance."""
        return self.segments is None

    @property
    def shape(self) -> tuple[int, int | None, int]:
        """(N, T, C), with T None when ragged."""
        return (len(self._reader), self.segments, self.channels)

    @property
    def values(self) -> np.ndarray:
        """The whole column buffer: (N, T, C), or (total rows, C) when ragged.
        A remote store fetches the whole column first."""
        self._fetch()
        return self._reader.section(_S["feature_prefix"] + self.name)

    @property
    def offsets(self) -> np.ndarray | None:
        """Row offsets (N + 1,) of a ragged column; None when fixed. The
        reader's copy, validated at open (owned by the reader, read-only)."""
        if not self.ragged:
            return None
        return self._reader.section(_S["feature_prefix"] + self.name + _S["offsets_suffix"])

    def lengths(self) -> np.ndarray:
        """T_i of every instance, as int64."""
        if self.ragged:
            return np.diff(self.offsets)  # type: ignore[arg-type]
        return np.full(len(self), self.segments, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: Any) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, (int, np.integer)):
            if self._remote is not None:
                n = len(self)
                if -n <= int(index) < n:
                    self._fetch(np.array([int(index) % n]))
            return self._reader.features(self.name, int(index))
        if self.ragged:
            if isinstance(index, slice):
                index = range(*index.indices(len(self)))
            index = np.asarray(index).ravel()
            if self._remote is not None:
                self._fetch(as_indices(index, len(self)) % max(1, len(self)))
            return [self._reader.features(self.name, int(i)) for i in index]
        if self._remote is not None:
            first = index[0] if isinstance(index, tuple) and index else index  # col[i, t, c]: instances from i
            self._fetch(np.arange(len(self), dtype=np.int64)[first].ravel())
        return self._reader.section(_S["feature_prefix"] + self.name)[index]

    def __repr__(self) -> str:
        t = "T" if self.ragged else self.segments
        return f"<Column {self.name!r} {self.dtype} ({len(self)}, {t}, {self.channels})>"


class Store:
    """A finegym-store file, memory-mapped. Open with :func:`finegym_store.open`."""

    def __init__(self, path: str | os.PathLike[str], *, _remote: Any = None) -> None:
        # _remote: a finegym_store.remote.RemoteCache; `path` is then its cache file.
        self._remote = _remote
        self._reader = _core.Reader(os.fspath(path))
        # Resolved now: a later chdir must not change which file a pickled
        # Store (a spawn worker, say) reopens.
        self._abspath = os.path.abspath(self._reader.path)
        self._columns = {name: Column(self._reader, name, dtype, t, c, self._row_map(name, dtype, t, c))
                         for name, dtype, t, c in self._reader.columns()}
        self._index: dict[str, int] | None = None

    def _row_map(self, name: str, dtype: str, t: int | None, c: int) -> Any:
        if self._remote is None:
            return None
        from .remote import RowMap

        offsets = None if t is not None else self._reader.section(_S["feature_prefix"] + name + _S["offsets_suffix"])
        return RowMap(self._remote, name, np.dtype(dtype).itemsize * c, t, offsets)

    def _ensure_rows(self, column: str, indices: np.ndarray, ahead: Sequence[np.ndarray] = ()) -> None:
        """Remote stores: fetch the rows of ``indices`` (valid, non-negative or
        negative instance indices) of ``column`` into the cache before they are
        read, and start fetching the rows of ``ahead`` (the next batches'
        indices) in the background. Nothing for a local store, or once every
        block of the column is in the cache and checked."""
        if self._remote is None or self._remote.column_ready(column):
            return
        col = self.column(column)
        n = len(self)
        if len(indices):
            col._fetch(np.asarray(indices, dtype=np.int64) % n)
        if ahead:
            self._remote.prefetch(column, col._remote.blocks(np.concatenate(ahead) % n))

    # -- identity -------------------------------------------------------------
    @property
    def path(self) -> str:
        """The file's path, or a remote store's URL."""
        return self._remote.url if self._remote is not None else self._reader.path

    @property
    def cache_path(self) -> str | None:
        """A remote store's local cache file (None for a local store). Only
        the bytes this store has fetched are valid there: read it through the
        Store, never as a store of its own."""
        return self._reader.path if self._remote is not None else None

    @property
    def format_version(self) -> int:
        return self._reader.version

    @property
    def file_size(self) -> int:
        return self._reader.file_size

    def __len__(self) -> int:
        return len(self._reader)

    def __repr__(self) -> str:
        cols = ", ".join(repr(c) for c in self._columns.values())
        return f"<Store {self.path!r}: {len(self)} instances; {cols}>"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Crosses process boundaries by absolute path: the receiver maps the
        # file itself, whatever its working directory. A remote store by URL,
        # options and cache folder: the receiver shares the same cache.
        if self._remote is not None:
            r = self._remote
            return (_open_remote, (r.url, r.storage_options, r.cache_root))
        return (Store, (self._abspath,))

    # -- instances -------------------------------------------------------------
    @property
    def ids(self) -> Strings:
        """Element ids, in store order."""
        return self._strings(_S["ids"])

    def _strings(self, name: str) -> Strings:
        return Strings(self._reader, name, f"{self.path}, section '{name}'")

    @property
    def labels(self) -> np.ndarray:
        """int32 labels (N,), -1 where unlabelled."""
        return self._reader.section(_S["labels"])

    def index_of(self, ids: str | Iterable[str]) -> int | np.ndarray:
        """Position of one id (int) or of many (int64 array). KeyError names an
        unknown id. The lookup table is built on first use."""
        if self._index is None:
            self._index = self._build_index()
        index = self._index
        if isinstance(ids, str):
            try:
                return index[ids]
            except KeyError:
                raise KeyError(f"id {ids!r} is not in {self.path}") from None
        keys = list(ids)
        out = np.empty(len(keys), dtype=np.int64)
        for j, k in enumerate(keys):
            try:
                out[j] = index[k]
            except KeyError:
                raise KeyError(f"id {k!r} (position {j}) is not in {self.path}") from None
        return out

    def _build_index(self) -> dict[str, int]:
        ids = self.ids.to_list()
        index = {k: i for i, k in enumerate(ids)}
        if len(index) != len(ids):
            first: dict[str, int] = {}
            for i, k in enumerate(ids):
                if k in first:
                    raise FormatError(f"'{self.path}' is not a valid finegym-store file: id {k!r} appears twice "
                                      f"(instances {first[k]} and {i}); ids must be unique")
                first[k] = i
        return index

    @property
    def meta(self) -> Meta:
        r = self._reader
        event_start, event_end, element_start, element_end = (r.section(name) for name in _S["meta_ints"])
        return Meta(
            video=self._strings(_S["meta_video"]),
            event_start=event_start,
            event_end=event_end,
            element_start=element_start,
            element_end=element_end,
        )

    @property
    def classes(self) -> Classes | None:
        """The label hierarchy, or None when no categories file was converted."""
        r = self._reader
        if r.num_classes is None:
            return None
        label, glabel, set_ = (r.section(name) for name in _S["class_ints"])
        name, event = _S["class_strings"]
        return Classes(label=label, glabel=glabel, set=set_, event=self._strings(event), name=self._strings(name))

    @property
    def label_names(self) -> dict[int, str] | None:
        """{label: class name}, or None when the store has no hierarchy."""
        c = self.classes
        if c is None:
            return None
        return dict(zip(c.label.tolist(), c.name.to_list()))

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance recorded at conversion (sources, dtypes, tool version)."""
        if not self._reader.has_attrs:
            return {}
        name = _S["attrs"]
        raw = self._reader.read_bytes(name, 0, self._reader.section(name).nbytes)
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"'{self.path}': section '{name}' is not UTF-8 JSON ({e}); "
                              "the store is damaged (run `finegym-store verify`)") from None
        if not isinstance(value, dict):
            raise FormatError(f"'{self.path}': section '{name}' holds a JSON {type(value).__name__}, "
                              "expected an object; the store is damaged")
        return value

    # -- features --------------------------------------------------------------
    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the feature columns."""
        return tuple(self._columns)

    def column(self, name: str) -> Column:
        try:
            return self._columns[name]
        except KeyError:
            raise KeyError(f"no feature column {name!r} in {self.path}; columns: {', '.join(self._columns)}") from None

    def features(self, column: str, index: int) -> np.ndarray:
        """Read-only (T_i, C) view of instance ``index`` in ``column``; no copy."""
        if self._remote is not None:
            return self.column(column)[int(index)]  # type: ignore[return-value]
        return self._reader.features(column, int(index))

    # -- batches -----------------------------------------------------------------
    def _gather_dtype(self, column: str, dtype: Any) -> np.dtype:
        if dtype is None:
            return self.column(column).dtype
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"dtype must be float32 or float16, got {dt}")
        return dt

    @staticmethod
    def _threads(threads: int | None) -> int:
        """Threads for a gather: the cores available by default; at most
        ``_core.max_threads()`` (the machine's cores) are used in any case."""
        if threads is None:
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else _core.default_threads()
        else:
            n = check_count(threads, "threads", 1)
        return max(1, min(n, _core.max_threads()))

    def gather(
        self,
        column: str,
        indices: Any,
        num_segments: int | None = None,
        mode: str = "test",
        seed: int = 0,
        epoch: int = 0,
        clip_len: int = 1,
        out: np.ndarray | None = None,
        dtype: Any = None,
        threads: int | None = None,
        sampling: str = "mmaction2",
    ) -> np.ndarray:
        """Gather a batch: (B, K * clip_len, C) from instances ``indices``.

        Each instance contributes ``num_segments`` (K) clips of ``clip_len``
        segments (README, "Sampling"): ``sampling="mmaction2"`` (default) is
        bit-exact with mmaction2 1.2.0's SampleFrames, ``"exact"`` the same
        rules in exact integer arithmetic; centred in ``mode="test"``, random
        within equal parts in ``"train"`` (keyed by seed, epoch, instance and
        clip, so independent of threads and batch composition).
        ``num_segments=None`` takes all T segments (fixed-T columns). ``dtype``
        is float32 or float16 (default: the column's); ``out`` is filled and
        returned without allocating. The work runs on ``threads`` C++ threads
        (default: the cores available; at most the machine's cores) with the
        GIL released. IndexError names an out-of-range index; TypeError a
        non-integer one (bools included)."""
        check_sampling(mode, sampling)
        if num_segments is not None:
            num_segments = check_count(num_segments, "num_segments", 1)
        idx = as_indices(indices, len(self))
        self._ensure_rows(column, idx)
        return _core.gather(
            self._reader, column, idx, num_segments, mode, check_count(seed, "seed", 0),
            check_count(epoch, "epoch", 0), check_count(clip_len, "clip_len", 1), out,
            self._gather_dtype(column, dtype), self._threads(threads), "auto", sampling,
        )

    def loader(
        self,
        column: str,
        batch_size: int,
        num_segments: int | None = None,
        mode: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        threads: int | None = None,
        sampler: str = "uniform",
        clip_len: int = 1,
        dtype: Any = None,
        reuse_buffers: bool = False,
        sampling: str = "mmaction2",
    ) -> Loader:
        """Batches for a training loop; see README, "Loader". Iterating yields
        :class:`Batch` (features, labels, indices); each new iteration is the
        next epoch (``set_epoch`` sets it). ``rank``/``world_size`` shard like
        torch's DistributedSampler; ``sampler="balanced"`` draws classes
        uniformly. ``prefetch`` batches are gathered ahead on persistent C++
        threads. A yielded batch is the caller's; ``reuse_buffers=True``
        recycles its array once the next batch is requested. ``sampling`` as
        in :meth:`gather`."""
        return Loader(self, column, batch_size, num_segments=num_segments, mode=mode, shuffle=shuffle, seed=seed,
                      drop_last=drop_last, rank=rank, world_size=world_size, prefetch=prefetch, threads=threads,
                      sampler=sampler, clip_len=clip_len, dtype=dtype, reuse_buffers=reuse_buffers,
                      sampling=sampling)

    # -- integrity ---------------------------------------------------------------
    def verify(self) -> list[str]:
        """Checksum every section; returns the names of damaged ones (empty:
        intact). Raises FormatError when the checksums match but two
        instances share an id, and OSError when the file was truncated or
        rewritten since it was opened. A remote store fetches every byte
        first."""
        if self._remote is not None:
            self._remote.ensure_all()
        return self._reader.verify()

    def sections(self) -> list[dict[str, Any]]:
        """The section table: name, dtype, shape, offset, length, checksum."""
        return self._reader.sections()

    # -- Arrow and Parquet (finegym_store.arrow; needs pyarrow) -----------------
    def to_arrow(self, columns: Sequence[str] | str | None = None, tensor_type: str = "nested") -> Any:
        """A pyarrow.Table over the mapped bytes, no copy: id, label, the
        parsed id fields and one column per feature column (``columns``
        selects and orders any of them). Fixed-T features are
        fixed_size_list<fixed_size_list<value, C>, T> (``tensor_type=
        "fixed_shape_tensor"``: the arrow.fixed_shape_tensor extension);
        ragged ones large_list<fixed_size_list<value, C>>. The schema metadata
        holds what rebuilds the store (README, "Arrow and Parquet")."""
        from . import arrow

        return arrow.to_arrow(self, columns, tensor_type)

    def to_batches(self, batch_size: int | None = None, columns: Sequence[str] | str | None = None,
                   tensor_type: str = "nested") -> Any:
        """A pyarrow.RecordBatchReader of zero-copy slices of ``to_arrow()``,
        ``batch_size`` rows each (default: about 128 MiB of features)."""
        from . import arrow

        return arrow.to_batches(self, batch_size, columns, tensor_type)

    def to_parquet(self, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None,
                   row_group_size: int | None = None, compression: str = "none", byte_stream_split: bool = False,
                   compression_level: int | None = None, tensor_type: str = "nested",
                   progress: bool = False, overwrite: bool = True,
                   storage_options: dict[str, Any] | None = None) -> str:
        """Write a Parquet file one row group at a time (memory: one row
        group; default about 128 MiB of features), atomically. No dictionary
        pages for floats; ``byte_stream_split=True`` with
        ``compression="zstd"`` shrinks float data. ``path`` may be an
        ``s3://`` URL (written locally, then uploaded in one atomic put;
        ``storage_options`` as for :func:`open`). ``overwrite=False`` refuses
        an existing file or object (FileExistsError). Returns the path."""
        from . import arrow

        return arrow.to_parquet(self, path, columns, row_group_size, compression, byte_stream_split,
                                compression_level, tensor_type, progress, overwrite, storage_options)

    def classes_table(self) -> Any:
        """The label hierarchy as a pyarrow.Table (label, glabel, set, event,
        name), or None when the store has none."""
        from . import arrow

        return arrow.classes_table(self)

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """Arrow PyCapsule stream of the whole store (polars.DataFrame(store),
        duckdb, pyarrow.RecordBatchReader.from_stream(store))."""
        return self.to_batches().__arrow_c_stream__(requested_schema)

    def __arrow_c_schema__(self) -> Any:
        from . import arrow

        return arrow.arrow_schema(self).__arrow_c_schema__()


def open(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,  # noqa: A001
         cache_dir: str | os.PathLike[str] | None = None) -> Store:
    """Open a store read-only. The file is mapped, not read: opening reads the
    header, section table, padding and the int64 offsets arrays (8 bytes per
    instance per string or ragged column), never feature bytes. Raises
    FormatError for a damaged or foreign file and OSError
    (FileNotFoundError, ...) when it cannot be opened or read.

    ``path`` may be a URL: ``s3://BUCKET/KEY``, ``https://...``,
    ``http://...`` (a remote store, README "Remote stores": needs the
    ``remote`` extra) or ``file://PATH``. A remote store fetches its
    non-feature bytes at open and feature rows on first use into a cache
    under ``cache_dir`` (default ``$XDG_CACHE_HOME/finegym-store``);
    ``storage_options`` configure the client (credentials, region, endpoint,
    timeouts) on top of the standard AWS environment variables."""
    from .remote import is_url

    if isinstance(path, str) and is_url(path):
        if path.lower().startswith("file://"):
            from urllib.parse import unquote, urlparse

            return Store(unquote(urlparse(path).path))
        return _open_remote(path, storage_options, cache_dir)
    if storage_options is not None or cache_dir is not None:
        raise ValueError(f"storage_options and cache_dir are for remote stores (URLs), not the local file {path!r}")
    return Store(path)


def _open_remote(url: str, storage_options: dict[str, Any] | None, cache_dir: str | os.PathLike[str] | None) -> Store:
    from .remote import open_remote

    cache = open_remote(url, storage_options, cache_dir)
    return Store(cache.data_path, _remote=cache)
