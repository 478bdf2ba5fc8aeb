"""Arrow and Parquet interop at FineGym I3D size, each beside its baseline.

    python benchmarks/bench_arrow.py [--instances N] [--repeat R] [--dir DIR] [--json out.json]

Default N = 20484 instances of 12 x 2048 float32 (2 GB): the generated I3D
store of ``finegym_store.bench.inputs``, built once into its cache folder
(DIR, default as ``finegym-store bench --data``) and kept there; every file
this script writes beside it is deleted at the end.

1. ``store.to_arrow()`` in a fresh process: time (median of R calls on one
   store) and the RSS growth of the first call. Zero copy: nothing is read.
2. The stream: consuming ``pyarrow.RecordBatchReader.from_stream(store)``
   (the PyCapsule interface) and summing every feature value of every batch
   with numpy, against the same sum over the store's numpy view: the ratio
   is the stream's overhead (1.0 = memory speed, no copy).
3. ``store.to_parquet`` uncompressed against ``pyarrow.parquet.write_table``
   of the same table materialised in memory, same row group size and
   options (no dictionary for floats, uncompressed). The output is deleted
   and ``os.sync()`` run, untimed, between runs.
4. ``from_parquet`` of that file into a store against
   ``pyarrow.parquet.read_table`` of it plus writing the feature bytes with
   ``ndarray.tofile`` and fsync (the store writer fsyncs before linking).

Medians of R rounds after an untimed warm-up; the order of the two sides
alternates each round. Nothing asserts a timing: it prints a table (and JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import finegym_store as fgs
from finegym_store import arrow as fga
from finegym_store.bench import inputs

T, C = inputs.I3D_SHAPE[0], inputs.I3D_SHAPE[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def drop(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.sync()


_TO_ARROW_CHILD = r"""
import json, sys, time
import finegym_store as fgs
from finegym_store.bench.pagecache import rss_bytes
import pyarrow  # imported before measuring: its import is not to_arrow's cost
s = fgs.open(sys.argv[1])
r0 = rss_bytes()
t0 = time.perf_counter(); t = s.to_arrow(); first = time.perf_counter() - t0
r1 = rss_bytes()
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter(); s.to_arrow(); times.append(time.perf_counter() - t0)
print(json.dumps({"first_s": first, "rss_growth": r1 - r0, "times": times, "rows": t.num_rows}))
"""


def bench_to_arrow(store: Path, repeat: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _TO_ARROW_CHILD, str(store), str(max(repeat, 5))],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return {"first_ms": r["first_s"] * 1e3, "median_ms": statistics.median(r["times"]) * 1e3,
            "rss_growth_mb": r["rss_growth"] / 2**20}


def bench_stream(store_path: Path, repeat: int) -> dict:
    store = fgs.open(store_path)
    values = store.column("i3d").values

    def via_stream() -> float:
        total = 0.0
        for b in pa.RecordBatchReader.from_stream(store):
            flat = b.column("i3d").flatten().flatten().to_numpy()
            total += float(flat.sum(dtype=np.float64))
        return total

    def direct() -> float:
        return float(values.sum(dtype=np.float64))

    assert via_stream() == direct() or abs(via_stream() - direct()) < 1e-6 * abs(direct())  # warm-up + check
    ts, td = [], []
    for i in range(repeat):
        for name in (("s", "d") if i % 2 == 0 else ("d", "s")):
            (ts if name == "s" else td).append(timed(via_stream if name == "s" else direct))
    t0 = time.perf_counter()
    n = sum(b.num_rows for b in pa.RecordBatchReader.from_stream(store))
    read_only = time.perf_counter() - t0
    gb = values.nbytes / 1e9
    return {"stream_sum_s": statistics.median(ts), "numpy_sum_s": statistics.median(td),
            "stream_gbps": gb / statistics.median(ts), "numpy_gbps": gb / statistics.median(td),
            "ratio": statistics.median(ts) / statistics.median(td), "read_stream_only_ms": read_only * 1e3,
            "rows": n}


def bench_to_parquet(store_path: Path, folder: Path, repeat: int) -> dict:
    store = fgs.open(store_path)
    rows = fga.default_batch_rows(store)
    mapped = store.to_arrow()
    # The same table materialised in anonymous memory: take() copies every buffer.
    everything = pa.array(np.arange(mapped.num_rows, dtype=np.int64))
    in_memory = mapped.take(everything)
    assert in_memory.column("i3d").chunk(0).values.values.buffers()[1].address != \
        mapped.column("i3d").chunk(0).values.values.buffers()[1].address
    options = fga._parquet_options(mapped.schema, "none", False, None)
    a, b = folder / "ours.parquet", folder / "base.parquet"

    def ours() -> None:
        store.to_parquet(a)

    def base() -> None:
        pq.write_table(in_memory, b, row_group_size=rows, **options)

    ours(); base()  # warm-up
    to, tb = [], []
    for i in range(repeat):
        for name in (("o", "b") if i % 2 == 0 else ("b", "o")):
            drop(a if name == "o" else b)
            (to if name == "o" else tb).append(timed(ours if name == "o" else base))
    size = a.stat().st_size
    drop(b)
    del in_memory
    gc.collect()
    return {"to_parquet_s": statistics.median(to), "write_table_s": statistics.median(tb),
            "ratio": statistics.median(to) / statistics.median(tb), "row_group_rows": rows,
            "file_gb": size / 1e9}


def bench_from_parquet(folder: Path, repeat: int) -> dict:
    src = folder / "ours.parquet"
    out, raw = folder / "imported.fgs", folder / "raw.bin"

    def ours() -> None:
        fgs.from_parquet(src, out, overwrite=True, progress=False)

    def base() -> None:
        t = pq.read_table(src)
        with open(raw, "wb") as f:
            for chunk in t.column("i3d").chunks:  # one per row group; no extra copy
                chunk.flatten().flatten().to_numpy().tofile(f)
            f.flush()
            os.fsync(f.fileno())

    ours(); base()
    to, tb = [], []
    for i in range(repeat):
        for name in (("o", "b") if i % 2 == 0 else ("b", "o")):
            drop(out if name == "o" else raw)
            (to if name == "o" else tb).append(timed(ours if name == "o" else base))
    drop(out); drop(raw)
    return {"from_parquet_s": statistics.median(to), "read_table_plus_write_s": statistics.median(tb),
            "ratio": statistics.median(to) / statistics.median(tb)}


_PEAK_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import finegym_store as fgs
import pyarrow, pyarrow.parquet  # imports excluded from the growth

def anon():  # anonymous resident memory (heap, Arrow buffers), not the mapped file's pages
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) * 1024

what, src, dst = sys.argv[2], sys.argv[3], sys.argv[4]
base, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
th = threading.Thread(target=sample); th.start()
if what == "to_parquet":
    fgs.open(src).to_parquet(dst)
else:
    fgs.from_parquet(src, dst, overwrite=True, progress=False)
done.set(); th.join()
print(json.dumps({"peak_growth_mb": (max(peak[0], anon()) - base) / 2**20}))
"""


def bench_peak_memory(store: Path, folder: Path) -> dict:
    """Peak growth of anonymous resident memory (RssAnon, sampled every 5 ms in
    a fresh process) during to_parquet and from_parquet: heap and Arrow
    buffers, not the page cache of the mapped store or the files."""
    out = {}
    pqf, fgsf = folder / "peak.parquet", folder / "peak.fgs"
    for what, src, dst in (("to_parquet", store, pqf), ("from_parquet", pqf, fgsf)):
        r = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(Path(__file__).parent), what, str(src), str(dst)],
                           capture_output=True, text=True, check=True)
        out[what] = json.loads(r.stdout)["peak_growth_mb"]
    drop(pqf)
    drop(fgsf)
    return out


def bench_sizes(store_path: Path, folder: Path) -> dict:
    """File sizes of the export options (default, zstd, BYTE_STREAM_SPLIT + zstd)."""
    store = fgs.open(store_path)
    out = {}
    for name, kw in (("none", {}), ("zstd", {"compression": "zstd"}),
                     ("bss_zstd", {"compression": "zstd", "byte_stream_split": True})):
        p = folder / f"size_{name}.parquet"
        t = timed(lambda: store.to_parquet(p, **kw))
        out[name] = {"bytes": p.stat().st_size, "seconds": t}
        drop(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=inputs.I3D_INSTANCES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="the inputs' cache folder (finegym_store.bench.inputs)")
    ap.add_argument("--sizes", action="store_true", help="also the file size of each compression option")
    ap.add_argument("--only", nargs="+", choices=("to_arrow", "stream", "to_parquet", "from_parquet", "peak"),
                    help="run only these parts (from_parquet needs to_parquet's file: it is written if missing)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    store = inputs.ensure_inputs(args.instances, args.dir, pickle=False).store
    folder = store.parent
    res: dict = {"instances": args.instances, "feature_gb": args.instances * T * C * 4 / 1e9,
                 "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "pyarrow": pa.__version__}
    parts = set(args.only or ("to_arrow", "stream", "to_parquet", "from_parquet", "peak"))
    try:
        if "to_arrow" in parts:
            res["to_arrow"] = bench_to_arrow(store, args.repeat)
            print("to_arrow:", json.dumps(res["to_arrow"]), flush=True)
        if "stream" in parts:
            res["stream"] = bench_stream(store, args.repeat)
            print("stream:", json.dumps(res["stream"]), flush=True)
        if "to_parquet" in parts:
            res["to_parquet"] = bench_to_parquet(store, folder, args.repeat)
            print("to_parquet:", json.dumps(res["to_parquet"]), flush=True)
        if "from_parquet" in parts:
            if not (folder / "ours.parquet").exists():
                fgs.open(store).to_parquet(folder / "ours.parquet")
            res["from_parquet"] = bench_from_parquet(folder, args.repeat)
            print("from_parquet:", json.dumps(res["from_parquet"]), flush=True)
        if "peak" in parts:
            res["peak_memory_mb"] = bench_peak_memory(store, folder)
            print("peak_memory_mb:", json.dumps(res["peak_memory_mb"]), flush=True)
        if args.sizes:
            res["sizes"] = bench_sizes(store, folder)
            print("sizes:", json.dumps(res["sizes"]), flush=True)
    finally:
        for p in (folder / "ours.parquet", folder / "base.parquet", folder / "imported.fgs", folder / "raw.bin"):
            p.unlink(missing_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
