"""The FineGym evaluation protocol on stored features: train a small
classifier (a linear probe, or a one-hidden-layer MLP) over the TSN consensus
of K sampled segments, evaluate it, and report the FineGym model-zoo metrics
(Mean Class Accuracy and Top-1) at the element, set and event levels.

    from finegym_store.probe import run_probe, run_probes
    result = run_probe("gym99_train.fgs", "gym99_val.fgs", "i3d", num_segments=3)
    result.levels["element"]          # {'mean_class_acc': ..., 'top1': ..., ...}
    table = run_probes([("gym99_train.fgs", "gym99_val.fgs")], ["tsn", "i3d"])
    print(table.to_markdown())

Protocol (docs/evaluation.md):

- Training reads the train store through ``Store.loader`` in ``mode="train"``
  (TSN sampling: one random segment in each of K equal parts), shuffled, one
  loader iteration per epoch; the features of an instance are the mean of its
  K segments (TSN's average consensus). Unlabelled instances (-1) are skipped.
- Features are standardized with the mean and standard deviation of the
  consensus over (up to 4096 of) the training instances, in test-mode sampling.
- Softmax cross-entropy, Adam (L2 weight decay on weights, not biases), a
  cosine learning-rate decay to 0 over all steps. ``backend="numpy"`` runs a
  small numpy trainer; ``"torch"`` the same model, initial weights, batches and
  schedule in PyTorch; ``"auto"`` takes torch when it is installed.
- Evaluation reads the val store in ``mode="test"`` (the centre segment of
  each of the K parts), in order. Element predictions are the argmax of the
  scores (ties to the lowest class id); set and event predictions are the set
  and event of the predicted element, from the hierarchy stored in the file.
- The time spent waiting for batches (including the standardization pass) is
  measured and reported as a fraction of the run. The classifier runs on one
  core fewer than available by default, leaving one to the loader's prefetch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _args, labelspace, metrics
from .errors import LabelSpaceError
from .store import Store, open as open_store

__all__ = [
    "LEVELS",
    "HEADS",
    "BACKENDS",
    "EVENT_ORDER",
    "Hierarchy",
    "ProbeResult",
    "ProbeTable",
    "evaluate",
    "check_label_spaces",
    "run_probe",
    "run_probes",
    "make_demo_pair",
    "class_tick_labels",
]

LEVELS = ("element", "set", "event")
HEADS = ("linear", "mlp")
BACKENDS = ("auto", "numpy", "torch")
#: FineGym's four events, in the order the paper lists them.
EVENT_ORDER = ("VT", "FX", "BB", "UB")
#: Class ids the probe accepts (a head of channels x classes weights; FineGym's
#: largest label set, gym530, has 530).
MAX_CLASSES = 10_000
#: Training instances used to estimate the standardization mean and std.
NORM_SAMPLE = 4096

_BETAS = (0.9, 0.999)
_EPS = 1e-8


# --------------------------------------------------------------------------
# The label hierarchy
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """Element label -> set id and event, from a store's ``classes``.

    ``set_of[label]`` is the set id (1 = vault, 2x floor, 3x beam, 4x bars)
    and ``event_of[label]`` an index into ``events`` (VT, FX, BB, UB first, in
    that order); both are -1 for labels the hierarchy does not list."""

    set_of: np.ndarray
    event_of: np.ndarray
    events: tuple[str, ...]
    names: dict[int, str]

    @classmethod
    def from_store(cls, store: Store) -> Hierarchy | None:
        """The hierarchy stored in ``store``, or None when it has none."""
        c = store.classes
        if c is None:
            return None
        label = np.asarray(c.label, dtype=np.int64)
        if len(label) == 0:
            return None
        if label.min() < 0 or label.max() >= MAX_CLASSES:
            raise ValueError(f"{store.path}: the label hierarchy lists class label "
                             f"{int(label.min() if label.min() < 0 else label.max())}; expected 0..{MAX_CLASSES - 1}")
        event_names = c.event.to_list()
        events = list(EVENT_ORDER) + sorted(set(event_names) - set(EVENT_ORDER))
        size = int(label.max()) + 1
        set_of = np.full(size, -1, dtype=np.int64)
        event_of = np.full(size, -1, dtype=np.int64)
        set_of[label] = np.asarray(c.set, dtype=np.int64)
        event_of[label] = [events.index(e) for e in event_names]
        return cls(set_of, event_of, tuple(events), dict(zip(label.tolist(), c.name.to_list())))

    def map(self, labels: np.ndarray, level: str, what: str = "labels") -> np.ndarray:
        """Element labels mapped to ``level`` ("element", "set" or "event").
        Raises ValueError naming a label the hierarchy does not list."""
        labels = np.asarray(labels, dtype=np.int64)
        if level == "element":
            return labels
        table = {"set": self.set_of, "event": self.event_of}.get(level)
        if table is None:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        out = np.full(len(labels), -1, dtype=np.int64)
        known = (labels >= 0) & (labels < len(table))
        out[known] = table[labels[known]]
        if (out < 0).any():
            bad = int(labels[np.flatnonzero(out < 0)[0]])
            raise ValueError(f"{what}: class {bad} is not in the stored label hierarchy, so it has no {level}")
        return out


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _scores_summary(labels: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    return {
        "mean_class_acc": metrics.mean_class_accuracy(labels, predictions),
        "top1": metrics.top1_accuracy(labels, predictions),
        "classes": int(len(np.unique(labels))),
        "instances": int(len(labels)),
    }


def evaluate(labels: Any, predictions: Any, hierarchy: Hierarchy | None = None,
             levels: Sequence[str] = ("element",)) -> dict[str, Any]:
    """Metrics of element predictions (class ids (N,) or scores (N, classes))
    against element ``labels`` at each of ``levels``, plus, given a hierarchy,
    the element-level metrics of each event's instances.

    Returns ``{"levels": {level: {mean_class_acc, top1, classes, instances}},
    "per_event": {event: {...}}}`` with accuracies in 0..1. Set and event
    predictions are the set and event of the predicted element; a predicted
    class the hierarchy does not list counts as wrong."""
    y = np.asarray(labels)
    _check_scores_fit(predictions, hierarchy)
    pred = metrics.as_predictions(predictions, len(y))
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if level != "element" and hierarchy is None:
            raise ValueError(f"level {level!r} needs the label hierarchy, but the store has none "
                             "(convert with --categories)")
    out: dict[str, Any] = {"levels": {}, "per_event": {}}
    for level in levels:
        if level == "element":
            out["levels"][level] = _scores_summary(y, pred)
            continue
        assert hierarchy is not None
        true = hierarchy.map(y, level)
        # Predictions outside the hierarchy get an id no label has: wrong.
        table = hierarchy.set_of if level == "set" else hierarchy.event_of
        mapped = np.full(len(pred), int(table.max()) + 1, dtype=np.int64)
        inside = pred < len(table)
        mapped[inside] = table[pred[inside]]
        mapped[mapped < 0] = int(table.max()) + 1
        out["levels"][level] = _scores_summary(true, mapped)
    if hierarchy is not None:
        metrics._labels(y)  # the same refusal of -1 / empty before mapping
        event = hierarchy.map(y, "event")
        for k, name in enumerate(hierarchy.events):
            mask = event == k
            if mask.any():
                out["per_event"][name] = _scores_summary(y[mask], pred[mask])
    return out


# --------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------


def _init_params(head: str, channels: int, classes: int, hidden: int, seed: int) -> list[np.ndarray]:
    """Initial weights, shared by both backends: zeros for the linear head;
    He-normal hidden layer and a small normal output layer for the MLP."""
    if head == "linear":
        return [np.zeros((channels, classes), np.float32), np.zeros(classes, np.float32)]
    rng = np.random.default_rng([seed, 1])
    w1 = (rng.standard_normal((channels, hidden)) * math.sqrt(2.0 / channels)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) * math.sqrt(1.0 / hidden)).astype(np.float32)
    return [w1, np.zeros(hidden, np.float32), w2, np.zeros(classes, np.float32)]


class _NumpyTrainer:
    """Softmax regression (or a ReLU MLP) with Adam, in float32 numpy."""

    backend = "numpy"

    def __init__(self, params: list[np.ndarray], weight_decay: float) -> None:
        self.params = [p.copy() for p in params]
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.wd = np.float32(weight_decay)
        self.t = 0

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if len(self.params) == 2:
            return x @ self.params[0] + self.params[1], None
        h = x @ self.params[0] + self.params[1]
        a = np.maximum(h, 0)
        return a @ self.params[2] + self.params[3], a

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        # A diverging run overflows: the probe checks the loss itself and
        # raises, so numpy's warnings would only repeat it.
        with np.errstate(over="ignore", invalid="ignore"):
            return self._step(x, y, lr)

    def _step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        z, a = self._forward(x)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
        n = len(y)
        rows = np.arange(n)
        loss = float(-np.log(np.maximum(p[rows, y], 1e-30)).mean())
        g = p
        g[rows, y] -= 1
        g /= np.float32(n)
        if a is None:
            grads = [x.T @ g, g.sum(axis=0)]
        else:
            da = g @ self.params[2].T
            da *= a > 0
            grads = [x.T @ da, da.sum(axis=0), a.T @ g, g.sum(axis=0)]
        self.t += 1
        b1, b2 = _BETAS
        c1 = 1 - b1**self.t
        c2 = 1 - b2**self.t
        for i, (w, gr) in enumerate(zip(self.params, grads)):
            if i % 2 == 0:  # weights (not biases) get L2 decay, as torch's Adam weight_decay
                gr = gr + self.wd * w
            self.m[i] *= b1
            self.m[i] += (1 - b1) * gr
            self.v[i] *= b2
            self.v[i] += (1 - b2) * gr * gr
            denom = np.sqrt(self.v[i]) / np.float32(math.sqrt(c2)) + np.float32(_EPS)
            w -= np.float32(lr / c1) * self.m[i] / denom
        return loss

    def scores(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return self._forward(x)[0]


class _TorchTrainer:
    """The same model, initial weights and optimizer in PyTorch."""

    backend = "torch"

    def __init__(self, params: list[np.ndarray], weight_decay: float) -> None:
        import torch

        self.torch = torch
        self.params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        groups = [{"params": self.params[0::2], "weight_decay": weight_decay},
                  {"params": self.params[1::2], "weight_decay": 0.0}]
        self.opt = torch.optim.Adam(groups, lr=1e-3, betas=_BETAS, eps=_EPS)

    def _forward(self, x: Any) -> Any:
        p = self.params
        if len(p) == 2:
            return x @ p[0] + p[1]
        return self.torch.relu(x @ p[0] + p[1]) @ p[2] + p[3]

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        torch = self.torch
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.cross_entropy(self._forward(torch.from_numpy(x)),
                                                 torch.from_numpy(y.astype(np.int64)))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def scores(self, x: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self._forward(self.torch.from_numpy(x)).numpy()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def _compute_threads(backend: str, threads: int) -> Iterator[None]:
    """Limit the classifier's thread pools to ``threads`` for the probe,
    restored after: torch's intra-op threads, and numpy's BLAS threads when
    threadpoolctl is installed (it comes with scikit-learn)."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            stack.enter_context(threadpool_limits(limits=threads))
        if backend == "torch":
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            stack.callback(torch.set_num_threads, before)
        yield


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return backend
    try:
        import torch
    except ImportError:
        if backend == "torch":
            raise ValueError("backend 'torch' needs PyTorch: pip install 'finegym-store[torch]' "
                             "(or use --backend numpy)") from None
        return "numpy"
    # torch imports more on its first optimizer (seconds on a small machine):
    # pay that here, like `import torch`, rather than inside the timed probe.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return "torch"


# --------------------------------------------------------------------------
# One probe
# --------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """One probe: a classifier trained on one column of a train store and
    evaluated on a val store. Accuracies are fractions (0..1)."""

    dataset: str
    column: str
    train: str
    val: str
    head: str
    backend: str
    num_segments: int | None
    epochs: int
    seed: int
    num_classes: int
    train_instances: int
    val_instances: int
    val_unlabelled: int
    levels: dict[str, dict[str, Any]]
    per_event: dict[str, dict[str, Any]]
    #: Per-class element accuracy on val: class, recall, val support, train count, name (from the
    #: stored hierarchy; None without one).
    per_class: dict[str, list[Any]]
    #: Seconds: total, data_wait (blocked on batches), train, eval; data_wait_fraction.
    timing: dict[str, float]
    final_loss: float
    #: Element predictions on the labelled val instances, in store order.
    predictions: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    #: Their labels.
    labels: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    #: Element top-5 accuracy on val (top-k with k = the number of classes when below 5).
    top5: float | None = None
    #: The ids of the labelled val instances, in store order.
    ids: list[str] = field(repr=False, default_factory=list)
    #: (N, k) their k = min(5, classes) highest-scoring classes, best first (ties to the lower class id, as in
    #: metrics.topk_accuracy).
    top5_classes: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 5), np.int64))
    #: Element confusion matrix (rows: true class, columns: predicted class) over
    #: ``confusion_classes``, the class ids present among the labels or the predictions.
    confusion: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.int64))
    confusion_classes: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the scalar fields, per_class, and the arrays as
        ``per_instance`` ({id, label, predicted, top5}: one entry per labelled
        val instance, in store order) and ``confusion_matrix`` ({classes,
        matrix}: rows true, columns predicted)."""
        arrays = ("predictions", "labels", "ids", "top5_classes", "confusion", "confusion_classes")
        d = {k: v for k, v in self.__dict__.items() if k not in arrays}
        d["per_instance"] = {"id": list(self.ids), "label": self.labels.tolist(),
                             "predicted": self.predictions.tolist(), "top5": self.top5_classes.tolist()}
        d["confusion_matrix"] = {"classes": self.confusion_classes.tolist(), "matrix": self.confusion.tolist()}
        return json.loads(json.dumps(d))


def _dataset_name(train: Store, val: Store) -> str:
    """Gym99 / Gym288 / Gym530 from the stored hierarchy, else the val file's name."""
    for store in (val, train):
        c = store.classes
        if c is not None and len(c.label) in (99, 288, 530):
            return f"Gym{len(c.label)}"
    return os.path.splitext(os.path.basename(val.path))[0]


def check_label_spaces(train: Store, val: Store, levels: Sequence[str] = ("element",)) -> None:
    """Refuse a train/val pair that does not share one label space (different
    hierarchies or FineGym subsets, val labels that are not train classes) or
    asks for a set/event level without a hierarchy: LabelSpaceError naming
    both stores (labelspace.check_pair)."""
    labelspace.check_pair(train, val, levels)


def _check_scores_fit(predictions: Any, hierarchy: Hierarchy | None) -> None:
    """Scores (N, classes) evaluated against a hierarchy must have one column
    per class of it: LabelSpaceError otherwise."""
    p = np.asarray(predictions)
    if hierarchy is not None and p.ndim == 2 and p.shape[1] != len(hierarchy.set_of):
        raise LabelSpaceError(f"the scores have {p.shape[1]} class columns but the label hierarchy has classes "
                              f"0..{len(hierarchy.set_of) - 1}; were they made for another label set?")


def _as_store(s: Store | str | os.PathLike[str]) -> Store:
    return s if isinstance(s, Store) else open_store(s)


def _check_int(name: str, value: Any, low: int) -> int:
    return _args.count(value, name, low)


def _check_real(name: str, value: Any, positive: bool) -> float:
    return _args.real(value, name, positive=positive)


def _memory_bytes() -> int:
    """This machine's physical memory (0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_model_fits(head: str, channels: int, classes: int, hidden: int, batch: int, segments: int,
                      sample: int, prefetch: int) -> None:
    """Refuse a probe whose classifier or batches cannot fit in memory,
    before anything is allocated. Estimate: 32 bytes per parameter (the
    float64 draw of the initial weights, the float32 weights, their copy in
    the trainer, the gradient and Adam's two moments), 16 bytes per
    activation of a batch, and the float32 features of the standardization
    sample and of the batches in flight (prefetch + 2)."""
    params = channels * classes + classes if head == "linear" else (
        channels * hidden + hidden + hidden * classes + classes)
    width = classes if head == "linear" else hidden + classes
    model = 32 * params + 16 * batch * width
    data = 4 * segments * channels * (sample + batch * (prefetch + 2))
    have = _memory_bytes()
    if not have or model + data <= have:
        return
    if model > data:
        size = f"{channels} x {hidden} x {classes}" if head == "mlp" else f"{channels} x {classes}"
        raise ValueError(f"hidden={hidden}: the {head} classifier ({size}, {params:,} parameters) needs about "
                         f"{model / 1e9:,.1f} GB for its weights, gradients and optimizer state, more than this "
                         f"machine's {have / 1e9:,.1f} GB of memory; use a smaller hidden")
    raise ValueError(f"num_segments={segments}, batch_size={batch}: the probe's batches of {segments} x {channels} "
                     f"features need about {data / 1e9:,.1f} GB, more than this machine's {have / 1e9:,.1f} GB "
                     "of memory; use fewer segments or a smaller batch")


class _WaitClock:
    """Seconds the probe spent blocked on data (batches it asked for)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The items of ``batches``, adding the time each took to arrive."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            self.seconds += time.perf_counter() - t0
            if item is None:
                return
            yield item


def run_probe(
    train: Store | str | os.PathLike[str],
    val: Store | str | os.PathLike[str],
    column: str,
    num_segments: int | None = 3,
    head: str = "linear",
    backend: str = "auto",
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    hidden: int = 512,
    seed: int = 0,
    levels: Sequence[str] = ("element",),
    prefetch: int = 2,
    threads: int | None = None,
    compute_threads: int | None = None,
    dataset: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Train a ``head`` ("linear" or "mlp") on ``column`` of the ``train``
    store and evaluate it on ``val`` (stores or paths); see the module
    docstring for the protocol. ``levels`` picks the hierarchy levels
    evaluated (element, set, event); ``log`` receives progress lines.
    ``threads`` is the C++ gather threads (default: the cores available) and
    ``compute_threads`` the classifier's (torch's intra-op threads; numpy's
    BLAS through threadpoolctl when installed), by default one core fewer than
    available (at least 1): a core is left to the loader's prefetch, which
    otherwise competes with spinning BLAS threads for the CPU while the probe
    waits for its batches. Both are restored after the probe.
    ``dataset`` names the table's dataset (default: Gym99
    or Gym288 from the stored hierarchy, else the val store's file name)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    hidden = _check_int("hidden", hidden, 1)
    if num_segments is not None:
        num_segments = _check_int("num_segments", num_segments, 1)
    if threads is not None:
        threads = _check_int("threads", threads, 1)
    compute_threads = max(1, _cores() - 1) if compute_threads is None else _check_int(
        "compute_threads", compute_threads, 1)
    lr = _check_real("lr", lr, positive=True)
    weight_decay = _check_real("weight_decay", weight_decay, positive=False)
    seed = _check_int("seed", seed, 0)
    prefetch = _check_int("prefetch", prefetch, 0)
    backend = _resolve_backend(backend)
    t_start = time.perf_counter()
    tr, va = _as_store(train), _as_store(val)
    channels = tr.column(column).channels
    if va.column(column).channels != channels:
        raise ValueError(f"column {column!r} has {channels} channels in {tr.path} "
                         f"but {va.column(column).channels} in {va.path}")
    check_label_spaces(tr, va, levels)
    hierarchy = Hierarchy.from_store(va) or Hierarchy.from_store(tr)
    y_train = np.asarray(tr.labels)
    y_val_all = np.asarray(va.labels)
    labelled_train = np.flatnonzero(y_train >= 0)
    if len(labelled_train) == 0:
        raise ValueError(f"{tr.path}: no labelled instance to train on (every label is -1)")
    val_keep = np.flatnonzero(y_val_all >= 0)
    if len(val_keep) == 0:
        raise ValueError(f"{va.path}: no labelled instance to evaluate on (every label is -1)")
    num_classes = int(max(y_train.max(), y_val_all.max())) + 1
    if num_classes > MAX_CLASSES:
        which = tr.path if y_train.max() >= y_val_all.max() else va.path
        raise ValueError(f"{which}: labels go up to {num_classes - 1}; the probe takes class ids below "
                         f"{MAX_CLASSES} (FineGym's go up to 529)")
    if hierarchy is not None:
        num_classes = max(num_classes, len(hierarchy.set_of))
        # Every evaluated label must have a set and an event: say so now, not after training.
        hierarchy.map(y_val_all[val_keep], "event", what=f"{va.path} labels")
    _check_model_fits(head, channels, num_classes, hidden, min(batch_size, len(labelled_train)),
                      num_segments or tr.column(column).shape[1] or 1, min(len(labelled_train), NORM_SAMPLE),
                      prefetch)
    name = dataset or _dataset_name(tr, va)
    say = log or (lambda _msg: None)
    clock = _WaitClock()

    # Standardization statistics from (up to) NORM_SAMPLE training instances.
    rng = np.random.default_rng([seed, 2])
    sample = np.sort(rng.choice(labelled_train, min(len(labelled_train), NORM_SAMPLE), replace=False))
    t0 = time.perf_counter()
    xs = tr.gather(column, sample, num_segments=num_segments, mode="test", threads=threads)
    clock.seconds += time.perf_counter() - t0
    xs = xs.mean(axis=1, dtype=np.float32)
    if not np.isfinite(xs).all():
        bad = int(sample[np.flatnonzero(~np.isfinite(xs).all(axis=1))[0]])
        raise ValueError(f"{tr.path}: column {column!r} holds NaN or infinite values (instance {bad}); "
                         "the probe needs finite features")
    mu = xs.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = xs.std(axis=0, dtype=np.float64).astype(np.float32)
    sd[~(sd > 1e-6)] = 1.0
    inv_sd = (1.0 / sd).astype(np.float32)
    del xs

    def consensus(features: np.ndarray) -> np.ndarray:
        x = features.mean(axis=1, dtype=np.float32)
        x -= mu
        x *= inv_sd
        return x

    with _compute_threads(backend, compute_threads):
        params = _init_params(head, channels, num_classes, hidden, seed)
        trainer: _NumpyTrainer | _TorchTrainer = (
            _TorchTrainer(params, weight_decay) if backend == "torch" else _NumpyTrainer(params, weight_decay))
        loader = tr.loader(column, batch_size, num_segments=num_segments, mode="train", shuffle=True, seed=seed,
                           prefetch=prefetch, threads=threads)
        total_steps = epochs * len(loader)
        step = 0
        loss_sum, loss_n = 0.0, 0
        say(f"{name} / {column}: {head} probe ({backend}), {len(labelled_train)} train instances, "
            f"{num_classes} classes, {epochs} epochs of {len(loader)} batches")
        t_train = time.perf_counter()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            loss_sum, loss_n = 0.0, 0
            for batch in clock.timed(loader):
                y = np.asarray(batch.labels, dtype=np.int64)
                x = consensus(batch.features)
                keep = y >= 0
                if not keep.all():
                    x, y = x[keep], y[keep]
                lr_now = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                step += 1
                if len(y):
                    loss_sum += trainer.step(x, y, lr_now) * len(y)
                    loss_n += len(y)
            if not math.isfinite(loss_sum):
                raise ValueError(f"{name} / {column}: training diverged in epoch {epoch + 1} (loss {loss_sum:g}): "
                                 f"lower lr (now {lr:g}), or check the features for huge values")
            if epoch == 0 or epoch + 1 == epochs or (epoch + 1) % 5 == 0:
                say(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / max(loss_n, 1):.4f}")
        train_s = time.perf_counter() - t_train

        # Evaluation, test-mode sampling, store order.
        t_eval = time.perf_counter()
        scores = np.empty((len(va), num_classes), dtype=np.float32)
        evaluator = va.loader(column, batch_size, num_segments=num_segments, mode="test", shuffle=False,
                              prefetch=prefetch, threads=threads)
        for batch in clock.timed(evaluator):
            scores[batch.indices] = trainer.scores(consensus(batch.features))
    y_val = y_val_all[val_keep].astype(np.int64)
    scores = scores[val_keep]
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} / {column}: the trained classifier gives non-finite scores on {va.path}: "
                         f"lower lr (now {lr:g}), or check the features for NaN or huge values")
    result = evaluate(y_val, scores, hierarchy, levels)
    pred = metrics.as_predictions(scores)
    classes, recall, support = metrics.per_class_accuracy(y_val, pred)
    k = min(5, scores.shape[1])
    top5 = metrics.topk_accuracy(y_val, scores, k)
    # A stable sort of -scores ranks ties by class id, as topk_accuracy does.
    top5_classes = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
    seen = np.union1d(y_val, pred)
    confusion = metrics.confusion_matrix(np.searchsorted(seen, y_val), np.searchsorted(seen, pred),
                                         num_classes=len(seen))
    all_ids = va.ids.to_list()
    names = hierarchy.names if hierarchy is not None else {}
    train_counts = np.bincount(y_train[labelled_train], minlength=num_classes)
    eval_s = time.perf_counter() - t_eval
    total_s = time.perf_counter() - t_start
    return ProbeResult(
        dataset=name, column=column, train=tr.path, val=va.path, head=head, backend=trainer.backend,
        num_segments=num_segments, epochs=epochs, seed=seed, num_classes=num_classes,
        train_instances=int(len(labelled_train)), val_instances=int(len(val_keep)),
        val_unlabelled=int(len(va) - len(val_keep)), levels=result["levels"], per_event=result["per_event"],
        per_class={"class": classes.tolist(), "recall": recall.tolist(), "val_support": support.tolist(),
                   "train_count": train_counts[classes].tolist(),
                   "name": [names.get(int(c)) for c in classes]},
        timing={"total_s": total_s, "data_wait_s": clock.seconds, "data_wait_fraction": clock.seconds / total_s,
                "train_s": train_s, "eval_s": eval_s},
        final_loss=loss_sum / max(loss_n, 1), predictions=pred, labels=y_val, top5=top5,
        ids=[all_ids[i] for i in val_keep], top5_classes=top5_classes, confusion=confusion,
        confusion_classes=seen.astype(np.int64),
    )


# --------------------------------------------------------------------------
# Several probes: one table
# --------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


#: The metrics summarized over seeds, per level.
SEED_METRICS = ("mean_class_acc", "top1")


def _spread(values: Sequence[float]) -> dict[str, float]:
    """mean, std (the sample standard deviation, ddof=1; 0 for one value), min and max."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def class_tick_labels(per_class: dict[str, list[Any]], order: Sequence[int] | np.ndarray,
                      width: int = 32) -> list[str]:
    """The x tick labels of a per-class plot, in ``order`` (positions in
    ``per_class``): "id name" with the stored class name cut to ``width``
    characters, or the class id alone where there is no name."""
    names = per_class.get("name") or [None] * len(per_class["class"])
    out = []
    for i in order:
        c, nm = per_class["class"][i], names[i]
        if nm:
            out.append(f"{c} {nm if len(nm) <= width else nm[: width - 1] + '…'}")
        else:
            out.append(str(c))
    return out


@dataclass
class ProbeTable:
    """The results of several probes (datasets x columns, each over one or
    more seeds), laid out like the FineGym model-zoo table: one row per
    column (model), a Mean Class Acc and a Top-1 column per dataset and
    level, in percent; over several seeds each cell is "mean ± std"."""

    results: list[ProbeResult]

    def _runs(self, dataset: str, column: str) -> list[ProbeResult]:
        return [r for r in self.results if r.dataset == dataset and r.column == column]

    def _axes(self) -> tuple[list[str], list[str], list[str]]:
        datasets = list(dict.fromkeys(r.dataset for r in self.results))
        columns = list(dict.fromkeys(r.column for r in self.results))
        levels = list(dict.fromkeys(lv for r in self.results for lv in r.levels))
        return datasets, columns, levels

    def _groups(self) -> list[list[ProbeResult]]:
        keys = list(dict.fromkeys((r.dataset, r.column) for r in self.results))
        return [self._runs(d, c) for d, c in keys]

    @staticmethod
    def _cell(values: list[float]) -> str:
        if not values:
            return "–"
        if len(values) == 1:
            return _pct(values[0])
        spread = _spread(values)
        return f"{100 * spread['mean']:.1f} ± {100 * spread['std']:.1f}"

    def to_markdown(self) -> str:
        """The results table, plus a per-event table of the element results
        when the stores hold the label hierarchy."""
        datasets, columns, levels = self._axes()
        header, align = ["Model"], ["---"]
        for d in datasets:
            for lv in levels:
                prefix = d if lv == "element" else f"{d} {lv}"
                header += [f"{prefix} Mean Class Acc", f"{prefix} Top-1"]
                align += ["---:", "---:"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for c in columns:
            row = [c]
            for d in datasets:
                runs = self._runs(d, c)
                for lv in levels:
                    row += [self._cell([r.levels[lv][m] for r in runs if lv in r.levels]) for m in SEED_METRICS]
            lines.append("| " + " | ".join(row) + " |")
        events = [e for e in EVENT_ORDER if any(e in r.per_event for r in self.results)]
        if events:
            lines += ["", "Per event, element level (Mean Class Acc / Top-1):", ""]
            lines.append("| Model | " + " | ".join(f"{d} {e}" for d in datasets for e in events) + " |")
            lines.append("|---|" + "|".join("---:" for _ in datasets for _ in events) + "|")
            for c in columns:
                cells = []
                for d in datasets:
                    runs = self._runs(d, c)
                    for e in events:
                        got = [r.per_event[e] for r in runs if e in r.per_event]
                        cells.append(" / ".join(self._cell([m[k] for m in got]) for k in SEED_METRICS)
                                     if got else "–")
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def over_seeds(self) -> list[dict[str, Any]]:
        """Per (dataset, column): the seeds run and, per level, the mean, std
        (ddof=1), min and max of Mean Class Acc and Top-1 over them (fractions),
        plus the element top-5 ``top5``."""
        out = []
        for runs in self._groups():
            first = runs[0]
            levels = {lv: {m: _spread([r.levels[lv][m] for r in runs]) for m in SEED_METRICS}
                      for lv in first.levels}
            entry: dict[str, Any] = {"dataset": first.dataset, "column": first.column,
                                     "seeds": [r.seed for r in runs], "levels": levels}
            if all(r.top5 is not None for r in runs):
                entry["top5"] = _spread([r.top5 for r in runs])  # type: ignore[misc]
            out.append(entry)
        return out

    def _several_seeds(self) -> bool:
        return any(len(g) > 1 for g in self._groups())

    def summary(self) -> str:
        """One line per probe: setup, top-5 and the share of time spent
        waiting for data; over several seeds, then the spread of each metric."""
        several = self._several_seeds()
        out = []
        for r in self.results:
            t = r.timing
            seed = f"seed {r.seed}, " if several else ""
            top5 = f"top-5 {_pct(r.top5)}%, " if r.top5 is not None else ""
            out.append(f"{r.dataset} / {r.column}: {seed}{r.head} head, {r.backend}, K={r.num_segments}, "
                       f"{r.epochs} epochs, {r.train_instances} train / {r.val_instances} val instances; {top5}"
                       f"{t['total_s']:.1f} s, waiting for batches {100 * t['data_wait_fraction']:.1f}%")
        if several:
            for g in self.over_seeds():
                for lv, ms in g["levels"].items():
                    parts = [f"{label} {100 * ms[m]['mean']:.1f} ± {100 * ms[m]['std']:.1f} "
                             f"(min {100 * ms[m]['min']:.1f}, max {100 * ms[m]['max']:.1f})"
                             for m, label in zip(SEED_METRICS, ("Mean Class Acc", "Top-1"))]
                    out.append(f"{g['dataset']} / {g['column']} {lv}, {len(g['seeds'])} seeds: " + ", ".join(parts))
        return "\n".join(out)

    def to_json(self) -> str:
        """{"results": [every probe's to_dict()]}, and with several seeds per
        probe "over_seeds": :meth:`over_seeds`."""
        doc: dict[str, Any] = {"results": [r.to_dict() for r in self.results]}
        if self._several_seeds():
            doc["over_seeds"] = self.over_seeds()
        return json.dumps(doc, indent=2)

    def figure(self) -> Any:
        """The figure :meth:`plot` saves: one panel per (dataset, column),
        per-class element accuracy (the mean over seeds) with the classes
        sorted by training frequency (most frequent first) and labelled with
        their stored names, and the training count on a log axis beside it.
        Needs matplotlib (the ``plot`` extra); close it with
        ``matplotlib.pyplot.close``."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'finegym-store[plot]'") from None
        groups = self._groups()
        most = max(len(g[0].per_class["class"]) for g in groups)
        fig, axes = plt.subplots(len(groups), 1, figsize=(max(10.0, 0.13 * most), 5.5 * len(groups)),
                                 squeeze=False)
        for ax, runs in zip(axes[:, 0], groups):
            r = runs[0]
            pc = r.per_class
            order = np.argsort(-np.asarray(pc["train_count"]), kind="stable")
            recall = np.mean([np.asarray(run.per_class["recall"]) for run in runs], axis=0)[order]
            counts = np.asarray(pc["train_count"])[order]
            x = np.arange(len(order))
            ax.bar(x, 100 * recall, width=0.85, color="tab:blue", label="val accuracy (recall)")
            ax.set_ylim(0, 100)
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_ylabel("accuracy %")
            ax.set_xlabel("classes, most frequent in train first")
            ax.set_xticks(x)
            ax.set_xticklabels(class_tick_labels(pc, order), rotation=90, fontsize=6)
            if "element" in r.levels:
                mca = float(np.mean([run.levels["element"]["mean_class_acc"] for run in runs]))
            else:
                mca = float(recall.mean())
            seeds = f", mean of {len(runs)} seeds" if len(runs) > 1 else ""
            ax.set_title(f"{r.dataset} / {r.column} ({r.head}): per-class accuracy, mean {100 * mca:.1f}%{seeds}")
            ax2 = ax.twinx()
            ax2.plot(x, np.maximum(counts, 1), color="tab:orange", label="train instances")
            ax2.set_yscale("log")
            ax2.set_ylabel("train instances (log)")
        fig.tight_layout()
        return fig

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Save :meth:`figure` as a PNG at ``path``."""
        fig = self.figure()
        import matplotlib.pyplot as plt

        try:
            fig.savefig(os.fspath(path), dpi=100)
        finally:
            plt.close(fig)


def run_probes(
    pairs: Iterable[tuple[Store | str | os.PathLike[str], Store | str | os.PathLike[str]]],
    columns: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    seeds: int = 1,
    **options: Any,
) -> ProbeTable:
    """:func:`run_probe` for every (train, val) pair and every column in
    ``columns`` (default: the columns of the first train store), ``seeds``
    times each (seeds ``seed``, ``seed`` + 1, ...), as one
    :class:`ProbeTable`. ``options`` are run_probe's keyword arguments."""
    seeds = _check_int("seeds", seeds, 1)
    first_seed = _check_int("seed", options.pop("seed", 0), 0)
    opened = [(_as_store(t), _as_store(v)) for t, v in pairs]
    if not opened:
        raise ValueError("no (train, val) store pair given")
    names = [_dataset_name(t, v) for t, v in opened]
    # Two pairs of one subset (e.g. gym99 v1.0 and v1.1 train): tell them
    # apart by the train file's name, else by their position.
    base = list(names)
    stems = [os.path.splitext(os.path.basename(t.path))[0] for t, _ in opened]
    names = [f"{nm} ({st})" if base.count(nm) > 1 else nm for nm, st in zip(base, stems)]
    if len(set(names)) < len(names):
        names = [f"{nm} ({base[: i + 1].count(nm)})" if base.count(nm) > 1 else nm for i, nm in enumerate(base)]
    cols = list(columns) if columns else list(opened[0][0].columns)
    if len(set(cols)) != len(cols):
        raise ValueError(f"a column is named twice: {cols}")
    for t, v in opened:  # every column and label space of every pair, before any training
        check_label_spaces(t, v, options.get("levels", ("element",)))
        for c in cols:
            t.column(c)
            v.column(c)
    results = [run_probe(t, v, c, dataset=nm, log=log, seed=first_seed + k, **options)
               for (t, v), nm in zip(opened, names) for c in cols for k in range(seeds)]
    return ProbeTable(results)


# --------------------------------------------------------------------------
# Demo data: a train/val pair sharing class prototypes
# --------------------------------------------------------------------------


def make_demo_pair(
    folder: str | os.PathLike[str],
    train: int = 2000,
    val: int = 1000,
    columns: dict[str, Sequence[int]] | None = None,
    signal: float = 0.15,
    seed: int = 0,
    categories: str | os.PathLike[str] | None = None,
) -> tuple[Store, Store]:
    """Write ``train.fgs`` and ``val.fgs`` into ``folder``: synthetic
    FineGym-shaped features exactly as ``finegym-store demo`` makes them
    (gym99-like long tail, class prototype times ``signal`` plus unit noise,
    real id pattern, the gym99 hierarchy shipped in the package), drawn once
    for train + val instances and split, so both share the class prototypes.
    ``columns`` maps column names to per-instance shapes (default: tsn and
    i3d at their released shapes). Returns the two opened stores."""
    from importlib import resources

    from . import synth
    from .convert import convert

    train = _check_int("train", train, 1)
    val = _check_int("val", val, 1)
    columns = dict(columns) if columns else {"tsn": synth.MODELS["tsn"], "i3d": synth.MODELS["i3d"]}
    os.makedirs(folder, exist_ok=True)
    n = train + val
    ids = synth.make_ids(n, seed)
    labels = synth.long_tailed_labels(n, 99, seed)
    tables = {name: synth.make_features(ids, labels, shape, seed=seed + k, signal=signal)
              for k, (name, shape) in enumerate(columns.items())}
    cat = resources.files("finegym_store") / "sample" / "gym99_categories.txt"
    out = []
    with resources.as_file(cat) as default_categories:
        for part, sl in (("train", slice(0, train)), ("val", slice(train, n))):
            split = os.path.join(folder, f"{part}_split.txt")
            synth.write_split(split, ids[sl], labels[sl])
            feats = {name: {k: t[k] for k in ids[sl]} for name, t in tables.items()}
            out.append(convert(feats, os.path.join(folder, f"{part}.fgs"), split=split,
                               categories=categories or default_categories, overwrite=True, progress=False))
    return out[0], out[1]
