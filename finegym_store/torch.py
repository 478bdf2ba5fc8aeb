"""PyTorch integration (install the ``torch`` extra).

Two ways in:

* :class:`StoreDataset` for ``torch.utils.data.DataLoader``. It implements
  ``__getitems__``, so with ``collate_fn=finegym_store.torch.collate`` a
  DataLoader fetches each batch with one C++ gather instead of B item calls.
  It pickles by absolute path (``spawn`` workers reopen the file) and
  survives ``fork`` (the C++ thread pools are rebuilt in the child). Call
  ``set_epoch(epoch)`` before each epoch: train-mode segments are keyed by
  the epoch, so without it every epoch sees the same segments.
* :func:`tensor_batches`: wraps a :class:`finegym_store.Loader`, turning its
  batches into tensors without a copy (``torch.from_numpy``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .loader import Loader, as_indices, check_count, check_sampling
from .store import Store, open as open_store

__all__ = ["StoreDataset", "TensorBatch", "collate", "tensor_batches"]


class TensorBatch(NamedTuple):
    """features (B, K, C) float tensor, labels (B,) int64, indices (B,) int64."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


class StoreDataset(Dataset):
    """Instances of one feature column as a map-style Dataset.

    ``dataset[i]`` is ``(features (K, C) tensor, label)``; a DataLoader with
    ``collate_fn=collate`` gets whole :class:`TensorBatch` es gathered in C++.
    Sampling arguments are those of :meth:`finegym_store.Store.gather`.

    Call ``set_epoch(epoch)`` at the start of every epoch (before iterating
    the DataLoader, so its workers get the new epoch): train-mode segments
    are drawn from (seed, epoch, instance), so without it every epoch sees
    the same segments.

    In a DataLoader worker, batches are gathered into shared memory, which
    the main process receives without a copy.

    ``threads`` (default None): the C++ threads of each gather. In the main
    process that is every available core; inside a DataLoader worker it is
    max(1, cores // num_workers), so the workers together use the cores once
    rather than each all of them."""

    def __init__(self, store: Store | str | os.PathLike[str], column: str, num_segments: int | None = None,
                 mode: str = "test", seed: int = 0, clip_len: int = 1, dtype: Any = None,
                 threads: int | None = None, sampling: str = "mmaction2") -> None:
        self.store = store if isinstance(store, Store) else open_store(store)
        self.store.column(column)  # KeyError naming the columns, now
        check_sampling(mode, sampling)
        self.column = column
        self.num_segments = None if num_segments is None else check_count(num_segments, "num_segments", 1)
        self.mode = mode
        self.seed = check_count(seed, "seed", 0)
        self.clip_len = check_count(clip_len, "clip_len", 1)
        self.dtype = dtype
        self.threads = None if threads is None else check_count(threads, "threads", 1)
        self.sampling = sampling
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose train-mode segments the next items get."""
        self.epoch = check_count(epoch, "epoch", 0)

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
        return self.store.gather(self.column, indices, num_segments=self.num_segments, mode=self.mode,
                                 seed=self.seed, epoch=self.epoch, clip_len=self.clip_len, dtype=self.dtype,
                                 threads=self.gather_threads(), sampling=self.sampling, out=out)

    def _shared_output(self, batch: int) -> torch.Tensor | None:
        """Inside a DataLoader worker: an uninitialised tensor in shared
        memory for a batch, so the gather writes straight into what the
        worker hands to the main process (torch would otherwise copy the
        batch into shared memory to send it; its own default_collate does
        the same). None in the main process."""
        if get_worker_info() is None or batch == 0:
            return None
        shape = self._gather(np.zeros(0, np.int64)).shape[1:]  # (rows, channels), checked as any gather is
        dtype = torch.float16 if self.store._gather_dtype(self.column, self.dtype) == np.float16 else torch.float32
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(batch * shape[0] * shape[1], device=proto.device)
        return proto.new(storage).resize_(batch, *shape)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        idx = as_indices([index], len(self.store))
        features = self._gather(idx)[0]
        return torch.from_numpy(features), int(self.store._guarded_labels()[idx[0]])

    def __getitems__(self, indices: Sequence[int]) -> TensorBatch:
        idx = as_indices(indices, len(self.store))
        shared = self._shared_output(len(idx))
        if shared is None:
            features = torch.from_numpy(self._gather(idx))
        else:
            self._gather(idx, out=shared.numpy())
            features = shared
        labels = self.store._guarded_labels()[idx].astype(np.int64)
        return TensorBatch(features, torch.from_numpy(labels), torch.from_numpy(idx))


def collate(batch: TensorBatch | list[tuple[torch.Tensor, int]]) -> TensorBatch:
    """collate_fn for StoreDataset: passes a gathered batch through untouched
    (and stacks items, should a DataLoader hand it single items)."""
    if isinstance(batch, TensorBatch):
        return batch
    features = torch.stack([f for f, _ in batch])
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return TensorBatch(features, labels, torch.full((len(batch),), -1, dtype=torch.int64))


def tensor_batches(loader: Loader) -> Iterator[TensorBatch]:
    """Iterate one epoch of ``loader`` as tensors that share the batch memory."""
    for b in loader:
        yield TensorBatch(torch.from_numpy(b.features), torch.from_numpy(b.labels.astype(np.int64)),
                          torch.from_numpy(b.indices))
