"""Classification metrics as FineGym reports them: Top-1 and Mean Class
Accuracy (the mean, over the classes present in the labels, of per-class
recall), plus top-k and the confusion matrix. numpy only.

Conventions shared by every function:

- ``labels``: 1-D integer class ids, one per instance, all >= 0 and within
  int64 (larger ids, e.g. uint64 >= 2**63, are refused, not wrapped). Unlabelled
  instances (-1 in a store) are refused with a ValueError: drop them first
  (``labels >= 0``), since counting them either way would be a silent choice.
- ``predictions``: either class ids (N,) or scores (N, classes), e.g. logits or
  probabilities. Scores become class ids by argmax; a tie goes to the lowest
  class id (numpy's argmax keeps the first maximum). Scores must be finite.
- Empty input raises ValueError: an accuracy over no instances is undefined.
- A class that is never predicted is not special: its recall is 0 if it is
  present in the labels, and it is ignored otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _args

__all__ = [
    "as_predictions",
    "top1_accuracy",
    "topk_accuracy",
    "mean_class_accuracy",
    "per_class_accuracy",
    "confusion_matrix",
]

#: The largest confusion matrix built (C x C int64: 800 MB at this C).
#: FineGym has at most 530 classes; beyond this, ids are probably not classes.
MAX_CONFUSION_CLASSES = 10_000


_INT64_MAX = np.iinfo(np.int64).max


def _ids(a: np.ndarray, name: str) -> np.ndarray:
    """Integer class ids as int64; ids beyond int64 (uint64 >= 2**63) are
    refused instead of wrapping round to negative numbers."""
    if a.dtype.kind == "O" and a.size and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                              for v in a.ravel()):
        raise ValueError(f"{name} holds integers outside the int64 range (e.g. {max(a.ravel(), key=abs)}); "
                         "class ids are small non-negative integers")
    if a.dtype.kind not in "iu":
        what = "1-D predictions" if name == "predictions" else name
        raise ValueError(f"{what} must be integer class ids, got dtype {a.dtype}"
                         + (" (pass scores as an (N, classes) array)" if name == "predictions" else ""))
    if a.dtype == np.uint64 and a.size and a.max() > _INT64_MAX:
        bad = int(np.flatnonzero(a > _INT64_MAX)[0])
        raise ValueError(f"{name}[{bad}] is {int(a[bad])}, outside the int64 range; "
                         "class ids are small non-negative integers")
    return a.astype(np.int64, copy=False)


def _labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D class ids, got an array of shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels is empty: an accuracy over no instances is undefined")
    y = _ids(y, "labels")
    if y.min() < 0:
        bad = int(np.flatnonzero(y < 0)[0])
        raise ValueError(
            f"labels[{bad}] is {int(y[bad])}: negative labels mean unlabelled (-1) and have no class; "
            f"{int((y < 0).sum())} of {len(y)} are negative. Evaluate only labelled instances (labels >= 0)"
        )
    return y


def _scores(scores: Any, n: int, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"{name} must be (N, classes), got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} rows but labels has {n} entries")
    if s.shape[1] == 0:
        raise ValueError(f"{name} has no class columns (shape {s.shape})")
    if s.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
    if s.dtype.kind == "f" and not np.isfinite(s).all():
        row = int(np.flatnonzero(~np.isfinite(s).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or infinite values (row {row})")
    return s


def as_predictions(predictions: Any, n: int | None = None) -> np.ndarray:
    """Class ids (N,) int64 from class ids (N,) or scores (N, classes) (argmax,
    ties to the lowest class id). ``n``, when given, is the expected N."""
    p = np.asarray(predictions)
    if p.ndim == 2:
        s = _scores(p, p.shape[0] if n is None else n, "predictions")
        return np.argmax(s, axis=1).astype(np.int64)
    if p.ndim != 1:
        raise ValueError(f"predictions must be class ids (N,) or scores (N, classes), got shape {p.shape}")
    if n is not None and len(p) != n:
        raise ValueError(f"predictions has {len(p)} entries but labels has {n}")
    if not p.size:
        return p.astype(np.int64)
    p = _ids(p, "predictions")
    if p.min() < 0:
        raise ValueError(f"predictions must be class ids >= 0, got {int(p.min())}")
    return p


def _pair(labels: Any, predictions: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(labels)
    p = as_predictions(predictions, len(y))
    if np.asarray(predictions).ndim == 2 and y.max() >= np.asarray(predictions).shape[1]:
        raise ValueError(
            f"labels go up to {int(y.max())} but the scores have only {np.asarray(predictions).shape[1]} class columns"
        )
    return y, p


def top1_accuracy(labels: Any, predictions: Any) -> float:
    """Fraction of instances whose predicted class is the label (0..1)."""
    y, p = _pair(labels, predictions)
    return float(np.mean(y == p))


def topk_accuracy(labels: Any, scores: Any, k: int) -> float:
    """Fraction of instances whose label is among the ``k`` highest scores.

    Ties are ranked the way argmax breaks them: among equal scores, the lower
    class id ranks first. So the label's rank is the number of classes scoring
    strictly higher plus the number of lower class ids scoring the same, and
    the instance counts when that rank is below k. ``k=1`` equals
    :func:`top1_accuracy` on the same scores; ``k >= classes`` gives 1."""
    y = _labels(labels)
    s = _scores(scores, len(y))
    k = _args.count(k, "k", 1)
    if y.max() >= s.shape[1]:
        raise ValueError(f"labels go up to {int(y.max())} but the scores have only {s.shape[1]} class columns")
    own = s[np.arange(len(y)), y][:, None]
    higher = (s > own).sum(axis=1)
    tied_before = ((s == own) & (np.arange(s.shape[1])[None, :] < y[:, None])).sum(axis=1)
    return float(np.mean(higher + tied_before < k))


def per_class_accuracy(labels: Any, predictions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class recall over the classes present in ``labels``.

    Returns (classes, recall, support): the sorted class ids present in the
    labels, the fraction of each class's instances predicted as that class,
    and each class's instance count."""
    y, p = _pair(labels, predictions)
    classes, inverse, support = np.unique(y, return_inverse=True, return_counts=True)
    correct = np.bincount(inverse, weights=(y == p), minlength=len(classes))
    return classes, correct / support, support


def mean_class_accuracy(labels: Any, predictions: Any) -> float:
    """FineGym's Mean Class Accuracy: the unweighted mean, over the classes
    present in ``labels``, of per-class recall (0..1). Classes absent from
    the labels do not count, even when predicted; a class present in the
    labels but never predicted counts with recall 0. Equals scikit-learn's
    ``balanced_accuracy_score`` (without ``adjusted``)."""
    _, recall, _ = per_class_accuracy(labels, predictions)
    return float(recall.mean())


def confusion_matrix(labels: Any, predictions: Any, num_classes: int | None = None) -> np.ndarray:
    """int64 (C, C) counts: row = true class, column = predicted class.

    C is ``num_classes`` when given (every label and prediction must be below
    it), else 1 + the largest id among labels and predictions (and the score
    columns, when predictions are scores)."""
    y, p = _pair(labels, predictions)
    columns = np.asarray(predictions).shape[1] if np.asarray(predictions).ndim == 2 else 0
    if num_classes is None:
        c = max(int(y.max()), int(p.max()), columns - 1) + 1
        if c > MAX_CONFUSION_CLASSES:
            raise ValueError(
                f"class ids go up to {c - 1}: a confusion matrix over {c} classes is refused "
                f"(at most {MAX_CONFUSION_CLASSES}); are these really class ids?"
            )
    else:
        num_classes = _args.count(num_classes, "num_classes", 1)
        if num_classes > MAX_CONFUSION_CLASSES:
            raise ValueError(f"num_classes is {num_classes}; at most {MAX_CONFUSION_CLASSES} are allowed")
        c = int(num_classes)
        if columns > c:
            raise ValueError(f"num_classes is {c} but the scores have {columns} class columns")
        for name, ids in (("labels", y), ("predictions", p)):
            if ids.max() >= c:
                raise ValueError(f"num_classes is {c} but {name} contain class id {int(ids.max())}")
    return np.bincount(y * c + p, minlength=c * c).reshape(c, c).astype(np.int64)
