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

__all__ = ["Store", "Column", "Strings", "Meta", "Classes", "open"]


class Strings(Sequence[str]):
    """A read-only sequence of str over an Arrow large_utf8 pair of sections
    (int64 offsets + UTF-8 bytes). Decodes on access; nothing is copied up front."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray) -> None:
        self._offsets = offsets
        self._data = data

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
        return self._data[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_list())

    def to_list(self) -> list[str]:
        """All strings at once (one decode of the whole data buffer)."""
        text = self._data.tobytes()
        o = self._offsets.tolist()
        return [text[o[i] : o[i + 1]].decode("utf-8") for i in range(len(o) - 1)]

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

    def __init__(self, store: Store, name: str, dtype: str, segments: int | None, channels: int) -> None:
        self._store = store
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
        return (len(self._store), self.segments, self.channels)

    @property
    def values(self) -> np.ndarray:
        """The whole column buffer: (N, T, C), or (total rows, C) when ragged."""
        return self._store._reader.section(f"features/{self.name}")

    @property
    def offsets(self) -> np.ndarray | None:
        """Row offsets (N + 1,) of a ragged column; None when fixed."""
        if not self.ragged:
            return None
        return self._store._reader.section(f"features/{self.name}/offsets")

    def lengths(self) -> np.ndarray:
        """T_i of every instance, as int64."""
        if self.ragged:
            return np.diff(self.offsets)  # type: ignore[arg-type]
        return np.full(len(self), self.segments, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, index: Any) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, (int, np.integer)):
            return self._store._reader.features(self.name, int(index))
        if self.ragged:
            if isinstance(index, slice):
                index = range(*index.indices(len(self)))
            return [self._store._reader.features(self.name, int(i)) for i in np.asarray(index).ravel()]
        return self.values[index]

    def __repr__(self) -> str:
        t = "T" if self.ragged else self.segments
        return f"<Column {self.name!r} {self.dtype} ({len(self)}, {t}, {self.channels})>"


class Store:
    """A finegym-store file, memory-mapped. Open with :func:`finegym_store.open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._reader = _core.Reader(os.fspath(path))
        self._columns = {
            name: Column(self, name, dtype, t, c) for name, dtype, t, c in self._reader.columns()
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
        # Crosses process boundaries by path: the receiver maps the file itself.
        return (Store, (self.path,))

    # -- instances -------------------------------------------------------------
    @property
    def ids(self) -> Strings:
        """Element ids, in store order."""
        return Strings(self._reader.section("ids/offsets"), self._reader.section("ids/data"))

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
            video=Strings(r.section("meta/video/offsets"), r.section("meta/video/data")),
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
            event=Strings(r.section("classes/event/offsets"), r.section("classes/event/data")),
            name=Strings(r.section("classes/name/offsets"), r.section("classes/name/data")),
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
