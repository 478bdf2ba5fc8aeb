"""Fuzzing the untrusted-pickle path: safe_pickle.load, then convert.

Inputs are mutants of real FineGym-layout pickles (finegym_store.synth, every
protocol, Python 2 spelling, OrderedDict, big-endian, Fortran order) and of
the hostile pickles the tests hold: byte flips, truncations, insertions,
length fields set to extremes, and splices of whole opcodes between pickles.
Each input must load, or raise ConversionError / UnsafePickleError; a table
that loads is converted (in memory), which must succeed or raise
ConversionError. Anything else is a finding: another exception, a crash (the
process dies by a signal), "ran out of memory" (the address space is capped,
so a memory bomb shows as one) or an input that takes over 20 seconds.

    python tests/fuzz/fuzz_pickle.py --seconds 600             # atheris if installed
    python tests/fuzz/fuzz_pickle.py --seconds 600 --engine random
    python tests/fuzz/fuzz_pickle.py --seeded --cases 300 --workdir DIR   # the test suite's run

atheris (``pip install atheris``; the ``fuzz`` extra) adds coverage guidance;
without it a dependency-free random mutator runs. Findings are written to
--findings (default $TMPDIR/finegym-fuzz-findings); the last line printed is
a JSON summary with the number of executions and findings. Exit code 1 when
there are findings.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import io
import json
import os
import pickle
import pickletools
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # keep numpy's address space small

import numpy as np  # noqa: E402

from harness import EXTREMES, MAX_INPUT, TIMEOUT_S, Finding, cap_address_space, on_timeout  # noqa: E402



# -- seeds --------------------------------------------------------------------------------------------


class _Reduce:
    """Pickles as func(*args) with an optional BUILD state: for hostile seeds."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _np_reconstruct():
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


def seeds() -> dict[str, bytes]:
    """Real-layout feature pickles (small) and hostile pickles, by name."""
    from finegym_store import synth

    ids = synth.make_ids(4, seed=3)
    labels = synth.long_tailed_labels(4, 3, seed=3)
    tsn = synth.make_features(ids, labels, (3, 8, 1, 1), seed=3)
    i3d = synth.make_features(ids, labels, (2, 6, 1, 1, 1), seed=4)
    out: dict[str, bytes] = {}
    for protocol in range(6):
        out[f"tsn_p{protocol}"] = pickle.dumps(tsn, protocol=protocol)
    out["i3d_p4"] = pickle.dumps(i3d, protocol=4)
    out["i3d_p2"] = pickle.dumps(i3d, protocol=2)
    mixed = {
        ids[0]: tsn[ids[0]].astype(">f8"),
        ids[1]: np.asfortranarray(tsn[ids[1]].reshape(3, 8)),
        ids[2]: tsn[ids[2]].astype(np.float16),
        ids[3]: tsn[ids[3]].reshape(3, 8)[:, ::2],  # not contiguous: _reconstruct even at protocol 5
    }
    out["mixed_p5"] = pickle.dumps(mixed, protocol=5)
    out["mixed_p2"] = pickle.dumps(mixed, protocol=2)
    out["ordered_p2"] = pickle.dumps(collections.OrderedDict(sorted(tsn.items())), protocol=2)
    out["extras_p4"] = pickle.dumps({"s": np.float32(1.5), "b": b"\x00\xff", "ba": bytearray(b"ab"),
                                     "set": {1, 2}, "fs": frozenset([b"x"]), "t": (1, [2.5, None])}, protocol=4)
    out["extras_p2"] = pickle.dumps({"b": b"\x00\xff", "ba": bytearray(b"ab"), "set": {1, 2}, "e": b""}, protocol=2)
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    raw = x.tobytes()
    out["python2"] = (b"\x80\x02}(U\x01a"
                      b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
                      b"(K\x01K\x02K\x03\x86cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R"
                      b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
                      b"\x89U" + bytes([len(raw)]) + raw + b"tbu.")

    def dtype(code, order, names=None, fields=None, elsize=-1, alignment=-1, flags=0):
        return _Reduce(np.dtype, (code, False, True), (3, order, None, names, fields, elsize, alignment, flags))

    def array(dt, shape, data):
        return _Reduce(_np_reconstruct(), (np.ndarray, (0,), b"b"), (1, shape, dt, False, data))

    obj_field = {"a": (dtype("O8", "|", flags=63), 0)}
    out["hostile_object_dtype"] = pickle.dumps({"a": array(dtype("O8", "|"), (2,), b"A" * 16)}, protocol=2)
    out["hostile_object_field"] = pickle.dumps(
        {"a": array(dtype("V8", "|", ("a",), obj_field, 8, 1, 0), (2,), b"A" * 16)}, protocol=2)
    out["hostile_flags"] = pickle.dumps({"a": array(dtype("f8", ">", flags=63), (2,), b"A" * 16)}, protocol=4)
    out["hostile_deep_key"] = b"\x80\x02}K\x00" + b"\x85" * 300 + b"K\x01s."
    out["hostile_bytearray"] = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R."
    out["hostile_ndarray"] = b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85R."
    shared = np.ones((3, 8), np.float32)
    out["hostile_shared"] = pickle.dumps({f"k{i}": shared for i in range(40)}, protocol=4)
    out["hostile_surrogate_key"] = pickle.dumps({"\ud800": x, "b": x * 2}, protocol=4)
    return out


# -- mutation -----------------------------------------------------------------------------------------


def _op_bounds(data: bytes) -> list[int]:
    """Offsets where opcodes start (as far as the pickle parses)."""
    bounds = []
    try:
        for _, _, pos in pickletools.genops(data):
            bounds.append(pos)
    except Exception:
        pass
    return bounds or [0]






def mutate(data: bytes, rnd: random.Random, corpus: list[bytes]) -> bytes:
    b = bytearray(data[:MAX_INPUT])
    for _ in range(rnd.randint(1, 3)):
        if len(b) > MAX_INPUT:
            del b[MAX_INPUT:]
        kind = rnd.randrange(8)
        if not b:
            b += bytes([rnd.randrange(256)])
        if kind == 0:  # flip a byte
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif kind == 1:  # flip a bit
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif kind == 2:  # truncate
            del b[rnd.randrange(len(b)):]
        elif kind == 3:  # insert random bytes
            i = rnd.randrange(len(b) + 1)
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif kind == 4:  # a length or int field set to an extreme
            i = rnd.randrange(len(b))
            width = rnd.choice([1, 2, 4, 8])
            v = rnd.choice(EXTREMES) & ((1 << (8 * width)) - 1)
            b[i:i + width] = v.to_bytes(width, "little")
        elif kind in (5, 6):  # splice whole opcodes from another pickle (or this one)
            donor = rnd.choice(corpus) if kind == 5 else bytes(b)
            db = _op_bounds(donor)
            s = rnd.choice(db)
            e = rnd.choice([p for p in db if p >= s] + [len(donor)])
            tb = _op_bounds(bytes(b))
            at = rnd.choice(tb)
            if rnd.random() < 0.5:  # insert
                b[at:at] = donor[s:e]
            else:  # replace one opcode
                nxt = [p for p in tb if p > at]
                b[at:(nxt[0] if nxt else len(b))] = donor[s:e]
        else:  # repeat an opcode run (floods, deep nesting)
            tb = _op_bounds(bytes(b))
            s = rnd.choice(tb)
            nxt = [p for p in tb if p > s]
            e = nxt[0] if nxt else len(b)
            times = min(rnd.choice([2, 10, 200]), max(1, (MAX_INPUT - len(b)) // max(1, e - s)))
            b[s:s] = bytes(b[s:e]) * times
    return bytes(b[:MAX_INPUT])


# -- one input -----------------------------------------------------------------------------------------


class Checker:
    def __init__(self, workdir: Path) -> None:
        import finegym_store as fgs
        from finegym_store import convert as convert_module
        from finegym_store import safe_pickle

        self.fgs, self.safe_pickle, self.convert_module = fgs, safe_pickle, convert_module
        self.workdir = workdir
        self.outcomes: collections.Counter[str] = collections.Counter()

    def _expected(self, e: BaseException, stage: str) -> None:
        if not isinstance(e, self.fgs.ConversionError):
            raise Finding(f"{stage} raised {type(e).__name__}, not ConversionError: {e}") from e
        if "ran out of memory" in str(e):
            raise Finding(f"{stage} ran out of memory (a memory bomb?): {e}") from e
        if not str(e).startswith(self.source):
            raise Finding(f"{stage}: the message does not name the file: {e}")
        # The loader turns only what malformed input raises into
        # ConversionError (its cause): anything else wrapped would hide a bug.
        cause = e.__cause__
        if stage == "load" and cause is not None and \
                not isinstance(cause, (self.safe_pickle._Malformed, self.safe_pickle._Refused, EOFError, MemoryError)):
            raise Finding(f"{stage}: ConversionError caused by {type(cause).__name__}: {cause}") from e

    def check(self, data: bytes, path: Path | None = None) -> str:
        """'ok', 'refused' or 'error' (ConversionError); Finding otherwise."""
        self.source = str(path) if path is not None else "<fuzz input>"
        if path is not None:
            path.write_bytes(data)
        signal.alarm(TIMEOUT_S)
        try:
            try:
                if path is not None:
                    table = self.safe_pickle.load(path)
                else:
                    table = self.safe_pickle._load_stream(io.BytesIO(data), len(data), self.source)
            except Exception as e:
                self._expected(e, "load")
                return "refused" if isinstance(e, self.fgs.UnsafePickleError) else "error"
            if not isinstance(table, collections.abc.Mapping):
                return "ok"
            out = self.workdir / "out.fgs"
            try:
                # From the path when there is one: the full convert flow.
                source = str(path) if path is not None else table
                if path is None:
                    self.source = "features['x']"
                self.fgs.convert({"x": source}, out, overwrite=True, progress=False)
                return "converted"
            except Exception as e:
                self._expected(e, "convert")
                return "convert_error"
            finally:
                leftovers = [p for p in os.listdir(self.workdir) if p.endswith(".tmp")]
                if leftovers:
                    raise Finding(f"convert left temporary files: {leftovers}")
        finally:
            signal.alarm(0)


def _save(findings: Path, data: bytes, what: str) -> Path:
    findings.mkdir(parents=True, exist_ok=True)
    import hashlib

    path = findings / f"finding-{hashlib.sha1(data).hexdigest()[:16]}.pkl"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(what)
    return path


# -- engines -----------------------------------------------------------------------------------------------


def run_seeded(args, checker: Checker, corpus: dict[str, bytes]) -> int:
    """Deterministic: args.cases mutants, each written to a file and converted from it."""
    rnd = random.Random(args.seed)
    names = sorted(corpus)
    blobs = [corpus[n] for n in names]
    findings = 0
    path = Path(args.workdir) / "mutant.pkl"
    for i in range(args.cases):
        name = names[i % len(names)]
        data = mutate(corpus[name], rnd, blobs)
        print(json.dumps({"case": i, "seed": name, "size": len(data)}), flush=True)  # last line before a crash
        try:
            checker.outcomes[checker.check(data, path)] += 1
        except Finding as f:
            findings += 1
            saved = _save(Path(args.findings), data, f"{f}\n{traceback.format_exc()}")
            print(json.dumps({"case": i, "finding": str(f), "saved": str(saved)}), flush=True)
    print(json.dumps({"executions": args.cases, "findings": findings, "outcomes": checker.outcomes}), flush=True)
    return 1 if findings else 0


def run_random(args, checker: Checker, corpus: dict[str, bytes]) -> int:
    rnd = random.Random(args.seed)
    blobs = list(corpus.values())
    deadline = time.monotonic() + args.seconds
    execs = findings = 0
    next_report = time.monotonic() + 60
    while time.monotonic() < deadline:
        data = mutate(rnd.choice(blobs), rnd, blobs)
        execs += 1
        try:
            checker.outcomes[checker.check(data)] += 1
        except Finding as f:
            findings += 1
            saved = _save(Path(args.findings), data, f"{f}\n{traceback.format_exc()}")
            print(json.dumps({"finding": str(f), "saved": str(saved)}), flush=True)
        if time.monotonic() > next_report:
            next_report += 60
            print(json.dumps({"executions": execs, "findings": findings, "outcomes": checker.outcomes}), flush=True)
    print(json.dumps({"engine": "random", "executions": execs, "findings": findings,
                      "outcomes": checker.outcomes}), flush=True)
    return 1 if findings else 0


def run_atheris(args, corpus: dict[str, bytes], workdir: Path) -> int:
    import atheris

    checker = Checker(workdir)  # finegym_store was imported under instrument_imports (main)
    findings_dir = Path(args.findings)
    findings_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir = workdir / "corpus"
    corpus_dir.mkdir(exist_ok=True)
    for name, data in corpus.items():
        (corpus_dir / name).write_bytes(data)
    blobs = list(corpus.values())
    counter = {"n": 0}

    def one_input(data: bytes) -> None:
        counter["n"] += 1
        try:
            checker.check(data)
        except Finding as f:
            _save(findings_dir, data, f"{f}\n{traceback.format_exc()}")
            raise

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        # Half libFuzzer's own byte mutations, half ours (opcode splices).
        rnd = random.Random(seed)
        if rnd.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mutate(data, rnd, blobs)[:max_size]

    atheris.Setup([sys.argv[0], str(corpus_dir), f"-max_total_time={args.seconds}", "-print_final_stats=1",
                   f"-timeout={TIMEOUT_S}", "-max_len=65536", f"-artifact_prefix={findings_dir}/",
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
    p.add_argument("--seeded", action="store_true", help="deterministic run of --cases mutants from files")
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    p.add_argument("--findings", default=str(Path(tempfile.gettempdir()) / "finegym-fuzz-findings"))
    args = p.parse_args(argv)

    cap_address_space()
    signal.signal(signal.SIGALRM, on_timeout)
    engine = args.engine
    if engine == "auto" and not args.seeded:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris" and not args.seeded:
        import atheris

        with atheris.instrument_imports(include=["finegym_store"]):  # coverage of our code
            import finegym_store  # noqa: F401
            import finegym_store.safe_pickle  # noqa: F401
    corpus = seeds()
    with tempfile.TemporaryDirectory(prefix="finegym-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        args.workdir = str(workdir)
        if args.seeded:
            return run_seeded(args, Checker(workdir), corpus)
        if engine == "atheris":
            return run_atheris(args, corpus, workdir)
        return run_random(args, Checker(workdir), corpus)


if __name__ == "__main__":
    sys.exit(main())
