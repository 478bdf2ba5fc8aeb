"""Training-loop batches: epoch orders, distributed shards, background prefetch.

The order of an epoch is a pure function of (seed, epoch): every rank computes
the same permutation without talking to the others, then takes its shard the
way torch's DistributedSampler does. Batches are gathered by the C++ core on
its own threads, ``prefetch`` batches ahead of the caller.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _core

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Batch", "Loader", "SAMPLINGS", "epoch_order", "shard"]

SAMPLERS = ("uniform", "balanced")
#: Segment-sampling rule sets (README, "Sampling"): mmaction2 1.2.0's SampleFrames, bit-exact
#: (the default), or the same rules in exact integer arithmetic.
SAMPLINGS = ("mmaction2", "exact")


class Batch(NamedTuple):
    """One batch: ``features`` (B, K, C), ``labels`` (B,) int32, ``indices`` (B,) int64.

    A named tuple: ``features, labels, indices = batch`` unpacks it, and the
    fields are attributes too. ``len(batch)`` is B, the number of instances."""

    features: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def as_indices(indices: Any, n: int) -> np.ndarray:
    """Instance indices as a 1-D int64 array, each in [-n, n) (negative ones
    count from the end). IndexError names the first one out of range and its
    position; TypeError for anything but integers (bools are not indices)."""
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise TypeError(f"indices must be a 1-D sequence of integers, got an array of shape {idx.shape}")
    if idx.size == 0:
        return np.zeros(0, np.int64)
    kind = idx.dtype.kind
    if kind == "b":
        raise TypeError("indices must be integers, got bools (bools are not indices; use np.flatnonzero(mask))")
    if kind == "O":
        # Python ints too large for int64 (2**70) or a mix: each one checked on its own.
        values = []
        for pos, v in enumerate(idx.tolist()):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"indices must be integers, got {type(v).__name__} {v!r} at position {pos}")
            values.append(operator.index(v))
        for pos, v in enumerate(values):
            if not -n <= v < n:
                raise IndexError(f"index {v} (position {pos}) is out of range for a store of {n} instances")
        return np.array(values, dtype=np.int64)
    if kind not in "iu":
        raise TypeError(f"indices must be integers, got an array of {idx.dtype}")
    if kind == "u":
        # Unsigned values never count from the end: 2**63 and above must not wrap to negative int64.
        bad = np.flatnonzero(idx >= n)
        if bad.size:
            raise IndexError(f"index {int(idx[bad[0]])} (position {int(bad[0])}) is out of range for a store of "
                             f"{n} instances")
    return idx.astype(np.int64, copy=False)


def check_count(value: Any, name: str, minimum: int, maximum: int = 2**64 - 1) -> int:
    """An integer argument in [minimum, maximum], or TypeError/ValueError naming it."""
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


def check_sampling(mode: str, sampling: str) -> None:
    if mode not in ("train", "test"):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


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


class Loader:
    """Iterate to get :class:`Batch` es; each new iteration is the next epoch.
    Made by :meth:`finegym_store.Store.loader`, which documents the arguments."""

    def __init__(self, store: Store, column: str, batch_size: int, num_segments: int | None = None,
                 mode: str = "train", shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, prefetch: int = 2, threads: int | None = None,
                 sampler: str = "uniform", clip_len: int = 1, dtype: Any = None,
                 reuse_buffers: bool = False, sampling: str = "mmaction2") -> None:
        store.column(column)  # KeyError naming the columns, now rather than at the first batch
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        check_sampling(mode, sampling)
        self.store = store
        self.column = column
        self.batch_size = batch_size
        self.num_segments = num_segments
        self.mode = mode
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.threads = threads
        self.sampler = sampler
        self.clip_len = clip_len
        self.dtype = store._gather_dtype(column, dtype)
        self.reuse_buffers = reuse_buffers
        self.sampling = sampling
        self.epoch = 0
        # Fail now, not in a background job, on arguments the column can't serve.
        store.gather(column, np.zeros(0, np.int64), num_segments=num_segments, mode=mode, seed=seed,
                     clip_len=clip_len, dtype=self.dtype, threads=threads, sampling=sampling)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (like DistributedSampler.set_epoch)."""
        self.epoch = check_count(epoch, "epoch", 0)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's instance indices for an epoch, in batch order."""
        e = self.epoch if epoch is None else epoch
        order = epoch_order(self.store.labels, self.seed, e, self.shuffle, self.sampler)
        return shard(order, self.rank, self.world_size, self.drop_last)

    def __len__(self) -> int:
        n = len(self.store)
        per_rank = n // self.world_size if self.drop_last else math.ceil(n / self.world_size)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        return self._run(epoch)

    def _run(self, epoch: int) -> Iterator[Batch]:
        idx = self.indices(epoch)
        bounds = range(0, len(idx), self.batch_size)
        batches = [idx[s : s + self.batch_size] for s in bounds]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        labels = self.store.labels
        reader = self.store._reader
        threads = self.store._threads(self.threads)
        free: list[np.ndarray] | None = [] if self.reuse_buffers else None
        held: np.ndarray | None = None  # the recycled buffer the caller holds now
        pending: deque[tuple[np.ndarray, Any]] = deque()

        def top_up(b: int, jobs: int) -> None:
            # Submit jobs for the batches after b until `jobs` are pending.
            while len(pending) < jobs and b + len(pending) < len(batches):
                k = b + len(pending)
                chunk = batches[k]
                # A remote store: this batch's rows into the cache, the next ones' in the background.
                self.store._ensure_rows(self.column, chunk, ahead=batches[k + 1 : k + 3 + self.prefetch])
                out = None
                if free and free[-1].shape[0] == len(chunk):
                    out = free.pop()
                pending.append((chunk, _core.GatherJob(reader, self.column, chunk, self.num_segments, self.mode,
                                                       self.seed, epoch, self.clip_len, out, self.dtype, threads,
                                                       self.sampling)))

        try:
            for b in range(len(batches)):
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
                if not pending[0][1].done:
                    top_up(b, self.prefetch + 1)
                chunk, job = pending.popleft()
                features = job.wait()
                if free is not None:
                    held = features
                batch = Batch(features, labels[chunk], chunk)
                top_up(b + 1, self.prefetch)
                yield batch
        finally:
            # Abandoned mid-epoch (or done): wait for in-flight jobs so no
            # thread outlives the iterator; their buffers are dropped. Jobs
            # inherited across fork() are not ours to wait for (their thread
            # is not in this process): dropping them is all there is to do.
            while pending:
                job = pending.popleft()[1]
                if job.owned:
                    job.wait()

    def __repr__(self) -> str:
        return (f"<Loader {self.column!r} batch_size={self.batch_size} K={self.num_segments} mode={self.mode} "
                f"sampling={self.sampling} "
                f"rank={self.rank}/{self.world_size} epoch={self.epoch} batches={len(self)}>")
