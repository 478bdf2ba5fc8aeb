"""Synthetic FineGym-shaped features, in the exact layout of the released
pickles: a dict element id -> float32 array (T, C, 1, 1) (TSN, ResNet) or
(T, C, 1, 1, 1) (I3D). The real features are no longer downloadable; these
stand in for them in the demo, the tests and the benchmarks.

Ids follow the real pattern ``{VIDEO}_E_{ES:06d}_{EE:06d}_A_{AS:04d}_{AE:04d}``;
labels follow a long-tailed, gym99-like distribution (class sizes from 1130
down to 47, geometrically); every feature vector is its class prototype plus
noise, so a classifier can learn from them.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import numpy as np

__all__ = ["MODELS", "make_ids", "long_tailed_labels", "make_features", "write_split", "write_pickle"]

#: Per-instance shapes of the released features (T = 12 segments).
MODELS = {
    "tsn": (12, 1024, 1, 1),  # BN-Inception
    "resnet50": (12, 2048, 1, 1),
    "i3d": (12, 2048, 1, 1, 1),
}

_YT = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


def make_ids(n: int, seed: int = 0) -> list[str]:
    """n unique element ids in the FineGym pattern: a few videos, several
    events per video, several elements per event."""
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        video = "".join(rng.choice(list(_YT), 11))
        event_start = int(rng.integers(0, 9000))
        for _ in range(int(rng.integers(1, 6))):  # events in this video
            length = int(rng.integers(30, 90))
            element_start = 0
            for _ in range(int(rng.integers(3, 12))):  # elements in this event
                element_start += int(rng.integers(0, 5))
                element_end = element_start + int(rng.integers(0, 3))
                if element_end > length:
                    break
                key = f"{video}_E_{event_start:06d}_{event_start + length:06d}_A_{element_start:04d}_{element_end:04d}"
                # A zero-length element (AS == AE) followed by a zero step
                # repeats an id: keep the first, so that the loop counts
                # unique ids (draws, and so the ids, are unchanged).
                if key not in seen:
                    seen.add(key)
                    ids.append(key)
                element_start = element_end
            event_start += length + int(rng.integers(5, 120))
    return ids[:n]


def long_tailed_labels(n: int, num_classes: int = 99, seed: int = 0) -> np.ndarray:
    """int32 labels with gym99's long tail: class k's share falls
    geometrically from 1130 to 47 (the real gym99 train extremes). Every
    class appears when n >= num_classes."""
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(1130, 47, num_classes)
    p = sizes / sizes.sum()
    base = np.arange(num_classes) if n >= num_classes else np.empty(0, dtype=np.int64)
    rest = rng.choice(num_classes, size=n - len(base), p=p)
    labels = np.concatenate([base, rest]).astype(np.int32)
    rng.shuffle(labels)
    return labels


def make_features(
    ids: Sequence[str],
    labels: np.ndarray,
    shape: Sequence[int] = MODELS["tsn"],
    seed: int = 0,
    signal: float = 1.0,
    dtype: str = "float32",
) -> dict[str, np.ndarray]:
    """{id: array of `shape`} with a class signal: prototype[label] (varying
    slowly over the T segments) plus unit noise."""
    rng = np.random.default_rng(seed)
    t, c = int(shape[0]), int(shape[1])
    num_classes = int(labels.max()) + 1 if len(labels) else 1
    protos = rng.standard_normal((num_classes, c)).astype(np.float32) * signal
    drift = np.linspace(-0.5, 0.5, t, dtype=np.float32)[:, None]
    out: dict[str, np.ndarray] = {}
    for key, label in zip(ids, labels.tolist()):
        x = rng.standard_normal((t, c), dtype=np.float32)
        x += protos[label] * (1.0 + drift)
        out[key] = x.astype(dtype, copy=False).reshape(tuple(shape))
    return out


def write_split(path: str | os.PathLike[str], ids: Sequence[str], labels: np.ndarray) -> None:
    """A split file in the released format: '<id> <label>' per line, LF."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for key, label in zip(ids, labels.tolist()):
            f.write(f"{key} {label}\n")


def write_pickle(path: str | os.PathLike[str], table: dict[str, np.ndarray], protocol: int = 4) -> None:
    """Write a feature dict the way the release did: one pickle of a dict."""
    with open(path, "wb") as f:
        pickle.dump(table, f, protocol=protocol)
