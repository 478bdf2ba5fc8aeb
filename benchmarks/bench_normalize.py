"""Standardisation in the gather against gather followed by numpy, in one run.

    python benchmarks/bench_normalize.py [--instances N] [--batch B] [--k K] [--threads T]
                                         [--batches M] [--rounds R] [--dir DIR] [--json out.json]

For each stored dtype (float32, and float16 gathered as float32: the cast
fused with the standardisation) a store of N instances of 12 x 2048 (the
I3D shape; the values of ``finegym_store.bench.inputs``) is written into a
temporary folder under DIR (default: the system's), read once so the page
cache holds it, and then M consecutive batches of B random instances, K
train-mode segments each, float32 out, are timed for each method, on the
same T C++ threads:

* ``fused``: ``store.gather(..., normalize=True)``: one pass, copy, cast and
  ``(x - mean) * (1 / std)`` together;
* ``numpy``: ``store.gather(...)`` then ``(x - mean) / std``, as written in
  most training code (two temporaries);
* ``numpy in place``: ``store.gather(...)`` then ``x -= mean; x *= 1 / std``
  (no temporary: the fastest numpy spelling);
* ``gather only``: ``store.gather(...)`` without standardising, for
  reference: what the copy (and cast) alone costs.

Every method allocates its output per batch, as a training loop does. The
order of the methods rotates each round; the figure is the median over R
rounds of the time per batch (and the best round: on a machine shared with
other work the median carries its noise), and the ratio is each
baseline's time over ``fused``'s. The fused output is checked against the in-place numpy result
(bit for bit: the same float32 operations). Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import finegym_store as fgs
from finegym_store import synth
from finegym_store.bench import inputs

COLUMN = "i3d"


def build(folder: str, n: int, dtype: str) -> fgs.Store:
    ids, labels, table = inputs.make_table(n, column=COLUMN)
    split = os.path.join(folder, "split.txt")
    synth.write_split(split, ids, labels)
    return fgs.convert({COLUMN: table}, os.path.join(folder, f"{dtype}.fgs"), split=split, dtype=dtype,
                       progress=False)


def methods(store: fgs.Store, spec: fgs.SegmentSpec, threads: int) -> dict:
    st = store.stats(COLUMN)
    mean, std = st.mean, st.std
    inv = np.float32(1) / np.where(std > 0, std, np.float32(1))
    fused_spec = spec.replace(normalize=True)

    def fused(idx: np.ndarray) -> np.ndarray:
        return store.gather(COLUMN, idx, spec=fused_spec, threads=threads)

    def numpy_plain(idx: np.ndarray) -> np.ndarray:
        x = store.gather(COLUMN, idx, spec=spec, threads=threads)
        return (x - mean) / std

    def numpy_in_place(idx: np.ndarray) -> np.ndarray:
        x = store.gather(COLUMN, idx, spec=spec, threads=threads)
        x -= mean
        x *= inv
        return x

    def gather_only(idx: np.ndarray) -> np.ndarray:
        return store.gather(COLUMN, idx, spec=spec, threads=threads)

    return {"fused": fused, "numpy": numpy_plain, "numpy in place": numpy_in_place, "gather only": gather_only}


def run(store: fgs.Store, args: argparse.Namespace, threads: int) -> dict:
    spec = fgs.SegmentSpec(args.k, mode="train", dtype="float32")
    fns = methods(store, spec, threads)
    rng = np.random.default_rng(0)
    np.asarray(store.column(COLUMN).values).view(np.uint8).sum()  # into the page cache
    check = rng.integers(0, len(store), args.batch)
    if not np.array_equal(fns["fused"](check), fns["numpy in place"](check)):
        raise SystemExit("fused normalisation differs from numpy's")
    names = list(fns)
    per_batch: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        batches = [rng.integers(0, len(store), args.batch) for _ in range(args.batches)]
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            fn(batches[0])  # warm: allocator, threads
            t0 = time.perf_counter()
            for idx in batches:
                fn(idx)
            per_batch[name].append((time.perf_counter() - t0) / len(batches))
    med = {name: statistics.median(v) for name, v in per_batch.items()}
    best = {name: min(v) for name, v in per_batch.items()}
    out_mb = args.batch * args.k * inputs.I3D_SHAPE[1] * 4 / 2**20
    return {
        "ms_per_batch": {k: v * 1e3 for k, v in med.items()},
        "gb_per_s_out": {k: out_mb / 1024 / v for k, v in med.items()},
        "ratio_vs_fused": {k: v / med["fused"] for k, v in med.items() if k != "fused"},
        "best_ms_per_batch": {k: v * 1e3 for k, v in best.items()},
        "best_ratio_vs_fused": {k: v / best["fused"] for k, v in best.items() if k != "fused"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="C++ threads (default: the cores available)")
    p.add_argument("--batches", type=int, default=20, help="consecutive batches per timing")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dir", default=None, help="folder for the temporary stores")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in ("instances", "batch", "k", "batches", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    threads = args.threads or len(os.sched_getaffinity(0))
    results = {"instances": args.instances, "batch": args.batch, "k": args.k, "threads": threads,
               "machine": platform.machine(), "cpus": os.cpu_count(), "stored": {}}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fgs-bench-normalize-") as folder:
        for dtype in ("float32", "float16"):
            store = build(folder, args.instances, dtype)
            results["stored"][dtype] = run(store, args, threads)
            del store
    print(f"{args.batch} instances x {args.k} segments x {inputs.I3D_SHAPE[1]} channels, float32 out, "
          f"{threads} threads; ms per batch (ratio to fused)")
    for dtype, r in results["stored"].items():
        row = ", ".join(f"{k} {v:.2f}" + (f" ({r['ratio_vs_fused'][k]:.2f}x)" if k != "fused" else "")
                        for k, v in r["ms_per_batch"].items())
        print(f"  stored {dtype}: {row}")
        best = ", ".join(f"{k} {v:.2f}" + (f" ({r['best_ratio_vs_fused'][k]:.2f}x)" if k != "fused" else "")
                         for k, v in r["best_ms_per_batch"].items())
        print(f"    best round: {best}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
