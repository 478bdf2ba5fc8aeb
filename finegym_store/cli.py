"""The ``finegym-store`` command: convert, info, verify, demo, export, import."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from . import __version__
from .errors import ConversionError, FormatError


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
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    im = sub.add_parser("import", help="build a store from a Parquet file or folder (e.g. an export)",
                        description="Build a store from a Parquet file or a folder of Parquet files.")
    im.add_argument("source", help="IN.parquet or a folder of .parquet files")
    im.add_argument("out", help="path of the store to write (e.g. gym99_val.fgs)")
    im.add_argument("--id-column", default="id")
    im.add_argument("--label-column", default="label", help="integer labels (default 'label'; -1 when absent)")
    im.add_argument("--columns", nargs="+", metavar="NAME", help="feature columns (default: all)")
    im.add_argument("--segments", type=int, help="T, for columns whose type does not fix it")
    im.add_argument("--channels", type=int, help="C, for flat list<float> columns")
    im.add_argument("--dtype", choices=("float32", "float16"), help="stored dtype (default: as in the file)")
    im.add_argument("--categories", help="FineGym categories file (default: the hierarchy in the file's metadata)")
    im.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    im.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


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
                "bytes": int(col.values.nbytes),
            }
            for name, col in ((n, store.column(n)) for n in store.columns)
        },
        "classes_in_hierarchy": len(store.classes.label) if store.classes is not None else None,
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

    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    store = open_store(args.store)
    ext = os.path.splitext(args.out)[1].lower()
    if ext in (".arrow", ".feather", ".ipc"):
        arrow.to_ipc(store, args.out, args.columns, args.row_group_size, args.compression, args.tensor_type,
                     progress=not args.quiet)
        kind = "Arrow IPC"
    else:
        arrow.to_parquet(store, args.out, args.columns, args.row_group_size, args.compression,
                         args.byte_stream_split, None, args.tensor_type, progress=not args.quiet)
        kind = "Parquet"
    print(f"wrote {args.out}: {kind}, {len(store)} rows, {os.path.getsize(args.out) / 2**20:.1f} MiB")


def _import(args: argparse.Namespace) -> None:
    from .ingest import from_parquet

    store = from_parquet(args.source, args.out, id_column=args.id_column, label_column=args.label_column,
                         feature_columns=args.columns, segments=args.segments, channels=args.channels,
                         dtype=args.dtype, categories=args.categories, overwrite=args.overwrite,
                         progress=not args.quiet)
    print(f"wrote {store.path}: {len(store)} instances, columns {', '.join(store.columns)}, "
          f"{store.file_size / 2**20:.1f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            from .convert import convert

            names = [n for n, _ in args.features]
            if len(set(names)) != len(names):
                raise ConversionError(f"a column name is given twice: {names}")
            store = convert(args.out, dict(args.features), split=args.split, categories=args.categories,
                            dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
                            trust_pickle=args.trust_pickle)
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
            run_demo(args.instances, workdir=args.workdir, seed=args.seed, progress=not args.quiet)
        elif args.command == "export":
            _export(args)
        elif args.command == "import":
            _import(args)
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConversionError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
