"""Label spaces: which classes a store's labels mean.

A :class:`LabelSpace` is a small frozen value: the FineGym subset the labels
belong to when it is recognised (gym99, gym288, gym530), the number of
classes, and a fingerprint of the label hierarchy (a hash of its (label,
glabel, set, event, name) rows), None when the store has no hierarchy.

Two checks use it:

- :func:`check_fit`, in the write path (finegym_store._write): a split's labels
  must fit the categories converted with them, so a gym99 split with gym288
  categories is refused instead of naming 93% of its classes wrongly;
- :func:`check_pair`, in the probe: a train and a val store must share one
  label space, and the val labels must be classes of the train store.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import LabelSpaceError

__all__ = ["LabelSpace", "SUBSETS", "KNOWN_HIERARCHIES", "hierarchy_fingerprint", "of_categories", "of_labels",
           "subset_of_name", "subset_of_labels", "check_fit", "check_pair"]

#: FineGym's label sets and their class counts.
SUBSETS = {"gym99": 99, "gym288": 288, "gym530": 530}
#: Fingerprints of the released gym99/gym288/gym530 category files.
KNOWN_HIERARCHIES = {"c36b0100512744ef": "gym99", "3fd2735231ac4076": "gym288", "34472c930c1367ab": "gym530"}

_NAME = re.compile(r"gym(99|288|530)(?!\d)", re.IGNORECASE)


@dataclass(frozen=True)
class LabelSpace:
    """The classes a store's labels refer to.

    ``subset`` is "gym99", "gym288" or "gym530" when recognised (by the
    hierarchy's fingerprint or class count; without a hierarchy, by the
    labels' span or the split file's name), else None. ``num_classes`` is the
    hierarchy's class count (without one: the largest label + 1, or the
    recognised subset's count). ``fingerprint`` is 16 hex digits of the
    SHA-256 of the hierarchy's rows, None without a hierarchy."""

    subset: str | None
    num_classes: int
    fingerprint: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"subset": self.subset, "num_classes": self.num_classes, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, doc: Any) -> LabelSpace | None:
        """The value recorded in a store's attrs, or None if it is not one."""
        if not isinstance(doc, dict):
            return None
        subset, n, fp = doc.get("subset"), doc.get("num_classes"), doc.get("fingerprint")
        if subset not in (None, *SUBSETS) or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return None
        if fp is not None and not isinstance(fp, str):
            return None
        return cls(subset, n, fp)

    def describe(self) -> str:
        """'gym99 (99 classes, hierarchy c36b0100512744ef)' and the like."""
        what = f"{self.num_classes} classes"
        what += f", hierarchy {self.fingerprint}" if self.fingerprint else ", no hierarchy"
        return f"{self.subset or 'an unrecognised label set'} ({what})"


def hierarchy_fingerprint(label: Any, glabel: Any, set_: Any, event: Sequence[str], name: Sequence[str]) -> str:
    """16 hex digits of the SHA-256 of the rows ``label\\tglabel\\tset\\tevent\\tname\\n``
    in label order (so the file's line order does not matter)."""
    label = np.asarray(label, dtype=np.int64)
    glabel = np.asarray(glabel, dtype=np.int64)
    set_ = np.asarray(set_, dtype=np.int64)
    event, name = list(event), list(name)
    h = hashlib.sha256()
    for i in np.argsort(label, kind="stable").tolist():
        h.update(f"{int(label[i])}\t{int(glabel[i])}\t{int(set_[i])}\t{event[i]}\t{name[i]}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def _subset_of_count(n: int) -> str | None:
    return next((s for s, k in SUBSETS.items() if k == n), None)


def _names(cats: Any) -> list[str]:
    return cats.name.to_list() if hasattr(cats.name, "to_list") else list(cats.name)


def _events(cats: Any) -> list[str]:
    return cats.event.to_list() if hasattr(cats.event, "to_list") else list(cats.event)


def of_categories(cats: Any) -> LabelSpace:
    """The label space of a hierarchy (a finegym.Categories or a store's Classes)."""
    event, name = _events(cats), _names(cats)
    fp = hierarchy_fingerprint(cats.label, cats.glabel, cats.set, event, name)
    n = len(name)
    return LabelSpace(KNOWN_HIERARCHIES.get(fp) or _subset_of_count(n), n, fp)


def subset_of_name(name: str | None) -> str | None:
    """'gym99' for 'gym99_val_element.txt' (the file name, not its folders)."""
    if not name:
        return None
    found = {("gym" + m.group(1)) for m in _NAME.finditer(os.path.basename(os.fspath(name)))}
    return found.pop() if len(found) == 1 else None


def subset_of_labels(labels: np.ndarray | None) -> str | None:
    """'gymN' when the labels span N classes (largest label + 1 == N)."""
    if labels is None or len(labels) == 0:
        return None
    top = int(np.max(labels))
    return _subset_of_count(top + 1) if top >= 0 else None


def of_labels(labels: np.ndarray | None, name: str | None = None) -> LabelSpace:
    """The label space of labels without a hierarchy: the subset their span
    (else ``name``, a split or source file name) says, and its class count
    (else the largest label + 1)."""
    top = int(np.max(labels)) if labels is not None and len(labels) else -1
    subset = subset_of_labels(labels)
    if subset is None:
        named = subset_of_name(name)
        subset = named if named is not None and SUBSETS[named] > top else None  # labels beyond it: not that subset
    return LabelSpace(subset, SUBSETS[subset] if subset is not None else max(top + 1, 0), None)


def _split_looks(labels: np.ndarray, name: str | None) -> tuple[str | None, str]:
    """(subset the labels look like, why) for a message."""
    top = int(labels.max())
    by_span, by_name = subset_of_labels(labels), subset_of_name(name)
    why = f"labels 0..{top} span {top + 1} classes" if by_span else f"labels up to {top}"
    if by_name:
        why += f"; its name says {by_name}"
    if by_name is not None and SUBSETS[by_name] <= top:
        by_name = None  # labels beyond the named subset: the name is wrong
    return by_span or by_name, why


def check_fit(labels: np.ndarray | None, cats: Any, labels_from: str, categories_from: str,
              name: str | None = None, allow: bool = False, override: str | None = None) -> str | None:
    """Check that ``labels`` (from ``labels_from``, a split file or a source's
    label column; ``name`` its file name) fit the hierarchy ``cats`` (from
    ``categories_from``): every label (other than -1) has a class, and when
    the labels look like a FineGym subset (their span or the file name), the
    hierarchy is that subset's (by fingerprint or class count).

    Returns None when they fit; the reason they do not when ``allow``;
    raises :class:`LabelSpaceError` naming both sources (and ``override``,
    the option that allows a deliberate mismatch, if any) otherwise."""
    if cats is None or labels is None:
        return None
    y = np.asarray(labels)
    y = y[y >= 0]
    if len(y) == 0:
        return None
    space = of_categories(cats)
    classes = np.asarray(cats.label, dtype=np.int64)
    present = np.unique(y).astype(np.int64)
    unknown = present[~np.isin(present, classes)]
    looks, why = _split_looks(y, name)
    split_is = f"{looks} ({why})" if looks else f"no FineGym subset ({why})"
    cats_is = f"{space.subset or 'no FineGym subset'} ({space.num_classes} classes)"
    if len(unknown):
        shown = "[" + ", ".join(str(v) for v in unknown[:10].tolist()) + (
            f", and {len(unknown) - 10} more" if len(unknown) > 10 else "") + "]"
        reason = (f"{labels_from}: labels {shown} have no class in {categories_from}; the labels look like "
                  f"{split_is}, the categories like {cats_is}")
    elif looks is not None and (space.subset != looks if space.subset is not None
                                else space.num_classes != SUBSETS[looks]):
        ex = int(present[len(present) // 2])
        row = int(np.flatnonzero(classes == ex)[0]) if ex in classes else None
        named = "" if row is None else f" (label {ex} would be {_names(cats)[row]!r} ({_events(cats)[row]}))"
        reason = (f"{labels_from} looks like {split_is} but {categories_from} looks like {cats_is}: "
                  f"its labels would take the names of other classes{named}")
    else:
        return None
    if allow:
        return reason
    advice = "; use the categories file of the same subset"
    raise LabelSpaceError(reason + advice + (f", or pass {override} if the mismatch is deliberate" if override else ""))


def _listed(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:10].tolist())
    return shown + (f" (and {len(values) - 10} more)" if len(values) > 10 else "")


def check_pair(train: Any, val: Any, levels: Sequence[str] = ("element",)) -> None:
    """Refuse a train and a val store (opened Stores) that do not share a label
    space: different hierarchies, different recognised subsets, val labels
    that are not classes of the train store, or a set/event level without a
    hierarchy. LabelSpaceError names both stores."""
    needs = [lv for lv in levels if lv != "element"]
    if needs and train.classes is None and val.classes is None:
        raise LabelSpaceError(f"level {needs[0]!r} needs the label hierarchy, but neither train {train.path} nor "
                              f"val {val.path} has one (convert with --categories)")
    a, b = train.label_space, val.label_space
    pair = f"train {train.path} is {a.describe()} but val {val.path} is {b.describe()}"
    if a.fingerprint is not None and b.fingerprint is not None and a.fingerprint != b.fingerprint:
        raise LabelSpaceError(f"different label hierarchies: {pair}; probe stores converted with one "
                              "categories file")
    if a.subset is not None and b.subset is not None and a.subset != b.subset:
        raise LabelSpaceError(f"different label spaces: {pair}")
    # The probe maps predictions through the val store's hierarchy, else the train store's.
    holder = val if val.classes is not None else train if train.classes is not None else None
    if holder is not None:
        listed = np.asarray(holder.classes.label, dtype=np.int64)
        for role, store in (("train", train), ("val", val)):
            y = np.asarray(store.labels).astype(np.int64)
            present = np.unique(y[y >= 0])
            outside = present[~np.isin(present, listed)]
            if len(outside):
                raise LabelSpaceError(f"{role} {store.path} has labels {_listed(outside)} that are not classes of "
                                      f"the hierarchy stored in {holder.path}; {pair}")
    tc = train.classes
    if tc is not None:
        known = np.asarray(tc.label, dtype=np.int64)
        what = f"the {len(known)} classes of its hierarchy"
    else:
        y = np.asarray(train.labels)
        top = int(y.max()) if len(y) else -1
        known = np.arange(max(a.num_classes, top + 1), dtype=np.int64)
        what = f"its classes 0..{len(known) - 1}"
    yv = np.asarray(val.labels).astype(np.int64)
    present = np.unique(yv[yv >= 0])
    outside = present[~np.isin(present, known)]
    if len(outside):
        raise LabelSpaceError(f"val {val.path} has labels {_listed(outside)} that are not classes of train {train.path} "
                              f"({what}); {pair}")
