"""``finegym-store bench``: gather, the loader and the baselines, side by side.

Every figure is measured as a training loop sees it: consecutive batches in
one process, the median of several rounds, the baselines (memcpy, parallel
pread) in the same run on the same records. Cold runs start from a file
evicted from the page cache (posix_fadvise DONTNEED, checked with mincore)
and run each method in a fresh child process, so no method inherits another
one's pages or mappings.

States of the page cache:

- ``hot``: the whole feature section resident (read once first);
- ``cold``: evicted, then ``batches`` consecutive batches (steady state: the
  median batch after the first);
- ``half``: evicted, then every other instance of the epoch order read back
  in, so each batch finds half its instances resident.

Not part of the library API: a tool for measuring it. The data (FineGym's
I3D size by default: 20484 x 12 x 2048 float32, 2 GB) is generated once
into ``--data`` (default ``$FINEGYM_BENCH_DIR`` or /tmp/finegym-bench).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: FineGym Gym99 train + val element instances and the released feature sizes.
INSTANCES = 20484
SMALL_INSTANCES = 2048
T = 12
CHANNELS = {"i3d": 2048, "tsn": 1024}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE


# -- page cache ---------------------------------------------------------------


def resident_pages(path: str | os.PathLike[str], offset: int = 0, length: int | None = None) -> np.ndarray:
    """For each page of path[offset:offset+length] (from the page containing
    `offset`), whether it is in the page cache: mincore on a fresh read-only
    mapping, which maps nothing by itself."""
    size = os.path.getsize(path)
    length = size - offset if length is None else min(length, size - offset)
    if length <= 0:
        return np.zeros(0, bool)
    start = offset - offset % PAGE
    span = length + offset - start
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), span, access=mmap.ACCESS_READ, offset=start)
        try:
            vec = np.zeros((span + PAGE - 1) // PAGE, np.uint8)
            if _libc.mincore(_map_address(m), span, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {os.fspath(path)!r}")
            return (vec & 1).astype(bool)
        finally:
            m.close()


def residency(path: str | os.PathLike[str], offset: int = 0, length: int | None = None) -> float:
    """Fraction of the pages of path[offset:offset+length] in the page cache."""
    pages = resident_pages(path, offset, length)
    return float(pages.mean()) if len(pages) else 1.0


def _map_address(m: mmap.mmap) -> int:
    """Address of a read-only mmap's first byte (numpy exposes it)."""
    return int(np.frombuffer(m, np.uint8).ctypes.data)


def evict(path: str | os.PathLike[str], require: float = 0.01) -> float:
    """Drop the file's clean pages from the page cache; returns the fraction
    still resident. Pages mapped by a live process are not dropped, so call
    it with the file unmapped (cold runs happen in child processes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = residency(path)
    if left > require:
        try:  # root only; harmless elsewhere
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError:
            pass
        left = residency(path)
    return left


def read_instances(path: str, base: int, instance_bytes: int, idx: np.ndarray) -> None:
    """Bring the given instances' bytes into the page cache (plain reads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in np.sort(idx):
            os.pread(fd, instance_bytes, base + int(i) * instance_bytes)
    finally:
        os.close(fd)


# -- data ---------------------------------------------------------------------


@dataclass
class Data:
    store: str
    column: str
    n: int
    t: int
    c: int
    base: int  # byte offset of the feature section in the file

    @property
    def instance_bytes(self) -> int:
        return self.t * self.c * 4


def ensure_store(folder: Path, column: str, n: int, echo: Callable[[str], None] = print) -> Data:
    """A store of n instances of (12, C) float32 for `column` (i3d or tsn),
    built once (values: a few hundred distinct random blocks, cycled)."""
    import finegym_store as fgs

    c = CHANNELS[column]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench_{column}_{n}.fgs"
    if not path.exists():
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        blocks = rng.standard_normal((min(n, 256), T, c), dtype=np.float32)
        table = {f"inst{i:06d}": blocks[i % len(blocks)] for i in range(n)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fgs.convert(tmp, {column: table}, progress=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        echo(f"[data] wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    s = fgs.open(path)
    try:
        sec = next(x for x in s.sections() if x["name"] == f"features/{column}")
        return Data(os.fspath(path), column, len(s), T, c, int(sec["offset"]))
    finally:
        del s  # unmapped when the last reference goes


# -- methods ------------------------------------------------------------------


def test_segments(k: int) -> np.ndarray:
    from finegym_store import _core

    return np.arange(T) if k == T else np.asarray(_core.sample_segments(T, k, 1, "test"))


def record_offsets(d: Data, idx: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """File offsets and size of the records a batch reads: whole instances
    for K = T (contiguous), single rows otherwise."""
    row = d.c * 4
    if k == d.t:
        return d.base + idx.astype(np.int64) * d.instance_bytes, d.instance_bytes
    segs = test_segments(k).astype(np.int64)
    return (d.base + idx.astype(np.int64)[:, None] * d.instance_bytes + segs[None, :] * row).ravel(), row


def memcpy_threads(src: np.ndarray, offs: np.ndarray, size: int, out: np.ndarray, threads: int) -> None:
    """memcpy_records split over `threads` Python threads (each releases the GIL)."""
    from finegym_store import _bench

    if threads <= 1:
        _bench.memcpy_records(src, offs, size, out)
        return
    parts = np.array_split(np.arange(len(offs)), threads)
    jobs = []
    for p in parts:
        if len(p) == 0:
            continue
        view = out[p[0] * size:(p[-1] + 1) * size]
        jobs.append(threading.Thread(target=_bench.memcpy_records, args=(src, offs[p], size, view)))
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()


class Runner:
    """Opens the store (and a memmap of its feature section) once; then each
    call fetches one batch with the named method, as a training loop would."""

    def __init__(self, d: Data, k: int, threads: int) -> None:
        import finegym_store as fgs

        self.d, self.k, self.threads = d, k, threads
        self.store = fgs.open(d.store)
        self.features = np.frombuffer(self.store._reader.section(f"features/{d.column}"), np.uint8)
        self.mm = np.memmap(d.store, dtype=np.float32, mode="r", offset=d.base, shape=(d.n, d.t, d.c))
        self.segs = test_segments(k)

    def gather(self, idx: np.ndarray, prefetch: str = "auto") -> np.ndarray:
        from finegym_store import _core

        s = self.store
        return _core.gather(s._reader, self.d.column, idx, None if self.k == self.d.t else self.k, "test", 0, 0, 1,
                            None, s._gather_dtype(self.d.column, None), self.threads, prefetch, "mmaction2")

    def stream(self, method: str, order: np.ndarray, b: int, batches: int) -> list[float]:
        """Seconds per batch for `batches` consecutive batches of `order`, as
        the caller of the named method waits for them."""
        chunks = [order[(j * b) % len(order):][:b] for j in range(batches)]
        chunks = [c if len(c) == b else order[:b] for c in chunks]
        k = None if self.k == self.d.t else self.k
        times = []
        if method == "loader":
            loader = self.store.loader(self.d.column, batch_size=b, num_segments=k, mode="test", shuffle=True,
                                       seed=int(order[0]), drop_last=True)
            it = iter(loader)
            for _ in range(batches):
                t0 = time.perf_counter()
                try:
                    next(it)
                except StopIteration:
                    it = iter(loader)
                    next(it)
                times.append(time.perf_counter() - t0)
            return times
        if method.startswith("DataLoader"):
            import torch.utils.data as tud

            from finegym_store.torch import StoreDataset, collate

            workers = int(method.split("w")[-1])
            ds = StoreDataset(self.store, self.d.column, num_segments=k, mode="test")
            dl = tud.DataLoader(ds, batch_sampler=[c.tolist() for c in chunks], collate_fn=collate,
                                num_workers=workers, persistent_workers=False)
            it = iter(dl)
            for _ in range(batches):
                t0 = time.perf_counter()
                next(it)
                times.append(time.perf_counter() - t0)
            return times
        for idx in chunks:
            t0 = time.perf_counter()
            self.batch(method, idx)
            times.append(time.perf_counter() - t0)
        return times

    def evict_mapped(self) -> None:
        """Unmap this process's pages of the file (MADV_DONTNEED on both of its
        mappings; the data stays in the page cache), then drop them from the
        page cache: the file is cold again while the store stays open."""
        for arr in (self.features, self.mm):
            a = np.asarray(arr).view(np.uint8).reshape(-1)
            addr = int(a.ctypes.data)
            start = addr - addr % PAGE
            _libc.madvise(start, addr + a.nbytes - start, 4)  # MADV_DONTNEED
        evict(self.d.store)

    def batch(self, method: str, idx: np.ndarray) -> None:
        from finegym_store import _bench

        if method.startswith("gather"):
            self.gather(idx, method.split(":")[1] if ":" in method else "auto")
        elif method == "numpy memmap":
            _ = self.mm[idx] if self.k == self.d.t else self.mm[idx[:, None], self.segs[None, :]]
        elif method.startswith("memcpy"):
            offs, size = record_offsets(self.d, idx, self.k)
            n = 1 if method == "memcpy 1T" else self.threads
            memcpy_threads(self.features, offs - self.d.base, size, np.empty(len(offs) * size, np.uint8), n)
        elif method.startswith("pread QD"):
            offs, size = record_offsets(self.d, idx, self.k)
            _bench.pread_records(self.d.store, offs, size, np.empty(len(offs) * size, np.uint8),
                                 int(method[len("pread QD"):]))
        else:
            raise ValueError(f"unknown method {method!r}")

    def close(self) -> None:
        del self.mm, self.features, self.store  # unmapped when the last references go


def run_batches(d: Data, method: str, k: int, b: int, threads: int, batches: int, seed: int,
                epochs: int = 0) -> list[float]:
    """Seconds per batch for `batches` consecutive batches of an epoch order;
    with epochs > 0, that many whole epochs instead, the file evicted before
    each (a store larger than the page cache, simulated)."""
    order = np.random.default_rng(seed).permutation(d.n)
    r = Runner(d, k, threads)
    try:
        if epochs == 0:
            return r.stream(method, order, b, batches)
        times = []
        for e in range(epochs):
            r.evict_mapped()
            times += r.stream(method, np.random.default_rng(seed + e).permutation(d.n), b, d.n // b)
        return times
    finally:
        r.close()


def child_main(spec: dict[str, Any]) -> None:
    d = Data(**spec["data"])
    times = run_batches(d, spec["method"], spec["k"], spec["b"], spec["threads"], spec["batches"], spec["seed"],
                        spec.get("epochs", 0))
    print(json.dumps(times))


def in_child(d: Data, method: str, k: int, b: int, threads: int, batches: int, seed: int,
             epochs: int = 0) -> list[float]:
    spec = {"data": asdict(d), "method": method, "k": k, "b": b, "threads": threads, "batches": batches,
            "seed": seed, "epochs": epochs}
    out = subprocess.run([sys.executable, "-m", "finegym_store.bench", "--child", json.dumps(spec)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(d: Data, state: str, b: int, batches: int, seed: int) -> float:
    """Put the file in `state` (cold or half) for a run of `batches` batches
    from epoch order `seed`; returns the resident fraction of the instances
    that run touches, as mincore sees it."""
    left = evict(d.store)
    if state == "half":
        order = np.random.default_rng(seed).permutation(d.n)[: b * batches]
        read_instances(d.store, d.base, d.instance_bytes, order[::2])
    elif state not in ("cold", "epochs"):
        raise ValueError(state)
    return left if state == "cold" else residency(d.store, d.base, d.n * d.instance_bytes)


@dataclass
class Result:
    state: str
    k: int
    b: int
    threads: int
    method: str
    batch_s: list[float] = field(default_factory=list)  # per round: the steady-state median batch time

    @property
    def median_s(self) -> float:
        return statistics.median(self.batch_s)

    def per_s(self) -> float:
        return self.b / self.median_s


def steady(times: list[float]) -> float:
    """Mean batch time over the run (total time / batches): what a training
    loop waits in all, first batch included. (A median would hide the cost of
    the fault path, whose first batches read far more than they need and
    make later ones hot.)"""
    return sum(times) / len(times)


def bench_cold(d: Data, state: str, methods: list[str], k: int, b: int, threads: int, batches: int, rounds: int,
               echo: Callable[[str], None]) -> list[Result]:
    results = {m: Result(state, k, b, threads, m) for m in methods}
    for rnd in range(rounds):
        for m in methods:  # interleaved: drift in the VM's disk hits every method alike
            seed = 1000 * rnd + 7
            frac = prepare(d, "cold" if state == "flow" else state, b, batches, seed)
            times = in_child(d, m, k, b, threads, batches, seed, 2 if state == "epochs" else 0)
            results[m].batch_s.append(steady(times))
            echo(f"  [{state} K={k} B={b} round {rnd}] {m:14s} {b / steady(times):9.0f} inst/s "
                 f"(resident before: {frac:.2f}; batches ms: {' '.join(f'{t * 1e3:.0f}' for t in times[:8])} ...)")
    return list(results.values())


def bench_hot(d: Data, methods: list[str], k: int, b: int, threads: int, batches: int, rounds: int) -> list[Result]:
    r = Runner(d, k, threads)
    try:
        r.features.sum(dtype=np.uint64)  # every page resident and mapped here
        results = {m: Result("hot", k, b, threads, m) for m in methods}
        order = np.random.default_rng(1).permutation(d.n)
        for rnd in range(rounds):
            for m in methods:
                times = []
                times = r.stream(m, np.roll(order, rnd * batches * b), b, batches)
                results[m].batch_s.append(statistics.median(times))  # hot: no first-batch effect to count
        return list(results.values())
    finally:
        r.close()


# -- entry point -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(prog="finegym-store bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: Any) -> None:
    p.add_argument("--data", default=os.environ.get("FINEGYM_BENCH_DIR") or "/tmp/finegym-bench",
                   help="folder for the generated stores (kept between runs)")
    p.add_argument("--small", action="store_true", help=f"{SMALL_INSTANCES} instances instead of {INSTANCES}")
    p.add_argument("--column", choices=sorted(CHANNELS), default="i3d")
    p.add_argument("--states", default="hot,cold,half", help="comma-separated: hot, cold, half, epochs (two whole epochs, evicted "
                   "before each), flow (cold: the loader and a DataLoader over StoreDataset)")
    p.add_argument("--k", default="12,3", help="segments per instance (comma-separated)")
    p.add_argument("--batch", default="256", help="batch sizes (comma-separated)")
    p.add_argument("--threads", type=int, default=0, help="gather threads (0: every core)")
    p.add_argument("--batches", type=int, default=24, help="consecutive batches per run")
    p.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    p.add_argument("--json", help="write the results here")


def run(args: Any) -> int:
    from finegym_store import _core

    threads = args.threads or _core.max_threads()
    d = ensure_store(Path(args.data), args.column, SMALL_INSTANCES if args.small else INSTANCES)
    results: list[Result] = []
    echo = print
    for k in [int(x) for x in args.k.split(",")]:
        for b in [int(x) for x in args.batch.split(",")]:
            for state in args.states.split(","):
                if state == "hot":
                    methods = ["gather:auto", "gather:on", "gather:off", "numpy memmap", "memcpy 1T",
                               f"memcpy {threads}T"]
                    results += bench_hot(d, methods, k, b, threads, args.batches, args.rounds)
                elif state == "cold":
                    methods = ["gather:auto", "gather:on", "gather:off", "numpy memmap", "pread QD1",
                               "pread QD32", "pread QD64"]
                    results += bench_cold(d, state, methods, k, b, threads, args.batches, args.rounds, echo)
                elif state == "flow":  # the loader and the DataLoader, cold, beside gather and pread
                    methods = ["gather:auto", "loader", "DataLoader w0", "DataLoader w2", "pread QD32",
                               "pread QD64"]
                    results += bench_cold(d, "flow", methods, k, b, threads, args.batches, args.rounds, echo)
                else:
                    methods = ["gather:auto", "gather:on", "gather:off", "numpy memmap"]
                    results += bench_cold(d, state, methods, k, b, threads, args.batches, args.rounds, echo)
    print_table(results, d)
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "median_s": r.median_s} for r in results], indent=1))
    return 0


def print_table(results: list[Result], d: Data) -> None:
    groups: dict[tuple[str, int, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.state, r.k, r.b), []).append(r)
    for (state, k, b), rs in groups.items():
        ref = next(r for r in rs if r.method == "gather:auto")
        print(f"\n{state}, K={k}, B={b}, threads={rs[0].threads}")
        print(f"  {'method':16s} {'inst/s':>10s} {'GB/s':>7s} {'vs gather':>9s}")
        for r in rs:
            gbs = r.b * k * d.c * 4 / r.median_s / 1e9
            print(f"  {r.method:16s} {r.per_s():10.0f} {gbs:7.2f} {r.per_s() / ref.per_s():9.2f}")


if __name__ == "__main__":
    sys.exit(main())
