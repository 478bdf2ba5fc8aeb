"""Arrow export of a store: zero-copy tables, record batch streams, the Arrow
PyCapsule stream, and streaming Parquet / Arrow IPC files.

Every buffer handed to Arrow is a ``pyarrow.foreign_buffer`` over the mapped
bytes whose base is the reader's numpy view, so tables keep the mapping alive
after the :class:`~finegym_store.Store` is gone and cost nothing per row.
pyarrow is imported here only: ``pip install "finegym-store[arrow]"``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__

if TYPE_CHECKING:
    import pyarrow as pa

    from .store import Store, Strings

__all__ = ["METADATA_KEY", "to_arrow", "to_batches", "to_parquet", "to_ipc", "classes_table", "arrow_schema",
           "default_batch_rows"]

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


def _feature_type(store: Store, name: str, tensor_type: str) -> pa.DataType:
    pa = _pa()
    col = store.column(name)
    vt = _value_type(col.dtype)
    row = pa.list_(vt, col.channels)
    if col.ragged:
        return pa.large_list(row)
    if tensor_type == "fixed_shape_tensor":
        return pa.fixed_shape_tensor(vt, [col.segments, col.channels])
    return pa.list_(row, col.segments)


def _feature_array(store: Store, name: str, tensor_type: str) -> pa.Array:
    pa = _pa()
    col = store.column(name)
    values = col.values
    flat = _primitive(values, _value_type(col.dtype))
    if col.ragged:
        rows = pa.FixedSizeListArray.from_arrays(flat, col.channels)
        offsets = col.offsets
        assert offsets is not None
        return pa.Array.from_buffers(pa.large_list(rows.type), len(col), [None, _buffer(offsets)], children=[rows])
    assert col.segments is not None  # a fixed-T column from here on
    if tensor_type == "fixed_shape_tensor":
        storage = pa.FixedSizeListArray.from_arrays(flat, col.segments * col.channels)
        return pa.ExtensionArray.from_storage(_feature_type(store, name, tensor_type), storage)
    rows = pa.FixedSizeListArray.from_arrays(flat, col.channels)
    return pa.FixedSizeListArray.from_arrays(rows, col.segments)


def _select(store: Store, columns: Sequence[str] | str | None) -> list[str]:
    available = list(INSTANCE_FIELDS) + list(store.columns)
    clash = set(INSTANCE_FIELDS) & set(store.columns)
    if clash:
        raise ValueError(f"{store.path}: feature column {sorted(clash)[0]!r} has the name of an instance field "
                         f"({', '.join(INSTANCE_FIELDS)}); it cannot be exported beside it")
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
        hierarchy = {"label": classes.label.tolist(), "glabel": classes.glabel.tolist(), "set": classes.set.tolist(),
                     "event": classes.event.to_list(), "name": classes.name.to_list()}
    cols = {}
    for n in names:
        if n in store.columns:
            c = store.column(n)
            cols[n] = {"dtype": str(c.dtype), "segments": c.segments, "channels": c.channels}
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


def arrow_schema(store: Store, columns: Sequence[str] | str | None = None, tensor_type: str = "nested") -> pa.Schema:
    """The schema :func:`to_arrow` gives, metadata included (costs no data access)."""
    pa = _pa()
    _check_tensor_type(tensor_type)
    names = _select(store, columns)
    fields = []
    for n in names:
        if n in ("id", "video"):
            fields.append(pa.field(n, pa.large_utf8(), nullable=False))
        elif n in INSTANCE_FIELDS:
            fields.append(pa.field(n, pa.int32(), nullable=False))
        else:
            c = store.column(n)
            meta = {FIELD_KEY: json.dumps({"dtype": str(c.dtype), "segments": c.segments,
                                           "channels": c.channels}).encode("utf-8")}
            fields.append(pa.field(n, _feature_type(store, n, tensor_type), nullable=False, metadata=meta))
    meta = {METADATA_KEY: json.dumps(store_metadata(store, names, tensor_type)).encode("utf-8")}
    return pa.schema(fields, metadata=meta)


def to_arrow(store: Store, columns: Sequence[str] | str | None = None, tensor_type: str = "nested") -> pa.Table:
    """A pyarrow.Table over the mapped bytes (no copy). See Store.to_arrow."""
    pa = _pa()
    schema = arrow_schema(store, columns, tensor_type)
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
            arrays.append(_feature_array(store, n, tensor_type))
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
    rows = int(BATCH_BYTES // _row_bytes(store, _select(store, columns)))
    return max(1, min(_MAX_DEFAULT_ROWS, rows))


def _rows(value: int | None, store: Store, columns: Any, what: str) -> int:
    if value is None:
        return default_batch_rows(store, columns)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive number of rows, got {value!r}")
    return int(value)


def to_batches(store: Store, batch_size: int | None = None, columns: Sequence[str] | str | None = None,
               tensor_type: str = "nested") -> pa.RecordBatchReader:
    """A RecordBatchReader of zero-copy slices of :func:`to_arrow`."""
    table = to_arrow(store, columns, tensor_type)
    return table.to_reader(max_chunksize=_rows(batch_size, store, columns, "batch_size"))


_CODECS = ("none", "snappy", "zstd", "gzip", "brotli", "lz4")


def _parquet_options(schema: pa.Schema, compression: str, byte_stream_split: bool,
                     compression_level: int | None) -> dict[str, Any]:
    pa = _pa()
    if compression not in _CODECS:
        raise ValueError(f"compression={compression!r}; use one of {', '.join(_CODECS)}")
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


def _atomic_target(path: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)


def _write_streaming(store: Store, path: str | os.PathLike[str], columns: Any, rows: int, tensor_type: str,
                     progress: bool, open_writer: Any, write: Any, overwrite: bool = True,
                     storage_options: Any = None) -> str:
    from tqdm.auto import tqdm

    from .remote import is_url

    if isinstance(path, str) and is_url(path) and not path.lower().startswith("file://"):
        # Object storage: written locally, then uploaded in one atomic put.
        from .remote import upload

        with upload(path, storage_options, overwrite) as local:
            _write_streaming(store, local, columns, rows, tensor_type, progress, open_writer, write)
        return path
    if isinstance(path, str) and path.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(path).path)
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    table = to_arrow(store, columns, tensor_type)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        with open_writer(tmp, table.schema) as w, \
                tqdm(total=len(table), unit="inst", desc=f"export {os.path.basename(path)}",
                     disable=not progress, leave=False) as bar:
            for start in range(0, len(table), rows):
                write(w, table.slice(start, rows))
                bar.update(min(rows, len(table) - start))
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_parquet(store: Store, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None,
               row_group_size: int | None = None, compression: str = "none", byte_stream_split: bool = False,
               compression_level: int | None = None, tensor_type: str = "nested", progress: bool = False,
               overwrite: bool = True, storage_options: Any = None) -> str:
    """Write a Parquet file one row group at a time (see Store.to_parquet)."""
    import pyarrow.parquet as pq

    rows = _rows(row_group_size, store, columns, "row_group_size")
    schema = arrow_schema(store, columns, tensor_type)
    options = _parquet_options(schema, compression, byte_stream_split, compression_level)
    return _write_streaming(
        store, path, columns, rows, tensor_type, progress,
        lambda p, s: pq.ParquetWriter(p, s, **options),
        lambda w, t: w.write_table(t, row_group_size=rows), overwrite, storage_options,
    )


def to_ipc(store: Store, path: str | os.PathLike[str], columns: Sequence[str] | str | None = None,
           batch_size: int | None = None, compression: str = "none", tensor_type: str = "nested",
           progress: bool = False, overwrite: bool = True, storage_options: Any = None) -> str:
    """Write an Arrow IPC file (Feather v2, ``.arrow``), one record batch per
    ``batch_size`` rows; ``compression`` is none, lz4 or zstd."""
    pa = _pa()
    if compression not in ("none", "lz4", "zstd"):
        raise ValueError(f"compression={compression!r}; an Arrow IPC file takes none, lz4 or zstd")
    rows = _rows(batch_size, store, columns, "batch_size")
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    return _write_streaming(
        store, path, columns, rows, tensor_type, progress,
        lambda p, s: pa.ipc.new_file(p, s, options=options),
        lambda w, t: w.write_table(t, max_chunksize=rows), overwrite, storage_options,
    )
