"""Gather's prefetch decision (issue 8): per batch, from the page residency of
the rows the batch reads. No timings here (those are in benchmarks/): the
tests check that every mode returns the same bytes in every page-cache state,
and that ``auto`` on a cold file reads the rows it needs and not the rest."""

from __future__ import annotations


import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import _core
from finegym_store.bench.pagecache import evict, resident_pages

C = 1024  # float32 rows of 4 KiB: one page each on x86-64
LONG, LONG_ROWS = 7, 12000


def _evict(path) -> float:
    """Drop the file's clean pages (no other process maps them); returns the
    fraction still resident. require=1: never falls back to dropping the
    whole page cache, as the benchmark may."""
    return evict(path, require=1.0)


@pytest.fixture
def files(tmp_path):
    """A fixed-T column and a ragged one with a long instance (LONG_ROWS rows: 47 MiB)."""
    rng = np.random.default_rng(3)
    ids = [f"v{i:03d}" for i in range(40)]
    fixed = {k: rng.standard_normal((12, C)).astype(np.float32) for k in ids}
    lengths = [LONG_ROWS if i == LONG else int(rng.integers(1, 40)) for i in range(len(ids))]
    ragged = {k: rng.standard_normal((t, C)).astype(np.float32) for k, t in zip(ids, lengths)}
    path = tmp_path / "p.fgs"
    fgs.convert({"x": fixed, "r": ragged}, path, progress=False)
    return path, fixed, ragged, ids


def _gather(store, column, idx, k, prefetch, dtype=np.float32):
    return _core.gather(store._reader, column, idx,
                        _core.GatherSpec(k, "test", 1, "mmaction2", np.dtype(dtype), 0), 0, None, 2, prefetch)


def _expected(table, ids, idx, k, dtype=np.float32):
    out = []
    for i in idx:
        feats = table[ids[i]]
        segs = np.arange(len(feats)) if k is None else _core.sample_segments(len(feats), k, 1, "test")
        out.append(feats[segs])
    return np.stack(out).astype(dtype)


@pytest.mark.parametrize("state", ["cold", "half", "hot"])
def test_every_mode_returns_the_rows_in_every_cache_state(files, state):
    path, fixed, ragged, ids = files
    idx = np.array([LONG, 0, 39, LONG, 12, -1, 5, 20])
    cases = [("x", fixed, None), ("x", fixed, 3), ("r", ragged, 3), ("r", ragged, 12)]
    for mode in ("auto", "on", "off"):
        for column, table, k in cases:
            for dtype in (np.float32, np.float16):
                if state != "hot":
                    _evict(path)  # nothing maps the file between stores
                store = fgs.open(path)
                if state == "half":
                    store.gather(column, idx[::2], num_segments=k, mode="test")
                got = _gather(store, column, idx, k, mode, dtype)
                want = _expected(table, ids, [i % len(ids) for i in idx], k, dtype)
                np.testing.assert_array_equal(got, want, err_msg=f"{state} {mode} {column} K={k} {dtype}")
                del store


def _evicted_long_instance(path) -> int:
    """Evicts the store file; returns the byte offset of the long ragged
    instance's first row (skips where eviction has no effect)."""
    store = fgs.open(path)
    sec = next(s for s in store.sections() if s["name"] == "features/r")
    start = sec["offset"] + int(store.column("r").offsets[LONG]) * C * 4
    del store
    if _evict(path) > 0.05:
        pytest.skip("this file system keeps the file in the page cache (posix_fadvise DONTNEED has no effect)")
    return start


def test_auto_on_a_cold_file_reads_only_the_rows_it_needs(files):
    """K = 3, then K = 4, of a 12000-row instance, in consecutive batches:
    auto queues exactly those rows each time (the decision is per batch, not
    carried over from the previous one), so the copy finds them resident and
    the kernel's fault read-around (which reads neighbouring pages too, up to
    read_ahead_kb) never runs; the rest of the instance stays on disk."""
    path, _, ragged, ids = files
    start = _evicted_long_instance(path)
    store = fgs.open(path)  # reads the header and offsets (and whatever the kernel reads around them)
    first_page = start // 4096
    for k in (3, 4):
        rows = _core.sample_segments(LONG_ROWS, k, 1, "test")
        pages = {(start + int(r) * C * 4) // 4096 - first_page for r in rows}
        before = resident_pages(path, start, LONG_ROWS * C * 4)
        if before[sorted(pages)].any():
            pytest.skip("the sampled rows were already read (kernel read-around from an earlier read reaches them)")
        got = _gather(store, "r", np.array([LONG]), k, "auto")
        np.testing.assert_array_equal(got, _expected(ragged, ids, [LONG], k))
        new = set(np.flatnonzero(resident_pages(path, start, LONG_ROWS * C * 4) & ~before).tolist())
        # Each 4 KiB row lies on at most 2 pages when not page-aligned.
        assert pages <= new and len(new) <= 2 * k, (k, sorted(pages), sorted(new)[:20], len(new))


def test_auto_sees_a_batch_with_every_other_instance_resident_as_partly_cold(files):
    """Resident instances at the even positions of the batch, the long cold
    instance at the odd ones: however auto samples the batch, it must notice
    the missing rows and read exactly those (no fault read-around)."""
    path, _, ragged, ids = files
    start = _evicted_long_instance(path)
    store = fgs.open(path)
    small = np.array([i for i in range(len(ids)) if i != LONG][:8])
    _gather(store, "r", small, 3, "on")  # their rows are now resident
    idx = np.empty(16, np.int64)
    idx[0::2], idx[1::2] = small, LONG
    rows = _core.sample_segments(LONG_ROWS, 3, 1, "test")
    pages = {(start + int(r) * C * 4) // 4096 - start // 4096 for r in rows}
    before = resident_pages(path, start, LONG_ROWS * C * 4)
    if before[sorted(pages)].any():
        pytest.skip("the sampled rows were already read (kernel read-around from an earlier read reaches them)")
    got = _gather(store, "r", idx, 3, "auto")
    np.testing.assert_array_equal(got, _expected(ragged, ids, idx, 3))
    new = set(np.flatnonzero(resident_pages(path, start, LONG_ROWS * C * 4) & ~before).tolist())
    assert pages <= new and len(new) <= 6, (sorted(pages), sorted(new)[:20], len(new))


def test_prefetch_must_be_a_known_mode(files):
    store = fgs.open(files[0])
    with pytest.raises(ValueError, match="readahead must be 'auto', 'on' or 'off', got 'always'"):
        _gather(store, "x", np.array([0]), 3, "always")
