"""Unpickling FineGym feature pickles without running code from them.

A pickle can call any importable function while loading. The released feature
pickles only need numpy array reconstruction and plain containers, so we
resolve exactly those globals and refuse every other one with
UnsafePickleError, before it is called.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO, Callable

import numpy as np

from .errors import ConversionError, UnsafePickleError

__all__ = ["load", "ALLOWED_GLOBALS"]


def _numpy_core(submodule: str, name: str) -> Any:
    # numpy >= 2 renamed numpy.core to numpy._core; old pickles (and any
    # pickle written by numpy 1.x) still name numpy.core. Resolve to the
    # object directly, so loading emits no DeprecationWarning.
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, submodule), name)


_RESOLVERS: dict[tuple[str, str], Callable[[], Any]] = {}
for _core_name in ("numpy.core", "numpy._core"):
    _RESOLVERS[(f"{_core_name}.multiarray", "_reconstruct")] = lambda: _numpy_core("multiarray", "_reconstruct")
    _RESOLVERS[(f"{_core_name}.multiarray", "scalar")] = lambda: _numpy_core("multiarray", "scalar")
    _RESOLVERS[(f"{_core_name}.numeric", "_frombuffer")] = lambda: _numpy_core("numeric", "_frombuffer")
_RESOLVERS[("numpy", "ndarray")] = lambda: np.ndarray
_RESOLVERS[("numpy", "dtype")] = lambda: np.dtype
_RESOLVERS[("collections", "OrderedDict")] = lambda: __import__("collections").OrderedDict


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Python 3 writes bytes into protocol 0-2 pickles (numpy array data among
    # them) as _codecs.encode(str, 'latin1'); allow exactly that call.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    # ... and an empty bytes object as bytes().
    return b""


_RESOLVERS[("_codecs", "encode")] = lambda: _latin1_encode
for _builtins in ("builtins", "__builtin__"):
    _RESOLVERS[(_builtins, "bytes")] = lambda: _empty_bytes

def _constant(obj: Any) -> Callable[[], Any]:
    return lambda: obj


for _builtins in ("builtins", "__builtin__"):  # __builtin__: Python 2 pickles
    for _name, _obj in (("dict", dict), ("list", list), ("tuple", tuple), ("set", set),
                        ("frozenset", frozenset), ("bytearray", bytearray)):
        _RESOLVERS[(_builtins, _name)] = _constant(_obj)

#: The (module, name) globals a pickle may refer to.
ALLOWED_GLOBALS = frozenset(_RESOLVERS)


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str) -> None:
        # latin1 decodes Python 2 str payloads (numpy array bytes) losslessly.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        resolve = _RESOLVERS.get((module, name))
        if resolve is None:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global '{module}.{name}': only numpy arrays "
                "and plain containers are allowed. If you trust this file, pass trust_pickle=True "
                "(--trust-pickle on the command line)."
            )
        return resolve()


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


def load(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    on_read: Callable[[int], None] | None = None,
) -> Any:
    """Load a pickle file through the allow-list (or plainly, if ``trust``).

    Raises ConversionError (naming the file) for a truncated or malformed
    pickle and UnsafePickleError for a refused global."""
    path = os.fspath(path)
    with open(path, "rb") as raw:
        f: BinaryIO = raw
        if on_read is not None:
            f = io.BufferedReader(_CountingReader(raw, on_read), buffer_size=1 << 20)  # type: ignore[assignment]
        try:
            if trust:
                return pickle.load(f, encoding="latin1")  # the caller opted in explicitly
            return _AllowListUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except EOFError:
            raise ConversionError(f"{path}: the pickle ends early (truncated file?)") from None
        except MemoryError:
            raise ConversionError(f"{path}: ran out of memory while unpickling") from None
        except Exception as e:
            # Malformed input surfaces as many types: UnpicklingError, ValueError,
            # TypeError, OverflowError (a length field past sys.maxsize), numpy's
            # RuntimeError/SystemError for a bad dtype state, ...
            raise ConversionError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from e
