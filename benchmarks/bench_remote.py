"""Remote stores: the first epoch (cold cache) against parallel range GETs of
the same rows, and the second epoch (warm cache) against the local store.

    python benchmarks/bench_remote.py [--mib 256] [--batch 64] [--json out.json]

A synthetic TSN-size store (T = 12, C = 1024 float32, 48 KiB an instance) of
about ``--mib`` MiB is served by the tests' Range-capable HTTP server on
127.0.0.1 (tests/remote_servers.py). Each line is a time and a ratio to its
bound, measured in the same run:

* first epoch: ``fgs.open(url)`` on an empty cache plus one loader epoch
  (train mode, K = 8, batches of ``--batch``), against the same server
  answering ``obstore.get_ranges`` of every instance of each batch, batch
  after batch: the time to move the same rows by parallel range requests
  without any cache (what a cacheless reader does); and against parallel
  range GETs of the column's 1 MiB blocks, 16 at a time, without checking
  or writing them (the transfer alone of what the first epoch moves: the
  ratio to it is the cost of the cache).
* second epoch: the same loader's next epochs (every block cached and checked
  in this process: no request), against epochs of the same loader on the
  local file, page cache warm; best of 5 each, alternating. Goal: within 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import finegym_store as fgs  # noqa: E402
from remote_servers import RangeServer  # noqa: E402

T, C = 12, 1024


def build(folder: Path, mib: int) -> fgs.Store:
    from finegym_store import synth

    n = max(256, mib * 2**20 // (T * C * 4))
    ids = synth.make_ids(n)
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((64, T, C)).astype(np.float32)
    table = {k: pool[i % 64] + np.float32(i) for i, k in enumerate(ids)}
    synth.write_split(folder / "split.txt", ids, synth.long_tailed_labels(n, 99))
    return fgs.convert({"tsn": table}, folder / "bench.fgs", split=folder / "split.txt", progress=False)


def epoch(loader: fgs.Loader) -> float:
    t = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t


def range_bound(url: str, local: fgs.Store, batches: list[np.ndarray]) -> float:
    """Parallel range GETs of each batch's instances, batch after batch."""
    import obstore
    from obstore.store import HTTPStore

    base, name = url.rsplit("/", 1)
    store = HTTPStore.from_url(base, client_options={"allow_http": True})
    feat = next(s for s in local.sections() if s["name"] == "features/tsn")
    inst = T * C * 4
    t = time.perf_counter()
    for b in batches:
        starts = (feat["offset"] + b * inst).tolist()
        obstore.get_ranges(store, name, starts=starts, lengths=[inst] * len(starts), coalesce=0)
    return time.perf_counter() - t


def block_bound(url: str, local: fgs.Store) -> float:
    """Parallel range GETs of every 1 MiB block of the feature column, 16 per call."""
    import obstore
    from obstore.store import HTTPStore

    base, name = url.rsplit("/", 1)
    store = HTTPStore.from_url(base, client_options={"allow_http": True})
    feat = next(s for s in local.sections() if s["name"] == "features/tsn")
    block = fgs._core.BLOCK_SIZE
    starts = list(range(feat["offset"], feat["offset"] + feat["length"], block))
    ends = [min(s + block, feat["offset"] + feat["length"]) for s in starts]
    t = time.perf_counter()
    for i in range(0, len(starts), 16):
        obstore.get_ranges(store, name, starts=starts[i : i + 16], ends=ends[i : i + 16], coalesce=0)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="store size in MiB (default 256)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = build(root, args.mib)
        server = RangeServer(root).start()
        url = f"{server.url}/bench.fgs"
        try:
            kw = {"batch_size": args.batch, "num_segments": 8, "mode": "train", "seed": 0, "prefetch": 2}
            ref = local.loader("tsn", **kw)
            batches = [ref.indices(0)[i : i + args.batch] for i in range(0, len(local), args.batch)]
            bound_first = range_bound(url, local, batches)
            bound_blocks = block_bound(url, local)

            t = time.perf_counter()
            remote = fgs.open(url, cache_dir=root / "cache")
            opened = time.perf_counter() - t
            loader = remote.loader("tsn", **kw)
            first = opened + epoch(loader)
            fetched = remote._remote.remote.bytes_fetched
            epoch(ref)  # warm the page cache for the local file
            # Best of 5, alternating, so that both see the same machine load.
            seconds, locals_ = [], []
            for _ in range(5):
                seconds.append(epoch(loader))
                locals_.append(epoch(ref))
            second, local_epoch = min(seconds), min(locals_)
        finally:
            server.stop()
    out = {
        "store_bytes": local.file_size, "instances": len(local), "batch": args.batch,
        "open_s": opened, "first_epoch_s": first, "range_gets_s": bound_first,
        "first_over_range_gets": first / bound_first, "block_gets_s": bound_blocks,
        "first_over_block_gets": first / bound_blocks, "bytes_fetched": fetched,
        "second_epoch_s": second, "local_epoch_s": local_epoch, "second_over_local": second / local_epoch,
    }
    print(f"store: {len(local)} instances, {local.file_size / 2**20:.0f} MiB, batches of {args.batch}, K=8")
    print(f"first epoch (open + fetch):   {first:8.3f} s  vs parallel range GETs of the same rows "
          f"{bound_first:8.3f} s  ratio {first / bound_first:.2f}  (open {opened * 1e3:.0f} ms)")
    print(f"                              {'':8}    vs parallel range GETs of its 1 MiB blocks  "
          f"{bound_blocks:8.3f} s  ratio {first / bound_blocks:.2f}  ({fetched / 2**20:.0f} MiB fetched)")
    print(f"second epoch (cache):         {second:8.3f} s  vs local store {local_epoch:8.3f} s  "
          f"ratio {second / local_epoch:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
