"""Row selection into a new store: ``Store.select`` and ``finegym-store select``.

The selected instances are written through the one write path
(finegym_store._write.StoreWriter), column by column: fixed-T columns are
gathered in chunks of about STAGING_BYTES (a copy, guarded against a file
changed while open), ragged ones instance by instance. Ids, labels, the
parsed id fields, the hierarchy and the provenance follow; the file appears
only once complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._write import STAGING_BYTES, StoreWriter
from .finegym import Categories, read_split
from .stats import given_stats

if TYPE_CHECKING:
    from .store import Store

__all__ = ["select", "rows_of", "ids_file", "split_ids", "parse_rows"]

#: attrs keys written anew for every store (not copied from the source).
_FRESH = ("created_by", "label_space", "label_mismatch_allowed", "selected_from", "stats_from")


def rows_of(store: Store, rows_or_ids: Any) -> np.ndarray:
    """Row positions (int64) of a selection: ints (or an integer array), a
    slice, a range, or str ids. TypeError for anything else (a bool mask
    included); IndexError names an out-of-range row, KeyError an unknown id,
    ValueError an empty selection or one that names an instance twice."""
    return _resolve(store, rows_or_ids)[0]


def _resolve(store: Store, rows_or_ids: Any) -> tuple[np.ndarray, str]:
    """(rows_of, "ids" or "rows": what the selection named)."""
    n = len(store)
    kind = "rows"
    if isinstance(rows_or_ids, slice):
        rows = np.arange(n, dtype=np.int64)[rows_or_ids]
    elif isinstance(rows_or_ids, (str, bytes)):
        raise TypeError(f"select takes a sequence of ids or rows, not one {type(rows_or_ids).__name__} "
                        f"({rows_or_ids[:80]!r}); wrap it in a list")
    else:
        if isinstance(rows_or_ids, np.ndarray):
            items: Any = rows_or_ids
        elif isinstance(rows_or_ids, Iterable):
            items = list(rows_or_ids)
        else:
            raise TypeError(f"select takes row positions or ids, got {type(rows_or_ids).__name__}")
        arr = np.asarray(items)
        if arr.size == 0:
            rows = np.zeros(0, np.int64)
        elif arr.ndim != 1:
            raise TypeError(f"select takes a 1-D sequence of row positions or ids, got shape {arr.shape}")
        elif arr.dtype.kind in "US" or all(isinstance(k, str) for k in items):
            if not all(isinstance(k, str) for k in items):
                bad = next(k for k in items if not isinstance(k, str))
                raise TypeError(f"select: a selection of ids holds a {type(bad).__name__} ({bad!r})")
            rows = np.asarray(store.index_of([str(k) for k in items]), dtype=np.int64)
            kind = "ids"
        elif arr.dtype.kind in "iu" and not any(isinstance(k, (bool, np.bool_)) for k in items):
            rows = arr.astype(np.int64)
            bad = np.flatnonzero((rows < 0) | (rows >= n))
            if len(bad):
                j = int(bad[0])
                raise IndexError(f"row {int(arr[j])} (position {j} of the selection) is out of range for "
                                 f"{store.path}, which has rows 0..{n - 1}")
        else:
            raise TypeError(f"select takes row positions (integers) or ids (str), got {arr.dtype} values; "
                            "for a boolean mask pass np.flatnonzero(mask)")
    if len(rows) == 0:
        raise ValueError(f"the selection from {store.path} is empty; a store holds at least one instance")
    order = np.argsort(rows, kind="stable")
    twice = np.flatnonzero(np.diff(rows[order]) == 0)
    if len(twice):
        a, b = int(order[twice[0]]), int(order[twice[0] + 1])
        r = int(rows[a])
        raise ValueError(f"the selection names row {r} (id {store.ids[r]!r}) twice, at positions {a} and {b}; "
                         "a store's ids are unique")
    return rows, kind


def parse_rows(text: str, n: int) -> np.ndarray:
    """Rows A:B (either end may be left out: 0 and n) of a store of n rows;
    ValueError naming ``--rows`` unless 0 <= A < B <= n."""
    a, sep, b = text.partition(":")
    try:
        if not sep or ":" in b:
            raise ValueError
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else n
    except ValueError:
        raise ValueError(f"--rows: expected A:B (e.g. 0:1000), got {text!r}") from None
    if not 0 <= start < stop <= n:
        raise ValueError(f"--rows {text}: need 0 <= A < B <= {n} (the store has {n} rows)")
    return np.arange(start, stop, dtype=np.int64)


def ids_file(path: str | os.PathLike[str]) -> list[str]:
    """Ids, one per line (blank lines skipped; a line may hold '<id> <label>':
    the first field is the id)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def split_ids(store: Store, path: str | os.PathLike[str]) -> list[str]:
    """The ids of a split file, which must all be in ``store`` with the labels
    the split gives them (ValueError naming the file, its count of unknown ids
    and the first mismatching label otherwise)."""
    path = os.fspath(path)
    ids, labels = read_split(path)
    index = store.index_of  # builds the lookup once
    unknown = []
    rows = np.empty(len(ids), np.int64)
    for j, k in enumerate(ids):
        try:
            rows[j] = index(k)
        except KeyError:
            unknown.append(k)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5
                                                           else "")
        raise ValueError(f"{path}: {len(unknown)} of its {len(ids)} ids are not in {store.path}: {shown}")
    stored = np.asarray(store.labels)[rows]
    differ = np.flatnonzero(stored != labels)
    if len(differ):
        j = int(differ[0])
        raise ValueError(f"{path}: {ids[j]!r} has label {int(labels[j])} there but {int(stored[j])} in "
                         f"{store.path} ({len(differ)} ids differ); a split selects the instances it labels alike")
    return ids


def select(store: Store, rows_or_ids: Any, out: str | os.PathLike[str], *, overwrite: bool = False,
           how: str | None = None, stats_from: Store | None = None) -> Store:
    """See :meth:`Store.select`; ``how`` describes the selection in
    ``attrs["selected_from"]`` (default: the count and the kind).
    ``stats_from``: every column gets that store's statistics of the column
    of its name instead of its own rows' (:func:`finegym_store.add_stats`),
    recorded in ``attrs["stats_from"]``."""
    from .store import Store

    out = os.fspath(out)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if os.path.exists(out):
        if os.path.samefile(out, store.path):
            raise ValueError(f"{out} is the store being selected from; select into another path")
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    rows, kind = _resolve(store, rows_or_ids)
    if how is None:
        contiguous = isinstance(rows_or_ids, (slice, range)) and rows_or_ids.step in (None, 1)
        how = f"rows {int(rows[0])}:{int(rows[-1]) + 1}" if contiguous else f"{len(rows)} {kind}"
    source_attrs = store.attrs
    attrs = {k: v for k, v in source_attrs.items() if k not in _FRESH}
    attrs["selected_from"] = {
        "path": _where(store),
        "instances": len(store),
        "selected": int(len(rows)),
        "how": how,
        **({"selected_from": source_attrs["selected_from"]} if "selected_from" in source_attrs else {}),
    }
    given = None if stats_from is None else given_stats(store, stats_from)
    if given is not None:
        attrs["stats_from"] = {"path": _where(stats_from), "counts": {k: v.count for k, v in given.items()}}
    all_ids = store.ids.to_list()
    ids = [all_ids[r] for r in rows.tolist()]
    labels = np.asarray(store.labels)[rows]
    c = store.classes
    cats = None if c is None else Categories(np.array(c.label), np.array(c.glabel), np.array(c.set),
                                             c.event.to_list(), c.name.to_list())
    with StoreWriter.create(out, len(rows), overwrite=overwrite) as writer:
        for name in store.columns:
            col = store.column(name)
            w = writer.column(name, col.dtype, col.length, col.channels)
            if col.length is not None:
                step = max(1, STAGING_BYTES // (col.length * col.channels * col.dtype.itemsize))
                for a in range(0, len(rows), step):
                    chunk = store.gather(name, rows[a : a + step], num_segments=None, mode="test")
                    w.append(chunk.reshape(-1, col.channels))
                w.close(None, None if given is None else given[name])
            else:
                store._ensure_rows(name, rows)  # a remote store: all these rows in parallel requests, once
                for r in rows.tolist():
                    w.append(store.features(name, r))
                w.close(col.lengths()[rows], None if given is None else given[name])
        writer.finish(ids, labels, cats, attrs, labels_from=store.path, categories_from=f"{store.path}'s hierarchy",
                      name=os.path.basename(store.path),
                      allow_label_mismatch=bool(source_attrs.get("label_mismatch_allowed")),
                      label_space=store.label_space)
    return Store(out)


def _where(store: Store) -> str:
    """A store's absolute path, or its URL."""
    return store.path if "://" in store.path else os.path.abspath(store.path)

