"""The main job on built-in sample data: synthesize FineGym-shaped feature
pickles (real id pattern, gym99-like long tail, a class signal), convert them
into a store, open it, gather batches, and time each step beside the pickle
workflow it replaces. No download, no ../shared needed."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np

from . import _core, synth
from .convert import convert
from .safe_pickle import load as safe_load
from .store import open as open_store

__all__ = ["run_demo"]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def run_demo(
    instances: int = 2000,
    workdir: str | None = None,
    batch_size: int = 64,
    batches: int = 20,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo; returns what it measured (seconds, counts, accuracy).
    The files it makes stay in ``workdir``; without one they go to a
    temporary folder that is deleted at the end, and the lines ``echo``
    prints name no path in it."""
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        return _run(instances, workdir, True, batch_size, batches, seed, progress, echo)
    with tempfile.TemporaryDirectory(prefix="finegym-demo-") as tmp:
        return _run(instances, tmp, False, batch_size, batches, seed, progress, echo)


def _run(n: int, work: str, keep: bool, batch_size: int, batches: int, seed: int, progress: bool,
         echo: Callable[[str], None]) -> dict[str, Any]:
    report: dict[str, Any] = {"instances": n}
    where = f"in {work} (the files stay there)" if keep else \
        "in a temporary folder, deleted at the end (--workdir DIR keeps the files)"
    echo(f"finegym-store demo: {n} synthetic FineGym instances, gym99 label hierarchy, {where}")

    # 1. Synthesize the release's pickles: one dict per model, plus a split file.
    ids = synth.make_ids(n, seed)
    labels = synth.long_tailed_labels(n, 99, seed)
    split = os.path.join(work, "gym99_sample_element.txt")
    synth.write_split(split, ids, labels)
    pickles = {}
    t0 = time.perf_counter()
    for model in ("tsn", "i3d"):
        features = synth.make_features(ids, labels, synth.MODELS[model], seed=seed, signal=0.15)
        pickles[model] = os.path.join(work, f"{model}_sample.pkl")
        synth.write_pickle(pickles[model], features)
        del features
    report["synthesize_s"] = time.perf_counter() - t0
    size = sum(os.path.getsize(p) for p in pickles.values())
    echo(f"  synthesized 2 pickles (tsn 12x1024x1x1, i3d 12x2048x1x1x1), {size / 2**20:.0f} MiB, "
         f"in {report['synthesize_s']:.2f} s")

    # 2. Convert.
    categories = resources.files("finegym_store") / "sample" / "gym99_categories.txt"
    out = os.path.join(work, "sample.fgs")
    with resources.as_file(categories) as cat_path:
        _, report["convert_s"] = _timed(lambda: convert(
            pickles, out, split=split, categories=cat_path, overwrite=True, progress=progress))
    shown = out if keep else os.path.basename(out)
    echo(f"  converted to {shown} ({os.path.getsize(out) / 2**20:.0f} MiB) in {report['convert_s']:.2f} s")

    # 3. Open the store vs load the pickle a training script would load.
    store, report["open_s"] = _timed(lambda: open_store(out))
    table, report["pickle_load_s"] = _timed(lambda: safe_load(pickles["i3d"]))
    echo(f"  open store: {report['open_s'] * 1e3:.2f} ms   vs   load i3d pickle: "
         f"{report['pickle_load_s'] * 1e3:.0f} ms ({report['pickle_load_s'] / report['open_s']:.0f}x)")

    # 4. Random training batches, TSN-style (3 of the 12 segments, random
    #    within equal parts): one C++ gather per batch vs the same sampling
    #    done per item in Python over the pickle's dict.
    rng = np.random.default_rng(seed)
    batch_idx = [rng.integers(0, n, batch_size) for _ in range(batches)]
    keys = store.ids.to_list()

    def from_store() -> list[np.ndarray]:
        return [store.gather("i3d", idx, num_segments=3, mode="train", seed=seed) for idx in batch_idx]

    def from_pickle() -> list[np.ndarray]:
        return [np.stack([table[keys[i]].reshape(12, 2048)[_core.sample_segments(12, 3, 1, "train", seed=seed,
                                                                                 index=int(i))]
                          for i in idx]) for idx in batch_idx]

    got, report["gather_store_s"] = _timed(from_store)
    expected, report["gather_pickle_s"] = _timed(from_pickle)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, expected)), "store and pickle batches differ"
    echo(f"  {batches} train batches of {batch_size} x 3 x 2048 (TSN sampling): store.gather "
         f"{report['gather_store_s'] * 1e3:.1f} ms, pickle dict + Python sampling "
         f"{report['gather_pickle_s'] * 1e3:.1f} ms; identical bytes")
    loader = store.loader("i3d", batch_size=batch_size, num_segments=3, mode="train", seed=seed, prefetch=2)
    _, report["epoch_s"] = _timed(lambda: sum(len(b) for b in loader))
    echo(f"  one epoch through store.loader ({len(loader)} batches, prefetch 2): {report['epoch_s'] * 1e3:.1f} ms")

    # 5. Check what came out: bytes equal to the pickle, and a class signal.
    i = int(batch_idx[0][0])
    assert np.array_equal(store.features("i3d", i), table[keys[i]].reshape(12, 2048))  # bytes equal to the pickle
    report["nearest_mean_accuracy"] = _nearest_class_mean_accuracy(store)
    names = store.label_names or {}
    top = int(np.bincount(store.labels).argmax())
    echo(f"  most frequent class {top}: {names.get(top, '?')!r}")
    echo(f"  nearest-class-mean accuracy on mean-pooled tsn features: "
         f"{report['nearest_mean_accuracy']:.1%} (chance {1 / 99:.1%})")
    return report


def _nearest_class_mean_accuracy(store: Any) -> float:
    """Fit class means on even instances, score odd ones: proof of signal."""
    x = store.column("tsn").values.mean(axis=1)
    y = store.labels
    train, test = np.arange(0, len(y), 2), np.arange(1, len(y), 2)
    classes = np.unique(y[train])
    means = np.stack([x[train][y[train] == c].mean(axis=0) for c in classes])
    d = ((x[test, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return float((classes[d.argmin(axis=1)] == y[test]).mean())
