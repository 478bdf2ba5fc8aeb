"""Training-loop batches: epoch orders, distributed shards, background prefetch.

The order of an epoch is a pure function of (seed, epoch): every rank computes
the same permutation without talking to the others, then takes its shard the
way torch's DistributedSampler does. Batches are gathered by the C++ core on
its own threads, ``prefetch`` batches ahead of the caller.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _args, _core
from .spec import SegmentSpec, resolve

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Batch", "Loader", "SAMPLERS", "epoch_order", "shard"]

#: Instance orders of an epoch: every instance once, or classes drawn uniformly.
SAMPLERS = ("uniform", "balanced")


class Batch(NamedTuple):
    """One batch: ``features`` (B, K, C), ``labels`` (B,) int32, ``indices`` (B,) int64.

    A named tuple: ``features, labels, indices = batch`` unpacks it, and the
    fields are attributes too. ``len(batch)`` is B, the number of instances."""

    features: np.ndarray
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


class Loader:
    """Iterate to get :class:`Batch` es; each new iteration is the next epoch.
    Made by :meth:`finegym_store.Store.loader`, which documents the arguments.
    ``spec`` (a :class:`finegym_store.SegmentSpec`) is what each batch is
    made of; its seed keys the epoch orders as well as the segments."""

    def __init__(self, store: Store, column: str, batch_size: int, *, spec: SegmentSpec | None = None,
                 shuffle: bool = True, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 prefetch: int = 2, threads: int | None = None, sampler: str = "uniform",
                 reuse_buffers: bool = False, **spec_keywords: Any) -> None:
        store.column(column)  # KeyError naming the columns, now rather than at the first batch
        self.store = store
        self.column = column
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
        # Fail now, not in a background job, on a spec the column can't serve.
        store.gather(column, np.zeros(0, np.int64), spec=self.spec, threads=self.threads)

    @property
    def seed(self) -> int:
        """The spec's seed: it keys the epoch orders and the train-mode segments."""
        return self.spec.seed

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (like DistributedSampler.set_epoch)."""
        self.epoch = _args.count(epoch, "epoch")

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
        epoch = self.epoch
        self.epoch += 1
        return self._run(epoch)

    def _run(self, epoch: int) -> Iterator[Batch]:
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
                pending.append((chunk, _core.GatherJob(reader, self.column, chunk, native, epoch, out, threads)))

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
        return (f"<Loader {self.column!r} batch_size={self.batch_size} {self.spec} "
                f"rank={self.rank}/{self.world_size} epoch={self.epoch} batches={len(self)}>")
