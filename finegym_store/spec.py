"""What a gathered batch is made of: :class:`SegmentSpec`.

A spec is a frozen value: built and validated once, then passed to every
:meth:`finegym_store.Store.gather`, :meth:`finegym_store.Store.loader` and
:class:`finegym_store.torch.StoreDataset` that uses it. Its native form (the
C++ core's ``GatherSpec``) is built with it and kept on it, so a gather does
no argument work for it; pickling carries the fields only, and the receiver
rebuilds (and revalidates) the native form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _args, _core

__all__ = ["SegmentSpec", "MODES", "RULES", "DTYPES"]

#: Segment modes: random within equal parts (training) or centred (evaluation).
MODES = ("train", "test")
#: Segment rounding rules (docs/sampling.md): mmaction2 1.2.0's SampleFrames,
#: bit-exact, or the same rules in exact integer arithmetic.
RULES = ("mmaction2", "exact")
#: Output dtypes of a gather (None: the column's).
DTYPES = ("float32", "float16")

def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    try:
        dt = np.dtype(value)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float16 (or None), got {type(value).__name__} {value!r}") from None
    if dt.name not in DTYPES or not dt.isnative:
        raise ValueError(f"dtype must be float32 or float16 in native byte order (or None: the column's), "
                         f"got {dt.str}")
    return dt.name


@dataclass(frozen=True)
class SegmentSpec:
    """Which segments each instance contributes to a batch, and in which dtype.

    * ``num_segments`` (K): clips per instance; None takes all T stored
      segments, in order (fixed-T columns only).
    * ``mode``: ``"train"`` (a random clip start within each of K equal
      parts, keyed by seed, epoch and instance) or ``"test"`` (centred
      clips). Required when num_segments is given; nothing defaults to
      either.
    * ``clip_len`` (L): consecutive segments per clip (needs num_segments).
    * ``rule``: ``"mmaction2"`` (bit-exact with mmaction2 1.2.0's
      SampleFrames) or ``"exact"`` (the same rules in exact integer
      arithmetic); docs/sampling.md.
    * ``dtype``: ``"float32"``, ``"float16"`` or None (the column's).
    * ``seed``: keys train-mode segments (and a loader's order).
    * ``normalize``: standardise every value with its channel's mean and
      standard deviation (:meth:`finegym_store.Store.stats`), in float32, in
      the same pass as the copy: ``(x - mean) * (1 / std)`` (a channel whose
      std is 0 keeps ``x - mean``). Needs a store of format version 3
      (``finegym-store stats`` adds the statistics to an older one).

    Frozen, hashable and picklable; equal specs give equal batches.
    Everything but num_segments is keyword-only. TypeError for a value of
    the wrong type (bools and floats are not counts), ValueError for a wrong
    value, each naming the field."""

    num_segments: int | None = None
    _: dataclasses.KW_ONLY
    mode: Literal["train", "test"] | None = None
    clip_len: int = 1
    rule: Literal["mmaction2", "exact"] = "mmaction2"
    dtype: Literal["float32", "float16"] | None = None
    seed: int = 0
    normalize: bool = False

    def __post_init__(self) -> None:
        conv = {
            "num_segments": _args.optional_count(self.num_segments, "num_segments", 1),
            "mode": _args.choice(self.mode, "mode", (*MODES, None)),
            "clip_len": _args.count(self.clip_len, "clip_len"),
            "rule": _args.choice(self.rule, "rule", RULES),
            "dtype": _dtype(self.dtype),
            "seed": _args.count(self.seed, "seed", 0),
            "normalize": _args.flag(self.normalize, "normalize"),
        }
        for name, value in conv.items():
            object.__setattr__(self, name, value)
        # Types are converted above; what the values mean is checked once, by
        # the core (finegym::validate): clip_len >= 1, a mode with
        # num_segments, clip_len > 1 only with num_segments, num_segments x
        # clip_len within 2^53.
        native = _core.GatherSpec(conv["num_segments"], conv["mode"], conv["clip_len"], conv["rule"],
                                  conv["dtype"], conv["seed"], conv["normalize"])
        object.__setattr__(self, "_native", native)

    def __reduce__(self) -> tuple[Any, ...]:
        # The fields only: the native spec is rebuilt (and revalidated) on unpickling.
        return (_rebuild, (dataclasses.asdict(self),))

    def replace(self, **changes: Any) -> SegmentSpec:
        """A copy with some fields changed (validated as a new spec)."""
        return dataclasses.replace(self, **changes)

    @property
    def rows(self) -> int | None:
        """Rows per instance in a batch: K * clip_len, or None (all T)."""
        return None if self.num_segments is None else self.num_segments * self.clip_len


def _rebuild(fields: dict[str, Any]) -> SegmentSpec:
    return SegmentSpec(**fields)


_FIELDS = frozenset(f.name for f in dataclasses.fields(SegmentSpec))


def resolve(spec: SegmentSpec | None, keywords: Mapping[str, Any], where: str) -> SegmentSpec:
    """The spec of a call taking ``spec=`` or the spec's keywords as a
    shorthand (not both). TypeError names ``where`` for an unknown keyword."""
    if spec is not None:
        if keywords:
            raise TypeError(f"{where}: pass spec= or its fields ({', '.join(sorted(keywords))}), not both; "
                            "spec.replace(...) changes fields of a spec")
        if not isinstance(spec, SegmentSpec):
            raise TypeError(f"{where}: spec must be a finegym_store.SegmentSpec, got {type(spec).__name__}")
        return spec
    try:
        # Keyed by type as well as value, so True never finds the spec built for 1.
        key: tuple[Any, ...] | None = tuple(sorted((k, type(v), v) for k, v in keywords.items()))
        hit = _BY_KEYWORDS.get(key)
    except TypeError:  # an unhashable value: no caching
        key = hit = None
    if hit is not None:
        return hit
    unknown = sorted(set(keywords) - _FIELDS)
    if unknown:
        raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r} (SegmentSpec fields: "
                        f"{', '.join(f.name for f in dataclasses.fields(SegmentSpec))})")
    spec = SegmentSpec(**keywords)
    if key is not None:
        if len(_BY_KEYWORDS) >= 256:
            _BY_KEYWORDS.clear()
        _BY_KEYWORDS[key] = spec
    return spec


#: Specs built from keywords (the shorthand), so a call with the same
#: keywords reuses the validated spec instead of building one per call.
_BY_KEYWORDS: dict[tuple[Any, ...], SegmentSpec] = {}
