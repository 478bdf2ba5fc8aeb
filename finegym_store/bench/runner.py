"""Timing: the methods that fetch a batch (gather, numpy memmap, memcpy,
pread, the loader, a DataLoader), the page-cache states they run in, child
processes for the cold runs, and the per-method results.

Every figure is measured as a training loop sees it: consecutive batches in
one process, the median of several rounds, the baselines in the same run on
the same records. Cold runs start from a file evicted from the page cache
and run each method in a fresh child process, so no method inherits another
one's pages or mappings.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .inputs import Data
from .pagecache import PAGE, evict, read_instances, residency, unmap

Echo = Callable[[str], None]


@functools.lru_cache(maxsize=64)
def _test_spec(k: int | None) -> Any:
    from finegym_store import SegmentSpec

    return SegmentSpec(k, mode="test") if k is not None else SegmentSpec()


def gather_batch(store: Any, column: str, idx: np.ndarray, k: int | None, out: np.ndarray | None = None,
                 threads: int | None = None, readahead: str = "auto") -> np.ndarray:
    """The one place the benchmarks call gather: a test-mode batch of K
    segments per instance (None: all T) of ``column`` for instances ``idx``,
    on ``threads`` C++ threads (None: every core), read-ahead "auto", "on" or
    "off". ``store`` is a Store."""
    from finegym_store import _core

    return _core.gather(store._reader, column, np.asarray(idx, np.int64), _test_spec(k)._native, 0, out,
                        threads or _core.max_threads(), readahead)


def segments_for(t: int, k: int) -> np.ndarray:
    """The segments a test-mode batch takes of T: all of them for K = T."""
    from finegym_store import _core

    return np.arange(t) if k == t else np.asarray(_core.sample_segments(t, _test_spec(k)._native))


def record_offsets(d: Data, idx: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """File offsets and size of the records a batch reads: whole instances
    for K = T (contiguous), single rows otherwise."""
    row = d.c * 4
    if k == d.t:
        return d.base + idx.astype(np.int64) * d.instance_bytes, d.instance_bytes
    segs = segments_for(d.t, k).astype(np.int64)
    return (d.base + idx.astype(np.int64)[:, None] * d.instance_bytes + segs[None, :] * row).ravel(), row


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes starting on a page boundary, as
    gather's own outputs do: memcpy into memory that starts 16 bytes into a
    page (where malloc puts large arrays) runs up to 10x slower from
    page-aligned rows, which would make the baselines look worse than they are."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + nbytes]


def reused_output(cache: dict[int, np.ndarray], nbytes: int) -> np.ndarray:
    """A page-aligned buffer of nbytes, made and pre-faulted (written once)
    on first use and reused after: the memcpy bound pays no allocation or
    page faults, which a copy into a reused ``out=`` never pays either."""
    buf = cache.get(nbytes)
    if buf is None:
        buf = cache[nbytes] = aligned_empty(nbytes)
        buf[:] = 0
    return buf


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
        self._outs: dict[int, np.ndarray] = {}  # reused outputs of the memcpy bound and of gather with out=
        self.store = fgs.open(d.store)
        self.features = np.frombuffer(self.store._reader.section(f"features/{d.column}"), np.uint8)
        self.mm = np.memmap(d.store, dtype=np.float32, mode="r", offset=d.base, shape=(d.n, d.t, d.c))
        self.segs = segments_for(d.t, k)

    def gather(self, idx: np.ndarray, readahead: str = "auto") -> np.ndarray:
        return gather_batch(self.store, self.d.column, idx, None if self.k == self.d.t else self.k,
                            threads=self.threads, readahead=readahead)

    def warm(self) -> None:
        """Every page of the feature section resident and mapped here."""
        self.features.sum(dtype=np.uint64)

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
        """Unmap this process's pages of the file (both of its mappings; the
        data stays in the page cache), then drop them from the page cache:
        the file is cold again while the store stays open."""
        unmap(self.features)
        unmap(self.mm)
        evict(self.d.store)

    def batch(self, method: str, idx: np.ndarray) -> None:
        from finegym_store import _bench

        if method == "gather out=":
            # gather into a reused output, as a training loop can (out=): what the memcpy bound assumes.
            rows = self.d.t if self.k == self.d.t else self.k
            out = reused_output(self._outs, len(idx) * rows * self.d.c * 4).view(np.float32)
            gather_batch(self.store, self.d.column, idx, None if self.k == self.d.t else self.k,
                         out=out.reshape(len(idx), rows, self.d.c), threads=self.threads)
        elif method.startswith("gather"):
            self.gather(idx, method.split(":")[1] if ":" in method else "auto")
        elif method == "numpy memmap":
            _ = self.mm[idx] if self.k == self.d.t else self.mm[idx[:, None], self.segs[None, :]]
        elif method.startswith("memcpy"):
            # The bound for gather's copy: the same records, into a reused, pre-faulted, page-aligned
            # buffer, on the persistent thread pool gather uses.
            offs, size = record_offsets(self.d, idx, self.k)
            out = reused_output(self._outs, len(offs) * size)
            if method == "memcpy 1T":
                _bench.memcpy_records(self.features, offs - self.d.base, size, out)
            else:
                _bench.memcpy_records_parallel(self.features, offs - self.d.base, size, out, self.threads)
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


# -- child processes ------------------------------------------------------------


def child_main(spec: dict[str, Any]) -> None:
    """The body of a child process: one run, its result as JSON on stdout."""
    from pathlib import Path

    from .peers import peer_child

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


# -- results ------------------------------------------------------------------------


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


# -- states -------------------------------------------------------------------------


def bench_cold(d: Data, state: str, methods: list[str], k: int, b: int, threads: int, batches: int, rounds: int,
               echo: Echo) -> list[Result]:
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
        r.warm()
        results = {m: Result("hot", k, b, threads, m) for m in methods}
        order = np.random.default_rng(1).permutation(d.n)
        for rnd in range(rounds):
            for m in methods:
                times = r.stream(m, np.roll(order, rnd * batches * b), b, batches)
                results[m].batch_s.append(statistics.median(times))  # hot: no first-batch effect to count
        return list(results.values())
    finally:
        r.close()


def step_estimate(d: Data, k: int, b: int) -> float:
    """Median seconds of a 1-thread memcpy of a batch's bytes (hot)."""
    r = Runner(d, k, 1)
    try:
        r.warm()
        order = np.random.default_rng(3).permutation(d.n)
        return statistics.median(r.stream("memcpy 1T", order, b, 8))
    finally:
        r.close()


def wait_fraction(r: Result) -> float:
    """Fraction of a simulated training loop's time spent waiting for data."""
    step = float(r.method.split()[2]) / 1e3
    wait = statistics.median(r.batch_s)
    return wait / (wait + step)


def bench_open_convert(d: Data, folder: Any, rounds: int) -> list[Result]:
    """Open: median of `rounds` x 10 opens of the store (and the RSS they add);
    beside it, pickle.load of the same features (a pickled dict, built if
    missing). Convert: the store written again from an in-memory dict of the
    same arrays, fsync included; beside it, ndarray.tofile of the same bytes
    plus fsync. Batch-time fields hold seconds per operation."""
    import os
    import pickle
    from pathlib import Path

    import finegym_store as fgs

    from .pagecache import rss_bytes
    from .peers import pickle_file

    folder = Path(folder)
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
    pkl = pickle_file(d, folder)
    for _ in range(min(rounds, 2)):
        t0 = time.perf_counter()
        with open(pkl, "rb") as f:
            obj = pickle.load(f)  # trusted: written by this tool
        res_pickle.batch_s.append(time.perf_counter() - t0)
        del obj
    values = np.asarray(fgs.open(d.store).column(d.column).values).reshape(d.n, d.t, d.c).copy()
    table = {f"i{i:06d}": values[i] for i in range(d.n)}
    res_conv = Result("convert", d.t, d.n, 1, "convert (dict -> store)")
    res_tofile = Result("convert", d.t, d.n, 1, "ndarray.tofile + fsync")
    out = folder / f".convert_{os.getpid()}.fgs"
    try:
        for _ in range(rounds):
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            fgs.convert({d.column: table}, out, progress=False)
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
