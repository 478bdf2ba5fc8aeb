"""Training-loop batches: epoch orders, distributed shards, background prefetch.

The order of an epoch is a pure function of (seed, epoch): every rank computes
the same permutation without talking to the others, then takes its shard the
way torch's DistributedSampler does. Batches are gathered by the C++ core on
its own threads, ``prefetch`` batches ahead of the caller. Because a batch is
a pure function of (configuration, epoch, position), a loader's position is
two numbers: :meth:`Loader.state_dict` records them with what identifies the
configuration, and :meth:`Loader.load_state_dict` resumes there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _args, _core
from .spec import SegmentSpec, resolve

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Batch", "Loader", "SAMPLERS", "STATE_FORMAT", "epoch_order", "shard"]

#: Instance orders of an epoch: every instance once, or classes drawn uniformly.
SAMPLERS = ("uniform", "balanced")


class Batch(NamedTuple):
    """One batch: ``features`` (B, K, C), ``labels`` (B,) int32, ``indices`` (B,) int64.

    A loader of several columns gives ``features`` as a dict {column: (B,
    K, C_i) array}, or one (B, K, sum C_i) array with ``concat=True``.
    A named tuple: ``features, labels, indices = batch`` unpacks it, and the
    fields are attributes too. ``len(batch)`` is B, the number of instances."""

    features: np.ndarray | dict[str, np.ndarray]
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def epoch_order(labels: np.ndarray, seed: int, epoch: int, shuffle: bool = True,
                sampler: str = "uniform") -> np.ndarray:
    """The instance order of one epoch (before sharding), as int64.

    ``uniform``: every instance once, permuted by (seed, epoch) when
    ``shuffle``. ``balanced``: len(labels) draws, each a class chosen
    uniformly among the labelled classes present, then an instance uniformly
    within it (instances labelled -1 are never drawn)."""
    n = len(labels)
    if sampler == "uniform":
        if not shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    if sampler != "balanced":
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) == 0:
        raise ValueError("sampler='balanced' needs labels, but every instance is unlabelled (-1)")
    by_class = labelled[np.argsort(labels[labelled], kind="stable")]
    classes, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    rng = np.random.default_rng([seed, epoch, 1])
    pick = rng.integers(0, len(classes), n)
    within = (rng.random(n) * counts[pick]).astype(np.int64)
    return by_class[starts[pick] + within].astype(np.int64)


#: The largest world_size (torch.distributed's ranks are int32), and the
#: longest padded epoch a world_size larger than the store may ask for.
MAX_WORLD_SIZE = 2**31
MAX_PADDED_EPOCH = 2**24


def shard(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """torch DistributedSampler's contract: pad by wrapping to a multiple of
    world_size (or drop the tail with drop_last), then rank r takes positions
    r, r + world_size, ..."""
    n = len(order)
    if drop_last:
        total = (n // world_size) * world_size
        order = order[:total]
    else:
        total = math.ceil(n / world_size) * world_size
        if total > n:
            reps = math.ceil(total / n)
            order = np.concatenate([order] * reps)[:total]
    return order[rank:total:world_size]


#: The ``format`` of :meth:`Loader.state_dict`; a state of another format is refused.
STATE_FORMAT = "finegym_store.Loader/1"


class _Cursor:
    """Where one iteration is: its epoch and the batches its caller has received."""

    __slots__ = ("epoch", "done")

    def __init__(self, epoch: int, done: int) -> None:
        self.epoch = epoch
        self.done = done


def _same(a: Any, b: Any) -> bool:
    # Equality that does not take True for 1 (nor 1 for 1.0): states are
    # compared after a JSON round trip, which keeps bools, ints and floats apart.
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class Loader:
    """Iterate to get :class:`Batch` es; each new iteration is the next epoch.
    Made by :meth:`finegym_store.Store.loader`, which documents the arguments.
    ``spec`` (a :class:`finegym_store.SegmentSpec`) is what each batch is
    made of; its seed keys the epoch orders as well as the segments."""

    def __init__(self, store: Store, column: str | Sequence[str], batch_size: int, *,
                 spec: SegmentSpec | None = None, shuffle: bool = True, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, prefetch: int = 2, threads: int | None = None, sampler: str = "uniform",
                 reuse_buffers: bool = False, concat: bool = False, **spec_keywords: Any) -> None:
        self.store = store
        # KeyError naming the columns (and the checks of several columns), now
        # rather than at the first batch.
        if isinstance(column, str):
            store.column(column)
            self.column: str | tuple[str, ...] = column
            self._columns: tuple[str, ...] = (column,)
        else:
            self.column = self._columns = store._columns_of(column)
        #: Several columns only: one (B, K, sum C_i) array instead of a dict.
        self.concat = _args.flag(concat, "concat")
        self.spec = resolve(spec, spec_keywords, "Loader()")
        self.batch_size = _args.count(batch_size, "batch_size", 1)
        self.shuffle = _args.flag(shuffle, "shuffle")
        self.drop_last = _args.flag(drop_last, "drop_last")
        self.world_size = _args.count(world_size, "world_size", 1)
        self.rank = _args.count(rank, "rank")
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        n, ranks = len(store), self.world_size
        if ranks > MAX_WORLD_SIZE:
            raise ValueError(f"world_size must be at most {MAX_WORLD_SIZE}, got {ranks}")
        if not self.drop_last and -(-n // ranks) * ranks > max(2 * n, MAX_PADDED_EPOCH):
            raise ValueError(f"world_size={ranks} pads each epoch of {n} instances to {ranks} indices "
                             f"per epoch (one per rank); at most {max(2 * n, MAX_PADDED_EPOCH)} are allowed "
                             "(use drop_last=True or fewer ranks)")
        self.prefetch = _args.count(prefetch, "prefetch")
        self.threads = _args.optional_count(threads, "threads", 1)
        self.sampler = _args.choice(sampler, "sampler", SAMPLERS)
        self.reuse_buffers = _args.flag(reuse_buffers, "reuse_buffers")
        self.epoch = 0
        # Batches of self.epoch already received (load_state_dict): the next
        # iteration starts after them.
        self._skip = 0
        # The latest iteration (a weak reference to its generator) and its cursor.
        self._active: tuple[weakref.ref[Iterator[Batch]], _Cursor] | None = None
        self._labels_digest: str | None = None
        # Fail now, not in a background job, on a spec the column can't serve.
        store.gather(self.column, np.zeros(0, np.int64), spec=self.spec, threads=self.threads, concat=self.concat)

    @property
    def seed(self) -> int:
        """The spec's seed: it keys the epoch orders and the train-mode segments."""
        return self.spec.seed

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (like DistributedSampler.set_epoch).
        After :meth:`load_state_dict`, setting the epoch the state resumes
        keeps its position; any other epoch starts at its first batch."""
        epoch = _args.count(epoch, "epoch")
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch
        self._active = None

    # -- resuming ----------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        # What the batches are a function of, besides epoch and position.
        if self._labels_digest is None:
            labels = np.ascontiguousarray(self.store._guarded_labels(), dtype="<i4")
            self._labels_digest = hashlib.sha256(labels.tobytes()).hexdigest()
        return {
            "format": STATE_FORMAT,
            "store_length": len(self.store),
            "labels_sha256": self._labels_digest,
            "column": self.column if isinstance(self.column, str) else list(self.column),
            **({} if isinstance(self.column, str) else {"concat": self.concat}),
            "seed": self.spec.seed,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "sampler": self.sampler,
            "spec": dataclasses.asdict(self.spec),
        }

    def _position(self) -> tuple[int, int]:
        if self._active is not None:
            it, cursor = self._active[0](), self._active[1]
            # A generator that finished, was closed or was collected has no frame.
            if it is not None and getattr(it, "gi_frame", None) is not None:
                if cursor.done < len(self):
                    return cursor.epoch, cursor.done
                return cursor.epoch + 1, 0  # every batch received: the epoch is over
        return self.epoch, self._skip

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is, as plain JSON-able values: ``epoch`` and
        ``batches`` (the batches of that epoch the caller has received; 0
        between epochs), and what the batches are a function of (store
        length and labels, column (a list for several columns, with
        ``concat``), seed, batch_size, rank, world_size, shuffle,
        drop_last, sampler, the spec as a dict, and ``format``).
        While an iteration is active, its position (batches prefetched but not
        yet received do not count); otherwise the epoch the next iteration
        runs. :meth:`load_state_dict` on a loader over the same store and
        arguments resumes there."""
        epoch, done = self._position()
        return {**self._config(), "epoch": epoch, "batches": done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields the
        remaining batches of the state's epoch (the same batches, bit for bit,
        as an uninterrupted run), and the ones after it the following epochs.
        TypeError if ``state`` is not a mapping; ValueError naming the field
        when it was taken from a loader of another configuration (store,
        column, concat, seed, batch_size, rank, world_size, shuffle, drop_last,
        sampler, spec) or is not a loader state. ``prefetch``, ``threads``
        and ``reuse_buffers`` do not change the batches and may differ."""
        if not isinstance(state, Mapping):
            raise TypeError(f"Loader.load_state_dict: state must be a dict (from Loader.state_dict()), "
                            f"got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"Loader.load_state_dict: not a loader state: 'format' is {state.get('format')!r}, "
                             f"expected {STATE_FORMAT!r}")
        state = dict(state)
        if isinstance(state.get("spec"), Mapping):
            # Fields a spec gained later take their defaults in older states.
            state["spec"] = {**dataclasses.asdict(SegmentSpec()), **state["spec"]}
        for name, mine in self._config().items():
            if name not in state:
                raise ValueError(f"Loader.load_state_dict: the state has no {name!r}")
            if not _same(state[name], mine):
                raise ValueError(f"Loader.load_state_dict: {name} differs: the state has {state[name]!r}, "
                                 f"this loader {mine!r}")
        position = {}
        for name in ("epoch", "batches"):
            value = state.get(name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Loader.load_state_dict: {name!r} must be an integer >= 0, got {value!r}")
            position[name] = value
        if position["batches"] and position["batches"] >= len(self):
            raise ValueError(f"Loader.load_state_dict: 'batches' must be less than the {len(self)} batches "
                             f"of an epoch, got {position['batches']}")
        self.epoch, self._skip = position["epoch"], position["batches"]
        self._active = None

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's instance indices for an epoch, in batch order."""
        e = self.epoch if epoch is None else _args.count(epoch, "epoch")
        order = epoch_order(self.store._guarded_labels(), self.spec.seed, e, self.shuffle, self.sampler)
        return shard(order, self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        n = len(self.store)
        per_rank = n // self.world_size if self.drop_last else math.ceil(n / self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self._iterate()[0]

    def _iterate(self, buffers: Callable[[str, int], np.ndarray | None] | None = None,
                 ) -> tuple[Iterator[Batch], _Cursor]:
        # __iter__, and its cursor. buffers(column, rows), when given, supplies
        # the array each gather of `rows` instances writes into (None: a new
        # one); finegym_store.torch gathers into pinned memory this way. A
        # caller that holds batches back from its own caller lowers
        # cursor.done by as many while it does.
        epoch, start = self.epoch, self._skip
        self.epoch += 1
        self._skip = 0
        cursor = _Cursor(epoch, start)
        it = self._run(epoch, start, cursor, buffers)
        self._active = (weakref.ref(it), cursor)
        return it, cursor

    def _run(self, epoch: int, start: int, cursor: _Cursor,
             buffers: Callable[[str, int], np.ndarray | None] | None = None) -> Iterator[Batch]:
        # Batches from `start` on; cursor.done counts those the caller received.
        idx = self.indices(epoch)
        bounds = range(0, len(idx), self.batch_size)
        batches = [idx[s : s + self.batch_size] for s in bounds]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        # A copy, not a view of the mapping: a file truncated mid-epoch then
        # raises OSError from the next gather instead of SIGBUS here.
        labels = self.store._guarded_labels()
        reader = self.store._reader
        threads = self.store._threads(self.threads)
        native = self.spec._native
        free: list[Any] | None = [] if self.reuse_buffers and buffers is None else None
        held: Any = None  # the recycled buffer (array, dict of arrays) the caller holds now
        pending: deque[tuple[np.ndarray, list[Any], Any]] = deque()
        single = isinstance(self.column, str)
        layout = self.store._concat_layout(self._columns, self.spec) if self.concat and not single else None

        def size(buffer: Any) -> int:
            return len(next(iter(buffer.values()))) if isinstance(buffer, dict) else len(buffer)

        def submit(chunk: np.ndarray, out: Any) -> tuple[list[Any], Any]:
            # The jobs that gather `chunk` (one per column), and the concatenated array they fill.
            if single:
                return [_core.GatherJob(reader, self.column, chunk, native, epoch, out, threads)], None
            if layout is not None:  # one array, each column into its channel slice
                rows, slices, dtype = layout
                if out is None:
                    out = np.empty((len(chunk), rows, slices[-1][2]), dtype=dtype)
                return [_core.GatherJob(reader, name, chunk, native, epoch, out[:, :, first:end], threads)
                        for name, first, end in slices], out
            return [_core.GatherJob(reader, name, chunk, native, epoch, None if out is None else out[name], threads)
                    for name in self._columns], None

        def top_up(b: int, jobs: int) -> None:
            # Submit jobs for the batches after b until `jobs` are pending.
            while len(pending) < jobs and b + len(pending) < len(batches):
                k = b + len(pending)
                chunk = batches[k]
                # A remote store: this batch's rows into the cache, the next ones' in the background.
                for name in self._columns:
                    self.store._ensure_rows(name, chunk, ahead=batches[k + 1 : k + 3 + self.prefetch])
                out = None
                if buffers is not None and (single or layout is not None):
                    out = buffers(self.column, len(chunk))
                elif free and size(free[-1]) == len(chunk):
                    out = free.pop()
                pending.append((chunk, *submit(chunk, out)))

        try:
            for b in range(start, len(batches)):
                # Resuming means the caller asked for the next batch: with
                # reuse_buffers it is done with the previous one.
                if free is not None and held is not None:
                    free.append(held)
                    held = None
                # Batch b's job plus `prefetch` beyond it. When b is ready the
                # new job is submitted only after taking b, just before the
                # yield, so its threads start while the caller runs its step
                # rather than competing with this call; when b is not ready
                # yet it is submitted first, to overlap with the wait.
                top_up(b, 1)
                if not all(job.done for job in pending[0][1]):
                    top_up(b, self.prefetch + 1)
                chunk, jobs, features = pending.popleft()
                if single:
                    features = jobs[0].wait()
                elif features is not None:  # concatenated
                    for job in jobs:
                        job.wait()
                else:
                    features = {name: job.wait() for name, job in zip(self._columns, jobs)}
                if free is not None:
                    held = features
                batch = Batch(features, labels[chunk], chunk)
                top_up(b + 1, self.prefetch)
                cursor.done = b + 1
                yield batch
        finally:
            # Abandoned mid-epoch (or done): wait for in-flight jobs so no
            # thread outlives the iterator; their buffers are dropped. Jobs
            # inherited across fork() are not ours to wait for (their thread
            # is not in this process): dropping them is all there is to do.
            while pending:
                for job in pending.popleft()[1]:
                    if job.owned:
                        job.wait()

    def __getstate__(self) -> dict[str, Any]:
        # A copy runs what this loader's next iteration would (its epoch, and
        # a position loaded by load_state_dict); an active iteration, a
        # generator, stays with this loader.
        return {**self.__dict__, "_active": None, "_labels_digest": None}

    def __repr__(self) -> str:
        return (f"<Loader {self.column!r} batch_size={self.batch_size} {self.spec} "
                f"rank={self.rank}/{self.world_size} epoch={self.epoch} batches={len(self)}>")
