"""Unpickling FineGym feature pickles without trusting them.

A pickle is a program: it can call any importable function, hand numpy a
dtype state that turns array bytes into object pointers, nest containers
until hashing them overflows the C stack, or ask for gigabytes with a few
bytes. So untrusted pickles never reach ``pickle.Unpickler`` or numpy's own
unpickling code. This module runs the pickle opcodes itself, in a small
virtual machine that:

* resolves only the globals in ``ALLOWED_GLOBALS``, and to *placeholders*:
  calling one (REDUCE) runs our own code, which accepts exactly the calls
  numpy and Python write for plain arrays, scalars, bytes, sets and
  OrderedDicts, and refuses anything else (``bytearray(10**10)``, calling
  ``numpy.ndarray`` directly, an object or structured dtype, ...);
* builds arrays only from validated primitives: a plain numeric dtype that
  we construct from its code (``'f4'``, ``'i8'``, ...) and byte order, never
  from the pickled dtype state; a shape of non-negative ints; and data bytes
  present in the file whose length is exactly ``prod(shape) * itemsize``
  (``np.frombuffer(...).reshape(...)``, no copy);
* limits nesting: no container may hold containers more than ``MAX_DEPTH``
  levels deep, and dict keys and set members must be str, bytes, bool, None
  or an int below 2**61 (whose hashes are flat and do not collide), so no
  deep or adversarially colliding object is ever hashed;
* bounds memory: everything the opcodes create, copy or reserve is charged
  against ``ALLOC_FACTOR`` times the file's size plus ``ALLOC_SLACK``, every
  length field is checked against the bytes left in the file before it is
  read, and the arrays the result refers to may hold, counting every
  reference (one array under 5000 keys counts 5000 times), no more bytes
  than the file itself;
* bounds time: at most one opcode per ``OPS_PER_BYTE`` bytes of the file plus
  ``OPS_SLACK``, each doing work linear in the data it consumes (no text
  number longer than 200 digits, no hash collisions, no quadratic copies).

Arrays are views of the bytes read from the file: read-only, except those a
protocol-5 pickle stored as a bytearray. Results never contain a placeholder:
a global may only be called, and a tuple holding one only used as arguments.

A refused construct raises UnsafePickleError, a malformed or truncated pickle
ConversionError; both name the file. ``trust=True`` is plain ``pickle.load``.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import struct
import sys
from collections import OrderedDict
from typing import Any, BinaryIO, Callable

import numpy as np

from .errors import ConversionError, UnsafePickleError

__all__ = ["load", "ALLOWED_GLOBALS", "MAX_DEPTH", "ALLOC_FACTOR", "ALLOC_SLACK", "OPS_PER_BYTE", "OPS_SLACK"]

#: Deepest nesting of containers (tuples, lists, dicts, sets) accepted. A
#: feature pickle needs 3 (dict -> array state tuple -> shape tuple).
MAX_DEPTH = 100
#: Memory budget of one load: ALLOC_FACTOR * file size + ALLOC_SLACK bytes.
#: Feature pickles need about 1x (2x for protocol 0-2 pickles, whose array
#: bytes arrive as text and are encoded once).
ALLOC_FACTOR = 4
ALLOC_SLACK = 64 << 20

#: Opcodes one load may run: the file's size / OPS_PER_BYTE + OPS_SLACK. A
#: feature pickle runs about 45 per array, one per 1,000+ bytes; the limit
#: bounds the time a hostile file of tiny opcodes can take (pure Python).
OPS_PER_BYTE = 16
OPS_SLACK = 2_000_000

_MAX_DIMS = 32  # numpy 1.x's limit
_HASH_SAFE_INT = (1 << 61) - 1  # ints below this hash to themselves: no collisions
_MAX_NUMBER_LINE = 200  # longest INT/LONG/FLOAT/GET/PUT text argument (protocol 0)
_SLOT = 8  # bytes per stack, memo or container slot
_REGISTRY_ENTRY = 128  # bookkeeping per tracked container

#: The numeric dtypes an array or scalar may have: nothing that can hold
#: Python objects, fields or sub-arrays, and nothing platform-dependent.
_DTYPE_CODES = frozenset(
    ["f2", "f4", "f8", "c8", "c16", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"]
)

_TRUST_HINT = (
    "only numpy arrays of plain numeric dtypes in plain containers are allowed. If you trust "
    "this file, pass trust_pickle=True."
)


class _Refused(Exception):
    """The pickle asks for something this loader will not do (UnsafePickleError)."""


class _Malformed(pickle.UnpicklingError):
    """The pickle is not a well-formed pickle (ConversionError)."""


def _parse(convert: Callable[..., Any], *args: Any) -> Any:
    """``convert(*args)`` (int(), float(), str(), a codec) on bytes or text
    taken from the file: the ValueError (UnicodeError included) that
    malformed input raises there becomes _Malformed, chained."""
    try:
        return convert(*args)
    except ValueError as e:
        raise _Malformed(f"{e}") from e


def _describe(x: Any) -> str:
    """A short description of an unpickled value for messages (never a full
    repr: values may be huge or deeply nested)."""
    t = type(x)
    if t in (str, bytes) and len(x) <= 40:
        return f"{t.__name__} {x!r}"
    if t is int and abs(x) < 10**20:
        return f"int {x}"
    if t in (bool, type(None)):
        return repr(x)
    if t is _Global:
        return f"global {x.name}"
    if t is _Stub:
        return x.what
    return t.__name__


# -- placeholders -----------------------------------------------------------------------------------


class _Global:
    """What an allowed global resolves to: a name and our own implementation
    of the calls we accept (REDUCE hands it the argument tuple)."""

    __slots__ = ("name", "call")

    def __init__(self, name: str, call: Callable[[_Machine, tuple], Any]) -> None:
        self.name = name
        self.call = call

    def __repr__(self) -> str:
        return f"<placeholder for {self.name}>"


class _Stub:
    """An array or dtype whose state (BUILD) has not arrived yet."""

    __slots__ = ("what", "code", "value")

    def __init__(self, what: str, code: str = "") -> None:
        self.what = what  # "numpy array" or "numpy dtype"
        self.code = code  # dtype code, for a dtype
        self.value: Any = None  # the array or dtype, once built


def _check_dtype(vm: _Machine, dtype: Any, where: str) -> np.dtype:
    # The only np.dtype objects in the machine are ones we built from a code
    # in _DTYPE_CODES; checked again all the same.
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.fields is not None \
            or dtype.subdtype is not None or f"{dtype.kind}{dtype.itemsize}" not in _DTYPE_CODES:
        vm.refuse(f"{where}: dtype {_describe(dtype)} is not a plain numeric numpy dtype")
    return dtype


def _array(vm: _Machine, raw: Any, dtype: Any, shape: Any, fortran: bool, where: str) -> np.ndarray:
    """An array over ``raw`` (bytes present in the file), after checking
    every primitive. No numpy pickle code runs."""
    dtype = _check_dtype(vm, dtype, where)
    if type(shape) is not tuple or len(shape) > _MAX_DIMS or \
            not all(type(d) is int and 0 <= d < 1 << 63 for d in shape):
        raise _Malformed(f"{where}: shape must be a tuple of at most {_MAX_DIMS} ints in [0, 2**63), "
                         f"got {_describe(shape)}")
    if type(raw) is str:  # Python 2 str or protocol 0-2 text, decoded as latin1
        vm.charge(sys.getsizeof(raw), "array data")
        raw = _parse(str.encode, raw, "latin1")
    if type(raw) not in (bytes, bytearray):
        vm.refuse(f"{where}: array data must be bytes, got {_describe(raw)}")
    size = math.prod(shape)
    if size * dtype.itemsize != len(raw):
        raise _Malformed(f"{where}: array data holds {len(raw)} bytes, but shape {shape} of "
                         f"{dtype} needs {size * dtype.itemsize}")
    if size == 0 and math.prod(max(d, 1) for d in shape) * dtype.itemsize > 1 << 32:
        raise _Malformed(f"{where}: empty array of implausible shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _flag(x: Any) -> bool:
    if type(x) not in (bool, int) or x not in (0, 1):
        raise _Malformed(f"expected a boolean flag, got {_describe(x)}")
    return bool(x)


def _g_reconstruct(vm: _Machine, args: tuple) -> _Stub:
    # numpy writes _reconstruct(ndarray, (0,), b'b') and then BUILDs the state.
    ok = len(args) == 3 and args[0] is _NDARRAY and type(args[1]) is tuple and len(args[1]) == 1 \
        and type(args[1][0]) is int and args[1][0] == 0 and type(args[2]) in (bytes, str) and args[2] in (b"b", "b")
    if not ok:
        vm.refuse("numpy _reconstruct is only allowed as _reconstruct(numpy.ndarray, (0,), b'b')")
    return _Stub("numpy array")


def _g_ndarray(vm: _Machine, args: tuple) -> Any:
    vm.refuse("calling numpy.ndarray directly (it allocates memory that the file does not hold)")


def _g_dtype(vm: _Machine, args: tuple) -> _Stub:
    # numpy writes dtype('f4', False, True) and then BUILDs the state.
    if not 1 <= len(args) <= 3:
        raise _Malformed(f"numpy.dtype takes 1 to 3 arguments, got {len(args)}")
    code = args[0]
    if type(code) is bytes:
        code = code.decode("latin1")
    if type(code) is not str or code not in _DTYPE_CODES:
        vm.refuse(f"numpy dtype {_describe(code)}: only {', '.join(sorted(_DTYPE_CODES))} are allowed")
    for flag in args[1:]:
        _flag(flag)
    return _Stub("numpy dtype", code)


def _build_dtype(vm: _Machine, stub: _Stub, state: Any) -> np.dtype:
    # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])
    if type(state) is not tuple or len(state) not in (8, 9) or type(state[0]) is not int \
            or state[0] != (3 if len(state) == 8 else 4):
        vm.refuse(f"numpy dtype {stub.code!r}: expected a state (3, byteorder, None, None, None, -1, -1, 0), "
                  f"got {_describe(state)} of length {len(state) if type(state) is tuple else '-'}")
    _, order, subarray, names, fields, elsize, alignment, flags = state[:8]
    itemsize = int(stub.code[1:])
    problems = []
    if type(order) is not str or order not in ("<", ">", "=", "|"):
        problems.append(f"byte order {_describe(order)}")
    if subarray is not None or names is not None or fields is not None:
        problems.append("a sub-array, field names or fields")
    if type(elsize) is not int or elsize not in (-1, itemsize):
        problems.append(f"element size {_describe(elsize)}")
    if type(alignment) is not int or alignment not in (-1, 1, 2, 4, 8, 16):
        problems.append(f"alignment {_describe(alignment)}")
    if type(flags) is not int or flags != 0:
        problems.append(f"flags {_describe(flags)} (a plain numeric dtype has flags 0)")
    if len(state) == 9 and state[8] is not None:
        problems.append("metadata")
    if problems:
        vm.refuse(f"numpy dtype {stub.code!r}: its state has " + "; ".join(problems))
    if itemsize == 1 or order in ("=", "|"):
        order = "="
    return np.dtype(order + stub.code)


def _build_array(vm: _Machine, stub: _Stub, state: Any) -> np.ndarray:
    # (version, shape, dtype, is_fortran, data); version 0 has no version.
    if type(state) is tuple and len(state) == 5:
        if type(state[0]) is not int or state[0] != 1:
            raise _Malformed(f"numpy array state of unknown version {_describe(state[0])}")
        state = state[1:]
    if type(state) is not tuple or len(state) != 4:
        raise _Malformed(f"expected a numpy array state (1, shape, dtype, is_fortran, data), got {_describe(state)}")
    shape, dtype, fortran, raw = state
    return _array(vm, raw, dtype, shape, _flag(fortran), "numpy array")


def _g_frombuffer(vm: _Machine, args: tuple) -> np.ndarray:
    # numpy >= 1.16 at protocol 5: _frombuffer(buffer, dtype, shape, order).
    if len(args) != 4 or type(args[3]) is not str or args[3] not in ("C", "F"):
        vm.refuse("numpy _frombuffer is only allowed as _frombuffer(data, dtype, shape, 'C' or 'F')")
    raw, dtype, shape, order = args
    return _array(vm, raw, dtype, shape, order == "F", "numpy array")


def _g_scalar(vm: _Machine, args: tuple) -> Any:
    # numpy writes scalar(dtype, bytes of exactly one item).
    if len(args) != 2:
        vm.refuse("numpy scalar is only allowed as scalar(dtype, data)")
    dtype = _check_dtype(vm, args[0], "numpy scalar")
    data = args[1]
    if type(data) is str:
        data = _parse(str.encode, data, "latin1")
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise _Malformed(f"numpy scalar of {dtype}: expected {dtype.itemsize} data bytes, got {_describe(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def _g_encode(vm: _Machine, args: tuple) -> bytes:
    # Python 3 writes bytes into protocol 0-2 pickles as encode(str, 'latin1').
    texts = len(args) in (2, 3) and all(type(a) is str for a in args)
    if not texts or args[1] not in ("latin1", "latin-1") or args[2:] not in ((), ("strict",)):
        vm.refuse("_codecs.encode is only allowed as encode(str, 'latin1')")
    vm.charge(len(args[0]) + 33, "bytes")
    return _parse(str.encode, args[0], "latin1")


def _g_bytes(vm: _Machine, args: tuple) -> bytes:
    # ... and an empty bytes object as bytes().
    if args:
        vm.refuse("bytes is only allowed as bytes() (b''): bytes(n) allocates data the file does not hold")
    return b""


def _g_bytearray(vm: _Machine, args: tuple) -> bytearray:
    # Protocols 2-4 write bytearray(bytes) (Python 2: bytearray(str, 'latin-1')).
    if not args:
        return bytearray()
    if len(args) == 1 and type(args[0]) in (bytes, bytearray):
        data: Any = args[0]
    elif len(args) == 2 and type(args[0]) is str and type(args[1]) is str and args[1] in ("latin-1", "latin1"):
        data = _parse(str.encode, args[0], "latin1")
    else:
        vm.refuse("bytearray is only allowed as bytearray(bytes): bytearray(n) allocates data the file does not hold")
    vm.charge(len(data) + 57, "bytearray")
    return bytearray(data)


def _container_call(kind: type) -> Callable[[_Machine, tuple], Any]:
    # set([...]) and frozenset([...]) (protocols 0-3), OrderedDict() (any
    # protocol; Python 2: OrderedDict([[k, v], ...])), and the other
    # constructors from a list or tuple the file spelled out.
    def call(vm: _Machine, args: tuple) -> Any:
        if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
            vm.refuse(f"{kind.__name__} is only allowed with no argument or a list or tuple, "
                      f"got {', '.join(_describe(a) for a in args)}")
        items = args[0] if args else ()
        if kind in (dict, OrderedDict):
            pairs = []
            for pair in items:
                if type(pair) not in (list, tuple) or len(pair) != 2:
                    raise _Malformed(f"{kind.__name__}(items): expected key-value pairs, got {_describe(pair)}")
                pairs.extend(pair)
            return vm.new_dict(pairs, kind)
        return vm.new_container(kind, list(items))
    return call


_NDARRAY = _Global("numpy.ndarray", _g_ndarray)

_GLOBALS: dict[tuple[str, str], _Global] = {}
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x / numpy 2 names
    _GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _Global(f"{_core}.multiarray._reconstruct", _g_reconstruct)
    _GLOBALS[(f"{_core}.multiarray", "scalar")] = _Global(f"{_core}.multiarray.scalar", _g_scalar)
    _GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _Global(f"{_core}.numeric._frombuffer", _g_frombuffer)
_GLOBALS[("numpy", "ndarray")] = _NDARRAY
_GLOBALS[("numpy", "dtype")] = _Global("numpy.dtype", _g_dtype)
_GLOBALS[("collections", "OrderedDict")] = _Global("collections.OrderedDict", _container_call(OrderedDict))
_GLOBALS[("_codecs", "encode")] = _Global("_codecs.encode", _g_encode)
for _builtins in ("builtins", "__builtin__"):  # __builtin__: Python 2 and protocol 0-2 pickles
    _GLOBALS[(_builtins, "bytes")] = _Global(f"{_builtins}.bytes", _g_bytes)
    _GLOBALS[(_builtins, "bytearray")] = _Global(f"{_builtins}.bytearray", _g_bytearray)
    for _kind in (dict, list, tuple, set, frozenset):
        _GLOBALS[(_builtins, _kind.__name__)] = _Global(f"{_builtins}.{_kind.__name__}", _container_call(_kind))

#: The (module, name) globals a pickle may refer to.
ALLOWED_GLOBALS = frozenset(_GLOBALS)

_CONTAINERS = frozenset([list, tuple, dict, set, frozenset, OrderedDict])
_MUTABLE = frozenset([list, dict, set, OrderedDict])
_DICTS = (dict, OrderedDict)
_CACHED = frozenset([type(None), bool])
_PLAIN = frozenset([type(None), bool, int, float, str, bytes, bytearray, complex])  # no placeholders, no nesting
_HOLE = object()  # a memo index that was never stored


# -- input ------------------------------------------------------------------------------------------


class _Input:
    """The pickle's bytes. Every length is checked against what is left of
    the file before anything is read or allocated. Frames (protocol 4+) are
    checked, not buffered: a read may not cross the end of the current frame,
    and data is read straight from the file, without a copy per frame."""

    _REPORT = 1 << 20  # progress is reported in steps of at least 1 MiB

    def __init__(self, f: BinaryIO, size: int, on_read: Callable[[int], None] | None) -> None:
        self._f: Any = f  # a buffered binary file: read, readinto, readline
        self._size = size
        self.pos = 0
        self._on_read = on_read
        self._reported = 0
        self._frame_end = -1  # end of the current frame, -1 outside frames
        self._limit = size  # reads up to here need no further check

    @property
    def left(self) -> int:
        """Bytes of the file not read yet."""
        return self._size - self.pos

    def _progress(self) -> None:
        if self._on_read is not None and self.pos - self._reported >= self._REPORT:
            self._on_read(self.pos - self._reported)
            self._reported = self.pos

    def finish(self) -> None:
        """Report the rest of the file as read (bytes after STOP included)."""
        if self._on_read is not None and self._size > self._reported:
            self._on_read(self._size - self._reported)
            self._reported = self._size

    def _cross(self, end: int) -> None:
        # A read that ends past the current frame or the file.
        if self._frame_end >= 0 and end > self._frame_end:
            if self.pos != self._frame_end:
                raise _Malformed("pickle exhausted before end of frame")
            self._frame_end = -1  # the frame is done; this read follows it
            self._limit = self._size
        if end > self._size:
            raise EOFError

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end > self._limit:
            self._cross(end)
        data = self._f.read(n)
        if len(data) != n:
            raise EOFError
        self.pos = end
        if n > 64:
            self._progress()
        return data

    def read_bytearray(self, n: int) -> bytearray:
        """n bytes into a new bytearray, without an intermediate bytes copy."""
        end = self.pos + n
        if end > self._limit:
            self._cross(end)
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._f.readinto(view[got:])
            if not k:
                raise EOFError
            got += k
        view.release()
        self.pos = end
        self._progress()
        return buf

    def readline(self) -> bytes:
        if self.pos == self._frame_end:
            self._cross(self.pos + 1)  # the frame is done
        line = self._f.readline(self._limit - self.pos)
        self.pos += len(line)
        self._progress()
        if not line.endswith(b"\n"):
            if self.pos == self._frame_end and self.pos < self._size:
                raise _Malformed("pickle exhausted before end of frame")
            raise EOFError
        return line

    def frame(self, n: int) -> None:
        if self._frame_end >= 0 and self.pos != self._frame_end:
            raise _Malformed("beginning of a new frame before end of current frame")
        if self.pos + n > self._size:
            raise EOFError
        self._frame_end = self._limit = self.pos + n


# -- the machine ----------------------------------------------------------------------------------


class _Machine:
    def __init__(self, inp: _Input, source: str, size: int) -> None:
        self._in = inp
        self._source = source
        self._size = size
        self._budget = ALLOC_FACTOR * size + ALLOC_SLACK
        self._array_bytes_left = size
        self._stack: list[Any] = []
        self._result: Any = None  # what STOP found on the stack
        self._meta: list[list[Any]] = []
        self._memo: list[Any] = []
        # id -> [container, depth, frozen, tainted] for every container that
        # is nested, holds containers or holds a placeholder; the entry keeps
        # the container alive, so its id stays its own.
        self._reg: dict[int, list[Any]] = {}
        self._dispatch: list[Callable[[], bool] | None] = [None] * 256
        for code, name in _OPCODES.items():
            self._dispatch[code] = getattr(self, name)

    # errors and accounting

    def refuse(self, what: str) -> Any:
        raise _Refused(what)

    def charge(self, n: int, what: str) -> None:
        self._budget -= n
        if self._budget < 0:
            limit = ALLOC_FACTOR * self._size + ALLOC_SLACK
            self.refuse(f"it allocates more than {limit} bytes ({ALLOC_FACTOR} x the file's {self._size} bytes "
                        f"+ {ALLOC_SLACK >> 20} MiB) while building {what}: a memory bomb?")

    def _array_reference(self, a: np.ndarray) -> None:
        self._array_bytes_left -= a.nbytes
        if self._array_bytes_left < 0:
            self.refuse(f"its arrays, counting every reference to them, hold more bytes than the file's "
                        f"{self._size}: an array is shared under several keys (it would be written once per key)")

    def _push(self, x: Any) -> bool:
        t = type(x)
        if t in _CACHED or (t is int and -5 <= x <= 256):
            self._budget -= _SLOT
        else:
            self._budget -= _SLOT + sys.getsizeof(x)
        if self._budget < 0:
            self.charge(0, t.__name__)  # raises
        self._stack.append(x)
        return False

    # containers: resolution of placeholders, nesting depth, hashing

    def _resolve(self, x: Any) -> Any:
        if type(x) is _Stub:
            if x.value is None:
                self.refuse(f"a {x.what} is used before its state (BUILD) arrived")
            return x.value
        return x

    def _take(self, x: Any, into: str) -> tuple[Any, int, bool]:
        """x as it goes into a container (into: 'tuple', 'list', 'dict',
        'set', 'key'): (resolved x, its depth, whether it holds placeholders)."""
        t = type(x)
        if t is _Stub:
            x = self._resolve(x)
            t = type(x)
        if t is _Global:
            if into != "tuple":  # call arguments hold globals (numpy.ndarray)
                self.refuse(f"the global {x.name} is used as a value")
            return x, 0, True
        if into in ("key", "set"):
            if not (t is str or t is bytes or t in _CACHED or (t is int and -_HASH_SAFE_INT < x < _HASH_SAFE_INT)):
                self.refuse(f"a {'dict key' if into == 'key' else 'set member'} of type {t.__name__}: "
                            "only str, bytes, bool, None and ints below 2**61 may be hashed (no tuple keys)")
            return x, 0, False
        if t is np.ndarray:
            self._array_reference(x)
            return x, 0, False
        if t in _CONTAINERS:
            entry = self._reg.get(id(x))
            if entry is None:
                if t in _MUTABLE:
                    self._register(x, 1, True, False)
                return x, 1, False
            if entry[3] and into != "tuple":
                self.refuse(f"a tuple holding the global of a call ({_describe(x)}) is used as a value")
            if t in _MUTABLE:
                entry[2] = True  # nested: never modified again (no cycles)
            return x, entry[1], entry[3]
        return x, 0, False

    def _register(self, c: Any, depth: int, frozen: bool, tainted: bool) -> None:
        if depth > MAX_DEPTH:
            self.refuse(f"containers are nested deeper than {MAX_DEPTH} levels")
        entry = self._reg.get(id(c))
        if entry is None:
            self.charge(_REGISTRY_ENTRY, "the nesting registry")
            self._reg[id(c)] = [c, depth, frozen, tainted]
        else:
            entry[1] = max(entry[1], depth)
            entry[2] = entry[2] or frozen

    def new_container(self, kind: type, items: list[Any]) -> Any:
        into = "set" if kind in (set, frozenset) else ("tuple" if kind is tuple else "list")
        depth, tainted, out = 0, False, []
        for x in items:
            if type(x) in _PLAIN and into != "set":  # fast path: nothing to resolve or track
                out.append(x)
                continue
            x, d, tx = self._take(x, into)
            out.append(x)
            if d > depth:
                depth = d
            tainted = tainted or tx
        c = kind(out)
        self.charge(sys.getsizeof(c), kind.__name__)
        if depth or tainted:
            self._register(c, depth + 1, False, tainted)
        return c

    def new_dict(self, items: list[Any], kind: type = dict) -> Any:
        if len(items) % 2:
            raise _Malformed("odd number of items for a dict")
        d = kind()
        self._fill_dict(d, items, 0)
        return d

    def _fill_dict(self, d: Any, items: list[Any], depth: int) -> None:
        before = sys.getsizeof(d)
        for i in range(0, len(items), 2):
            k, _, _ = self._take(items[i], "key")
            v, dv, _ = self._take(items[i + 1], "dict")
            if v is d:
                self.refuse("a dict contains itself")
            d[k] = v
            depth = max(depth, dv)
        self.charge(max(0, sys.getsizeof(d) - before) + _SLOT * (len(items) // 2), "a dict")
        if depth:
            self._register(d, depth + 1, False, False)

    def _target(self, kinds: tuple[type, ...], op: str) -> tuple[Any, int]:
        """The container on the stack that op adds to, and its depth."""
        if not self._stack:
            raise _Malformed(f"{op} on an empty stack")
        c = self._stack[-1]
        if type(c) not in kinds:
            raise _Malformed(f"{op} on {_describe(c)}")
        entry = self._reg.get(id(c))
        if entry is not None and entry[2]:
            self.refuse(f"{op} modifies a {type(c).__name__} after it was nested in another object "
                        "(a cyclic or self-modifying structure)")
        return c, entry[1] if entry is not None else 0

    def _add_items(self, op: str, items: list[Any]) -> None:
        c, depth = self._target((list,), op)
        before = sys.getsizeof(c)
        for x in items:
            x, d, _ = self._take(x, "list")
            if x is c:
                self.refuse("a list contains itself")
            c.append(x)
            depth = max(depth, d + 1 if d else 1)
        self.charge(max(0, sys.getsizeof(c) - before), "a list")
        if depth > 1:
            self._register(c, depth, False, False)

    # input helpers

    def _number_line(self, op: str) -> bytes:
        line = self._in.readline()[:-1]
        if len(line) > _MAX_NUMBER_LINE:
            raise _Malformed(f"{op} argument of {len(line)} characters")
        return line

    def _length(self, fmt: str, op: str) -> int:
        raw = self._in.read(struct.calcsize(fmt))
        (n,) = struct.unpack(fmt, raw)
        if n < 0:
            raise _Malformed(f"{op} with negative length {n}")
        if n > self._in.left:
            raise EOFError  # longer than what is left: a truncated file
        return n

    def _pop_mark(self) -> list[Any]:
        items = self._stack
        if not self._meta:
            raise _Malformed("unexpected MARK-consuming opcode without a MARK")
        self._stack = self._meta.pop()
        return items

    def _pop(self) -> Any:
        if not self._stack:
            raise _Malformed("stack underflow")
        return self._stack.pop()

    # opcodes

    def run(self) -> Any:
        inp = self._in
        file_read = inp._f.read
        dispatch = self._dispatch
        ops_left = self._size // OPS_PER_BYTE + OPS_SLACK
        try:
            while True:
                ops_left -= 1
                if ops_left < 0:
                    self.refuse(f"it runs more than {self._size // OPS_PER_BYTE + OPS_SLACK} opcodes, one per "
                                f"{OPS_PER_BYTE} bytes of the file + {OPS_SLACK}: an opcode flood?")
                # _Input.read(1), inlined: one opcode byte per iteration
                if inp.pos >= inp._limit:
                    inp._cross(inp.pos + 1)
                op_byte = file_read(1)
                if not op_byte:
                    raise EOFError
                inp.pos += 1
                op = op_byte[0]
                handler = dispatch[op]
                if handler is None:
                    raise _Malformed(f"invalid load key {bytes([op])!r}")
                if handler():
                    return self._result
        finally:
            # The bound methods in _dispatch make a reference cycle: drop
            # what the machine holds now rather than at the next collection.
            self._dispatch = []
            self._stack, self._meta, self._memo, self._reg = [], [], [], {}
            self._result = None

    def op_proto(self) -> bool:
        proto = self._in.read(1)[0]
        if proto > 5:
            raise _Malformed(f"unsupported pickle protocol: {proto}")
        return False

    def op_frame(self) -> bool:
        self._in.frame(self._length("<Q", "FRAME"))
        return False

    def op_stop(self) -> bool:
        x = self._resolve(self._pop())
        t = type(x)
        if t is _Global or (t is tuple and (self._reg.get(id(x)) or [None, 0, False, False])[3]):
            self.refuse(f"the pickle's result is {_describe(x)}, a placeholder of a call")
        self._result = x
        return True

    def op_mark(self) -> bool:
        self.charge(64, "a MARK")
        self._meta.append(self._stack)
        self._stack = []
        return False

    def op_pop(self) -> bool:
        if self._stack:
            self._stack.pop()
        else:
            self._pop_mark()
        return False

    def op_pop_mark(self) -> bool:
        self._pop_mark()
        return False

    def op_dup(self) -> bool:
        if not self._stack:
            raise _Malformed("DUP on an empty stack")
        self.charge(_SLOT, "the stack")  # one more reference, no new object
        self._stack.append(self._stack[-1])
        return False

    # numbers

    def op_int(self) -> bool:
        line = self._number_line("INT")
        if line == b"00":
            return self._push(False)
        if line == b"01":
            return self._push(True)
        return self._push(_parse(int, line, 0))

    def op_long(self) -> bool:
        line = self._number_line("LONG")
        if line.endswith(b"L"):
            line = line[:-1]
        return self._push(_parse(int, line, 0))

    def op_binint(self) -> bool:
        return self._push(struct.unpack("<i", self._in.read(4))[0])

    def op_binint1(self) -> bool:
        return self._push(self._in.read(1)[0])

    def op_binint2(self) -> bool:
        return self._push(struct.unpack("<H", self._in.read(2))[0])

    def op_long1(self) -> bool:
        n = self._in.read(1)[0]
        return self._push(int.from_bytes(self._in.read(n), "little", signed=True))

    def op_long4(self) -> bool:
        n = self._length("<i", "LONG4")
        self.charge(n, "an int")
        return self._push(int.from_bytes(self._in.read(n), "little", signed=True))

    def op_float(self) -> bool:
        return self._push(_parse(float, self._number_line("FLOAT")))

    def op_binfloat(self) -> bool:
        return self._push(struct.unpack(">d", self._in.read(8))[0])

    def op_none(self) -> bool:
        return self._push(None)

    def op_newtrue(self) -> bool:
        return self._push(True)

    def op_newfalse(self) -> bool:
        return self._push(False)

    # strings

    def _text(self, data: bytes, encoding: str, errors: str = "strict") -> bool:
        # At most 4 bytes per character, from data the file holds; _push
        # charges the str's actual size.
        return self._push(_parse(str, data, encoding, errors))

    def op_string(self) -> bool:
        data = self._in.readline()[:-1]
        if len(data) < 2 or data[0] != data[-1] or data[0] not in b"\"'":
            raise _Malformed("the STRING opcode argument must be quoted")
        return self._text(_parse(codecs.escape_decode, data[1:-1])[0], "latin1")

    def op_binstring(self) -> bool:
        return self._text(self._in.read(self._length("<i", "BINSTRING")), "latin1")

    def op_short_binstring(self) -> bool:
        return self._text(self._in.read(self._in.read(1)[0]), "latin1")

    def op_unicode(self) -> bool:
        return self._text(self._in.readline()[:-1], "raw-unicode-escape")

    def op_binunicode(self) -> bool:
        return self._text(self._in.read(self._length("<I", "BINUNICODE")), "utf-8", "surrogatepass")

    def op_binunicode8(self) -> bool:
        return self._text(self._in.read(self._length("<Q", "BINUNICODE8")), "utf-8", "surrogatepass")

    def op_short_binunicode(self) -> bool:
        return self._text(self._in.read(self._in.read(1)[0]), "utf-8", "surrogatepass")

    def op_binbytes(self) -> bool:
        return self._push(self._in.read(self._length("<I", "BINBYTES")))

    def op_binbytes8(self) -> bool:
        return self._push(self._in.read(self._length("<Q", "BINBYTES8")))

    def op_short_binbytes(self) -> bool:
        return self._push(self._in.read(self._in.read(1)[0]))

    def op_bytearray8(self) -> bool:
        return self._push(self._in.read_bytearray(self._length("<Q", "BYTEARRAY8")))

    # memo

    def _get(self, i: int) -> bool:
        if not 0 <= i < len(self._memo) or self._memo[i] is _HOLE:
            raise _Malformed(f"memo key {i} was never stored")
        self.charge(_SLOT, "the stack")
        self._stack.append(self._memo[i])
        return False

    def _put(self, i: int) -> bool:
        if not self._stack:
            raise _Malformed("memoizing from an empty stack")
        if i < 0:
            raise _Malformed("negative memo key")
        n = len(self._memo)
        if i == n:  # the usual case: the next index
            self._budget -= _SLOT
            if self._budget < 0:
                self.charge(0, "the memo")  # raises
            self._memo.append(self._stack[-1])
        elif i > n:
            self.charge(_SLOT * (i + 1 - n), "the memo")  # holes cost a slot each
            self._memo.extend([_HOLE] * (i - n))
            self._memo.append(self._stack[-1])
        else:
            self._memo[i] = self._stack[-1]
        return False

    def op_get(self) -> bool:
        return self._get(_parse(int, self._number_line("GET")))

    def op_binget(self) -> bool:
        return self._get(self._in.read(1)[0])

    def op_long_binget(self) -> bool:
        return self._get(struct.unpack("<I", self._in.read(4))[0])

    def op_put(self) -> bool:
        return self._put(_parse(int, self._number_line("PUT")))

    def op_binput(self) -> bool:
        return self._put(self._in.read(1)[0])

    def op_long_binput(self) -> bool:
        return self._put(struct.unpack("<I", self._in.read(4))[0])

    def op_memoize(self) -> bool:
        return self._put(len(self._memo))

    # containers

    def op_empty_tuple(self) -> bool:
        return self._push(())

    def op_tuple(self) -> bool:
        t = self.new_container(tuple, self._pop_mark())
        self._stack.append(t)  # new_container charged it
        return False

    def _tuple_n(self, n: int) -> bool:
        if len(self._stack) < n:
            raise _Malformed("stack underflow")
        items = self._stack[len(self._stack) - n:]
        del self._stack[len(self._stack) - n:]
        t = self.new_container(tuple, items)
        self._stack.append(t)  # new_container charged it
        return False

    def op_tuple1(self) -> bool:
        return self._tuple_n(1)

    def op_tuple2(self) -> bool:
        return self._tuple_n(2)

    def op_tuple3(self) -> bool:
        return self._tuple_n(3)

    def op_empty_list(self) -> bool:
        return self._push([])

    def op_list(self) -> bool:
        c = self.new_container(list, self._pop_mark())
        self._stack.append(c)
        return False

    def op_empty_dict(self) -> bool:
        return self._push({})

    def op_dict(self) -> bool:
        d = self.new_dict(self._pop_mark())
        self._stack.append(d)
        return False

    def op_empty_set(self) -> bool:
        return self._push(set())

    def op_frozenset(self) -> bool:
        c = self.new_container(frozenset, self._pop_mark())
        self._stack.append(c)
        return False

    def op_append(self) -> bool:
        x = self._pop()
        self._add_items("APPEND", [x])
        return False

    def op_appends(self) -> bool:
        items = self._pop_mark()
        self._add_items("APPENDS", items)
        return False

    def op_setitem(self) -> bool:
        v = self._pop()
        k = self._pop()
        d, depth = self._target(_DICTS, "SETITEM")
        self._fill_dict(d, [k, v], max(depth - 1, 0))
        return False

    def op_setitems(self) -> bool:
        items = self._pop_mark()
        if len(items) % 2:
            raise _Malformed("SETITEMS with an odd number of items")
        d, depth = self._target(_DICTS, "SETITEMS")
        self._fill_dict(d, items, max(depth - 1, 0))
        return False

    def op_additems(self) -> bool:
        items = self._pop_mark()
        s, _ = self._target((set,), "ADDITEMS")
        before = sys.getsizeof(s)
        for x in items:
            s.add(self._take(x, "set")[0])
        self.charge(max(0, sys.getsizeof(s) - before), "a set")
        return False

    # calls

    def _global(self, module: str, name: str) -> bool:
        g = _GLOBALS.get((module, name))
        if g is None:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global '{module}.{name}': only numpy arrays "
                "and plain containers are allowed. If you trust this file, pass trust_pickle=True."
            )
        self.charge(_SLOT, "the stack")
        self._stack.append(g)
        return False

    def op_global(self) -> bool:
        module = _parse(bytes.decode, self._in.readline()[:-1], "utf-8")
        name = _parse(bytes.decode, self._in.readline()[:-1], "utf-8")
        return self._global(module, name)

    def op_stack_global(self) -> bool:
        name = self._pop()
        module = self._pop()
        if type(name) is not str or type(module) is not str:
            raise _Malformed("STACK_GLOBAL requires str")
        return self._global(module, name)

    def op_reduce(self) -> bool:
        args = self._pop()
        if not self._stack:
            raise _Malformed("stack underflow")
        func = self._stack[-1]
        if type(func) is not _Global:
            raise _Malformed(f"REDUCE calls {_describe(func)}, which is not a global")
        if type(args) is not tuple:
            raise _Malformed(f"REDUCE's arguments must be a tuple, got {_describe(args)}")
        self._stack[-1] = func.call(self, args)
        return False

    def op_build(self) -> bool:
        state = self._resolve(self._pop())
        if not self._stack:
            raise _Malformed("stack underflow")
        inst = self._stack[-1]
        if type(inst) is not _Stub:
            self.refuse(f"BUILD sets the state of {_describe(inst)}: only numpy arrays and dtypes take a state")
        if inst.value is not None:
            self.refuse(f"BUILD sets the state of a {inst.what} a second time")
        if inst.what == "numpy dtype":
            inst.value = _build_dtype(self, inst, state)
        else:
            inst.value = _build_array(self, inst, state)
        return False


_OPCODES: dict[int, str] = {
    ord(code): "op_" + name
    for code, name in [
        ("(", "mark"), (".", "stop"), ("0", "pop"), ("1", "pop_mark"), ("2", "dup"),
        ("F", "float"), ("I", "int"), ("J", "binint"), ("K", "binint1"), ("L", "long"), ("M", "binint2"),
        ("N", "none"), ("R", "reduce"), ("S", "string"), ("T", "binstring"), ("U", "short_binstring"),
        ("V", "unicode"), ("X", "binunicode"), ("a", "append"), ("b", "build"), ("c", "global"),
        ("d", "dict"), ("}", "empty_dict"), ("e", "appends"), ("g", "get"), ("h", "binget"),
        ("j", "long_binget"), ("l", "list"), ("]", "empty_list"), ("p", "put"), ("q", "binput"),
        ("r", "long_binput"), ("s", "setitem"), ("t", "tuple"), (")", "empty_tuple"), ("u", "setitems"),
        ("G", "binfloat"), ("\x80", "proto"), ("\x85", "tuple1"), ("\x86", "tuple2"), ("\x87", "tuple3"),
        ("\x88", "newtrue"), ("\x89", "newfalse"), ("\x8a", "long1"), ("\x8b", "long4"),
        ("B", "binbytes"), ("C", "short_binbytes"), ("\x8c", "short_binunicode"),
        ("\x8d", "binunicode8"), ("\x8e", "binbytes8"), ("\x8f", "empty_set"), ("\x90", "additems"),
        ("\x91", "frozenset"), ("\x93", "stack_global"), ("\x94", "memoize"), ("\x95", "frame"),
        ("\x96", "bytearray8"),
    ]
}

#: Opcodes that only object graphs beyond arrays and containers need.
_REFUSED_OPCODES = {
    "i": ("INST", "it creates class instances"), "o": ("OBJ", "it creates class instances"),
    "\x81": ("NEWOBJ", "it creates class instances"), "\x92": ("NEWOBJ_EX", "it creates class instances"),
    "\x82": ("EXT1", "the extension registry"), "\x83": ("EXT2", "the extension registry"),
    "\x84": ("EXT4", "the extension registry"), "P": ("PERSID", "persistent ids"),
    "Q": ("BINPERSID", "persistent ids"), "\x97": ("NEXT_BUFFER", "out-of-band buffers"),
    "\x98": ("READONLY_BUFFER", "out-of-band buffers"),
}


def _install_refusals() -> None:
    for code, (name, why) in _REFUSED_OPCODES.items():
        attr = f"op_refused_{ord(code):02x}"

        def handler(self: _Machine, _name: str = name, _why: str = why) -> bool:
            return self.refuse(f"the {_name} opcode ({_why})")

        setattr(_Machine, attr, handler)
        _OPCODES[ord(code)] = attr


_install_refusals()


# -- loading ---------------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Wraps a binary file and reports bytes read to a callback (progress)."""

    def __init__(self, raw: io.BufferedReader, on_read: Callable[[int], None]) -> None:
        self._raw = raw
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        self._on_read(n or 0)
        return n or 0


def _load_stream(f: BinaryIO, size: int, source: str, on_read: Callable[[int], None] | None = None) -> Any:
    """Run the machine over ``size`` bytes of ``f``, translating every
    failure into UnsafePickleError or ConversionError naming ``source``."""
    try:
        inp = _Input(f, size, on_read)
        result = _Machine(inp, source, size).run()
        inp.finish()
        return result
    except UnsafePickleError:
        raise
    except _Refused as e:
        raise UnsafePickleError(f"{source}: refusing to unpickle: {e}; {_TRUST_HINT}") from e
    except EOFError as e:
        raise ConversionError(f"{source}: the pickle ends early (truncated file?)") from e
    except MemoryError as e:
        raise ConversionError(f"{source}: ran out of memory while unpickling") from e
    except _Malformed as e:
        raise ConversionError(f"{source}: not a readable pickle: {e}") from e
    # Any other exception is a bug of this module, not a property of the
    # input: it propagates as it is.


def load(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    on_read: Callable[[int], None] | None = None,
) -> Any:
    """Load a pickle file safely (or plainly with ``pickle.load``, if ``trust``).

    Raises UnsafePickleError (naming the file) for a refused global or
    construct (see the module docstring) and ConversionError for a truncated
    or malformed pickle. Arrays are views of the bytes read from the file:
    read-only unless the pickle stored them as a bytearray (protocol 5)."""
    path = os.fspath(path)
    with open(path, "rb", buffering=1 << 20) as raw:
        if not trust:
            return _load_stream(raw, os.fstat(raw.fileno()).st_size, path, on_read)
        f: BinaryIO = raw
        if on_read is not None:
            f = io.BufferedReader(_CountingReader(raw, on_read), buffer_size=1 << 20)  # type: ignore[assignment,arg-type]
        try:
            return pickle.load(f, encoding="latin1")  # the caller opted in explicitly
        except EOFError:
            raise ConversionError(f"{path}: the pickle ends early (truncated file?)") from None
        except MemoryError:
            raise ConversionError(f"{path}: ran out of memory while unpickling") from None
        except Exception as e:
            raise ConversionError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from e
