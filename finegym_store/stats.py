"""Per-channel statistics of feature columns: :class:`ColumnStats`,
:meth:`finegym_store.Store.stats`, and :func:`add_stats` (``finegym-store
stats``) for stores written before format version 3.

A store of format version 3 holds, for every feature column, the mean and
standard deviation of each channel over every stored row (a fixed-T column's
N x T rows, a ragged column's S rows), computed by the writer from the values
as stored, in float64, in the pass that writes the column (``convert``,
every import, ``select``). ``gather(..., normalize=True)`` applies them.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from .store import Store

__all__ = ["ColumnStats", "add_stats"]


class ColumnStats(NamedTuple):
    """Statistics of one feature column (:meth:`finegym_store.Store.stats`)."""

    #: (C,) float32: each channel's mean over every stored row.
    mean: np.ndarray
    #: (C,) float32: each channel's standard deviation (divided by ``count``, not count - 1).
    std: np.ndarray
    #: The rows they are over: N x T for a fixed-T column, the total row count when ragged.
    count: int


def missing_message(store: Store, column: str) -> str:
    return (f"{store.path} (format version {store.format_version}) holds no statistics for column {column!r}: "
            f"`finegym-store stats {store.path} --output NEW.fgs` (or finegym_store.add_stats) writes a copy "
            "that does")


def add_stats(source: Store | str | os.PathLike[str], out: str | os.PathLike[str], *,
              stats_from: Store | str | os.PathLike[str] | None = None, overwrite: bool = False) -> Store:
    """Write ``source`` with per-channel statistics (format version 3) to
    ``out`` and return it opened. Every column, id, label, the hierarchy and
    the provenance are copied (attrs gain a ``selected_from`` entry naming
    the source); the writer computes the statistics as it writes each column.

    ``stats_from`` (a store or its path or URL): every column gets that
    store's statistics of the column of the same name instead, so that
    ``normalize=True`` on a validation store standardises with its training
    store's mean and deviation. Each column needs a column of that name and
    channel count there, with statistics (ValueError naming the column
    otherwise). ``attrs["stats_from"]`` records the store and its row
    counts; :meth:`Store.stats` then reports those counts.

    ``out`` may be ``source`` itself with ``overwrite=True``: the new file is
    written beside it and renamed over it once complete (a symlink's target
    is replaced; processes that have the old store open keep reading it).
    An existing ``out`` other than the source also needs ``overwrite=True``.
    A failure leaves nothing behind and the source untouched."""
    from . import select as sel
    from .store import Store, open as open_store

    store = source if isinstance(source, Store) else open_store(source)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if stats_from is not None and not isinstance(stats_from, (Store, str, os.PathLike)):
        raise TypeError(f"stats_from must be a Store, a path or None, got {type(stats_from).__name__}")
    given = stats_from if stats_from is None or isinstance(stats_from, Store) else open_store(stats_from)
    out = os.fspath(out)
    how = "every row, to add per-channel statistics" if given is None else \
        "every row, with the per-channel statistics of another store"
    local = "://" not in store.path
    if not local and out == store.path:
        raise ValueError(f"{out} is a remote store: it cannot be replaced in place; write the copy elsewhere "
                         "(out=PATH, finegym-store stats URL --output PATH)")
    if not (local and os.path.exists(out) and os.path.samefile(out, store.path)):
        return sel.select(store, slice(None), out, overwrite=overwrite, how=how, stats_from=given)
    if not overwrite:
        raise FileExistsError(f"{out} is the source store; pass overwrite=True to replace it with a copy that "
                              "holds statistics")
    if store.format_version >= 3 and given is None:
        return store  # it holds them already: nothing to replace
    target = os.path.realpath(out)
    folder, name = os.path.split(target)
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.stats.tmp")
    try:
        sel.select(store, slice(None), temp, overwrite=False, how=how, stats_from=given)
        os.replace(temp, target)
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    return Store(target)


def given_stats(store: Store, source: Store) -> dict[str, ColumnStats]:
    """The statistics of ``source`` for every column of ``store``
    (``add_stats(stats_from=...)``): a column of the same name and channel
    count with statistics, or ValueError naming the column, both stores and
    what differs."""
    out = {}
    for name in store.columns:
        if name not in source.columns:
            raise ValueError(f"stats_from: {source.path} has no column {name!r} (it has {', '.join(source.columns)}); "
                             f"{store.path} needs statistics for each of its columns "
                             f"({', '.join(store.columns)})")
        mine, theirs = store.column(name).channels, source.column(name).channels
        if mine != theirs:
            raise ValueError(f"stats_from: column {name!r} has {theirs} channels in {source.path} but {mine} in "
                             f"{store.path}; statistics apply only to a column of the same features")
        out[name] = source.stats(name)  # ValueError for a store without statistics, saying how to add them
    return out
