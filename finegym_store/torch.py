"""PyTorch integration (install the ``torch`` extra).

Two ways in:

* :class:`StoreDataset` for ``torch.utils.data.DataLoader``. It implements
  ``__getitems__``, so with ``collate_fn=finegym_store.torch.collate`` a
  DataLoader fetches each batch with one C++ gather instead of B item calls.
  It pickles by absolute path (``spawn`` workers reopen the file) and
  survives ``fork`` (the C++ thread pools are rebuilt in the child). Call
  ``set_epoch(epoch)`` before each epoch: train-mode segments are keyed by
  the epoch, so without it every epoch sees the same segments. The epoch
  lives in shared memory, so workers (persistent or not, fork or spawn)
  read the one set last.
* :func:`tensor_batches`: wraps a :class:`finegym_store.Loader`, turning its
  batches into tensors without a copy (``torch.from_numpy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from . import _args
from .loader import Loader
from .spec import SegmentSpec, resolve
from .store import Store, open as open_store

__all__ = ["StoreDataset", "TensorBatch", "collate", "tensor_batches"]


class TensorBatch(NamedTuple):
    """features (B, K, C) float tensor, labels (B,) int64, indices (B,) int64."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


_COLLATE_HINT = ("a StoreDataset batch is already gathered: pass collate_fn=finegym_store.torch.collate "
                 "to the DataLoader (its default collate cannot stack it); collate hands back a plain "
                 "TensorBatch")


class _Gathered(TensorBatch):
    """What ``__getitems__`` returns: a TensorBatch whose indexing raises a
    TypeError naming :func:`collate`, which is what torch's default collate
    does first with a batch. Attributes and unpacking work as usual."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        raise TypeError(_COLLATE_HINT)


class StoreDataset(Dataset):
    """Instances of one feature column as a map-style Dataset.

    ``dataset[i]`` is ``(features (K, C) tensor, label)``; a DataLoader with
    ``collate_fn=collate`` gets whole :class:`TensorBatch` es gathered in C++.
    ``spec`` (a :class:`finegym_store.SegmentSpec`, or its fields as
    keywords) is what each item is made of, as in
    :meth:`finegym_store.Store.gather`; with num_segments it needs a mode
    (``"train"`` for training, ``"test"`` for evaluation).

    Call ``set_epoch(epoch)`` at the start of every epoch (before iterating
    the DataLoader): train-mode segments are drawn from (seed, epoch,
    instance), so without it every epoch sees the same segments. The epoch
    is kept in a shared-memory tensor that DataLoader workers share with the
    main process (inherited under fork, passed by handle under spawn), and
    read at every gather, so persistent workers see each new epoch too.

    ``dataset[indices]`` with a list of indices (a DataLoader with
    ``sampler=BatchSampler(...)`` and ``batch_size=None``) is the same as
    ``__getitems__(indices)``.

    ``transform`` (default None): called in the process that gathers (the
    DataLoader worker) with each gathered :class:`TensorBatch`, and must
    return a TensorBatch (``batch._replace(features=...)``); it is not
    applied to single items, ``dataset[i]``.

    In a DataLoader worker, batches are gathered into shared memory, which
    the main process receives without a copy.

    ``threads`` (default None): the C++ threads of each gather. In the main
    process that is every available core; inside a DataLoader worker it is
    max(1, cores // num_workers), so the workers together use the cores once
    rather than each all of them."""

    def __init__(self, store: Store | str | os.PathLike[str], column: str, *, spec: SegmentSpec | None = None,
                 threads: int | None = None, transform: Callable[[TensorBatch], TensorBatch] | None = None,
                 **spec_keywords: Any) -> None:
        self.store = store if isinstance(store, Store) else open_store(store)
        self.store.column(column)  # KeyError naming the columns, now
        self.column = column
        self.spec = resolve(spec, spec_keywords, "StoreDataset()")
        self.threads = _args.optional_count(threads, "threads", 1)
        if transform is not None and not callable(transform):
            raise TypeError(f"StoreDataset(): transform must be callable or None, got {type(transform).__name__}")
        self.transform = transform
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # A spec the column can't serve fails here, not in a worker.
        self.store.gather(column, np.zeros(0, np.int64), spec=self.spec, threads=self.threads)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose train-mode segments the next items get."""
        self._epoch.fill_(_args.count(epoch, "epoch"))

    @property
    def epoch(self) -> int:
        """The epoch set last (read from the memory DataLoader workers share)."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.store)

    def gather_threads(self) -> int | None:
        """The threads a gather uses here (None: every available core)."""
        if self.threads is not None:
            return self.threads
        info = get_worker_info()
        if info is None:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, info.num_workers))

    def _gather(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.store.gather(self.column, indices, spec=self.spec, epoch=self.epoch,
                                 threads=self.gather_threads(), out=out)

    def _shared_output(self, batch: int) -> torch.Tensor | None:
        """Inside a DataLoader worker: an uninitialised tensor in shared
        memory for a batch, so the gather writes straight into what the
        worker hands to the main process (torch would otherwise copy the
        batch into shared memory to send it; its own default_collate does
        the same). None in the main process."""
        if get_worker_info() is None or batch == 0:
            return None
        empty = self._gather(np.zeros(0, np.int64))  # (0, rows, channels) of the output dtype
        shape = empty.shape[1:]
        dtype = torch.float16 if empty.dtype == np.float16 else torch.float32
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(batch * shape[0] * shape[1], device=proto.device)
        return proto.new(storage).resize_(batch, *shape)

    def __getitem__(self, index: Any) -> Any:
        """``(features (K, C), label)`` for an integer index; a list (or
        array) of indices is ``__getitems__(indices)``."""
        if isinstance(index, (list, tuple)) or (isinstance(index, (np.ndarray, torch.Tensor)) and index.ndim == 1):
            return self.__getitems__(index)
        idx = _args.indices([index], len(self.store))
        features = self._gather(idx)[0]
        return torch.from_numpy(features), int(self.store._guarded_labels()[idx[0]])

    def __getitems__(self, indices: Sequence[int]) -> TensorBatch:
        idx = _args.indices(indices, len(self.store))
        shared = self._shared_output(len(idx))
        if shared is None:
            features = torch.from_numpy(self._gather(idx))
        else:
            self._gather(idx, out=shared.numpy())
            features = shared
        labels = self.store._guarded_labels()[idx].astype(np.int64)
        batch = TensorBatch(features, torch.from_numpy(labels), torch.from_numpy(idx))
        if self.transform is not None:
            batch = self.transform(batch)
            if not isinstance(batch, TensorBatch):
                raise TypeError(f"StoreDataset transform must return a TensorBatch, got {type(batch).__name__}")
        return _Gathered(*tuple.__iter__(batch))


def collate(batch: TensorBatch | list[tuple[torch.Tensor, int]]) -> TensorBatch:
    """collate_fn for StoreDataset: hands a gathered batch on as a plain
    TensorBatch without copying it (and stacks items, should a DataLoader
    hand it single items)."""
    if isinstance(batch, TensorBatch):
        return TensorBatch(*tuple.__iter__(batch))
    features = torch.stack([f for f, _ in batch])
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return TensorBatch(features, labels, torch.full((len(batch),), -1, dtype=torch.int64))


def tensor_batches(loader: Loader) -> Iterator[TensorBatch]:
    """Iterate one epoch of ``loader`` as tensors that share the batch memory."""
    for b in loader:
        yield TensorBatch(torch.from_numpy(b.features), torch.from_numpy(b.labels.astype(np.int64)),
                          torch.from_numpy(b.indices))
