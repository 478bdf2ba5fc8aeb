"""Converting FineGym feature pickles (or in-memory dicts) into a store.

Peak memory is one input table plus a bounded staging buffer: columns are
loaded one at a time, streamed to the C++ writer in chunks, and dropped. The
writer commits atomically, so an interrupted conversion leaves no store.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
from tqdm.auto import tqdm

from . import _core, safe_pickle, sources
from ._write import ColumnWriter, StoreWriter, store_dtype
from .errors import ConversionError
from .finegym import Categories, read_categories, read_split
from .labelspace import check_fit
from .store import Store

__all__ = ["convert", "check_inputs", "MISSING", "EXTRA"]

FeatureSource = Union[str, os.PathLike, Mapping[str, Any], sources.HDF5Source]

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
    if isinstance(source, sources.LazyTable):
        return source.where, source
    if isinstance(source, Mapping):
        return f"features[{name!r}] (in-memory dict)", source
    if not isinstance(source, (str, os.PathLike, sources.HDF5Source)):
        raise TypeError(
            f"features[{name!r}] must be a path (a pickle, a folder of .npy files, an HDF5 file), an "
            f"HDF5Source or a dict, got {type(source).__name__}"
        )
    lazy = sources.open_source(source)
    if lazy is not None:
        return lazy.where, lazy
    path = os.fspath(source)
    size = os.path.getsize(path)
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"load {name}", disable=not progress,
              leave=False) as bar:
        table = safe_pickle.load(path, trust=trust_pickle, on_read=bar.update)
    if not isinstance(table, Mapping):
        raise ConversionError(f"{path}: expected a dict of element id -> array, got {type(table).__name__}")
    return path, table


def _instance_shape(where: str, key: str, value: Any) -> tuple[int, int]:
    """(T, C) of one value (an array, or the header of one not read yet), or
    ConversionError naming file and key."""
    if not isinstance(value, (np.ndarray, sources.Header)):
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
    if isinstance(table, sources.LazyTable):  # shapes from the headers; each instance read once, below
        meta_of: Any = table.header
        where_of: Any = table.where_of
    else:
        meta_of, where_of = table.__getitem__, lambda k: where
    shapes = [_instance_shape(where_of(k), k, meta_of(k)) for k in ids]
    c = shapes[0][1]
    for k, (_, ck) in zip(ids, shapes):
        if ck != c:
            raise ConversionError(
                f"{where_of(k)}: key {_short(k)} has C = {ck} channels but {_short(ids[0])} has C = {c}; "
                "C must be the same for every instance of a column"
            )
    def shapes_of(k: str) -> tuple[int, ...]:
        return tuple(meta_of(k).shape)

    lengths = np.fromiter((t for t, _ in shapes), dtype=np.int64, count=len(shapes))
    fixed = bool((lengths == lengths[0]).all())
    column: ColumnWriter = writer.column(name, dtype, int(lengths[0]) if fixed else None, c)
    with tqdm(total=len(ids), unit="inst", desc=f"write {name}", disable=not progress, leave=False) as bar:
        for k, (t, _) in zip(ids, shapes):
            value = table[k]
            if value.shape != shapes_of(k):  # a lazy table's file changed after its header was read
                raise ConversionError(f"{where_of(k)}: key {_short(k)}: shape {value.shape} where the header "
                                      f"said {shapes_of(k)}")
            column.append(value.reshape(t, c))
            bar.update(1)
    column.close(None if fixed else lengths)
    source_dtypes = sorted({str(meta_of(k).dtype) for k in ids[:1000]})
    return {"source": where, "source_dtypes": source_dtypes, "segments": int(lengths[0]) if fixed else None,
            "channels": c}


def _check_keys(where: str, table: Mapping[str, Any], expected: set[str], against: str, missing: str = "error",
                extra: str = "error") -> tuple[set[str], set[str]]:
    """(ids of ``expected`` the table lacks, its ids outside ``expected``);
    ConversionError unless ``missing="drop"`` / ``extra="ignore"`` allow them."""
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
        return set(), set()
    lacking, outside = expected - keys, keys - expected
    parts = []
    if lacking and missing != "drop":
        parts.append(f"{len(lacking)} ids of {against} are missing: {_examples(lacking)} "
                     "(missing='drop', --drop-missing, leaves them out of the store)")
    if outside and extra != "ignore":
        parts.append(f"{len(outside)} ids are not in {against}: {_examples(outside)} "
                     "(extra='ignore', --ignore-extra, skips them)")
    if parts:
        raise ConversionError(f"{where}: " + "; ".join(parts))
    return lacking, outside


#: What ``convert(missing=...)`` and ``convert(extra=...)`` accept.
MISSING = ("error", "drop")
EXTRA = ("error", "ignore")
_OVERRIDE = "allow_label_mismatch=True (--allow-label-mismatch)"
#: Ids recorded in the provenance per list (the counts are always complete).
RECORDED_IDS = 100


def check_inputs(features: Mapping[str, Any], split: Any, categories: Any, cli: bool = False) -> None:
    """Every input path exists and is a file, before the first pickle is read.
    FileNotFoundError / IsADirectoryError name the option (``--split`` on the
    command line, ``split`` in Python) and the path."""
    named = [("--split" if cli else "split", split, False), ("--categories" if cli else "categories", categories, False)]
    named += [(f"-f {name}=" if cli else f"features[{name!r}]",
               source.path if isinstance(source, sources.HDF5Source) else source, True)
              for name, source in features.items() if isinstance(source, (str, os.PathLike, sources.HDF5Source))]
    for option, path, folder_ok in named:  # a feature source may be a folder of .npy files
        if path is None:
            continue
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{option}: no such file: {path}")
        if os.path.isdir(path) and not folder_ok:
            raise IsADirectoryError(f"{option}: {path} is a folder, not a file")


def _recorded(ids: set[str] | list[str]) -> dict[str, Any]:
    return {"count": len(ids), "ids": sorted(ids)[:RECORDED_IDS]}


def convert(
    features: Mapping[str, FeatureSource],
    out: str | os.PathLike[str],
    *,
    split: str | os.PathLike[str] | None = None,
    categories: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    trust_pickle: bool = False,
    missing: str = "error",
    extra: str = "error",
    allow_label_mismatch: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Convert feature tables into a store at ``out`` and open it
    (``convert(features, out)``: what is read first, where it goes second,
    as in :func:`from_arrow`).

    ``features`` maps a column name (``[A-Za-z0-9_-]``, at most 40 characters)
    to the path of a FineGym feature pickle, a folder of ``<id>.npy`` files
    (one per instance), an HDF5 file (``.h5``/``.hdf5``: one dataset per
    instance named by its id, or one (N, C) / (N, T, C) array plus a dataset
    of N ids; :class:`~finegym_store.sources.HDF5Source` names the datasets
    when that is ambiguous; needs h5py), or an in-memory dict
    ``{element_id: array}``. Folders and HDF5 files are read one instance at
    a time. Arrays are (T, C, 1, ..., 1) or (C,), any float
    dtype, stored as ``dtype`` (float32 or float16). With ``split`` (a FineGym
    split file) instances follow the split's order and carry its labels;
    without, they are sorted by the first column's ids and labelled -1.
    ``categories`` adds the label hierarchy; the split's labels must fit it
    (docs/converting.md, "Label spaces") unless ``allow_label_mismatch``. Pickles are
    loaded through an allow-list unless ``trust_pickle``. The file appears
    only once complete. ``out`` may be an ``s3://`` URL: the store is
    written to a local temporary file, then uploaded in one atomic put
    (``storage_options`` as for :func:`finegym_store.open`), and the remote
    store is returned.

    Every table must hold exactly the split's ids (without a split: the first
    column's). ``missing="drop"`` leaves out the ids some table lacks (across
    several tables: their intersection); ``extra="ignore"`` skips a table's
    ids outside the split. What was left out is printed on stderr (when
    ``progress``) and recorded in ``attrs["alignment"]``. A table that lacks
    ids the columns before it were written for makes the conversion start
    over without them (reading those tables again).
    """
    if isinstance(features, (str, os.PathLike)) and isinstance(out, Mapping):
        raise TypeError("convert(features, out): the features mapping comes first and the output path second "
                        "(as in from_arrow(source, out)); swap the two arguments")
    from .remote import is_url

    if isinstance(out, str) and is_url(out) and not out.lower().startswith("file://"):
        from .remote import upload
        from .store import open as open_store

        with upload(out, storage_options, overwrite) as local:
            convert(features, local, split=split, categories=categories, dtype=dtype, progress=progress,
                    trust_pickle=trust_pickle, missing=missing, extra=extra,
                    allow_label_mismatch=allow_label_mismatch)
        return open_store(out, storage_options=dict(storage_options or {}))
    if isinstance(out, str) and out.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        out = unquote(urlparse(out).path)
    out = os.fspath(out)
    stored_as = store_dtype(dtype, "convert")
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    if extra not in EXTRA:
        raise ValueError(f"extra must be one of {EXTRA}, got {extra!r}")
    if not isinstance(allow_label_mismatch, bool):
        raise ValueError(f"allow_label_mismatch must be True or False, got {allow_label_mismatch!r}")
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty mapping of column name -> pickle path or dict")
    for name in features:
        if not isinstance(name, str) or not _core.valid_column_name(name):
            raise ConversionError(f"column name {name!r} must be 1..40 characters of [A-Za-z0-9_-] and not 'offsets'")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    check_inputs(features, split, categories)

    reference: list[str] | None = None  # the split's ids, else the first column's
    split_labels: np.ndarray | None = None
    split_path = os.fspath(split) if split is not None else None
    categories_path = os.fspath(categories) if categories is not None else None
    if split_path is not None:
        reference, split_labels = read_split(split_path)
    cats: Categories | None = read_categories(categories_path) if categories_path is not None else None
    # Before any pickle is read (the write path checks the final labels again).
    check_fit(split_labels, cats, split_path or "", categories_path or "", split_path, allow_label_mismatch,
              _OVERRIDE)

    lacking: dict[str, set[str]] = {}  # column -> reference ids its table lacks (dropped)
    ignored: dict[str, set[str]] = {}  # column -> its ids outside the reference (skipped)
    while True:  # one pass, again when a later table lacks ids the columns written so far hold
        columns_attrs: dict[str, Any] = {}
        restart = False
        with contextlib.ExitStack() as stack:
            writer: StoreWriter | None = None  # created once the ids are known
            ids: list[str] | None = None
            labels: np.ndarray | None = None
            against = split_path
            for name, source in features.items():
                where, table = _load(name, source, trust_pickle, progress)
                if isinstance(table, sources.LazyTable) and table is not source:
                    stack.callback(table.close)
                if against is None:
                    against = "the first column"
                if reference is None:
                    _check_keys(where, table, set(table), where)  # empty table, non-str keys
                    reference = sorted(table)
                    lacks, outside = set(), set()
                else:
                    lacks, outside = _check_keys(where, table, set(reference), against, missing, extra)
                if lacks:
                    lacking[name] = lacks
                if outside:
                    ignored[name] = outside
                drop = set().union(*lacking.values())
                if ids is not None and any(k in drop for k in ids):
                    restart = True  # the columns written so far hold ids this table lacks
                    if progress:
                        print(f"convert: {name} ({_source_name(source)}) lacks {len(lacks)} ids the columns "
                              "written so far hold; starting over without them", file=sys.stderr)
                    break
                if ids is None:
                    keep = [k not in drop for k in reference]
                    ids = [k for k, kept in zip(reference, keep) if kept]
                    if not ids:
                        raise ConversionError(
                            f"{where}: no id is left: each of the {len(reference)} ids of {against} is missing "
                            f"from some table ({where} lacks {len(lacks)} of them)")
                    labels = split_labels[np.asarray(keep)] if split_labels is not None else None
                    writer = stack.enter_context(StoreWriter.create(out, len(ids), overwrite=overwrite))
                assert writer is not None
                columns_attrs[name] = _write_column(writer, name, where, table, ids, stored_as, progress)
                del table
            if restart:
                continue

            assert ids is not None and writer is not None
            alignment: dict[str, Any] = {"missing": missing, "extra": extra}
            if lacking:
                alignment["dropped"] = {**_recorded(set().union(*lacking.values())),
                                        "by_column": {k: _recorded(v) for k, v in lacking.items()}}
            if ignored:
                alignment["ignored"] = {k: _recorded(v) for k, v in ignored.items()}
            writer.finish(ids, labels, cats, {
                "split": split_path,
                "categories": categories_path,
                "columns": columns_attrs,
                "alignment": alignment,
            }, labels_from=split_path or "", categories_from=categories_path or "", name=split_path,
                allow_label_mismatch=allow_label_mismatch, override=_OVERRIDE)
        break
    if progress:
        _report_alignment(features, lacking, ignored, split_path or "the first column")
    return Store(out)


def _report_alignment(features: Mapping[str, Any], lacking: dict[str, set[str]], ignored: dict[str, set[str]],
                      against: str) -> None:
    for name, ids in lacking.items():
        print(f"convert: dropped {len(ids)} ids of {against} that {name} ({_source_name(features[name])}) lacks: "
              f"{_examples(ids)}", file=sys.stderr)
    for name, ids in ignored.items():
        print(f"convert: ignored {len(ids)} ids of {name} ({_source_name(features[name])}) not in {against}: "
              f"{_examples(ids)}", file=sys.stderr)


def _source_name(source: Any) -> str:
    if isinstance(source, sources.HDF5Source):
        return os.fspath(source.path)
    if isinstance(source, sources.LazyTable):
        return source.where
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "in-memory dict"
