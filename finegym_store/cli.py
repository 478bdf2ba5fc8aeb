"""The ``finegym-store`` command: convert, info, verify, demo, export, import, select, stats."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from . import __version__
from ._args import cli_count as count, cli_real as real
from .errors import ConversionError, FormatError
from .labelspace import LabelSpace


def _feature_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. i3d=i3d_val.pkl), got {text!r}")
    return name, path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finegym-store",
        description="Convert FineGym feature pickles into a memory-mapped store, and inspect stores.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert feature pickles into a store",
                       description="Convert one or more feature pickles (one per model) into a store.")
    c.add_argument("out", help="path of the store to write (e.g. gym99_val.fgs)")
    c.add_argument("-f", "--feature", dest="features", action="append", type=_feature_arg, required=True,
                   metavar="NAME=PATH", help="a feature column and its pickle; repeat for several models")
    c.add_argument("--split", help="FineGym split file (<id> <label> per line): order and labels")
    c.add_argument("--categories", help="FineGym categories file: the label hierarchy")
    c.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--trust-pickle", action="store_true",
                   help="unpickle without the allow-list (only for files you trust)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.add_argument("--drop-missing", action="store_true",
                   help="leave out split ids a pickle lacks (with several pickles: keep the ids all have)")
    c.add_argument("--ignore-extra", action="store_true", help="skip pickle ids that are not in the split")
    c.add_argument("--allow-label-mismatch", action="store_true",
                   help="accept split labels that do not fit --categories (recorded in the provenance)")

    sl = sub.add_parser("select", help="write some rows of a store into a new store",
                        description="Write the instances of STORE that --ids, --split or --rows selects, in "
                                    "that order, into a new store OUT (every column, the hierarchy and the "
                                    "provenance, with a selected_from entry).")
    sl.add_argument("store")
    sl.add_argument("out", help="path of the store to write")
    which = sl.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", metavar="FILE", help="element ids, one per line")
    which.add_argument("--split", metavar="FILE",
                       help="a FineGym split file: its ids (e.g. train v1.0 from a v1.1 store; labels must agree)")
    which.add_argument("--rows", metavar="A:B", help="rows A to B-1, in store order")
    sl.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    st = sub.add_parser(
        "stats", help="per-channel mean and standard deviation of each column; add them to an older store",
        description="Print the per-channel statistics (mean and standard deviation over every stored row) of "
                    "each feature column of STORE, which normalize=True applies. Stores written by "
                    "finegym-store 0.3 and later (format version 3) hold them; for an older store, --output "
                    "writes a copy that holds them and --in-place replaces STORE with such a copy (atomically: "
                    "written beside it, then renamed over it). With --from TRAIN, that copy holds TRAIN's "
                    "statistics instead of its own, so that normalize=True standardises a validation store "
                    "as its training store.")
    st.add_argument("store")
    where = st.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", metavar="OUT", help="write a copy of STORE with statistics to OUT")
    where.add_argument("--in-place", action="store_true", help="replace STORE with a copy that holds statistics")
    st.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    st.add_argument("--from", dest="stats_from", metavar="TRAIN",
                    help="with --output or --in-place: give every column the statistics of the column of that name "
                         "in the store TRAIN (same channels) instead of its own")
    st.add_argument("--json", action="store_true",
                    help="print every channel's mean and std as JSON ({column: {mean, std, count}})")

    i = sub.add_parser("info", help="schema, counts, class histogram and size of a store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    v = sub.add_parser("verify", help="check every section's checksum (exit 1 on damage)")
    v.add_argument("store")

    d = sub.add_parser("demo", help="the whole job on built-in synthetic sample data")
    d.add_argument("-n", "--instances", type=int, default=2000, help="instances to synthesize (default 2000)")
    d.add_argument("--workdir", help="keep the generated files here (default: a temporary folder)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    from . import bench as _bench_cli

    bn = sub.add_parser("bench", help="benchmark gather, the loader and what users do instead, side by side",
                        usage="%(prog)s [options]",
                        description=(_bench_cli.__doc__ or "").split("\n\n")[0])
    _bench_cli.add_arguments(bn)

    pr = sub.add_parser(
        "probe", help="train and evaluate a classifier on stored features (FineGym's protocol)",
        usage="%(prog)s TRAIN VAL [TRAIN VAL ...] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a linear (or MLP) classifier over the TSN consensus (the mean of K sampled\n"
                    "segments) of a feature column of TRAIN, evaluate it on VAL, and print Mean Class Acc and\n"
                    "Top-1 (percent) in the layout of the FineGym model-zoo table. Several TRAIN VAL pairs (e.g.\n"
                    "gym99 and gym288) and several --column give one table. Progress goes to stderr.",
        epilog="example:\n  finegym-store probe gym99_train.fgs gym99_val.fgs --column tsn --column i3d "
               "--num-segments 3 --level element --level set --json results.json --plot per_class.png")
    pr.add_argument("stores", nargs="+", metavar="TRAIN VAL",
                    help="a train store and its val store; repeat the pair for more datasets")
    pr.add_argument("--column", action="append", metavar="NAME",
                    help="feature column to probe; repeat for several (default: every column of the first TRAIN)")
    pr.add_argument("--num-segments", type=count(0, 1024), default=3, metavar="K",
                    help="segments sampled per instance and averaged (default 3); 0 = all stored segments")
    pr.add_argument("--head", choices=("linear", "mlp"), default="linear",
                    help="linear softmax classifier, or one hidden ReLU layer (default linear)")
    pr.add_argument("--backend", choices=("auto", "numpy", "torch"), default="auto",
                    help="trainer: torch when installed (auto, default), or the numpy one")
    pr.add_argument("--level", action="append", choices=("element", "set", "event"), dest="levels",
                    help="hierarchy level(s) to evaluate (default element); set and event need a stored hierarchy")
    pr.add_argument("--epochs", type=count(1, 10**6), default=20, help="passes over TRAIN (default 20)")
    pr.add_argument("--batch-size", type=count(1, 2**24), default=256, help="default 256")
    pr.add_argument("--lr", type=real(0.0), default=1e-3, help="Adam learning rate, cosine-decayed to 0 (default 1e-3)")
    pr.add_argument("--weight-decay", type=real(0.0, inclusive=True), default=1e-4, help="L2 on weights (default 1e-4)")
    pr.add_argument("--hidden", type=count(1, 2**24), default=512,
                    help="hidden units of --head mlp (default 512; refused when the weights would not fit "
                         "in memory)")
    pr.add_argument("--seed", type=count(0, 2**63 - 1), default=0,
                    help="initial weights, shuffling and sampling (default 0)")
    pr.add_argument("--seeds", type=count(1, 1000), default=1, metavar="N",
                    help="run each probe with N seeds (--seed, --seed + 1, ...) and report the mean, std, min "
                         "and max of each metric (default 1)")
    pr.add_argument("--threads", type=count(1, 1024), help="C++ threads gathering batches (default: all cores)")
    pr.add_argument("--compute-threads", type=count(1, 1024), metavar="N",
                    help="classifier threads: torch, numpy's BLAS (with threadpoolctl); default: cores - 1, "
                         "leaving a core to the loader")
    pr.add_argument("--json", metavar="FILE",
                    help="also write every result as JSON ('-': stdout, no table): metrics with top-5, "
                         "per-instance predictions (id, label, predicted, top-5 classes), the confusion matrix, "
                         "and with --seeds the spread over seeds")
    pr.add_argument("--plot", metavar="FILE.png",
                    help="draw per-class accuracy, classes sorted by training frequency and named from the "
                         "stored hierarchy (needs matplotlib)")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    e = sub.add_parser("export", help="write a store as Parquet (.parquet) or Arrow IPC (.arrow, .feather)",
                       description="Export a store to a Parquet or Arrow IPC file (needs pyarrow), streaming "
                                   "one row group at a time.")
    e.add_argument("store")
    e.add_argument("out", help="OUT.parquet, or OUT.arrow / OUT.feather for an Arrow IPC file")
    e.add_argument("--columns", nargs="+", metavar="NAME",
                   help="columns to write (id, label, video, event_start, ..., feature columns); default all")
    e.add_argument("--compression", default="none",
                   help="none (default), zstd, snappy, lz4, gzip, brotli (Arrow IPC: none, lz4, zstd)")
    e.add_argument("--byte-stream-split", action="store_true",
                   help="Parquet BYTE_STREAM_SPLIT encoding for float columns (best with --compression zstd)")
    e.add_argument("--row-group-size", type=int, help="rows per Parquet row group / Arrow batch "
                   "(default: about 128 MiB of features)")
    e.add_argument("--tensor-type", choices=("nested", "fixed_shape_tensor"), default="nested",
                   help="fixed-T feature type (default nested fixed_size_list)")
    e.add_argument("--dtype", choices=("float32",),
                   help="float32: write float16 columns upcast, for readers without half floats (Spark, "
                        "DuckDB); default as stored")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    im = sub.add_parser(
        "import", help="build a store from Parquet, Arrow IPC, a folder of .npy files or HDF5",
        description="Build a store from PATH, its format told by the path: a .parquet file or a folder of "
                    "Parquet files; an Arrow IPC file (.arrow, .feather, .ipc; file or stream format); a folder "
                    "of <id>.npy files (one per instance); an HDF5 file (.h5, .hdf5: one dataset per instance, "
                    "or one (N, C) / (N, T, C) array and a dataset of N ids).")
    im.add_argument("source", metavar="PATH", help="what to import (see above)")
    im.add_argument("out", help="path of the store to write (e.g. gym99_val.fgs)")
    im.add_argument("--columns", "--column", nargs="+", metavar="NAME",
                    help="Parquet/Arrow: feature columns (default: all); .npy folder/HDF5: the name of the one "
                         "feature column (default 'features')")
    im.add_argument("--dtype", choices=("float32", "float16"), help="stored dtype (default: as in the file; "
                    ".npy/HDF5: float32)")
    im.add_argument("--categories", help="FineGym categories file (default: the hierarchy in the file's metadata)")
    im.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    im.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    tabular = im.add_argument_group("Parquet and Arrow IPC")
    tabular.add_argument("--id-column", help="string ids (default 'id')")
    tabular.add_argument("--label-column", help="integer labels (default 'label'; -1 when absent)")
    tabular.add_argument("--length", type=int, metavar="T",
                         help="rows per instance (T), for columns whose type does not fix it (default: fixed "
                              "when every instance has one T, else ragged)")
    tabular.add_argument("--channels", type=int, help="C, for flat list<float> columns")
    arrays = im.add_argument_group(".npy folders and HDF5")
    arrays.add_argument("--split", help="FineGym split file (<id> <label> per line): order and labels")
    arrays.add_argument("--h5-features", metavar="DATASET", help="HDF5: the (N, C) / (N, T, C) feature dataset")
    arrays.add_argument("--h5-ids", metavar="DATASET", help="HDF5: the dataset of N ids")
    return p


def _probe(args: argparse.Namespace) -> None:
    from .probe import run_probes

    if len(args.stores) % 2:
        raise ValueError(f"stores come in TRAIN VAL pairs; got {len(args.stores)} paths: {' '.join(args.stores)}")
    if args.plot:  # fail before training, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'finegym-store[plot]'") from None
    pairs = list(zip(args.stores[0::2], args.stores[1::2]))
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    table = run_probes(pairs, args.column, log=log, num_segments=args.num_segments or None, head=args.head,
                       backend=args.backend, levels=tuple(dict.fromkeys(args.levels or ["element"])),
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       hidden=args.hidden, seed=args.seed, seeds=args.seeds, threads=args.threads,
                       compute_threads=args.compute_threads)
    if args.json == "-":
        print(table.to_json())
    else:
        print(table.to_markdown())
        print()
        print(table.summary())
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(table.to_json() + "\n")
    if args.plot:
        table.plot(args.plot)


def _select(args: argparse.Namespace) -> None:
    import os

    from . import select as sel
    from .store import open as open_store

    for option, path in (("--ids", args.ids), ("--split", args.split)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{option}: no such file: {path}")
    store = open_store(args.store)
    if args.rows is not None:
        rows, how = sel.parse_rows(args.rows, len(store)), f"rows {args.rows}"
    elif args.split is not None:
        rows, how = sel.split_ids(store, args.split), f"split {os.path.abspath(args.split)}"
    else:
        rows, how = sel.ids_file(args.ids), f"ids {os.path.abspath(args.ids)}"
    out = sel.select(store, rows, args.out, overwrite=args.overwrite, how=how)
    print(f"wrote {out.path}: {len(out)} of the {len(store)} instances of {store.path}, "
          f"{out.file_size / 2**20:.1f} MiB")


def _stats(args: argparse.Namespace) -> None:
    import json
    import os

    from .stats import add_stats
    from .store import open as open_store

    store = open_store(args.store)
    if args.overwrite and args.output is None:
        raise ValueError("--overwrite goes with --output OUT (--in-place replaces STORE without it)")
    if args.stats_from is not None and args.output is None and not args.in_place:
        raise ValueError(f"--from {args.stats_from} writes a copy of STORE with those statistics: add --output OUT "
                         "(or --in-place to replace STORE)")
    if args.output is not None or args.in_place:
        target = args.store if args.in_place else args.output
        if args.output is not None and "://" not in store.path and os.path.exists(args.output) \
                and os.path.samefile(args.output, store.path):
            raise ValueError(f"--output {args.output} is STORE itself; use --in-place to replace it")
        before = store.format_version
        store = add_stats(store, target, stats_from=args.stats_from, overwrite=args.overwrite or args.in_place)
        if not args.json:
            kept = args.in_place and before >= 3 and args.stats_from is None
            done = "already held statistics; left as it is" if kept else \
                f"wrote {store.path} (format version {store.format_version}" + \
                (f", statistics of {args.stats_from})" if args.stats_from else ")")
            print(f"{args.store}: {done}")
    elif store.format_version < 3:
        raise ValueError(f"{store.path} (format version {store.format_version}) holds no statistics: "
                         "--output OUT writes a copy that does, --in-place replaces it")
    columns = {name: store.stats(name) for name in store.columns}
    if args.json:
        print(json.dumps({name: {"mean": s.mean.tolist(), "std": s.std.tolist(), "count": s.count}
                          for name, s in columns.items()}))
        return
    print(f"{'column':<16} {'C':>6} {'rows':>10}  {'mean: min / median / max':<34}  std: min / median / max")
    for name, s in columns.items():
        def span(v: np.ndarray) -> str:
            return f"{np.min(v):.4g} / {np.median(v):.4g} / {np.max(v):.4g}"
        print(f"{name:<16} {len(s.mean):>6} {s.count:>10}  {span(s.mean):<34}  {span(s.std)}")


def _info(path: str) -> dict:
    from .store import open as open_store

    store = open_store(path)
    labels = np.asarray(store.labels)
    labelled = labels[labels >= 0]
    counts = np.bincount(labelled) if len(labelled) else np.zeros(0, dtype=np.int64)
    present = counts[counts > 0]
    names = store.label_names or {}
    info = {
        "path": store.path,
        "format_version": store.format_version,
        "file_size": store.file_size,
        "instances": len(store),
        "labelled": int(len(labelled)),
        "columns": {
            name: {
                "dtype": str(col.dtype),
                "shape": list(col.shape),
                "bytes": col.nbytes,
            }
            for name, col in ((n, store.column(n)) for n in store.columns)
        },
        "classes_in_hierarchy": len(store.classes.label) if store.classes is not None else None,
        "label_space": store.label_space.to_dict(),
        "classes_present": int(len(present)),
    }
    if len(present):
        order = np.argsort(counts)
        info["class_sizes"] = {"min": int(present.min()), "median": float(np.median(present)),
                               "max": int(present.max())}
        info["largest"] = [[int(k), int(counts[k]), names.get(int(k))] for k in order[::-1] if counts[k] > 0][:3]
        info["smallest"] = [[int(k), int(counts[k]), names.get(int(k))] for k in order if counts[k] > 0][:3]
    return info


def _print_info(info: dict) -> None:
    print(f"{info['path']}: finegym-store format v{info['format_version']}, "
          f"{info['file_size'] / 2**20:.1f} MiB")
    print(f"instances: {info['instances']} ({info['labelled']} labelled)")
    print("columns:")
    for name, c in info["columns"].items():
        shape = "(" + ", ".join("T" if d is None else str(d) for d in c["shape"]) + ")"
        print(f"  {name:<16} {c['dtype']:<8} {shape:<22} {c['bytes'] / 2**20:10.1f} MiB")
    if info["classes_in_hierarchy"] is not None:
        print(f"label hierarchy: {info['classes_in_hierarchy']} classes")
    print(f"label space: {LabelSpace(**info['label_space']).describe()}")
    if "class_sizes" in info:
        s = info["class_sizes"]
        print(f"classes present: {info['classes_present']}; instances per class: min {s['min']}, "
              f"median {s['median']:g}, max {s['max']}")
        for title in ("largest", "smallest"):
            row = ", ".join(f"{k} ({n}{': ' + nm[:40] if nm else ''})" for k, n, nm in info[title])
            print(f"  {title}: {row}")


def _export(args: argparse.Namespace) -> None:
    import os

    from . import arrow
    from .store import open as open_store

    store = open_store(args.store)
    arrow.check_target(store, args.out, args.overwrite, "--overwrite")  # messages that name the CLI's flag
    ext = os.path.splitext(args.out)[1].lower()
    if ext in (".arrow", ".feather", ".ipc"):
        arrow.to_ipc(store, args.out, args.columns, args.row_group_size, args.compression, args.tensor_type,
                     progress=not args.quiet, overwrite=args.overwrite, dtype=args.dtype)
        kind = "Arrow IPC"
    else:
        arrow.to_parquet(store, args.out, args.columns, args.row_group_size, args.compression,
                         args.byte_stream_split, None, args.tensor_type, progress=not args.quiet,
                         overwrite=args.overwrite, dtype=args.dtype)
        kind = "Parquet"
    from .remote import RemoteFile, is_url

    remote = is_url(args.out) and not args.out.lower().startswith("file://")
    size = RemoteFile(args.out).size if remote else os.path.getsize(args.out)
    print(f"wrote {args.out}: {kind}, {len(store)} rows, {size / 2**20:.1f} MiB")


#: What ``finegym-store import`` reads, for its messages.
IMPORT_FORMATS = ("a .parquet file or a folder of Parquet files, an Arrow IPC file (.arrow, .feather, .ipc), "
                  "a folder of <id>.npy files, an HDF5 file (.h5, .hdf5)")


def import_kind(path: str) -> str:
    """'parquet', 'ipc', 'npy' or 'hdf5': the format ``path`` names (its
    suffix; for a folder, whether it holds .npy files). ValueError naming the
    path and the formats read otherwise; FileNotFoundError when a path of no
    known suffix does not exist."""
    import os
    import stat

    from .ingest import IPC_SUFFIXES
    from .sources import HDF5_SUFFIXES

    lower = path.lower()
    if lower.endswith((".parquet", ".parq", ".pq")):
        return "parquet"
    if lower.endswith(IPC_SUFFIXES):
        return "ipc"
    if lower.endswith(HDF5_SUFFIXES):
        return "hdf5"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or folder") from None
    if stat.S_ISDIR(mode):
        try:
            names = os.listdir(path)
        except OSError as e:
            raise ValueError(f"{path}: the folder cannot be listed ({e.strerror})") from None
        return "npy" if any(n.endswith(".npy") and not n.startswith(".") for n in names) else "parquet"
    raise ValueError(f"{path}: not a format import reads (told by the path); it reads {IMPORT_FORMATS}")


def _import(args: argparse.Namespace) -> None:
    kind = import_kind(args.source)
    if kind in ("parquet", "ipc"):
        from .ingest import from_ipc, from_parquet

        for option, value in (("--split", args.split), ("--h5-features", args.h5_features),
                              ("--h5-ids", args.h5_ids)):
            if value is not None:
                raise ValueError(f"{option} is for .npy folders and HDF5 files; {args.source} is "
                                 f"{'Parquet' if kind == 'parquet' else 'Arrow IPC'}")
        read = from_parquet if kind == "parquet" else from_ipc
        store = read(args.source, args.out, id_column=args.id_column or "id",
                     label_column=args.label_column or "label", feature_columns=args.columns, length=args.length,
                     channels=args.channels, dtype=args.dtype, categories=args.categories,
                     overwrite=args.overwrite, progress=not args.quiet)
    else:
        from .convert import check_inputs, convert
        from .sources import HDF5Source

        for option, value in (("--id-column", args.id_column), ("--label-column", args.label_column),
                              ("--length", args.length), ("--channels", args.channels)):
            if value is not None:
                raise ValueError(f"{option} is for Parquet and Arrow IPC; {args.source} is "
                                 f"{'a folder of .npy files' if kind == 'npy' else 'HDF5'}")
        if kind == "npy" and (args.h5_features or args.h5_ids):
            raise ValueError(f"--h5-features and --h5-ids are for HDF5 files; {args.source} is a folder of .npy files")
        if args.columns is not None and len(args.columns) != 1:
            raise ValueError(f"--column: {args.source} holds one feature column; give it one name, got "
                             f"{len(args.columns)}")
        name = args.columns[0] if args.columns else "features"
        source = HDF5Source(args.source, args.h5_features, args.h5_ids) if kind == "hdf5" else args.source
        check_inputs({}, args.split, args.categories, cli=True)  # PATH itself: named by the reader
        store = convert({name: source}, args.out, split=args.split, categories=args.categories,
                        dtype=args.dtype or "float32", overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {store.path}: {len(store)} instances, columns {', '.join(store.columns)}, "
          f"{store.file_size / 2**20:.1f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; its exit status. Ctrl-C: 130 and one line,
    "interrupted" (a store being written is discarded). A reader that closes
    stdout early (``| head``): 141, as for a process that SIGPIPE ends, and
    nothing on stderr."""
    try:
        try:
            status = _main(argv)
        except SystemExit:  # argparse: --help, --version, a usage error
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Later writes (the interpreter's own flush at exit) go nowhere instead of failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_paths(args)
        if args.command == "convert":
            from .convert import check_inputs, convert

            names = [n for n, _ in args.features]
            if len(set(names)) != len(names):
                raise ConversionError(f"a column name is given twice: {names}")
            check_inputs(dict(args.features), args.split, args.categories, cli=True)
            store = convert(dict(args.features), args.out, split=args.split, categories=args.categories,
                            dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
                            trust_pickle=args.trust_pickle, missing="drop" if args.drop_missing else "error",
                            extra="ignore" if args.ignore_extra else "error",
                            allow_label_mismatch=args.allow_label_mismatch)
            print(f"wrote {store.path}: {len(store)} instances, columns {', '.join(store.columns)}, "
                  f"{store.file_size / 2**20:.1f} MiB")
        elif args.command == "info":
            info = _info(args.store)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_info(info)
        elif args.command == "verify":
            from .store import open as open_store

            damaged = open_store(args.store).verify()
            if damaged:
                print(f"{args.store}: DAMAGED sections: {', '.join(damaged)}", file=sys.stderr)
                return 1
            print(f"{args.store}: OK (every section checksum matches)")
        elif args.command == "demo":
            from .demo import run_demo

            if args.instances < 1:
                raise ValueError("--instances must be at least 1")
            if args.workdir is not None:
                try:
                    os.makedirs(args.workdir, exist_ok=True)
                except OSError as e:
                    raise OSError(e.errno, f"--workdir: cannot create the folder {args.workdir}: "
                                           f"{e.strerror}") from None
            run_demo(args.instances, workdir=args.workdir, seed=args.seed, progress=not args.quiet)
        elif args.command == "bench":
            from .bench import run as run_bench

            return run_bench(args)
        elif args.command == "probe":
            _probe(args)
        elif args.command == "export":
            _export(args)
        elif args.command == "import":
            _import(args)
        elif args.command == "select":
            _select(args)
        elif args.command == "stats":
            _stats(args)
    except FormatError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except (ConversionError, ValueError, KeyError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TypeError as e:  # an argument of the wrong type reaching the import
        if args.command != "import":
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Before any work: every store the command reads is a store, and every
    file it writes has a folder. The errors name the argument (STORE, OUT,
    --json, ...) and what to do."""
    if args.command in ("info", "verify", "export", "select", "stats"):
        _check_store("STORE", args.store)
        if args.command == "stats" and args.stats_from is not None:
            _check_store("--from", args.stats_from)
    elif args.command == "probe":
        for k, path in enumerate(args.stores):
            _check_store("VAL" if k % 2 else "TRAIN", path)
    elif args.command == "bench" and getattr(args, "store", None):
        _check_store("--store", args.store)
    if args.command == "import" and args.categories is not None and not os.path.isfile(args.categories):
        raise FileNotFoundError(f"--categories: no such file: {args.categories}")
    outputs = []
    if args.command in ("convert", "select", "export", "import"):
        outputs.append(("OUT", args.out))
    elif args.command == "stats":
        outputs.append(("--output", args.output))
    elif args.command in ("probe", "bench"):
        outputs += [("--json", getattr(args, "json", None)), ("--plot", getattr(args, "plot", None))]
    for name, path in outputs:
        if path is None or path == "-" or "://" in path:  # a URL: the remote layer checks it
            continue
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise FileNotFoundError(f"{name}: the folder '{folder}' {what}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{name}: {path} is a folder; give the path of a file to write")


#: First bytes of the files people mistake for a store, what they are, and what makes a store of them.
_FOREIGN = ((b"\x80", "a pickle", "convert it: finegym-store convert OUT.fgs -f NAME={path}"),
            (b"PAR1", "a Parquet file", "import it: finegym-store import {path} OUT.fgs"),
            (b"ARROW1", "an Arrow IPC file", "import it: finegym-store import {path} OUT.fgs"))


def _check_store(name: str, path: str) -> None:
    """ValueError (exit 2) for a file that is not a store at all, by its
    first bytes, with the command that makes one of it; a store that is
    damaged (or too short to tell) is left to open(): FormatError, exit 1."""
    from . import _core

    if "://" in path:  # a remote store: open() fetches and checks its header
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(_core.MAGIC))
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such file: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{name}: {path} is a folder, not a store file") from None
    except PermissionError:
        raise PermissionError(f"{name}: cannot read {path}: permission denied") from None
    if _core.MAGIC.startswith(head):
        return
    for magic, kind, fix in _FOREIGN:
        if head.startswith(magic):
            raise ValueError(f"{name}: {path} is {kind}, not a finegym-store file; {fix.format(path=path)}")
    raise ValueError(f"{name}: {path} is not a finegym-store file (a store begins with the bytes FGSTORE\\0); "
                     "make one with finegym-store convert (pickles) or finegym-store import (Parquet)")


#: Python spellings in library messages, and what the command line calls them.
_CLI_WORDS = (("pass overwrite=True", "use --overwrite"), ("overwrite=True", "--overwrite"),
              ("pass trust_pickle=True", "use --trust-pickle"), ("trust_pickle=True", "--trust-pickle"))


def _one_line(e: BaseException) -> str:
    """The message on one line (pyarrow's span several), in the command line's words,
    without the quotes str() puts around a KeyError's message nor the
    "[Errno N]" of an OSError's."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    elif isinstance(e, OSError) and e.strerror:
        text = e.strerror
        if e.filename is not None and os.fspath(e.filename) not in text:
            text += f": {os.fspath(e.filename)}"
    else:
        text = str(e)
    text = " ".join(text.split())
    for python, cli in _CLI_WORDS:
        text = text.replace(python, cli)
    return text


if __name__ == "__main__":
    sys.exit(main())
