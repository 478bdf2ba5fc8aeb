"""Batch gathering and temporal-segment sampling (docs/sampling.md)."""

from __future__ import annotations

import math
import os
import signal
import struct
import threading

import numpy as np
import pytest
import xxhash

import finegym_store as fgs
from finegym_store import _core


# ---- mmaction2's SampleFrames, written from its published formulas -------------------
# mmaction2 1.2.0, mmaction/datasets/transforms/loading.py, SampleFrames with
# frame_interval=1, out_of_bound_opt='loop', keep_tail_frames=False, no
# target_fps (so ori_clip_len = clip_len in both modes). Plain numpy, float64
# where mmaction2 computes in float64.
def mm_expand(offsets: np.ndarray, T: int, L: int) -> np.ndarray:
    """_sample_clips -> frame_inds: offset + arange(L), np.mod by T, astype(int32)."""
    inds = offsets[:, None] + np.arange(L)[None, :]
    return np.mod(inds, T).astype(np.int32).ravel().astype(np.int64)


def mm_test(T: int, K: int, L: int) -> np.ndarray:
    """_get_test_clips."""
    if L == 1:  # "2D recognizer"
        avg = T / float(K)
        offsets = np.arange(K) * avg + avg / 2.0
    else:  # "3D recognizer"
        max_offset = max(T - L, 0)
        if K > 1:
            offsets = np.round(np.arange(K) * (max_offset / float(K - 1)))
        else:
            offsets = np.array([max_offset // 2])
    return mm_expand(offsets, T, L)


def mm_train_deterministic(T: int, K: int, L: int) -> np.ndarray | None:
    """_get_train_clips where it draws nothing; None where it is random."""
    avg = (T - L + 1) // K
    if avg > 0 or T > max(K, L):
        return None
    if avg == 0:
        offsets = np.around(np.arange(K) * ((T - L + 1.0) / K))
    else:
        offsets = np.zeros(K, dtype=np.int32)
    return mm_expand(offsets, T, L)


# The same rules in exact integer arithmetic (rule="exact").
def exact_test(T: int, K: int, L: int) -> np.ndarray:
    span = T - L + 1
    offsets = np.array([(2 * k + 1) * span // (2 * K) for k in range(K)]) if span > 0 else np.zeros(K, np.int64)
    return ((offsets[:, None] + np.arange(L)[None, :]) % T).ravel()


def exact_train_deterministic(T: int, K: int, L: int) -> np.ndarray:
    """The T <= K branch: round_half_even(k * span / K) on exact fractions."""
    span = T - L + 1
    offsets = np.zeros(K, np.int64)
    if span > 0:
        for k in range(K):
            q, r = divmod(k * span, K)
            offsets[k] = q + (1 if 2 * r > K or (2 * r == K and q % 2) else 0)
    return ((offsets[:, None] + np.arange(L)[None, :]) % T).ravel()


SWEEP = [(T, K, L) for T in range(1, 41) for K in range(1, 17) for L in range(1, 5)]


def test_test_mode_is_bit_exact_with_mmaction2():
    for T, K, L in SWEEP:
        np.testing.assert_array_equal(_core.sample_segments(T, K, L, "test"), mm_test(T, K, L), err_msg=str((T, K, L)))


def test_train_mode_deterministic_branches_are_bit_exact_with_mmaction2():
    checked = 0
    for T, K, L in SWEEP:
        expected = mm_train_deterministic(T, K, L)
        if expected is None:
            continue
        checked += 1
        for seed in range(2):
            np.testing.assert_array_equal(_core.sample_segments(T, K, L, "train", seed=seed, index=seed), expected,
                                          err_msg=str((T, K, L)))
    assert checked > 100


@pytest.mark.parametrize("T,K,L,mode,mm,exact", [
    # float64 lands just below a whole number at a tie (docs/sampling.md):
    (12, 7, 1, "test", [0, 2, 4, 5, 7, 9, 11], [0, 2, 4, 6, 7, 9, 11]),
    # mmaction2 >= 1.0 test clips for clip_len > 1: round(k * max(T - L, 0) / (K - 1)) (first segment of each clip)
    (20, 5, 2, "test", [0, 4, 9, 14, 18], [1, 5, 9, 13, 17]),
    # train, T <= K: around(k * 15/22) is 7.4999... at k = 11 in float64
    (15, 22, 1, "train", [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 10, 10, 11, 12, 12, 13, 14, 14],
     [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 10, 11, 12, 12, 13, 14, 14]),
])
def test_tie_cases(T, K, L, mode, mm, exact):
    assert _core.sample_segments(T, K, L, mode)[::L].tolist() == mm
    assert mm_test(T, K, L)[::L].tolist() == mm if mode == "test" else mm_train_deterministic(T, K, L)[::L].tolist() == mm
    assert _core.sample_segments(T, K, L, mode, rule="exact")[::L].tolist() == exact


def test_exact_sampling_rules():
    for T, K, L in SWEEP:
        np.testing.assert_array_equal(_core.sample_segments(T, K, L, "test", rule="exact"), exact_test(T, K, L))
        if (T - L + 1) // K == 0 and not T > max(K, L):
            np.testing.assert_array_equal(_core.sample_segments(T, K, L, "train", seed=1, rule="exact"),
                                          exact_train_deterministic(T, K, L))
    # TSN's centred formula for clip_len = 1, as docs/sampling.md states it.
    for T in range(1, 30):
        for K in range(1, 17):
            assert _core.sample_segments(T, K, 1, "test", rule="exact").tolist() == \
                [math.floor((k + 0.5) * T / K) for k in range(K)]


# ---- train-mode randomness: the counter-based stream of docs/sampling.md, recomputed with the xxhash package ----
def xxh_u(seed: int, epoch: int, index: int, k: int) -> int:
    return xxhash.xxh64_intdigest(struct.pack("<4Q", seed, epoch, index, k))


def expected_train(T: int, K: int, L: int, seed: int, epoch: int, index: int) -> list[int]:
    span = T - L + 1
    avg = span // K
    if avg > 0:  # offset_k = k * avg + floor(r * avg / 2^64)
        offsets = [k * avg + (xxh_u(seed, epoch, index, k) * avg >> 64) for k in range(K)]
    else:  # T > max(K, L): K draws floor(r * span / 2^64), sorted
        assert T > max(K, L)
        offsets = sorted(xxh_u(seed, epoch, index, k) * span >> 64 for k in range(K))
    return [(o + l) % T for o in offsets for l in range(L)]


@pytest.mark.parametrize("sampling", ["mmaction2", "exact"])
def test_train_randomness_known_answers_from_xxhash(sampling):
    rng = np.random.default_rng(7)
    cases = [(12, 3, 1), (12, 12, 1), (40, 7, 1), (13, 4, 2), (12, 5, 4), (9, 8, 3), (30, 16, 4)]
    for T, K, L in cases:
        for _ in range(20):
            seed, epoch, index = (int(v) for v in rng.integers(0, 2**63, 3, dtype=np.uint64))
            got = _core.sample_segments(T, K, L, "train", seed=seed, epoch=epoch, index=index, rule=sampling)
            assert got.tolist() == expected_train(T, K, L, seed, epoch, index), (T, K, L, seed, epoch, index)
    big = 2**64 - 1  # the whole u64 range of the key
    assert _core.sample_segments(50, 3, 1, "train", seed=big, epoch=big, index=big).tolist() == \
        expected_train(50, 3, 1, big, big, big)


def test_train_randomness_hand_checked_vectors():
    # r = XXH64(seed 0) of the 32 bytes (seed, epoch, index, k) as little-endian u64s.
    # All zero: r_0 = 0xF6E9BE5D70632CF5. T = 12, K = 3: avg = 4 and
    # u_0 = floor(r_0 * 4 / 2^64) = r_0 >> 62 = 0b11 = 3, so offset_0 = 3.
    assert xxh_u(0, 0, 0, 0) == 0xF6E9BE5D70632CF5
    assert _core.sample_segments(12, 3, 1, "train")[0] == 3
    # seed 1, epoch 2, index 3, T = 32, K = 4: avg = 8, u_k = r_k >> 61 (the top three bits):
    # r = 0x58FD.., 0x7DD2.., 0x8847.., 0x0191.. -> u = 2, 3, 4, 0 -> offsets 2, 11, 20, 24.
    assert [xxh_u(1, 2, 3, k) >> 56 for k in range(4)] == [0x58, 0x7D, 0x88, 0x01]
    assert _core.sample_segments(32, 4, 1, "train", seed=1, epoch=2, index=3).tolist() == [2, 11, 20, 24]


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


def test_sample_segments_argument_errors():
    for mode in ("TRAIN", "val", "", "Test"):
        with pytest.raises(ValueError, match="mode must be 'train' or 'test'"):
            _core.sample_segments(12, 3, 1, mode)
    with pytest.raises(ValueError, match="rule must be"):
        _core.sample_segments(12, 3, 1, "test", rule="tsn")
    with pytest.raises(ValueError, match="at least 1"):
        _core.sample_segments(0, 3, 1, "test")


# ---- gather --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(5)
    table = {f"id{i:04d}": rng.standard_normal((12, 32, 1, 1)).astype(np.float32) for i in range(300)}
    ragged = {k: rng.standard_normal((int(rng.integers(1, 30)), 8)).astype(np.float32) for k in table}
    path = tmp_path_factory.mktemp("gather") / "s.fgs"
    return fgs.convert({"x": table, "r": ragged}, path, progress=False)


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
        store.gather("x", idx, num_segments=None, mode="test", clip_len=2)


def test_gather_out_is_filled_without_allocation(store):
    out = np.empty((4, 3, 32), np.float32)
    res = store.gather("x", [1, 2, 3, 4], num_segments=3, mode="test", out=out)
    assert res is out or np.shares_memory(res, out)
    np.testing.assert_array_equal(out, reference_gather(store, "x", [1, 2, 3, 4], 3, "test", 0, 0))
    for bad in (np.empty((4, 3, 31), np.float32), np.empty((4, 3, 32), np.float64),
                np.empty((4, 32, 3), np.float32).transpose(0, 2, 1)):
        with pytest.raises(ValueError, match="out must be"):
            store.gather("x", [1, 2, 3, 4], num_segments=3, mode="test", out=bad)


def test_gather_float16_output_and_storage(store, tmp_path):
    idx = [0, 10, 20]
    half = store.gather("x", idx, num_segments=3, mode="test", dtype="float16")
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, store.gather("x", idx, num_segments=3, mode="test").astype(np.float16))
    table = {f"k{i}": np.random.default_rng(i).standard_normal((12, 16)).astype(np.float32) * 100 for i in range(20)}
    table["k0"][0, :4] = [np.inf, -np.inf, np.nan, 1e-7]
    s16 = fgs.convert({"x": table}, tmp_path / "h.fgs", dtype="float16", progress=False)
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
    s = fgs.convert({"x": table}, tmp_path / "all16.fgs", dtype="float16", progress=False)
    wide = s.gather("x", np.arange(4096), dtype="float32").reshape(-1)
    ref = every.reshape(-1).astype(np.float32)
    np.testing.assert_array_equal(wide.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
    assert np.isnan(wide[np.isnan(ref)]).all()
    # NaNs keep sign and payload (a signalling NaN stays signalling).
    half = every.reshape(-1).view(np.uint16).astype(np.uint32)
    nan = np.isnan(ref)
    payload = ((half & 0x8000) << 16) | 0x7F800000 | ((half & 0x3FF) << 13)
    np.testing.assert_array_equal(wide.view(np.uint32)[nan], payload[nan])
    # float32 -> float16 rounding (ties, subnormals, overflow) equals numpy's.
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x387FC000, 0x38800000],
                                    np.uint32)])
    vals = bits.view(np.float32)
    vals = vals[~np.isnan(vals)][: 16 * 12000]
    table = {f"v{i:05d}": vals[i * 16 : (i + 1) * 16][None, :] for i in range(len(vals) // 16)}
    s32 = fgs.convert({"x": table}, tmp_path / "f32.fgs", progress=False)
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
        store.gather("x", [0], num_segments=0, mode="test")
    with pytest.raises(ValueError, match="mode must be"):
        store.gather("x", [0], num_segments=3, mode="val")
    with pytest.raises(TypeError, match="indices must be"):
        store.gather("x", [0.5, 1.0])
    assert store.gather("x", np.zeros(0, np.int64), num_segments=3, mode="test").shape == (0, 3, 32)


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
                ok = store.gather("x", [0, 1], num_segments=None, mode="test").shape == (2, 12, 32)
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        stop.set()
        worker.join()


# ---- output placement: page-aligned outputs, and rows at every offset within a page --
def test_gather_output_is_page_aligned_and_keeps_its_memory(store):
    # Outputs start on a page boundary (as features sections do), whatever
    # malloc would have given, and outlive the call, the store and the
    # buffer's other views.
    import mmap

    for idx, K in (([0], 1), ([3, 1, 4], None), (np.arange(300), 5), ([], 3)):
        got = store.gather("x", idx, num_segments=K, mode="test")
        assert got.ctypes.data % mmap.PAGESIZE == 0, (len(idx), K, hex(got.ctypes.data))
        assert got.flags.c_contiguous and got.flags.writeable and got.dtype == np.float32
        if len(idx):
            np.testing.assert_array_equal(got, reference_gather(store, "x", np.asarray(idx, np.int64), K, "test", 0, 0))
    job = _core.GatherJob(store._reader, "x", np.arange(7),
                          _core.GatherSpec(3, "test", 1, "mmaction2", np.dtype("float32"), 0), 0, None, 2)
    assert job.wait().ctypes.data % mmap.PAGESIZE == 0


def test_gather_output_survives_the_store(tmp_path):
    table = {f"k{i}": np.full((12, 16), i, np.float32) for i in range(10)}
    s = fgs.convert({"x": table}, tmp_path / "a.fgs", progress=False)
    got = s.gather("x", [9, 2], num_segments=2, mode="test")
    del s
    import gc

    gc.collect()
    got[...] += 1  # writeable memory of its own
    np.testing.assert_array_equal(got[:, :, 0], [[10, 10], [3, 3]])


@pytest.mark.parametrize("channels", [300, 2048])
def test_gather_into_out_at_every_offset_within_a_page(tmp_path, channels):
    # Rows of >= 1 KiB whose destination lies 1 to 31 bytes past the source
    # modulo 4096 take a different copy (copy_row, gather.cpp). Every 4-byte
    # offset of `out` within a page is tried; 300 channels (1200-byte rows,
    # not a multiple of 64) also vary the distance from row to row.
    rng = np.random.default_rng(3)
    table = {f"k{i}": rng.standard_normal((12, channels)).astype(np.float32) for i in range(24)}
    s = fgs.convert({"x": table}, tmp_path / "rows.fgs", progress=False)
    section = np.frombuffer(s._reader.section("features/x"), np.uint8)
    idx = np.array([5, 0, 23, 5, 11])
    row = channels * 4
    expected = {K: reference_gather(s, "x", idx, K, "train", 7, 1) for K in (None, 4)}
    raw = np.zeros(expected[None].nbytes + 8192, np.uint8)
    base = -raw.ctypes.data % 4096
    slow_rows = 0
    for offset in range(0, 4096, 4 if channels == 300 else 8):
        for K, want in expected.items():
            out = raw[base + offset: base + offset + want.nbytes].view(np.float32).reshape(want.shape)
            out[...] = np.nan
            assert store_gather(s, idx, K, out) is not None
            np.testing.assert_array_equal(out, want, err_msg=f"offset {offset}, K={K}")
            if K is None:  # which rows met the short distance (source rows are whole instances here)
                for b, i in enumerate(idx):
                    for r in range(12):
                        src = section.ctypes.data + (i * 12 + r) * row
                        dst = out.ctypes.data + (b * 12 + r) * row
                        slow_rows += 0 < (dst - src) % 4096 < 32
    assert slow_rows > 0  # the other copy was exercised


def store_gather(s, idx, K, out):
    return s.gather("x", idx, num_segments=K, mode="train", seed=7, epoch=1, out=out)


def test_gather_dtype_spellings(store):
    # Native-order float32 and float16 in any spelling; other byte orders refused.
    idx = [1, 2]
    ref = store.gather("x", idx, num_segments=3, mode="test")
    for dt in (np.float32, "float32", "f4", np.dtype("=f4"), np.dtype(np.float32).newbyteorder("=")):
        np.testing.assert_array_equal(store.gather("x", idx, num_segments=3, mode="test", dtype=dt), ref)
    for dt in (np.float16, "f2", np.dtype("=f2")):
        assert store.gather("x", idx, num_segments=3, mode="test", dtype=dt).dtype == np.float16
    swapped = np.dtype("f4").newbyteorder("S")
    with pytest.raises(ValueError, match="float32 or float16"):
        store.gather("x", idx, num_segments=3, mode="test", dtype=swapped)
    with pytest.raises(ValueError, match="gather output has dtype"):
        _core.gather(store._reader, "x", np.array(idx),
                     _core.GatherSpec(3, "test", 1, "mmaction2", swapped, 0), 0, None, 1)
