"""argparse ``type=`` converters for the command line's numeric options.

Each converter checks one option's value where it is parsed: a bad value
raises argparse.ArgumentTypeError, which argparse turns into a usage line
and one error line naming the option, with exit status 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def count(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
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


def counts(low: int, high: int | None = None, what: str = "") -> Callable[[str], list[int]]:
    """A comma-separated list of integers, each in [low, high]; not empty."""
    one = count(low, high, what)

    def convert(text: str) -> list[int]:
        parts = [p for p in text.split(",")]
        if not text.strip() or any(not p.strip() for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return [one(p) for p in parts]

    convert.__name__ = "integer list"
    return convert


def real(low: float, inclusive: bool = False, high: float | None = None) -> Callable[[str], float]:
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


def choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
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
