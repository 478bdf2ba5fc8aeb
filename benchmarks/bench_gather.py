"""Batch gathering, hot and cold page cache, beside the baselines users have.

    python benchmarks/bench_gather.py [--instances 20484] [--batch 256] [--repeat 7] [--json out.json]

On the I3D-size store (20484 x 12 x 2048 float32, ~2 GB; built once by
benchmarks/common.py) it times a batch of B random instances with K = 12 (all
segments) and K = 3 (test-mode centred segments, so every method copies the
same bytes):

- ``gather``: ``store.gather`` (C++ pool, all cores, WILLNEED prefetch);
- ``numpy memmap``: numpy fancy indexing of an ``np.memmap`` of the very same
  feature section (``mm[idx]`` or ``mm[idx[:, None], segs]``);
- ``memcpy 1T``: one thread memcpy-ing the same records from their places in
  the mapped file (hot only: the floor a copy cannot beat per thread);
- ``pread QD32``: 32 threads pread-ing the same records (cold only: what a
  deep I/O queue gets from the disk).

Hot: each method is set up once (its mapping, its output buffer) and reads
the whole file through its own mapping first, as a training loop would have
after its first epoch; then the methods take turns on ``repeat`` fresh random
batches; medians. Cold: before each run the file is evicted with
posix_fadvise(DONTNEED) and the run happens in a fresh child process (pages
mapped by a live process cannot be evicted), which opens, gathers once and
reports its time. Results are ratios against the baselines of the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import finegym_store as fgs  # noqa: E402
from finegym_store import _core  # noqa: E402
from finegym_store import bench as fgs_bench  # noqa: E402  (eviction shared with `finegym-store bench`)

T, C = 12, 2048
ROW = C * 4


def feature_layout(store: fgs.Store) -> tuple[int, int]:
    """(byte offset, instance count) of the feature section in the file."""
    sec = next(s for s in store.sections() if s["name"] == f"features/{common.COLUMN}")
    return sec["offset"], sec["shape"][0]


def segments_for(k: int) -> np.ndarray:
    return np.arange(T) if k == T else _core.sample_segments(T, k, 1, "test")


def record_offsets(base: int, idx: np.ndarray, segs: np.ndarray) -> tuple[np.ndarray, int]:
    """File offsets and size of the records a batch reads: whole instances
    for K = T (contiguous), single rows otherwise."""
    if len(segs) == T:
        return base + idx.astype(np.int64) * (T * ROW), T * ROW
    offs = base + idx.astype(np.int64)[:, None] * (T * ROW) + segs[None, :].astype(np.int64) * ROW
    return offs.ravel(), ROW


class Method:
    """One way to fetch a batch, set up once (store or memmap opened), so
    repeated calls measure the steady state of a training loop.

    Every method writes a freshly allocated output, as numpy fancy indexing
    must: on the VM these figures come from, rewriting one reused buffer was
    up to 5x slower than writing a fresh one, for plain memcpy as much as for
    gather, which would make the comparison depend on buffer policy."""

    def __init__(self, name: str, path: str, k: int) -> None:
        self.name, self.path, self.k = name, path, k
        self.store = fgs.open(path)
        self.base, self.n = feature_layout(self.store)
        self.segs = segments_for(k)
        self.features = self.store._reader.section(f"features/{common.COLUMN}")
        self.mm = np.memmap(path, dtype=np.float32, mode="r", offset=self.base, shape=(self.n, T, C))

    def warm(self) -> None:
        """Read the whole feature section through this method's own mapping."""
        (self.mm if self.name == "numpy memmap" else self.features).sum()

    def __call__(self, idx: np.ndarray) -> float:
        """Seconds for one batch."""
        k, segs = self.k, self.segs
        if self.name == "gather":
            kw: dict[str, Any] = {"num_segments": None if k == T else k, "mode": "test"}
            t0 = time.perf_counter()
            self.store.gather(common.COLUMN, idx, **kw)
            return time.perf_counter() - t0
        if self.name == "numpy memmap":
            t0 = time.perf_counter()
            _ = self.mm[idx] if k == T else self.mm[idx[:, None], segs[None, :]]
            return time.perf_counter() - t0
        offs, size = record_offsets(self.base, idx, segs)
        if self.name == "memcpy 1T":
            src = np.frombuffer(self.features, dtype=np.uint8)
            t0 = time.perf_counter()
            common.baselines.memcpy_records(src, offs - self.base, size, fgs_bench.aligned_empty(len(offs) * size))
            return time.perf_counter() - t0
        if self.name == "pread QD32":
            t0 = time.perf_counter()
            common.baselines.pread_records(self.path, offs, size, fgs_bench.aligned_empty(len(offs) * size), 32)
            return time.perf_counter() - t0
        raise ValueError(self.name)


def run_method(method: str, path: str, idx: np.ndarray, k: int) -> float:
    """Seconds for one batch with `method` in a fresh setup (the cold runs)."""
    return Method(method, path, k)(idx)


def evict(path: str) -> None:
    """Drop the file from the page cache (no process may have it mapped)."""
    if fgs_bench.evict(path) > 0.01:
        raise RuntimeError(f"could not evict {path} from the page cache (is it mapped by a live process?)")


def cold_run(method: str, path: str, idx: np.ndarray, k: int) -> float:
    evict(path)
    here = Path(__file__).resolve().parent
    code = ("import sys, json, numpy as np; import bench_gather as b; "
            "print(json.dumps(b.run_method(sys.argv[1], sys.argv[2], np.array(json.loads(sys.argv[3])), "
            "int(sys.argv[4]))))")
    # cwd = this folder: `-c` puts the cwd first on sys.path, and a repo root
    # there would shadow the installed package with the uncompiled sources.
    res = subprocess.run([sys.executable, "-c", code, method, path, json.dumps(idx.tolist()), str(k)],
                         capture_output=True, text=True, cwd=here)
    if res.returncode != 0:
        raise RuntimeError(f"cold run of {method!r} failed:\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def bench(path: str, batch: int, repeat: int, echo: Any = print) -> dict[str, Any]:
    n = len(fgs.open(path))
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"instances": n, "batch": batch, "repeat": repeat, "cores": os.cpu_count()}
    for k in (12, 3):
        hot_methods = ["gather", "numpy memmap", "memcpy 1T"]
        cold_methods = ["gather", "numpy memmap", "pread QD32"]
        hot: dict[str, list[float]] = {m: [] for m in hot_methods}
        cold: dict[str, list[float]] = {m: [] for m in cold_methods}
        runners = {m: Method(m, path, k) for m in hot_methods}
        for m in hot_methods:
            runners[m].warm()
        for _ in range(repeat):
            idx = rng.integers(0, n, batch)
            for m in hot_methods:  # alternate methods within each repetition
                hot[m].append(runners[m](idx))
        del runners
        gc.collect()  # unmap everything: pages mapped by a live process cannot be evicted
        for _ in range(repeat):
            idx = rng.integers(0, n, batch)
            for m in cold_methods:
                cold[m].append(cold_run(m, path, idx, k))
        mb = batch * k * ROW / 2**20
        entry = {"bytes_per_batch": batch * k * ROW,
                 "hot_ms": {m: statistics.median(v) * 1e3 for m, v in hot.items()},
                 "cold_ms": {m: statistics.median(v) * 1e3 for m, v in cold.items()}}
        h, c = entry["hot_ms"], entry["cold_ms"]
        entry["ratios"] = {
            "hot: gather speedup over numpy memmap": h["numpy memmap"] / h["gather"],
            "hot: gather / memcpy 1T (>1: faster than one memcpy thread)": h["memcpy 1T"] / h["gather"],
            "cold: gather speedup over numpy memmap": c["numpy memmap"] / c["gather"],
            "cold: gather / pread QD32 (>1: faster than pread)": c["pread QD32"] / c["gather"],
        }
        results[f"K={k}"] = entry
        echo(f"\nK = {k}: batch {batch} x {k} x {C} float32 = {mb:.1f} MiB")
        for m in hot_methods:
            echo(f"  hot   {m:<14} {h[m]:8.2f} ms  {mb / h[m] * 1e3 / 1024:6.2f} GiB/s")
        for m in cold_methods:
            echo(f"  cold  {m:<14} {c[m]:8.2f} ms  {mb / c[m] * 1e3 / 1024:6.2f} GiB/s")
        for name, r in entry["ratios"].items():
            echo(f"  {name}: {r:.2f}x")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=common.I3D_INSTANCES)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    inputs = common.ensure_inputs(args.instances)
    res = bench(str(inputs.store), args.batch, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
