"""Converting FineGym feature pickles (or in-memory dicts) into a store.

Peak memory is one input table plus a bounded staging buffer: columns are
loaded one at a time, streamed to the C++ writer in chunks, and dropped. The
writer commits atomically, so an interrupted conversion leaves no store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
from tqdm.auto import tqdm

from . import _core, safe_pickle
from ._write import ColumnWriter, StoreWriter, labels_without_class, store_dtype
from .errors import ConversionError
from .finegym import Categories, read_categories, read_split
from .store import Store

__all__ = ["convert"]

FeatureSource = Union[str, os.PathLike, Mapping[str, Any]]

def _short(key: Any, limit: int = 80) -> str:
    """repr of a key for a message, cut to about ``limit`` characters (a
    hostile pickle's keys may be megabytes long)."""
    if isinstance(key, (str, bytes)) and len(key) > limit:
        return repr(key[:limit]) + f"... ({len(key)} {'characters' if isinstance(key, str) else 'bytes'})"
    if isinstance(key, int) and not isinstance(key, bool) and abs(key) >= 10**limit:
        return f"an int of {key.bit_length()} bits"
    return repr(key)


def _examples(keys: set[str], n: int = 5) -> str:
    shown = sorted(keys)[:n]
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(_short(k) for k in shown) + more


def _load(name: str, source: FeatureSource, trust_pickle: bool, progress: bool) -> tuple[str, Mapping[str, Any]]:
    """(description of the source, the table) for one column."""
    if isinstance(source, Mapping):
        return f"features[{name!r}] (in-memory dict)", source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"features[{name!r}] must be a path to a pickle or a dict, got {type(source).__name__}"
        )
    path = os.fspath(source)
    size = os.path.getsize(path)
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"load {name}", disable=not progress,
              leave=False) as bar:
        table = safe_pickle.load(path, trust=trust_pickle, on_read=bar.update)
    if not isinstance(table, Mapping):
        raise ConversionError(f"{path}: expected a dict of element id -> array, got {type(table).__name__}")
    return path, table


def _instance_shape(where: str, key: str, value: Any) -> tuple[int, int]:
    """(T, C) of one value, or ConversionError naming file and key."""
    if not isinstance(value, np.ndarray):
        raise ConversionError(f"{where}: key {_short(key)}: expected a numpy array, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise ConversionError(
            f"{where}: key {_short(key)}: expected a floating-point array, got dtype {value.dtype}"
        )
    shape = value.shape
    if len(shape) == 1:
        t, c = 1, shape[0]
    elif len(shape) >= 2 and all(d == 1 for d in shape[2:]):
        t, c = shape[0], shape[1]
    else:
        raise ConversionError(
            f"{where}: key {_short(key)}: expected shape (T, C, 1, ..., 1) or (C,), got {shape}"
        )
    if t == 0 or c == 0:
        raise ConversionError(f"{where}: key {_short(key)}: empty array of shape {shape}")
    return t, c


def _write_column(
    writer: StoreWriter, name: str, where: str, table: Mapping[str, Any], ids: list[str], dtype: np.dtype,
    progress: bool,
) -> dict[str, Any]:
    shapes = [_instance_shape(where, k, table[k]) for k in ids]
    c = shapes[0][1]
    for k, (_, ck) in zip(ids, shapes):
        if ck != c:
            raise ConversionError(
                f"{where}: key {_short(k)} has C = {ck} channels but {_short(ids[0])} has C = {c}; "
                "C must be the same for every instance of a column"
            )
    lengths = np.fromiter((t for t, _ in shapes), dtype=np.int64, count=len(shapes))
    fixed = bool((lengths == lengths[0]).all())
    column: ColumnWriter = writer.column(name, dtype, int(lengths[0]) if fixed else None, c)
    with tqdm(total=len(ids), unit="inst", desc=f"write {name}", disable=not progress, leave=False) as bar:
        for k, (t, _) in zip(ids, shapes):
            column.append(table[k].reshape(t, c))
            bar.update(1)
    column.close(None if fixed else lengths)
    source_dtypes = sorted({str(table[k].dtype) for k in ids[:1000]})
    return {"source": where, "source_dtypes": source_dtypes, "segments": int(lengths[0]) if fixed else None,
            "channels": c}


def _check_keys(where: str, table: Mapping[str, Any], expected: set[str], against: str) -> None:
    if not table:
        raise ConversionError(f"{where}: the feature dict is empty")
    keys = set(table)
    # Before the equality shortcut: without a split, `expected` is the table's
    # own key set, so non-str keys would otherwise reach the writer.
    not_str = [k for k in keys if not isinstance(k, str)]
    if not_str:
        raise ConversionError(
            f"{where}: keys must be str element ids, found {type(not_str[0]).__name__} {_short(not_str[0])}"
        )
    # Ids are stored as UTF-8: a str with lone surrogates (which pickles can
    # hold) would fail only in the writer, after every column was written.
    for k in keys:
        try:
            k.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConversionError(
                f"{where}: key {_short(k)} is not valid Unicode text ({e.reason} at index {e.start}); "
                "element ids must be encodable as UTF-8"
            ) from None
    if keys == expected:
        return
    missing, extra = expected - keys, keys - expected
    parts = []
    if missing:
        parts.append(f"{len(missing)} ids of {against} are missing: {_examples(missing)}")
    if extra:
        parts.append(f"{len(extra)} ids are not in {against}: {_examples(extra)}")
    raise ConversionError(f"{where}: " + "; ".join(parts))


def convert(
    out: str | os.PathLike[str],
    features: Mapping[str, FeatureSource],
    split: str | os.PathLike[str] | None = None,
    categories: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    trust_pickle: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Convert feature tables into a store at ``out`` and open it.

    ``features`` maps a column name (``[A-Za-z0-9_-]``, at most 40 characters)
    to the path of a FineGym feature pickle or to an in-memory dict
    ``{element_id: array}``; arrays are (T, C, 1, ..., 1) or (C,), any float
    dtype, stored as ``dtype`` (float32 or float16). With ``split`` (a FineGym
    split file) instances follow the split's order and carry its labels;
    without, they are sorted by id and labelled -1. ``categories`` adds the
    label hierarchy. Pickles are loaded through an allow-list unless
    ``trust_pickle``. The file appears only once complete. ``out`` may be
    an ``s3://`` URL: the store is written to a local temporary file, then
    uploaded in one atomic put (``storage_options`` as for
    :func:`finegym_store.open`), and the remote store is returned.
    """
    from .remote import is_url

    if isinstance(out, str) and is_url(out) and not out.lower().startswith("file://"):
        from .remote import upload
        from .store import open as open_store

        with upload(out, storage_options, overwrite) as local:
            convert(local, features, split=split, categories=categories, dtype=dtype, progress=progress,
                    trust_pickle=trust_pickle)
        return open_store(out, storage_options=dict(storage_options or {}))
    if isinstance(out, str) and out.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        out = unquote(urlparse(out).path)
    out = os.fspath(out)
    stored_as = store_dtype(dtype, "convert")
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty mapping of column name -> pickle path or dict")
    for name in features:
        if not isinstance(name, str) or not _core.valid_column_name(name):
            raise ConversionError(f"column name {name!r} must be 1..40 characters of [A-Za-z0-9_-] and not 'offsets'")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")

    ids: list[str] | None = None
    labels: np.ndarray | None = None
    split_path = os.fspath(split) if split is not None else None
    if split_path is not None:
        ids, labels = read_split(split_path)
    cats: Categories | None = read_categories(categories) if categories is not None else None
    unknown = labels_without_class(labels, cats)
    if unknown:
        raise ConversionError(f"{split_path}: labels {unknown} have no class in {os.fspath(categories)}")  # type: ignore[arg-type]

    columns_attrs: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        writer: StoreWriter | None = None  # created once the first column says how many instances there are
        for name, source in features.items():
            where, table = _load(name, source, trust_pickle, progress)
            if ids is None:
                _check_keys(where, table, set(table), where)  # empty table, non-str keys
                ids = sorted(table)
            else:
                _check_keys(where, table, set(ids), split_path or "the first column")
            if writer is None:
                writer = stack.enter_context(StoreWriter.create(out, len(ids), overwrite=overwrite))
            columns_attrs[name] = _write_column(writer, name, where, table, ids, stored_as, progress)
            del table

        assert ids is not None and writer is not None
        writer.finish(ids, labels, cats, {
            "split": split_path,
            "categories": os.fspath(categories) if categories is not None else None,
            "columns": columns_attrs,
        })
    return Store(out)


def _labels_without_class(labels: np.ndarray | None, cats: Categories | None) -> list[int]:
    return labels_without_class(labels, cats)


def _finish(writer: Any, ids: list[str], labels: np.ndarray | None, cats: Categories | None,
            attrs: dict[str, Any]) -> None:
    StoreWriter(writer).finish(ids, labels, cats, attrs)
