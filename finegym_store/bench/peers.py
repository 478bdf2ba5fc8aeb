"""The peers: what users do instead of a store (a pickled dict, h5py, LMDB,
Arrow IPC, Parquet, Lance, HF datasets), each built once beside the inputs
and read the way its users would, hot and cold, beside gather."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import inputs
from .inputs import Data
from .pagecache import evict
from .runner import Echo, Result, Runner, epoch_batches, in_child, run_child, steady, segments_for, time_each

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

PEER_SUFFIX = {"pickle": ".pkl", "h5py": ".h5", "lmdb": ".lmdb", "arrow": ".arrow", "parquet": ".parquet",
               "lance": ".lance", "hf": ".hf"}


def peer_missing(name: str) -> str | None:
    """Why a peer cannot run here (None: it can)."""
    import importlib.util

    mod = PEERS[name]
    if mod is not None and importlib.util.find_spec(mod) is None:
        return f"{mod} not installed (pip install 'finegym-store[bench]')"
    return None


def _key(name: str) -> str:
    return "".join(ch for ch in name.split()[0].lower() if ch.isalnum())


def peer_stem(d: Data, folder: Path) -> Path:
    """The peers' files of a store's column: ``folder/peer_STORE[_COLUMN].*``."""
    stem = Path(d.store).stem
    return folder / (f"peer_{stem}" if d.column in stem.split("_") else f"peer_{stem}_{d.column}")


def pickle_file(d: Data, folder: Path) -> Path:
    """The store's features as a pickled dict {id: array}, built if missing:
    for a generated store, the cache's release-style pickle
    (``inputs.ensure_inputs``); for any other store, one written from it."""
    generated = inputs.paths(d.n, folder, d.column)
    if os.path.abspath(d.store) == os.path.abspath(generated.store) and generated.manifest.exists():
        return inputs.ensure_inputs(d.n, folder, column=d.column, pickle=True).pickle
    path = peer_stem(d, folder).with_suffix(".pkl")
    if not path.exists():
        import pickle

        import finegym_store as fgs

        s = fgs.open(d.store)
        v = np.asarray(s.column(d.column).values).reshape(d.n, d.t, d.c)
        _atomic_write(path, lambda f: pickle.dump({key: v[i].copy() for i, key in enumerate(s.ids)}, f, protocol=4))
    return path


class Peer:
    """One peer's files (built once beside the store) and its batch fetch:
    ``fetch(idx)`` returns a (B, K, C) float32 array, the way its users would."""

    def __init__(self, name: str, d: Data, k: int, folder: Path) -> None:
        self.name, self.d, self.k, self.folder = name, d, k, folder
        self.segs = segments_for(d.t, k)
        self.all = k == d.t
        t0 = time.perf_counter()
        getattr(self, "_setup_" + _key(name))(peer_stem(d, folder))
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

        import finegym_store as fgs

        path = pickle_file(self.d, self.folder)
        self.keys = list(fgs.open(self.d.store).ids)  # store order
        with open(path, "rb") as f:
            self.table = pickle.load(f)  # trusted: written by this tool

    def _fetch_pickle(self, idx: np.ndarray) -> np.ndarray:
        x = np.stack([self.table[self.keys[i]] for i in idx])
        return self._pick(x.reshape(len(idx), self.d.t, self.d.c))

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
        # into memory. A file of several batches is rebuilt.
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
        return getattr(self, "_fetch_" + _key(self.name))(idx)


def peer_files(name: str, d: Data, folder: Path) -> list[Path]:
    """Every file of a built peer (a folder's files for Lance and HF datasets)."""
    key = _key(name)
    path = pickle_file(d, folder) if key == "pickle" else peer_stem(d, folder).with_suffix(PEER_SUFFIX[key])
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
                echo: Echo) -> list[Result]:
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
                peer = Peer(name, d, k, folder)
                check = np.asarray(peer.fetch(np.arange(min(4, d.n))))
                if not np.array_equal(check, r.gather(np.arange(min(4, d.n)))):
                    raise ValueError("returned other values than gather")
                for j in range(2):  # warm: read its file once through its own path
                    peer.fetch(np.random.default_rng(j).permutation(d.n)[:b])
            except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, not fatal
                res.skipped, peer = f"failed: {type(e).__name__}: {e}"[:120], None
        echo(f"  [peers K={k} B={b}] {name}: {'ready' if peer else res.skipped}")
        peers.append((res, peer))
        results.append(res)
    r.warm()
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
                     echo: Echo) -> list[Result]:
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
                Peer(name, d, k, folder)  # built once (outside any timing), then dropped
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
