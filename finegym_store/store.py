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


class Strings(Sequence[str]):
    """A read-only sequence of str over an Arrow large_utf8 pair of sections
    (int64 offsets + UTF-8 bytes). Decodes on access; nothing is copied up front."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray, where: str = "string column") -> None:
        self._offsets = offsets
        self._data = data
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
        return self._decode(self._data[self._offsets[i] : self._offsets[i + 1]].tobytes())

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self._where}: string bytes are not valid UTF-8 ({e.reason}); "
                              "the store is damaged (run `finegym-store verify`)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_list())

    def to_list(self) -> list[str]:
        """All strings at once (one decode of the whole data buffer)."""
        text = self._data.tobytes()
        o = self._offsets.tolist()
        return [self._decode(text[o[i] : o[i + 1]]) for i in range(len(o) - 1)]

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def data(self) -> np.ndarray:
        return self._data

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

    def __init__(self, reader: _core.Reader, name: str, dtype: str, segments: int | None, channels: int) -> None:
        # The reader, not the Store: no reference cycle, so dropping the last
        # reference to a Store unmaps the file at once (not at the next GC).
        self._reader = reader
        self.name = name
        self.dtype = np.dtype(dtype)
        self.segments = segments
        self.channels = channels

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
        """The whole column buffer: (N, T, C), or (total rows, C) when ragged."""
        return self._reader.section(f"features/{self.name}")

    @property
    def offsets(self) -> np.ndarray | None:
        """Row offsets (N + 1,) of a ragged column; None when fixed."""
        if not self.ragged:
            return None
        return self._reader.section(f"features/{self.name}/offsets")

    def lengths(self) -> np.ndarray:
        """T_i of every instance, as int64."""
        if self.ragged:
            return np.diff(self.offsets)  # type: ignore[arg-type]
        return np.full(len(self), self.segments, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: Any) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, (int, np.integer)):
            return self._reader.features(self.name, int(index))
        if self.ragged:
            if isinstance(index, slice):
                index = range(*index.indices(len(self)))
            return [self._reader.features(self.name, int(i)) for i in np.asarray(index).ravel()]
        return self.values[index]

    def __repr__(self) -> str:
        t = "T" if self.ragged else self.segments
        return f"<Column {self.name!r} {self.dtype} ({len(self)}, {t}, {self.channels})>"


class Store:
    """A finegym-store file, memory-mapped. Open with :func:`finegym_store.open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._reader = _core.Reader(os.fspath(path))
        self._columns = {
            name: Column(self._reader, name, dtype, t, c) for name, dtype, t, c in self._reader.columns()
        }
        self._index: dict[str, int] | None = None

    # -- identity -------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._reader.path

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

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Crosses process boundaries by absolute path: the receiver maps the
        # file itself, whatever its working directory.
        return (Store, (os.path.abspath(self.path),))

    # -- instances -------------------------------------------------------------
    @property
    def ids(self) -> Strings:
        """Element ids, in store order."""
        return self._strings("ids")

    def _strings(self, name: str) -> Strings:
        r = self._reader
        return Strings(r.section(f"{name}/offsets"), r.section(f"{name}/data"), f"{self.path}, section '{name}'")

    @property
    def labels(self) -> np.ndarray:
        """int32 labels (N,), -1 where unlabelled."""
        return self._reader.section("labels")

    def index_of(self, ids: str | Iterable[str]) -> int | np.ndarray:
        """Position of one id (int) or of many (int64 array). KeyError names an
        unknown id. The lookup table is built on first use."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.ids.to_list())}
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

    @property
    def meta(self) -> Meta:
        r = self._reader
        return Meta(
            video=self._strings("meta/video"),
            event_start=r.section("meta/event_start"),
            event_end=r.section("meta/event_end"),
            element_start=r.section("meta/element_start"),
            element_end=r.section("meta/element_end"),
        )

    @property
    def classes(self) -> Classes | None:
        """The label hierarchy, or None when no categories file was converted."""
        r = self._reader
        if r.num_classes is None:
            return None
        return Classes(
            label=r.section("classes/label"),
            glabel=r.section("classes/glabel"),
            set=r.section("classes/set"),
            event=self._strings("classes/event"),
            name=self._strings("classes/name"),
        )

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
        return json.loads(self._reader.section("attrs").tobytes().decode("utf-8"))

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
        """Checksum every section; returns the names of damaged ones (empty: intact)."""
        return self._reader.verify()

    def sections(self) -> list[dict[str, Any]]:
        """The section table: name, dtype, shape, offset, length, checksum."""
        return self._reader.sections()


def open(path: str | os.PathLike[str]) -> Store:  # noqa: A001 - the natural name
    """Open a store read-only. Costs the same for any file size: the file is
    mapped, not read. Raises FormatError for a damaged or foreign file and
    OSError (FileNotFoundError, ...) when it cannot be opened."""
    return Store(path)
