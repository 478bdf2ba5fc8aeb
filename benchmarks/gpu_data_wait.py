"""Data wait per training step on a GPU: ``tensor_batches(loader, device=...)``
against a DataLoader with ``pin_memory=True``.

    python benchmarks/gpu_data_wait.py --device cuda --json gpu_data_wait.json
    python benchmarks/gpu_data_wait.py --device cuda --check --epochs 1     # identical features, both ways
    python benchmarks/gpu_data_wait.py --device cpu --instances 256         # no CUDA: the same code on the CPU

Builds a store of I3D-like size in a temporary folder (deleted at the end;
``--dir`` is where that folder goes): ``--instances`` N (default 20484, the
I3D train split) of (12, ``--channels``) features (default 1024) stored as
``--dtype`` (float32 or float16), gym99-like labels. Then, for ``--epochs``
epochs, alternating each epoch between them:

(a) ``tensor_batches(store.loader(column, B, prefetch=P), device=D)``: the
    loader gathers into pinned buffers in the background and each batch is
    copied to D on a stream of its own, one batch ahead;
(b) ``DataLoader(StoreDataset(store, column), batch_size=B, shuffle=True,
    collate_fn=collate, num_workers=W, pin_memory=True,
    persistent_workers=W > 0)``, each batch then moved with
    ``batch.to(D, non_blocking=True)`` (pin_memory=False with ``--device
    cpu``, where torch has nothing to pin for).

Both run the same fake training step on D: the mean of the batch's features
and labels added to ``--step-ms`` worth of (H, H) matmuls (H =
``--step-size``; the count is calibrated once on D), ended by ``.item()``,
which waits for the device as an optimizer step's loss does. Per step it
records the **data wait**, the time from asking for the batch to the batch
being usable on D (``next()``, the ``.to()`` of (b), then a synchronisation
of the current stream, which waits for the batch's copy but not for one
queued ahead), and the **step** time. The first ``--warmup`` steps of each
path (worker start-up, the first gathers, pinned allocations) are recorded
but left out of the medians and p90s.

Prints a table and writes JSON (``--json``): the configuration, the
environment, every step's wait and step time for both paths with their
median and p90, and the ratios ours / DataLoader (below 1: ours waits less).
``--check`` also copies every batch back to the host and compares the two
paths' features, labels and indices by instance index (train-mode segments
keyed by the same seed and epoch; exit status 1 if any differs); its timings
include those copies and are not the measurement. Nothing here asserts a
timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import finegym_store as fgs
from finegym_store import synth
from finegym_store.torch import StoreDataset, TensorBatch, collate, tensor_batches

COLUMN = "feat"
T = 12
DISTINCT = 256  # distinct (T, C) blocks drawn; the N values cycle through copies of them


def build_store(folder: Path, n: int, channels: int, dtype: str) -> fgs.Store:
    ids = synth.make_ids(n, seed=0)
    labels = synth.long_tailed_labels(n, 99, seed=0)
    k = min(n, DISTINCT)
    blocks = list(synth.make_features(ids[:k], labels[:k], (T, channels), seed=0).values())
    table = {key: blocks[i % k].copy() for i, key in enumerate(ids)}
    synth.write_split(folder / "split.txt", ids, labels)
    return fgs.convert({COLUMN: table}, folder / "gpu_data_wait.fgs", split=folder / "split.txt", dtype=dtype,
                       progress=False)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


class Step:
    """The fake training step: a fixed amount of matmul work on the device,
    plus a reduction of the batch, ended by ``.item()`` (a host sync)."""

    def __init__(self, device: torch.device, size: int, target_ms: float) -> None:
        gen = torch.Generator().manual_seed(0)
        self.device = device
        self.a = (torch.randn(size, size, generator=gen) / math.sqrt(size)).to(device)
        self.repeats = 1
        for _ in range(3):  # warm up, then calibrate
            self.work()
            float(self.a[0, 0].item())
        t0 = time.perf_counter()
        for _ in range(5):
            self.work()
        float(self.a[0, 0].item())
        one = max((time.perf_counter() - t0) / 5, 1e-6)
        self.repeats = max(1, round(target_ms / 1000 / one))
        self.calibrated_ms = one * 1000

    def work(self) -> torch.Tensor:
        h = self.a
        for _ in range(self.repeats):
            h = torch.tanh(h @ self.a)
        return h

    def __call__(self, batch: TensorBatch) -> float:
        h = self.work()
        loss = h[0, 0] + batch.features.float().mean() + batch.labels.float().mean()
        return float(loss.item())


def usable(device: torch.device) -> None:
    """Wait until the work queued so far on the current stream (the batch's
    copy, joined to it) is done."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def run_epoch(batches, device: torch.device, step: Step, move: bool, record: dict, check: dict | None) -> None:
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        if move:
            batch = batch.to(device, non_blocking=True)
        usable(device)
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        record["wait_s"].append(t1 - t0)
        record["step_s"].append(t2 - t1)
        if check is not None:
            features, labels = batch.features.cpu().numpy(), batch.labels.cpu().numpy()
            for row, index in enumerate(batch.indices.cpu().tolist()):
                check[index] = (features[row].copy(), int(labels[row]))


def summary(record: dict, warmup: int) -> dict:
    waits, steps = record["wait_s"][warmup:], record["step_s"][warmup:]
    return {
        "steps": len(record["wait_s"]),
        "wait_s": record["wait_s"],
        "step_s": record["step_s"],
        "wait_median_s": statistics.median(waits) if waits else None,
        "wait_p90_s": percentile(waits, 90) if waits else None,
        "step_median_s": statistics.median(steps) if steps else None,
        "wait_share": sum(waits) / (sum(waits) + sum(steps)) if waits else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpus": os.cpu_count(), "machine": platform.machine(), "finegym_store": fgs.__version__}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--instances", type=int, default=20484)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--segments", type=int, default=None,
                   help="K train-mode segments per instance (default: all 12)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--prefetch", type=int, default=2, help="the loader's prefetch (a)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (b)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="steps of each path left out of the statistics")
    p.add_argument("--step-ms", type=float, default=5.0, help="matmul work per step, in ms on the device")
    p.add_argument("--step-size", type=int, default=4096, help="H of the (H, H) matmuls")
    p.add_argument("--check", action="store_true", help="compare the features both paths deliver")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dir", type=Path, default=None, help="where the temporary folder goes")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    spec = fgs.SegmentSpec(args.segments, mode="train", seed=0) if args.segments else fgs.SegmentSpec(seed=0)
    with tempfile.TemporaryDirectory(prefix="gpu_data_wait_", dir=args.dir) as tmp:
        t0 = time.perf_counter()
        store = build_store(Path(tmp), args.instances, args.channels, args.dtype)
        print(f"store: {args.instances} x ({T}, {args.channels}) {args.dtype}, "
              f"{os.path.getsize(store.path) / 2**20:.0f} MiB, built in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        step = Step(device, args.step_size, args.step_ms)
        loader = store.loader(COLUMN, args.batch_size, spec=spec, prefetch=args.prefetch)
        ds = StoreDataset(store, COLUMN, spec=spec)
        pin = device.type == "cuda"
        dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.workers, pin_memory=pin,
                                         persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))
        records = {name: {"wait_s": [], "step_s": []} for name in ("tensor_batches", "dataloader")}
        identical, compared = True, 0
        for epoch in range(args.epochs):
            seen: dict[str, dict] = {"tensor_batches": {}, "dataloader": {}} if args.check else {}
            loader.set_epoch(epoch)
            run_epoch(tensor_batches(loader, device=device), device, step, False, records["tensor_batches"],
                      seen.get("tensor_batches"))
            ds.set_epoch(epoch)
            run_epoch(dl, device, step, True, records["dataloader"], seen.get("dataloader"))
            if args.check:
                ours, theirs = seen["tensor_batches"], seen["dataloader"]
                compared += len(loader)
                same = ours.keys() == theirs.keys() and all(
                    ours[i][1] == theirs[i][1] and np.array_equal(ours[i][0], theirs[i][0]) for i in ours)
                identical = identical and same
        del dl  # ends persistent workers before the folder goes
    paths = {name: summary(rec, args.warmup) for name, rec in records.items()}
    ours, theirs = paths["tensor_batches"], paths["dataloader"]
    result = {
        "config": {"device": str(device), "instances": args.instances, "rows": T, "channels": args.channels,
                   "dtype": args.dtype, "segments": args.segments, "batch_size": args.batch_size,
                   "prefetch": args.prefetch, "workers": args.workers, "epochs": args.epochs,
                   "warmup": args.warmup, "step_ms": args.step_ms, "step_size": args.step_size,
                   "step_matmuls": step.repeats, "pin_memory": pin, "check": args.check},
        "environment": environment(device),
        "check": {"batches": compared, "identical": identical} if args.check else None,
        "paths": paths,
        "ratios": {"wait_median": ratio(ours["wait_median_s"], theirs["wait_median_s"]),
                   "wait_p90": ratio(ours["wait_p90_s"], theirs["wait_p90_s"]),
                   "step_median": ratio(ours["step_median_s"], theirs["step_median_s"])},
    }

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.3f}"
    print(f"{args.epochs} epochs of {len(loader)} steps on {device}, batch {args.batch_size}, "
          f"{step.repeats} matmuls of {args.step_size}^2 per step; statistics after {args.warmup} steps")
    print(f"{'path':<40} {'wait median ms':>15} {'wait p90 ms':>12} {'step median ms':>15} {'wait share':>10}")
    labels = {"tensor_batches": f"tensor_batches (prefetch {args.prefetch})",
              "dataloader": f"DataLoader ({args.workers} workers, pin_memory={pin})"}
    for name, side in paths.items():
        share = "-" if side["wait_share"] is None else f"{side['wait_share']:.1%}"
        print(f"{labels[name]:<40} {ms(side['wait_median_s']):>15} {ms(side['wait_p90_s']):>12} "
              f"{ms(side['step_median_s']):>15} {share:>10}")
    r = result["ratios"]
    print("ours / DataLoader: wait median " + ("-" if r["wait_median"] is None else f"{r['wait_median']:.2f}x")
          + ", wait p90 " + ("-" if r["wait_p90"] is None else f"{r['wait_p90']:.2f}x"))
    if args.check:
        print(f"check: {compared} batches, features {'identical' if identical else 'DIFFER'}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
