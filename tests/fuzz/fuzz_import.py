"""Fuzzing the Arrow/Parquet import: from_arrow over Arrow IPC files and
streams, from_parquet over Parquet files.

Inputs are mutants of real exports (a small synthetic store written with
to_ipc / to_parquet, fixed-T and ragged columns, plain, zstd and dictionary
Parquet, several row groups) and of hand-made tables with flat and nested list
columns: byte flips, truncations, insertions, integers set to extremes, splices
from another seed, and for Parquet edits aimed at the footer (with its length
fixed up, so the thrift is parsed) as well as the pages; and mutants of the
``finegym_store`` metadata JSON, written into an otherwise valid Parquet file.
Each input must import into a store or raise ConversionError whose message
names the source (the file's path; for IPC input, which pyarrow reads first,
"the Arrow table" / "the record batch stream"). An IPC input pyarrow itself
cannot open counts as "unreadable". Anything else is a finding: another
exception, a crash (the process dies by a signal), "ran out of memory" (the
address space is capped, so a memory bomb shows as a MemoryError) or an input
that takes over 20 seconds.

    python tests/fuzz/fuzz_import.py --seconds 600             # atheris if installed
    python tests/fuzz/fuzz_import.py --seconds 600 --engine random
    python tests/fuzz/fuzz_import.py --seeded --cases 240 --workdir DIR   # the test suite's run

Findings are written to --findings (default $TMPDIR/finegym-fuzz-import-findings);
the last line printed is a JSON summary with the number of executions and
findings. Exit code 1 when there are findings.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # keep numpy's address space small

import numpy as np  # noqa: E402

from harness import EXTREMES, MAX_INPUT, TIMEOUT_S, Finding, cap_address_space, on_timeout  # noqa: E402

KINDS = ("ipc_file", "ipc_stream", "parquet", "meta")


# -- seeds --------------------------------------------------------------------------------------------


def seeds(workdir: Path) -> list[tuple[str, str, bytes]]:
    """(kind, name, bytes): exports of a small synthetic store and hand-made tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import finegym_store as fgs
    from finegym_store import arrow, synth
    from finegym_store.arrow import METADATA_KEY

    ids = synth.make_ids(6, seed=5)
    labels = synth.long_tailed_labels(6, 3, seed=5)
    feats = synth.make_features(ids, labels, (3, 4, 1, 1), seed=5)
    ragged = {k: np.arange((i % 3 + 1) * 2, dtype=np.float32).reshape(-1, 2) + i for i, k in enumerate(ids)}
    split = workdir / "split.txt"
    synth.write_split(split, ids, labels)
    store = fgs.convert({"tsn": feats, "rag": ragged}, workdir / "seed.fgs", split=split, progress=False,
                        overwrite=True)
    out: list[tuple[str, str, bytes]] = []

    def export(kind: str, name: str, path: Path, **kw) -> None:
        if path.exists():
            path.unlink()
        if kind == "ipc_file":
            arrow.to_ipc(store, path, progress=False, **kw)
        else:
            store.to_parquet(path, progress=False, **kw)
        out.append((kind, name, path.read_bytes()))

    export("ipc_file", "export", workdir / "e.arrow")
    export("ipc_file", "export_tensor", workdir / "e.arrow", tensor_type="fixed_shape_tensor")
    export("parquet", "export", workdir / "e.parquet")
    export("parquet", "export_groups", workdir / "e.parquet", row_group_size=2)
    export("parquet", "export_zstd", workdir / "e.parquet", compression="zstd")
    table = store.to_arrow()
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        for b in table.to_batches(max_chunksize=2):
            w.write_batch(b)
    out.append(("ipc_stream", "export", sink.getvalue()))

    n = 5
    hand = pa.table({
        "id": [f"r{i}" for i in range(n)],
        "label": pa.array([0, 1, None, 2, 1], pa.int16()),
        "flat": pa.array([[float(j) for j in range((i % 2 + 1) * 4)] for i in range(n)], pa.list_(pa.float64())),
        "nested": pa.array([[[1.0, 2.0]] * (i + 1) for i in range(n)], pa.list_(pa.list_(pa.float32()))),
    }, metadata={METADATA_KEY: json.dumps({"columns": {"flat": {"channels": 2}, "nested": {}}}).encode()})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, hand.schema) as w:
        w.write_table(hand, max_chunksize=2)
    out.append(("ipc_file", "hand", sink.getvalue()))
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, hand.schema) as w:
        w.write_table(hand, max_chunksize=3)
    out.append(("ipc_stream", "hand", sink.getvalue()))
    buf = io.BytesIO()
    pq.write_table(hand, buf, use_dictionary=True, row_group_size=3)
    out.append(("parquet", "hand", buf.getvalue()))

    doc = table.schema.metadata[METADATA_KEY]
    out.append(("meta", "export", doc))
    out.append(("meta", "hand", hand.schema.metadata[METADATA_KEY]))
    return out


def meta_table():
    """The table a ``meta`` input's JSON is written into (as Parquet), with
    the columns the export's metadata describes."""
    import pyarrow as pa

    n = 4
    fixed = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * 12, dtype=np.float32)), 4), 3)
    rag = pa.array([[[1.0, 2.0]] * (i + 1) for i in range(n)], pa.list_(pa.list_(pa.float32(), 2)))
    flat = pa.array([[1.0, 2.0, 3.0, 4.0]] * n, pa.list_(pa.float64()))
    nested = pa.array([[[1.0, 2.0]]] * n, pa.list_(pa.list_(pa.float32())))
    return pa.table({"id": [f"m{i}" for i in range(n)], "label": pa.array([0, 1, 2, 0], pa.int32()),
                     "tsn": fixed, "rag": rag, "flat": flat, "nested": nested})


# -- mutation -----------------------------------------------------------------------------------------

_JSON_VALUES = [0, -1, 1, 2**31, 2**63, 2**70, -(2**70), 1.5, True, None, "", "float16", "x" * 50, [], {}, [[0]],
                [1, 2], {"a": 1}, "\ud800"]


def _varint(v: int) -> bytes:
    v &= 2**64 - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _bytes_mutation(b: bytearray, rnd: random.Random, donors: list[bytes], lo: int = 0) -> None:
    if len(b) <= lo:
        b += bytes([rnd.randrange(256)])
        return
    kind = rnd.randrange(7)
    i = rnd.randrange(lo, len(b))
    if kind == 0:
        b[i] = rnd.randrange(256)
    elif kind == 1:
        b[i] ^= 1 << rnd.randrange(8)
    elif kind == 2:
        del b[i:]
    elif kind == 3:
        b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    elif kind == 4:
        width = rnd.choice([1, 2, 4, 8])
        v = rnd.choice(EXTREMES) & ((1 << (8 * width)) - 1)
        b[i:i + width] = v.to_bytes(width, "little")
    elif kind == 5:  # a zigzag varint (thrift compact) set to an extreme
        n = 1
        while i + n < len(b) and b[i + n - 1] & 0x80:
            n += 1
        b[i:i + n] = _varint(rnd.choice(EXTREMES) << 1)
    else:  # splice from another seed
        donor = rnd.choice(donors) or b"\0"
        s = rnd.randrange(len(donor))
        e = min(len(donor), s + rnd.randint(1, 64))
        b[i:i + rnd.randint(0, 64)] = donor[s:e]


def _footer_mutation(data: bytes, rnd: random.Random, donors: list[bytes]) -> bytes:
    """Mutate a Parquet footer and fix its length, so that the thrift is parsed."""
    if len(data) < 12 or data[-4:] != b"PAR1":
        b = bytearray(data)
        _bytes_mutation(b, rnd, donors)
        return bytes(b)
    flen = struct.unpack("<I", data[-8:-4])[0]
    start = max(4, len(data) - 8 - flen)
    foot = bytearray(data[start:-8])
    for _ in range(rnd.randint(1, 3)):
        _bytes_mutation(foot, rnd, donors)
    return data[:start] + bytes(foot) + struct.pack("<I", len(foot)) + b"PAR1"


def _json_mutation(doc: bytes, rnd: random.Random) -> bytes:
    try:
        tree = json.loads(doc)
    except (ValueError, RecursionError):
        tree = None
    if tree is None or rnd.random() < 0.3:
        b = bytearray(doc)
        for _ in range(rnd.randint(1, 3)):
            _bytes_mutation(b, rnd, [doc])
        return bytes(b)
    # Replace one node somewhere in the tree with a hostile value.
    nodes = []

    def walk(x, parent, key):
        nodes.append((parent, key))
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, x, k)
        elif isinstance(x, list):
            for k, v in enumerate(x[:20]):
                walk(v, x, k)

    try:
        walk(tree, None, None)
    except RecursionError:
        return doc
    parent, key = rnd.choice(nodes)
    r = rnd.random()
    value = rnd.choice(_JSON_VALUES)
    if r < 0.1:
        value = "__deep__"  # spliced in as text below: too deep for json.dumps
    elif r < 0.2 and isinstance(parent, list) and parent:
        value = parent[0]  # duplicates (class labels)
    if parent is None:
        tree = value
    else:
        parent[key] = value
    try:
        text = json.dumps(tree).encode()
    except (ValueError, UnicodeEncodeError, RecursionError):
        return doc
    depth = rnd.choice([50, 3000, 100_000])
    return text.replace(b'"__deep__"', b"[" * depth + b"]" * depth)


def mutate(kind: str, data: bytes, rnd: random.Random, donors: list[bytes]) -> bytes:
    if kind == "meta":
        return _json_mutation(data, rnd)[:MAX_INPUT]
    if kind == "parquet" and rnd.random() < 0.5:
        return _footer_mutation(data, rnd, donors)[:MAX_INPUT]
    b = bytearray(data[:MAX_INPUT])
    for _ in range(rnd.randint(1, 3)):
        _bytes_mutation(b, rnd, donors)
    return bytes(b[:MAX_INPUT])


# -- one input -----------------------------------------------------------------------------------------


class Checker:
    def __init__(self, workdir: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        import finegym_store as fgs

        self.pa, self.pq, self.fgs = pa, pq, fgs
        self.workdir = workdir
        self.meta = meta_table()
        self.outcomes: collections.Counter[str] = collections.Counter()

    def _expected(self, e: BaseException, source: str) -> str:
        if isinstance(e, MemoryError) or "ran out of memory" in str(e) or "alloc" in str(e).lower():
            raise Finding(f"ran out of memory (a memory bomb?): {type(e).__name__}: {e}") from e
        if not isinstance(e, self.fgs.ConversionError):
            raise Finding(f"raised {type(e).__name__}, not ConversionError: {e}") from e
        if not str(e).startswith(source):
            raise Finding(f"the message does not name the source {source!r}: {e}")
        if "\n" in str(e):
            raise Finding(f"a message of several lines: {e!r}")
        return "conversion_error"

    def check(self, kind: str, data: bytes) -> str:
        """'store', 'conversion_error' or 'unreadable' (pyarrow cannot open
        an IPC input); Finding otherwise."""
        pa = self.pa
        path = self.workdir / ("input.arrow" if kind.startswith("ipc") else "input.parquet")
        if kind == "meta":
            from finegym_store.arrow import METADATA_KEY

            self.pq.write_table(self.meta.replace_schema_metadata({METADATA_KEY: data}), path)
        else:
            path.write_bytes(data)
        out = self.workdir / "out.fgs"
        signal.alarm(TIMEOUT_S)
        try:
            if kind == "ipc_file":
                try:
                    source = pa.ipc.open_file(path).read_all()
                except Exception:
                    return "unreadable"
                where = "the Arrow table"
            elif kind == "ipc_stream":
                try:
                    source = pa.ipc.open_stream(path)
                except Exception:
                    return "unreadable"
                where = "the record batch stream"
            else:
                source, where = None, str(path)
            try:
                if source is None:
                    self.fgs.from_parquet(path, out, overwrite=True, progress=False)
                else:
                    self.fgs.from_arrow(source, out, overwrite=True, progress=False)
                return "store"
            except Exception as e:
                if os.path.exists(out):
                    os.unlink(out)
                return self._expected(e, where)
            finally:
                leftovers = [p for p in os.listdir(self.workdir) if p.startswith(".out.fgs")]
                if leftovers:
                    raise Finding(f"the import left temporary files: {leftovers}")
        finally:
            signal.alarm(0)


def _save(findings: Path, kind: str, data: bytes, what: str) -> Path:
    findings.mkdir(parents=True, exist_ok=True)
    ext = {"ipc_file": ".arrow", "ipc_stream": ".arrows", "parquet": ".parquet", "meta": ".json"}[kind]
    path = findings / f"finding-{kind}-{hashlib.sha1(data).hexdigest()[:16]}{ext}"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(what)
    return path


# -- engines -----------------------------------------------------------------------------------------------


def _one(args, checker: Checker, kind: str, data: bytes, extra: dict) -> int:
    try:
        checker.outcomes[checker.check(kind, data)] += 1
        return 0
    except Finding as f:
        saved = _save(Path(args.findings), kind, data, f"{f}\n{traceback.format_exc()}")
        print(json.dumps({**extra, "finding": str(f)[:500], "saved": str(saved)}), flush=True)
        return 1


def run_seeded(args, checker: Checker, corpus) -> int:
    rnd = random.Random(args.seed)
    donors = [d for _, _, d in corpus]
    findings = 0
    for i in range(args.cases):
        kind, name, seed = corpus[i % len(corpus)]
        data = mutate(kind, seed, rnd, donors)
        if args.dump is not None:  # replay: write mutant number --dump, check nothing
            if i == args.dump:
                print(json.dumps({"case": i, "kind": kind, "saved": str(_save(Path(args.findings), kind, data,
                                                                                "replayed"))}))
                return 0
            continue
        print(json.dumps({"case": i, "seed": f"{kind}/{name}", "size": len(data)}), flush=True)
        findings += _one(args, checker, kind, data, {"case": i})
    print(json.dumps({"executions": args.cases, "findings": findings, "outcomes": checker.outcomes}), flush=True)
    return 1 if findings else 0


def run_replay(args, checker: Checker) -> int:
    exts = {".arrow": "ipc_file", ".arrows": "ipc_stream", ".parquet": "parquet", ".json": "meta"}
    findings = 0
    for name in args.replay:
        if name.endswith(".txt"):  # a finding's report, beside its input
            continue
        data = Path(name).read_bytes()
        if name.endswith(".bin"):
            kind, data = KINDS[data[0] % len(KINDS)], data[1:]
        else:
            kind = exts[Path(name).suffix]
        print(json.dumps({"replay": name, "kind": kind}), flush=True)
        findings += _one(args, checker, kind, data, {"replay": name})
    print(json.dumps({"executions": sum(not n.endswith(".txt") for n in args.replay), "findings": findings, "outcomes": checker.outcomes}),
          flush=True)
    return 1 if findings else 0


def run_random(args, checker: Checker, corpus) -> int:
    rnd = random.Random(args.seed)
    donors = [d for _, _, d in corpus]
    deadline = time.monotonic() + args.seconds
    execs = findings = 0
    Path(args.findings).mkdir(parents=True, exist_ok=True)
    inflight = Path(args.findings) / "in-flight.bin"  # first byte: the kind (index in KINDS)
    next_report = time.monotonic() + 60
    while time.monotonic() < deadline:
        kind, _, seed = rnd.choice(corpus)
        data = mutate(kind, seed, rnd, donors)
        if rnd.random() < 0.3:  # stack mutations
            data = mutate(kind, data, rnd, donors)
        execs += 1
        # A crash leaves the input that caused it here (the process is gone).
        inflight.write_bytes(bytes([KINDS.index(kind)]) + data)
        findings += _one(args, checker, kind, data, {"execution": execs})
        if time.monotonic() > next_report:
            next_report += 60
            print(json.dumps({"executions": execs, "findings": findings, "outcomes": checker.outcomes}), flush=True)
    inflight.unlink(missing_ok=True)
    print(json.dumps({"engine": "random", "executions": execs, "findings": findings,
                      "outcomes": checker.outcomes}), flush=True)
    return 1 if findings else 0


def run_atheris(args, corpus, workdir: Path) -> int:
    import atheris

    checker = Checker(workdir)
    findings_dir = Path(args.findings)
    findings_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir = workdir / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    # An input is one kind byte, then the file.
    for k, (kind, name, data) in enumerate(corpus):
        (corpus_dir / f"{kind}-{name}-{k}").write_bytes(bytes([KINDS.index(kind)]) + data)
    donors = [d for _, _, d in corpus]
    counter = {"n": 0}

    def one_input(data: bytes) -> None:
        if not data:
            return
        counter["n"] += 1
        kind = KINDS[data[0] % len(KINDS)]
        try:
            checker.check(kind, data[1:])
        except Finding as f:
            _save(findings_dir, kind, data[1:], f"{f}\n{traceback.format_exc()}")
            raise

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rnd = random.Random(seed)
        if not data:
            return data
        if rnd.random() < 0.5:
            return atheris.Mutate(data, max_size)
        kind = KINDS[data[0] % len(KINDS)]
        return (data[:1] + mutate(kind, data[1:], rnd, donors))[:max_size]

    atheris.Setup([sys.argv[0], str(corpus_dir), f"-max_total_time={args.seconds}", "-print_final_stats=1",
                   f"-timeout={TIMEOUT_S}", "-max_len=262144", f"-artifact_prefix={findings_dir}/",
                   f"-seed={args.seed}"],
                  one_input, custom_mutator=custom_mutator)
    try:
        atheris.Fuzz()
    finally:
        print(json.dumps({"engine": "atheris", "executions": counter["n"]}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seeded", action="store_true", help="deterministic run of --cases mutants")
    p.add_argument("--cases", type=int, default=240)
    p.add_argument("--dump", type=int, metavar="CASE", help="with --seeded: write mutant CASE to --findings, run nothing")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("--findings", default=str(Path(tempfile.gettempdir()) / "finegym-fuzz-import-findings"))
    p.add_argument("--replay", nargs="+", metavar="FILE",
                   help="check these saved inputs (finding-KIND-*.EXT or in-flight.bin) and report each")
    args = p.parse_args(argv)

    engine = args.engine
    if engine == "auto" and not args.seeded:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris" and not args.seeded:
        import atheris

        with atheris.instrument_imports(include=["finegym_store"]):
            import finegym_store  # noqa: F401
            import finegym_store.ingest  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="finegym-fuzz-import-",
                                     dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        args.workdir = str(workdir)
        corpus = seeds(workdir)  # before the cap: building the seeds is trusted work
        cap_address_space()
        signal.signal(signal.SIGALRM, on_timeout)
        if args.replay:
            return run_replay(args, Checker(workdir))
        if args.seeded:
            return run_seeded(args, Checker(workdir), corpus)
        if engine == "atheris":
            return run_atheris(args, corpus, workdir)
        return run_random(args, Checker(workdir), corpus)


if __name__ == "__main__":
    sys.exit(main())
