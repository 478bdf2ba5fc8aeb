"""The benchmark inputs: FineGym-size feature dicts, their pickles, split
files and stores, generated once into one cache folder, and the layout of a
store's feature section.

The cache folder is ``--data`` (default: ``$FINEGYM_BENCH_DIR``, else
``$XDG_CACHE_HOME/finegym-store/bench``, else ``~/.cache/finegym-store/bench``).
For a column (i3d or tsn) and N instances it holds:

- ``COLUMN_N.fgs``: the store (the split file's order and labels, the gym99
  hierarchy shipped with the package);
- ``gym99_N_element.txt``: the split file (ids in order, long-tailed labels);
- ``COLUMN_N.pkl``: the same features as a dict pickled the way the release
  did (``synth.write_pickle``), built only when a measurement asks for it;
- ``manifest_COLUMN_N.json``: how they were made; files made otherwise are
  rebuilt;
- ``peer_COLUMN_N.*``: the other formats (``finegym_store.bench.peers``).

Files are written under a temporary name and renamed when complete, so an
interrupted build never leaves a half-written input behind. Delete the
folder to reclaim the space (about 4.1 GB at full I3D size, more with the
peers' files).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

import finegym_store
from finegym_store import synth

#: FineGym Gym99 train + val element instances (the largest released I3D
#: pickle): 20484 x 12 x 2048 float32 = 2.01 GB of I3D features.
INSTANCES = 20484
I3D_INSTANCES = INSTANCES
T = 12
#: Feature columns the generator makes, with the released per-instance shapes.
SHAPES = {"i3d": synth.MODELS["i3d"], "tsn": synth.MODELS["tsn"]}
CHANNELS = {name: shape[1] for name, shape in SHAPES.items()}
I3D_SHAPE = SHAPES["i3d"]
COLUMN = "i3d"

#: Distinct random blocks drawn; see make_table.
DISTINCT_BLOCKS = 256

#: Bump when the way inputs are built changes, so stale caches are rebuilt.
CACHE_VERSION = 2

CATEGORIES = resources.files("finegym_store") / "sample" / "gym99_categories.txt"


def to_stderr(line: str) -> None:
    """Progress lines go to stderr (a run's table goes to stdout)."""
    print(line, file=sys.stderr, flush=True)


def default_folder() -> Path:
    """``$FINEGYM_BENCH_DIR``, else the user's cache folder:
    ``$XDG_CACHE_HOME/finegym-store/bench`` or ``~/.cache/finegym-store/bench``."""
    env = os.environ.get("FINEGYM_BENCH_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "finegym-store" / "bench"


def bench_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder (``path`` or default_folder()), created if missing."""
    d = Path(path) if path else default_folder()
    d.mkdir(parents=True, exist_ok=True)
    return d


def categories_path() -> str:
    """Path of the gym99 categories file shipped with the package."""
    return os.fspath(CATEGORIES)  # an installed package: a real file on disk


# -- the feature dict ------------------------------------------------------------


def make_ids_labels(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """FineGym-pattern ids and gym99-like long-tailed labels for n instances."""
    return synth.make_ids(n, seed), synth.long_tailed_labels(n, 99, seed)


def make_table(n: int, seed: int = 0, distinct: int = DISTINCT_BLOCKS,
               column: str = COLUMN) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(ids, labels, {id: float32 array of the column's released shape}).

    Drawing 2 GB of normal variates takes about a minute on 2 cores, longer
    than anything measured, so only ``distinct`` blocks are drawn (with
    ``synth.make_features``: class prototype plus noise) and the n values
    cycle through them. Every value is a *copy* of its block, not a view:
    each array owns its memory, exactly like the values of an unpickled
    dict, so the converter reads n separate buffers scattered over the heap,
    as it does with a real pickle. Nothing measured depends on the values."""
    ids, labels = make_ids_labels(n, seed)
    k = min(n, distinct)
    blocks = list(synth.make_features(ids[:k], labels[:k], SHAPES[column], seed=seed).values())
    table = {key: blocks[i % k].copy() for i, key in enumerate(ids)}
    return ids, labels, table


def stack_table(table: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    """The same bytes as the store's feature section: ``np.stack`` of the
    values in store (split) order, a C-contiguous (N, T, C) float32 array."""
    first = table[ids[0]]
    return np.stack([table[key] for key in ids]).reshape(len(ids), first.shape[0], first.shape[1])


def convert_table(out: str | os.PathLike[str], table: dict[str, np.ndarray], split: str | os.PathLike[str],
                  overwrite: bool = False, column: str = COLUMN) -> finegym_store.Store:
    """The conversion every benchmark times: one in-memory feature column,
    with the split file (order, labels) and the gym99 hierarchy; no progress
    bars, no pickle loading."""
    return finegym_store.convert({column: table}, out, split=split, categories=categories_path(),
                                 overwrite=overwrite, progress=False)


# -- cached files ---------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Paths of the cached inputs of one column and n instances."""

    n: int
    column: str
    folder: Path
    pickle: Path
    split: Path
    store: Path
    manifest: Path

    @property
    def feature_bytes(self) -> int:
        return self.n * T * CHANNELS[self.column] * 4


def paths(n: int, folder: str | os.PathLike[str] | None = None, column: str = COLUMN) -> Inputs:
    """Where the inputs of (column, n) live in the cache folder (nothing built)."""
    f = Path(folder) if folder else default_folder()
    return Inputs(n=n, column=column, folder=f, pickle=f / f"{column}_{n}.pkl", split=f / f"gym99_{n}_element.txt",
                  store=f / f"{column}_{n}.fgs", manifest=f / f"manifest_{column}_{n}.json")


def _manifest(n: int, column: str, seed: int) -> dict[str, Any]:
    return {"cache_version": CACHE_VERSION, "n": n, "column": column, "seed": seed,
            "distinct_blocks": DISTINCT_BLOCKS, "shape": list(SHAPES[column]),
            "format_version": finegym_store.FORMAT_VERSION}


def ensure_inputs(n: int = INSTANCES, folder: str | os.PathLike[str] | None = None, seed: int = 0,
                  rebuild: bool = False, echo: Callable[[str], None] = to_stderr, column: str = COLUMN,
                  pickle: bool = True) -> Inputs:
    """The split file and store of (column, n), and the pickle unless
    ``pickle=False``, built unless the cache already holds them (same
    manifest, every file present). ``echo`` receives progress lines."""
    if column not in SHAPES:
        raise ValueError(f"column must be one of {sorted(SHAPES)}, got {column!r}")
    p = paths(n, bench_dir(folder), column)
    want = _manifest(n, column, seed)
    have = None
    if not rebuild and p.manifest.exists():
        try:
            have = json.loads(p.manifest.read_text())
        except ValueError:
            have = None
    if have != want or not p.store.exists() or not p.split.exists():
        p.manifest.unlink(missing_ok=True)
        for f in (p.pickle, p.split, p.store):
            f.unlink(missing_ok=True)
    elif p.pickle.exists() or not pickle:
        return p
    t0 = time.perf_counter()
    ids, labels, table = make_table(n, seed, column=column)
    echo(f"[data] built the feature dict: {n} x {SHAPES[column]} float32, {p.feature_bytes / 1e9:.2f} GB, "
         f"in {time.perf_counter() - t0:.1f} s")
    if not p.store.exists():
        _atomic(p.split, lambda tmp: synth.write_split(tmp, ids, labels))
        t0 = time.perf_counter()
        tmp = p.store.with_name(f".{p.store.name}.{os.getpid()}.tmp")
        try:
            convert_table(tmp, table, p.split, column=column)
            os.replace(tmp, p.store)
        finally:
            tmp.unlink(missing_ok=True)
        echo(f"[data] wrote {p.store} ({p.store.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        p.manifest.write_text(json.dumps(want))
    if pickle:
        t0 = time.perf_counter()
        _atomic(p.pickle, lambda tmp: synth.write_pickle(tmp, table))
        echo(f"[data] wrote {p.pickle} ({p.pickle.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return p


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- a store's layout --------------------------------------------------------------------


@dataclass
class Data:
    """Where a store keeps one feature column: what the measurements need to
    read its records directly (offsets, sizes) and to make it cold."""

    store: str
    column: str
    n: int
    t: int
    c: int
    base: int  # byte offset of the feature section in the file

    @property
    def instance_bytes(self) -> int:
        return self.t * self.c * 4


def layout(path: str | os.PathLike[str], column: str | None = None) -> Data:
    """The layout of ``column`` (default: the store's first feature column)
    in the store at ``path``. ValueError for a column the measurements cannot
    read as fixed (T, C) float32 records."""
    s = finegym_store.open(path)
    try:
        name = column or (s.columns[0] if s.columns else None)
        if name is None:
            raise ValueError(f"{os.fspath(path)}: the store has no feature column")
        col = s.column(name)  # KeyError naming the columns
        if col.ragged or str(col.dtype) != "float32":
            raise ValueError(f"{os.fspath(path)}: column {name!r} is {'ragged' if col.ragged else col.dtype}; "
                             "the benchmark reads fixed-T float32 columns")
        sec = next(x for x in s.sections() if x["name"] == f"features/{name}")
        return Data(os.fspath(path), name, len(s), int(col.length), int(col.channels), int(sec["offset"]))
    finally:
        del s  # unmapped when the last reference goes


def ensure_store(folder: str | os.PathLike[str] | None, column: str, n: int,
                 echo: Callable[[str], None] = to_stderr, pickle: bool = False) -> Data:
    """The generated store of (column, n), built once; its layout."""
    return layout(ensure_inputs(n, folder, echo=echo, column=column, pickle=pickle).store, column)
