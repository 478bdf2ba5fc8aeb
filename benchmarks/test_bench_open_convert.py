"""pytest-benchmark versions of bench_open_convert.py, each beside its baseline.

    pytest benchmarks/ --benchmark-only
    FINEGYM_BENCH_INSTANCES=20484 pytest benchmarks/ --benchmark-only   # full I3D size, 2 GB

Groups (pytest-benchmark prints one table per group, with each row's factor
to the fastest in brackets):

- ``open``:    ``finegym_store.open(store)`` vs ``pickle.load`` of the same
               features (what a training script does today);
- ``convert``: ``finegym_store.convert`` of the in-memory dict (pickle loading
               excluded) vs ``ndarray.tofile`` of the same bytes, stacked
               beforehand, and ``tofile`` + ``os.fsync`` (our writer fsyncs).

Default size 2000 instances (200 MB), so that the whole file runs in well
under a minute; ``FINEGYM_BENCH_ROUNDS`` sets the rounds of the pickle and
conversion benchmarks (5; conversions add one untimed warm-up round).
Inputs are cached like the script's (``finegym_store.bench.inputs``).
Nothing here asserts a timing; the asserts only check
that each benchmark did its job.
"""

from __future__ import annotations

import gc
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import finegym_store
from finegym_store.bench import inputs as cache
from finegym_store.bench.pagecache import rss_bytes

N = int(os.environ.get("FINEGYM_BENCH_INSTANCES", "2000"))
ROUNDS = int(os.environ.get("FINEGYM_BENCH_ROUNDS", "5"))


@pytest.fixture(scope="module")
def inputs() -> cache.Inputs:
    return cache.ensure_inputs(N)


@pytest.fixture(scope="module")
def feature_table() -> tuple[list[str], dict[str, np.ndarray]]:
    """The dict a conversion starts from, built once per module."""
    ids, _, table = cache.make_table(N)
    return ids, table


@pytest.fixture(scope="module")
def stacked(feature_table: tuple[list[str], dict[str, np.ndarray]]) -> np.ndarray:
    """The same bytes as the store's feature section, already contiguous."""
    ids, table = feature_table
    return cache.stack_table(table, ids)


def _clean(path: Path) -> None:
    """Untimed, before each round: no previous output, nothing left dirty."""
    path.unlink(missing_ok=True)
    gc.collect()
    os.sync()


# -- open ----------------------------------------------------------------------


@pytest.mark.benchmark(group="open")
def test_open_store(benchmark, inputs: cache.Inputs) -> None:
    rss0 = rss_bytes()
    kept = finegym_store.open(inputs.store)
    benchmark.extra_info["rss_growth_mb_one_open"] = (rss_bytes() - rss0) / 1e6
    store = benchmark(finegym_store.open, inputs.store)
    assert len(store) == len(kept) == N


@pytest.mark.benchmark(group="open")
def test_open_baseline_pickle_load(benchmark, inputs: cache.Inputs) -> None:
    def load() -> dict[str, np.ndarray]:
        with open(inputs.pickle, "rb") as f:
            return pickle.load(f)

    # One load first, untimed: its RSS growth, and a warm-up. (Repeated loads in
    # one process reuse the memory the previous one freed, so they run faster
    # than the first load of a fresh process: bench_open_convert.py times that.)
    gc.collect()
    rss0 = rss_bytes()
    table = load()
    benchmark.extra_info["rss_growth_mb_one_load"] = (rss_bytes() - rss0) / 1e6
    del table
    gc.collect()
    table = benchmark.pedantic(load, rounds=ROUNDS, iterations=1)
    assert len(table) == N


# -- convert ---------------------------------------------------------------------


@pytest.mark.benchmark(group="convert")
def test_convert(benchmark, inputs: cache.Inputs, feature_table, tmp_path: Path) -> None:
    _, table = feature_table
    out = tmp_path / "store.fgs"
    store = benchmark.pedantic(cache.convert_table, args=(out, table, inputs.split),
                               setup=lambda: _clean(out), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert len(store) == N and store.column(cache.COLUMN).shape == (N, 12, 2048)
    del store
    out.unlink()


@pytest.mark.benchmark(group="convert")
def test_convert_baseline_tofile(benchmark, stacked: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "features.bin"
    benchmark.pedantic(stacked.tofile, args=(out,), setup=lambda: _clean(out), rounds=ROUNDS, warmup_rounds=1,
                       iterations=1)
    assert out.stat().st_size == stacked.nbytes
    out.unlink()


@pytest.mark.benchmark(group="convert")
def test_convert_baseline_tofile_fsync(benchmark, stacked: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "features.bin"

    def tofile_fsync() -> None:
        with open(out, "wb") as f:
            stacked.tofile(f)
            f.flush()
            os.fsync(f.fileno())

    benchmark.pedantic(tofile_fsync, setup=lambda: _clean(out), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert out.stat().st_size == stacked.nbytes
    out.unlink()
