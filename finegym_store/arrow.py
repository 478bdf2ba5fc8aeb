"""Arrow export of a store: zero-copy tables, record batch streams, the Arrow
PyCapsule stream, and streaming Parquet / Arrow IPC files.

:func:`to_arrow` hands Arrow ``pyarrow.foreign_buffer`` s over the mapped
bytes whose base is the reader's numpy view, so its tables keep the mapping
alive after the :class:`~finegym_store.Store` is gone and cost nothing per
row; like a numpy view, such a table reads the mapping directly (a file
truncated under it is a SIGBUS). :func:`to_batches`, the PyCapsule stream
and the Parquet / IPC writers instead build each record batch from buffers
the C++ core copied out of the mapping under its SIGBUS guard, one batch at
a time: a file truncated meanwhile raises OSError naming it.
pyarrow is imported here only: ``pip install "finegym-store[arrow]"``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__, _args, _core

if TYPE_CHECKING:
    import pyarrow as pa

    from .store import Store, Strings

__all__ = ["METADATA_KEY", "to_arrow", "to_batches", "to_parquet", "to_ipc", "classes_table", "arrow_schema",
           "default_batch_rows", "check_target"]

#: Schema metadata key holding the JSON that lets a Parquet/Arrow file rebuild
#: a store (columns' T, C and dtype, hierarchy, format version, provenance).
METADATA_KEY = b"finegym_store"
#: Per-field metadata keys on feature columns.
FIELD_KEY = b"finegym_store.column"

#: Fields every export has, in this order, before the feature columns.
INSTANCE_FIELDS = ("id", "label", "video", "event_start", "event_end", "element_start", "element_end")
_TENSOR_TYPES = ("nested", "fixed_shape_tensor")
#: Default bytes of feature data per record batch / Parquet row group.
BATCH_BYTES = 128 << 20
_MAX_DEFAULT_ROWS = 1 << 16


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError('Arrow interop needs pyarrow: pip install "finegym-store[arrow]"') from None
    return pyarrow


def _buffer(view: np.ndarray) -> pa.Buffer:
    """The mapped bytes of a reader view as an Arrow buffer, no copy; the view
    (whose base is the C++ reader) is the buffer's base, so the mapping lives
    as long as any Arrow object that uses it."""
    pa = _pa()
    return pa.foreign_buffer(view.ctypes.data, view.nbytes, base=view)


def _strings(strings: Strings) -> pa.Array:
    pa = _pa()
    offsets, data = strings.offsets, strings.data
    return pa.Array.from_buffers(pa.large_utf8(), len(offsets) - 1, [None, _buffer(offsets), _buffer(data)])


def _primitive(view: np.ndarray, type_: pa.DataType) -> pa.Array:
    pa = _pa()
    return pa.Array.from_buffers(type_, view.size, [None, _buffer(view)])


def _value_type(dtype: np.dtype) -> pa.DataType:
    pa = _pa()
    return {np.dtype(np.float32): pa.float32(), np.dtype(np.float16): pa.float16()}[np.dtype(dtype)]


_EXPORT_DTYPES = (None, "float32")


def _check_dtype(dtype: str | None) -> str | None:
    return _args.choice(dtype, "dtype", _EXPORT_DTYPES)


def _export_dtype(stored: np.dtype, dtype: str | None) -> np.dtype:
    """The value dtype a column stored as ``stored`` is exported as: as
    stored, or float32 (half floats upcast) with ``dtype="float32"``."""
    return np.dtype(np.float32) if dtype == "float32" else np.dtype(stored)


def _feature_type(store: Store, name: str, tensor_type: str, dtype: str | None = None) -> pa.DataType:
    pa = _pa()
    col = store.column(name)
    vt = _value_type(_export_dtype(col.dtype, dtype))
    row = pa.list_(vt, col.channels)
    if col.ragged:
        return pa.large_list(row)
    if tensor_type == "fixed_shape_tensor":
        return pa.fixed_shape_tensor(vt, [col.length, col.channels])
    return pa.list_(row, col.length)


def _feature_array(store: Store, name: str, tensor_type: str, dtype: str | None = None) -> pa.Array:
    pa = _pa()
    col = store.column(name)
    values = col.values
    out = _export_dtype(col.dtype, dtype)
    if values.dtype != out:
        values = values.astype(out)  # half floats upcast: a copy, not a view of the mapping
    flat = _primitive(values, _value_type(out))
    if col.ragged:
        rows = pa.FixedSizeListArray.from_arrays(flat, col.channels)
        offsets = col.offsets
        assert offsets is not None
        return pa.Array.from_buffers(pa.large_list(rows.type), len(col), [None, _buffer(offsets)], children=[rows])
    assert col.length is not None  # a fixed-T column from here on
    if tensor_type == "fixed_shape_tensor":
        storage = pa.FixedSizeListArray.from_arrays(flat, col.length * col.channels)
        return pa.ExtensionArray.from_storage(_feature_type(store, name, tensor_type, dtype), storage)
    rows = pa.FixedSizeListArray.from_arrays(flat, col.channels)
    return pa.FixedSizeListArray.from_arrays(rows, col.length)


def select_columns(store: Store, columns: Sequence[str] | str | None) -> list[str]:
    """The instance fields and feature columns named (all when None), in the
    order given, each once; KeyError for an unknown name."""
    available = list(INSTANCE_FIELDS) + list(store.columns)
    clash = set(INSTANCE_FIELDS) & set(store.columns)
    if clash:
        raise ValueError(f"{store.path}: feature column {sorted(clash)[0]!r} has the name of an instance field "
                         f"({', '.join(INSTANCE_FIELDS)}); it cannot be exported or read beside it")
    if columns is None:
        return available
    if isinstance(columns, str):
        columns = [columns]
    out = []
    for c in columns:
        if c not in available:
            raise KeyError(f"no column {c!r} in {store.path}; columns: {', '.join(available)}")
        if c not in out:
            out.append(c)
    return out


def _check_tensor_type(tensor_type: str) -> None:
    if tensor_type not in _TENSOR_TYPES:
        raise ValueError(f"tensor_type={tensor_type!r}; use 'nested' or 'fixed_shape_tensor'")


def store_metadata(store: Store, names: Sequence[str], tensor_type: str = "nested") -> dict[str, Any]:
    """The JSON document stored under :data:`METADATA_KEY`."""
    classes = store.classes
    hierarchy = None
    if classes is not None:
        label, glabel, set_ = (store._copy_section(n).tolist() for n in _core.SECTIONS["class_ints"])
        hierarchy = {"label": label, "glabel": glabel, "set": set_,
                     "event": classes.event.to_list(), "name": classes.name.to_list()}
    cols = {}
    for n in names:
        if n in store.columns:
            c = store.column(n)
            cols[n] = {"dtype": str(c.dtype), "length": c.length, "channels": c.channels}
    return {
        "format_version": store.format_version,
        "exported_by": f"finegym-store {__version__}",
        "source": store.path,
        "num_instances": len(store),
        "tensor_type": tensor_type,
        "columns": cols,
        "classes": hierarchy,
        "attrs": store.attrs,
    }


def arrow_schema(store: Store, columns: Sequence[str] | str | None = None, tensor_type: str = "nested",
                 dtype: str | None = None) -> pa.Schema:
    """The schema :func:`to_arrow` gives, metadata included (costs no data
    access). The metadata records each column's stored dtype, also when
    ``dtype="float32"`` exports half floats upcast: an import of the export
    rebuilds the float16 store (the upcast values convert back exactly)."""
    pa = _pa()
    _check_tensor_type(tensor_type)
    _check_dtype(dtype)
    names = select_columns(store, columns)
    fields = []
    for n in names:
        if n in ("id", "video"):
            fields.append(pa.field(n, pa.large_utf8(), nullable=False))
        elif n in INSTANCE_FIELDS:
            fields.append(pa.field(n, pa.int32(), nullable=False))
        else:
            c = store.column(n)
            meta = {FIELD_KEY: json.dumps({"dtype": str(c.dtype), "length": c.length,
                                           "channels": c.channels}).encode("utf-8")}
            fields.append(pa.field(n, _feature_type(store, n, tensor_type, dtype), nullable=False, metadata=meta))
    meta = {METADATA_KEY: json.dumps(store_metadata(store, names, tensor_type)).encode("utf-8")}
    return pa.schema(fields, metadata=meta)


def to_arrow(store: Store, columns: Sequence[str] | str | None = None, tensor_type: str = "nested",
             dtype: str | None = None) -> pa.Table:
    """A pyarrow.Table over the mapped bytes (no copy), except float16
    columns with ``dtype="float32"``: those are upcast copies in memory.
    See Store.to_arrow."""
    pa = _pa()
    schema = arrow_schema(store, columns, tensor_type, dtype)
    meta = store.meta
    arrays = []
    for n in schema.names:
        if n == "id":
            arrays.append(_strings(store.ids))
        elif n == "video":
            arrays.append(_strings(meta.video))
        elif n == "label":
            arrays.append(_primitive(store.labels, pa.int32()))
        elif n in INSTANCE_FIELDS:
            arrays.append(_primitive(getattr(meta, n), pa.int32()))
        else:
            arrays.append(_feature_array(store, n, tensor_type, dtype))
    return pa.Table.from_arrays(arrays, schema=schema)


def classes_table(store: Store) -> pa.Table | None:
    """The label hierarchy (label, glabel, set, event, name), one row per
    class, over the mapped bytes; None when the store has no hierarchy."""
    pa = _pa()
    c = store.classes
    if c is None:
        return None
    return pa.table({
        "label": _primitive(c.label, pa.int32()),
        "glabel": _primitive(c.glabel, pa.int32()),
        "set": _primitive(c.set, pa.int32()),
        "event": _strings(c.event),
        "name": _strings(c.name),
    })


def _row_bytes(store: Store, names: Sequence[str]) -> float:
    total = 0.0
    for n in names:
        if n in store.columns:
            c = store.column(n)
            total += c.nbytes / max(1, len(store))
    return total + 64.0  # id, label and parsed fields


def default_batch_rows(store: Store, columns: Sequence[str] | str | None = None) -> int:
    """Rows holding about :data:`BATCH_BYTES` (128 MiB) of features, at most
    65536: 1364 rows at I3D size (12 x 2048 float32)."""
    rows = int(BATCH_BYTES // _row_bytes(store, select_columns(store, columns)))
    return max(1, min(_MAX_DEFAULT_ROWS, rows))


def _rows(value: int | None, store: Store, columns: Any, what: str) -> int:
    if value is None:
        return default_batch_rows(store, columns)
    return _args.count(value, what, 1)


def _guarded_batches(store: Store, schema: pa.Schema, tensor_type: str, rows: int,
                     dtype: str | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of ``rows`` rows whose every buffer was copied out of
    the mapping by the C++ core under the SIGBUS guard (OSError naming the
    file if it shrank); offsets come from the reader's copies validated at
    open. With ``dtype="float32"`` float16 values are upcast from that copy.
    One batch is built per step: memory stays about one batch."""
    pa = _pa()
    sec = _core.SECTIONS
    reader = store._reader
    ints = dict(zip(("event_start", "event_end", "element_start", "element_end"), sec["meta_ints"]))
    strings = {"id": sec["ids"], "video": sec["meta_video"]}
    n = len(store)

    def copy(name: str, begin: int, end: int) -> pa.Buffer:
        return pa.py_buffer(reader.read_bytes(name, begin, end))

    def string_array(name: str, s: int, e: int) -> pa.Array:
        o = reader.section(name + sec["offsets_suffix"])[s : e + 1]
        data = copy(name + sec["data_suffix"], int(o[0]), int(o[-1]))
        return pa.Array.from_buffers(pa.large_utf8(), e - s, [None, pa.py_buffer(o - o[0]), data])

    def feature_array(field: pa.Field, s: int, e: int) -> pa.Array:
        col = store.column(field.name)
        col._fetch(np.arange(s, e, dtype=np.int64))  # a remote store: these rows into its cache first
        name = sec["feature_prefix"] + field.name
        row = col.channels * col.dtype.itemsize
        out = _export_dtype(col.dtype, dtype)
        vt = _value_type(out)

        def values(begin: int, end: int) -> pa.Buffer:
            raw = reader.read_bytes(name, begin, end)
            if out == col.dtype:
                return pa.py_buffer(raw)
            return pa.py_buffer(np.frombuffer(raw, col.dtype).astype(out))  # half floats upcast

        if col.ragged:
            o = col.offsets[s : e + 1]  # type: ignore[index]
            flat = pa.Array.from_buffers(vt, int(o[-1] - o[0]) * col.channels,
                                         [None, values(int(o[0]) * row, int(o[-1]) * row)])
            rows_ = pa.FixedSizeListArray.from_arrays(flat, col.channels)
            return pa.Array.from_buffers(field.type, e - s, [None, pa.py_buffer(o - o[0])], children=[rows_])
        assert col.length is not None
        per = col.length * row
        flat = pa.Array.from_buffers(vt, (e - s) * col.length * col.channels, [None, values(s * per, e * per)])
        if tensor_type == "fixed_shape_tensor":
            storage = pa.FixedSizeListArray.from_arrays(flat, col.length * col.channels)
            return pa.ExtensionArray.from_storage(field.type, storage)
        rows_ = pa.FixedSizeListArray.from_arrays(flat, col.channels)
        return pa.FixedSizeListArray.from_arrays(rows_, col.length)

    for s in range(0, n, rows):
        e = min(n, s + rows)
        arrays = []
        for field in schema:
            if field.name in strings:
                arrays.append(string_array(strings[field.name], s, e))
            elif field.name == "label":
                arrays.append(pa.Array.from_buffers(pa.int32(), e - s, [None, copy(sec["labels"], 4 * s, 4 * e)]))
            elif field.name in ints:
                arrays.append(pa.Array.from_buffers(pa.int32(), e - s, [None, copy(ints[field.name], 4 * s, 4 * e)]))
            else:
                arrays.append(feature_array(field, s, e))
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def to_batches(store: Store, batch_size: int | None = None, columns: Sequence[str] | str | None = None,
               tensor_type: str = "nested", dtype: str | None = None) -> pa.RecordBatchReader:
    """A RecordBatchReader of ``batch_size``-row batches, each copied out of
    the mapping under the SIGBUS guard when it is read (see the module doc):
    the stream behind ``Store.__arrow_c_stream__``. For zero-copy slices of
    the mapping (unguarded) use ``to_arrow(store).to_reader()``."""
    pa = _pa()
    rows = _rows(batch_size, store, columns, "batch_size")
    schema = arrow_schema(store, columns, tensor_type, dtype)
    return pa.RecordBatchReader.from_batches(schema, _guarded_batches(store, schema, tensor_type, rows, dtype))


_CODECS = ("none", "snappy", "zstd", "gzip", "brotli", "lz4")


def _parquet_options(schema: pa.Schema, compression: str | None, byte_stream_split: bool,
                     compression_level: int | None) -> dict[str, Any]:
    pa = _pa()
    compression = _args.choice(compression, "compression", (None, *_CODECS)) or "none"  # None: as pyarrow
    features, others = [], []
    for f in schema:
        if f.name in INSTANCE_FIELDS:
            others.append(f.name)
            continue
        # Parquet options name leaf columns: the path through the nested lists.
        t = f.type.storage_type if isinstance(f.type, pa.BaseExtensionType) else f.type
        path = [f.name]
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            path += ["list", "element"]
            t = t.value_type
        features.append(".".join(path))
    return {
        "compression": compression,
        "compression_level": compression_level,
        # Dictionary pages only for the repetitive string column; never for floats.
        "use_dictionary": [n for n in others if n == "video"],
        "use_byte_stream_split": features if byte_stream_split else False,
        "write_statistics": others,
        "store_schema": True,
    }


def check_target(store: Store, path: str, overwrite: bool, flag: str = "overwrite=True",
                 storage_options: Any = None) -> None:
    """Refuse an export target that must not be replaced: ValueError for the
    store's own file (same st_dev/st_ino, also through a symlink or hard link)
    and for anything but a regular file (a directory, FIFO, device, or a
    symlink to one); FileExistsError for an existing file unless
    ``overwrite``. ``flag`` is how the message spells the fix. An ``s3://``
    target: FileExistsError for an existing object unless ``overwrite``."""
    from .remote import exists, is_url

    if isinstance(path, str) and is_url(path):
        if not path.lower().startswith("file://"):
            if not overwrite and exists(path, storage_options):
                raise FileExistsError(f"{path} exists; pass {flag} to replace it")
            return
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(path).path)
    try:
        target = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):  # a dangling symlink: replacing it replaces the link only
            if not overwrite:
                raise FileExistsError(f"{path} exists (a symlink); pass {flag} to replace it") from None
        return
    own = {store._identity}
    try:
        now = os.stat(store._abspath)
        own.add((now.st_dev, now.st_ino))
    except OSError:
        pass
    if (target.st_dev, target.st_ino) in own:
        raise ValueError(f"{path} is the store being exported ({store.path}); choose another target")
    if not stat.S_ISREG(target.st_mode):
        kind = ("a directory" if stat.S_ISDIR(target.st_mode) else "a FIFO" if stat.S_ISFIFO(target.st_mode)
                else "a device" if stat.S_ISCHR(target.st_mode) or stat.S_ISBLK(target.st_mode)
                else "a socket" if stat.S_ISSOCK(target.st_mode) else "not a regular file")
        via = " (through a symlink)" if os.path.islink(path) else ""
        raise ValueError(f"{path} is {kind}{via}; an export writes a regular file and never replaces anything "
                         "else, even with overwrite: choose another target")
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass {flag} to replace it")


def _create_temporary(path: str) -> tuple[int, str]:
    """A new, hidden, uniquely named file beside ``path``, created with
    O_CREAT | O_EXCL and mode 0o666, so the kernel applies the umask."""
    folder, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: its folder {folder} does not exist")
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def _appeared(path: str) -> str:
    return (f"{path} appeared while this export ran (another writer?); nothing was replaced; "
            "pass overwrite=True to replace it")


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Give the finished temporary file its name. Without ``overwrite`` a
    hard link, which fails rather than replace a file that appeared since
    the target was checked (a rename where the file system has no links)."""
    if not overwrite:
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, _appeared(path), path) from None
        except OSError:
            pass  # no hard links here (EPERM, ENOTSUP, ...): the rename below
        else:
            os.unlink(tmp)
            return
    os.replace(tmp, path)


def _write_streaming(store: Store, path: str | os.PathLike[str], columns: Any, rows: int, tensor_type: str,
                     progress: bool, overwrite: bool, open_writer: Any, write: Any,
                     storage_options: Any = None, dtype: str | None = None) -> str:
    from tqdm.auto import tqdm

    from .remote import is_url

    if isinstance(path, str) and is_url(path) and not path.lower().startswith("file://"):
        # Object storage: written locally, then uploaded in one atomic put.
        from .remote import upload

        with upload(path, storage_options, overwrite) as local:
            _write_streaming(store, local, columns, rows, tensor_type, progress, overwrite, open_writer, write,
                             dtype=dtype)
        return path
    if isinstance(path, str) and path.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(path).path)
    path = os.fspath(path)
    schema = arrow_schema(store, columns, tensor_type, dtype)
    check_target(store, path, overwrite)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            with open_writer(f, schema) as w, \
                    tqdm(total=len(store), unit="inst", desc=f"export {os.path.basename(path)}",
                         disable=not progress, leave=False) as bar:
                for batch in _guarded_batches(store, schema, tensor_type, rows, dtype):
                    write(w, batch)
                    bar.update(batch.num_rows)
        try:
            check_target(store, path, overwrite)  # again: the target may have appeared or changed meanwhile
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, _appeared(path), path) from None
        _publish(tmp, path, overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def to_parquet(store: Store, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None,
               row_group_size: int | None = None, compression: str | None = "none", byte_stream_split: bool = False,
               compression_level: int | None = None, tensor_type: str = "nested", progress: bool = False,
               overwrite: bool = False, storage_options: Any = None, dtype: str | None = None) -> str:
    """Write a Parquet file one row group at a time (see Store.to_parquet)
    from batches copied out of the mapping under the SIGBUS guard: a store
    truncated meanwhile raises OSError naming it. Atomic: written to a hidden
    temporary file in the target folder, renamed over ``path`` at the end,
    removed on any failure. FileExistsError if ``path`` exists unless
    ``overwrite``; ValueError, even with it, if ``path`` is not a regular file
    (a directory, FIFO, device, or a symlink to one) or is the store itself.
    An ``s3://`` path is written locally, then uploaded in one atomic put
    (remote.upload). ``dtype="float32"`` writes float16 columns upcast
    (Spark reads no FLOAT16 Parquet column)."""
    import pyarrow.parquet as pq

    rows = _rows(row_group_size, store, columns, "row_group_size")
    schema = arrow_schema(store, columns, tensor_type, dtype)
    options = _parquet_options(schema, compression, byte_stream_split, compression_level)
    return _write_streaming(
        store, path, columns, rows, tensor_type, progress, overwrite,
        lambda f, s: pq.ParquetWriter(f, s, **options),
        lambda w, b: w.write_batch(b, row_group_size=rows), storage_options, dtype,
    )


def to_ipc(store: Store, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None,
           batch_size: int | None = None, compression: str | None = "none", tensor_type: str = "nested",
           progress: bool = False, overwrite: bool = False, storage_options: Any = None,
           dtype: str | None = None) -> str:
    """Write an Arrow IPC file (Feather v2, ``.arrow``), one record batch per
    ``batch_size`` rows; ``compression`` is none, lz4 or zstd. Guarded,
    atomic and refusing targets as :func:`to_parquet`; ``dtype`` as there."""
    pa = _pa()
    _check_dtype(dtype)
    compression = _args.choice(compression, "compression", (None, "none", "lz4", "zstd")) or "none"
    rows = _rows(batch_size, store, columns, "batch_size")
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    return _write_streaming(
        store, path, columns, rows, tensor_type, progress, overwrite,
        lambda f, s: pa.ipc.new_file(f, s, options=options),
        lambda w, b: w.write_batch(b), storage_options, dtype,
    )
