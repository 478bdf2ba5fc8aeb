"""Argument conversion for the whole package: counts, indices and choices.

Every public function converts its arguments here, so each mistake gets the
same exception wherever it is made: TypeError for a value of the wrong type
(bools and floats are never counts or indices, even 2.0), ValueError for a
value out of its range or not among the choices, IndexError for an index
outside the store. Each message names the argument. What the values mean
together (num_segments x clip_len too large, a mode missing) is checked once,
by the C++ core (finegym::validate), when a SegmentSpec is built.

The ``cli_*`` functions at the end are the command line's argparse ``type=``
converters: a bad option value raises argparse.ArgumentTypeError, which
argparse turns into a usage line and one error line naming the option, with
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["count", "optional_count", "integer", "index", "indices", "choice", "flag", "real",
           "cli_count", "cli_counts", "cli_real", "cli_choices"]

U64_MAX = 2**64 - 1


def count(value: Any, name: str, minimum: int = 0, maximum: int = U64_MAX) -> int:
    """An integer argument in [minimum, maximum]: TypeError for anything but
    an int (bools and floats included), ValueError outside the range."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v}")
    if v > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {v}")
    return v


def optional_count(value: Any, name: str, minimum: int = 0, maximum: int = U64_MAX) -> int | None:
    """None, or :func:`count`."""
    return None if value is None else count(value, name, minimum, maximum)


def flag(value: Any, name: str) -> bool:
    """A bool argument (numpy bools too); TypeError for anything else (0, "yes")."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """One of ``choices`` (strings, or None where listed): TypeError for a
    value that is not a string (or None), ValueError for one not listed."""
    if not isinstance(value, str) and not (value is None and None in choices):
        raise TypeError(f"{name} must be one of {_listing(choices)}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {_listing(choices)}, got {value!r}")
    return value


def _listing(choices: Sequence[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def integer(value: Any, name: str = "index") -> int:
    """An int of any sign (an index the core range-checks): TypeError for
    anything else, bools and floats included."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r} (bools are not indices)")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def index(value: Any, n: int, name: str = "index", of: str = "items") -> int:
    """One position in a sequence of n, in [-n, n) (negative ones count from
    the end), returned in [0, n). TypeError for anything but an int (bools
    and floats included), IndexError outside the range."""
    i = integer(value, name)
    if not -n <= i < n:
        raise IndexError(f"{name} {i} is out of range for {n} {of}")
    return i % n


def indices(values: Any, n: int) -> np.ndarray:
    """Instance indices as a 1-D int64 array. TypeError for anything but
    integers (bools and floats included); IndexError for a value int64 cannot
    hold (ints beyond it, unsigned values of 2**63 and above), naming it and
    its position. Values in int64 are range-checked by the C++ core, once,
    before anything is copied."""
    if type(values) is np.ndarray and values.dtype == np.int64 and values.ndim == 1:
        return values  # the fast path (the loader's own batches)
    if isinstance(values, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in values):
        # numpy would make [0, True] an int array: refused here, as bool arrays are below.
        pos = next(p for p, v in enumerate(values) if isinstance(v, (bool, np.bool_)))
        raise TypeError(f"indices must be integers, got bool {values[pos]!r} at position {pos} "
                        "(bools are not indices)")
    idx = np.asarray(values)
    if idx.ndim != 1:
        raise TypeError(f"indices must be a 1-D sequence of integers, got an array of shape {idx.shape}")
    if idx.size == 0:
        return np.zeros(0, np.int64)
    kind = idx.dtype.kind
    if kind == "b":
        raise TypeError("indices must be integers, got bools (bools are not indices; use np.flatnonzero(mask))")
    if kind == "O":
        # Python ints too large for int64 (2**70) or a mix: each one checked on its own.
        out = []
        for pos, v in enumerate(idx.tolist()):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"indices must be integers, got {type(v).__name__} {v!r} at position {pos}")
            v = operator.index(v)
            if not -n <= v < n:
                raise IndexError(f"index {v} (position {pos}) is out of range for a store of {n} instances")
            out.append(v)
        return np.array(out, dtype=np.int64)
    if kind not in "iu":
        raise TypeError(f"indices must be integers, got an array of {idx.dtype}")
    if kind == "u":
        # Unsigned values never count from the end: 2**63 and above must not wrap to negative int64.
        bad = np.flatnonzero(idx >= n)
        if bad.size:
            raise IndexError(f"index {int(idx[bad[0]])} (position {int(bad[0])}) is out of range for a store of "
                             f"{n} instances")
    return idx.astype(np.int64, copy=False)


def real(value: Any, name: str, *, positive: bool) -> float:
    """A finite number, > 0 (positive) or >= 0: TypeError for a bool or a
    non-number, ValueError otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a {'positive number' if positive else 'number >= 0'} (finite), "
                         f"got {value!r}")
    return float(value)


# -- the command line: argparse type= converters --------------------------------------------------


def cli_count(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    """An integer in [low, high] (high None: no upper bound). ``what`` says
    what the bounds mean, for the error message."""

    def convert(text: str) -> int:
        try:
            v = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low or (high is not None and v > high):
            span = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {span}{what}, got {v}")
        return v

    convert.__name__ = "integer"  # argparse names the type in its messages
    return convert


def cli_counts(low: int, high: int | None = None, what: str = "") -> Callable[[str], list[int]]:
    """A comma-separated list of integers, each in [low, high]; not empty."""
    one = cli_count(low, high, what)

    def convert(text: str) -> list[int]:
        parts = [p for p in text.split(",")]
        if not text.strip() or any(not p.strip() for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return [one(p) for p in parts]

    convert.__name__ = "integer list"
    return convert


def cli_real(low: float, inclusive: bool = False, high: float | None = None) -> Callable[[str], float]:
    """A finite number > low (>= low with inclusive), at most high."""

    def convert(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v >= low if inclusive else v > low) and (high is None or v <= high)
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return v

    convert.__name__ = "number"
    return convert


def cli_choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated list of names from ``allowed``; not empty."""

    def convert(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",")]
        bad = [n for n in names if n not in allowed]
        if bad or not text.strip():
            raise argparse.ArgumentTypeError(f"unknown {bad[0] if bad else text!r}: expected a comma-separated "
                                             f"list of {', '.join(allowed)}")
        return names

    convert.__name__ = "list"
    return convert
