"""Resuming a loader mid-epoch: Loader.state_dict() and load_state_dict()."""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import CHILD_CWD, synthetic_store

import finegym_store as fgs
from finegym_store.loader import STATE_FORMAT

N = 203  # not a multiple of any batch size or world size used below


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("resume"), N, 7, seed=3)


def make(store, **kw):
    args = dict(batch_size=16, num_segments=3, mode="train", seed=5)
    args.update(kw)
    return store.loader("x", **args)


def copy(batch):
    # Copies, so recycled buffers (reuse_buffers=True) cannot change what was received.
    return fgs.Batch(batch.features.copy(), batch.labels.copy(), batch.indices.copy())


def run(loader, count=None):
    """The next iteration's batches (the first `count` of them), copied."""
    return [copy(b) for b in itertools.islice(loader, count)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.features.dtype == b.features.dtype and a.features.shape == b.features.shape, i
        assert a.features.tobytes() == b.features.tobytes(), i
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.indices, b.indices)
        assert a.labels.dtype == b.labels.dtype and a.indices.dtype == b.indices.dtype


def roundtrip(state):
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 3)])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("sampler", ["uniform", "balanced"])
def test_resume_yields_the_rest_of_the_epoch_then_the_next(store, rank, world_size, drop_last, shuffle, sampler):
    kw = dict(rank=rank, world_size=world_size, drop_last=drop_last, shuffle=shuffle, sampler=sampler)
    ref = make(store, **kw)
    epochs = [run(ref) for _ in range(3)]
    batches = len(ref)
    assert [len(e) for e in epochs] == [batches] * 3
    assert not drop_last or all(len(b) == 16 for e in epochs for b in e)
    for k in (1, batches // 2, batches - 1):
        # Through epoch 0, then k batches of epoch 1, with an iterator still active.
        first = make(store, **kw)
        run(first)
        it = iter(first)
        received = [copy(next(it)) for _ in range(k)]
        assert_same_batches(received, epochs[1][:k])
        state = first.state_dict()
        assert (state["epoch"], state["batches"]) == (1, k)
        it.close()

        resumed = make(store, **kw)
        resumed.load_state_dict(roundtrip(state))
        assert resumed.state_dict() == state
        rest = run(resumed)
        assert_same_batches(rest, epochs[1][k:])
        assert_same_batches(received + rest, epochs[1])
        assert_same_batches(run(resumed), epochs[2])


def test_state_is_json_and_names_the_configuration(store):
    loader = make(store, rank=1, world_size=3, sampler="balanced", drop_last=True)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["format"] == STATE_FORMAT
    assert state["store_length"] == N
    assert (state["epoch"], state["batches"]) == (0, 0)
    assert (state["seed"], state["batch_size"], state["rank"], state["world_size"]) == (5, 16, 1, 3)
    assert (state["shuffle"], state["drop_last"], state["sampler"]) == (True, True, "balanced")
    assert state["spec"] == {"num_segments": 3, "mode": "train", "clip_len": 1, "rule": "mmaction2",
                             "dtype": None, "seed": 5, "normalize": False}


def test_state_between_epochs_resumes_at_the_next(store):
    ref = make(store)
    epochs = [run(ref) for _ in range(3)]
    loader = make(store)
    fresh = loader.state_dict()
    assert (fresh["epoch"], fresh["batches"]) == (0, 0)
    resumed = make(store)
    resumed.load_state_dict(roundtrip(fresh))
    assert_same_batches(run(resumed), epochs[0])

    run(loader)  # epoch 0 completed
    done = loader.state_dict()
    assert (done["epoch"], done["batches"]) == (1, 0)
    resumed = make(store)
    resumed.load_state_dict(roundtrip(done))
    assert_same_batches(run(resumed), epochs[1])
    assert_same_batches(run(resumed), epochs[2])

    # Every batch of epoch 1 received, the iterator not yet exhausted: epoch 1 is over.
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    last = loader.state_dict()
    assert (last["epoch"], last["batches"]) == (2, 0)
    resumed = make(store)
    resumed.load_state_dict(last)
    assert_same_batches(run(resumed), epochs[2])
    with pytest.raises(StopIteration):
        next(it)
    assert loader.state_dict() == last

    # An iteration started but not yet advanced: no batch of it received.
    it = iter(loader)
    started = loader.state_dict()
    assert (started["epoch"], started["batches"]) == (2, 0)
    del it


def test_prefetched_batches_are_not_received(store):
    loader = make(store, prefetch=6)
    it = iter(loader)
    next(it)
    next(it)
    assert loader.state_dict()["batches"] == 2
    del it


def test_state_taken_mid_iteration_then_iterator_abandoned(store):
    ref = make(store)
    epochs = [run(ref) for _ in range(2)]
    loader = make(store)
    received = []
    for b in loader:
        received.append(copy(b))
        if len(received) == 4:
            state = loader.state_dict()
            break
    # The for loop dropped its iterator: in-flight jobs were waited for, and
    # this loader's next iteration is epoch 1, which its state now says.
    after = loader.state_dict()
    assert (after["epoch"], after["batches"]) == (1, 0)
    assert (state["epoch"], state["batches"]) == (0, 4)
    resumed = make(store)
    resumed.load_state_dict(roundtrip(state))
    assert_same_batches(received + run(resumed), epochs[0])
    assert_same_batches(run(loader), epochs[1])
    assert_same_batches(run(resumed), epochs[1])


def test_reuse_buffers(store):
    kw = dict(reuse_buffers=True, drop_last=False, rank=1, world_size=3)
    ref = make(store, **kw)
    epochs = [run(ref) for _ in range(2)]
    loader = make(store, **kw)
    it = iter(loader)
    received = [copy(next(it)) for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = make(store, **kw)
    resumed.load_state_dict(roundtrip(state))
    assert_same_batches(received + run(resumed), epochs[0])
    assert_same_batches(run(resumed), epochs[1])
    # Buffers recycled or not, prefetch and threads do not change the batches.
    plain = make(store, rank=1, world_size=3, prefetch=0, threads=1)
    plain.load_state_dict(roundtrip(state))
    assert_same_batches(run(plain), epochs[0][3:])


def test_resume_twice_and_from_a_later_epoch(store):
    ref = make(store, sampler="balanced")
    epochs = [run(ref) for _ in range(6)]
    a = make(store, sampler="balanced")
    a.set_epoch(4)
    it = iter(a)
    got = [copy(next(it)) for _ in range(2)]
    state = a.state_dict()
    del it
    b = make(store, sampler="balanced")
    b.load_state_dict(roundtrip(state))
    assert b.state_dict()["epoch"] == 4
    it = iter(b)
    got += [copy(next(it)) for _ in range(5)]
    state = b.state_dict()
    assert (state["epoch"], state["batches"]) == (4, 7)
    del it
    c = make(store, sampler="balanced")
    c.load_state_dict(roundtrip(state))
    assert_same_batches(got + run(c), epochs[4])
    assert_same_batches(run(c), epochs[5])


def test_set_epoch_after_loading(store):
    ref = make(store)
    epochs = [run(ref) for _ in range(3)]
    loader = make(store)
    it = iter(loader)
    next(it)
    next(it)
    state = loader.state_dict()
    del it
    # The usual loop sets the epoch before iterating: the resumed one keeps its position.
    resumed = make(store)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert resumed.state_dict() == state
    assert_same_batches(run(resumed), epochs[0][2:])
    # Any other epoch starts at its first batch.
    other = make(store)
    other.load_state_dict(state)
    other.set_epoch(2)
    moved = other.state_dict()
    assert (moved["epoch"], moved["batches"]) == (2, 0)
    assert_same_batches(run(other), epochs[2])


def test_pickle_carries_the_next_iteration(store):
    import pickle

    ref = make(store, rank=1, world_size=3)
    epochs = [run(ref) for _ in range(2)]
    loader = make(store, rank=1, world_size=3)
    it = iter(loader)
    next(it)
    next(it)
    state = loader.state_dict()
    # Mid-iteration: the copy's next iteration is the loader's own next one, epoch 1.
    clone = pickle.loads(pickle.dumps(loader))
    assert (clone.state_dict()["epoch"], clone.state_dict()["batches"]) == (1, 0)
    assert_same_batches(run(clone), epochs[1])
    del it
    # A loaded position crosses pickle (spawn workers resume where the state says).
    resumed = make(store, rank=1, world_size=3)
    resumed.load_state_dict(state)
    clone = pickle.loads(pickle.dumps(resumed))
    assert clone.state_dict() == state
    assert_same_batches(run(clone), epochs[0][2:])


@pytest.mark.parametrize("field, kw", [
    ("batch_size", dict(batch_size=8)),
    ("seed", dict(seed=6)),
    ("rank", dict(rank=1, world_size=3)),
    ("world_size", dict(rank=0, world_size=3)),
    ("shuffle", dict(shuffle=False)),
    ("drop_last", dict(drop_last=True)),
    ("sampler", dict(sampler="balanced")),
    ("spec", dict(mode="test")),
    ("spec", dict(dtype="float16")),
    ("spec", dict(num_segments=2)),
])
def test_other_configuration_refused(store, field, kw):
    state = roundtrip(make(store).state_dict())
    other = make(store, **kw)
    before = other.state_dict()
    with pytest.raises(ValueError, match=rf"\b{field} differs"):
        other.load_state_dict(state)
    assert other.state_dict() == before  # a refused state changes nothing


def test_other_store_refused(store, tmp_path):
    state = make(store).state_dict()
    (tmp_path / "short").mkdir()
    (tmp_path / "relabelled").mkdir()
    shorter = synthetic_store(tmp_path / "short", N - 1, 7, seed=3)
    with pytest.raises(ValueError, match=f"store_length differs: the state has {N}, this loader {N - 1}"):
        make(shorter).load_state_dict(state)
    relabelled = synthetic_store(tmp_path / "relabelled", N, 7, seed=4)
    assert not np.array_equal(relabelled.labels, store.labels)
    with pytest.raises(ValueError, match="labels_sha256 differs"):
        make(relabelled).load_state_dict(state)


def test_malformed_state_refused(store):
    loader = make(store)
    state = loader.state_dict()
    with pytest.raises(TypeError, match="state must be a dict"):
        loader.load_state_dict([("epoch", 0)])
    with pytest.raises(ValueError, match="'format' is None"):
        loader.load_state_dict({"epoch": 0, "batches": 0})
    with pytest.raises(ValueError, match="'format' is 'other'"):
        loader.load_state_dict({**state, "format": "other"})
    without = dict(state)
    del without["sampler"]
    with pytest.raises(ValueError, match="no 'sampler'"):
        loader.load_state_dict(without)
    # JSON keeps bools and ints apart; so does the comparison.
    with pytest.raises(ValueError, match="shuffle differs"):
        loader.load_state_dict({**state, "shuffle": 1})
    with pytest.raises(ValueError, match="batch_size differs"):
        loader.load_state_dict({**state, "batch_size": 16.0})
    for bad in ("1", -1, True, 1.0, None):
        with pytest.raises(ValueError, match="'epoch' must be an integer >= 0"):
            loader.load_state_dict({**state, "epoch": bad})
        with pytest.raises(ValueError, match="'batches' must be an integer >= 0"):
            loader.load_state_dict({**state, "batches": bad})
    with pytest.raises(ValueError, match=f"'batches' must be less than the {len(loader)} batches"):
        loader.load_state_dict({**state, "batches": len(loader)})
    assert loader.state_dict() == state


CHILD = r"""
import hashlib, json, os, signal, sys
import finegym_store as fgs

path, out, state_path, mode, k = sys.argv[1:6]
loader = fgs.open(path).loader("x", 16, num_segments=3, mode="train", seed=9, rank=1, world_size=3, prefetch=3)
if mode == "resume":
    with open(state_path) as f:
        loader.load_state_dict(json.load(f))

def record(b):
    return {"indices": b.indices.tolist(), "labels": b.labels.tolist(),
            "features": hashlib.sha256(b.features.tobytes()).hexdigest()}

with open(out, "w") as f:
    for i, b in enumerate(loader):
        f.write(json.dumps(record(b)) + "\n")
        f.flush()
        if mode == "start" and i + 1 == int(k):
            tmp = state_path + ".tmp"
            with open(tmp, "w") as s:
                json.dump(loader.state_dict(), s)
                s.flush()
                os.fsync(s.fileno())
            os.replace(tmp, state_path)
            # Preempted, with batches still being gathered in the background.
            os.kill(os.getpid(), signal.SIGKILL)
"""


def child(*args):
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=CHILD_CWD)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_in_a_new_process_after_sigkill(store, tmp_path):
    ref = store.loader("x", 16, num_segments=3, mode="train", seed=9, rank=1, world_size=3)
    want = [{"indices": b.indices.tolist(), "labels": b.labels.tolist(),
             "features": hashlib.sha256(b.features.tobytes()).hexdigest()} for b in ref]
    k = 2
    assert len(want) > k + 1
    state = tmp_path / "state.json"
    killed = child(store.path, tmp_path / "first.jsonl", state, "start", k)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = records(tmp_path / "first.jsonl")
    assert len(first) == k
    resumed = child(store.path, tmp_path / "second.jsonl", state, "resume", 0)
    assert resumed.returncode == 0, resumed.stderr
    second = records(tmp_path / "second.jsonl")
    assert first + second == want
    assert sorted(i for r in first + second for i in r["indices"]) == sorted(ref.indices(0).tolist())
