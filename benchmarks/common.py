"""Shared helpers for the benchmarks: FineGym I3D-size inputs, built once into
a cache folder, and resident-memory (RSS) readings.

The cache folder is ``$FINEGYM_BENCH_DIR`` or ``/tmp/finegym-bench``. For N
instances it holds, next to a small manifest that says how they were made:

- ``i3d_N.pkl``       the feature dict, pickled the way the release did
                      (``synth.write_pickle``): what users load today;
- ``gym99_N_element.txt``  a split file (ids in order, long-tailed labels);
- ``i3d_N.fgs``       the converted store (split + gym99 categories).

Files are written under a temporary name and renamed when complete, so an
interrupted build never leaves a half-written input behind. Delete the
folder (or pass ``rebuild=True``) to start over.
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

import finegym_store
from finegym_store import synth

#: Native baselines (memcpy, pread): a separate extension module, built with
#: the package but not part of its API (nor of the user's ``_core``).
from finegym_store import _bench as baselines  # noqa: E402, F401 (re-exported)

#: FineGym's I3D features: gym99 has 20484 element instances (train + val
#: of the largest released I3D pickle), each (12, 2048, 1, 1, 1) float32:
#: 20484 * 12 * 2048 * 4 bytes = 2.01 GB.
I3D_INSTANCES = 20484
I3D_SHAPE = synth.MODELS["i3d"]  # (12, 2048, 1, 1, 1)
COLUMN = "i3d"

#: Distinct random (12, 2048) blocks; see make_table.
DISTINCT_BLOCKS = 256

#: Bump when the way inputs are built changes, so stale caches are rebuilt.
CACHE_VERSION = 1

CATEGORIES = resources.files("finegym_store") / "sample" / "gym99_categories.txt"


def bench_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder (created if missing)."""
    d = Path(path or os.environ.get("FINEGYM_BENCH_DIR") or "/tmp/finegym-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def categories_path() -> str:
    """Path of the gym99 categories file shipped with the package."""
    return os.fspath(CATEGORIES)  # an installed package: a real file on disk


# -- the feature dict ------------------------------------------------------------


def make_ids_labels(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """FineGym-pattern ids and gym99-like long-tailed labels for n instances."""
    return synth.make_ids(n, seed), synth.long_tailed_labels(n, 99, seed)


def make_table(n: int, seed: int = 0, distinct: int = DISTINCT_BLOCKS) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(ids, labels, {id: float32 array (12, 2048, 1, 1, 1)}) for n instances.

    Drawing 2 GB of normal variates takes about a minute on 2 cores, longer
    than anything we measure, so only ``distinct`` blocks are drawn (with
    ``synth.make_features``: class prototype plus noise, I3D shape) and the
    n values cycle through them. Every value is a *copy* of its block, not a
    view: each array owns its own 96 KiB, exactly like the values of an
    unpickled dict, so the converter reads n separate buffers scattered over
    the heap, as it does with a real pickle. Values repeat every ``distinct``
    instances; nothing we measure depends on the values themselves.
    """
    ids, labels = make_ids_labels(n, seed)
    k = min(n, distinct)
    blocks = list(synth.make_features(ids[:k], labels[:k], I3D_SHAPE, seed=seed).values())
    table = {key: blocks[i % k].copy() for i, key in enumerate(ids)}
    return ids, labels, table


def stack_table(table: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    """The same bytes as the store's feature section: ``np.stack`` of the
    values in store (split) order, a C-contiguous (N, 12, 2048) float32 array."""
    t, c = I3D_SHAPE[0], I3D_SHAPE[1]
    return np.stack([table[key] for key in ids]).reshape(len(ids), t, c)


# -- cached files ---------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Paths of the cached inputs for n instances."""

    n: int
    folder: Path
    pickle: Path
    split: Path
    store: Path

    @property
    def feature_bytes(self) -> int:
        return self.n * I3D_SHAPE[0] * I3D_SHAPE[1] * 4


def _paths(n: int, folder: Path) -> Inputs:
    return Inputs(
        n=n,
        folder=folder,
        pickle=folder / f"i3d_{n}.pkl",
        split=folder / f"gym99_{n}_element.txt",
        store=folder / f"i3d_{n}.fgs",
    )


def _manifest(n: int, seed: int) -> dict[str, Any]:
    return {"cache_version": CACHE_VERSION, "n": n, "seed": seed, "distinct_blocks": DISTINCT_BLOCKS,
            "shape": list(I3D_SHAPE), "finegym_store": finegym_store.__version__,
            "format_version": finegym_store.FORMAT_VERSION}


def ensure_inputs(n: int = I3D_INSTANCES, folder: str | os.PathLike[str] | None = None, seed: int = 0,
                  rebuild: bool = False, echo: Any = print) -> Inputs:
    """Build the pickle, split file and store for n instances unless the cache
    already holds them (same manifest, every file present)."""
    d = bench_dir(folder)
    p = _paths(n, d)
    manifest_path = d / f"manifest_{n}.json"
    want = _manifest(n, seed)
    files = (p.pickle, p.split, p.store)
    if not rebuild and manifest_path.exists() and all(f.exists() for f in files):
        try:
            if json.loads(manifest_path.read_text()) == want:
                return p
        except ValueError:
            pass
    manifest_path.unlink(missing_ok=True)
    for f in files:
        f.unlink(missing_ok=True)

    t0 = time.perf_counter()
    ids, labels, table = make_table(n, seed)
    echo(f"[cache] built the feature dict: {n} x {I3D_SHAPE}, {p.feature_bytes / 1e9:.2f} GB, "
         f"in {time.perf_counter() - t0:.1f} s")
    _atomic(p.split, lambda tmp: synth.write_split(tmp, ids, labels))
    t0 = time.perf_counter()
    _atomic(p.pickle, lambda tmp: synth.write_pickle(tmp, table))
    echo(f"[cache] wrote {p.pickle} ({p.pickle.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    convert_table(p.store, table, p.split)
    echo(f"[cache] wrote {p.store} ({p.store.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    manifest_path.write_text(json.dumps(want))
    return p


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_table(out: str | os.PathLike[str], table: dict[str, np.ndarray], split: str | os.PathLike[str],
                  overwrite: bool = False) -> finegym_store.Store:
    """The conversion every benchmark times: one in-memory I3D column, with
    the split file (order, labels) and the gym99 hierarchy; no progress bars,
    no pickle loading."""
    return finegym_store.convert(out, {COLUMN: table}, split=split, categories=categories_path(),
                                 overwrite=overwrite, progress=False)


# -- memory ---------------------------------------------------------------------

try:
    import psutil

    _PROCESS = psutil.Process()
except ImportError:  # pragma: no cover - psutil is in the dev venv
    _PROCESS = None

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process now (psutil, else /proc/self/statm)."""
    if _PROCESS is not None:
        return int(_PROCESS.memory_info().rss)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def rss_detail() -> dict[str, int]:
    """RssAnon / RssFile / RssShmem in bytes (Linux /proc/self/status): file
    pages are page-cache pages mapped into us, anon pages our own heap."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                m = re.match(r"(RssAnon|RssFile|RssShmem):\s+(\d+) kB", line)
                if m:
                    out[m.group(1)] = int(m.group(2)) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mb(n: float) -> float:
    return n / 1e6
