"""Reading a store: ``finegym_store.open(path)`` returns a :class:`Store`.

Everything here is a view into the memory mapping owned by the C++ reader;
arrays are read-only and keep the mapping alive on their own.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, overload

import numpy as np

from . import _args, _core, labelspace
from .errors import FormatError
from .labelspace import LabelSpace
from .loader import Loader
from .spec import SegmentSpec, resolve
from .stats import ColumnStats, missing_message

__all__ = ["Store", "Column", "Strings", "Meta", "Classes", "open"]


_S = _core.SECTIONS  # the schema's section names, spelled once in C++ (format.hpp)

#: When a gather asks the kernel to read its rows ahead (madvise WILLNEED):
#: per batch when some page is missing from the page cache, always, never.
READAHEAD = ("auto", "on", "off")


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
        i = _args.index(i, len(self), of="strings")
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
    """One feature column: ``len(col)`` instances of (T, C) rows; T is
    ``length`` (None when it varies per instance: ``lengths()``).

    ``col[i]`` is a read-only (T_i, C) view; for fixed-T columns a slice gives
    an (n, T, C) view and an integer array gives a copy (numpy fancy indexing).
    """

    def __init__(self, reader: _core.Reader, name: str, dtype: str, length: int | None, channels: int,
                 remote: Any = None) -> None:
        # The reader, not the Store: no reference cycle, so dropping the last
        # reference to a Store unmaps the file at once (not at the next GC).
        self._reader = reader
        self.name = name
        self.dtype = np.dtype(dtype)
        #: T, the segments stored per instance; None when ragged.
        self.length = length
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
        return self.length is None

    @property
    def shape(self) -> tuple[int, int | None, int]:
        """(N, T, C), with T None when ragged."""
        return (len(self._reader), self.length, self.channels)

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
        return np.full(len(self), self.length, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: Any) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
            i = _args.integer(index)
            if self._remote is not None and -len(self) <= i < len(self):
                self._fetch(np.array([i % len(self)]))
            return self._reader.features(self.name, i)
        if self.ragged:
            if isinstance(index, slice):
                index = range(*index.indices(len(self)))
            index = np.asarray(index).ravel()
            if self._remote is not None:
                self._fetch(_args.indices(index, len(self)) % max(1, len(self)))
            return [self._reader.features(self.name, int(i)) for i in index]
        if self._remote is not None:
            first = index[0] if isinstance(index, tuple) and index else index  # col[i, t, c]: instances from i
            self._fetch(np.arange(len(self), dtype=np.int64)[first].ravel())
        return self._reader.section(_S["feature_prefix"] + self.name)[index]

    def __repr__(self) -> str:
        t = "T" if self.ragged else self.length
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
        # (st_dev, st_ino) of the file just mapped: an export never writes over it,
        # even after the path was given to another file.
        st = os.stat(self._abspath)
        self._identity = (st.st_dev, st.st_ino)
        self._columns = {name: Column(self._reader, name, dtype, t, c, self._row_map(name, dtype, t, c))
                         for name, dtype, t, c in self._reader.columns()}
        self._index: dict[str, int] | None = None
        self._labels_copy: np.ndarray | None = None
        # Column tuples checked for equal T per instance (_columns_of).
        self._equal_t: set[tuple[str, ...]] = set()

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
        # file itself, whatever its working directory. Unpickling never
        # raises (_reopen): a multiprocessing worker that fails to unpickle
        # its task dies, and the caller waits for a result that never comes.
        # A remote store goes by URL, options and cache folder: the receiver
        # shares the same cache.
        d = self.__dict__  # not attributes: an _UnopenedStore raises on those
        if d.get("_remote") is not None:
            r = d["_remote"]
            return (_reopen_remote, (r.url, r.storage_options, r.cache_root))
        if "_remote_args" in d:  # a remote store that could not be reopened: try again
            return (_reopen_remote, d["_remote_args"])
        return (_reopen, (d["_abspath"],))

    # -- instances -------------------------------------------------------------
    @property
    def ids(self) -> Strings:
        """Element ids, in store order."""
        return self._strings(_S["ids"])

    def _strings(self, name: str) -> Strings:
        return Strings(self._reader, name, f"{self.path}, section '{name}'")

    @property
    def labels(self) -> np.ndarray:
        """int32 labels (N,), -1 where unlabelled: a view of the mapping (not
        guarded once handed out: see docs/threat-model.md)."""
        return self._reader.section(_S["labels"])

    def _copy_section(self, name: str) -> np.ndarray:
        """A read-only copy of a whole section, made by the C++ core under the
        SIGBUS guard: OSError naming the file if it was truncated."""
        view = self._reader.section(name)  # dtype and shape; no byte is read
        raw = self._reader.read_bytes(name, 0, view.nbytes)
        return np.frombuffer(raw, dtype=view.dtype).reshape(view.shape)

    def _guarded_labels(self) -> np.ndarray:
        """The labels as a guarded copy (N * 4 bytes), made once per Store and
        kept (labels never change): what the Loader and StoreDataset index, so
        a file truncated while they run raises OSError instead of SIGBUS."""
        if self._labels_copy is None:
            self._labels_copy = self._copy_section(_S["labels"])
        return self._labels_copy

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

    @functools.cached_property
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

    @functools.cached_property
    def classes(self) -> Classes | None:
        """The label hierarchy, or None when no categories file was converted."""
        r = self._reader
        if r.num_classes is None:
            return None
        label, glabel, set_ = (r.section(name) for name in _S["class_ints"])
        name, event = _S["class_strings"]
        return Classes(label=label, glabel=glabel, set=set_, event=self._strings(event), name=self._strings(name))

    @functools.cached_property
    def label_names(self) -> dict[int, str] | None:
        """{label: class name}, or None when the store has no hierarchy."""
        c = self.classes
        if c is None:
            return None
        return dict(zip(c.label.tolist(), c.name.to_list()))

    @property
    def label_space(self) -> LabelSpace:
        """The classes the labels refer to (docs/converting.md, "Label spaces"): subset
        (gym99/gym288/gym530 when recognised), class count and hierarchy
        fingerprint, computed from the stored hierarchy when there is one,
        else as recorded at write time (else from the labels)."""
        c = self.classes
        if c is not None:
            return labelspace.of_categories(c)
        recorded = LabelSpace.from_dict(self.attrs.get("label_space"))
        if recorded is not None and recorded.fingerprint is None:
            return recorded
        return labelspace.of_labels(np.asarray(self.labels), os.path.basename(self.path))

    def select(self, rows_or_ids: Any, out: str | os.PathLike[str], *, overwrite: bool = False) -> Store:
        """Write the instances ``rows_or_ids`` (row positions: ints, a slice or
        a range; or element ids: strs), in that order, into a new store at
        ``out`` with every column, the hierarchy and the provenance (attrs
        gains ``selected_from``), atomically; returns it opened. Duplicates,
        unknown ids, out-of-range rows, an empty selection and ``out`` being
        this store are refused."""
        from .select import select

        return select(self, rows_or_ids, out, overwrite=overwrite)

    @functools.cached_property
    def attrs(self) -> dict[str, Any]:
        """Provenance recorded at conversion (sources, dtypes, tool version).
        Read once (the store is immutable): the same dict on every access."""
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
            return self.column(column)[_args.integer(index)]  # type: ignore[return-value]
        return self._reader.features(column, _args.integer(index))

    def stats(self, column: str) -> ColumnStats:
        """Per-channel mean and standard deviation of ``column`` over every
        stored row (:class:`finegym_store.stats.ColumnStats`; copies, read and
        checked at open). A store written with another store's statistics
        (``add_stats(..., stats_from=TRAIN)``) gives those, with that store's
        row count; ``attrs["stats_from"]`` names it. ValueError for a store of
        format version 1 or 2, which holds none, saying how to add them
        (``finegym-store stats``)."""
        self.column(column)  # KeyError naming the columns
        pair = self._reader.stats(column)
        if pair is None:
            raise ValueError(missing_message(self, column))
        col = self.column(column)
        count = len(self) * col.length if col.length is not None else int(col.offsets[-1])  # type: ignore[index]
        given = self.attrs.get("stats_from")
        counts = given.get("counts") if isinstance(given, dict) else None
        if isinstance(counts, dict) and type(counts.get(column)) is int and counts[column] >= 0:
            count = counts[column]
        return ColumnStats(pair[0], pair[1], count)

    def _copy_features(self, column: str, index: int, dtype: Any = None) -> np.ndarray:
        """A writeable (T_i, C) copy of instance ``index`` (valid, >= 0) of
        ``column``, in ``dtype`` (None: the column's), read by the C++ core
        under the SIGBUS guard (OSError naming the file if it was truncated)."""
        col = self.column(column)
        self._ensure_rows(column, np.array([index], dtype=np.int64))
        row = col.channels * col.dtype.itemsize
        if col.ragged:
            offsets = col.offsets
            first, end = int(offsets[index]), int(offsets[index + 1])  # type: ignore[index]
        else:
            first, end = index * int(col.length), (index + 1) * int(col.length)  # type: ignore[arg-type]
        raw = self._reader.read_bytes(_S["feature_prefix"] + column, first * row, end * row)
        return np.frombuffer(raw, dtype=col.dtype).reshape(end - first, col.channels).astype(dtype or col.dtype)

    def _columns_of(self, columns: Any) -> tuple[str, ...]:
        """The column names of a multi-column gather, checked: a non-empty
        list or tuple of distinct names of this store's columns, whose
        instances have equal T in every column (one segment draw serves
        them all). TypeError, ValueError or KeyError naming the mistake."""
        if not isinstance(columns, (list, tuple)):
            raise TypeError(f"column must be a str or a list or tuple of str (several columns), "
                            f"got {type(columns).__name__}")
        names = tuple(columns)
        for j, name in enumerate(names):
            if type(name) is not str:
                raise TypeError(f"column: entry {j} must be a str (a column name), got {type(name).__name__} "
                                f"{name!r}"[:300])
        if names in self._equal_t:
            return names
        if not names:
            raise ValueError("column: an empty list names no column; pass a column name or a list of them "
                             f"(columns: {', '.join(self._columns)})")
        seen: dict[str, int] = {}
        for j, name in enumerate(names):
            if name in seen:
                raise ValueError(f"column: {name!r} appears twice in the list (positions {seen[name]} and {j}); "
                                 "each column can be gathered once")
            seen[name] = j
            self.column(name)  # KeyError naming the columns
        for other in names[1:]:
            self._check_equal_t(names[0], other)
        if len(self._equal_t) >= 64:
            self._equal_t.clear()
        self._equal_t.add(names)
        return names

    def _check_equal_t(self, a: str, b: str) -> None:
        """ValueError unless every instance has the same T in columns a and b."""
        ca, cb = self._columns[a], self._columns[b]
        if len(self) == 0 or (not ca.ragged and not cb.ragged and ca.length == cb.length):
            return
        # Offsets are the reader's copies, validated at open: no byte of the mapping is read.
        la, lb = ca.lengths(), cb.lengths()
        differ = np.flatnonzero(la != lb)
        if len(differ) == 0:
            return
        i = int(differ[0])

        def t(col: Column, lengths: np.ndarray) -> str:
            return f"T = {col.length} (every instance)" if not col.ragged else f"T = {int(lengths[i])}"

        raise ValueError(f"columns {a!r} ({t(ca, la)}) and {b!r} ({t(cb, lb)}) differ in T at instance {i} "
                         f"(id {self.ids[i]!r}) in {self.path}: a gather of several columns takes one segment "
                         "draw per instance, which needs equal T in every column; gather them in separate calls")

    def _output_dtype(self, names: Sequence[str], spec: SegmentSpec) -> np.dtype:
        """The one dtype a concatenated gather of ``names`` has: spec.dtype,
        or the columns' shared dtype (ValueError naming them otherwise)."""
        if spec.dtype is not None:
            return np.dtype(spec.dtype)
        dtypes = {name: self._columns[name].dtype for name in names}
        if len(set(dtypes.values())) > 1:
            listing = ", ".join(f"{name!r} {dt.name}" for name, dt in dtypes.items())
            raise ValueError(f"concat=True needs one output dtype, but the columns are stored as {listing}; "
                             'pass dtype="float32" (or "float16") to convert them all')
        return dtypes[names[0]]

    def _concat_layout(self, names: Sequence[str], spec: SegmentSpec) -> tuple[int, list[tuple[str, int, int]], np.dtype]:
        """Rows per instance, (column, first channel, end channel) of each
        column and the dtype of a concatenated gather of ``names``."""
        dtype = self._output_dtype(names, spec)
        if spec.num_segments is None:
            for name in names:  # the core's error for a ragged column
                if self._columns[name].ragged:
                    _core.gather(self._reader, name, np.zeros(0, np.int64), spec._native, 0, None, 1, "off")
            rows = int(self._columns[names[0]].length)  # type: ignore[arg-type]
        else:
            rows = int(spec.rows)  # type: ignore[arg-type]
        slices, at = [], 0
        for name in names:
            c = self._columns[name].channels
            slices.append((name, at, at + c))
            at += c
        return rows, slices, dtype

    # -- batches -----------------------------------------------------------------
    @staticmethod
    def _threads(threads: int | None) -> int:
        """Threads for a gather: the cores available by default; at most
        ``_core.max_threads()`` (the machine's cores) are used in any case."""
        if threads is None:
            n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else _core.default_threads()
        else:
            n = _args.count(threads, "threads", 1)
        return max(1, min(n, _core.max_threads()))

    @overload
    def gather(self, column: str, indices: Any, *, spec: SegmentSpec | None = None, epoch: int = 0,
               out: np.ndarray | None = None, threads: int | None = None, readahead: str = "auto",
               concat: bool = False, **spec_keywords: Any) -> np.ndarray: ...
    @overload
    def gather(self, column: Sequence[str], indices: Any, *, spec: SegmentSpec | None = None, epoch: int = 0,
               out: np.ndarray | dict[str, np.ndarray] | None = None, threads: int | None = None,
               readahead: str = "auto", concat: bool = False,
               **spec_keywords: Any) -> np.ndarray | dict[str, np.ndarray]: ...
    def gather(
        self,
        column: str | Sequence[str],
        indices: Any,
        *,
        spec: SegmentSpec | None = None,
        epoch: int = 0,
        out: np.ndarray | dict[str, np.ndarray] | None = None,
        threads: int | None = None,
        readahead: str = "auto",
        concat: bool = False,
        **spec_keywords: Any,
    ) -> np.ndarray | dict[str, np.ndarray]:
        """Gather a batch: (B, rows, C) from instances ``indices``.

        ``spec`` (a :class:`SegmentSpec`) says which segments each instance
        contributes (K clips of clip_len segments, or all T) and the output
        dtype; its fields may be passed as keywords instead
        (``num_segments=3, mode="test"``), not both. Train-mode segments are
        keyed by (spec.seed, ``epoch``, instance, clip), so independent of
        threads and batch composition. ``out`` is filled and returned
        without allocating. The work runs on ``threads`` C++ threads
        (default: the cores available; at most the machine's cores) with the
        GIL released; ``readahead`` ("auto", "on", "off") is when to ask the
        kernel to read a batch's rows ahead of the copy
        (docs/loading.md). IndexError names an out-of-range index; TypeError a
        non-integer one (bools and floats included).

        Several columns: ``column`` a list or tuple of distinct names gives
        a dict {name: (B, rows, C_i) array} in that order, with one draw of
        segments for all of them (every instance must have the same T in
        each column: ValueError naming the first that does not), or with
        ``concat=True`` one (B, rows, sum C_i) array, the columns' channels
        side by side in that order (one output dtype: ``spec.dtype`` or the
        columns' shared one). ``out`` is then a dict of arrays with the same
        keys, or the one concatenated array (C-contiguous). A str is always
        one column (``concat`` changes nothing)."""
        if spec_keywords or type(spec) is not SegmentSpec:
            spec = resolve(spec, spec_keywords, "gather()")
        idx = _args.indices(indices, len(self))
        if isinstance(column, str):
            if concat is not False:
                _args.flag(concat, "concat")
            self._ensure_rows(column, idx)
            return _core.gather(self._reader, column, idx, spec._native,
                                _args.count(epoch, "epoch"), out, self._threads(threads),
                                _args.choice(readahead, "readahead", READAHEAD))
        names = self._columns_of(column)
        concat = _args.flag(concat, "concat")
        epoch = _args.count(epoch, "epoch")
        threads = self._threads(threads)
        readahead = _args.choice(readahead, "readahead", READAHEAD)
        if concat:
            rows, slices, dtype = self._concat_layout(names, spec)
            shape = (len(idx), rows, slices[-1][2])
            if out is None:
                out = np.empty(shape, dtype=dtype)
            elif not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype
                      and out.flags.c_contiguous and out.flags.writeable):
                got = (f"{out.dtype} {out.shape}" + ("" if out.flags.c_contiguous else ", not C-contiguous")
                       + ("" if out.flags.writeable else ", read-only")) if isinstance(out, np.ndarray) \
                    else type(out).__name__
                raise ValueError(f"out must be a writeable C-contiguous {dtype} array of shape {shape} (concat=True "
                                 f"of columns {', '.join(names)}), got {got}")
            for name, first, end in slices:
                self._ensure_rows(name, idx)
                _core.gather(self._reader, name, idx, spec._native, epoch, out[:, :, first:end], threads, readahead)
            return out
        if out is not None:
            if not isinstance(out, dict):
                raise TypeError(f"out must be a dict of arrays keyed by column ({', '.join(names)}) for a gather "
                                f"of several columns, got {type(out).__name__}")
            if set(out) != set(names):
                raise ValueError(f"out must have one array per column gathered: keys {list(names)}, got "
                                 f"{list(out)}"[:500])
        result = {}
        for name in names:
            self._ensure_rows(name, idx)
            result[name] = _core.gather(self._reader, name, idx, spec._native, epoch,
                                        None if out is None else out[name], threads, readahead)
        return result

    def loader(
        self,
        column: str | Sequence[str],
        batch_size: int,
        *,
        spec: SegmentSpec | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        threads: int | None = None,
        sampler: str = "uniform",
        reuse_buffers: bool = False,
        concat: bool = False,
        **spec_keywords: Any,
    ) -> Loader:
        """Batches for a training loop; see docs/loading.md, "Loader". Iterating yields
        :class:`Batch` (features, labels, indices); each new iteration is the
        next epoch (``set_epoch`` sets it). ``spec`` (or its fields as
        keywords) as in :meth:`gather`; its ``seed`` keys both the epoch
        orders and the train-mode segments. ``rank``/``world_size`` shard
        like torch's DistributedSampler; ``sampler="balanced"`` draws classes
        uniformly. ``prefetch`` batches are gathered ahead on persistent C++
        threads. A yielded batch is the caller's; ``reuse_buffers=True``
        recycles its array once the next batch is requested.
        ``state_dict()`` / ``load_state_dict()`` resume mid-epoch.
        ``column`` may be a list of columns (with ``concat``) as in
        :meth:`gather`: features are then a dict of arrays, or one
        concatenated array, gathered with one draw of segments."""
        return Loader(self, column, batch_size, spec=resolve(spec, spec_keywords, "loader()"), shuffle=shuffle,
                      drop_last=drop_last, rank=rank, world_size=world_size, prefetch=prefetch, threads=threads,
                      sampler=sampler, reuse_buffers=reuse_buffers, concat=concat)

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
    def to_arrow(self, columns: Sequence[str] | str | None = None, *, tensor_type: str = "nested",
                 dtype: str | None = None) -> Any:
        """A pyarrow.Table over the mapped bytes, no copy: id, label, the
        parsed id fields and one column per feature column (``columns``
        selects and orders any of them). Fixed-T features are
        fixed_size_list<fixed_size_list<value, C>, T> (``tensor_type=
        "fixed_shape_tensor"``: the arrow.fixed_shape_tensor extension);
        ragged ones large_list<fixed_size_list<value, C>>. The schema metadata
        holds what rebuilds the store (docs/arrow.md). ``dtype="float32"``
        exports float16 columns as float32 (for readers without half
        floats: DuckDB, Spark); such a column is then an upcast copy in
        memory (2x its stored size), not a view of the mapping."""
        from . import arrow

        return arrow.to_arrow(self, columns, tensor_type, dtype)

    def to_batches(self, columns: Sequence[str] | str | None = None, *, batch_size: int | None = None,
                   tensor_type: str = "nested", dtype: str | None = None) -> Any:
        """A pyarrow.RecordBatchReader of ``batch_size``-row batches (default:
        about 128 MiB of features), each copied out of the mapping under the
        SIGBUS guard as it is read (a store truncated meanwhile raises
        OSError naming it). ``to_arrow().to_reader()`` gives zero-copy,
        unguarded slices instead. ``dtype="float32"`` upcasts float16
        columns in each batch (DuckDB's Arrow scan reads no half floats)."""
        from . import arrow

        return arrow.to_batches(self, batch_size, columns, tensor_type, dtype)

    def to_parquet(self, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None, *,
                   row_group_size: int | None = None, compression: str | None = "none", byte_stream_split: bool = False,
                   compression_level: int | None = None, tensor_type: str = "nested",
                   progress: bool = False, overwrite: bool = False,
                   storage_options: dict[str, Any] | None = None, dtype: str | None = None) -> str:
        """Write a Parquet file one row group at a time (memory: one row
        group; default about 128 MiB of features), atomically. No dictionary
        pages for floats; ``byte_stream_split=True`` with
        ``compression="zstd"`` shrinks float data. Each row group is copied
        out of the mapping under the SIGBUS guard: a store truncated
        meanwhile raises OSError naming it and leaves nothing at ``path``.
        FileExistsError if ``path`` exists unless ``overwrite``; ValueError,
        even with it, if ``path`` is not a regular file (a directory, FIFO,
        device, or a symlink to one) or is this store's own file. ``path``
        may be an ``s3://`` URL: written locally, then uploaded in one
        atomic put (``storage_options`` as for :func:`open`), an existing
        object refused unless ``overwrite``. ``dtype="float32"`` writes
        float16 columns upcast (Spark reads no FLOAT16 Parquet column).
        Returns the path."""
        from . import arrow

        return arrow.to_parquet(self, path, columns, row_group_size, compression, byte_stream_split,
                                compression_level, tensor_type, progress, overwrite, storage_options, dtype)

    def classes_table(self) -> Any:
        """The label hierarchy as a pyarrow.Table (label, glabel, set, event,
        name), or None when the store has none."""
        from . import arrow

        return arrow.classes_table(self)

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        """Arrow PyCapsule stream of the whole store (polars.DataFrame(store),
        duckdb, pyarrow.RecordBatchReader.from_stream(store)): the batches of
        :meth:`to_batches`, copied out of the mapping under the SIGBUS guard,
        so a store truncated while a consumer reads fails the read with the
        OSError's message (naming the file) instead of killing the process."""
        return self.to_batches().__arrow_c_stream__(requested_schema)

    def __arrow_c_schema__(self) -> Any:
        from . import arrow

        return arrow.arrow_schema(self).__arrow_c_schema__()


class _UnopenedStore(Store):
    """What unpickling a Store gives when its file cannot be reopened in the
    receiving process: any use raises the error, naming the path."""

    _ALLOWED = frozenset({"__class__", "__dict__", "__reduce__", "__reduce_ex__", "__repr__", "_abspath", "_error",
                          "_raise", "__getstate__", "__setstate__"})

    def __init__(self, path: str, error: BaseException) -> None:
        object.__setattr__(self, "_abspath", path)
        object.__setattr__(self, "_error", error)

    def __getattribute__(self, name: str) -> Any:
        if name in _UnopenedStore._ALLOWED:
            return object.__getattribute__(self, name)
        object.__getattribute__(self, "_raise")()

    def _raise(self) -> NoReturn:
        raise _reopen_error(object.__getattribute__(self, "_abspath"), object.__getattribute__(self, "_error"))

    def __len__(self) -> int:
        self._raise()

    def __repr__(self) -> str:
        return f"<Store {self._abspath!r}: could not reopen in this process ({self._error})>"


def _reopen_error(path: str, error: BaseException) -> BaseException:
    what = f"could not reopen the store '{path}' in this process"
    if isinstance(error, OSError) and error.errno is not None:
        out: BaseException = type(error)(error.errno, f"{what}: {error.strerror}", path)
    else:
        try:
            out = type(error)(f"{what}: {error}")
        except Exception:  # an exception type that takes other arguments
            out = RuntimeError(f"{what}: {type(error).__name__}: {error}")
    out.__cause__ = error
    return out


def _reopen(path: str) -> Store:
    """Unpickles a Store: the store reopened, or, when that fails, a Store
    that raises the error at first use (never raises itself)."""
    try:
        return Store(path)
    except Exception as e:
        return _UnopenedStore(path, e)


def _reopen_remote(url: str, storage_options: dict[str, Any] | None, cache_dir: str) -> Store:
    """Unpickles a remote Store, never raising (as _reopen)."""
    try:
        return _open_remote(url, storage_options, cache_dir)
    except Exception as e:
        unopened = _UnopenedStore(url, e)
        object.__setattr__(unopened, "_remote_args", (url, storage_options, cache_dir))
        return unopened


def open(path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,  # noqa: A001
         cache_dir: str | os.PathLike[str] | None = None) -> Store:
    """Open a store read-only. The file is mapped, not read: opening reads the
    header, section table, padding and the int64 offsets arrays (8 bytes per
    instance per string or ragged column), never feature bytes. Raises
    FormatError for a damaged or foreign file and OSError
    (FileNotFoundError, ...) when it cannot be opened or read.

    ``path`` may be a URL: ``s3://BUCKET/KEY``, ``https://...``,
    ``http://...`` (a remote store, docs/remote.md: needs the
    ``remote`` extra) or ``file://PATH``. A remote store fetches its
    non-feature bytes at open and feature rows on first use into a cache
    under ``cache_dir`` (default ``$XDG_CACHE_HOME/finegym-store/remote``);
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
