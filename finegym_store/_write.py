"""Writing a store: the one path that ``convert`` and every importer take.

:class:`StoreWriter` wraps the C++ writer (``_core.Writer``). Feature columns
come first, one at a time, each through a :class:`ColumnWriter` (rows of any
float dtype are cast into one of two staging buffers while the C++ writer
hashes and writes the other with the GIL released); then :meth:`StoreWriter.finish`
writes the ids, labels, fields parsed from the ids, the label hierarchy and
the provenance JSON, and commits. The file appears under its name only at
commit: leaving the ``with`` block any other way discards it.
"""

from __future__ import annotations

import errno
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import __version__, _core, labelspace
from .errors import ConversionError
from .finegym import Categories, parse_element_id
from .labelspace import LabelSpace

__all__ = ["STAGING_BYTES", "STORE_DTYPES", "ColumnWriter", "StoreWriter", "store_dtype"]

#: Bytes staged before each write to the C++ writer. Small enough to stay in
#: the CPU caches between the copy in, the writer's XXH64 pass and write();
#: 4 MiB streamed 2 GB faster than 64 MiB did (benchmarks/README.md, "Staging
#: buffer size"). The bytes written do not depend on it.
STAGING_BYTES = 4 << 20
#: The value types a feature column can be stored as.
STORE_DTYPES = ("float32", "float16")


def store_dtype(dtype: Any, where: str) -> np.dtype:
    """``dtype`` ('float32', 'float16' or the numpy dtypes) as a numpy dtype;
    ConversionError naming ``where`` for anything else."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in STORE_DTYPES or isinstance(dtype, bool):
        raise ConversionError(f"{where}: dtype={dtype!r} is not supported; use 'float32' or 'float16'")
    return dt


class ColumnWriter:
    """Rows of one feature column, in instance order, to the C++ writer.

    :meth:`append` takes (rows, C) arrays of any float dtype (NaN and Inf
    are stored as they are; values beyond float16's range become Inf) and
    casts them into a staging buffer of :data:`STAGING_BYTES`; a full buffer
    goes to the writer on a background thread while the other one fills.
    :meth:`close` writes the rest and ends the column."""

    def __init__(self, writer: Any, io: ThreadPoolExecutor, name: str, dtype: np.dtype, length: int | None,
                 channels: int) -> None:
        self._writer, self._io = writer, io
        self.name, self.dtype, self.channels = name, dtype, channels
        writer.begin_features(name, dtype, length or 0, channels)
        cap = max(1, STAGING_BYTES // (channels * dtype.itemsize))
        self._buffers = [np.empty((cap, channels), dtype=dtype), np.empty((cap, channels), dtype=dtype)]
        self._pending: list[Future[None] | None] = [None, None]
        self._current = 0
        self._used = 0
        self.rows = 0

    def append(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.channels:
            raise ValueError(f"column {self.name!r}: rows must be (n, {self.channels}), got {rows.shape}")
        start = 0
        with np.errstate(over="ignore", invalid="ignore"):
            while start < len(rows):
                buf = self._buffers[self._current]
                take = min(len(rows) - start, len(buf) - self._used)
                np.copyto(buf[self._used : self._used + take], rows[start : start + take], casting="same_kind")
                self._used += take
                start += take
                if self._used == len(buf):
                    self._submit()
        self.rows += len(rows)

    def _submit(self) -> None:
        k = self._current
        self._pending[k] = self._io.submit(self._writer.append_features, self._buffers[k][: self._used])
        self._current, self._used = 1 - k, 0
        previous = self._pending[self._current]
        if previous is not None:
            previous.result()  # that buffer's write is done: refill it (re-raises disk full, ...)
            self._pending[self._current] = None

    def wait(self) -> None:
        """Wait for the writes in flight (in order); re-raises their errors."""
        for k in (1 - self._current, self._current):
            f = self._pending[k]
            if f is not None:
                self._pending[k] = None
                f.result()

    def close(self, lengths: np.ndarray | None, stats: Any = None) -> None:
        """Write what is staged and end the column; ``lengths`` gives every
        instance's T for a ragged column, None for a fixed one. ``stats`` (a
        :class:`finegym_store.ColumnStats`): the column's statistics as
        given, instead of those of its rows."""
        if self._used:
            self._submit()
        self.wait()
        if stats is not None:
            self._writer.set_feature_stats(np.concatenate([stats.mean, stats.std]).astype(np.float32, copy=False))
        self._writer.end_features(np.asarray([], np.int64) if lengths is None else np.asarray(lengths, np.int64))


class StoreWriter:
    """A store being written: ``with StoreWriter(_core.Writer(out, n, overwrite)) as w``.

    ``raw`` is the C++ writer, or an object with its methods (a writer that
    learns N later stages its rows first; see ingest.py)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finegym-write")
        self._column: ColumnWriter | None = None

    @classmethod
    def create(cls, out: str, num_instances: int, *, overwrite: bool) -> StoreWriter:
        """FileExistsError when ``out`` exists (without ``overwrite``),
        FileNotFoundError naming the folder when ``out``'s folder does not exist."""
        try:
            return cls(_core.Writer(out, num_instances, overwrite))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{out} exists; pass overwrite=True to replace it",
                                  os.fspath(out)) from None
        except FileNotFoundError:
            folder = os.path.dirname(os.fspath(out)) or "."
            if os.path.isdir(folder):
                raise
            raise FileNotFoundError(errno.ENOENT, f"cannot write {out}: the folder '{folder}' does not exist",
                                    os.fspath(out)) from None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._column is not None:
                try:
                    self._column.wait()
                except Exception:
                    if exc[0] is None:
                        raise
        finally:
            self._io.shutdown(wait=True)
            self.raw.discard()  # no-op after commit; removes the temporary file otherwise

    def column(self, name: str, dtype: np.dtype, length: int | None, channels: int) -> ColumnWriter:
        """Begin the next feature column (``length`` T, None when ragged)."""
        if self._column is not None:
            self._column.wait()
        self._column = ColumnWriter(self.raw, self._io, name, dtype, length, channels)
        return self._column

    def finish(self, ids: list[str], labels: np.ndarray | None, cats: Categories | None,
               attrs: dict[str, Any], *, labels_from: str = "the labels", categories_from: str = "the categories",
               name: str | None = None, allow_label_mismatch: bool = False, override: str | None = None,
               label_space: LabelSpace | None = None) -> None:
        """Everything after the feature columns: ids, labels (None: all -1),
        parsed fields, the hierarchy, the provenance JSON (``attrs``, with
        ``created_by`` and ``label_space``); then commit.

        First the labels must fit the hierarchy (labelspace.check_fit:
        ``labels_from`` and ``categories_from`` name the two in the
        LabelSpaceError, ``name`` is the split's or source's file name); with
        ``allow_label_mismatch`` a misfit is recorded in attrs
        (``label_mismatch_allowed``) instead. Without a hierarchy the label
        space recorded is ``label_space``, else the one the labels and
        ``name`` suggest."""
        mismatch = labelspace.check_fit(labels, cats, labels_from, categories_from, name, allow_label_mismatch,
                                        override)
        if cats is not None:
            space = labelspace.of_categories(cats)
        else:
            space = label_space or labelspace.of_labels(labels, name)
        raw, names = self.raw, _core.SECTIONS  # section names are spelled once, in format.hpp
        n = len(ids)
        raw.add_strings(names["ids"], ids)
        raw.add_array(names["labels"], labels if labels is not None else np.full(n, -1, dtype=np.int32))
        parsed = [parse_element_id(k) for k in ids]
        raw.add_strings(names["meta_video"], [p.video if p else "" for p in parsed])
        for section in names["meta_ints"]:  # meta/event_start, ...: named after the ParsedId fields they hold
            field = section.rsplit("/", 1)[1]
            values = np.fromiter((getattr(p, field) if p else -1 for p in parsed), dtype=np.int32, count=n)
            raw.add_array(section, values)
        if cats is not None:
            label, glabel, set_ = names["class_ints"]
            name, event = names["class_strings"]
            raw.add_array(label, cats.label)
            raw.add_array(glabel, cats.glabel)
            raw.add_array(set_, cats.set)
            raw.add_strings(name, cats.name)
            raw.add_strings(event, cats.event)
        doc = {"created_by": f"finegym-store {__version__}", **attrs, "label_space": space.to_dict()}
        if mismatch is not None:
            doc["label_mismatch_allowed"] = mismatch
        raw.add_array(names["attrs"], np.frombuffer(json.dumps(doc).encode("utf-8"), dtype=np.uint8))
        commit(raw)


def commit(raw: Any) -> None:
    """``raw.commit()``; a target that appeared while the store was written
    (the C++ writer links without replacing: EEXIST) is a FileExistsError
    that says so: the other file stays, this store is discarded."""
    try:
        raw.commit()
    except FileExistsError as e:
        path = e.filename or "the target"
        raise FileExistsError(errno.EEXIST, f"{path} appeared while this store was written (another writer?); "
                                            "nothing was replaced; pass overwrite=True to replace it",
                              e.filename) from None
