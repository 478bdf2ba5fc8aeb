"""Feature tables that live on disk one instance at a time: a folder of
per-instance ``<id>.npy`` files, and HDF5 files (one dataset per instance,
or one (N, C) / (N, T, C) array plus a dataset of N ids).

Each is a read-only ``Mapping[str, np.ndarray]`` that :func:`convert` takes
like an in-memory dict, with the same checks, except that nothing is held in
memory: :meth:`LazyTable.header` gives an instance's dtype and shape from its
header alone, and ``table[id]`` reads that one instance. The input is
untrusted: .npy headers are parsed without pickles (object arrays are
refused), every file's size must match what its header claims, FIFOs,
sockets, devices and unreadable entries are refused unopened, each with a
ConversionError naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .errors import ConversionError

__all__ = ["HDF5_SUFFIXES", "HDF5File", "HDF5Source", "Header", "LazyTable", "NpyFolder", "open_source"]

#: File name endings of HDF5 feature files.
HDF5_SUFFIXES = (".h5", ".hdf5", ".he5")
#: Largest .npy header read (numpy's own default limit).
MAX_HEADER = 10_000


class Header(NamedTuple):
    """What an instance is, before it is read."""

    dtype: np.dtype
    shape: tuple[int, ...]


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class LazyTable(Mapping[str, np.ndarray]):
    """A read-only {id: array} whose values are read on access."""

    where: str

    def header(self, key: str) -> Header:
        raise NotImplementedError

    def where_of(self, key: str) -> str:
        """The file (and dataset) holding ``key``, for messages."""
        return self.where

    def close(self) -> None:
        pass


# -- a folder of <id>.npy files ------------------------------------------------------------
@dataclass
class _NpyHeader:
    header: Header
    fortran: bool
    data_offset: int
    size: int


class NpyFolder(LazyTable):
    """The ``<id>.npy`` files of a folder (not its subfolders; names
    starting with '.' skipped). Anything else in it is a ConversionError
    naming the entry: a file not ending in .npy, a subfolder, a FIFO, a
    dangling link or a link loop, a name that is not UTF-8."""

    def __init__(self, path: str) -> None:
        self.where = path
        self._files: dict[str, str] = {}
        self._headers: dict[str, _NpyHeader] = {}
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise ConversionError(f"{path}: the folder cannot be listed ({e.strerror})") from None
        for name in names:
            if name.startswith("."):
                continue
            f = os.path.join(path, name)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise ConversionError(f"{f!r}: the file name is not valid UTF-8; an element id is the name of "
                                      "its .npy file, without '.npy'") from None
            try:
                mode = os.stat(f).st_mode
            except OSError as e:
                why = "a link loop" if e.errno == errno.ELOOP else e.strerror
                raise ConversionError(f"{f}: cannot be read ({why})") from None
            if not name.endswith(".npy"):
                raise ConversionError(f"{f}: not a .npy file; a feature folder holds only <id>.npy files")
            if not stat.S_ISREG(mode):
                raise ConversionError(f"{f}: {_kind(mode)}, not a .npy file")
            key = name[: -len(".npy")]
            if not key:
                raise ConversionError(f"{f}: an empty element id (the file is named '.npy')")
            self._files[key] = f
        if not self._files:
            raise ConversionError(f"{path}: the folder holds no .npy files")

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def where_of(self, key: str) -> str:
        return self._files[key]

    def _open(self, f: str) -> Any:
        try:
            fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ConversionError(f"{f}: cannot be read ({e.strerror})") from None
        file = os.fdopen(fd, "rb")
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            file.close()
            raise ConversionError(f"{f}: {_kind(mode)}, not a .npy file")
        return file

    def _read_header(self, f: str, file: Any) -> _NpyHeader:
        fmt = np.lib.format
        try:
            version = fmt.read_magic(file)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(file, max_header_size=MAX_HEADER)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(file, max_header_size=MAX_HEADER)
            else:
                raise ValueError(f"format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
        except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
            raise ConversionError(f"{f}: not a readable .npy file ({_one_line(e)[:200]})") from None
        if dtype.hasobject or dtype.kind != "f":
            what = "Python objects (a pickle)" if dtype.hasobject else f"dtype {dtype}"
            raise ConversionError(f"{f}: holds {what}; expected a floating-point array")
        count = 1
        for d in shape:
            count *= int(d)
        offset = file.tell()
        size = os.fstat(file.fileno()).st_size
        expected = offset + count * dtype.itemsize
        if size != expected:
            raise ConversionError(f"{f}: the header claims shape {shape} of {dtype} ({expected} bytes with the "
                                  f"header), but the file holds {size} bytes"
                                  + (" (truncated?)" if size < expected else ""))
        return _NpyHeader(Header(dtype, tuple(int(d) for d in shape)), bool(fortran), offset, size)

    def header(self, key: str) -> Header:
        h = self._headers.get(key)
        if h is None:
            f = self._files[key]
            with self._open(f) as file:
                h = self._headers[key] = self._read_header(f, file)
        return h.header

    def __getitem__(self, key: str) -> np.ndarray:
        f = self._files[key]
        with self._open(f) as file:
            h = self._read_header(f, file)
            known = self._headers.get(key)
            if known is not None and known != h:
                raise ConversionError(f"{f}: the file changed while it was converted; convert again")
            dtype, shape = h.header
            buf = np.empty(h.size - h.data_offset, np.uint8)
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                n = file.readinto(view[got:])
                if not n:
                    raise ConversionError(f"{f}: the file ended after {h.data_offset + got} of {h.size} bytes "
                                          "(it changed while it was converted)")
                got += n
        return buf.view(dtype).reshape(shape, order="F" if h.fortran else "C")


# -- HDF5 -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HDF5Source:
    """An HDF5 feature file, with the datasets to read named: ``features``
    (an (N, C) or (N, T, C) float array) and ``ids`` (N strings), for files
    where they cannot be told apart automatically. Either may be given
    alone. ``convert({"i3d": HDF5Source("f.h5", features="x", ids="names")}, out)``."""

    path: str | os.PathLike[str]
    features: str | None = None
    ids: str | None = None


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ImportError('reading HDF5 files needs h5py: pip install "finegym-store[hdf5]"') from None
    return h5py


def _is_text(dtype: np.dtype) -> bool:
    return dtype.kind in "SUO"


class HDF5File(LazyTable):
    """An HDF5 feature file. Its layout is told from the datasets at its root:

    * one (N, C) or (N, T, C, 1..1) float dataset and one 1-D dataset of N
      strings: instance i is row i of the first, its id entry i of the second;
    * otherwise every root dataset is one instance, its name the id.

    ``features`` / ``ids`` name the two datasets of the first layout when the
    root holds more (a ConversionError lists them when it is ambiguous)."""

    def __init__(self, path: str, features: str | None = None, ids: str | None = None) -> None:
        h5py = _h5py()
        self.where = path
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        if not stat.S_ISREG(mode):
            raise ConversionError(f"{path}: {_kind(mode)}, not an HDF5 file")
        try:
            self._file = h5py.File(path, "r")
        except Exception as e:  # OSError for a file that is not HDF5, or damaged
            raise ConversionError(f"{path}: not a readable HDF5 file ({_one_line(e)[:200]})") from None
        try:
            self._init(features, ids)
        except ConversionError:
            self._file.close()
            raise
        except Exception as e:  # h5py raises ValueError, OSError, ... for metadata it cannot map to numpy
            self._file.close()
            raise ConversionError(f"{path}: unreadable HDF5 metadata ({_one_line(e)[:200]})") from None
        except BaseException:
            self._file.close()
            raise

    def _dataset(self, name: str) -> Any:
        h5py = _h5py()
        try:
            obj = self._file.get(name)
        except Exception as e:
            raise ConversionError(f"{self.where}: {name!r}: unreadable ({_one_line(e)[:200]})") from None
        if obj is None:
            raise ConversionError(f"{self.where}: no dataset {name!r}; the root holds "
                                  f"{', '.join(map(repr, self._names)) or 'nothing'}")
        if not isinstance(obj, h5py.Dataset):
            raise ConversionError(f"{self.where}: {name!r} is a group, not a dataset")
        return obj

    def _init(self, features: str | None, ids: str | None) -> None:
        try:
            self._names = sorted(self._file.keys())
        except Exception as e:
            raise ConversionError(f"{self.where}: the root group cannot be listed ({_one_line(e)[:200]})") from None
        if not self._names:
            raise ConversionError(f"{self.where}: the file holds no datasets")
        datasets = {n: self._dataset(n) for n in self._names}
        text = [n for n, d in datasets.items() if d.ndim == 1 and _is_text(d.dtype)]
        arrays = [n for n, d in datasets.items() if d.ndim >= 2 and d.dtype.kind == "f"]
        if features is None and ids is None:
            pairs = [(f, i) for f in arrays for i in text if datasets[f].shape[0] == datasets[i].shape[0]]
            if len(pairs) > 1 or (pairs and len(datasets) > 2):
                found = ", ".join(f"{n!r} {datasets[n].shape} {datasets[n].dtype}" for n in self._names[:10])
                raise ConversionError(f"{self.where}: which datasets hold the features and the ids is ambiguous "
                                      f"({found}); name them: HDF5Source(path, features=..., ids=...) "
                                      "(--h5-features, --h5-ids)")
            if pairs:
                features, ids = pairs[0]
        elif features is None or ids is None:
            candidates = [n for n in (arrays if features is None else text) if n not in (features, ids)
                          and (datasets[n].shape[0] == datasets[features or ids].shape[0])]
            if len(candidates) != 1:
                missing = "features" if features is None else "ids"
                raise ConversionError(f"{self.where}: name the {missing} dataset too ({len(candidates)} datasets "
                                      f"could be it: {', '.join(map(repr, candidates[:10]))})")
            features, ids = (candidates[0], ids) if features is None else (features, candidates[0])
        if features is not None and ids is not None:
            self._array_layout(datasets, features, ids)
        else:
            self._ids = None
            self._keys = self._names
            self._names_set = set(self._names)

    def _array_layout(self, datasets: dict[str, Any], features: str, ids: str) -> None:
        feats, names = self._dataset(features), self._dataset(ids)
        here = f"{self.where}: dataset {ids!r}"
        if names.ndim != 1 or not _is_text(names.dtype):
            raise ConversionError(f"{here}: expected a 1-D dataset of strings (the ids), got shape {names.shape} "
                                  f"{names.dtype}")
        fhere = f"{self.where}: dataset {features!r}"
        if feats.dtype.kind != "f":
            raise ConversionError(f"{fhere}: expected a floating-point array, got dtype {feats.dtype}")
        if feats.ndim < 2 or feats.shape[0] != names.shape[0]:
            raise ConversionError(f"{fhere}: expected shape (N, C) or (N, T, C) with N = {names.shape[0]} "
                                  f"(the ids in {ids!r}), got {feats.shape}")
        try:
            raw = names[()]
        except Exception as e:
            raise ConversionError(f"{here}: unreadable ({_one_line(e)[:200]})") from None
        keys: list[str] = []
        seen: dict[str, int] = {}
        for j, v in enumerate(raw):
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    raise ConversionError(f"{here}: row {j}: id {v[:40]!r} is not valid UTF-8") from None
            v = str(v)
            if not v:
                raise ConversionError(f"{here}: row {j}: an empty id")
            first = seen.setdefault(v, j)
            if first != j:
                raise ConversionError(f"{here}: row {j}: id {v[:80]!r} is a duplicate (first in row {first})")
            keys.append(v)
        self._features, self._ids, self._keys = feats, seen, keys
        self.where_features = fhere

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in (self._ids if self._ids is not None else self._names_set)

    def where_of(self, key: str) -> str:
        return f"{self.where}: dataset {key!r}" if self._ids is None else self.where_features

    def header(self, key: str) -> Header:
        if self._ids is not None:
            return Header(self._features.dtype, tuple(self._features.shape[1:]))
        d = self._dataset(key)
        try:
            return Header(d.dtype, tuple(d.shape))
        except Exception as e:
            raise ConversionError(f"{self.where_of(key)}: unreadable HDF5 metadata ({_one_line(e)[:200]})") from None

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            if self._ids is not None:
                return np.asarray(self._features[self._ids[key]])
            value = self._dataset(key)[()]
        except ConversionError:
            raise
        except KeyError:
            raise
        except Exception as e:  # a damaged chunk, a filter h5py lacks
            raise ConversionError(f"{self.where_of(key)}: unreadable ({_one_line(e)[:200]})") from None
        return np.asarray(value)

    def close(self) -> None:
        self._file.close()


def open_source(source: Any) -> LazyTable | None:
    """The lazy table a feature source names (a folder: .npy files; a path
    ending in .h5/.hdf5: HDF5; an :class:`HDF5Source`), or None for anything
    else (a pickle path, a dict)."""
    if isinstance(source, HDF5Source):
        return HDF5File(os.fspath(source.path), source.features, source.ids)
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if os.path.isdir(path):
        return NpyFolder(path)
    if path.lower().endswith(HDF5_SUFFIXES):
        return HDF5File(path)
    return None
