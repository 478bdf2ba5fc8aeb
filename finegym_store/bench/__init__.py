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
into ``--data`` (see ``finegym_store.bench.inputs``).

Modules: ``inputs`` (generated stores and pickles, one cache layout),
``pagecache`` (residency, eviction, RSS), ``runner`` (the methods, timing,
child processes, the states), ``peers`` (the other formats), ``report``
(table, JSON, chart).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .inputs import CHANNELS, INSTANCES, T, default_folder, ensure_store
from .report import print_table, plot, to_json
from .runner import Result, bench_cold, bench_hot, bench_open_convert, child_main, step_estimate

SMALL_INSTANCES = 2048
STATES = ("hot", "train", "cold", "half", "epochs", "flow", "peers", "peers-cold", "open")
DEFAULT_STATES = "hot,train,cold,half,epochs,flow,peers,peers-cold,open"
#: --quick: a run of about a minute on a small generated store (or the
#: user's, with --store): these options, unless given.
QUICK = {"instances": SMALL_INSTANCES, "states": "hot,cold,peers", "rounds": 1, "batches": 8}
DEFAULTS = {"rounds": 3, "batches": 24}
#: Upper bounds of the numeric options: far beyond any useful run, low
#: enough that a typo is refused instead of filling the disk or memory.
MAX_INSTANCES = 2**24
MAX_BATCH = 2**20


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(prog="finegym-store bench", usage="%(prog)s [options]",
                                description=(__doc__ or "").split("\n\n")[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2


def add_arguments(p: Any) -> None:
    from finegym_store._args import cli_choices as choices, cli_count as count, cli_counts as counts

    p.add_argument("--store", metavar="PATH",
                   help="measure this store (yours) instead of a generated one; its first float32 feature "
                        "column unless --column")
    p.add_argument("--quick", action="store_true",
                   help=f"a run of about a minute: {QUICK['instances']} generated instances (unless --store), "
                        f"states {QUICK['states']}, {QUICK['rounds']} round of {QUICK['batches']} batches "
                        "(each can still be given)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder for the generated stores and the peers' files, kept between runs (default: "
                        "$FINEGYM_BENCH_DIR, else $XDG_CACHE_HOME/finegym-store/bench, else "
                        f"~/.cache/finegym-store/bench; here {default_folder()})")
    p.add_argument("--small", action="store_true", help=f"{SMALL_INSTANCES} generated instances instead of {INSTANCES}")
    p.add_argument("--column", help=f"feature column: of the generated store, one of {', '.join(sorted(CHANNELS))} "
                                    "(default i3d); of --store, any fixed-T float32 column")
    p.add_argument("--states", type=choices(STATES), default=None,
                   help="comma-separated, run in this order for each K and B: hot, train (the loader feeding "
                        "a simulated step), cold, half (half the instances resident), epochs (two whole "
                        "epochs, evicted before each), flow (cold: the loader and a DataLoader over "
                        "StoreDataset), peers (hot: pickle, h5py, LMDB, Arrow, Parquet, Lance, HF datasets), "
                        "peers-cold (the same, each file evicted, opened and read in a fresh process), "
                        f"open (open time and RSS, conversion throughput; once per run); default {DEFAULT_STATES}")
    p.add_argument("--k", type=counts(1, 1024), default="12,3",
                   help="segments per instance (comma-separated, each 1 to 1024; default 12,3)")
    p.add_argument("--batch", type=counts(1, MAX_BATCH), default="256",
                   help=f"batch sizes (comma-separated, each 1 to {MAX_BATCH}, at most the store's instances; "
                        "default 256)")
    p.add_argument("--threads", type=count(0, 1024), default=0, help="gather threads (0: every core; at most 1024)")
    p.add_argument("--batches", type=count(1, 10**6), default=None,
                   help=f"consecutive batches per run (at least 1; default {DEFAULTS['batches']})")
    p.add_argument("--rounds", type=count(1, 1000), default=None,
                   help=f"rounds (medians are reported; at least 1; default {DEFAULTS['rounds']})")
    p.add_argument("--instances", type=count(2, MAX_INSTANCES),
                   help="instances in the generated store (overrides --small); at least 2 and at least the "
                        f"largest --batch, at most {MAX_INSTANCES}")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw how many times faster gather is than each method into this PNG (needs "
                        "matplotlib: pip install \"finegym-store[plot]\")")


def resolve(args: Any) -> None:
    """Fill in the options left out: --quick's, else the defaults. ValueError
    for options that contradict each other (each alone is checked by its
    argparse type)."""
    from finegym_store._args import cli_choices as choices

    if args.store is not None and (args.instances is not None or args.small):
        raise ValueError("--instances and --small size a generated store; --store measures yours: give one")
    base = QUICK if args.quick else DEFAULTS
    args.rounds = args.rounds if args.rounds is not None else base["rounds"]
    args.batches = args.batches if args.batches is not None else base["batches"]
    args.states = args.states or choices(STATES)(QUICK["states"] if args.quick else DEFAULT_STATES)
    if args.store is None:
        if args.column is None:
            args.column = "i3d"
        if args.column not in CHANNELS:
            raise ValueError(f"--column of the generated store must be one of {', '.join(sorted(CHANNELS))}, "
                             f"got {args.column!r} (any column of your own store with --store)")
        if args.instances is None:
            args.instances = QUICK["instances"] if args.quick or args.small else INSTANCES


def check_args(args: Any, n: int) -> None:
    """The checks that involve two options: every batch fits in the store,
    and a store to generate fits on the disk. ValueError naming the option."""
    from .inputs import paths

    if max(args.batch) > n:
        what = f"the store's {n} instances" + ("" if args.store else " (--instances must be at least the "
                                                                    "largest --batch)")
        raise ValueError(f"--batch {max(args.batch)} is larger than {what}")
    if args.store:
        return
    folder = Path(args.data) if args.data else default_folder()
    if not paths(n, folder, args.column).store.exists():
        need = n * T * CHANNELS[args.column] * 4
        probe = folder if folder.exists() else next((q for q in folder.parents if q.exists()), Path("/"))
        free = shutil.disk_usage(probe).free
        if need > free:
            raise ValueError(f"--instances {n}: the store needs {need / 1e9:.1f} GB, but {probe} has "
                             f"{free / 1e9:.1f} GB free (use --data elsewhere or fewer --instances)")


def progress(line: str) -> None:
    """A progress line, on stderr (the table goes to stdout)."""
    print(line, file=sys.stderr, flush=True)


def run(args: Any) -> int:
    """The run ``args`` describe: progress on stderr, then the JSON file,
    then the table on stdout, then the chart. Returns the exit status: 2
    when the chart needs matplotlib and it is missing."""
    from finegym_store import _core

    from .inputs import layout
    from .peers import bench_peers, bench_peers_cold

    resolve(args)
    threads = args.threads or _core.max_threads()
    folder = Path(args.data) if args.data else default_folder()
    if args.store is not None:
        d = layout(args.store, args.column)
        check_args(args, d.n)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        check_args(args, args.instances)
        d = ensure_store(folder, args.column, args.instances, echo=progress)
    progress(f"[bench] {d.store}: column {d.column!r}, {d.n} x {d.t} x {d.c} float32; states "
             f"{','.join(args.states)}; K {','.join(map(str, args.k))}; B {','.join(map(str, args.batch))}; "
             f"{args.rounds} round(s) of {args.batches} batches; {threads} gather threads")
    results: list[Result] = []
    echo = progress
    for k in args.k:
        for b in args.batch:
            for state in args.states:
                progress(f"[bench] {state}, K={k}, B={b}")
                if state == "hot":
                    methods = ["gather:auto", "gather:on", "gather:off", "gather out=", "numpy memmap", "memcpy 1T",
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
                        results += bench_open_convert(d, folder, args.rounds)
                elif state == "peers":
                    results += bench_peers(d, folder, k, b, threads, args.batches, args.rounds, echo)
                elif state == "peers-cold":
                    results += bench_peers_cold(d, folder, k, b, threads, args.batches, args.rounds, echo)
                else:
                    methods = ["gather:auto", "gather:on", "gather:off", "numpy memmap"]
                    results += bench_cold(d, state, methods, k, b, threads, args.batches, args.rounds, echo)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, d), indent=1))
        progress(f"[bench] wrote {args.json}")
    print_table(results, d)
    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError as e:
            print(f"error: --plot needs matplotlib ({e}): pip install \"finegym-store[plot]\" "
                  "(the table and the JSON file are complete)", file=sys.stderr)
            return 2
        progress(f"[bench] wrote {args.plot}")
    return 0


__all__ = ["main", "add_arguments", "run", "STATES"]
