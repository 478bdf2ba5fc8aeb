"""Building a store from Arrow data: ``from_arrow`` (a Table, a
RecordBatchReader, or any object with ``__arrow_c_stream__``, such as a Polars
DataFrame or a DuckDB result), ``from_parquet`` (a file or a folder of
files) and ``from_ipc`` (an Arrow IPC file, or a stream stored in a file).

The C++ writer takes one feature column at a time, every row in order, so the
source is read once per feature column, reading only that column (the id and
label columns ride along with the first): memory is one record batch, not the
table. A one-shot stream with more than one feature column (or a
variable-length one whose T is learnt in a first pass) is first spilled
to an uncompressed Arrow IPC file beside the output (unlinked as soon as it is
created, so even a killed import leaves nothing behind) and then read column
by column through a memory map. Everything is checked while
it streams; a ConversionError (naming the column and the row) discards the
temporary file, so nothing ever appears under the target name.

The input is untrusted: every record batch passes Arrow's full validation
before anything is copied from it, stream batches must have the declared
schema, Parquet footers' row counts are checked before any page is read and
against the rows each row group yields, each Parquet file must be unchanged
(device, inode, size, mtime) from open to the end, and the ``finegym_store``
metadata is type- and range-checked (ConversionError naming the key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import _args, _core
from .arrow import BATCH_BYTES, FIELD_KEY, INSTANCE_FIELDS, METADATA_KEY, _pa
from ._write import STORE_DTYPES, ColumnWriter, StoreWriter, store_dtype
from .errors import ConversionError
from .finegym import Categories, read_categories
from .store import Store

__all__ = ["IPC_SUFFIXES", "ImportOptions", "from_arrow", "from_ipc", "from_parquet"]

#: File name endings of Arrow IPC files (the file or the stream format).
IPC_SUFFIXES = (".arrow", ".feather", ".ipc")



# -- sources ------------------------------------------------------------------
class _Source:
    """Re-readable batches of chosen columns, plus the schema."""

    where: str
    schema: Any
    num_rows: int | None

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TableSource(_Source):
    def __init__(self, table: Any, where: str) -> None:
        self.table, self.where, self.schema, self.num_rows = table, where, table.schema, table.num_rows

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[Any]:
        row0 = 0
        for b in self.table.select(columns).to_batches(max_chunksize=batch_rows):
            yield _valid(self.where, b, row0)
            row0 += b.num_rows


#: Largest T, C or row count taken from an argument or a file's metadata.
MAX_DIM = 2**31 - 1


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def _parquet_files(path: str) -> list[str]:
    """The files of a Parquet source: ``path`` itself, or every regular file
    under the folder ``path`` (sorted; symbolic links to folders are not
    followed; names starting with '.' or '_' skipped at every depth, so Spark's
    ``_temporary/`` and ``_SUCCESS`` are). FIFOs, sockets and devices are
    refused without being opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or folder") from None
    if stat.S_ISREG(st.st_mode):
        return [path]
    if not stat.S_ISDIR(st.st_mode):
        raise ConversionError(f"{path}: {_kind(st.st_mode)}, not a Parquet file or folder")
    files = []
    for root, dirs, names in os.walk(path, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for name in names:
            if name.startswith((".", "_")):
                continue
            f = os.path.join(root, name)
            try:
                mode = os.stat(f).st_mode
            except OSError as e:
                raise ConversionError(f"{f}: cannot be read ({e.strerror})") from None
            if not stat.S_ISREG(mode):
                raise ConversionError(f"{f}: {_kind(mode)}, not a Parquet file")
            files.append(f)
    if not files:
        raise ConversionError(f"{path}: the folder holds no Parquet files")
    return sorted(files)


def _identity(f: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(f)
    except OSError:
        return (-1, -1, -1, -1)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _ParquetSource(_Source):
    def __init__(self, path: str) -> None:
        import pyarrow.parquet as pq

        files = _parquet_files(path)
        self.where, self.files = path, files
        self._open: list[Any] = []
        self._ids: list[tuple[int, int, int, int]] = []
        try:
            for f in files:
                ident = _identity(f)
                try:
                    pf = pq.ParquetFile(f)
                except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-Parquet files
                    raise ConversionError(f"{f}: not a readable Parquet file ({_one_line(e)})") from None
                self._open.append(pf)
                self._ids.append(ident)
                self._check_footer(f, pf)
            self.check()
        except BaseException:
            self.close()
            raise
        self.schema = self._open[0].schema_arrow
        for f, pf in zip(files[1:], self._open[1:]):
            if not pf.schema_arrow.equals(self.schema, check_metadata=False):
                self.close()
                raise ConversionError(f"{f}: its schema differs from {files[0]}'s; every file of a dataset "
                                      "must have the same columns and types")
        self.num_rows = sum(pf.metadata.num_rows for pf in self._open)
        if self.num_rows > MAX_DIM:
            self.close()
            raise ConversionError(f"{path}: the footers claim {self.num_rows} rows in all; a store holds at "
                                  f"most {MAX_DIM}")

    @staticmethod
    def _check_footer(f: str, pf: Any) -> None:
        """The footer's row counts, before any page is read. (Column chunk
        metadata is left to the reader, which checks each chunk's extent
        against the file: pyarrow's ``RowGroupMetaData.column`` aborts the
        process on some malformed chunks instead of raising.)"""
        try:
            md = pf.metadata
            pf.schema_arrow  # noqa: B018 - the embedded Arrow schema is parsed here
            total, groups = md.num_rows, md.num_row_groups
            rows = 0
            for g in range(groups):
                rg = md.row_group(g)
                if not 0 <= rg.num_rows <= MAX_DIM:
                    raise ConversionError(f"{f}: row group {g}: the footer claims {rg.num_rows} rows")
                rows += rg.num_rows
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{f}: unreadable Parquet footer ({_one_line(e)})") from None
        if total != rows:
            raise ConversionError(f"{f}: the footer claims {total} rows, but its row groups hold {rows}")

    def check(self) -> None:
        """ConversionError when a file is not the one opened (replaced, rewritten, resized)."""
        for f, ident in zip(self.files, self._ids):
            if _identity(f) != ident:
                raise ConversionError(f"{f}: the file changed while it was imported; import it again")

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[Any]:
        self.check()
        for f, pf in zip(self.files, self._open):
            row0 = 0
            # One row group per call: iter_batches over the whole file pre-buffers
            # every row group's bytes up front (2.2 GB of RAM for the 2 GB I3D
            # file; 0.44 GB peak this way, with 134 MB row groups).
            for g in range(pf.num_row_groups):
                expected = pf.metadata.row_group(g).num_rows
                got = 0
                it = pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns)
                while True:
                    try:
                        b = next(it)
                    except StopIteration:
                        break
                    except Exception as e:  # ArrowInvalid, OSError, ...: a damaged page
                        raise ConversionError(f"{f}: row group {g}: unreadable data ({_one_line(e)})") from None
                    got += b.num_rows
                    if got > expected:
                        break
                    yield _valid(f"{f}: row group {g}", b, row0)
                    row0 += b.num_rows
                if got != expected:
                    raise ConversionError(f"{f}: row group {g}: the footer claims {expected} rows, "
                                          f"the pages hold {'more' if got > expected else got}")
        self.check()

    def close(self) -> None:
        for pf in self._open:
            pf.close()
        self._open = []


class _IpcSource(_Source):
    """An Arrow IPC file (Feather v2) or an IPC stream stored in a file.

    Read with positioned reads, not a memory map: a file truncated while it
    is imported gives an error, never a SIGBUS, and memory is one record batch
    (each batch is read in full, then only the wanted columns are kept).
    Each pass reopens the file; its identity (device, inode, size, mtime)
    must not change from open to the end. Every batch passes full validation
    and must have the schema the file declares."""

    def __init__(self, path: str) -> None:
        pa = _pa()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConversionError(f"{path}: {_kind(st.st_mode) if not stat.S_ISDIR(st.st_mode) else 'a folder'}, "
                                  "not an Arrow IPC file")
        self.where, self._ident = path, _identity(path)
        self.stream = False
        with pa.OSFile(path, "rb") as f:
            try:
                reader = pa.ipc.open_file(f)
                self.schema = reader.schema
                if hasattr(reader, "count_rows"):  # pyarrow >= 17: from the messages' metadata, no body read
                    counts = [reader.count_rows()]
                else:
                    counts = [self._batch(reader, k).num_rows for k in range(reader.num_record_batches)]
            except ConversionError:
                raise
            except Exception as file_error:
                self.stream = True
                f.seek(0)
                try:
                    stream = pa.ipc.open_stream(f)
                except Exception:
                    raise ConversionError(f"{path}: not a readable Arrow IPC file or stream "
                                          f"({_one_line(file_error)})") from None
                self.schema = stream.schema
                counts = [b.num_rows for b in self._stream_batches(stream)]  # a pass that counts the rows
        self.num_rows = int(sum(counts))
        if self.num_rows > MAX_DIM:
            raise ConversionError(f"{path}: {self.num_rows} rows; a store holds at most {MAX_DIM}")
        self.check()

    def _batch(self, reader: Any, k: int) -> Any:
        try:
            return reader.get_batch(k)
        except Exception as e:  # ArrowInvalid, OSError: a damaged message or body
            raise ConversionError(f"{self.where}: batch {k}: unreadable ({_one_line(e)})") from None

    def _stream_batches(self, stream: Any) -> Iterator[Any]:
        it = iter(stream)
        k = 0
        while True:
            try:
                b = next(it)
            except StopIteration:
                return
            except Exception as e:
                raise ConversionError(f"{self.where}: batch {k}: unreadable ({_one_line(e)})") from None
            yield b
            k += 1

    def check(self) -> None:
        if _identity(self.where) != self._ident:
            raise ConversionError(f"{self.where}: the file changed while it was imported; import it again")

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[Any]:
        pa = _pa()
        self.check()
        row0 = 0
        with pa.OSFile(self.where, "rb") as f:
            if self.stream:
                try:
                    stream = pa.ipc.open_stream(f)
                except Exception as e:
                    raise ConversionError(f"{self.where}: not a readable Arrow IPC stream ({_one_line(e)})") from None
                found = self._stream_batches(stream)
            else:
                try:
                    reader = pa.ipc.open_file(f)
                except Exception as e:
                    raise ConversionError(f"{self.where}: not a readable Arrow IPC file ({_one_line(e)})") from None
                found = (self._batch(reader, k) for k in range(reader.num_record_batches))
            for k, b in enumerate(found):
                if not b.schema.equals(self.schema, check_metadata=False):
                    raise ConversionError(f"{self.where}: batch {k}: its schema ({_schema_str(b.schema)}) differs "
                                          f"from the one the file declares ({_schema_str(self.schema)})")
                b = _valid(f"{self.where}: batch {k}", b, row0)
                b = pa.RecordBatch.from_arrays([b.column(c) for c in columns], names=columns)
                for start in range(0, b.num_rows, batch_rows):
                    yield b.slice(start, batch_rows)
                row0 += b.num_rows
        if row0 != self.num_rows:
            raise ConversionError(f"{self.where}: {row0} rows where the first pass counted {self.num_rows}")
        self.check()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _valid(where: str, batch: Any, row0: int) -> Any:
    """``batch`` (rows ``row0``...) after Arrow's full validation (offsets,
    lengths, UTF-8); ConversionError naming ``where`` otherwise. Nothing is
    copied from data that has not passed it."""
    try:
        batch.validate(full=True)
    except Exception as e:
        _bad_utf8(where, batch, row0)
        raise ConversionError(f"{where}: rows {row0}..{row0 + batch.num_rows - 1}: invalid Arrow data "
                              f"({_one_line(e)})") from None
    return batch


def _bad_utf8(where: str, batch: Any, row0: int) -> None:
    """ConversionError naming the column and row of a string that is not
    UTF-8, when that is why a string column failed full validation: its
    buffers passed basic validation and its offsets are checked here
    (ascending, inside the data buffer) before any value is sliced."""
    pa = _pa()
    for name, col in zip(batch.schema.names, batch.columns):
        large = pa.types.is_large_string(col.type)
        if not (large or pa.types.is_string(col.type)) or len(col) == 0:
            continue
        try:
            col.validate()
        except Exception:
            continue
        try:
            col.validate(full=True)
            continue
        except Exception:
            pass
        _, obuf, dbuf = col.buffers()
        offs = np.frombuffer(obuf, np.int64 if large else np.int32)[col.offset:col.offset + len(col) + 1]
        data = memoryview(dbuf) if dbuf is not None else memoryview(b"")
        if len(offs) != len(col) + 1 or offs[0] < 0 or np.any(np.diff(offs) < 0) or offs[-1] > len(data):
            continue
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        for j in range(len(col)):
            if valid[j]:
                try:
                    str(data[offs[j]:offs[j + 1]], "utf-8")
                except UnicodeDecodeError:
                    v = bytes(data[offs[j]:min(offs[j + 1], offs[j] + 40)])
                    raise ConversionError(f"{where}: column {name!r}: row {row0 + j}: not valid UTF-8 "
                                          f"({v!r})") from None


class _StreamSource(_Source):
    """A one-shot RecordBatchReader: readable once."""

    def __init__(self, reader: Any, where: str) -> None:
        self.reader, self.where, self.schema, self.num_rows = reader, where, reader.schema, None
        self.used = False

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[Any]:
        if self.used:  # pragma: no cover - guarded by the caller
            raise RuntimeError("a stream can be read once")
        self.used = True
        pa = _pa()
        for b in _checked_stream(self):
            b = pa.RecordBatch.from_arrays([b.column(c) for c in columns], names=columns)
            for start in range(0, b.num_rows, batch_rows):
                yield b.slice(start, batch_rows)


def _checked_stream(source: _StreamSource) -> Iterator[Any]:
    """The stream's batches, each fully validated and with the declared schema."""
    it = iter(source.reader)
    k = row0 = 0
    while True:
        try:
            b = next(it)
        except StopIteration:
            return
        except Exception as e:  # a reader over a damaged IPC stream raises ArrowInvalid, OSError
            raise ConversionError(f"{source.where}: batch {k}: unreadable ({_one_line(e)})") from None
        if not b.schema.equals(source.schema, check_metadata=False):
            raise ConversionError(f"{source.where}: batch {k}: its schema ({_schema_str(b.schema)}) differs "
                                  f"from the one the stream declared ({_schema_str(source.schema)})")
        yield _valid(f"{source.where}: batch {k}", b, row0)
        k += 1
        row0 += b.num_rows


def _schema_str(schema: Any) -> str:
    try:
        return ", ".join(f"{f.name}: {f.type}" for f in schema)
    except UnicodeDecodeError:
        return "a field name that is not UTF-8"


def _anonymous_file(out: str, suffix: str) -> Any:
    """A temporary file in ``out``'s folder, unlinked at once: it vanishes
    with its last descriptor or mapping, even if the process is killed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=suffix,
                               dir=os.path.dirname(os.path.abspath(out)))
    os.unlink(tmp)
    return os.fdopen(fd, "w+b")


def _spill(source: _StreamSource, out: str) -> _TableSource:
    """Write the stream to an anonymous Arrow IPC file beside ``out``; map it back."""
    pa = _pa()
    with _anonymous_file(out, ".spill.arrow") as f:
        with pa.ipc.new_file(f, source.schema) as w:
            for b in _checked_stream(source):
                w.write_batch(b)
        f.flush()
        # The table's buffers hold the mapping, which outlives the descriptor.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    table = pa.ipc.open_file(pa.py_buffer(mapped)).read_all()
    return _TableSource(table, source.where)


def _as_source(source: Any) -> _Source:
    pa = _pa()
    if isinstance(source, pa.Table):
        return _TableSource(source, "the Arrow table")
    if isinstance(source, pa.RecordBatch):
        return _TableSource(pa.Table.from_batches([source]), "the record batch")
    if isinstance(source, pa.RecordBatchReader):
        return _StreamSource(source, "the record batch stream")
    # Clients' own objects, recognised only when their module is imported
    # (an object cannot be an instance of a class that was never loaded).
    pl = sys.modules.get("polars")
    if pl is not None and isinstance(source, pl.LazyFrame):
        # The query runs on Polars' streaming engine; its result is one
        # DataFrame in memory, read from there without a copy.
        return _StreamSource(pa.RecordBatchReader.from_stream(source.collect(engine="streaming")),
                             "the Polars LazyFrame")
    hf = sys.modules.get("datasets")
    if hf is not None and isinstance(source, hf.Dataset):
        # The Dataset's Arrow table (memory-mapped from its cache files),
        # sliced without a copy; a Dataset with an indices mapping (after
        # select, shuffle, filter) is gathered into a new table.
        return _TableSource(source.with_format("arrow")[:], "the Hugging Face Dataset")
    if hasattr(source, "__arrow_c_stream__"):  # a Polars DataFrame, a DuckDB relation
        return _StreamSource(pa.RecordBatchReader.from_stream(source), f"the {type(source).__name__} stream")
    if hasattr(source, "__arrow_c_array__"):  # a struct array: one record batch
        try:
            batch = pa.record_batch(source)
        except (TypeError, ValueError, pa.ArrowException) as e:
            raise ConversionError(f"from_arrow: the {type(source).__name__} array is not a record batch "
                                  f"(a struct array of columns): {_one_line(e)}") from None
        return _TableSource(pa.Table.from_batches([batch]), f"the {type(source).__name__} array")
    raise TypeError(f"from_arrow: expected a pyarrow Table, RecordBatch, RecordBatchReader, a Polars "
                    f"LazyFrame, a Hugging Face Dataset or an object with __arrow_c_stream__ or "
                    f"__arrow_c_array__, got {type(source).__name__}")


# -- column layouts ---------------------------------------------------------------
@dataclass
class _Layout:
    """How one source column becomes a store column of (T, C) rows."""

    name: str
    dtype: np.dtype          # stored dtype
    length: int | None     # T, or None (ragged)
    channels: int
    kind: str                # "nested", "tensor", "list_rows", "list_list", "flat"


def _is_list(t: Any) -> bool:
    pa = _pa()
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or \
        (hasattr(pa.types, "is_list_view") and (pa.types.is_list_view(t) or pa.types.is_large_list_view(t)))


def _value_dtype(where: str, t: Any) -> np.dtype:
    pa = _pa()
    if pa.types.is_float16(t):
        return np.dtype(np.float16)
    if pa.types.is_float32(t):
        return np.dtype(np.float32)
    if pa.types.is_float64(t):
        return np.dtype(np.float64)
    raise ConversionError(f"{where}: values must be floating-point (float16, float32 or float64), got {t}")


def _layout(where: str, field: Any, dtype: str | None, length: int | None, channels: int | None,
            meta: Mapping[str, Any] | None) -> _Layout:
    here = f"{where}: column {field.name!r}"
    if meta:  # our own export: T, C and dtype recorded per column
        recorded = meta.get("length", meta.get("segments"))  # 0.1 exports wrote "segments"
        length = recorded if length is None else length
        channels = meta.get("channels") if channels is None else channels
        dtype = meta.get("dtype") if dtype is None else dtype
    for what, v in (("length", length), ("channels", channels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_DIM):
            raise ValueError(f"{here}: {what} must be a positive integer, got {v!r} (at most {MAX_DIM})")
    length = None if length is None else int(length)  # numpy integers become Python ints
    channels = None if channels is None else int(channels)
    lay = _layout_of(here, field, dtype, length, channels)
    for what, v in (("length", lay.length), ("channels", lay.channels)):
        if v is not None and not (what == "channels" and lay.kind == "list_list" and v == 0) \
                and not 1 <= v <= MAX_DIM:
            raise ConversionError(f"{here}: {what} = {v} from the type {field.type}; "
                                  f"expected 1..{MAX_DIM}")
    return lay


def _layout_of(here: str, field: Any, dtype: str | None, length: int | None, channels: int | None) -> _Layout:
    pa = _pa()
    name = field.name
    t = field.type
    if isinstance(t, pa.BaseExtensionType):
        if t.extension_name != "arrow.fixed_shape_tensor":
            raise ConversionError(f"{here}: extension type {t.extension_name} is not a feature tensor")
        shape = list(t.shape)
        if t.permutation is not None and list(t.permutation) != list(range(len(shape))):
            raise ConversionError(f"{here}: fixed_shape_tensor with permutation {t.permutation} is not supported")
        if len(shape) == 1:
            shape = [1, shape[0]]
        if len(shape) != 2:
            raise ConversionError(f"{here}: expected a (T, C) tensor, got shape {shape}")
        vd = _value_dtype(here, t.value_type)
        return _checked(here, _Layout(name, _store_dtype(here, dtype, vd), shape[0], shape[1], "tensor"),
                        length, channels)
    if not _is_list(t):
        raise ConversionError(f"{here}: expected a list, fixed_size_list or fixed_shape_tensor of floats, got {t}")
    inner = t.value_type
    if _is_list(inner):
        vd = _value_dtype(here, inner.value_type)
        if pa.types.is_fixed_size_list(inner):
            c = inner.list_size
            if channels is not None and channels != c:
                raise ConversionError(f"{here}: rows hold {c} values but channels={channels} was given")
            if pa.types.is_fixed_size_list(t):
                if length is not None and length != t.list_size:
                    raise ConversionError(f"{here}: instances hold {t.list_size} rows but length={length}")
                return _Layout(name, _store_dtype(here, dtype, vd), t.list_size, c, "nested")
            return _Layout(name, _store_dtype(here, dtype, vd), length, c, "list_rows")
        # list<list<float>> (a nested column written by DuckDB or Polars to Parquet):
        # inner lengths must all equal C (given, or the first row's).
        seg = t.list_size if pa.types.is_fixed_size_list(t) else length
        return _Layout(name, _store_dtype(here, dtype, vd), seg, channels or 0, "list_list")
    vd = _value_dtype(here, inner)
    # A flat list of floats per instance: T * C values.
    if pa.types.is_fixed_size_list(t):
        n = t.list_size
        if channels is None and length is None:
            length, channels = 1, n  # (C,) is T = 1, as in convert
        elif channels is None:
            if n % length:
                raise ConversionError(f"{here}: {n} values per instance are not a multiple of length={length}")
            channels = n // length
        elif length is None:
            if n % channels:
                raise ConversionError(f"{here}: {n} values per instance are not a multiple of channels={channels}")
            length = n // channels
        assert length is not None and channels is not None
        if length * channels != n:
            raise ConversionError(f"{here}: {n} values per instance, but length x channels = "
                                  f"{length} x {channels}")
        return _Layout(name, _store_dtype(here, dtype, vd), length, channels, "flat")
    if channels is None:
        raise ConversionError(f"{here}: a {t} column needs channels=C (or the finegym_store schema metadata) "
                              "to cut its values into (T, C) rows")
    return _Layout(name, _store_dtype(here, dtype, vd), length, channels, "flat")


def _checked(here: str, lay: _Layout, length: int | None, channels: int | None) -> _Layout:
    if length is not None and length != lay.length:
        raise ConversionError(f"{here}: instances hold {lay.length} rows but length={length} was given")
    if channels is not None and channels != lay.channels:
        raise ConversionError(f"{here}: rows hold {lay.channels} values but channels={channels} was given")
    return lay


def _store_dtype(here: str, dtype: str | None, value_dtype: np.dtype) -> np.dtype:
    if dtype is None:
        return np.dtype(np.float16) if value_dtype == np.float16 else np.dtype(np.float32)
    return store_dtype(dtype, here)


# -- per-batch conversion ------------------------------------------------------------
def _first_null(arr: Any) -> int | None:
    if not arr.null_count:
        return None
    return int(np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0])


def _no_nulls(here: str, arr: Any, what: str, row0: int) -> None:
    first = _first_null(arr)
    if first is not None:
        raise ConversionError(f"{here}: row {row0 + first}: {what} is null")


def _instance_of(position: int, per_instance: np.ndarray) -> int:
    """The instance holding item ``position`` when instance i holds per_instance[i] items."""
    return int(np.searchsorted(np.cumsum(per_instance), position, side="right"))


def _rows_of(lay: _Layout, here: str, arr: Any, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """(values as (rows, C) numpy, T of every instance) of one batch's column;
    ConversionError naming the row for nulls and misshapen instances."""
    pa = _pa()
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if isinstance(arr.type, pa.BaseExtensionType):
        arr = arr.storage
    n = len(arr)
    _no_nulls(here, arr, "the instance", row0)
    rows = None
    if lay.kind in ("nested", "tensor"):
        lengths = np.full(n, lay.length, np.int64)
        rows = arr.flatten() if lay.kind == "nested" else None
        values = rows.flatten() if rows is not None else arr.flatten()
    elif lay.kind in ("list_rows", "list_list"):
        lengths = pc.list_value_length(arr).to_numpy().astype(np.int64, copy=False)
        rows = arr.flatten()
        if lay.kind == "list_list":
            inner = pc.list_value_length(rows).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            if lay.channels == 0 and len(inner):
                lay.channels = int(inner[0])  # C from the first row
                if lay.channels == 0:
                    raise ConversionError(f"{here}: row {row0}: an empty row (C = 0)")
            bad = np.flatnonzero((inner != lay.channels) & rows.is_valid().to_numpy(zero_copy_only=False))
            if len(bad):
                i = _instance_of(int(bad[0]), lengths)
                raise ConversionError(f"{here}: row {row0 + i}: a row of {int(inner[bad[0]])} values where "
                                      f"every row must hold C = {lay.channels}")
        values = rows.flatten()
    else:  # flat: T * C values per instance
        counts = pc.list_value_length(arr).to_numpy().astype(np.int64, copy=False)
        bad = np.flatnonzero(counts % lay.channels)
        if len(bad):
            i = int(bad[0])
            raise ConversionError(f"{here}: row {row0 + i}: {int(counts[i])} values are not a whole number of "
                                  f"rows of C = {lay.channels}")
        lengths = counts // lay.channels
        values = arr.flatten()
    if rows is not None:
        first = _first_null(rows)
        if first is not None:
            raise ConversionError(f"{here}: row {row0 + _instance_of(first, lengths)}: a (C,) row is null")
    first = _first_null(values)
    if first is not None:
        raise ConversionError(f"{here}: row {row0 + _instance_of(first, lengths * lay.channels)}: "
                              "a feature value is null")
    if lay.length is not None:
        bad = np.flatnonzero(lengths != lay.length)
        if len(bad):
            i = int(bad[0])
            raise ConversionError(f"{here}: row {row0 + i}: T = {int(lengths[i])} rows where the column has "
                                  f"fixed T = {lay.length}")
    zero = np.flatnonzero(lengths == 0)
    if len(zero):
        raise ConversionError(f"{here}: row {row0 + int(zero[0])}: an instance with no rows (T = 0)")
    # Cast to the stored dtype as the column writer copies it.
    return values.to_numpy(zero_copy_only=True).reshape(-1, lay.channels), lengths


# -- ids and labels -------------------------------------------------------------------
class _Instances:
    def __init__(self, where: str, id_column: str, label_column: str | None) -> None:
        self.where, self.id_column, self.label_column = where, id_column, label_column
        self.ids: list[str] = []
        self.labels: list[np.ndarray] = []
        self.seen: dict[str, int] = {}

    def add(self, batch: Any, row0: int) -> None:
        pa = _pa()
        ids = batch.column(self.id_column)
        here = f"{self.where}: column {self.id_column!r}"
        binary = pa.types.is_binary(ids.type) or pa.types.is_large_binary(ids.type) or \
            (hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(ids.type))
        if not (binary or pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
                or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(ids.type))):
            raise ConversionError(f"{here}: ids must be strings, got {ids.type}")
        _no_nulls(here, ids, "the id", row0)
        values = ids.to_pylist()
        if binary:  # ids as bytes: taken when they are UTF-8
            for j, v in enumerate(values):
                try:
                    values[j] = v.decode("utf-8")
                except UnicodeDecodeError:
                    raise ConversionError(f"{here}: row {row0 + j}: id {v[:40]!r} is not valid UTF-8") from None
        for j, k in enumerate(values):
            first = self.seen.setdefault(k, row0 + j)
            if first != row0 + j:
                raise ConversionError(f"{here}: row {row0 + j}: id {k!r} is a duplicate (first in row {first})")
            if not k:
                raise ConversionError(f"{here}: row {row0 + j}: an empty id")
        self.ids.extend(values)
        if self.label_column is not None:
            lab = batch.column(self.label_column)
            lhere = f"{self.where}: column {self.label_column!r}"
            if not pa.types.is_integer(lab.type):
                raise ConversionError(f"{lhere}: labels must be integers, got {lab.type}")
            # Nulls filled with 0 (any integer type holds it), then set to -1: unlabelled.
            raw = np.asarray((lab.fill_null(0) if lab.null_count else lab).to_numpy(zero_copy_only=False))
            out_of_range = raw >= 2**31 if raw.dtype.kind == "u" else (raw < -1) | (raw >= 2**31)
            if lab.null_count:
                valid = lab.is_valid().to_numpy(zero_copy_only=False)
                out_of_range &= valid
            bad = np.flatnonzero(out_of_range)
            if len(bad):
                i = int(bad[0])
                raise ConversionError(f"{lhere}: row {row0 + i}: label {int(raw[i])} is outside -1..2**31-1")
            arr = raw.astype(np.int32)
            if lab.null_count:
                arr[~valid] = -1
            self.labels.append(arr)

    def label_array(self) -> np.ndarray | None:
        if self.label_column is None:
            return None
        return np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32)


# -- the import ------------------------------------------------------------------
def _json(where: str, key: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting beyond the parser's stack
        raise ConversionError(f"{where}: schema metadata {key!r}: not readable JSON "
                              f"({_one_line(e)[:200]})") from None


def _metadata(schema: Any, where: str) -> dict[str, Any]:
    """The export's JSON document under METADATA_KEY ({} without one);
    ConversionError naming the key when it is there but malformed (it would
    change the result: T, C, dtype, the columns and the hierarchy come from it)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    key = METADATA_KEY.decode()
    doc = _json(where, key, raw)
    if not isinstance(doc, dict):
        raise ConversionError(f"{where}: schema metadata {key!r}: expected a JSON object, got "
                              f"{type(doc).__name__}")
    columns = doc.get("columns")
    if columns is not None:
        if not isinstance(columns, dict):
            raise ConversionError(f"{where}: schema metadata {key!r}: 'columns' must be an object, got "
                                  f"{type(columns).__name__}")
        for name, m in columns.items():
            _column_meta(f"{where}: schema metadata {key!r}: columns[{name!r}]", m)
    classes = doc.get("classes")
    if classes is not None and not isinstance(classes, dict):
        raise ConversionError(f"{where}: schema metadata {key!r}: 'classes' must be an object or null, got "
                              f"{type(classes).__name__}")
    return doc


def _column_meta(here: str, m: Any) -> dict[str, Any]:
    """A column's recorded dtype, length (T; "segments" in 0.1 exports) and channels, type-checked."""
    if not isinstance(m, dict):
        raise ConversionError(f"{here}: expected a JSON object, got {type(m).__name__}")
    for k in ("length", "segments", "channels"):
        v = m.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM):
            raise ConversionError(f"{here}: {k!r} must be an integer in 1..{MAX_DIM} or null, got {v!r}"[:300])
    d = m.get("dtype")
    if d is not None and d not in STORE_DTYPES:
        raise ConversionError(f"{here}: 'dtype' must be one of {', '.join(STORE_DTYPES)}, got {d!r}"[:300])
    return m


def _field_meta(field: Any, doc: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    raw = (field.metadata or {}).get(FIELD_KEY)
    if raw is not None:
        here = f"{where}: column {field.name!r}: field metadata {FIELD_KEY.decode()!r}"
        return _column_meta(here, _json(f"{where}: column {field.name!r}", FIELD_KEY.decode(), raw))
    return (doc.get("columns") or {}).get(field.name)


def _per_column(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, Mapping) else value


def _hierarchy(doc: Mapping[str, Any], categories: Any, classes: Any, where: str) -> Categories | None:
    if categories is not None:
        return read_categories(categories)
    pa = _pa()
    if classes is not None:
        here = "classes"
        t = classes if isinstance(classes, pa.Table) else pa.table(classes)
        h: Any = {k: t.column(k).to_pylist() for k in ("label", "glabel", "set", "event", "name")
                  if k in t.column_names}
    else:
        here = f"{where}: schema metadata {METADATA_KEY.decode()!r}: classes"
        h = doc.get("classes")
        if not h:
            return None
    keys = ("label", "glabel", "set", "event", "name")
    missing = [k for k in keys if k not in h]
    if missing:
        raise ConversionError(f"{here}: the label hierarchy needs label, glabel, set, event and name; "
                              f"missing {', '.join(missing)}")
    n = None
    for k in keys:
        v = h[k]
        if not isinstance(v, list):
            raise ConversionError(f"{here}: {k!r} must be a list, got {type(v).__name__}")
        if n is None:
            n = len(v)
        elif len(v) != n:
            raise ConversionError(f"{here}: {k!r} holds {len(v)} entries, 'label' {n}")
        for i, x in enumerate(v):
            ok = isinstance(x, str) if k in ("event", "name") else \
                (isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31)
            if not ok:
                what = "a string" if k in ("event", "name") else "an integer in 0..2**31-1"
                raise ConversionError(f"{here}: {k!r}[{i}] must be {what}, got {x!r}"[:300])
    seen: dict[int, int] = {}
    for i, x in enumerate(h["label"]):
        if seen.setdefault(x, i) != i:
            raise ConversionError(f"{here}: 'label'[{i}]: class label {x} is a duplicate (first at {seen[x]})")
    return Categories(np.asarray(h["label"], np.int32), np.asarray(h["glabel"], np.int32),
                      np.asarray(h["set"], np.int32), list(h["event"]), list(h["name"]))


def _check_batch_size(batch_size: Any) -> None:
    _args.optional_count(batch_size, "batch_size", 1, MAX_DIM)


def _ingest(source: _Source, out: str, opts: ImportOptions) -> Store:
    id_column, label_column, feature_columns = opts.id_column, opts.label_column, opts.feature_columns
    where = source.where
    schema = source.schema
    try:
        names = list(schema.names)
        for f in schema:
            str(f.type)  # nested field names are decoded here
    except UnicodeDecodeError as e:
        raise ConversionError(f"{where}: a column or nested field name is not valid UTF-8 ({e})") from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConversionError(f"{where}: column {dup[0]!r} appears more than once in the schema; "
                              "every column needs its own name")
    doc = _metadata(schema, where)
    if id_column not in names:
        raise ConversionError(f"{where}: no id column {id_column!r}; columns: {', '.join(names)}")
    if label_column is not None and label_column not in names:
        if label_column != "label":
            raise ConversionError(f"{where}: no label column {label_column!r}; columns: {', '.join(names)}")
        label_column = None  # the default: unlabelled when absent
    if feature_columns is None:
        listed = list((doc.get("columns") or {}))
        if listed and all(c in names for c in listed):
            feature_columns = listed
        else:
            skip = {id_column, label_column, *INSTANCE_FIELDS}
            feature_columns = [f.name for f in schema if f.name not in skip and
                               (_is_list(f.type) or isinstance(f.type, _pa().BaseExtensionType))]
        if not feature_columns:
            raise ConversionError(f"{where}: no feature column (a list or tensor of floats) among "
                                  f"{', '.join(names)}")
    else:
        if isinstance(feature_columns, str):
            feature_columns = [feature_columns]
        feature_columns = list(feature_columns)
        if not feature_columns:
            raise ValueError("feature_columns must name at least one column")
        for c in feature_columns:
            if c not in names:
                raise ConversionError(f"{where}: no column {c!r}; columns: {', '.join(names)}")
        if len(set(feature_columns)) != len(feature_columns):
            raise ValueError(f"feature_columns names a column twice: {feature_columns}")
    for c in feature_columns:
        if not _core.valid_column_name(c):
            raise ConversionError(f"{where}: column {c!r}: a store column name must be 1..40 characters "
                                  "of [A-Za-z0-9_-]")
        if c in (id_column, label_column):
            raise ConversionError(f"{where}: column {c!r} is the id or label column, not a feature column")
    layouts = [_layout(where, schema.field(c), _per_column(opts.dtype, c), _per_column(opts.length, c),
                       _per_column(opts.channels, c), _field_meta(schema.field(c), doc, where))
               for c in feature_columns]
    cats = _hierarchy(doc, opts.categories, opts.classes, where)
    if os.path.exists(out) and not opts.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")

    detect = [lay for lay in layouts if lay.length is None]
    if isinstance(source, _StreamSource) and (len(layouts) > 1 or detect):
        source = _spill(source, out)  # read more than once: once per column, and to learn T
    for lay in detect:
        lay.length = _common_length(source, lay, opts.batch_size)
    instances = _Instances(where, id_column, label_column)
    columns_attrs: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        n = source.num_rows
        if n == 0:
            raise ConversionError(f"{where}: the source has no rows")
        # A one-shot stream does not say how many rows it has: its writer stages them until it knows.
        raw = _StreamWriter(out, opts.overwrite) if n is None else _core.Writer(out, n, opts.overwrite)
        writer = stack.enter_context(StoreWriter(raw))
        for k, lay in enumerate(layouts):
            extra = [id_column] + ([label_column] if label_column else []) if k == 0 else []
            columns_attrs[lay.name] = _write_column(source, writer, lay, extra, instances if k == 0 else None,
                                                    opts.progress, opts.batch_size)
        ids = instances.ids
        if len(ids) == 0:
            raise ConversionError(f"{where}: the source has no rows")
        labels = instances.label_array()
        writer.finish(ids, labels, cats, {
            "source": where,
            "imported_from": {k: doc.get(k) for k in ("format_version", "exported_by", "source", "attrs")}
            if doc else None,
            "columns": columns_attrs,
        }, labels_from=f"{where}: column {label_column!r}", name=where,
            categories_from=os.fspath(opts.categories) if opts.categories is not None else "the label hierarchy given")
    return Store(out)


class _StreamWriter:
    """A one-shot stream does not say how many rows it has, and the C++ writer
    needs N up front: stage the one feature column's rows in a temporary file
    beside ``out`` (one pass, memory one batch), then write the store from it."""

    def __init__(self, out: str, overwrite: bool) -> None:
        self.out, self.overwrite = out, overwrite
        self.inner: Any = None
        self.file = _anonymous_file(out, ".rows")
        self.column: tuple[str, np.dtype, int, int] | None = None

    def begin_features(self, name: str, dtype: np.dtype, length: int, channels: int) -> None:
        self.column = (name, dtype, length, channels)

    def append_features(self, rows: np.ndarray) -> None:
        self.file.write(rows.data.cast("B"))  # C-contiguous: no copy

    def end_features(self, lengths: np.ndarray) -> None:
        self.lengths = lengths

    def _open(self, n: int) -> None:
        self.file.flush()
        assert self.column is not None
        name, dtype, length, channels = self.column
        self.inner = _core.Writer(self.out, n, self.overwrite)
        self.inner.begin_features(name, dtype, length, channels)
        step = max(1, (4 << 20) // (channels * dtype.itemsize))
        data = np.memmap(self.file, dtype=dtype, mode="r").reshape(-1, channels) if self.file.tell() \
            else np.zeros((0, channels), dtype)
        for start in range(0, len(data), step):
            self.inner.append_features(np.ascontiguousarray(data[start:start + step]))
        del data
        self.file.close()  # the staged rows vanish with it
        self.inner.end_features(self.lengths)

    def add_strings(self, name: str, values: list[str]) -> None:
        if self.inner is None:
            self._open(len(values))
        self.inner.add_strings(name, values)

    def add_array(self, name: str, array: np.ndarray) -> None:
        self.inner.add_array(name, array)

    def commit(self) -> None:
        self.inner.commit()

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self.inner is not None:
            self.inner.discard()


def _batch_rows(lay: _Layout, batch_size: int | None) -> int:
    if batch_size is not None:
        return int(batch_size)
    row_bytes = (lay.length or 16) * (lay.channels or 1) * 4
    return max(1, min(1 << 16, BATCH_BYTES // row_bytes))


def _common_length(source: _Source, lay: _Layout, batch_size: int | None) -> int | None:
    """The T every instance of a variable-length column has, or None when T
    varies (or a row is null or misshapen: the writing pass names it). A
    pass over that column alone, reading list lengths, not copying values:
    a column whose rows all have one T is stored fixed-T."""
    import pyarrow.compute as pc

    pa = _pa()
    common: int | None = None
    for batch in source.batches([lay.name], _batch_rows(lay, batch_size)):
        arr = batch.column(0)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if len(arr) == 0:
            continue
        if arr.null_count:
            return None
        counts = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if lay.kind == "flat":
            if np.any(counts % lay.channels):
                return None
            counts = counts // lay.channels
        first = int(counts[0])
        if first == 0 or (common is not None and first != common) or np.any(counts != first):
            return None
        common = first
    return common


def _write_column(source: _Source, writer: StoreWriter, lay: _Layout, extra: list[str],
                  instances: _Instances | None, progress: bool, batch_size: int | None) -> dict[str, Any]:
    here = f"{source.where}: column {lay.name!r}"
    field = source.schema.field(lay.name)
    batch_rows = _batch_rows(lay, batch_size)
    lengths_parts: list[np.ndarray] = []
    column: ColumnWriter | None = None  # begun at the first batch (a list<list> column learns C there)
    row0 = 0
    with tqdm(total=source.num_rows, unit="inst", desc=f"import {lay.name}", disable=not progress,
              leave=False) as bar:
        for batch in source.batches(extra + [lay.name], batch_rows):
            if batch.num_rows == 0:
                continue
            if instances is not None:
                instances.add(batch, row0)
            rows, lengths = _rows_of(lay, here, batch.column(lay.name), row0)
            if column is None:
                column = writer.column(lay.name, lay.dtype, lay.length, lay.channels)
            column.append(rows)
            lengths_parts.append(lengths)
            row0 += batch.num_rows
            bar.update(batch.num_rows)
    if column is None:
        raise ConversionError(f"{source.where}: the source has no rows")
    expected = len(instances.ids) if instances is not None else None
    if expected is not None and row0 != expected:  # pragma: no cover - same batches
        raise ConversionError(f"{here}: {row0} rows but {expected} ids")
    column.close(None if lay.length is not None else np.concatenate(lengths_parts))
    return {"source": source.where, "source_type": str(field.type), "length": lay.length,
            "channels": lay.channels}


@dataclass(frozen=True, kw_only=True)
class ImportOptions:
    """How :func:`from_arrow` and :func:`from_parquet` read a source; pass
    one (``from_arrow(t, "x.fgs", opts)``), its fields as keywords, or both
    (keywords replace the object's fields).

    ``id_column`` holds unique non-null string ids; ``label_column`` integer
    labels (null or absent: -1). ``feature_columns`` default: those recorded
    in the schema metadata of an export, else every list/tensor column.
    ``length`` (T, the rows per instance), ``channels`` (C) and ``dtype``
    (float32/float16; default: float16 stays, other floats become float32)
    are one value or a {column: value} mapping; an export's metadata supplies
    them. The label hierarchy comes from ``categories`` (a FineGym categories
    file), ``classes`` (a table like ``Store.classes_table()``) or the schema
    metadata. ``batch_size``: rows per record batch read (default: about
    128 MiB of features). ``overwrite`` replaces an existing ``out``;
    ``progress`` draws progress bars."""

    id_column: str = "id"
    label_column: str | None = "label"
    feature_columns: Sequence[str] | str | None = None
    length: int | Mapping[str, int] | None = None
    channels: int | Mapping[str, int] | None = None
    dtype: str | Mapping[str, str] | None = None
    categories: str | os.PathLike[str] | None = None
    classes: Any = None
    overwrite: bool = False
    progress: bool = True
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)
        for name in ("id_column",):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if self.label_column is not None and not isinstance(self.label_column, str):
            raise TypeError(f"label_column must be a str or None, got {type(self.label_column).__name__}")


def _options(options: ImportOptions | None, keywords: dict[str, Any]) -> ImportOptions:
    if options is not None and not isinstance(options, ImportOptions):
        raise TypeError(f"options must be an ImportOptions, got {type(options).__name__}")
    fields = ImportOptions.__dataclass_fields__
    unknown = sorted(set(keywords) - set(fields))
    if unknown:
        hint = " (T is called length)" if "segments" in unknown else ""
        raise TypeError(f"unexpected keyword {unknown[0]!r}{hint}; the options are {', '.join(fields)}")
    return dataclasses.replace(options, **keywords) if options is not None else ImportOptions(**keywords)


def from_arrow(source: Any, out: str | os.PathLike[str], options: ImportOptions | None = None, /,
               **keywords: Any) -> Store:
    """Build a store at ``out`` from Arrow data and open it; atomic.

    ``source`` is a pyarrow Table, RecordBatch or RecordBatchReader, any
    object with ``__arrow_c_stream__`` (a Polars DataFrame, a DuckDB
    relation: read as a stream), any object with ``__arrow_c_array__`` that
    is a struct array (one record batch), a Polars LazyFrame (collected with
    ``engine="streaming"``: memory is the collected DataFrame, read without a
    copy) or a Hugging Face ``datasets.Dataset`` (its Arrow table, sliced
    without a copy; gathered into a new table when the Dataset has an
    indices mapping). Fixed-size array columns (DuckDB ``FLOAT[C][T]``,
    Polars ``pl.Array(dtype, (T, C))``) arrive as
    fixed_size_list<fixed_size_list> and are stored fixed-T.
    How it is read: an :class:`ImportOptions` and/or its fields as keywords
    (``id_column``, ``label_column``, ``feature_columns``, ``length``,
    ``channels``, ``dtype``, ``categories``, ``classes``, ``overwrite``,
    ``progress``, ``batch_size``).
    Feature columns may be fixed_size_list<fixed_size_list<float, C>, T>,
    arrow.fixed_shape_tensor [T, C], (large_)list<fixed_size_list<float, C>>,
    (large_)list<list<float>>, or flat list / large_list /
    fixed_size_list<float> of T * C values (``channels`` needed for
    variable-length ones). A variable-length column without ``length`` is
    read once more first, for its list lengths only: when every instance has
    the same T it is stored fixed-T, else ragged. Streams: memory is one batch; see the
    module docstring for multi-column streams."""
    _pa()
    opts = _options(options, keywords)
    return _ingest(_as_source(source), os.fspath(out), opts)


def from_parquet(path: str | os.PathLike[str], out: str | os.PathLike[str], options: ImportOptions | None = None, /,
                 **keywords: Any) -> Store:
    """Build a store from a Parquet file or a folder of Parquet files (read
    in sorted path order; names starting with '.' or '_' are skipped at every
    depth; links to folders are not followed; FIFOs, sockets and devices are
    refused unopened), one feature column per pass, reading only that
    column: memory is one row group. Options as :func:`from_arrow`."""
    _pa()
    opts = _options(options, keywords)
    source = _ParquetSource(os.fspath(path))
    try:
        return _ingest(source, os.fspath(out), opts)
    finally:
        source.close()


def from_ipc(path: str | os.PathLike[str], out: str | os.PathLike[str], options: ImportOptions | None = None, /,
             **keywords: Any) -> Store:
    """Build a store from an Arrow IPC file (``.arrow``, ``.feather`` v2,
    ``.ipc``; the file format or the stream format), as ``finegym-store
    export`` writes them. Read with positioned reads, one record batch at a
    time, once per feature column; every batch fully validated; the file
    must not change while it is read. Options as :func:`from_arrow`."""
    _pa()
    opts = _options(options, keywords)
    return _ingest(_IpcSource(os.fspath(path)), os.fspath(out), opts)
