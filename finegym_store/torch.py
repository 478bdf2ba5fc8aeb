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
  batches into tensors without a copy (``torch.from_numpy``). With
  ``device="cuda"`` the loader gathers into page-locked (pinned) host
  buffers, and each batch is copied to the GPU on a separate CUDA stream
  while the previous batch's step runs; a buffer is written again only once
  its copy has completed.

A :class:`TensorBatch` moves as a whole: ``batch.to(device,
non_blocking=True)``, and ``batch.pin_memory()`` (what a DataLoader with
``pin_memory=True`` calls) gives a plain TensorBatch of pinned tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from . import _args
from .loader import Loader
from .spec import SegmentSpec, resolve
from .store import Store, open as open_store

__all__ = ["StoreDataset", "TensorBatch", "collate", "tensor_batches"]


class TensorBatch(NamedTuple):
    """features (B, K, C) float tensor, labels (B,) int64, indices (B,) int64.

    ``features`` is a dict {column: (B, K, C_i) tensor} for several columns
    (one (B, K, sum C_i) tensor with ``concat=True``), and a list of B
    (T_i, C) tensors, one per item at its native T, for a ragged column
    gathered with num_segments=None (a dict of such lists for several
    columns)."""

    features: torch.Tensor | dict[str, torch.Tensor] | list[torch.Tensor] | dict[str, list[torch.Tensor]]
    labels: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TensorBatch:
        """The three tensors on ``device`` (``Tensor.to(device,
        non_blocking)`` each), as a plain TensorBatch."""
        return TensorBatch(*(t.to(device, non_blocking=non_blocking) for t in tuple.__iter__(self)))

    def pin_memory(self, device: Any = None) -> TensorBatch:
        """The three tensors copied into page-locked host memory, as a plain
        TensorBatch. A DataLoader with ``pin_memory=True`` calls this (its
        pinning thread prefers an object's own ``pin_memory``)."""
        return TensorBatch(*(t.pin_memory() for t in tuple.__iter__(self)))


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
    """Instances of one feature column (or several) as a map-style Dataset.

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
    rather than each all of them.

    Several columns: ``column`` a list or tuple of names (as in
    :meth:`finegym_store.Store.gather`, one draw of segments for all, so
    every instance needs equal T in each column) gives features as a dict
    {column: tensor}, or one tensor of the channels side by side with
    ``concat=True``. A ragged column with num_segments=None (every
    segment) gives each item at its native T: ``dataset[i]`` a (T_i, C)
    tensor, a batch a list of them (:class:`TensorBatch`)."""

    def __init__(self, store: Store | str | os.PathLike[str], column: str | Sequence[str], *,
                 spec: SegmentSpec | None = None, threads: int | None = None,
                 transform: Callable[[TensorBatch], TensorBatch] | None = None, concat: bool = False,
                 **spec_keywords: Any) -> None:
        self.store = store if isinstance(store, Store) else open_store(store)
        # KeyError naming the columns (ValueError for unequal T), now.
        if isinstance(column, str):
            self.store.column(column)
            self.column: str | tuple[str, ...] = column
            self._columns: tuple[str, ...] = (column,)
        else:
            self.column = self._columns = self.store._columns_of(column)
        self.concat = _args.flag(concat, "concat")
        self.spec = resolve(spec, spec_keywords, "StoreDataset()")
        self.threads = _args.optional_count(threads, "threads", 1)
        if transform is not None and not callable(transform):
            raise TypeError(f"StoreDataset(): transform must be callable or None, got {type(transform).__name__}")
        self.transform = transform
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        #: Items at their native T: a ragged column with num_segments=None.
        self.native = self.spec.num_segments is None and any(self.store.column(c).ragged for c in self._columns)
        if self.native:
            if self._multi and self.concat:
                self.store._output_dtype(self._columns, self.spec)  # one dtype to concatenate
        else:
            # A spec the column can't serve fails here, not in a worker.
            self.store.gather(self.column, np.zeros(0, np.int64), spec=self.spec, threads=self.threads,
                              concat=self.concat)

    @property
    def _multi(self) -> bool:
        return not isinstance(self.column, str)

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

    def _gather(self, indices: np.ndarray, out: Any = None) -> Any:
        return self.store.gather(self.column, indices, spec=self.spec, epoch=self.epoch,
                                 threads=self.gather_threads(), out=out, concat=self.concat)

    def _shared_output(self, batch: int) -> Any:
        """Inside a DataLoader worker: uninitialised tensors in shared memory
        for a batch (one, or a dict of one per column), so the gather writes
        straight into what the worker hands to the main process (torch would
        otherwise copy the batch into shared memory to send it; its own
        default_collate does the same). None in the main process."""
        if get_worker_info() is None or batch == 0:
            return None
        empty = self._gather(np.zeros(0, np.int64))  # (0, rows, channels) of the output dtype, or a dict of them
        if isinstance(empty, dict):
            return {name: _shared_tensor(batch, a) for name, a in empty.items()}
        return _shared_tensor(batch, empty)

    def _native_item(self, i: int) -> Any:
        """Instance i (valid, >= 0) at its native T: a (T_i, C) tensor, a
        dict of them, or their concatenation; copies read under the SIGBUS
        guard, in the spec's dtype when it has one."""
        arrays = {name: self.store._copy_features(name, i, self.spec.dtype) for name in self._columns}
        if not self._multi:
            return torch.from_numpy(arrays[self.column])  # type: ignore[index]
        if self.concat:
            return torch.from_numpy(np.concatenate(list(arrays.values()), axis=1))
        return {name: torch.from_numpy(a) for name, a in arrays.items()}

    def __getitem__(self, index: Any) -> Any:
        """``(features (K, C), label)`` for an integer index; a list (or
        array) of indices is ``__getitems__(indices)``."""
        if isinstance(index, (list, tuple)) or (isinstance(index, (np.ndarray, torch.Tensor)) and index.ndim == 1):
            return self.__getitems__(index)
        idx = _args.indices([index], len(self.store))
        if self.native:
            i = _args.index(int(idx[0]), len(self.store), of="instances")
            return self._native_item(i), int(self.store._guarded_labels()[i])
        features = self._gather(idx)  # IndexError naming an out-of-range index
        label = int(self.store._guarded_labels()[idx[0]])
        if isinstance(features, dict):
            return {name: torch.from_numpy(a[0]) for name, a in features.items()}, label
        return torch.from_numpy(features[0]), label

    def __getitems__(self, indices: Sequence[int]) -> TensorBatch:
        idx = _args.indices(indices, len(self.store))
        features: Any
        if self.native:
            items = [self._native_item(_args.index(int(i), len(self.store), of="instances")) for i in idx]
            if self._multi and not self.concat:
                features = {name: [item[name] for item in items] for name in self._columns}
            else:
                features = items
        else:
            shared = self._shared_output(len(idx))
            if shared is None:
                features = _tensors(self._gather(idx))
            else:
                self._gather(idx, out=_arrays(shared))
                features = shared
        labels = self.store._guarded_labels()[idx].astype(np.int64)
        batch = TensorBatch(features, torch.from_numpy(labels), torch.from_numpy(idx))
        if self.transform is not None:
            batch = self.transform(batch)
            if not isinstance(batch, TensorBatch):
                raise TypeError(f"StoreDataset transform must return a TensorBatch, got {type(batch).__name__}")
        return _Gathered(*tuple.__iter__(batch))


def _shared_tensor(batch: int, empty: np.ndarray) -> torch.Tensor:
    """An uninitialised (batch, *empty.shape[1:]) tensor of empty's dtype in shared memory."""
    shape = empty.shape[1:]
    dtype = torch.float16 if empty.dtype == np.float16 else torch.float32
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(batch * shape[0] * shape[1], device=proto.device)
    return proto.new(storage).resize_(batch, *shape)


def _tensors(features: Any) -> Any:
    """Arrays (one, or a dict of them) as tensors sharing their memory."""
    if isinstance(features, dict):
        return {name: torch.from_numpy(a) for name, a in features.items()}
    return torch.from_numpy(features)


def _arrays(tensors: Any) -> Any:
    """Tensors (one, or a dict of them) as arrays sharing their memory."""
    if isinstance(tensors, dict):
        return {name: t.numpy() for name, t in tensors.items()}
    return tensors.numpy()


def _stack(features: list[Any]) -> Any:
    # Items' features into a batch: stacked (per column for dicts); items of
    # different T (a ragged column at native T) stay a list (per column).
    if features and isinstance(features[0], dict):
        return {name: _stack([f[name] for f in features]) for name in features[0]}
    if len({tuple(f.shape) for f in features}) > 1:
        return list(features)
    return torch.stack(features)


def collate(batch: TensorBatch | list[tuple[Any, int]]) -> TensorBatch:
    """collate_fn for StoreDataset: hands a gathered batch on as a plain
    TensorBatch without copying it (features a tensor, a dict of tensors or
    a list of native-T tensors, as gathered), and stacks items, should a
    DataLoader hand it single items (per column for dicts; items of
    different T stay a list)."""
    if isinstance(batch, TensorBatch):
        return TensorBatch(*tuple.__iter__(batch))
    features = _stack([f for f, _ in batch])
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    return TensorBatch(features, labels, torch.full((len(batch),), -1, dtype=torch.int64))


def tensor_batches(loader: Loader, *, device: torch.device | str | None = None,
                   non_blocking: bool = True) -> Iterator[TensorBatch]:
    """Iterate one epoch of ``loader`` as :class:`TensorBatch` es.

    ``device=None`` or a CPU device: tensors that share the batch memory
    (``torch.from_numpy``, no copy; features a dict of tensors for a loader
    of several columns without ``concat``). A CUDA device (``"cuda"``,
    ``"cuda:1"``, a ``torch.device``): features, labels (int64) and
    indices on that GPU. The loader's background gathers then write
    straight into page-locked (pinned) host buffers, a small ring of
    ``loader.prefetch + 3``; each batch is copied to the GPU on a CUDA
    stream of its own (``non_blocking=True``: asynchronously) as soon as it
    is gathered, one batch ahead, so the copy of the next batch overlaps the
    current step. When a batch is handed over, the stream that is current
    then waits for its copy (GPU-side: the host does not block) and its
    tensors are recorded on that stream (``Tensor.record_stream``), so the
    caching allocator keeps their memory until that stream's work on them
    is done. A pinned buffer is gathered into again only once an event
    recorded after its copy has completed. ``loader.state_dict()`` counts
    the batches handed out, not the one copied ahead. A loader's
    ``reuse_buffers`` does not apply: the pinned ring replaces it.

    ValueError naming ``device`` for a device that is not there (CUDA
    unavailable, an index beyond the GPUs) or not a CPU or CUDA device,
    and TypeError for a ``device`` that is not a str or torch.device or a
    ``non_blocking`` that is not a bool, at the call. A CUDA device takes a
    loader of one column, or of several with ``concat=True`` (ValueError
    otherwise)."""
    non_blocking = _args.flag(non_blocking, "tensor_batches(): non_blocking")
    target = _device(device)
    if target is None:
        return _host_batches(loader)
    if not isinstance(loader.column, str) and not loader.concat:
        raise ValueError("tensor_batches(): device= takes a loader of one column, or of several with "
                         "concat=True (one array per batch); this loader gathers a dict of "
                         f"{len(loader.column)} columns")
    return _device_batches(loader, _CudaCopies(target, non_blocking))


def _host_batches(loader: Loader) -> Iterator[TensorBatch]:
    for b in loader:
        yield TensorBatch(_tensors(b.features), torch.from_numpy(b.labels.astype(np.int64)),
                          torch.from_numpy(b.indices))


def _device(device: Any) -> torch.device | None:
    """The CUDA device ``device`` names (with its index), or None for the host."""
    if device is None:
        return None
    if isinstance(device, str):
        try:
            target = torch.device(device)
        except RuntimeError:
            raise ValueError(f"tensor_batches(): device must name a device ('cpu', 'cuda', 'cuda:0', ...), "
                             f"got {device!r}") from None
    elif isinstance(device, torch.device):
        target = device
    else:
        raise TypeError(f"tensor_batches(): device must be a str, a torch.device or None, "
                        f"got {type(device).__name__} {device!r}")
    if target.type == "cpu":
        return None
    if target.type != "cuda":
        raise ValueError(f"tensor_batches(): device must be a CPU or CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) finds no GPU")
        raise ValueError(f"tensor_batches(): device={device!r} but CUDA is not available ({why}); "
                         "the available device is 'cpu' (or None)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if target.index is None else target.index
    if index >= count:
        raise ValueError(f"tensor_batches(): device={device!r} but there {'is' if count == 1 else 'are'} "
                         f"{count} CUDA device{'' if count == 1 else 's'}: "
                         + ", ".join(f"'cuda:{i}'" for i in range(count)))
    return torch.device("cuda", index)


class _Copies(Protocol):
    """What the pinned ring needs of the device: host buffers, asynchronous
    copies that end in an event, and the hand-over to the consumer. CUDA
    implements it (:class:`_CudaCopies`); the tests, with events they
    complete themselves."""

    def host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def copy(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], Any]: ...

    def done(self, event: Any) -> bool: ...

    def wait(self, event: Any) -> None: ...

    def hand_over(self, tensors: tuple[torch.Tensor, ...], event: Any) -> None: ...


class _CudaCopies:
    """Copies to one GPU on a stream of their own."""

    def __init__(self, device: torch.device, non_blocking: bool) -> None:
        self.device = device
        self.non_blocking = non_blocking
        self.stream = torch.cuda.Stream(device)

    def host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def copy(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], Any]:
        # Allocated and copied on the copy stream; hand_over records the
        # tensors on the consumer's stream before anyone uses them there.
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=self.non_blocking) for t in tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def done(self, event: Any) -> bool:
        return bool(event.query())

    def wait(self, event: Any) -> None:
        event.synchronize()

    def hand_over(self, tensors: tuple[torch.Tensor, ...], event: Any) -> None:
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(event)
        for t in tensors:
            t.record_stream(consumer)


# The states of a pinned buffer: free, being gathered into, returned by the
# loader (its copy not yet queued), being copied (until its event completes).
_FREE, _GATHER, _HELD, _COPY = "free", "gather", "held", "copy"


class _Slot:
    __slots__ = ("address", "event", "features", "indices", "labels", "order", "state")

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.features, self.labels, self.indices = features, labels, indices
        self.address = features.data_ptr()
        self.state = _FREE
        self.event: Any = None
        self.order = 0


class _PinnedRing:
    """Host buffers of whole batches (features, labels, indices) that the
    loader's gathers write into. A buffer goes to a new gather only when it
    is free or its last copy's event has completed; with ``capacity``
    buffers and none of them free, the oldest copy is waited for (a buffer
    more is made only if none is being copied, which the loader's bounded
    prefetch does not reach)."""

    def __init__(self, copies: _Copies, shape: tuple[int, int, int], dtype: torch.dtype, capacity: int) -> None:
        self.copies = copies
        self.shape = shape
        self.dtype = dtype
        self.capacity = capacity
        self.slots: list[_Slot] = []
        self._copied = 0
        self.waits = 0  # how often acquire() had to wait for a copy

    def _copying(self) -> list[_Slot]:
        return sorted((s for s in self.slots if s.state == _COPY), key=lambda s: s.order)

    def acquire(self, rows: int) -> np.ndarray:
        """A buffer for the gather of ``rows`` instances (its features, as the
        ``out`` array)."""
        slot = next((s for s in self.slots if s.state == _FREE), None)
        if slot is None:
            slot = next((s for s in self._copying() if self.copies.done(s.event)), None)
        if slot is None:
            copying = self._copying()
            if len(self.slots) < self.capacity or not copying:
                b = self.shape[0]
                slot = _Slot(self.copies.host(self.shape, self.dtype), self.copies.host((b,), torch.int64),
                             self.copies.host((b,), torch.int64))
                self.slots.append(slot)
            else:
                slot = copying[0]
                self.copies.wait(slot.event)
                self.waits += 1
        slot.state, slot.event = _GATHER, None
        return slot.features.numpy()[:rows]

    def take(self, features: np.ndarray) -> _Slot | None:
        """The buffer a gathered batch's features are in (None: not one of ours)."""
        address = features.__array_interface__["data"][0]
        for s in self.slots:
            if s.state == _GATHER and s.address == address:
                s.state = _HELD
                return s
        return None

    def copied(self, slot: _Slot, event: Any) -> None:
        """The buffer's copy is queued; it is free once ``event`` completes."""
        self._copied += 1
        slot.state, slot.event, slot.order = _COPY, event, self._copied


def _stage(batch: Any, ring: _PinnedRing, copies: _Copies) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Queue the copy of a gathered batch; the device tensors and the copy's event."""
    n = len(batch.indices)
    slot = ring.take(batch.features)
    if slot is None:
        host = (torch.from_numpy(batch.features), torch.from_numpy(batch.labels.astype(np.int64)),
                torch.from_numpy(batch.indices))
    else:
        slot.labels.numpy()[:n] = batch.labels
        slot.indices.numpy()[:n] = batch.indices
        host = (slot.features[:n], slot.labels[:n], slot.indices[:n])
    tensors, event = copies.copy(host)
    if slot is not None:
        ring.copied(slot, event)
    return tensors, event


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def _device_batches(loader: Loader, copies: _Copies, capacity: int | None = None) -> Iterator[TensorBatch]:
    empty = loader.store.gather(loader.column, np.zeros(0, np.int64), spec=loader.spec, threads=1,
                                concat=loader.concat)
    batch_size, column = loader.batch_size, loader.column
    ring = _PinnedRing(copies, (batch_size, *empty.shape[1:]), _TORCH_DTYPES[empty.dtype],
                       loader.prefetch + 3 if capacity is None else capacity)

    def buffers(name: str, rows: int) -> np.ndarray | None:
        return ring.acquire(rows) if name == column and rows <= batch_size else None

    it, cursor = loader._iterate(buffers)
    ahead: tuple[tuple[torch.Tensor, ...], Any] | None = None
    try:
        for batch in it:
            staged = _stage(batch, ring, copies)
            if ahead is not None:
                cursor.done -= 1  # `staged` is copied ahead, not yet received
                copies.hand_over(*ahead)
                yield TensorBatch(*ahead[0])
            ahead = staged
        if ahead is not None:
            copies.hand_over(*ahead)
            yield TensorBatch(*ahead[0])
    finally:
        it.close()  # waits for the loader's in-flight gathers
