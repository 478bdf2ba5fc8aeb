"""Ray Data and Spark reading a store, each beside its baseline, in one run.

    python benchmarks/bench_engines.py [--instances N] [--channels C] [--repeat R] [--cpus P]
                                       [--skip-spark] [--json out.json]

Builds a synthetic store of N instances x 12 x C float32 (default 4000 x 12 x
1024: 197 MB) and its Parquet exports in a temporary folder (deleted at the
end), then times whole epochs, every file hot in the page cache:

Ray Data (one local Ray instance of P CPUs for every reader; numpy batches of
64, columns label and the features, every batch's features touched):

1. ``read_store(path)``: (B, 12, C) float32 batches;
2. ``ray.data.read_parquet`` of the export with ``tensor_type=
   "fixed_shape_tensor"`` (the strongest Parquet baseline: its batches are
   already (B, 12, C) ndarrays);
3. ``ray.data.read_parquet`` of the default (nested) export, batches made
   (B, 12, C) by ``np.stack`` of the object array Ray gives;
4. ``store.loader`` in the driver (the store's own loader, no Ray).

then the same with K = 3 of T = 12 segments (train mode): ``read_store(path,
spec=SegmentSpec(3, mode="train"))`` against ``read_parquet`` (tensor export)
followed by ``map_batches`` taking 3 random segments per instance (one per
third, as TSN sampling does) and against ``store.loader(spec=...)``.

Spark (local[P]): a full scan of ``spark.read.format("finegym_store")`` into
Spark's ``noop`` sink against the same of ``spark.read.parquet`` of the
nested export (array<array<float>> on both sides).

Each figure is the median of R epochs after an untimed warm-up epoch (which
pays for worker start-up). Nothing asserts a timing.
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
from pathlib import Path

import numpy as np

import finegym_store as fgs
from finegym_store import synth

BATCH = 64


def build(folder: Path, n: int, channels: int) -> tuple[Path, Path, Path]:
    ids = synth.make_ids(n, seed=0)
    labels = synth.long_tailed_labels(n, 99, seed=0)
    table = synth.make_features(ids, labels, (12, channels, 1, 1), seed=0)
    synth.write_split(folder / "split.txt", ids, labels)
    store = fgs.convert({"x": table}, folder / "s.fgs", split=folder / "split.txt", progress=False)
    del table
    tensor = Path(store.to_parquet(folder / "tensor.parquet", columns=["id", "label", "x"],
                                   tensor_type="fixed_shape_tensor"))
    nested = Path(store.to_parquet(folder / "nested.parquet", columns=["id", "label", "x"]))
    return Path(store.path), tensor, nested


def epochs(run, repeat: int) -> float:
    run()  # warm-up: worker start-up, page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = run()
        times.append(time.perf_counter() - t0)
    return rows / statistics.median(times)


def consume(iterable, stack: bool = False) -> int:
    rows = 0
    for b in iterable:
        x = b["x"]
        if stack:
            x = np.stack([np.stack(r) for r in x]) if x.dtype == object else x
        assert x.ndim == 3 and x.dtype == np.float32, (x.dtype, x.shape)
        float(x[-1, -1, -1])  # touch the batch
        rows += len(x)
    return rows


def three_of_twelve(batch: dict, seed: int = 0) -> dict:
    # TSN-style train sampling in numpy: one random segment in each third.
    x = batch["x"]
    rng = np.random.default_rng(seed)
    picks = np.arange(3) * 4 + rng.integers(0, 4, size=(len(x), 3))
    return {"label": batch["label"], "x": np.take_along_axis(x, picks[:, :, None], axis=1)}


def bench_ray(store_path: Path, tensor: Path, nested: Path, repeat: int, cpus: int) -> dict:
    import ray
    import ray.data

    import finegym_store.ray as fr

    ray.init(num_cpus=cpus, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        store = fgs.open(store_path)
        cols = ["label", "x"]
        spec = fgs.SegmentSpec(3, mode="train")
        it = {"batch_size": BATCH, "batch_format": "numpy"}

        def full_store() -> int:
            return consume(fr.read_store(store_path, columns=cols).iter_batches(**it))

        def full_parquet_tensor() -> int:
            return consume(ray.data.read_parquet(str(tensor), columns=cols).iter_batches(**it))

        def full_parquet_nested() -> int:
            return consume(ray.data.read_parquet(str(nested), columns=cols).iter_batches(**it), stack=True)

        def full_loader() -> int:
            return consume({"x": b.features} for b in store.loader("x", BATCH, shuffle=False))

        def k3_store() -> int:
            return consume(fr.read_store(store_path, columns=cols, spec=spec).iter_batches(**it))

        def k3_parquet() -> int:
            ds = ray.data.read_parquet(str(tensor), columns=cols).map_batches(three_of_twelve, batch_format="numpy")
            return consume(ds.iter_batches(**it))

        def k3_loader() -> int:
            return consume({"x": b.features} for b in store.loader("x", BATCH, spec=spec, shuffle=False))

        out = {}
        for name, fn in [("full_read_store", full_store), ("full_read_parquet_tensor", full_parquet_tensor),
                         ("full_read_parquet_nested", full_parquet_nested), ("full_store_loader", full_loader),
                         ("k3_read_store", k3_store), ("k3_read_parquet_map", k3_parquet),
                         ("k3_store_loader", k3_loader)]:
            out[name] = epochs(fn, repeat)
            print(f"  {name:28s} {out[name]:12,.0f} instances/s", flush=True)
        out["full_ratio_vs_parquet_tensor"] = out["full_read_store"] / out["full_read_parquet_tensor"]
        out["full_ratio_vs_parquet_nested"] = out["full_read_store"] / out["full_read_parquet_nested"]
        out["full_ratio_vs_loader"] = out["full_read_store"] / out["full_store_loader"]
        out["k3_ratio_vs_parquet"] = out["k3_read_store"] / out["k3_read_parquet_map"]
        out["k3_ratio_vs_loader"] = out["k3_read_store"] / out["k3_store_loader"]
        return out
    finally:
        ray.shutdown()


def bench_spark(store_path: Path, nested: Path, repeat: int, cpus: int) -> dict:
    from pyspark.sql import SparkSession

    import finegym_store.spark as fsp

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (SparkSession.builder.master(f"local[{cpus}]").appName("bench_engines")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "4g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        fsp.register(spark)
        n = len(fgs.open(store_path))

        def scan_store() -> int:
            spark.read.format("finegym_store").option("columns", "label,x").load(str(store_path)) \
                .write.format("noop").mode("overwrite").save()
            return n

        def scan_parquet() -> int:
            spark.read.parquet(str(nested)).select("label", "x").write.format("noop").mode("overwrite").save()
            return n

        out = {}
        for name, fn in [("spark_finegym_store", scan_store), ("spark_read_parquet", scan_parquet)]:
            out[name] = epochs(fn, repeat)
            print(f"  {name:28s} {out[name]:12,.0f} instances/s", flush=True)
        out["spark_ratio_vs_parquet"] = out["spark_finegym_store"] / out["spark_read_parquet"]
        return out
    finally:
        spark.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=4000)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs and Spark local[P] (default 2)")
    ap.add_argument("--skip-spark", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_engines.") as d:
        folder = Path(d)
        print(f"building {args.instances} x 12 x {args.channels} float32 in {folder}", flush=True)
        store, tensor, nested = build(folder, args.instances, args.channels)
        result = {"instances": args.instances, "shape": [12, args.channels], "repeat": args.repeat,
                  "cpus": args.cpus, "machine": platform.platform(), "cores": os.cpu_count(),
                  "store_mb": store.stat().st_size / 1e6, "parquet_tensor_mb": tensor.stat().st_size / 1e6,
                  "parquet_nested_mb": nested.stat().st_size / 1e6}
        print("Ray Data:", flush=True)
        result["ray"] = bench_ray(store, tensor, nested, args.repeat, args.cpus)
        if not args.skip_spark:
            print("Spark:", flush=True)
            result["spark"] = bench_spark(store, nested, args.repeat, args.cpus)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
