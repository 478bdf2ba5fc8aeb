"""Readers for FineGym's own text formats: element ids, split files and
category (label hierarchy) files. Pure Python; no store involved."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import ConversionError

__all__ = [
    "ElementId",
    "parse_element_id",
    "read_split",
    "Categories",
    "read_categories",
    "EVENTS",
]

# {VIDEO}_E_{ES:06d}_{EE:06d}_A_{AS:04d}_{AE:04d}; VIDEO is an 11-character
# YouTube id that may itself contain '_' or '-', so its length anchors the match.
_ELEMENT_ID = re.compile(r"([A-Za-z0-9_-]{11})_E_(\d{6})_(\d{6})_A_(\d{4})_(\d{4})")

#: Event code by the tens digit of a set id (set 1 is vault).
EVENTS = {0: "VT", 2: "FX", 3: "BB", 4: "UB"}


class ElementId(NamedTuple):
    """The fields of a FineGym element id. Times are whole seconds: the event
    in the full video, the element relative to the event start."""

    video: str
    event_start: int
    event_end: int
    element_start: int
    element_end: int


def parse_element_id(element_id: str) -> ElementId | None:
    """Parse ``A0xAXXysHUo_E_002184_002237_A_0035_0036``; None if it does not
    follow the FineGym pattern (such ids are still stored, as plain ids)."""
    m = _ELEMENT_ID.fullmatch(element_id)
    if m is None:
        return None
    video, es, ee, as_, ae = m.groups()
    return ElementId(video, int(es), int(ee), int(as_), int(ae))


def read_split(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """Read a split file (``<element_id> <label>`` per line) into ids, in file
    order, and int32 labels. Raises ConversionError naming file and line."""
    path = os.fspath(path)
    ids: list[str] = []
    labels: list[int] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConversionError(
                    f"{path}:{lineno}: expected '<element_id> <label>', got {line[:80]!r}"
                )
            key, label = parts
            try:
                value = int(label)
            except ValueError:
                raise ConversionError(
                    f"{path}:{lineno}: label {label!r} of {key!r} is not an integer"
                ) from None
            if not -1 <= value < 2**31:
                raise ConversionError(f"{path}:{lineno}: label {value} is outside -1..2**31-1")
            if key in seen:
                raise ConversionError(
                    f"{path}:{lineno}: id {key!r} is listed twice (first on line {seen[key]})"
                )
            seen[key] = lineno
            ids.append(key)
            labels.append(value)
    if not ids:
        raise ConversionError(f"{path}: the split file lists no instances")
    return ids, np.asarray(labels, dtype=np.int32)


@dataclass(frozen=True)
class Categories:
    """A label hierarchy: one entry per class, aligned arrays.

    ``label`` is the class label used in split files (Clabel; for
    gym530_categories.txt, the Glabel itself), ``glabel`` the global element
    id 0..529, ``set`` the set id (its tens digit is the event), ``event`` the
    event code (VT, FX, BB, UB) and ``name`` the element's name."""

    label: np.ndarray
    glabel: np.ndarray
    set: np.ndarray
    event: list[str]
    name: list[str]

    def __len__(self) -> int:
        return len(self.name)


_CLABEL_LINE = re.compile(
    r"Clabel:\s*(\d+);\s*set:\s*(\d+);\s*Glabel:\s*(\d+);\s*\((\w+)\)\s*(.*)"
)
_GLABEL_LINE = re.compile(r"Glabel:\s*(\d+);\s*set:\s*(\d+);\s*\((\w+)\)\s*(.*)")


def read_categories(path: str | os.PathLike[str]) -> Categories:
    """Read gym99/gym288 (``Clabel: ..; set: ..; Glabel: ..; (EV) name``) or
    gym530 (``Glabel: ..; set: ..; (EV) name``) category files."""
    path = os.fspath(path)
    label, glabel, sets, event, name = [], [], [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            m = _CLABEL_LINE.fullmatch(line)
            if m:
                c, s, g, ev, nm = m.groups()
            else:
                m = _GLABEL_LINE.fullmatch(line)
                if not m:
                    raise ConversionError(
                        f"{path}:{lineno}: expected 'Clabel: N; set: N; Glabel: N; (EV) name' "
                        f"or 'Glabel: N; set: N; (EV) name', got {line[:80]!r}"
                    )
                g, s, ev, nm = m.groups()
                c = g
            if int(c) in label:
                raise ConversionError(f"{path}:{lineno}: class label {int(c)} is listed twice")
            label.append(int(c))
            glabel.append(int(g))
            sets.append(int(s))
            event.append(ev)
            name.append(nm.strip())
    if not label:
        raise ConversionError(f"{path}: the categories file lists no classes")
    return Categories(
        np.asarray(label, np.int32), np.asarray(glabel, np.int32), np.asarray(sets, np.int32), event, name
    )
