"""PyTorch integration: DataLoader workers (fork, spawn), fork safety of the
C++ pool, and a two-process torch.distributed run over loopback."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import require, require_torch, synthetic_store


torch = require_torch()
from finegym_store.torch import StoreDataset, TensorBatch, collate, tensor_batches  # noqa: E402

# Python >= 3.12 warns when fork() meets a process with threads (ours has the
# C++ pool); these tests fork on purpose, to prove the pool is rebuilt.
fork_ok = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("torch"), 301, 10, seed=9)


def test_dataset_items_and_batches(store):
    ds = StoreDataset(store, "x", num_segments=3, mode="train", seed=2)
    f, label = ds[7]
    assert f.shape == (3, 16) and f.dtype == torch.float32 and label == int(store.labels[7])
    batch = ds.__getitems__([1, 2, 3])
    assert isinstance(batch, TensorBatch)
    np.testing.assert_array_equal(batch.features.numpy(),
                                  store.gather("x", [1, 2, 3], num_segments=3, mode="train", seed=2))
    # Zero copy: the tensor shares the gathered array's memory.
    arr = store.gather("x", [1], num_segments=3, mode="test")
    t = torch.from_numpy(arr)
    assert t.data_ptr() == arr.__array_interface__["data"][0]


def _loader_batches(store, num_workers, context):
    ds = StoreDataset(store.path, "x", num_segments=3, mode="train", seed=4)
    dl = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, num_workers=num_workers,
                                     collate_fn=collate, multiprocessing_context=context)
    return [(b.features.numpy().copy(), b.labels.numpy().copy(), b.indices.numpy().copy()) for b in dl]


@fork_ok
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_give_the_plain_loader_data(store, context):
    store.gather("x", [0], num_segments=3, mode="test")  # the C++ pool has run in the parent before forking
    plain = _loader_batches(store, 0, None)
    workers = _loader_batches(store, 2, context)
    assert len(plain) == len(workers) == 10
    for (f0, l0, i0), (f1, l1, i1) in zip(plain, workers):
        assert f0.tobytes() == f1.tobytes()
        np.testing.assert_array_equal(l0, l1)
        np.testing.assert_array_equal(i0, i1)
    # ... and the same bytes as store.gather itself.
    np.testing.assert_array_equal(plain[0][0], store.gather("x", np.arange(32), num_segments=3, mode="train",
                                                            seed=4))


def _child_gather(store, queue):
    queue.put(store.gather("x", np.arange(50), num_segments=5, mode="train", seed=1, threads=2).tobytes())


@fork_ok
def test_store_survives_fork_after_pool_ran(store):
    parent = store.gather("x", np.arange(50), num_segments=5, mode="train", seed=1, threads=2)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_gather, args=(store, q))
    p.start()
    child = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0
    assert child == parent.tobytes()


def test_tensor_batches_from_loader(store):
    loader = store.loader("x", batch_size=64, num_segments=3, mode="train", seed=3)
    batches = list(tensor_batches(loader))
    assert sum(len(b.indices) for b in batches) == len(store)
    assert batches[0].features.shape == (64, 3, 16) and batches[0].labels.dtype == torch.int64


DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import finegym_store as fgs

    rank, world, path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = fgs.open(path)
    loader = store.loader("x", batch_size=16, num_segments=3, mode="train", rank=rank, world_size=world, seed=5)
    result = {}
    for epoch in range(2):
        mine = torch.from_numpy(np.concatenate([b.indices for b in loader]))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        result[epoch] = [g.tolist() for g in gathered]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run_covers_the_dataset(store, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "result.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", store.path, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err.decode()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    result = json.loads(out.read_text())
    n = len(store)
    epochs = []
    for epoch in ("0", "1"):
        shards = result[epoch]
        assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
        # Padding by wrapping repeats one index (n is odd); otherwise disjoint.
        both = shards[0] + shards[1]
        assert set(both) == set(range(n))
        assert len(both) - len(set(both)) == 2 * ((n + 1) // 2) - n
        assert not set(shards[0][: n // 2]) & set(shards[1][: n // 2])
        epochs.append(both)
    assert epochs[0] != epochs[1]  # a new permutation each epoch


class _ThreadsProbe(StoreDataset):
    """Reports, from inside a worker, the threads its gathers would use."""

    def __getitems__(self, indices):
        return torch.tensor([self.gather_threads()])


@fork_ok
def test_dataset_threads_default_splits_the_cores_between_workers(store):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ds = _ThreadsProbe(store, "x", num_segments=3, mode="test")
    assert ds.gather_threads() is None  # the main process: every available core
    for workers in (1, 2):
        dl = torch.utils.data.DataLoader(ds, batch_size=100, num_workers=workers, collate_fn=lambda b: b,
                                         multiprocessing_context="fork")
        assert {int(t) for t in dl} == {max(1, cores // workers)}
    explicit = _ThreadsProbe(store, "x", num_segments=3, mode="test", threads=5)
    dl = torch.utils.data.DataLoader(explicit, batch_size=100, num_workers=2, collate_fn=lambda b: b,
                                     multiprocessing_context="fork")
    assert {int(t) for t in dl} == {5}


@fork_ok
def test_set_epoch_changes_train_segments_under_a_dataloader(store):
    ds = StoreDataset(store, "x", num_segments=3, mode="train", seed=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False, num_workers=2, collate_fn=collate,
                                     multiprocessing_context="fork")

    def epoch(e):
        ds.set_epoch(e)  # before iterating: the workers are started (forked) by iter(dl)
        return torch.cat([b.features for b in dl]).numpy()

    e0, e1, e0_again = epoch(0), epoch(1), epoch(0)
    assert e0.tobytes() == e0_again.tobytes()
    assert e0.tobytes() != e1.tobytes()
    idx = np.arange(len(store))
    np.testing.assert_array_equal(e1, store.gather("x", idx, num_segments=3, mode="train", seed=1, epoch=1))


def test_dataset_index_and_argument_errors(store):
    ds = StoreDataset(store, "x", num_segments=3, mode="test")
    n = len(store)
    for bad in (n, -n - 1, 2**63, 2**70):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__(np.array([0, 2**63], np.uint64))
    for bad in (1.0, True, "3", None):
        with pytest.raises(TypeError, match="integers|bool"):
            ds[bad]
    with pytest.raises(TypeError, match="bool"):
        ds.__getitems__([True, False])
    assert int(ds[-1][1]) == int(store.labels[n - 1])
    with pytest.raises(ValueError, match="mode must be"):
        StoreDataset(store, "x", num_segments=3, mode="TRAIN")
    with pytest.raises(ValueError, match="rule must be"):
        StoreDataset(store, "x", num_segments=3, mode="test", rule="tsn")
    exact = StoreDataset(store, "x", num_segments=5, mode="test", clip_len=2, rule="exact")
    np.testing.assert_array_equal(exact.__getitems__([0, 1]).features.numpy(),
                                  store.gather("x", [0, 1], num_segments=5, mode="test", clip_len=2, rule="exact"))


def _shared_report(batch):
    """collate_fn run inside the worker: whether the gathered batch already lives in shared memory."""
    return batch.features.is_shared(), batch.features.dtype, tuple(batch.features.shape), batch.features.clone()


@fork_ok
@pytest.mark.parametrize("num_segments, dtype", [(3, None), (None, "float16")])
def test_workers_gather_straight_into_shared_memory(store, num_segments, dtype):
    # In a worker the batch is gathered into a shared-memory tensor, so torch
    # sends it to the main process without copying it first; the values are
    # those of a gather in the main process, where nothing is shared.
    ds = StoreDataset(store, "x", num_segments=num_segments, mode="train", seed=3, dtype=dtype)
    main = ds.__getitems__([4, 0, 300])
    assert not main.features.is_shared()
    dl = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2, collate_fn=_shared_report,
                                     multiprocessing_context="fork")
    seen = list(dl)
    assert len(seen) == 43
    want_dtype = torch.float16 if dtype else torch.float32
    rows = 3 if num_segments else 12
    for b, (shared, dt, shape, values) in enumerate(seen):
        assert shared and dt == want_dtype and shape == (min(7, len(store) - 7 * b), rows, 16)
        idx = np.arange(7 * b, min(7 * b + 7, len(store)))
        np.testing.assert_array_equal(values.numpy(), store.gather("x", idx, num_segments=num_segments,
                                                                   mode="train", seed=3, dtype=dtype))


@fork_ok
@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("persistent", [True, False])
def test_workers_see_every_new_epoch(store, context, persistent):
    # The epoch lives in shared memory, so workers kept across epochs (or
    # spawned with a pickled dataset) gather the epoch set last.
    ds = StoreDataset(store, "x", num_segments=3, mode="train", seed=4)
    dl = torch.utils.data.DataLoader(ds, batch_size=50, num_workers=2, collate_fn=collate,
                                     persistent_workers=persistent, multiprocessing_context=context)
    seen = []
    for e in range(3):
        ds.set_epoch(e)
        assert ds.epoch == e
        batches = list(dl)
        features = torch.cat([b.features for b in batches]).numpy()
        indices = torch.cat([b.indices for b in batches]).numpy()
        np.testing.assert_array_equal(indices, np.arange(len(store)))
        np.testing.assert_array_equal(features, store.gather("x", indices, num_segments=3, mode="train",
                                                             seed=4, epoch=e))
        seen.append(features.tobytes())
    assert len(set(seen)) == 3
    ds.epoch = 1  # the same as set_epoch(1)
    assert ds.epoch == 1 and next(iter(dl)).features.numpy().tobytes() == seen[1][: 50 * 3 * 16 * 4]


@fork_ok
def test_default_collate_names_collate_and_batch_sampler_works(store):
    ds = StoreDataset(store, "x", num_segments=3, mode="test")
    with pytest.raises(TypeError, match=r"finegym_store\.torch\.collate"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    with pytest.raises(TypeError, match=r"finegym_store\.torch\.collate"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1, multiprocessing_context="fork")))
    # What collate hands back is a plain TensorBatch: indexing and unpacking work.
    b = collate(ds.__getitems__([3, 1]))
    assert type(b) is TensorBatch and b[2].tolist() == [3, 1]
    f, labels, idx = b
    assert f.shape == (2, 3, 16) and labels.tolist() == store.labels[[3, 1]].tolist() and idx.tolist() == [3, 1]

    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds), 16, False)
    for workers in (0, 2):
        dl = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=collate,
                                         num_workers=workers, multiprocessing_context="fork" if workers else None)
        got = list(dl)
        assert all(type(x) is TensorBatch for x in got)
        indices = torch.cat([x.indices for x in got]).numpy()
        assert sorted(indices.tolist()) == list(range(len(store)))
        np.testing.assert_array_equal(torch.cat([x.features for x in got]).numpy(),
                                      store.gather("x", indices, num_segments=3, mode="test"))
        np.testing.assert_array_equal(torch.cat([x.labels for x in got]).numpy(), store.labels[indices])


def _double_features(batch):
    return batch._replace(features=batch.features * 2, labels=batch.labels + 1000)


@fork_ok
def test_transform_runs_on_each_gathered_batch(store):
    ds = StoreDataset(store, "x", num_segments=3, mode="test", transform=_double_features)
    dl = torch.utils.data.DataLoader(ds, batch_size=40, num_workers=2, collate_fn=collate,
                                     multiprocessing_context="fork")
    got = list(dl)
    idx = np.arange(len(store))
    np.testing.assert_array_equal(torch.cat([b.features for b in got]).numpy(),
                                  store.gather("x", idx, num_segments=3, mode="test") * 2)
    np.testing.assert_array_equal(torch.cat([b.labels for b in got]).numpy(), store.labels.astype(np.int64) + 1000)
    bad = StoreDataset(store, "x", num_segments=3, mode="test", transform=lambda b: b.features)
    with pytest.raises(TypeError, match="transform must return a TensorBatch"):
        bad.__getitems__([0])
    with pytest.raises(TypeError, match="transform must be callable"):
        StoreDataset(store, "x", num_segments=3, mode="test", transform=3)


@fork_ok
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata 0.11 under torch 2.13
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_the_rest_of_the_epoch(store, workers):
    stateful = require("torchdata.stateful_dataloader", "torchdata", "pip install torchdata==0.11.0")
    ds = StoreDataset(store, "x", num_segments=3, mode="train", seed=2)
    ds.set_epoch(1)
    kwargs = {"batch_size": 20, "shuffle": True, "collate_fn": collate, "num_workers": workers,
              "multiprocessing_context": "fork" if workers else None,
              "generator": torch.Generator().manual_seed(5)}
    full = [b.indices.tolist() for b in stateful.StatefulDataLoader(ds, **kwargs)]
    dl = stateful.StatefulDataLoader(ds, **{**kwargs, "generator": torch.Generator().manual_seed(5)})
    it = iter(dl)
    first = [next(it).indices.tolist() for _ in range(5)]
    state = dl.state_dict()
    resumed = stateful.StatefulDataLoader(ds, **{**kwargs, "generator": torch.Generator().manual_seed(99)})
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert first + [b.indices.tolist() for b in rest] == full
    for b in rest:
        np.testing.assert_array_equal(b.features.numpy(), store.gather("x", b.indices.numpy(), num_segments=3,
                                                                      mode="train", seed=2, epoch=1))


# ---- several columns, native T ----------------------------------------------------------
@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Fixed T = 12: 'a' (C = 6) and 'b' = 2 * a[:, :4]; ragged 'r' and 's' = 3 * r (equal T per instance)."""
    import finegym_store as fgs
    from finegym_store import synth

    rng = np.random.default_rng(8)
    ids = synth.make_ids(45, seed=8)
    a = {k: rng.standard_normal((12, 6)).astype(np.float32) for k in ids}
    r = {k: rng.standard_normal((int(rng.integers(1, 15)), 3)).astype(np.float32) for k in ids}
    folder = tmp_path_factory.mktemp("multi")
    labels = synth.long_tailed_labels(45, 4, seed=8)
    synth.write_split(folder / "split.txt", ids, labels)
    return fgs.convert({"a": a, "b": {k: 2 * v[:, :4] for k, v in a.items()}, "r": r,
                        "s": {k: 3 * v for k, v in r.items()}}, folder / "m.fgs", split=folder / "split.txt",
                       progress=False)


def test_dataset_of_several_columns(multi):
    ds = StoreDataset(multi, ["a", "b"], num_segments=3, mode="train", seed=2)
    cat = StoreDataset(multi, ("b", "a"), num_segments=3, mode="train", seed=2, concat=True)
    for epoch in range(2):
        ds.set_epoch(epoch)
        cat.set_epoch(epoch)
        f, label = ds[7]
        assert list(f) == ["a", "b"] and label == int(multi.labels[7])
        want = multi.gather(["a", "b"], [7], num_segments=3, mode="train", seed=2, epoch=epoch)
        assert all(np.array_equal(f[k].numpy(), want[k][0]) for k in want)
        torch.testing.assert_close(f["b"], 2 * f["a"][:, :4], rtol=0, atol=0)
        batch = ds.__getitems__([3, 0, 44])
        want = multi.gather(["a", "b"], [3, 0, 44], num_segments=3, mode="train", seed=2, epoch=epoch)
        assert list(batch.features) == ["a", "b"]
        assert all(np.array_equal(batch.features[k].numpy(), want[k]) for k in want)
        c = cat.__getitems__([3, 0, 44]).features
        np.testing.assert_array_equal(c.numpy(), np.concatenate([want["b"], want["a"]], axis=2))
        assert tuple(cat[3][0].shape) == (3, 10)
    items = collate([ds[1], ds[2]])  # items: stacked per column
    assert list(items.features) == ["a", "b"] and tuple(items.features["b"].shape) == (2, 3, 4)
    loader = multi.loader(["a", "b"], 16, num_segments=3, mode="test", shuffle=False)
    tb = next(tensor_batches(loader))
    assert list(tb.features) == ["a", "b"] and isinstance(tb.features["a"], torch.Tensor)
    np.testing.assert_array_equal(tb.features["b"].numpy(), 2 * tb.features["a"].numpy()[:, :, :4])
    with pytest.raises(ValueError, match="differ in T"):
        StoreDataset(multi, ["a", "r"], num_segments=3, mode="train")
    with pytest.raises(ValueError, match="empty list"):
        StoreDataset(multi, [], num_segments=3, mode="train")


def _features_report(batch):
    """collate_fn in a worker: the features' per-column sharing, and the batch as a plain TensorBatch."""
    f = batch.features
    shared = {k: v.is_shared() for k, v in f.items()} if isinstance(f, dict) else f.is_shared()
    return shared, collate(batch)


@fork_ok
@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("concat", [False, True])
def test_workers_gather_several_columns(multi, context, concat):
    ds = StoreDataset(multi.path, ["a", "b"], num_segments=2, mode="train", seed=5, concat=concat)
    dl = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=2, collate_fn=_features_report,
                                     multiprocessing_context=context)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = list(dl)
        assert len(got) == 5
        for shared, batch in got:
            assert shared == ({"a": True, "b": True} if not concat else True)
            want = multi.gather(["a", "b"], batch.indices.numpy(), num_segments=2, mode="train", seed=5,
                                epoch=epoch, concat=concat)
            if concat:
                np.testing.assert_array_equal(batch.features.numpy(), want)
            else:
                assert all(np.array_equal(batch.features[k].numpy(), want[k]) for k in want)


@fork_ok
def test_ragged_items_at_native_t(multi):
    lengths = multi.column("r").lengths()
    ds = StoreDataset(multi, "r")
    for i in (0, 5, -1):
        f, label = ds[i]
        assert tuple(f.shape) == (lengths[i], 3) and f.dtype == torch.float32 and label == int(multi.labels[i])
        np.testing.assert_array_equal(f.numpy(), multi.features("r", i))
    with pytest.raises(IndexError, match="out of range"):
        ds[len(multi)]
    batch = ds.__getitems__([2, 9])
    assert isinstance(batch.features, list) and [tuple(t.shape) for t in batch.features] == \
        [(lengths[2], 3), (lengths[9], 3)]
    plain = collate(batch)
    assert type(plain) is TensorBatch and plain.features is batch.features
    j = int(np.flatnonzero(lengths != lengths[2])[0])
    items = collate([ds[2], ds[j]]).features  # items of different T stay a list
    assert isinstance(items, list) and [len(t) for t in items] == [lengths[2], lengths[j]]
    half = StoreDataset(multi, "r", dtype="float16")
    assert half[4][0].dtype == torch.float16
    np.testing.assert_array_equal(half[4][0].numpy(), multi.features("r", 4).astype(np.float16))

    both = StoreDataset(multi, ["r", "s"])
    f, _ = both[5]
    torch.testing.assert_close(f["s"], 3 * f["r"], rtol=0, atol=0)
    b = both.__getitems__([1, 2, 3])
    assert list(b.features) == ["r", "s"] and [len(t) for t in b.features["s"]] == list(lengths[[1, 2, 3]])
    cat = StoreDataset(multi, ["r", "s"], concat=True)
    assert tuple(cat[5][0].shape) == (lengths[5], 6)
    assert [tuple(t.shape) for t in cat.__getitems__([0, 1]).features] == [(lengths[0], 6), (lengths[1], 6)]
    with pytest.raises(ValueError, match="ragged.*num_segments=K"):  # a fixed-T batch cannot hold them
        multi.gather(["r", "s"], [0], num_segments=None)

    dl = torch.utils.data.DataLoader(both, batch_size=8, num_workers=2, collate_fn=collate,
                                     multiprocessing_context="fork")
    got = list(dl)
    indices = torch.cat([x.indices for x in got]).numpy()
    np.testing.assert_array_equal(indices, np.arange(len(multi)))
    for x in got:
        for j, i in enumerate(x.indices.tolist()):
            np.testing.assert_array_equal(x.features["r"][j].numpy(), multi.features("r", i))


@fork_ok
def test_default_collate_names_collate_for_every_features_shape(multi):
    for ds in (StoreDataset(multi, ["a", "b"], num_segments=3, mode="test"),
               StoreDataset(multi, ["a", "b"], num_segments=3, mode="test", concat=True),
               StoreDataset(multi, "r"), StoreDataset(multi, ["r", "s"])):
        with pytest.raises(TypeError, match=r"finegym_store\.torch\.collate"):
            next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
        with pytest.raises(TypeError, match=r"finegym_store\.torch\.collate"):
            next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="fork")))
