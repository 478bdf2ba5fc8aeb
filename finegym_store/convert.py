"""Converting FineGym feature pickles (or in-memory dicts) into a store.

Peak memory is one input table plus a bounded staging buffer: columns are
loaded one at a time, streamed to the C++ writer in chunks, and dropped. The
writer commits atomically, so an interrupted conversion leaves no store.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
from tqdm.auto import tqdm

from . import __version__, _core, safe_pickle
from .errors import ConversionError
from .finegym import Categories, parse_element_id, read_categories, read_split
from .store import Store

__all__ = ["convert"]

FeatureSource = Union[str, os.PathLike, Mapping[str, Any]]

#: Bytes staged before each write to the C++ writer. Small enough to stay in
#: the CPU caches between the copy in, the writer's XXH64 pass and write();
#: 4 MiB streamed 2 GB faster than 64 MiB did (benchmarks/README.md, "Staging
#: buffer size"). The bytes written do not depend on it.
STAGING_BYTES = 4 << 20
_STORE_DTYPES = ("float32", "float16")


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
    writer: Any, name: str, where: str, table: Mapping[str, Any], ids: list[str], dtype: np.dtype, progress: bool
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
    writer.begin_features(name, dtype, int(lengths[0]) if fixed else 0, c)

    # Two staging buffers: while the C++ writer hashes and writes one (GIL
    # released), this thread fills the other.
    cap = max(STAGING_BYTES // (c * dtype.itemsize), int(lengths.max()))
    buffers = [np.empty((cap, c), dtype=dtype), np.empty((cap, c), dtype=dtype)]
    pending: list[Future[None] | None] = [None, None]
    current, used = 0, 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finegym-write") as io, \
            tqdm(total=len(ids), unit="inst", desc=f"write {name}", disable=not progress, leave=False) as bar, \
            np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf are stored as they are
        try:
            for k, (t, _) in zip(ids, shapes):
                if used + t > cap:
                    pending[current] = io.submit(writer.append_features, buffers[current][:used])
                    current, used = 1 - current, 0
                    previous = pending[current]
                    if previous is not None:
                        previous.result()  # that buffer's write is done: refill it
                np.copyto(buffers[current][used : used + t], table[k].reshape(t, c), casting="same_kind")
                used += t
                bar.update(1)
            if used:
                pending[current] = io.submit(writer.append_features, buffers[current][:used])
        finally:
            for f in pending:  # in order; re-raises a write error (disk full, ...)
                if f is not None:
                    f.result()
    writer.end_features(np.asarray([], np.int64) if fixed else lengths)
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
) -> Store:
    """Convert feature tables into a store at ``out`` and open it.

    ``features`` maps a column name (``[A-Za-z0-9_-]``, at most 40 characters)
    to the path of a FineGym feature pickle or to an in-memory dict
    ``{element_id: array}``; arrays are (T, C, 1, ..., 1) or (C,), any float
    dtype, stored as ``dtype`` (float32 or float16). With ``split`` (a FineGym
    split file) instances follow the split's order and carry its labels;
    without, they are sorted by id and labelled -1. ``categories`` adds the
    label hierarchy. Pickles are loaded through an allow-list unless
    ``trust_pickle``. The file appears only once complete.
    """
    out = os.fspath(out)
    if dtype not in _STORE_DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not supported; use 'float32' or 'float16'")
    store_dtype = np.dtype(dtype)
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
    unknown = _labels_without_class(labels, cats)
    if unknown:
        raise ConversionError(f"{split_path}: labels {unknown} have no class in {os.fspath(categories)}")  # type: ignore[arg-type]

    writer = None
    columns_attrs: dict[str, Any] = {}
    try:
        for name, source in features.items():
            where, table = _load(name, source, trust_pickle, progress)
            if ids is None:
                _check_keys(where, table, set(table), where)  # empty table, non-str keys
                ids = sorted(table)
            else:
                _check_keys(where, table, set(ids), split_path or "the first column")
            if writer is None:
                writer = _core.Writer(out, len(ids), overwrite)
            columns_attrs[name] = _write_column(writer, name, where, table, ids, store_dtype, progress)
            del table

        assert ids is not None and writer is not None
        _finish(writer, ids, labels, cats, {
            "split": split_path,
            "categories": os.fspath(categories) if categories is not None else None,
            "columns": columns_attrs,
        })
    finally:
        if writer is not None:
            writer.discard()  # no-op after commit; removes the temporary file otherwise
    return Store(out)


def _labels_without_class(labels: np.ndarray | None, cats: Categories | None) -> list[int]:
    """Up to 10 labels (other than -1) that the hierarchy has no class for."""
    if labels is None or cats is None:
        return []
    return sorted(set(np.unique(labels).tolist()) - set(cats.label.tolist()) - {-1})[:10]


def _finish(writer: Any, ids: list[str], labels: np.ndarray | None, cats: Categories | None,
            attrs: dict[str, Any]) -> None:
    """Everything after the feature columns: ids, labels, parsed fields, the
    hierarchy, the provenance JSON (``attrs``, with ``created_by``); then commit."""
    _write_instances(writer, ids, labels)
    if cats is not None:
        _write_classes(writer, cats)
    doc = {"created_by": f"finegym-store {__version__}", **attrs}
    writer.add_array(_core.SECTIONS["attrs"], np.frombuffer(json.dumps(doc).encode("utf-8"), dtype=np.uint8))
    writer.commit()


def _write_instances(writer: Any, ids: list[str], labels: np.ndarray | None) -> None:
    names = _core.SECTIONS  # spelled once, in format.hpp
    n = len(ids)
    writer.add_strings(names["ids"], ids)
    writer.add_array(names["labels"], labels if labels is not None else np.full(n, -1, dtype=np.int32))
    parsed = [parse_element_id(k) for k in ids]
    writer.add_strings(names["meta_video"], [p.video if p else "" for p in parsed])
    for section in names["meta_ints"]:  # meta/event_start, ...: named after the ParsedId fields they hold
        field = section.rsplit("/", 1)[1]
        values = np.fromiter((getattr(p, field) if p else -1 for p in parsed), dtype=np.int32, count=n)
        writer.add_array(section, values)


def _write_classes(writer: Any, cats: Categories) -> None:
    label, glabel, set_ = _core.SECTIONS["class_ints"]
    name, event = _core.SECTIONS["class_strings"]
    writer.add_array(label, cats.label)
    writer.add_array(glabel, cats.glabel)
    writer.add_array(set_, cats.set)
    writer.add_strings(name, cats.name)
    writer.add_strings(event, cats.event)
