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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes starting on a page boundary, as
    gather's own outputs do: memcpy into memory that starts 16 bytes into a
    page (where malloc puts large arrays) runs up to 10x slower from
    page-aligned rows, which would make the baselines look worse than they are."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + nbytes]


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


def epoch_batches(order: np.ndarray, b: int, batches: int) -> list[np.ndarray]:
    """`batches` consecutive batches of B instances from an epoch order,
    wrapping round to its start (a short tail is replaced by its first B)."""
    chunks = [order[(j * b) % len(order):][:b] for j in range(batches)]
    return [c if len(c) == b else order[:b] for c in chunks]


def time_each(fetch: Callable[[np.ndarray], Any], chunks: list[np.ndarray]) -> list[float]:
    """Seconds of each fetch(idx), one batch after another."""
    times = []
    for idx in chunks:
        t0 = time.perf_counter()
        fetch(idx)
        times.append(time.perf_counter() - t0)
    return times


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
        self.spec = fgs.SegmentSpec(None if k == d.t else k, mode="test")

    def gather(self, idx: np.ndarray, readahead: str = "auto") -> np.ndarray:
        from finegym_store import _core

        return _core.gather(self.store._reader, self.d.column, idx, self.spec._native, 0, None, self.threads,
                            readahead)

    def stream(self, method: str, order: np.ndarray, b: int, batches: int) -> list[float]:
        """Seconds per batch for `batches` consecutive batches of `order`, as
        the caller of the named method waits for them."""
        chunks = epoch_batches(order, b, batches)
        k = None if self.k == self.d.t else self.k
        times = []
        if method == "loader" or method.startswith("train step"):
            # "train step X ms": a simulated training step (sleeping X ms, the
            # GIL released, as a GPU step would leave it) after every batch;
            # the times are then the waits for data alone.
            step = float(method.split()[2]) / 1e3 if method.startswith("train") else 0.0
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
                if step:
                    time.sleep(step)
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
        return time_each(lambda idx: self.batch(method, idx), chunks)

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
            memcpy_threads(self.features, offs - self.d.base, size, aligned_empty(len(offs) * size), n)
        elif method.startswith("pread QD"):
            offs, size = record_offsets(self.d, idx, self.k)
            _bench.pread_records(self.d.store, offs, size, aligned_empty(len(offs) * size),
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
    if "peer" in spec:
        print(json.dumps(peer_child(d, spec["peer"], Path(spec["folder"]), spec["k"], spec["b"], spec["batches"],
                                    spec["seed"])))
        return
    times = run_batches(d, spec["method"], spec["k"], spec["b"], spec["threads"], spec["batches"], spec["seed"],
                        spec.get("epochs", 0))
    print(json.dumps(times))


def in_child(d: Data, method: str, k: int, b: int, threads: int, batches: int, seed: int,
             epochs: int = 0) -> list[float]:
    spec = {"data": asdict(d), "method": method, "k": k, "b": b, "threads": threads, "batches": batches,
            "seed": seed, "epochs": epochs}
    return run_child(spec)


def run_child(spec: dict[str, Any]) -> Any:
    """Runs child_main(spec) in a fresh Python; its last line of output, as JSON."""
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
    skipped: str | None = None  # why it did not run
    rss_bytes: float | None = None  # open: resident memory each open added
    # cold states, per round: mean batch time after the first batch (which
    # holds a DataLoader's worker start-up and the fault path's big first read)
    later_s: list[float] = field(default_factory=list)
    open_s: list[float] = field(default_factory=list)  # peers-cold, per round: the peer's open, from cold

    @property
    def median_s(self) -> float:
        return statistics.median(self.batch_s) if self.batch_s else float("nan")

    def per_s(self) -> float:
        return self.b / self.median_s

    def add_cold_run(self, times: list[float], open_s: float | None = None) -> None:
        """One cold run's batch times: the steady figure (first batch, and an
        open when given, included), the figure after the first batch, and
        the open."""
        self.batch_s.append(((open_s or 0.0) + sum(times)) / len(times))
        self.later_s.append(steady(times[1:]) if len(times) > 1 else times[0])
        if open_s is not None:
            self.open_s.append(open_s)


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
            frac = prepare(d, "cold" if state in ("flow", "train-cold") else state, b, batches, seed)
            times = in_child(d, m, k, b, threads, batches, seed, 2 if state == "epochs" else 0)
            results[m].add_cold_run(times)
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


# -- what users do instead (peers) ------------------------------------------------

#: name -> module it needs (an optional `bench` extra); a peer whose module is
#: missing is reported as skipped, with the reason, never left out.
PEERS = {
    "pickle dict + np.stack": None,
    "h5py": "h5py",
    "LMDB": "lmdb",
    "Arrow IPC mmap take": "pyarrow",
    "Parquet (pyarrow)": "pyarrow",
    "Lance take": "lance",
    "HF datasets": "datasets",
}


def peer_missing(name: str) -> str | None:
    """Why a peer cannot run here (None: it can)."""
    import importlib.util

    mod = PEERS[name]
    if mod is not None and importlib.util.find_spec(mod) is None:
        return f"{mod} not installed (pip install '.[bench]')"
    return None


class Peer:
    """One peer's files (built once beside the store) and its batch fetch:
    ``fetch(idx)`` returns a (B, K, C) float32 array, the way its users would."""

    def __init__(self, name: str, d: Data, k: int, folder: Path, echo: Callable[[str], None] = print) -> None:
        self.name, self.d, self.k = name, d, k
        self.segs = test_segments(k)
        self.all = k == d.t
        stem = folder / f"peer_{d.column}_{d.n}"
        t0 = time.perf_counter()
        getattr(self, "_setup_" + "".join(ch for ch in name.split()[0].lower() if ch.isalnum()))(stem)
        self.open_s = time.perf_counter() - t0

    # Each setup builds its file once (outside any timing) and opens it.
    def _table(self) -> Any:
        import finegym_store as fgs

        return fgs.open(self.d.store).to_arrow(["id", self.d.column])

    def _values(self) -> np.ndarray:
        import finegym_store as fgs

        return np.asarray(fgs.open(self.d.store).column(self.d.column).values).reshape(self.d.n, self.d.t, self.d.c)

    def _pick(self, x: np.ndarray) -> np.ndarray:
        return x if self.all else x[:, self.segs]

    def _setup_pickle(self, stem: Path) -> None:
        import pickle

        path = stem.with_suffix(".pkl")
        if not path.exists():
            v = self._values()
            _atomic_write(path, lambda f: pickle.dump({f"{i:06d}": v[i].copy() for i in range(self.d.n)}, f,
                                                      protocol=4))
        with open(path, "rb") as f:
            self.table = pickle.load(f)  # trusted: written just above by this tool
        self.keys = sorted(self.table)

    def _fetch_pickle(self, idx: np.ndarray) -> np.ndarray:
        return self._pick(np.stack([self.table[self.keys[i]] for i in idx]))

    def _setup_h5py(self, stem: Path) -> None:
        import h5py

        path = stem.with_suffix(".h5")
        if not path.exists():
            v = self._values()

            def write(f: Any) -> None:
                with h5py.File(f, "w") as h:
                    h.create_dataset("x", data=v, chunks=(1, self.d.t, self.d.c))
            _atomic_write(path, write)
        self.h5 = h5py.File(path, "r")["x"]

    def _fetch_h5py(self, idx: np.ndarray) -> np.ndarray:
        order = np.argsort(idx)  # h5py needs increasing indices
        out = np.empty((len(idx), len(self.segs), self.d.c), np.float32)
        got = self.h5[np.sort(idx)]  # h5py allows one fancy index per read: whole instances, then the segments
        out[order] = self._pick(got)
        return out

    def _setup_lmdb(self, stem: Path) -> None:
        import lmdb

        path = stem.with_suffix(".lmdb")
        if not path.exists():
            v = self._values()
            tmp = path.with_name(path.name + ".tmp")
            env = lmdb.open(os.fspath(tmp), map_size=v.nbytes * 2, subdir=False, lock=False)
            with env.begin(write=True) as txn:
                for i in range(self.d.n):
                    txn.put(b"%08d" % i, v[i].tobytes())
            env.close()
            os.replace(tmp, path)
        self.env = lmdb.open(os.fspath(path), readonly=True, subdir=False, lock=False)

    def _fetch_lmdb(self, idx: np.ndarray) -> np.ndarray:
        with self.env.begin(buffers=True) as txn:
            # every key was written in _setup_lmdb: get() never returns None here
            x = np.stack([np.frombuffer(txn.get(b"%08d" % i), np.float32)  # type: ignore[arg-type]
                          .reshape(self.d.t, self.d.c) for i in idx])
        return self._pick(x)

    def _setup_arrow(self, stem: Path) -> None:
        import pyarrow as pa

        path = stem.with_suffix(".arrow")
        # One record batch, as pyarrow writes a table of one chunk by default:
        # take() over several chunks concatenates them first (a copy of the
        # whole column per call), and combine_chunks() would copy the file
        # into memory. A file from an older layout (several batches) is rebuilt.
        if path.exists() and pa.ipc.open_file(pa.memory_map(os.fspath(path))).num_record_batches != 1:
            path.unlink()
        if not path.exists():
            t = self._table().combine_chunks()

            def write(f: Any) -> None:
                with pa.ipc.new_file(f, t.schema) as w:
                    w.write_table(t)
            _atomic_write(path, write)
        self.arrow = pa.ipc.open_file(pa.memory_map(os.fspath(path))).read_all()  # zero-copy over the mapping

    def _fetch_arrow(self, idx: np.ndarray) -> np.ndarray:
        col = self.arrow.column(self.d.column).take(idx).combine_chunks()
        x = col.flatten().flatten().to_numpy().reshape(len(idx), self.d.t, self.d.c)
        return self._pick(x)

    def _setup_parquet(self, stem: Path) -> None:
        import pyarrow.parquet as pq

        path = stem.with_suffix(".parquet")
        if not path.exists():
            import finegym_store as fgs

            tmp = path.with_name(path.name + ".tmp.parquet")
            tmp.unlink(missing_ok=True)
            fgs.open(self.d.store).to_parquet(tmp, columns=["id", self.d.column])
            os.replace(tmp, path)
        self.parquet = pq.read_table(path, columns=[self.d.column], memory_map=True)

    def _fetch_parquet(self, idx: np.ndarray) -> np.ndarray:
        col = self.parquet.column(self.d.column).take(idx).combine_chunks()
        return self._pick(col.flatten().flatten().to_numpy().reshape(len(idx), self.d.t, self.d.c))

    def _setup_lance(self, stem: Path) -> None:
        import lance

        path = stem.with_suffix(".lance")
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            lance.write_dataset(self._table(), os.fspath(tmp), mode="overwrite")
            os.replace(tmp, path)
        self.lance = lance.dataset(os.fspath(path))

    def _fetch_lance(self, idx: np.ndarray) -> np.ndarray:
        col = self.lance.take(idx.tolist(), columns=[self.d.column]).column(0).combine_chunks()
        return self._pick(col.flatten().flatten().to_numpy().reshape(len(idx), self.d.t, self.d.c))

    def _setup_hf(self, stem: Path) -> None:
        import datasets

        datasets.disable_progress_bars()
        path = stem.with_suffix(".hf")
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            datasets.Dataset(self._table()).save_to_disk(os.fspath(tmp))
            os.replace(tmp, path)
        self.hf = datasets.load_from_disk(os.fspath(path)).with_format("numpy", columns=[self.d.column])

    def _fetch_hf(self, idx: np.ndarray) -> np.ndarray:
        x = np.asarray(self.hf[idx][self.d.column], np.float32).reshape(len(idx), self.d.t, self.d.c)
        return self._pick(x)

    def fetch(self, idx: np.ndarray) -> np.ndarray:
        key = "".join(ch for ch in self.name.split()[0].lower() if ch.isalnum())
        return getattr(self, "_fetch_" + key)(idx)


PEER_SUFFIX = {"pickle": ".pkl", "h5py": ".h5", "lmdb": ".lmdb", "arrow": ".arrow", "parquet": ".parquet",
               "lance": ".lance", "hf": ".hf"}


def peer_files(name: str, d: Data, folder: Path) -> list[Path]:
    """Every file of a built peer (a folder's files for Lance and HF datasets)."""
    key = "".join(ch for ch in name.split()[0].lower() if ch.isalnum())
    path = (folder / f"peer_{d.column}_{d.n}").with_suffix(PEER_SUFFIX[key])
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.exists() else []


def peer_child(d: Data, name: str, folder: Path, k: int, b: int, batches: int, seed: int) -> dict[str, Any]:
    """In a fresh process: open the peer (timed alone), then `batches`
    consecutive batches of an epoch order, each timed."""
    order = np.random.default_rng(seed).permutation(d.n)
    t0 = time.perf_counter()
    peer = Peer(name, d, k, folder)
    open_s = time.perf_counter() - t0
    return {"open_s": open_s, "times": time_each(peer.fetch, epoch_batches(order, b, batches))}


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def bench_peers(d: Data, folder: Path, k: int, b: int, threads: int, batches: int, rounds: int,
                echo: Callable[[str], None]) -> list[Result]:
    """Hot: each peer fetches the same batches as gather, its file read once
    first; rounds interleaved with gather."""
    r = Runner(d, k, threads)
    results = [Result("peers", k, b, threads, "gather:auto")]
    peers: list[tuple[Result, Peer | None]] = []
    for name in PEERS:
        why = peer_missing(name)
        res = Result("peers", k, b, threads, name, skipped=why)
        peer = None
        if why is None:
            try:
                peer = Peer(name, d, k, folder, echo)
                check = np.asarray(peer.fetch(np.arange(min(4, d.n))))
                if not np.array_equal(check, r.gather(np.arange(min(4, d.n)))):
                    raise ValueError("returned other values than gather")
                for j in range(2):  # warm: read its file once through its own path
                    peer.fetch(np.random.default_rng(j).permutation(d.n)[:b])
            except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, not fatal
                res.skipped, peer = f"failed: {type(e).__name__}: {e}"[:120], None
        peers.append((res, peer))
        results.append(res)
    r.features.sum(dtype=np.uint64)
    order = np.random.default_rng(2).permutation(d.n)
    for rnd in range(rounds):
        o = np.roll(order, rnd * batches * b)
        results[0].batch_s.append(statistics.median(r.stream("gather:auto", o, b, batches)))
        for res, peer in peers:
            if peer is None:
                continue
            res.batch_s.append(statistics.median(time_each(peer.fetch, epoch_batches(o, b, batches))))
    r.close()
    return results


def bench_peers_cold(d: Data, folder: Path, k: int, b: int, threads: int, batches: int, rounds: int,
                     echo: Callable[[str], None]) -> list[Result]:
    """Cold: before each run the store and the peer's files are evicted; then,
    in a fresh process, the peer is opened and `batches` consecutive batches
    follow, as in the cold state. The figure counts the open too, spread over
    the batches (a pickle or a Parquet file is read whole when opened); the
    open alone is also reported. Gather runs the same batches, interleaved
    (its open, under a millisecond, is not counted)."""
    results = [Result("peers-cold", k, b, threads, "gather:auto")]
    runnable: list[Result] = []
    for name in PEERS:
        res = Result("peers-cold", k, b, threads, name, skipped=peer_missing(name))
        if res.skipped is None:
            try:
                Peer(name, d, k, folder, echo)  # built once (outside any timing), then dropped
            except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, not fatal
                res.skipped = f"failed: {type(e).__name__}: {e}"[:120]
        results.append(res)
        if res.skipped is None:
            runnable.append(res)
    for rnd in range(rounds):
        seed = 1000 * rnd + 11
        left = evict(d.store)
        times = in_child(d, "gather:auto", k, b, threads, batches, seed)
        results[0].add_cold_run(times)
        echo(f"  [peers-cold K={k} B={b} round {rnd}] {'gather:auto':22s} {b / steady(times):9.0f} inst/s "
             f"(resident before: {left:.2f})")
        for res in runnable:
            evict(d.store)
            left = max([evict(f) for f in peer_files(res.method, d, folder)], default=0.0)
            spec = {"data": asdict(d), "peer": res.method, "folder": os.fspath(folder), "k": k, "b": b,
                    "batches": batches, "seed": seed}
            try:
                got = run_child(spec)
            except subprocess.CalledProcessError as e:
                res.skipped = f"failed: {e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}"[:120]
                continue
            res.add_cold_run(got["times"], got["open_s"])
            echo(f"  [peers-cold K={k} B={b} round {rnd}] {res.method:22s} {b / res.batch_s[-1]:9.0f} inst/s "
                 f"(open {got['open_s']:.2f} s included; resident before: {left:.2f})")
    return [r for r in results if r.skipped or r.batch_s]


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
    p.add_argument("--states", default="hot,train,cold,half,epochs,flow,peers,peers-cold,open",
                   help="comma-separated, run in this order for each K and B: hot, train (the loader feeding "
                        "a simulated step), cold, half (half the instances resident), epochs (two whole "
                        "epochs, evicted before each), flow (cold: the loader and a DataLoader over "
                        "StoreDataset), peers (hot: pickle, h5py, LMDB, Arrow, Parquet, Lance, HF datasets), "
                        "peers-cold (the same, each file evicted, opened and read in a fresh process), "
                        "open (open time and RSS, conversion throughput; once per run)")
    p.add_argument("--k", default="12,3", help="segments per instance (comma-separated)")
    p.add_argument("--batch", default="256", help="batch sizes (comma-separated)")
    p.add_argument("--threads", type=int, default=0, help="gather threads (0: every core)")
    p.add_argument("--batches", type=int, default=24, help="consecutive batches per run")
    p.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    p.add_argument("--instances", type=int, help="instances in the generated store (overrides --small)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw the ratios to gather into this PNG (needs matplotlib)")


def run(args: Any) -> int:
    from finegym_store import _core

    threads = args.threads or _core.max_threads()
    n = args.instances or (SMALL_INSTANCES if args.small else INSTANCES)
    if n < 2:
        raise ValueError(f"--instances must be at least 2, got {n}")
    d = ensure_store(Path(args.data), args.column, n)
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
                    methods = ["gather:auto", "loader", "DataLoader w0", "DataLoader w2", "DataLoader w4", "pread QD32",
                               "pread QD64"]
                    results += bench_cold(d, "flow", methods, k, b, threads, args.batches, args.rounds, echo)
                elif state == "train":
                    # The step takes as long as a 1-thread memcpy of the batch, then 4x that.
                    memcpy = [x for x in results if x.state == "hot" and x.k == k and x.b == b
                              and x.method == "memcpy 1T"]
                    step_ms = (memcpy[0].median_s if memcpy else step_estimate(d, k, b)) * 1e3
                    methods = [f"train step {step_ms:.2f} ms", f"train step {4 * step_ms:.2f} ms"]
                    hot = bench_hot(d, methods, k, b, threads, args.batches, args.rounds)
                    cold = bench_cold(d, "train-cold", methods, k, b, threads, args.batches, args.rounds, echo)
                    for r in hot:
                        r.state = "train-hot"
                    results += hot + cold
                elif state == "open":
                    if not any(r.state == "open" for r in results):
                        results += bench_open_convert(d, Path(args.data), args.rounds)
                elif state == "peers":
                    results += bench_peers(d, Path(args.data), k, b, threads, args.batches, args.rounds, echo)
                elif state == "peers-cold":
                    results += bench_peers_cold(d, Path(args.data), k, b, threads, args.batches, args.rounds, echo)
                else:
                    methods = ["gather:auto", "gather:on", "gather:off", "numpy memmap"]
                    results += bench_cold(d, state, methods, k, b, threads, args.batches, args.rounds, echo)
    print_table(results, d)
    if args.json:
        rows = [{**asdict(r), "median_s": None if r.skipped else r.median_s,
                 "instances_per_s": None if r.skipped or r.state.startswith("train") or r.state in ("open", "convert")
                 else r.per_s(),
                 "data_wait_fraction": wait_fraction(r) if r.state.startswith("train") else None}
                for r in results]
        Path(args.json).write_text(json.dumps({"machine": machine(), "instances": d.n, "column": d.column,
                                               "results": rows}, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


def machine() -> dict[str, Any]:
    import platform

    from finegym_store import _core

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cores": _core.max_threads(), "kernel": platform.release(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}


def plot(results: list[Result], path: str) -> None:
    """One panel per (state, K, B): each method's instances/s as a ratio to gather (auto)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, int, int], list[Result]] = {}
    for r in results:
        if not r.state.startswith("train") and r.state not in ("open", "convert"):
            groups.setdefault((r.state, r.k, r.b), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.0 + 0.32 * sum(len(g) for g in groups.values())),
                             squeeze=False)
    for ax, ((state, k, b), rs) in zip(axes[:, 0], groups.items()):
        ref = next(r for r in rs if r.method == "gather:auto").per_s()
        names = [r.method for r in rs]
        vals = [0.0 if r.skipped else r.per_s() / ref for r in rs]
        ax.barh(names, vals, color=["tab:blue" if n.startswith("gather") else "tab:gray" for n in names])
        for y, (v, r) in enumerate(zip(vals, rs)):
            ax.text(v, y, " skipped" if r.skipped else f" {v:.2f}", va="center", fontsize=7)
        ax.axvline(1.0, color="k", lw=0.5)
        ax.invert_yaxis()
        ax.set_title(f"{state}, K={k}, B={b}: instances/s relative to gather (auto)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rss_bytes() -> int:
    """Resident set size of this process now (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def bench_open_convert(d: Data, folder: Path, rounds: int) -> list[Result]:
    """Open: median of `rounds` x 10 opens of the store (and the RSS they add);
    beside it, pickle.load of the same features (the pickle peer's file, if
    built). Convert: the store written again from an in-memory dict of the
    same arrays, fsync included; beside it, ndarray.tofile of the same bytes
    plus fsync. Batch-time fields hold seconds per operation."""
    import pickle

    import finegym_store as fgs

    res_open = Result("open", d.t, 1, 1, "open store")
    res_pickle = Result("open", d.t, 1, 1, "pickle.load (the dict)")
    rss0 = rss_bytes()
    keep = []
    for _ in range(rounds):
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            keep.append(fgs.open(d.store))
            times.append(time.perf_counter() - t0)
        res_open.batch_s.append(statistics.median(times))
    res_open.rss_bytes = (rss_bytes() - rss0) / len(keep)
    del keep
    pkl = folder / f"peer_{d.column}_{d.n}.pkl"
    if pkl.exists():
        for _ in range(min(rounds, 2)):
            t0 = time.perf_counter()
            with open(pkl, "rb") as f:
                obj = pickle.load(f)  # trusted: written by this tool
            res_pickle.batch_s.append(time.perf_counter() - t0)
            del obj
    else:
        res_pickle.skipped = "no pickle built yet (run the peers state first)"
    values = np.asarray(fgs.open(d.store).column(d.column).values).reshape(d.n, d.t, d.c).copy()
    table = {f"i{i:06d}": values[i] for i in range(d.n)}
    res_conv = Result("convert", d.t, d.n, 1, "convert (dict -> store)")
    res_tofile = Result("convert", d.t, d.n, 1, "ndarray.tofile + fsync")
    out = folder / f".convert_{os.getpid()}.fgs"
    try:
        for _ in range(rounds):
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            fgs.convert(out, {d.column: table}, progress=False)
            res_conv.batch_s.append(time.perf_counter() - t0)
            out.unlink()
            t0 = time.perf_counter()
            with open(out, "wb") as f:
                values.tofile(f)
                f.flush()
                os.fsync(f.fileno())
            res_tofile.batch_s.append(time.perf_counter() - t0)
    finally:
        out.unlink(missing_ok=True)
    return [res_open, res_pickle, res_conv, res_tofile]


def step_estimate(d: Data, k: int, b: int) -> float:
    """Median seconds of a 1-thread memcpy of a batch's bytes (hot)."""
    r = Runner(d, k, 1)
    try:
        r.features.sum(dtype=np.uint64)
        order = np.random.default_rng(3).permutation(d.n)
        return statistics.median(r.stream("memcpy 1T", order, b, 8))
    finally:
        r.close()


def wait_fraction(r: Result) -> float:
    """Fraction of a simulated training loop's time spent waiting for data."""
    step = float(r.method.split()[2]) / 1e3
    wait = statistics.median(r.batch_s)
    return wait / (wait + step)


def print_table(results: list[Result], d: Data) -> None:
    groups: dict[tuple[str, int, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.state, r.k, r.b), []).append(r)
    for (state, k, b), rs in groups.items():
        if state in ("open", "convert"):
            print(f"\n{state} ({d.n} instances, {d.n * d.instance_bytes / 1e9:.2f} GB of features)")
            for r in rs:
                if r.skipped:
                    print(f"  {r.method:24s} skipped: {r.skipped}")
                    continue
                extra = f", +{r.rss_bytes / 1e6:.2f} MB RSS" if r.rss_bytes is not None else ""
                rate = f", {d.n * d.instance_bytes / r.median_s / 1e9:.2f} GB/s" if state == "convert" else ""
                print(f"  {r.method:24s} {r.median_s * 1e3:10.3f} ms{rate}{extra}, "
                      f"{r.median_s / rs[0].median_s:.3g}x the time of {rs[0].method}")
            continue
        if state.startswith("train"):
            print(f"\n{state}: the loader feeding a simulated training step, K={k}, B={b}")
            for r in rs:
                print(f"  {r.method:24s} data wait {statistics.median(r.batch_s) * 1e3:7.2f} ms/batch = "
                      f"{100 * wait_fraction(r):5.1f}% of step time")
            continue
        ref = next(r for r in rs if r.method == "gather:auto")
        print(f"\n{state}, K={k}, B={b}, threads={rs[0].threads}")
        later = all(r.later_s for r in rs if not r.skipped)
        opens = any(r.open_s for r in rs)
        print(f"  {'method':24s} {'inst/s':>10s} {'GB/s':>7s} {'vs gather':>9s}"
              + (f" {'after 1st batch':>16s}" if later else "") + (f" {'open s':>8s}" if opens else ""))
        for r in rs:
            if r.skipped:
                print(f"  {r.method:24s} {'skipped: ' + r.skipped}")
                continue
            gbs = r.b * k * d.c * 4 / r.median_s / 1e9
            after = f" {r.b / statistics.median(r.later_s):16.0f}" if later else ""
            if opens:
                after += f" {statistics.median(r.open_s):8.2f}" if r.open_s else f" {'':>8s}"
            print(f"  {r.method:24s} {r.per_s():10.0f} {gbs:7.2f} {r.per_s() / ref.per_s():9.2f}{after}")


if __name__ == "__main__":
    sys.exit(main())
