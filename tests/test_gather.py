"""Batch gathering and temporal-segment sampling (README, "Sampling")."""

from __future__ import annotations

import math
import os
import signal
import threading

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import _core


# ---- a reference of mmaction2's SampleFrames rules (clip_len L, interval 1) ----
def reference_test(T: int, K: int, L: int) -> np.ndarray:
    span = T - L + 1
    if span > 0:
        offsets = np.array([math.floor((2 * k + 1) * span / (2 * K)) for k in range(K)])
    else:
        offsets = np.zeros(K, dtype=np.int64)
    return ((offsets[:, None] + np.arange(L)[None, :]) % T).ravel()


def reference_train_deterministic(T: int, K: int, L: int) -> np.ndarray:
    """The T < K branch: round_half_even(k * span / K) (numpy.around)."""
    span = T - L + 1
    offsets = np.around(np.arange(K) * span / K).astype(np.int64) if span > 0 else np.zeros(K, np.int64)
    return ((offsets[:, None] + np.arange(L)[None, :]) % T).ravel()


@pytest.mark.parametrize("T", [1, 2, 3, 5, 7, 8, 12, 13, 24, 31])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 8, 12, 16])
def test_test_mode_offsets_are_exact(T, K):
    np.testing.assert_array_equal(_core.sample_segments(T, K, 1, "test"), reference_test(T, K, 1))
    # TSN's centred formula, written the way the README states it.
    assert _core.sample_segments(T, K, 1, "test").tolist() == [math.floor((k + 0.5) * T / K) for k in range(K)]


@pytest.mark.parametrize("T,K", [(1, 3), (2, 3), (3, 8), (5, 8), (7, 12), (11, 12), (6, 16)])
def test_train_mode_with_fewer_segments_than_clips_is_deterministic(T, K):
    expected = reference_train_deterministic(T, K, 1)
    for seed in range(3):
        np.testing.assert_array_equal(_core.sample_segments(T, K, 1, "train", seed=seed, index=seed), expected)


@pytest.mark.parametrize("T,K", [(12, 3), (12, 5), (12, 12), (13, 4), (40, 7)])
def test_train_offsets_stay_in_their_part_and_are_uniform(T, K):
    avg = T // K
    draws = np.stack([_core.sample_segments(T, K, 1, "train", seed=1, epoch=0, index=i) for i in range(4000)])
    for k in range(K):
        u = draws[:, k] - k * avg
        assert u.min() >= 0 and u.max() < avg
        if avg > 1:
            counts = np.bincount(u, minlength=avg)
            expected = len(draws) / avg
            chi2 = ((counts - expected) ** 2 / expected).sum()
            # 99.9% quantile of chi-square with avg-1 <= 12 dof is < 33.
            assert chi2 < 33, (k, counts)


@pytest.mark.parametrize("T,K,L", [(12, 3, 4), (12, 4, 3), (12, 2, 8), (5, 3, 4), (3, 2, 5), (12, 5, 4)])
def test_clip_len_follows_sampleframes(T, K, L):
    np.testing.assert_array_equal(_core.sample_segments(T, K, L, "test"), reference_test(T, K, L))
    train = _core.sample_segments(T, K, L, "train", seed=3, index=9).reshape(K, L)
    # Every clip is L consecutive segments, wrapping modulo T.
    np.testing.assert_array_equal(train, (train[:, :1] + np.arange(L)) % T)
    span = T - L + 1
    if span > 0 and span // K > 0:
        avg = span // K
        u = train[:, 0] - np.arange(K) * avg
        assert ((u >= 0) & (u < avg)).all()


def test_randomness_is_keyed_by_seed_epoch_and_instance():
    a = _core.sample_segments(12, 3, 1, "train", seed=0, epoch=0, index=5)
    assert np.array_equal(a, _core.sample_segments(12, 3, 1, "train", seed=0, epoch=0, index=5))
    variants = [
        _core.sample_segments(12, 3, 1, "train", seed=s, epoch=e, index=i)
        for s, e, i in [(1, 0, 5), (0, 1, 5), (0, 0, 6)]
    ]
    many = np.stack([_core.sample_segments(12, 3, 1, "train", seed=0, epoch=e, index=5) for e in range(50)])
    assert len({tuple(r) for r in many}) > 10
    assert any(not np.array_equal(a, v) for v in variants)


# ---- gather --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(5)
    table = {f"id{i:04d}": rng.standard_normal((12, 32, 1, 1)).astype(np.float32) for i in range(300)}
    ragged = {k: rng.standard_normal((int(rng.integers(1, 30)), 8)).astype(np.float32) for k in table}
    path = tmp_path_factory.mktemp("gather") / "s.fgs"
    return fgs.convert(path, {"x": table, "r": ragged}, progress=False)


def reference_gather(store, column, indices, K, mode, seed, epoch, L=1):
    rows = []
    for i in indices:
        f = np.asarray(store.features(column, i))
        if K is None:
            rows.append(f)
        else:
            segs = _core.sample_segments(len(f), K, L, mode, seed=seed, epoch=epoch, index=int(i) % len(store))
            rows.append(f[segs])
    return np.stack(rows)


@pytest.mark.parametrize("K", [None, 1, 3, 12, 16])
@pytest.mark.parametrize("mode", ["test", "train"])
def test_gather_matches_reference(store, K, mode):
    idx = np.array([5, 0, 299, 5, 17, -1])
    got = store.gather("x", idx, num_segments=K, mode=mode, seed=11, epoch=2)
    assert got.shape == (6, 12 if K is None else K, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got, reference_gather(store, "x", idx, K, mode, 11, 2))


def test_gather_is_independent_of_threads_and_batch_split(store):
    idx = np.random.default_rng(0).integers(0, len(store), 256)
    kw = dict(num_segments=5, mode="train", seed=4, epoch=3)
    ref = store.gather("x", idx, threads=1, **kw)
    for threads in (2, 4):
        assert store.gather("x", idx, threads=threads, **kw).tobytes() == ref.tobytes()
    parts = [store.gather("x", idx[a:b], **kw) for a, b in [(0, 1), (1, 100), (100, 256)]]
    assert np.concatenate(parts).tobytes() == ref.tobytes()
    perm = np.random.default_rng(1).permutation(256)
    assert store.gather("x", idx[perm], **kw).tobytes() == ref[perm].tobytes()


def test_gather_ragged_needs_num_segments(store):
    with pytest.raises(ValueError, match="ragged.*num_segments"):
        store.gather("r", [0, 1])
    idx = np.arange(0, 300, 7)
    got = store.gather("r", idx, num_segments=4, mode="train", seed=2)
    np.testing.assert_array_equal(got, reference_gather(store, "r", idx, 4, "train", 2, 0))


def test_gather_clip_len(store):
    idx = np.array([3, 4])
    got = store.gather("x", idx, num_segments=3, clip_len=4, mode="train", seed=1)
    assert got.shape == (2, 12, 32)
    np.testing.assert_array_equal(got, reference_gather(store, "x", idx, 3, "train", 1, 0, L=4))
    with pytest.raises(ValueError, match="clip_len"):
        store.gather("x", idx, num_segments=None, clip_len=2)


def test_gather_out_is_filled_without_allocation(store):
    out = np.empty((4, 3, 32), np.float32)
    res = store.gather("x", [1, 2, 3, 4], num_segments=3, out=out)
    assert res is out or np.shares_memory(res, out)
    np.testing.assert_array_equal(out, reference_gather(store, "x", [1, 2, 3, 4], 3, "test", 0, 0))
    for bad in (np.empty((4, 3, 31), np.float32), np.empty((4, 3, 32), np.float64),
                np.empty((4, 32, 3), np.float32).transpose(0, 2, 1)):
        with pytest.raises(ValueError, match="out must be"):
            store.gather("x", [1, 2, 3, 4], num_segments=3, out=bad)


def test_gather_float16_output_and_storage(store, tmp_path):
    idx = [0, 10, 20]
    half = store.gather("x", idx, num_segments=3, dtype="float16")
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, store.gather("x", idx, num_segments=3).astype(np.float16))
    table = {f"k{i}": np.random.default_rng(i).standard_normal((12, 16)).astype(np.float32) * 100 for i in range(20)}
    table["k0"][0, :4] = [np.inf, -np.inf, np.nan, 1e-7]
    s16 = fgs.convert(tmp_path / "h.fgs", {"x": table}, dtype="float16", progress=False)
    got16 = s16.gather("x", np.arange(20))
    assert got16.dtype == np.float16
    widened = s16.gather("x", np.arange(20), dtype="float32")
    np.testing.assert_array_equal(widened, got16.astype(np.float32))  # exact widening, NaN aside
    expected = np.stack([table[k] for k in s16.ids]).astype(np.float16)
    np.testing.assert_array_equal(got16, expected)


def test_float_half_conversions_match_numpy(store, tmp_path):
    # Every float16 bit pattern widened by our C++ equals numpy's widening.
    every = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(4096, 16)
    table = {f"k{i:04d}": every[i : i + 1] for i in range(4096)}
    s = fgs.convert(tmp_path / "all16.fgs", {"x": table}, dtype="float16", progress=False)
    wide = s.gather("x", np.arange(4096), dtype="float32").reshape(-1)
    ref = every.reshape(-1).astype(np.float32)
    np.testing.assert_array_equal(wide.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
    assert np.isnan(wide[np.isnan(ref)]).all()
    # float32 -> float16 rounding (ties, subnormals, overflow) equals numpy's.
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x387FC000, 0x38800000],
                                    np.uint32)])
    vals = bits.view(np.float32)
    vals = vals[~np.isnan(vals)][: 16 * 12000]
    table = {f"v{i:05d}": vals[i * 16 : (i + 1) * 16][None, :] for i in range(len(vals) // 16)}
    s32 = fgs.convert(tmp_path / "f32.fgs", {"x": table}, progress=False)
    with np.errstate(over="ignore"):
        expected = np.stack([table[k] for k in s32.ids]).astype(np.float16)
    got = s32.gather("x", np.arange(len(s32)), dtype="float16")
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_gather_index_errors(store):
    with pytest.raises(IndexError, match=r"index 300 \(position 2\)"):
        store.gather("x", [0, 1, 300])
    with pytest.raises(IndexError, match="-301"):
        store.gather("x", [-301])
    with pytest.raises(KeyError, match="no feature column 'nope'"):
        store.gather("nope", [0])
    with pytest.raises(ValueError, match="num_segments must be at least 1"):
        store.gather("x", [0], num_segments=0)
    with pytest.raises(ValueError, match="mode must be"):
        store.gather("x", [0], num_segments=3, mode="val")
    with pytest.raises(TypeError, match="indices must be"):
        store.gather("x", [0.5, 1.0])
    assert store.gather("x", np.zeros(0, np.int64), num_segments=3).shape == (0, 3, 32)


@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_another_thread_gathers(store):
    """A child forked while other threads run gathers can still gather: the
    pool is rebuilt and its registry lock is never inherited held."""
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            store.gather("x", np.arange(300), num_segments=3, mode="train")

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        for _ in range(10):
            pid = os.fork()
            if pid == 0:  # child: die by SIGALRM rather than hang on a deadlock
                signal.alarm(20)
                ok = store.gather("x", [0, 1], num_segments=None).shape == (2, 12, 32)
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        stop.set()
        worker.join()
