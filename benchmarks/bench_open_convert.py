"""Open and conversion benchmarks at FineGym I3D size, each beside its baseline.

    python benchmarks/bench_open_convert.py [--instances N] [--repeat R] [--json out.json]

What it measures (defaults: N = 20484 instances of 12 x 2048 float32, 2 GB):

1. Open. ``finegym_store.open(store)`` in R fresh processes: the first open
   of each process, then ``--opens`` more (each store dropped at once), and
   the RSS growth of one open and of ``--keep`` stores kept alive (divided by
   ``--keep``). Baseline, what users do today: ``pickle.load`` of the same
   features from the release-style pickle (time and RSS growth), R fresh
   processes. Both files are read once beforehand, so the page cache is warm
   for both.

2. Conversion, pickle loading excluded: ``finegym_store.convert`` from the
   in-memory dict (split file + gym99 hierarchy, ``progress=False``) against
   writing the same bytes from an already stacked, C-contiguous (N, 12, 2048)
   array with ``ndarray.tofile``, and ``tofile`` + ``os.fsync`` (our writer
   fsyncs before it links the file in). An untimed warm-up round, then R
   rounds, the order rotating each round; every output is deleted and
   ``os.sync()`` run, untimed, before the next one. Reported: medians and
   convert / baseline ratios. ``--staging-mb M`` adds convert with
   ``STAGING_BYTES`` = M MiB as another row.

``--phases`` adds one instrumented conversion that splits the time into the
Python-side work and the C++ writer's calls (hash + write, commit = fsync),
plus the raw XXH64 speed on the same bytes.

Inputs are built once into the cache folder of ``finegym_store.bench.inputs``
(``--dir``; default as ``finegym-store bench --data``). Nothing here asserts a
timing: it prints a table (and JSON).
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
from typing import Any, ClassVar

import numpy as np

import finegym_store
from finegym_store.bench import inputs as cache
from finegym_store.bench.pagecache import peak_rss_bytes, rss_bytes, rss_detail, warm

TARGET_OPEN_MS = 5.0
TARGET_OPEN_RSS_MB = 50.0
TARGET_CONVERT_RATIO = 1.5


# -- child processes (fresh interpreter per measurement of RSS) ----------------------


def _child_open(path: str, opens: int, keep: int) -> dict[str, Any]:
    # The caller's first open (timed on its own) took first-call costs out of
    # the way. One open, RSS before/after:
    out: dict[str, Any] = {}
    rss0, det0 = rss_bytes(), rss_detail()
    t0 = time.perf_counter()
    s = finegym_store.open(path)
    out["single_open_s"] = time.perf_counter() - t0
    rss1, det1 = rss_bytes(), rss_detail()
    out["single_rss_bytes"] = rss1 - rss0
    out["single_rss_detail"] = {k: det1.get(k, 0) - det0.get(k, 0) for k in det1}
    assert len(s) > 0
    del s
    gc.collect()

    times = []
    for _ in range(opens):
        t0 = time.perf_counter()
        s = finegym_store.open(path)
        times.append(time.perf_counter() - t0)
        del s
    out["open_s"] = times

    gc.collect()
    rss0, det0 = rss_bytes(), rss_detail()
    stores = [finegym_store.open(path) for _ in range(keep)]
    rss1, det1 = rss_bytes(), rss_detail()
    out["keep"] = len(stores)
    out["keep_rss_bytes"] = rss1 - rss0
    out["keep_rss_detail"] = {k: det1.get(k, 0) - det0.get(k, 0) for k in det1}
    out["rss_after_bytes"] = rss1
    return out


def _child_first_open(path: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    s = finegym_store.open(path)
    first = time.perf_counter() - t0
    return {"first_open_s": first, "n": len(s)}


def _child_pickle(path: str) -> dict[str, Any]:
    import pickle

    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        table = pickle.load(f)
    dt = time.perf_counter() - t0
    rss1 = rss_bytes()
    return {"pickle_load_s": dt, "rss_bytes": rss1 - rss0, "n": len(table), "peak_rss_bytes": peak_rss_bytes()}


def _run_child(mode: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--child-path", os.fspath(path),
           "--opens", str(args.opens), "--keep", str(args.keep)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(mode: str, path: str, opens: int, keep: int) -> None:
    if mode == "first_open":
        # Before any other work in the process: the very first open.
        res = _child_first_open(path)
        res.update(_child_open(path, opens, keep))
    elif mode == "pickle":
        res = _child_pickle(path)
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    print(json.dumps(res))


# -- helpers ------------------------------------------------------------------------


def _mb(n: float) -> float:
    return n / 1e6


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "finegym_store": finegym_store.__version__,
        "loadavg_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.sync()  # flush what the deleted file left (journal, dirty pages) before the next run


# -- conversion ------------------------------------------------------------------


def _convert(out: Path, table: dict[str, np.ndarray], stacked: np.ndarray, split: Path) -> Any:
    # Returns the store: the caller drops it untimed. (A Store and its Columns
    # form a reference cycle, so the mapping goes only at the next gc run; if
    # the file is deleted by then, that run also frees its 2 GB of page
    # cache, which must not land inside another timed call.)
    return cache.convert_table(out, table, split)


def _tofile(out: Path, table: dict[str, np.ndarray], stacked: np.ndarray, split: Path) -> None:
    stacked.tofile(out)


def _tofile_fsync(out: Path, table: dict[str, np.ndarray], stacked: np.ndarray, split: Path) -> None:
    with open(out, "wb") as f:
        stacked.tofile(f)
        f.flush()
        os.fsync(f.fileno())


CONVERSION_METHODS = {
    "convert": _convert,
    "tofile": _tofile,
    "tofile+fsync": _tofile_fsync,
}


def _convert_with_staging(mb: float) -> Any:
    """convert with finegym_store._write.STAGING_BYTES set to ``mb`` MiB."""

    def run(out: Path, table: dict[str, np.ndarray], stacked: np.ndarray, split: Path) -> Any:
        module = sys.modules["finegym_store._write"]
        saved = module.STAGING_BYTES
        module.STAGING_BYTES = int(mb * 2**20)
        try:
            return _convert(out, table, stacked, split)
        finally:
            module.STAGING_BYTES = saved

    return run


def bench_conversion(inputs: cache.Inputs, repeat: int, staging_mb: tuple[float, ...] = (),
                     echo: Any = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids, _, table = cache.make_table(inputs.n)
    stacked = cache.stack_table(table, ids)
    assert stacked.flags.c_contiguous and stacked.nbytes == inputs.feature_bytes
    echo(f"[convert] built the dict and the stacked array in {time.perf_counter() - t0:.1f} s")

    out_dir = cache.bench_dir(inputs.folder) / "out"
    out_dir.mkdir(exist_ok=True)
    methods = dict(CONVERSION_METHODS)
    for mb_ in staging_mb:
        methods[f"convert@{mb_:g}MiB"] = _convert_with_staging(mb_)
    names = list(methods)
    # Round 0 is an untimed warm-up of every method: on the VM we used, the
    # first 2 GB written by a process took 5-10x longer than the next ones,
    # whichever method came first; it also takes first-call costs out.
    times: dict[str, list[float]] = {k: [] for k in names}
    warmup: dict[str, float] = {}
    for r in range(-1, repeat):
        order = names[r % len(names):] + names[: r % len(names)] if r >= 0 else names
        for name in order:
            out = out_dir / f"{name.replace('+', '_').replace('@', '_')}.bin"
            _remove(out)
            gc.collect()
            t0 = time.perf_counter()
            result = methods[name](out, table, stacked, inputs.split)
            dt = time.perf_counter() - t0
            size = out.stat().st_size
            if result is not None:
                assert len(result) == len(table)
            del result
            gc.collect()
            _remove(out)
            if r < 0:
                warmup[name] = dt
                echo(f"[convert] warm-up   {name:<17} {dt:7.3f} s  (not counted)")
                continue
            times[name].append(dt)
            echo(f"[convert] round {r + 1}/{repeat} {name:<17} {dt:7.3f} s  ({size / 1e9:.2f} GB written)")
    med = {k: _median(v) for k, v in times.items()}
    return {
        "times_s": times,
        "warmup_s": warmup,
        "median_s": med,
        "ratio_convert_over_tofile": med["convert"] / med["tofile"],
        "ratio_convert_over_tofile_fsync": med["convert"] / med["tofile+fsync"],
        "ratio_tofile_fsync_over_tofile": med["tofile+fsync"] / med["tofile"],
        "gb_per_s": {k: inputs.feature_bytes / 1e9 / v for k, v in med.items()},
    }


# -- where conversion time goes (--phases) ---------------------------------------------


class _TimingWriter:
    """Wraps _core.Writer and adds up the seconds spent in each method."""

    totals: ClassVar[dict[str, float]] = {}
    calls: ClassVar[dict[str, int]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._w = _REAL_WRITER(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._w, name)
        if not callable(fn):
            return fn

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _TimingWriter.totals[name] = _TimingWriter.totals.get(name, 0.0) + time.perf_counter() - t0
                _TimingWriter.calls[name] = _TimingWriter.calls.get(name, 0) + 1

        return timed


_REAL_WRITER = finegym_store._core.Writer


def bench_phases(inputs: cache.Inputs, echo: Any = print) -> dict[str, Any]:
    """One conversion with the writer's calls timed, and the raw cost of the
    pieces the writer does on every byte (XXH64, write to the page cache)."""
    ids, _, table = cache.make_table(inputs.n)
    stacked = cache.stack_table(table, ids)
    out_dir = cache.bench_dir(inputs.folder) / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "phases.fgs"
    _remove(out)
    res: dict[str, Any] = {}

    _TimingWriter.totals, _TimingWriter.calls = {}, {}
    finegym_store._core.Writer = _TimingWriter  # type: ignore[misc]
    try:
        gc.collect()
        t0 = time.perf_counter()
        store = cache.convert_table(out, table, inputs.split)
        res["convert_s"] = time.perf_counter() - t0
        del store
    finally:
        finegym_store._core.Writer = _REAL_WRITER  # type: ignore[misc]
    gc.collect()  # unmap the store before its file goes (see _convert)
    _remove(out)
    res["writer_s"] = dict(_TimingWriter.totals)
    res["writer_calls"] = dict(_TimingWriter.calls)
    res["python_s"] = res["convert_s"] - sum(_TimingWriter.totals.values())

    # The Python-side pieces of _write_column alone, without the writer.
    from finegym_store._write import STAGING_BYTES
    from finegym_store.convert import _instance_shape

    t0 = time.perf_counter()
    shapes = [_instance_shape("x", k, table[k]) for k in ids]
    res["py_instance_shapes_s"] = time.perf_counter() - t0
    buf = np.empty((STAGING_BYTES // (2048 * 4), 2048), np.float32)
    t0 = time.perf_counter()
    used = 0
    for k, (t, _) in zip(ids, shapes):
        if used + t > len(buf):
            used = 0
        np.copyto(buf[used : used + t], table[k].reshape(t, 2048), casting="same_kind")
        used += t
    res["py_staging_copy_s"] = time.perf_counter() - t0
    del buf

    # The raw per-byte costs, on the same 2 GB.
    t0 = time.perf_counter()
    finegym_store._core.hash64(stacked)
    res["xxh64_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stacked.copy()
    res["memcpy_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        stacked.tofile(f)
        t1 = time.perf_counter()
        f.flush()
        os.fsync(f.fileno())
    res["tofile_s"] = t1 - t0
    res["fsync_after_tofile_s"] = time.perf_counter() - t1
    _remove(out)
    for k in ("writer_s",):
        echo(f"[phases] {k}: " + ", ".join(f"{n} {v:.3f} s" for n, v in res[k].items()))
    return res


# -- report ----------------------------------------------------------------------


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"


def report(res: dict[str, Any], echo: Any = print) -> None:
    n, gb = res["instances"], res["feature_bytes"] / 1e9
    m = res["machine"]
    echo("")
    echo(f"finegym-store {m['finegym_store']}: {n} instances x (12, 2048) float32 = {gb:.2f} GB, "
         f"repeat {res['repeat']}")
    echo(f"machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {m.get('mem_total_gib', '?')} GiB, {m['platform']}, "
         f"Python {m['python']}, numpy {m['numpy']}; load average at start "
         f"{m['loadavg_start'][0]:.2f}, at end {res['loadavg_end'][0]:.2f}")

    if "open" in res:
        o = res["open"]
        echo("")
        echo(f"1. Open (page cache warm; {o['processes']} fresh processes x {o['opens_per_process']} opens)")
        echo(f"   {'':<36}{'median':>11}{'p99':>11}{'max':>11}")
        echo(f"   {'finegym_store.open(store)':<36}{_fmt_ms(o['median_s']):>11}{_fmt_ms(o['p99_s']):>11}"
             f"{_fmt_ms(o['max_s']):>11}")
        echo(f"   {'  first open of a fresh process':<36}{_fmt_ms(o['first_median_s']):>11}{'':>11}"
             f"{_fmt_ms(o['first_max_s']):>11}")
        if "pickle" in res:
            p = res["pickle"]
            echo(f"   {'pickle.load(pickle)  [baseline]':<36}{_fmt_ms(p['median_s']):>11}{'':>11}"
                 f"{_fmt_ms(p['max_s']):>11}")
        det = o["keep_rss_detail_mb"]
        echo(f"   RSS growth: one open {o['single_rss_mb']:.2f} MB; {o['keep']} stores kept alive "
             f"{o['keep_rss_mb_per_store']:.3f} MB each (anon {det.get('RssAnon', 0) / o['keep']:.3f} MB, "
             f"file-backed {det.get('RssFile', 0) / o['keep']:.3f} MB)"
             + (f"; pickle.load {res['pickle']['rss_mb']:.0f} MB" if "pickle" in res else ""))
        if "pickle" in res:
            p = res["pickle"]
            echo(f"   pickle.load / open: time {p['median_s'] / o['median_s']:,.0f}x (vs first open "
                 f"{p['median_s'] / o['first_median_s']:,.0f}x); RSS {p['rss_mb'] / max(o['single_rss_mb'], 1e-3):,.0f}x")
        worst_rss = max(o["single_rss_mb"], o["keep_rss_mb_per_store"])
        typical = max(o["median_s"], o["p99_s"], o["first_median_s"]) * 1e3
        echo(f"   target open < {TARGET_OPEN_MS:g} ms (median, p99 and first open; worst {typical:.3f} ms): "
             f"{'met' if typical < TARGET_OPEN_MS else 'NOT met'}; "
             f"RSS growth < {TARGET_OPEN_RSS_MB:g} MB (worst {worst_rss:.2f} MB): "
             f"{'met' if worst_rss < TARGET_OPEN_RSS_MB else 'NOT met'}")

    if "conversion" in res:
        c = res["conversion"]
        med = c["median_s"]
        echo("")
        echo(f"2. Conversion of the in-memory dict, pickle loading excluded (median of {res['repeat']})")
        echo(f"   {'':<34}{'median':>10}{'GB/s':>8}{'convert / this':>16}")
        default_mb = sys.modules["finegym_store._write"].STAGING_BYTES / 2**20
        rows = [("convert", f"finegym_store.convert ({default_mb:g} MiB)")]
        rows += [(k, f"  convert, staging {k.split('@')[1]}") for k in med if k.startswith("convert@")]
        rows += [("tofile", "ndarray.tofile  [baseline]"), ("tofile+fsync", "tofile + fsync  [baseline 2]")]
        for name, label in rows:
            echo(f"   {label:<34}{med[name]:>8.3f} s{c['gb_per_s'][name]:>8.2f}{med['convert'] / med[name]:>15.2f}x")
        echo(f"   target: convert <= {TARGET_CONVERT_RATIO}x tofile: "
             f"{'met' if c['ratio_convert_over_tofile'] <= TARGET_CONVERT_RATIO else 'NOT met'} "
             f"({c['ratio_convert_over_tofile']:.3f}x; vs tofile+fsync {c['ratio_convert_over_tofile_fsync']:.3f}x)")
        spread = {k: (min(v), max(v)) for k, v in c["times_s"].items()}
        echo("   spread (min..max s): " + ", ".join(f"{k} {a:.2f}..{b:.2f}" for k, (a, b) in spread.items()))

    if "phases" in res:
        ph = res["phases"]
        echo("")
        echo(f"3. Where one conversion's {ph['convert_s']:.3f} s go")
        for name, v in sorted(ph["writer_s"].items(), key=lambda kv: -kv[1]):
            echo(f"   writer.{name:<26}{v:>8.3f} s  ({ph['writer_calls'][name]} calls)")
        echo(f"   {'Python (outside the writer)':<33}{ph['python_s']:>8.3f} s")
        echo(f"     its two per-instance loops, re-run alone: shape checks {ph['py_instance_shapes_s']:.3f} s, "
             f"copies into the staging buffer {ph['py_staging_copy_s']:.3f} s")
        echo(f"   for scale, on the same {gb:.2f} GB: XXH64 {ph['xxh64_s']:.3f} s, memcpy {ph['memcpy_s']:.3f} s, "
             f"tofile {ph['tofile_s']:.3f} s, then fsync {ph['fsync_after_tofile_s']:.3f} s")
    echo(f"\npeak RSS of this process: {res['peak_rss_mb']:.0f} MB")


# -- main -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", "-n", type=int, default=cache.I3D_INSTANCES,
                    help="instances (default %(default)s: FineGym I3D, 2 GB)")
    ap.add_argument("--repeat", "-r", type=int, default=5, help="rounds / processes per measurement (default %(default)s)")
    ap.add_argument("--opens", type=int, default=1000, help="timed opens per process (default %(default)s)")
    ap.add_argument("--keep", type=int, default=100, help="stores kept alive for the RSS reading (default %(default)s)")
    ap.add_argument("--json", metavar="OUT", help="also write every measurement to this JSON file")
    ap.add_argument("--dir", help="cache folder (default: finegym_store.bench.inputs.default_folder())")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached inputs")
    ap.add_argument("--phases", action="store_true", help="also break one conversion down into its parts")
    ap.add_argument("--staging-mb", type=float, action="append", default=[], metavar="MIB",
                    help="also time convert with this STAGING_BYTES, in MiB (repeatable)")
    ap.add_argument("--skip", action="append", default=[], choices=["open", "pickle", "conversion"],
                    help="skip a part (repeatable)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child_main(args.child, args.child_path, args.opens, args.keep)
        return {}
    if args.instances < 1 or args.repeat < 1:
        ap.error("--instances and --repeat must be >= 1")

    res: dict[str, Any] = {"instances": args.instances, "repeat": args.repeat, "machine": _machine()}
    inputs = cache.ensure_inputs(args.instances, args.dir, rebuild=args.rebuild)
    res["feature_bytes"] = inputs.feature_bytes
    res["store_bytes"] = inputs.store.stat().st_size
    res["pickle_bytes"] = inputs.pickle.stat().st_size

    # RSS is read in fresh processes, before this one holds the 4 GB it needs
    # for the conversion benchmark.
    if "open" not in args.skip:
        warm(inputs.store)
        runs = [_run_child("first_open", inputs.store, args) for _ in range(args.repeat)]
        all_times = [t for r in runs for t in r["open_s"]]
        res["open"] = {
            "processes": len(runs),
            "opens_per_process": args.opens,
            "median_s": _median(all_times),
            "max_s": max(all_times),
            "first_s": [r["first_open_s"] for r in runs],
            "first_median_s": _median([r["first_open_s"] for r in runs]),
            "first_max_s": max(r["first_open_s"] for r in runs),
            "single_rss_mb": _median([_mb(r["single_rss_bytes"]) for r in runs]),
            "single_rss_detail_mb": {k: _mb(v) for k, v in runs[0]["single_rss_detail"].items()},
            "keep": args.keep,
            "keep_rss_mb_per_store": _median([_mb(r["keep_rss_bytes"]) / max(r["keep"], 1) for r in runs]),
            "keep_rss_detail_mb": {k: _mb(v) for k, v in runs[0]["keep_rss_detail"].items()},
            "p99_s": float(np.percentile(all_times, 99)),
        }
        print(f"[open] median {res['open']['median_s'] * 1e3:.3f} ms, max {res['open']['max_s'] * 1e3:.3f} ms")
    if "pickle" not in args.skip:
        warm(inputs.pickle)
        runs = [_run_child("pickle", inputs.pickle, args) for _ in range(args.repeat)]
        res["pickle"] = {
            "times_s": [r["pickle_load_s"] for r in runs],
            "median_s": _median([r["pickle_load_s"] for r in runs]),
            "max_s": max(r["pickle_load_s"] for r in runs),
            "rss_mb": _median([_mb(r["rss_bytes"]) for r in runs]),
            "child_peak_rss_mb": max(_mb(r["peak_rss_bytes"]) for r in runs),
        }
        print(f"[pickle] median {res['pickle']['median_s']:.3f} s, RSS +{res['pickle']['rss_mb']:.0f} MB")
        if "open" in res:
            res["open_vs_pickle"] = {
                "time_ratio_pickle_over_open": res["pickle"]["median_s"] / res["open"]["median_s"],
                "time_ratio_pickle_over_first_open": res["pickle"]["median_s"] / res["open"]["first_median_s"],
                "rss_ratio_pickle_over_open": res["pickle"]["rss_mb"] / max(res["open"]["single_rss_mb"], 1e-3),
            }
    if "conversion" not in args.skip:
        res["conversion"] = bench_conversion(inputs, args.repeat, tuple(args.staging_mb))
    if args.phases:
        gc.collect()
        res["phases"] = bench_phases(inputs)
    res["loadavg_end"] = os.getloadavg()
    res["peak_rss_mb"] = _mb(peak_rss_bytes())
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
