"""pytest-benchmark versions of the cold steady state, each group with its
baselines:

    pytest benchmarks/test_bench_cold.py --benchmark-only
    FINEGYM_BENCH_INSTANCES=20484 pytest benchmarks/test_bench_cold.py --benchmark-only   # I3D size

One round = the store's file evicted from the page cache (this process's
pages unmapped with MADV_DONTNEED, then posix_fadvise DONTNEED; not timed),
then BATCHES consecutive batches of B = 256 random instances in this
process, timed together: what a training loop waits for in its first
BATCHES steps after the data fell out of the cache. Groups ``cold K=12`` and
``cold K=3``: gather with prefetch auto / on / off, and 32 or 64 threads of
pread on the same records. The full comparison (half-resident, epochs
evicted in between, the loader, peers) is ``finegym-store bench``.
Nothing here asserts a timing.
"""

from __future__ import annotations

import os
import numpy as np
import pytest

from finegym_store.bench.inputs import Data, ensure_store
from finegym_store.bench.pagecache import residency
from finegym_store.bench.runner import Runner, segments_for

N = int(os.environ.get("FINEGYM_BENCH_INSTANCES", "2048"))
B, BATCHES = 256, 20


@pytest.fixture(scope="module")
def data() -> Data:
    return ensure_store(None, "i3d", N)  # the inputs' cache folder (finegym_store.bench.inputs)


@pytest.mark.parametrize("k", [12, 3])
@pytest.mark.parametrize("method", ["gather:auto", "gather:on", "gather:off", "pread QD32", "pread QD64"])
def test_cold_steady_state(benchmark, data, k, method):
    benchmark.group = f"cold K={k}"
    runner = Runner(data, k, bench_threads())
    order = np.random.default_rng(0).permutation(data.n)
    try:
        def setup():
            runner.evict_mapped()
            assert residency(data.store, data.base, data.n * data.instance_bytes) < 0.05

        benchmark.pedantic(lambda: runner.stream(method, order, B, BATCHES), setup=setup, rounds=3, iterations=1)
        if method.startswith("gather"):
            idx = order[:8]
            want = np.stack([runner.store.features(data.column, int(i))[segments_for(data.t, k)] for i in idx])
            np.testing.assert_array_equal(runner.gather(idx, method.split(":")[1]), want)
    finally:
        runner.close()


def bench_threads() -> int:
    from finegym_store import _core

    return _core.max_threads()
