"""PyTorch integration (install the ``torch`` extra).

Two ways in:

* :class:`StoreDataset` for ``torch.utils.data.DataLoader``. It implements
  ``__getitems__``, so with ``collate_fn=finegym_store.torch.collate`` a
  DataLoader fetches each batch with one C++ gather instead of B item calls.
  It pickles by path (``spawn`` workers reopen the file) and survives
  ``fork`` (the C++ thread pool is rebuilt in the child).
* :func:`tensor_batches`: wraps a :class:`finegym_store.Loader`, turning its
  batches into tensors without a copy (``torch.from_numpy``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .loader import Loader
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
    Sampling arguments are those of :meth:`finegym_store.Store.gather`; call
    ``set_epoch`` each epoch so train-mode offsets change."""

    def __init__(self, store: Store | str | os.PathLike[str], column: str, num_segments: int | None = None,
                 mode: str = "test", seed: int = 0, clip_len: int = 1, dtype: Any = None,
                 threads: int | None = None) -> None:
        self.store = store if isinstance(store, Store) else open_store(store)
        self.column = column
        self.num_segments = num_segments
        self.mode = mode
        self.seed = seed
        self.clip_len = clip_len
        self.dtype = dtype
        self.threads = threads
        self.epoch = 0
        self.store.column(column)  # KeyError naming the columns, now

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.store)

    def _gather(self, indices: np.ndarray) -> np.ndarray:
        return self.store.gather(self.column, indices, num_segments=self.num_segments, mode=self.mode,
                                 seed=self.seed, epoch=self.epoch, clip_len=self.clip_len, dtype=self.dtype,
                                 threads=self.threads)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        features = self._gather(np.array([index], dtype=np.int64))[0]
        return torch.from_numpy(features), int(self.store.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> TensorBatch:
        idx = np.asarray(indices, dtype=np.int64)
        features = self._gather(idx)
        labels = self.store.labels[idx].astype(np.int64)
        return TensorBatch(torch.from_numpy(features), torch.from_numpy(labels), torch.from_numpy(idx))


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
