"""How much of a probe's time goes to waiting for batches, at FineGym I3D size.

Builds a train/val pair of synthetic I3D-shaped stores (default: 20484 train
instances, gym99 v1.0's train size, of 12 x 2048 float32 = 2.01 GB, and 8521
val instances, gym99 val's size) with ``finegym_store.probe.make_demo_pair``
(the demo's class-structured features), reads both once so the page cache is
hot, then runs ``run_probe`` per backend and reports, beside each probe's time,
the time the training loop spent blocked on ``next(loader)`` (plus the
standardization gather) and its fraction of the whole run. Issue 9's goal:
under 10% on this store, hot.

For context it also times one bare epoch through the loader (no classifier):
the data time a probe would pay per epoch if loading did not overlap compute.

    python benchmarks/bench_probe.py                       # full size, numpy and torch, 10 epochs
    python benchmarks/bench_probe.py --train 2000 --val 1000 --epochs 3   # quick
    python benchmarks/bench_probe.py --json out.json --keep --dir /tmp/probe-bench

The stores (about 2.9 GB at full size) go to a temporary folder under /tmp,
deleted at the end unless ``--keep`` (then ``--dir`` reuses them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import finegym_store as fgs
from finegym_store import synth
from finegym_store.probe import make_demo_pair, run_probe


def warm(store: fgs.Store, column: str) -> float:
    """Touch every page of the column so it is in the page cache; seconds."""
    t0 = time.perf_counter()
    v = store.column(column).values.reshape(-1).view(np.uint8)
    int(v[::4096].sum())
    return time.perf_counter() - t0


def bare_epoch(store: fgs.Store, column: str, batch_size: int, num_segments: int, threads: int | None) -> float:
    """One epoch through the loader with nothing else to do; seconds."""
    loader = store.loader(column, batch_size, num_segments=num_segments, mode="train", seed=0, threads=threads)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=20484, help="train instances (default 20484)")
    ap.add_argument("--val", type=int, default=8521, help="val instances (default 8521)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-segments", type=int, default=3)
    ap.add_argument("--head", choices=("linear", "mlp"), default="linear")
    ap.add_argument("--backend", action="append", choices=("numpy", "torch"),
                    help="repeatable (default: numpy and torch)")
    ap.add_argument("--threads", type=int, help="gather threads (default: all cores)")
    ap.add_argument("--compute-threads", type=int, help="classifier threads (default: cores - 1)")
    ap.add_argument("--dir", help="folder for the stores (default: a new temporary folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (reused by a later --dir run)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    backends = args.backend or ["numpy", "torch"]

    made_folder = not args.dir
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="finegym-probe-bench-", dir="/tmp"))
    report: dict = {"machine": platform.platform(), "cores": len(os.sched_getaffinity(0)),
                    "train": args.train, "val": args.val, "epochs": args.epochs, "batch_size": args.batch_size,
                    "num_segments": args.num_segments, "head": args.head, "threads": args.threads,
                    "compute_threads": args.compute_threads, "runs": []}
    try:
        t0 = time.perf_counter()
        if (folder / "train.fgs").exists() and (folder / "val.fgs").exists():
            tr, va = fgs.open(folder / "train.fgs"), fgs.open(folder / "val.fgs")
            if (len(tr), len(va)) != (args.train, args.val):
                raise SystemExit(f"{folder} holds stores of {len(tr)}/{len(va)} instances; use another --dir")
            print(f"reusing {folder}")
        else:
            print(f"building {args.train} + {args.val} I3D-shaped instances in {folder} ...", flush=True)
            tr, va = make_demo_pair(folder, args.train, args.val, {"i3d": synth.MODELS["i3d"]})
            print(f"  built in {time.perf_counter() - t0:.1f} s: train {tr.file_size / 1e9:.2f} GB, "
                  f"val {va.file_size / 1e9:.2f} GB")
        report["train_bytes"], report["val_bytes"] = tr.file_size, va.file_size
        print(f"warming the page cache: {warm(tr, 'i3d') + warm(va, 'i3d'):.1f} s")
        bare = bare_epoch(tr, "i3d", args.batch_size, args.num_segments, args.threads)
        report["bare_epoch_s"] = bare
        print(f"one bare train epoch through the loader (K={args.num_segments}, B={args.batch_size}): {bare:.2f} s")
        for backend in backends:
            r = run_probe(tr, va, "i3d", num_segments=args.num_segments, head=args.head, backend=backend,
                          epochs=args.epochs, batch_size=args.batch_size, threads=args.threads,
                          compute_threads=args.compute_threads)
            t = r.timing
            row = {"backend": r.backend, **t, "mean_class_acc": r.levels["element"]["mean_class_acc"],
                   "top1": r.levels["element"]["top1"]}
            report["runs"].append(row)
            print(f"{r.backend:>6} {args.head}: {t['total_s']:.1f} s (train {t['train_s']:.1f}, eval "
                  f"{t['eval_s']:.1f}); waiting for batches {t['data_wait_s']:.2f} s = "
                  f"{100 * t['data_wait_fraction']:.1f}%; Mean Class Acc {100 * row['mean_class_acc']:.1f}, "
                  f"Top-1 {100 * row['top1']:.1f}", flush=True)
    finally:
        if not args.keep:  # only what make_demo_pair wrote, and the folder if we made it
            for name in ("train.fgs", "val.fgs", "train_split.txt", "val_split.txt"):
                (folder / name).unlink(missing_ok=True)
            if made_folder:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"removed the stores in {folder}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
