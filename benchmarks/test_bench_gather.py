"""pytest-benchmark versions of bench_gather.py's hot-cache runs, each group
with its baselines:

    pytest benchmarks/test_bench_gather.py --benchmark-only
    FINEGYM_BENCH_INSTANCES=20484 pytest benchmarks/ --benchmark-only   # full I3D size

Groups ``gather K=12`` and ``gather K=3`` (B = 256, 12 x 2048 float32):
``store.gather`` vs numpy fancy indexing of an ``np.memmap`` of the same
feature section vs one thread memcpy-ing the same records (the per-thread
floor). Cold-cache runs need a fresh process per batch: see bench_gather.py.
Nothing here asserts a timing; asserts only check each method's output.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gather as bg  # noqa: E402
import common  # noqa: E402

import finegym_store as fgs  # noqa: E402

N = int(os.environ.get("FINEGYM_BENCH_INSTANCES", "2000"))
B = 256


@pytest.fixture(scope="module")
def store() -> fgs.Store:
    s = fgs.open(common.ensure_inputs(N).store)
    s.column(common.COLUMN).values.sum()  # hot: every page read and mapped
    return s


def batches(n: int):
    rng = np.random.default_rng(0)
    while True:
        yield rng.integers(0, n, B)


@pytest.mark.parametrize("k", [12, 3])
@pytest.mark.parametrize("method", ["gather", "numpy memmap", "memcpy 1T"])
def test_hot_gather(benchmark, store, k, method):
    benchmark.group = f"gather K={k}"
    base, n = bg.feature_layout(store)
    segs = bg.segments_for(k)
    it = batches(n)
    # Every method writes a fresh output, as numpy fancy indexing must (see
    # bench_gather.Method: a reused buffer is slower on some VMs).
    if method == "gather":
        kw = {"num_segments": None if k == bg.T else k, "mode": "test"}
        benchmark(lambda: store.gather(common.COLUMN, next(it), **kw))
        idx = next(it)
        np.testing.assert_array_equal(store.gather(common.COLUMN, idx, **kw)[:, :, :4],
                                      np.stack([store.features(common.COLUMN, i)[segs, :4] for i in idx]))
    elif method == "numpy memmap":
        mm = np.memmap(store.path, dtype=np.float32, mode="r", offset=base, shape=(n, bg.T, bg.C))
        mm.sum()
        benchmark(lambda: (lambda idx: mm[idx] if k == bg.T else mm[idx[:, None], segs[None, :]])(next(it)))
    else:
        src = np.frombuffer(store._reader.section(f"features/{common.COLUMN}"), dtype=np.uint8)

        def run():
            offs, size = bg.record_offsets(0, next(it), segs)
            common.baselines.memcpy_records(src, offs, size, bg.fgs_bench.aligned_empty(len(offs) * size))

        benchmark(run)
