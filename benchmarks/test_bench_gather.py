"""pytest-benchmark versions of ``finegym-store bench``'s hot state, each
group with its baselines:

    pytest benchmarks/test_bench_gather.py --benchmark-only
    FINEGYM_BENCH_INSTANCES=20484 pytest benchmarks/ --benchmark-only   # full I3D size

Groups ``gather K=12`` and ``gather K=3`` (B = 256, 12 x 2048 float32):
gather vs numpy fancy indexing of an ``np.memmap`` of the same feature
section vs one thread memcpy-ing the same records (the per-thread floor),
each method as ``finegym_store.bench.runner.Runner`` runs it. Cold runs:
test_bench_cold.py and ``finegym-store bench --states cold``. Nothing here
asserts a timing; asserts only check each method's output.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from finegym_store import _core
from finegym_store.bench.inputs import Data, ensure_store
from finegym_store.bench.runner import Runner, gather_batch, segments_for

N = int(os.environ.get("FINEGYM_BENCH_INSTANCES", "2000"))
B = 256


@pytest.fixture(scope="module")
def data() -> Data:
    return ensure_store(None, "i3d", N)


def batches(n: int):
    rng = np.random.default_rng(0)
    while True:
        yield rng.integers(0, n, B)


@pytest.mark.parametrize("k", [12, 3])
@pytest.mark.parametrize("method", ["gather:auto", "numpy memmap", "memcpy 1T"])
def test_hot_gather(benchmark, data, k, method):
    benchmark.group = f"gather K={k}"
    runner = Runner(data, k, _core.max_threads())
    try:
        runner.warm()  # hot: every page read and mapped
        runner.mm.sum()
        it = batches(data.n)
        # Every method writes a fresh output, as numpy fancy indexing must.
        benchmark(lambda: runner.batch(method, next(it)))
        idx = next(it)
        want = np.stack([runner.store.features(data.column, int(i))[segments_for(data.t, k)] for i in idx])
        np.testing.assert_array_equal(gather_batch(runner.store, data.column, idx, None if k == data.t else k), want)
    finally:
        runner.close()
