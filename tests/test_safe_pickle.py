"""The allow-list unpickler: malicious pickles are refused before any code
runs; every pickle flavour of plain numpy arrays loads, quietly."""

from __future__ import annotations

import builtins
import collections
import datetime
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

from conftest import CHILD_CWD


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
        fgs.convert(out, {"x": path}, progress=False)
    assert not marker.exists()
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["evil.pkl"]


def test_convert_refuses_malicious_second_column(tmp_path):
    marker = tmp_path / "pwned"
    good = _dump(tmp_path / "good.pkl", {"a": np.zeros((2, 3), np.float32)})
    evil = _dump(tmp_path / "evil.pkl", {"a": _payloads(marker)["subprocess.call"]})
    with pytest.raises(fgs.UnsafePickleError, match=r"evil\.pkl.*'subprocess\.call'"):
        fgs.convert(tmp_path / "out.fgs", {"x": good, "y": evil}, progress=False)
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
        fgs.convert(tmp_path / "out.fgs", {"x": path}, progress=False)
    assert not (tmp_path / "out.fgs").exists()
    store = fgs.convert(tmp_path / "out.fgs", {"x": path}, trust_pickle=True, progress=False)
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
    store = fgs.convert(tmp_path / "out.fgs", {"x": path}, progress=False)
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
    store = fgs.convert(tmp_path / "out.fgs", {"x": path}, progress=False)
    np.testing.assert_array_equal(store.features("x", 0), x)


@pytest.mark.parametrize("protocol", [2, 5])
def test_ordered_dict_top_level(tmp_path, protocol):
    table = collections.OrderedDict((k, np.full((2, 4), i, np.float32)) for i, k in enumerate(["z", "m", "a"]))
    path = _dump(tmp_path / "od.pkl", table, protocol)
    assert "collections.OrderedDict" in _globals_of(path.read_bytes())
    got = safe_pickle.load(path)
    assert type(got) is collections.OrderedDict
    assert list(got) == ["z", "m", "a"]
    store = fgs.convert(tmp_path / "out.fgs", {"x": path}, progress=False)
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
