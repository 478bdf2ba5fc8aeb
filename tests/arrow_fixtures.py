"""Stores shared by test_arrow.py and test_parquet.py: a fixed-T column, a
ragged column and the gym99 hierarchy, in float32 and float16."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import finegym_store as fgs
from finegym_store import synth

CATEGORIES = Path(fgs.__file__).resolve().parent / "sample" / "gym99_categories.txt"
N, T, C, RC = 37, 5, 6, 4


def make_store(folder: Path, dtype: str = "float32", n: int = N, seed: int = 0) -> fgs.Store:
    """Columns 'a' (fixed T x C), 'r' (ragged, RC channels, 1..7 rows) and
    'b' (fixed 1 x 3); split labels among gym99 classes, plus unlabelled."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = synth.make_ids(n, seed=seed)
    labels = synth.long_tailed_labels(n, 20, seed=seed)
    labels[::9] = -1
    rng = np.random.default_rng(seed)
    fixed = {k: rng.standard_normal((T, C, 1)).astype(np.float64) for k in ids}
    ragged = {k: rng.standard_normal((int(rng.integers(1, 8)), RC)).astype(np.float32) for k in ids}
    vec = {k: rng.standard_normal(3).astype(np.float32) for k in ids}
    synth.write_split(folder / "split.txt", ids, labels)
    return fgs.convert({"a": fixed, "r": ragged, "b": vec}, folder / f"s_{dtype}.fgs", split=folder / "split.txt",
                       categories=CATEGORIES, dtype=dtype, progress=False)


def assert_same_store(a: fgs.Store, b: fgs.Store) -> None:
    """Same ids, labels, parsed fields, hierarchy and feature bytes."""
    assert b.ids.to_list() == a.ids.to_list()
    np.testing.assert_array_equal(b.labels, a.labels)
    assert b.meta.video.to_list() == a.meta.video.to_list()
    for f in ("event_start", "event_end", "element_start", "element_end"):
        np.testing.assert_array_equal(getattr(b.meta, f), getattr(a.meta, f))
    assert b.columns == a.columns
    for c in a.columns:
        ca, cb = a.column(c), b.column(c)
        assert (cb.dtype, cb.length, cb.channels) == (ca.dtype, ca.length, ca.channels)
        assert cb.values.tobytes() == ca.values.tobytes(), c
        if ca.ragged:
            np.testing.assert_array_equal(cb.offsets, ca.offsets)
    if a.classes is None:
        assert b.classes is None
    else:
        assert b.classes is not None
        for f in ("label", "glabel", "set"):
            np.testing.assert_array_equal(getattr(b.classes, f), getattr(a.classes, f))
        assert b.classes.name.to_list() == a.classes.name.to_list()
        assert b.classes.event.to_list() == a.classes.event.to_list()
    assert b.verify() == []


def require(module: str, name: str | None = None, install: str = "pip install '.[test]'"):
    """Import a test dependency, or skip where it is not installed (never in
    CI, which installs the test extra: there a missing one fails)."""
    from conftest import require as require_in_conftest

    return require_in_conftest(module, name or module, install)
