"""tensor_batches(device=...): the host path, device validation, and the
pinned-buffer ring behind the CUDA path, driven by a fake copy engine whose
copies happen only when their events complete (as a GPU's would), so a buffer
reused too early shows up as wrong values. Also TensorBatch.pin_memory / to
through torch's own pin_memory function, and the GPU benchmark's CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CHILD_CWD, require_torch, synthetic_store

torch = require_torch()
import finegym_store as fgs  # noqa: E402
import finegym_store.torch as fgt  # noqa: E402
from finegym_store.torch import StoreDataset, TensorBatch, collate, tensor_batches  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("device"), 203, 10, seed=5)


def _loader(store, **kw):
    args = {"num_segments": 3, "mode": "train", "seed": 3, "prefetch": 2}
    args.update(kw)
    return store.loader("x", 16, **args)


def _plain(store, epochs=2, **kw):
    loader = _loader(store, **kw)
    return [[(b.features.copy(), b.labels.astype(np.int64), b.indices.copy()) for b in loader]
            for _ in range(epochs)]


def _assert_same(batches, expected):
    assert len(batches) == len(expected)
    for got, (f, labels, idx) in zip(batches, expected):
        assert isinstance(got, TensorBatch)
        assert got.labels.dtype == torch.int64 and got.indices.dtype == torch.int64
        np.testing.assert_array_equal(got.features.numpy(), f)
        np.testing.assert_array_equal(got.labels.numpy(), labels)
        np.testing.assert_array_equal(got.indices.numpy(), idx)


# -- the host path ----------------------------------------------------------------


@pytest.mark.parametrize("device", [None, "cpu", "cpu:0", "device"])
def test_host_device_is_the_plain_loader(store, device):
    device = torch.device("cpu") if device == "device" else device
    expected = _plain(store)
    loader = _loader(store)
    for epoch in range(2):
        batches = []
        for b in tensor_batches(loader, device=device):
            # No copy: the tensor is the gathered array.
            assert b.features.device.type == "cpu"
            batches.append(TensorBatch(b.features.clone(), b.labels.clone(), b.indices.clone()))
        _assert_same(batches, expected[epoch])
    assert loader.epoch == 2


def test_host_path_is_zero_copy(store):
    loader = _loader(store)
    arrays = []
    orig = loader._run

    def spy(*args):
        for b in orig(*args):
            arrays.append(b.features)
            yield b
    loader._run = spy
    for b, arr in zip(tensor_batches(loader, device="cpu"), arrays):
        assert b.features.data_ptr() == arr.__array_interface__["data"][0]
    assert arrays


# -- device validation, at the call -----------------------------------------------


def test_bad_device_strings_and_types(store):
    loader = _loader(store)
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match=r"tensor_batches\(\): device must name a device .*" + repr(bad)):
            tensor_batches(loader, device=bad)
    with pytest.raises(ValueError, match=r"device must be a CPU or CUDA device, got 'meta'"):
        tensor_batches(loader, device="meta")
    for bad in (0, 1.0, ["cuda"]):
        with pytest.raises(TypeError, match=r"device must be a str, a torch.device or None, got " + type(bad).__name__):
            tensor_batches(loader, device=bad)
    for bad in (1, None, "yes"):
        with pytest.raises(TypeError, match=r"non_blocking must be True or False"):
            tensor_batches(loader, non_blocking=bad)
    assert loader.epoch == 0  # nothing started


def test_cuda_unavailable_names_the_device(store, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loader = _loader(store)
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match=r"device=.*cuda.* but CUDA is not available .*'cpu'"):
            tensor_batches(loader, device=device)


def test_cuda_index_beyond_the_gpus(store, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:7' but there is 1 CUDA device: 'cuda:0'$"):
        tensor_batches(_loader(store), device="cuda:7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"there are 2 CUDA devices: 'cuda:0', 'cuda:1'$"):
        tensor_batches(_loader(store), device=torch.device("cuda", 2))


# -- the pinned ring, with a fake copy engine ---------------------------------------


class FakeEvent:
    """A queued copy: it reads its sources only when it completes, as an
    asynchronous device copy reads pinned memory some time after queueing."""

    def __init__(self, sources, targets):
        self.sources, self.targets = sources, targets
        self.address = sources[0].data_ptr()
        self.complete = False

    def run(self):
        if not self.complete:
            for s, t in zip(self.sources, self.targets):
                t.copy_(s)
            self.complete = True


class FakeCopies:
    def __init__(self):
        self.events: list[FakeEvent] = []
        self.hosts = 0
        self.waits = 0

    def host(self, shape, dtype):
        self.hosts += 1
        return torch.full(shape, -7, dtype=dtype)

    def copy(self, tensors):
        targets = tuple(torch.full_like(t, -9) for t in tensors)
        event = FakeEvent(tensors, targets)
        self.events.append(event)
        return targets, event

    def done(self, event):
        return event.complete

    def wait(self, event):
        self.waits += 1
        event.run()

    def hand_over(self, tensors, event):
        event.run()  # the consumer's stream runs after the copy

    def pending(self):
        return [e for e in self.events if not e.complete]


def test_ring_reuses_a_buffer_only_after_its_copy():
    copies = FakeCopies()
    ring = fgt._PinnedRing(copies, (4, 2, 3), torch.float32, capacity=2)
    a = ring.acquire(4)
    b = ring.acquire(3)  # a short batch: the first rows of a whole buffer
    assert a.shape == (4, 2, 3) and b.shape == (3, 2, 3) and copies.hosts == 6
    assert ring.take(np.zeros((4, 2, 3), np.float32)) is None  # not one of ours
    slot_a, slot_b = ring.take(a), ring.take(b)
    assert slot_a is not None and slot_b is not None and ring.take(a) is None  # taken once
    _, ev_a = copies.copy((slot_a.features,))
    ring.copied(slot_a, ev_a)
    _, ev_b = copies.copy((slot_b.features,))
    ring.copied(slot_b, ev_b)
    # Full, both copies pending: the oldest copy (a's) is waited for, b's is not.
    c = ring.acquire(4)
    assert c.__array_interface__["data"][0] == slot_a.address
    assert ev_a.complete and not ev_b.complete and copies.waits == 1 and ring.waits == 1
    # b's copy completes on its own: reused without waiting.
    ev_b.run()
    d = ring.acquire(4)
    assert d.__array_interface__["data"][0] == slot_b.address and copies.waits == 1
    # Every buffer is in a gather: one more is made beyond the capacity.
    e = ring.acquire(2)
    assert len(ring.slots) == 3 and e.__array_interface__["data"][0] not in (slot_a.address, slot_b.address)


def test_ring_takes_a_free_buffer_before_a_copied_one():
    copies = FakeCopies()
    ring = fgt._PinnedRing(copies, (2, 1, 1), torch.float16, capacity=3)
    first = ring.take(ring.acquire(2))
    _, ev = copies.copy((first.features,))
    ring.copied(first, ev)
    ev.run()
    second = ring.acquire(2)
    assert second.dtype == np.float16
    # A free buffer exists only once the first one is back: the completed copy's buffer is reused.
    assert second.__array_interface__["data"][0] == first.address and len(ring.slots) == 1


def _device_run(store, copies, epochs=2, capacity=None, complete=None, loader=None, check=None):
    """Every batch of `epochs` epochs through _device_batches with `copies`;
    after each batch, `complete(copies)` may complete some pending copies."""
    loader = loader or _loader(store)
    out = []
    for _ in range(epochs):
        batches = []
        for b in fgt._device_batches(loader, copies, capacity):
            if check is not None:
                check(loader, b)
            batches.append(TensorBatch(b.features.clone(), b.labels.clone(), b.indices.clone()))
            if complete is not None:
                complete(copies)
        out.append(batches)
    return out


@pytest.mark.parametrize("capacity", [None, 1, 2])
@pytest.mark.parametrize("policy", ["never", "all", "random"])
def test_device_path_gives_the_plain_batches(store, monkeypatch, capacity, policy):
    copies = FakeCopies()
    rng = np.random.default_rng(0)
    handed = []
    acquire = fgt._PinnedRing.acquire

    def checked(self, rows):
        out = acquire(self, rows)
        address = out.__array_interface__["data"][0]
        # Never a buffer whose copy is still in flight.
        assert address not in {e.address for e in copies.pending()}
        handed.append(address)
        return out
    monkeypatch.setattr(fgt._PinnedRing, "acquire", checked)

    def complete(c):
        for e in c.pending():
            if policy == "all" or (policy == "random" and rng.random() < 0.5):
                e.run()
    got = _device_run(store, copies, capacity=capacity, complete=complete)
    expected = _plain(store)
    for epoch in range(2):
        _assert_same(got[epoch], expected[epoch])
    assert len(handed) == 2 * len(expected[0])  # every batch was gathered into a ring buffer
    assert len(set(handed)) < len(handed)  # ... and buffers were reused
    if capacity == 1 and policy == "never":
        assert copies.waits > 0
    # Each epoch allocates one ring: prefetch + 3 buffers at most by default
    # (features, labels, indices each).
    if capacity is None:
        assert copies.hosts <= 2 * 3 * (2 + 3)


def test_device_path_short_last_batch_and_float16(store):
    loader = store.loader("x", 50, num_segments=2, mode="test", dtype="float16", shuffle=False, prefetch=1)
    got = _device_run(store, FakeCopies(), epochs=1, loader=loader)[0]
    assert [len(b.indices) for b in got] == [50, 50, 50, 50, 3]
    assert got[0].features.dtype == torch.float16
    loader = store.loader("x", 50, num_segments=2, mode="test", dtype="float16", shuffle=False, prefetch=1)
    expected = [(b.features.copy(), b.labels.astype(np.int64), b.indices.copy()) for b in loader]
    _assert_same(got, expected)


def test_device_path_state_counts_batches_handed_out(store):
    # One batch is copied ahead; the state must count the caller's batches only.
    loader = _loader(store)
    plain = _loader(store)
    states = []

    def check(ld, b):
        states.append(ld.state_dict()["batches"])
    _device_run(store, FakeCopies(), epochs=1, loader=loader, check=check)
    expected = [(plain.state_dict()["epoch"], plain.state_dict()["batches"]) for _ in plain]
    n = len(plain)
    assert expected == [(0, k) for k in range(1, n)] + [(1, 0)]  # the last batch ends the epoch
    assert states == [b for _, b in expected]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 0
    # Resume from a state taken mid-epoch: the remaining batches, bit for bit.
    loader = _loader(store)
    it = fgt._device_batches(loader, FakeCopies())
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    assert state["batches"] == 5
    it.close()
    resumed = _loader(store)
    resumed.load_state_dict(state)
    rest = _device_run(store, FakeCopies(), epochs=1, loader=resumed)[0]
    _assert_same(rest, _plain(store, epochs=1)[0][5:])


def test_device_path_ignores_reuse_buffers(store):
    got = _device_run(store, FakeCopies(), epochs=1, loader=_loader(store, reuse_buffers=True))[0]
    _assert_same(got, _plain(store, epochs=1)[0])


def test_abandoned_device_iteration_waits_for_its_gathers(store):
    loader = _loader(store)
    it = fgt._device_batches(loader, FakeCopies())
    next(it)
    it.close()
    assert loader.state_dict()["batches"] == 0 and loader.state_dict()["epoch"] == 1
    _assert_same(_device_run(store, FakeCopies(), epochs=1, loader=loader)[0], _plain(store)[1])


# -- TensorBatch through torch's pin_memory -------------------------------------------


def test_pin_memory_gives_a_plain_tensor_batch(store, monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []

    def fake_pin(self, *args, **kwargs):  # Tensor.pin_memory needs CUDA; record the call instead
        out = self.clone()
        pinned.append(out)
        return out
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    ds = StoreDataset(store, "x", num_segments=3, mode="test")
    gathered = ds.__getitems__([4, 0, 9])  # what a DataLoader without collate would pass on
    with pytest.raises(TypeError, match="collate"):
        gathered[0]
    for batch in (gathered, collate(gathered)):
        out = pin_memory(batch)
        assert type(out) is TensorBatch and len(pinned) % 3 == 0
        assert all(a is b for a, b in zip(out, pinned[-3:]))
        features, labels, indices = out[0], out[1], out[2]  # indexing works
        np.testing.assert_array_equal(features.numpy(), batch.features.numpy())
        np.testing.assert_array_equal(labels.numpy(), batch.labels.numpy())
        assert indices.tolist() == [4, 0, 9]


def test_tensor_batch_to(store):
    ds = StoreDataset(store, "x", num_segments=3, mode="test")
    gathered = ds.__getitems__([1, 2])
    out = gathered.to("cpu", non_blocking=True)
    assert type(out) is TensorBatch and out.features.data_ptr() == gathered.features.data_ptr()
    out = gathered.to(torch.device("meta"))
    assert type(out) is TensorBatch and all(t.device.type == "meta" for t in out)


# -- the GPU benchmark, in its CPU mode --------------------------------------------


def test_gpu_data_wait_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "wait.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_data_wait.py"), "--device", "cpu", "--instances", "96",
         "--channels", "32", "--batch-size", "16", "--epochs", "1", "--workers", "0", "--step-size", "32",
         "--check", "--json", str(out), "--dir", str(tmp_path / "work")],
        check=False, capture_output=True, text=True, timeout=600, cwd=CHILD_CWD,
        # The installed package (the source tree lacks the extension in CI).
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(fgs.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["device"] == "cpu" and result["config"]["instances"] == 96
    assert result["check"] == {"batches": 6, "identical": True}
    for name in ("tensor_batches", "dataloader"):
        side = result["paths"][name]
        assert side["steps"] == 6 and len(side["wait_s"]) == 6 and len(side["step_s"]) == 6
        assert all(x >= 0 for x in side["wait_s"] + side["step_s"])
        counted = side["wait_s"][result["config"]["warmup"]:]
        assert side["wait_median_s"] == pytest.approx(float(np.median(counted)))
    for key in ("wait_median", "wait_p90", "step_median"):
        assert result["ratios"][key] is None or result["ratios"][key] > 0
    assert "tensor_batches" in proc.stdout and "DataLoader" in proc.stdout
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_device_path_concatenated_columns_use_the_ring(tmp_path, monkeypatch):
    import finegym_store as fgs
    from finegym_store import synth

    ids = synth.make_ids(37, seed=2)
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal((6, 5)).astype(np.float32) for k in ids}
    y = {k: 2 * v[:, :3] for k, v in x.items()}
    two = fgs.convert({"x": x, "y": y}, tmp_path / "two.fgs", progress=False)
    spec = dict(num_segments=3, mode="train", seed=1, prefetch=1)
    copies = FakeCopies()
    loader = two.loader(["x", "y"], 8, concat=True, **spec)
    got = _device_run(two, copies, epochs=2, loader=loader)
    assert copies.hosts > 0  # gathered into the ring's host buffers
    plain = two.loader(["x", "y"], 8, concat=True, **spec)
    for epoch in got:
        expected = [(b.features.copy(), b.labels.astype(np.int64), b.indices.copy()) for b in plain]
        _assert_same(epoch, expected)
        for b in epoch:
            assert b.features.shape[2] == 8
            torch.testing.assert_close(b.features[..., 5:], 2 * b.features[..., :3], rtol=0, atol=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="device= takes a loader of one column, or of several with concat=True"):
        tensor_batches(two.loader(["x", "y"], 8, **spec), device="cuda:0")
