"""The allow-list unpickler: malicious pickles are refused before any code
runs; every pickle flavour of plain numpy arrays loads, quietly."""

from __future__ import annotations

import builtins
import collections
import datetime
import json
import os
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import safe_pickle

from conftest import CHILD_CWD, run_fuzz_seeded


class _Payload:
    """Pickles as a call of ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func = func
        self.args = args

    def __reduce__(self):
        return (self.func, self.args)


def _dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _globals_of(data: bytes) -> list[str]:
    """The module.name globals a pickle refers to (GLOBAL or STACK_GLOBAL,
    following the memo for STACK_GLOBAL's strings)."""
    out: list[str] = []
    recent: list[object] = []  # what the last opcodes pushed (str or None)
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            recent.append(arg)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(int(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name == "GLOBAL":
            out.append(arg.replace(" ", "."))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            out.append(f"{recent[-2]}.{recent[-1]}")
            recent.append(None)
        elif name not in ("FRAME", "PROTO", "MARK"):
            recent.append(None)
    return out


def _refused(data: bytes) -> list[str]:
    """The globals of a pickle outside the allow-list."""
    return [g for g in _globals_of(data) if tuple(g.rsplit(".", 1)) not in safe_pickle.ALLOWED_GLOBALS]


def _payloads(marker):
    return {
        "posix.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Payload(subprocess.call, ["touch", str(marker)]),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "io.open": _Payload(builtins.open, str(marker), "w"),
        "numpy.save": _Payload(np.save, str(marker), np.zeros(1)),
        "builtins.getattr": _Payload(getattr, dict, "fromkeys"),
    }


PAYLOAD_NAMES = list(_payloads("x"))


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_refused_before_running(tmp_path, name, protocol):
    marker = tmp_path / "pwned"
    path = _dump(tmp_path / "evil.pkl", {"a": np.zeros((2, 3), np.float32), "b": _payloads(marker)[name]}, protocol)
    refused = _refused(path.read_bytes())  # protocols < 3 spell some names the Python 2 way
    assert len(refused) == 1
    if protocol >= 3:
        assert refused == [name]
    with pytest.raises(fgs.UnsafePickleError,
                       match=rf"evil\.pkl: refusing to unpickle global '{re.escape(refused[0])}'") as info:
        safe_pickle.load(path)
    assert "trust_pickle=True" in str(info.value)
    assert not marker.exists()
    # UnsafePickleError is both a ConversionError and an UnpicklingError.
    assert isinstance(info.value, fgs.ConversionError)
    assert isinstance(info.value, pickle.UnpicklingError)


def test_payload_would_have_run_when_trusted(tmp_path):
    # Sanity check of the test's own payload: unpickled plainly, it runs.
    marker = tmp_path / "pwned"
    path = _dump(tmp_path / "evil.pkl", _payloads(marker)["builtins.exec"])
    safe_pickle.load(path, trust=True)
    assert marker.exists()


def test_convert_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = _dump(tmp_path / "evil.pkl", _payloads(marker)["posix.system"])
    out = tmp_path / "out.fgs"
    with pytest.raises(fgs.UnsafePickleError, match=r"evil\.pkl: refusing to unpickle global 'posix\.system'"):
        fgs.convert({"x": path}, out, progress=False)
    assert not marker.exists()
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.pkl"]


def test_convert_refuses_malicious_second_column(tmp_path):
    marker = tmp_path / "pwned"
    good = _dump(tmp_path / "good.pkl", {"a": np.zeros((2, 3), np.float32)})
    evil = _dump(tmp_path / "evil.pkl", {"a": _payloads(marker)["subprocess.call"]})
    with pytest.raises(fgs.UnsafePickleError, match=r"evil\.pkl.*'subprocess\.call'"):
        fgs.convert({"x": good, "y": evil}, tmp_path / "out.fgs", progress=False)
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.pkl", "good.pkl"]


def test_cli_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = _dump(tmp_path / "evil.pkl", _payloads(marker)["posix.system"])
    out = tmp_path / "out.fgs"
    proc = subprocess.run(
        [sys.executable, "-m", "finegym_store", "convert", str(out), "-f", f"x={path}", "-q"],
        capture_output=True, text=True, timeout=60, cwd=CHILD_CWD,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refusing to unpickle global 'posix.system'" in proc.stderr
    assert "--trust-pickle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not out.exists()


# -- trust --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj, name",
    [
        (collections.Counter("abracadabra"), "collections.Counter"),
        ({"when": datetime.date(2020, 2, 29)}, "datetime.date"),
        (collections.defaultdict(list, {"a": [1]}), "collections.defaultdict"),
    ],
)
def test_trust_bypasses_allow_list(tmp_path, obj, name):
    path = _dump(tmp_path / "benign.pkl", obj)
    with pytest.raises(fgs.UnsafePickleError, match=rf"'{name}'"):
        safe_pickle.load(path)
    assert safe_pickle.load(path, trust=True) == obj


def test_convert_trust_pickle(tmp_path):
    table = collections.defaultdict(list)  # a Mapping, but not an allow-listed global
    table["a"] = np.ones((2, 3), np.float32)
    table["b"] = np.zeros((2, 3), np.float32)
    path = _dump(tmp_path / "dd.pkl", table)
    with pytest.raises(fgs.UnsafePickleError, match=r"'collections\.defaultdict'"):
        fgs.convert({"x": path}, tmp_path / "out.fgs", progress=False)
    assert not (tmp_path / "out.fgs").exists()
    store = fgs.convert({"x": path}, tmp_path / "out.fgs", trust_pickle=True, progress=False)
    assert list(store.ids) == ["a", "b"]
    np.testing.assert_array_equal(store.features("x", 0), np.ones((2, 3)))


def test_trusted_truncated_pickle_is_conversion_error(tmp_path):
    data = pickle.dumps({"a": np.zeros(10)})
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(fgs.ConversionError, match=r"cut\.pkl"):
        safe_pickle.load(path, trust=True)


# -- what must load ---------------------------------------------------------------------------------


def _table():
    rng = np.random.default_rng(0)
    return {
        "a": rng.standard_normal((12, 16, 1, 1)).astype(np.float32),
        "b": rng.standard_normal((3, 5)).astype(np.float64),
        "c": rng.standard_normal(7).astype(np.float16),
        "f": np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
    }


def _check_table(got):
    want = _table()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    path = _dump(tmp_path / f"p{protocol}.pkl", _table(), protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_table(safe_pickle.load(path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_convert_from_pickle_of_protocol(tmp_path, protocol):
    table = {k: v for k, v in _table().items() if k in ("a",)}
    table["z"] = table["a"] * 2
    path = _dump(tmp_path / "feats.pkl", table, protocol)
    store = fgs.convert({"x": path}, tmp_path / "out.fgs", progress=False)
    assert store.features("x", 1).tobytes() == (table["a"] * 2).reshape(12, 16).tobytes()


def test_protocol2_bytes_and_bytearray_values(tmp_path):
    # Protocols 0-2 spell bytes as _codecs.encode(str, 'latin1') and b"" as bytes().
    obj = {"b": b"\x00\xff abc", "e": b"", "ba": bytearray(b"\x01\x02"), "z": np.zeros(0, np.float32)}
    path = _dump(tmp_path / "p2.pkl", obj, 2)
    names = _globals_of(path.read_bytes())
    assert "_codecs.encode" in names and "__builtin__.bytes" in names
    got = safe_pickle.load(path)
    assert got["b"] == obj["b"] and got["e"] == b"" and got["ba"] == obj["ba"]


@pytest.mark.parametrize(
    "payload, name, message",
    [
        (_Payload(__import__("codecs").encode, "x", "rot13"), "_codecs.encode",
         r"_codecs\.encode is only allowed as encode\(str, 'latin1'\)"),
        (_Payload(bytes, 10), "__builtin__.bytes", r"bytes is only allowed as bytes\(\)"),
    ],
)
def test_allowed_helpers_only_allow_the_pickle_spelling(tmp_path, payload, name, message):
    path = _dump(tmp_path / "odd.pkl", {"x": payload}, 2)
    assert name in _globals_of(path.read_bytes())
    with pytest.raises(fgs.UnsafePickleError, match=r"odd\.pkl: refusing to unpickle: " + message):
        safe_pickle.load(path)


def _rename_globals(data: bytes, renames: dict[bytes, bytes]) -> bytes:
    """Rename modules in a pickle: GLOBAL (protocol <= 3) or STACK_GLOBAL in a
    single frame (protocol 4/5, small pickles), fixing the frame length."""
    if data[2:3] != b"\x95":  # no frame: GLOBAL opcodes, newline-terminated
        for old, new in renames.items():
            assert b"c" + old + b"\n" in data
            data = data.replace(b"c" + old + b"\n", b"c" + new + b"\n")
        return data
    (frame,) = struct.unpack_from("<Q", data, 3)
    assert frame == len(data) - 11  # one frame holding everything
    body = data[11:]
    for old, new in renames.items():
        o, n = bytes([0x8C, len(old)]) + old, bytes([0x8C, len(new)]) + new
        assert o in body
        body = body.replace(o, n)
    return data[:3] + struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy1_module_names_load_without_warning(tmp_path, protocol):
    obj = dict(_table(), s=np.float32(1.5))  # a scalar too: numpy.core.multiarray.scalar
    data = pickle.dumps(obj, protocol=protocol)
    renames = {b"numpy._core.multiarray": b"numpy.core.multiarray"}
    if protocol == 5:
        renames[b"numpy._core.numeric"] = b"numpy.core.numeric"
    data = _rename_globals(data, renames)
    names = _globals_of(data)
    assert not [n for n in names if n.startswith("numpy._core")]
    assert "numpy.core.multiarray.scalar" in names
    if protocol == 5:
        assert "numpy.core.numeric._frombuffer" in names
    else:
        assert "numpy.core.multiarray._reconstruct" in names
    path = tmp_path / "np1.pkl"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy.core access would warn (DeprecationWarning)
        got = safe_pickle.load(path)
    s = got.pop("s")
    assert s == np.float32(1.5) and s.dtype == np.float32
    _check_table(got)


def test_python2_pickle_loads(tmp_path):
    # As written by Python 2 + numpy 1.x: str payloads (SHORT_BINSTRING),
    # numpy.core names, dtype('f4', 0, 1).
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    raw = x.tobytes()
    data = (b"\x80\x02}(U\x01a"
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            b"(K\x01K\x02K\x03\x86cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R"
            b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            b"\x89U" + bytes([len(raw)]) + raw + b"tbu.")
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    got = safe_pickle.load(path)
    assert list(got) == ["a"]
    assert got["a"].dtype == np.float32
    np.testing.assert_array_equal(got["a"], x)
    store = fgs.convert({"x": path}, tmp_path / "out.fgs", progress=False)
    np.testing.assert_array_equal(store.features("x", 0), x)


@pytest.mark.parametrize("protocol", [2, 5])
def test_ordered_dict_top_level(tmp_path, protocol):
    table = collections.OrderedDict((k, np.full((2, 4), i, np.float32)) for i, k in enumerate(["z", "m", "a"]))
    path = _dump(tmp_path / "od.pkl", table, protocol)
    assert "collections.OrderedDict" in _globals_of(path.read_bytes())
    got = safe_pickle.load(path)
    assert type(got) is collections.OrderedDict
    assert list(got) == ["z", "m", "a"]
    store = fgs.convert({"x": path}, tmp_path / "out.fgs", progress=False)
    assert list(store.ids) == ["a", "m", "z"]  # no split: sorted by id
    np.testing.assert_array_equal(store.features("x", 0), np.full((2, 4), 2))


def test_on_read_reports_every_byte(tmp_path):
    path = _dump(tmp_path / "t.pkl", _table())
    seen = []
    _check_table(safe_pickle.load(path, on_read=seen.append))
    assert sum(seen) == path.stat().st_size


# -- malformed pickles -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, what",
    [
        (b"\x80\x04\x8e" + struct.pack("<Q", 2**63) + b"x", "BINBYTES8 length past sys.maxsize"),
        (b"\x80\x05\x96" + struct.pack("<Q", 2**63 + 5) + b"x", "BYTEARRAY8 length past sys.maxsize"),
        (b"\x80\x04\x8d" + struct.pack("<Q", 2**64 - 1), "BINUNICODE8 length past sys.maxsize"),
        (b"\x80\x02]q\x00h\x07.", "memo key that was never stored"),
        (b"\x80\x02I12x\n.", "INT with garbage"),
        (b"\x80\x02K\x01K\x02R.", "REDUCE on an int"),
        (b"\x80\x09.", "unknown protocol"),
        (b"\xff", "unknown opcode"),
        (b"", "empty file"),
    ],
)
def test_malformed_pickle_is_conversion_error(tmp_path, data, what):
    path = tmp_path / "bad.pkl"
    path.write_bytes(data)
    with pytest.raises(fgs.ConversionError, match=r"bad\.pkl: (not a readable pickle|the pickle ends early)"):
        safe_pickle.load(path)


def test_bad_dtype_state_is_refused(tmp_path):
    # A dtype whose pickled flags claim it holds Python objects never reaches
    # numpy (whose own unpickling would fail, or worse: see the hostile pickles below).
    data = pickle.dumps({"a": np.arange(6, dtype=np.float32)}, protocol=4)
    flags = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00"  # ..., alignment, flags=0)
    assert data.count(flags) == 1
    path = tmp_path / "flags.pkl"
    path.write_bytes(data.replace(flags, flags[:-1] + b"\x53"))
    with pytest.raises(fgs.UnsafePickleError, match=r"flags\.pkl: refusing to unpickle: numpy dtype 'f4': "
                                                    r"its state has flags int 83"):
        safe_pickle.load(path)


def test_seeded_mutants_load_and_convert_without_crash(tmp_path):
    # 300 mutants (byte flips, truncations, length fields set to extremes,
    # opcode splices) of FineGym-layout pickles from finegym_store.synth and of
    # the hostile pickles, each written to a file and converted from it in a
    # child process: a crash shows as a signal exit status. The harness checks
    # every outcome: a store, or ConversionError / UnsafePickleError naming the
    # file; anything else (another exception, "ran out of memory" under its
    # address-space cap, over 20 s) is a finding and exit status 1.
    summary = run_fuzz_seeded("fuzz_pickle.py", 20261127, 300, tmp_path)
    outcomes = summary["outcomes"]
    # The mutants exercise every path: refused, malformed, converted, rejected by convert.
    assert outcomes["refused"] > 0 and outcomes["error"] > 0 and outcomes["converted"] > 0
    assert outcomes["convert_error"] > 0
    assert sum(outcomes.values()) == 300


def test_mutated_pickles_raise_only_conversion_error(tmp_path):
    # Seeded random byte mutations: each load succeeds or raises ConversionError.
    rnd = random.Random(20240501)
    table = {f"k{i}": np.arange(24, dtype=np.float32).reshape(2, 12) + i for i in range(3)}
    path = tmp_path / "m.pkl"
    outcomes = collections.Counter()
    for protocol in (2, 3, 5):
        base = pickle.dumps(table, protocol=protocol)
        for _ in range(150):
            data = bytearray(base)
            for _ in range(rnd.randint(1, 4)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
            path.write_bytes(bytes(data))
            try:
                safe_pickle.load(path)
                outcomes["ok"] += 1
            except fgs.ConversionError:
                outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0


# -- hostile pickles ---------------------------------------------------------------------------------
#
# Each is built byte by byte (hand-written opcodes or objects whose __reduce__
# spells the exact calls) and loaded in a child process: several of them
# crash a plain pickle.load (segfault: object pointers made from array bytes,
# or the C stack overflowing while hashing), which must not take pytest down.
# The child's address space is capped, so a memory bomb that got through would
# show as "ran out of memory" instead of the expected refusal.


class _Reduced:
    """Pickles as ``func(*args)`` followed by BUILD ``state`` (if any)."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


_NP_CORE = getattr(np, "_core", None) or np.core


def _dtype(code, order="<", subarray=None, names=None, fields=None, elsize=-1, alignment=-1, flags=0):
    """numpy.dtype(code, False, True) with a BUILD state of our choosing."""
    return _Reduced(np.dtype, (code, False, True), (3, order, subarray, names, fields, elsize, alignment, flags))


def _array(dtype, shape, data, fortran=False):
    """An array as numpy pickles it at protocols 2-4: _reconstruct + BUILD."""
    return _Reduced(_NP_CORE.multiarray._reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, fortran, data))


def _frombuffer(data, dtype, shape, order="C"):
    """An array as numpy pickles it at protocol 5."""
    return _Reduced(_NP_CORE.numeric._frombuffer, (data, dtype, shape, order))


_OBJECT_FIELD = {"a": (_dtype("O8", "|", flags=63), 0)}
_F8 = _dtype("f8")


def _encode_bomb():
    s = "\x01" * 100_000  # one str, memoized, encoded 1000 times
    return pickle.dumps([_Reduced(__import__("codecs").encode, (s, "latin1")) for _ in range(1000)], protocol=2)


def _bytes_reused():
    raw = bytes(8192)  # one bytes object behind 30 arrays (the pickle memoizes it)
    return pickle.dumps({f"k{i}": _array(_dtype("f4"), (2048,), raw) for i in range(30)}, protocol=4)


#: name -> (pickle bytes (a callable), mode, exception, message after "<file>: ",
#: safe_pickle settings for the child). Messages are matched with re.match.
_UNSAFE = "UnsafePickleError"
_CONV = "ConversionError"
_REFUSING = r"refusing to unpickle: "
HOSTILE = {
    # numpy dtypes: an object dtype or field, or a state that lies, never reaches numpy
    "object_dtype_flags_0": (lambda: pickle.dumps({"a": _array(_dtype("O8", "|"), (2,), b"A" * 16)}, 2),
                             "load", _UNSAFE, _REFUSING + r"numpy dtype str 'O8': only c16, .* are allowed"),
    "object_dtype_big_endian": (lambda: pickle.dumps({"a": _array(_dtype("O8", ">", flags=63), (2,), b"A" * 16)}, 4),
                                "load", _UNSAFE, _REFUSING + r"numpy dtype str 'O8'"),
    "object_field_flags_0": (
        lambda: pickle.dumps({"a": _array(_dtype("V8", "|", None, ("a",), _OBJECT_FIELD, 8, 1, 0), (2,), b"A" * 16)}, 2),
        "load", _UNSAFE, _REFUSING + r"numpy dtype str 'V8'"),
    "object_field_big_endian": (
        lambda: pickle.dumps({"a": _array(_dtype("V8", ">", None, ("a",), _OBJECT_FIELD, 8, 1, 63), (2,), b"A" * 16)}, 5),
        "load", _UNSAFE, _REFUSING + r"numpy dtype str 'V8'"),
    "float_dtype_flags_lie_little_endian": (lambda: pickle.dumps({"a": _array(_dtype("f8", "<", flags=63), (2,), b"A" * 16)}, 2),
                                            "load", _UNSAFE, _REFUSING + r"numpy dtype 'f8': its state has flags int 63"),
    "float_dtype_flags_lie_big_endian": (lambda: pickle.dumps({"a": _array(_dtype("f8", ">", flags=1), (2,), b"A" * 16)}, 4),
                                         "load", _UNSAFE, _REFUSING + r"numpy dtype 'f8': its state has flags int 1"),
    "float_dtype_with_fields": (
        lambda: pickle.dumps({"a": _array(_dtype("f8", "<", None, ("a",), {"a": (_F8, 0)}), (2,), b"A" * 16)}, 4),
        "load", _UNSAFE, _REFUSING + r"numpy dtype 'f8': its state has a sub-array, field names or fields"),
    "float_dtype_with_subarray": (
        lambda: pickle.dumps({"a": _array(_dtype("f8", "|", (_F8, (2,))), (1,), b"A" * 16)}, 4),
        "load", _UNSAFE, _REFUSING + r"numpy dtype 'f8': its state has a sub-array"),
    "dtype_state_unknown_version": (
        lambda: pickle.dumps({"a": _array(_Reduced(np.dtype, ("f4", False, True), (9, "<", None, None, None, -1, -1, 0)),
                                          (1,), b"AAAA")}, 4),
        "load", _UNSAFE, _REFUSING + r"numpy dtype 'f4': expected a state \(3, byteorder"),
    "array_state_dtype_not_a_dtype": (lambda: pickle.dumps({"a": _array("f4", (1,), b"AAAA")}, 4),
                                      "load", _UNSAFE, _REFUSING + r"numpy array: dtype str 'f4' is not a plain numeric"),
    "frombuffer_object_dtype": (lambda: pickle.dumps({"a": _frombuffer(bytearray(16), _dtype("O8", "|"), (2,))}, 5),
                                "load", _UNSAFE, _REFUSING + r"numpy dtype str 'O8'"),
    "scalar_object_dtype": (lambda: pickle.dumps({"a": _Reduced(_NP_CORE.multiarray.scalar, (_dtype("O8", "|"), b"A" * 8))}, 4),
                            "load", _UNSAFE, _REFUSING + r"numpy dtype str 'O8'"),
    "object_dtype_via_convert": (lambda: pickle.dumps({"a": _array(_dtype("O8", "|"), (2,), b"A" * 16)}, 2),
                                 "convert", _UNSAFE, _REFUSING + r"numpy dtype str 'O8'"),
    # nesting: refused while building, before anything is hashed
    "tuple_key_nested_1e6_deep": (lambda: b"\x80\x02}K\x00" + b"\x85" * 1_000_000 + b"K\x01s.",
                                  "load", _UNSAFE, _REFUSING + r"containers are nested deeper than 100 levels"),
    "tuple_key_nested_5000_deep": (lambda: b"\x80\x02}K\x00" + b"\x85" * 5000 + b"K\x01s.",
                                   "convert", _UNSAFE, _REFUSING + r"containers are nested deeper than 100 levels"),
    "list_value_nested_5000_deep": (lambda: b"\x80\x02}K\x00" + b"]" * 5000 + b"a" * 4999 + b"s.",
                                    "load", _UNSAFE, _REFUSING + r"containers are nested deeper than 100 levels"),
    "dict_value_nested_5000_deep": (lambda: b"\x80\x02}" + b"K\x00}" * 5000 + b"s" * 5000 + b".",
                                    "load", _UNSAFE, _REFUSING + r"containers are nested deeper than 100 levels"),
    "tuple_key_shallow": (lambda: pickle.dumps({(1, 2): np.zeros(2, np.float32)}, 4),
                          "load", _UNSAFE, _REFUSING + r"a dict key of type tuple: only str, bytes, bool, None"),
    "frozenset_in_frozenset": (lambda: pickle.dumps(frozenset([frozenset([1])]), 4),
                               "load", _UNSAFE, _REFUSING + r"a set member of type frozenset"),
    "colliding_int_keys": (lambda: pickle.dumps({k * (2**61 - 1): 0 for k in range(1, 200)}, 4),
                           "load", _UNSAFE, _REFUSING + r"a dict key of type int: .*ints below 2\*\*61"),
    # memory: nothing is allocated that the file does not hold
    "bytearray_of_1_gib": (lambda: b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.",
                           "load", _UNSAFE, _REFUSING + r"bytearray is only allowed as bytearray\(bytes\)"),
    "list_of_bytearray_of_1_gib": (
        lambda: b"\x80\x02c__builtin__\nlist\nc__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R\x85R.",
        "load", _UNSAFE, _REFUSING + r"bytearray is only allowed as bytearray\(bytes\)"),
    "bytes_of_1_gib": (lambda: b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.",
                       "load", _UNSAFE, _REFUSING + r"bytes is only allowed as bytes\(\)"),
    "uninitialised_ndarray": (lambda: b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85R.",
                              "load", _UNSAFE, _REFUSING + r"calling numpy.ndarray directly"),
    "reconstruct_of_huge_shape": (
        lambda: b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85C\x01b\x87R.",
        "load", _UNSAFE, _REFUSING + r"numpy _reconstruct is only allowed as _reconstruct\(numpy.ndarray, \(0,\), b'b'\)"),
    "scalar_of_huge_void_dtype": (
        lambda: b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x0b\x00\x00\x00V2000000000\x89\x88\x87R\x85R.",
        "load", _UNSAFE, _REFUSING + r"numpy dtype str 'V2000000000'"),
    "scalar_without_data": (lambda: pickle.dumps(_Reduced(_NP_CORE.multiarray.scalar, (np.dtype("f4"),)), 4),
                            "load", _UNSAFE, _REFUSING + r"numpy scalar is only allowed as scalar\(dtype, data\)"),
    "array_shape_beyond_its_data": (lambda: pickle.dumps({"a": _array(_dtype("f4"), (10**9,), b"A" * 16)}, 4),
                                    "load", _CONV, r"not a readable pickle: .*array data holds 16 bytes, but shape "
                                                   r"\(1000000000,\) of float32 needs 4000000000"),
    "frombuffer_shape_beyond_its_data": (lambda: pickle.dumps({"a": _frombuffer(bytearray(8), _dtype("f8"), (2**40,))}, 5),
                                         "load", _CONV, r"not a readable pickle: .*array data holds 8 bytes"),
    "memo_index_of_4_billion": (lambda: b"\x80\x02Nr\xff\xff\xff\xff.",
                                "load", _UNSAFE, _REFUSING + r"it allocates more than \d+ bytes .* a memory bomb"),
    "bytes_of_1_tib_declared": (lambda: b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"x" * 100,
                                "load", _CONV, r"the pickle ends early"),
    "frame_of_1_tib_declared": (lambda: b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N.",
                                "load", _CONV, r"the pickle ends early"),
    "str_of_4_gib_declared": (lambda: b"\x80\x02X\xff\xff\xff\xffabc",
                              "load", _CONV, r"the pickle ends early"),
    "encode_one_str_1000_times": (_encode_bomb, "load", _UNSAFE, _REFUSING + r"it allocates more than .* while building bytes"),
    "empty_set_flood": (lambda: b"\x80\x04" + b"\x8f" * 200_000 + b".", "load", _UNSAFE,
                        _REFUSING + r"it allocates more than \d+ bytes \(4 x the file's 200003 bytes \+ 1 MiB\)",
                        {"ALLOC_SLACK": 1 << 20}),
    "opcode_flood": (lambda: b"\x80\x02" + b"N0" * 50_000 + b"N.", "load", _UNSAFE,
                     _REFUSING + r"it runs more than 7250 opcodes, one per 16 bytes of the file \+ 1000",
                     {"OPS_SLACK": 1000}),
    "one_array_under_5000_keys": (
        lambda: pickle.dumps(dict.fromkeys([f"k{i:04d}" for i in range(5000)], np.ones((12, 2048, 1, 1), np.float32)), 4),
        "convert", _UNSAFE, _REFUSING + r"its arrays, counting every reference to them, hold more bytes than the file's"),
    "one_bytes_behind_30_arrays": (_bytes_reused, "load", _UNSAFE, _REFUSING + r"its arrays, counting every reference"),
}


@pytest.fixture(scope="module")
def hostile_outcomes(tmp_path_factory):
    """Every HOSTILE case run in one child process: name -> outcome dict,
    or the child's exit status for the cases it did not finish."""
    folder = tmp_path_factory.mktemp("hostile")
    cases = []
    for name, (build, mode, *_, patch) in ((n, (*c, {}) if len(c) == 4 else c) for n, c in HOSTILE.items()):
        path = folder / f"{name}.pkl"
        path.write_bytes(build())
        cases.append({"name": name, "path": str(path), "mode": mode, "out": str(folder / f"{name}.fgs"), "patch": patch})
    (folder / "cases.json").write_text(json.dumps(cases))
    child = r"""
import json, os, resource, sys
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # ASan's shadow memory counts against RLIMIT_AS
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30 if hard == resource.RLIM_INFINITY else min(4 << 30, hard), hard))
import finegym_store as fgs
from finegym_store import safe_pickle
for case in json.load(open(sys.argv[1])):
    print(json.dumps({"name": case["name"], "started": True}), flush=True)
    saved = {k: getattr(safe_pickle, k) for k in case["patch"]}
    for k, v in case["patch"].items():
        setattr(safe_pickle, k, v)
    try:
        if case["mode"] == "load":
            safe_pickle.load(case["path"])
        else:
            fgs.convert({"x": case["path"]}, case["out"], progress=False)
        out = {"type": None}
    except Exception as e:
        out = {"type": type(e).__name__, "message": str(e), "conversion_error": isinstance(e, fgs.ConversionError)}
    for k, v in saved.items():
        setattr(safe_pickle, k, v)
    print(json.dumps(dict(out, name=case["name"])), flush=True)
"""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", child, str(folder / "cases.json")], capture_output=True, text=True,
                          timeout=600, cwd=CHILD_CWD, env=env)
    outcomes = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if "started" not in record:
            outcomes[record["name"]] = record
    return outcomes, proc, {c["name"]: c for c in cases}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_pickle_is_refused_without_crash(hostile_outcomes, name):
    outcomes, proc, cases = hostile_outcomes
    if name not in outcomes:
        started = [json.loads(x)["name"] for x in proc.stdout.splitlines() if '"started"' in x]
        pytest.fail(f"the child process did not finish case {name!r}: exit status {proc.returncode} "
                    f"(negative = killed by that signal) after starting {started[-1:]}\n{proc.stderr[-3000:]}")
    got = outcomes[name]
    _, mode, exc, message, *_ = HOSTILE[name]
    assert got["type"] == exc, got
    assert got["conversion_error"], got
    path = cases[name]["path"]
    assert re.match(re.escape(path) + ": " + message, got["message"]), got["message"]
    if mode == "convert":
        assert not os.path.exists(cases[name]["out"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_hostile_pickles_crash_or_misbehave_when_trusted(tmp_path):
    # The cases above are real threats, not just odd inputs: a plain
    # pickle.load of the first dies by a signal (numpy frees object pointers
    # made of array bytes), of the second by a C stack overflow or RecursionError.
    results = {}
    for name in ("object_dtype_flags_0", "tuple_key_nested_1e6_deep"):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(HOSTILE[name][0]())
        proc = subprocess.run([sys.executable, "-c", f"import pickle; d = pickle.load(open({str(path)!r}, 'rb')); "
                               "print(repr(d)[:1000]); del d"],
                              capture_output=True, text=True, timeout=120, cwd=CHILD_CWD)
        results[name] = proc.returncode
    assert results["object_dtype_flags_0"] != 0
    assert results["tuple_key_nested_1e6_deep"] != 0


def test_dimension_beyond_int64_is_conversion_error(tmp_path):
    path = tmp_path / "dims.pkl"
    path.write_bytes(pickle.dumps({"a": _array(_dtype("f4"), (0, 10**5000), b"")}, 4))
    with pytest.raises(fgs.ConversionError, match=r"dims\.pkl: not a readable pickle: .*shape must be a tuple of "
                                                  r"at most 32 ints in \[0, 2\*\*63\), got tuple"):
        safe_pickle.load(path)


@pytest.mark.parametrize("protocol", [2, 5])
def test_arrays_keep_byte_order_layout_and_values(tmp_path, protocol):
    rng = np.random.default_rng(9)
    table = {
        "be": rng.standard_normal((3, 4)).astype(">f8"),
        "f": np.asfortranarray(rng.standard_normal((5, 2)).astype(np.float32)),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::3],  # _reconstruct even at protocol 5
        "i": np.arange(-4, 4, dtype=np.int16),
        "c": (rng.standard_normal(3) + 1j).astype(np.complex64),
        "empty": np.zeros((0, 7), np.float16),
        "zero_d": np.array(2.5, np.float64),
    }
    got = safe_pickle.load(_dump(tmp_path / "t.pkl", table, protocol))
    assert list(got) == list(table)
    for k, want in table.items():
        assert got[k].dtype == want.dtype, k  # '>f8' stays big-endian
        assert got[k].shape == want.shape, k
        assert got[k].tobytes(order="A") == want.tobytes(order="A") or np.array_equal(got[k], want), k
        np.testing.assert_array_equal(got[k], want)
    assert got["f"].flags.f_contiguous


def test_python2_ordered_dict_and_protocol0_text(tmp_path):
    # Python 2 pickles an OrderedDict as OrderedDict([[key, value], ...]).
    x = np.arange(4, dtype="<f4")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
             b"(K\x01K\x04\x85cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R"
             b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89U\x10" + x.tobytes() + b"tb")
    data = (b"\x80\x02ccollections\nOrderedDict\n]"  # OrderedDict([
            b"(U\x01b" + array + b"la"                   #   ['b', array],
            b"(U\x01aK\x07la"                            #   ['a', 7]
            b"\x85R.")                                    # ])
    path = tmp_path / "od2.pkl"
    path.write_bytes(data)
    got = safe_pickle.load(path)
    assert type(got) is collections.OrderedDict and list(got) == ["b", "a"]
    np.testing.assert_array_equal(got["b"], x)
    assert got["a"] == 7


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x80\x04\x95" + struct.pack("<Q", 11) + b"N\x95" + struct.pack("<Q", 1) + b"..",
         "beginning of a new frame before end of current frame"),
        (b"\x80\x04\x95" + struct.pack("<Q", 3) + b"\x8c\x03abc.", "pickle exhausted before end of frame"),
        (b"\x80\x02]]a]\x85h\x00a.", "memo key 0 was never stored"),
        (b"\x80\x02]q\x00h\x00h\x00a.", ""),
    ],
)
def test_frames_and_memo(tmp_path, data, message):
    path = tmp_path / "f.pkl"
    path.write_bytes(data)
    if not message:  # a list appended into itself: a cycle, refused
        with pytest.raises(fgs.UnsafePickleError, match=r"f\.pkl: refusing to unpickle: a list contains itself"):
            safe_pickle.load(path)
        return
    with pytest.raises(fgs.ConversionError, match=rf"f\.pkl: not a readable pickle: .*{message}"):
        safe_pickle.load(path)


def test_placeholders_never_leak_into_results(tmp_path):
    # A global may only be called; a tuple holding one only serve as arguments.
    cases = {
        "global_as_value": b"\x80\x02}U\x01acnumpy\nndarray\ns.",
        "global_in_list": b"\x80\x02]cnumpy\nndarray\na.",
        "tainted_tuple_as_value": b"\x80\x02}U\x01acnumpy\nndarray\n\x85s.",
        "global_as_result": b"\x80\x02cnumpy\ndtype\n.",
        "unbuilt_array": b"\x80\x02}U\x01acnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87Rs.",
    }
    expected = {
        "global_as_value": r"the global numpy\.ndarray is used as a value",
        "global_in_list": r"the global numpy\.ndarray is used as a value",
        "tainted_tuple_as_value": r"a tuple holding the global of a call",
        "global_as_result": r"the pickle's result is global numpy\.dtype",
        "unbuilt_array": r"a numpy array is used before its state \(BUILD\) arrived",
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        with pytest.raises(fgs.UnsafePickleError, match=rf"{name}\.pkl: refusing to unpickle: {expected[name]}"):
            safe_pickle.load(path)


def test_mutating_a_nested_container_is_refused(tmp_path):
    # [a] nested in b, then a appended to: the depth recorded for b would be
    # stale, so containers are frozen once nested.
    path = tmp_path / "late.pkl"
    path.write_bytes(b"\x80\x02]q\x00]h\x00ah\x00K\x01a.")
    with pytest.raises(fgs.UnsafePickleError, match=r"late\.pkl: refusing to unpickle: APPEND modifies a list "
                                                    r"after it was nested"):
        safe_pickle.load(path)


def test_refused_opcodes(tmp_path):
    for name, data in {"INST": b"(i__builtin__\nlist\n.", "OBJ": b"(c__builtin__\nlist\no.",
                       "NEWOBJ": b"\x80\x02c__builtin__\nlist\n)\x81.", "EXT1": b"\x80\x02\x82\x01.",
                       "PERSID": b"Pabc\n.", "NEXT_BUFFER": b"\x80\x05\x97."}.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        with pytest.raises(fgs.UnsafePickleError, match=rf"refusing to unpickle: the {name} opcode"):
            safe_pickle.load(path)


@pytest.mark.parametrize("protocol", [4, 5])
def test_many_frames_and_large_out_of_frame_data(tmp_path, protocol):
    # Protocol 4+ frames small opcodes in 64 KiB frames and writes large data
    # outside them; a FineGym-layout table from synth spans many of each.
    from finegym_store import synth

    ids = synth.make_ids(40, seed=2)
    table = synth.make_features(ids, synth.long_tailed_labels(40, 5, seed=2), (12, 256, 1, 1), seed=2)
    table[ids[0]] = np.ones((12, 4096, 1, 1), np.float32)  # 192 KiB: outside any frame
    path = tmp_path / "frames.pkl"
    synth.write_pickle(path, table, protocol=protocol)
    frames = sum(op.name == "FRAME" for op, _, _ in pickletools.genops(path.read_bytes()))
    assert frames > 5
    want = pickle.loads(path.read_bytes())  # the reference unpickler
    got = safe_pickle.load(path)
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert got[k].tobytes() == want[k].tobytes()


def test_python2_protocol0_pickle_loads_like_pickle(tmp_path):
    # Python 2's text protocol: escaped STRING payload, PUT/GET, INT flags
    # spelled I00/I01, a long spelled L3L.
    x = np.arange(3, dtype="<f4")
    escaped = "".join(f"\\x{b:02x}" for b in x.tobytes()).encode()
    data = (b"(dp0\nS'k'\np1\ncnumpy.core.multiarray\n_reconstruct\np2\n(cnumpy\nndarray\np3\n(I0\ntp4\nS'b'\np5\n"
            b"tp6\nRp7\n(I1\n(L3L\ntp8\ncnumpy\ndtype\np9\n(S'f4'\np10\nI0\nI1\ntp11\nRp12\n(I3\nS'<'\np13\nNNNI-1\n"
            b"I-1\nI0\ntp14\nbI00\nS'" + escaped + b"'\np15\ntp16\nbs.")
    path = tmp_path / "py2p0.pkl"
    path.write_bytes(data)
    want = pickle.loads(data, encoding="latin1")  # the reference unpickler
    got = safe_pickle.load(path)
    assert list(got) == list(want) == ["k"]
    assert got["k"].dtype == want["k"].dtype == np.float32
    assert got["k"].tobytes() == want["k"].tobytes() == x.tobytes()


# -- what becomes ConversionError, and what does not ------------------------------------------


@pytest.mark.parametrize("data, cause", [
    (b"I12x\n.", ValueError),             # INT with a non-number
    (b"F1.2.3\n.", ValueError),           # FLOAT with a non-number
    (b"X\x02\x00\x00\x00\xff\xfe.", UnicodeDecodeError),  # BINUNICODE that is not UTF-8
    (b"cnumpy\xff\ndtype\n.", UnicodeDecodeError),         # GLOBAL with a non-UTF-8 module
    (b"S'\\x4'\n.", ValueError),          # STRING with a bad escape
])
def test_malformed_input_is_conversion_error_chained(data, cause):
    with pytest.raises(fgs.ConversionError, match=r"^<in>: not a readable pickle") as info:
        safe_pickle._load_stream(__import__("io").BytesIO(data), len(data), "<in>")
    malformed = info.value.__cause__
    assert isinstance(malformed, safe_pickle._Malformed)
    assert isinstance(malformed.__cause__, cause)


@pytest.mark.parametrize("data", [b"K\x01K\x02s.", b"K\x01a.", b"(e.", b"(\x90."])
def test_container_ops_on_an_empty_stack_are_malformed(data):
    # SETITEM / APPEND / APPENDS / ADDITEMS whose target is missing.
    with pytest.raises(fgs.ConversionError) as info:
        safe_pickle._load_stream(__import__("io").BytesIO(data), len(data), "<in>")
    assert isinstance(info.value.__cause__, (safe_pickle._Malformed, EOFError))


def test_a_bug_in_the_loader_is_not_reported_as_a_bad_pickle(monkeypatch):
    # An exception that is not about the input (here a KeyError planted in
    # an opcode handler) must propagate, not turn into "not a readable pickle".
    def broken(self):
        raise KeyError("planted")

    monkeypatch.setattr(safe_pickle._Machine, "op_empty_dict", broken)
    data = pickle.dumps({}, protocol=4)
    with pytest.raises(KeyError, match="planted"):
        safe_pickle._load_stream(__import__("io").BytesIO(data), len(data), "<in>")
