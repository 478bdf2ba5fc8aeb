"""The training loader: epochs, shards, balanced sampling, prefetch."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from conftest import synthetic_store

from finegym_store.loader import epoch_order, shard


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("loader"), 1003, 20, seed=3)  # not a multiple of any batch size or world size used below


def collect(loader):
    return [b for b in loader]


def test_batches_cover_the_epoch_once(store):
    loader = store.loader("x", batch_size=64, num_segments=3, mode="train")
    batches = collect(loader)
    assert len(batches) == len(loader) == 16
    idx = np.concatenate([b.indices for b in batches])
    assert sorted(idx.tolist()) == list(range(len(store)))
    for b in batches:
        assert b.features.shape == (len(b), 3, 16)
        np.testing.assert_array_equal(b.labels, store.labels[b.indices])
        np.testing.assert_array_equal(
            b.features, store.gather("x", b.indices, num_segments=3, mode="train", seed=0, epoch=0))


def test_epochs_advance_and_are_reproducible(store):
    loader = store.loader("x", batch_size=100, num_segments=3, mode="train", seed=7)
    e0 = np.concatenate([b.indices for b in loader])
    e1 = np.concatenate([b.indices for b in loader])
    assert not np.array_equal(e0, e1)
    assert loader.epoch == 2
    loader.set_epoch(0)
    again = collect(loader)
    np.testing.assert_array_equal(np.concatenate([b.indices for b in again]), e0)
    other = store.loader("x", batch_size=100, num_segments=3, mode="train", seed=7)
    first = collect(other)
    for a, b in zip(again, first):
        assert a.features.tobytes() == b.features.tobytes()
    no_shuffle = store.loader("x", batch_size=100, shuffle=False, mode="test")
    np.testing.assert_array_equal(np.concatenate([b.indices for b in no_shuffle]), np.arange(len(store)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_match_distributed_sampler_contract(store, world_size, drop_last):
    n = len(store)
    shards = [store.loader("x", batch_size=32, num_segments=1, mode="train",
                           rank=r, world_size=world_size, drop_last=drop_last,
                           seed=5).indices(epoch=3) for r in range(world_size)]
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1
    order = epoch_order(store.labels, 5, 3)
    if drop_last:
        assert sizes == {n // world_size}
        union = np.concatenate(shards)
        assert len(np.unique(union)) == len(union)  # disjoint
    else:
        assert sizes == {-(-n // world_size)}
        assert set(np.concatenate(shards).tolist()) == set(range(n))  # covers all
        padded = np.concatenate([order, order])[: len(shards[0]) * world_size]
        for r, s in enumerate(shards):
            np.testing.assert_array_equal(s, padded[r::world_size])


def test_shard_matches_torch_distributed_sampler():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DistributedSampler

    order = np.random.default_rng(0).permutation(103)
    for ws in (2, 3, 4):
        for drop_last in (False, True):
            for r in range(ws):
                # torch's sampler with shuffle=False over our order == shard() of our order.
                ds = DistributedSampler(list(range(103)), num_replicas=ws, rank=r, shuffle=False,
                                        drop_last=drop_last)
                expected = order[np.array(list(iter(ds)))]
                np.testing.assert_array_equal(shard(order, r, ws, drop_last), expected)
    del torch


def test_len_and_drop_last(store):
    assert len(store.loader("x", batch_size=100)) == 11
    dl = store.loader("x", batch_size=100, drop_last=True)
    assert len(dl) == 10
    assert all(len(b) == 100 for b in dl)
    two = store.loader("x", batch_size=100, rank=1, world_size=2)
    assert len(two) == 6 and len(collect(two)) == 6


def test_balanced_sampler_draws_classes_uniformly(store):
    loader = store.loader("x", batch_size=256, num_segments=1, mode="train", sampler="balanced", seed=1)
    labels = np.concatenate([store.labels[loader.indices(epoch=e)] for e in range(30)])
    counts = np.bincount(labels, minlength=20)
    frac = counts / counts.sum()
    assert np.abs(frac - 1 / 20).max() < 0.01, frac
    natural = np.bincount(store.labels, minlength=20) / len(store)
    assert natural.max() / natural.min() > 5  # the data really is long-tailed
    np.testing.assert_array_equal(loader.indices(epoch=4), loader.indices(epoch=4))
    assert not np.array_equal(loader.indices(epoch=4), loader.indices(epoch=5))


def test_yielded_batches_are_never_overwritten(store):
    loader = store.loader("x", batch_size=50, num_segments=3, mode="train", prefetch=3)
    kept = [(b, b.features.copy()) for b in loader]
    for b, snapshot in kept:
        assert b.features.tobytes() == snapshot.tobytes()
    assert len({id(b.features) for b, _ in kept}) == len(kept)


def test_reuse_buffers_recycles_only_after_the_next_request(store):
    loader = store.loader("x", batch_size=50, num_segments=3, mode="train",
                          prefetch=2, reuse_buffers=True, drop_last=True)
    addresses = set()
    for b in loader:
        # While the caller holds a batch, the prefetch jobs running meanwhile
        # write other buffers: this one stays intact until the next request.
        addresses.add(b.features.__array_interface__["data"][0])
        np.testing.assert_array_equal(
            b.features, store.gather("x", b.indices, num_segments=3, mode="train", epoch=0))
    assert len(addresses) <= 4  # a small ring, not one buffer per batch


@pytest.mark.parametrize("prefetch", [0, 1, 2, 5])
def test_prefetch_keeps_exactly_its_lookahead(store, monkeypatch, prefetch):
    # While the caller holds batch b, the jobs for b+1 .. b+prefetch (no more,
    # and no fewer while batches remain) have been submitted.
    from finegym_store import loader as loader_module

    made = []
    real = loader_module._core.GatherJob

    def counting(*args):
        made.append(args[2])
        return real(*args)

    monkeypatch.setattr(loader_module._core, "GatherJob", counting)
    loader = store.loader("x", batch_size=64, num_segments=3, mode="train", prefetch=prefetch)
    n = len(loader)
    for b, batch in enumerate(loader):
        assert len(made) == min(n, b + 1 + prefetch), (b, len(made))
        np.testing.assert_array_equal(made[b], batch.indices)
    assert len(made) == n


def test_background_jobs_finish_without_a_waiter(store):
    # Idle background workers poll for a while, then park; a job submitted in
    # either state runs to the end with nobody waiting on it (`done` turns
    # true by itself), and its output is right.
    import time

    from finegym_store import _core

    idx = np.arange(0, len(store), 5)
    expected = store.gather("x", idx, num_segments=3, mode="test")
    for gap in (0.0, 0.0003, 0.05):  # back to back; within the polling phase; after it (5 ms)
        time.sleep(gap)
        job = _core.GatherJob(store._reader, "x", idx,
                              _core.GatherSpec(3, "test", 1, "mmaction2", np.dtype("float32"), 0), 0, None, 2)
        deadline = time.monotonic() + 30
        while not job.done and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert job.done, f"a job submitted after {gap} s idle never ran"
        np.testing.assert_array_equal(job.wait(), expected)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux /proc")
def test_abandoned_iterator_stops_its_threads(store):
    # The C++ pools (gather's and the background jobs') exist from here on:
    # their threads are persistent, started once per process.
    next(iter(store.loader("x", batch_size=10, num_segments=3, mode="train")))
    before = os_threads()
    loader = store.loader("x", batch_size=10, num_segments=3, mode="train", prefetch=4)
    it = iter(loader)
    next(it)  # prefetch jobs now run (or ran) on the background threads
    del it
    gc.collect()
    assert os_threads() == before
    assert len(collect(loader)) == len(loader)


def test_loader_argument_errors(store):
    with pytest.raises(ValueError, match="batch_size"):
        store.loader("x", batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        store.loader("x", batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="sampler"):
        store.loader("x", batch_size=4, sampler="weird")
    with pytest.raises(KeyError, match="no feature column"):
        store.loader("y", batch_size=4)
    with pytest.raises(ValueError, match="num_segments"):
        store.loader("x", batch_size=4, num_segments=0, mode="train")


def test_loader_pickles_for_spawn(store):
    import pickle

    loader = store.loader("x", batch_size=64, num_segments=3, mode="train", seed=2, rank=1, world_size=2)
    loader.set_epoch(5)
    clone = pickle.loads(pickle.dumps(loader))
    assert clone.store.path == store.path and clone.epoch == 5
    a, b = next(iter(loader)), next(iter(clone))
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.features.tobytes() == b.features.tobytes()


def test_absurd_world_size_is_refused_before_allocating(store):
    n = len(store)
    with pytest.raises(ValueError, match=r"world_size must be at most 2147483648, got 1099511627776"):
        store.loader("x", batch_size=8, world_size=2**40)
    with pytest.raises(ValueError, match=rf"world_size=16777217 pads each epoch of {n} instances to 16777217 "
                                         r"indices .* at most 16777216"):
        store.loader("x", batch_size=8, world_size=2**24 + 1)
    # More ranks than instances is served by padding (each rank gets one index), or
    # with drop_last by nothing at all; neither allocates beyond the limit.
    padded = store.loader("x", batch_size=8, world_size=2 * n, rank=2 * n - 1)
    assert len(padded.indices(epoch=0)) == 1
    assert len(store.loader("x", batch_size=8, world_size=2**31, rank=5, drop_last=True).indices(epoch=0)) == 0
