"""Hardening of the calls into the C++ core: sizes that overflow, strided
buffers, index types, fork() with background jobs in flight, thread counts,
pickling across working directories. Checks that used to crash the
interpreter run in a child process, so a regression fails one test rather
than killing pytest."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash

from conftest import CHILD_CWD, synthetic_store

import finegym_store as fgs
from finegym_store import Batch, _core


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("calls"), 203, 7, seed=4)  # column 'x': (203, 12, 16)


def run_child(code: str, *args: str, cwd: str | os.PathLike[str] = CHILD_CWD, timeout: float = 120,
              stdin: bytes | None = None) -> str:
    """Runs `code` in a fresh Python; asserts it exits 0 (not killed by a signal) and returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, capture_output=True,
                          timeout=timeout, input=stdin)
    assert proc.returncode == 0, (proc.returncode, proc.stdout.decode()[-2000:], proc.stderr.decode()[-4000:])
    return proc.stdout.decode()


# ---- sizes -----------------------------------------------------------------------
def test_overflowing_sizes_are_value_errors(store):
    """K x clip_len wrapping, and outputs no machine could hold: ValueError, before any allocation."""
    out = run_child("""
        import re, sys
        import numpy as np
        import finegym_store as fgs
        from finegym_store import _core
        s = fgs.open(sys.argv[1])
        f32 = np.dtype("float32")
        calls = {
            "gather K*L wraps": lambda: s.gather("x", [0, 1], num_segments=2**62, mode="test", clip_len=4),
            "sample_segments K*L wraps": lambda: _core.sample_segments(5, 2**62, 4, "test"),
            "sample_segments K*L wraps, train": lambda: _core.sample_segments(5, 2**61, 8, "train"),
            "sample_segments huge K": lambda: _core.sample_segments(5, 2**52, 1, "test"),
            "sample_segments huge T": lambda: _core.sample_segments(2**60, 3, 1, "test"),
            "gather huge K": lambda: s.gather("x", [0, 1, 2], num_segments=2**45, mode="test"),
            "gather huge B*K": lambda: s.gather("x", np.zeros(100_000, np.int64), num_segments=2**36, mode="test"),
            "gather K beyond int64": lambda: s.gather("x", [0], num_segments=2**70, mode="test"),
            "core gather": lambda: _core.gather(s._reader, "x", np.zeros(3, np.int64),
                                                _core.GatherSpec(2**62, "test", 4, "mmaction2", f32, 0), 0, None, 1),
            "core GatherJob": lambda: _core.GatherJob(s._reader, "x", np.zeros(3, np.int64),
                                                      _core.GatherSpec(2**62, "test", 4, "mmaction2", f32, 0),
                                                      0, None, 1),
            "GatherJob huge K": lambda: _core.GatherJob(s._reader, "x", np.zeros(3, np.int64),
                                                        _core.GatherSpec(2**45, "train", 1, "mmaction2", f32, 0),
                                                        0, None, 1).wait(),
            "loader": lambda: s.loader("x", batch_size=4, num_segments=2**62, mode="train", clip_len=4),
            "out given": lambda: s.gather("x", [0], num_segments=2**62, mode="test", clip_len=4,
                                          out=np.empty((1, 4, 16), np.float32)),
        }
        for name, call in calls.items():
            try:
                call()
            except ValueError as e:
                assert re.search("too large|larger than this machine's memory|at most|above 2\\^53", str(e)), (name, e)
                print("ValueError", name)
            else:
                print("no error", name)
    """, store.path)
    lines = out.splitlines()
    assert len(lines) == 13 and all(line.startswith("ValueError") for line in lines), out


def test_largest_valid_sizes_still_work(store):
    # The checks refuse only what cannot be: K * L at the edge of a column, big K on a small batch.
    assert store.gather("x", [0], num_segments=4096, mode="test", clip_len=3).shape == (1, 4096 * 3, 16)
    assert len(_core.sample_segments(5, 1000, 7, "train")) == 7000


# ---- buffers -----------------------------------------------------------------------
def test_hash64_needs_contiguous_bytes():
    out = run_child("""
        import numpy as np, xxhash
        from finegym_store import _core
        a = np.arange(1000, dtype=np.float64)
        assert _core.hash64(a) == xxhash.xxh64_intdigest(a.tobytes())
        assert _core.hash64(b"abc") == xxhash.xxh64_intdigest(b"abc")
        assert _core.hash64(np.ascontiguousarray(a[::2])) == xxhash.xxh64_intdigest(a[::2].tobytes())
        strided = {"a[::2]": a[::2], "a[::-1]": a[::-1], "2-D transposed": a.reshape(20, 50).T,
                   "2-D column slice": a.reshape(20, 50)[:, 1:3], "memoryview step": memoryview(b"abcdef")[::2],
                   "reversed huge": np.arange(10**6, dtype=np.uint8)[::-1]}
        for name, v in strided.items():
            try:
                _core.hash64(v)
            except ValueError as e:
                assert "C-contiguous" in str(e), e
                print("ValueError", name)
        for name, v in {"object array": np.array([object(), 1], dtype=object), "list": [1, 2], "str": "abc",
                        "int": 5}.items():
            try:
                _core.hash64(v)
            except TypeError as e:
                print("TypeError", name)
    """)
    lines = out.splitlines()
    assert sum(line.startswith("ValueError") for line in lines) == 6, out
    assert sum(line.startswith("TypeError") for line in lines) == 4, out
    # A 0-d and an empty array are contiguous: their bytes hash as they are.
    assert _core.hash64(np.zeros(0)) == xxhash.xxh64_intdigest(b"")
    assert _core.hash64(np.float32(1.5)) == xxhash.xxh64_intdigest(np.float32(1.5).tobytes())


def test_bench_baselines_validate_their_arguments(store, tmp_path):
    out = run_child("""
        import sys
        import numpy as np
        from finegym_store import _bench
        src = np.arange(4096, dtype=np.uint8)
        offs = np.array([0, 100, 4000], np.int64)
        out = np.empty(3 * 16, np.uint8)
        _bench.memcpy_records(src, offs, 16, out)
        assert (out.reshape(3, 16) == np.stack([src[o:o + 16] for o in offs])).all()
        path = sys.argv[1]
        np.arange(4096, dtype=np.uint8).tofile(path)
        out2 = np.zeros_like(out)
        _bench.pread_records(path, offs, 16, out2, 4)
        assert (out2 == out).all()
        bad = {
            ("ValueError", "strided src"): lambda: _bench.memcpy_records(src[::2], offs, 16, out),
            ("ValueError", "reversed src"): lambda: _bench.memcpy_records(src[::-1], offs, 16, out),
            ("ValueError", "strided out"): lambda: _bench.memcpy_records(src, offs, 16, np.empty(96, np.uint8)[::2]),
            ("TypeError", "read-only out"): lambda: _bench.memcpy_records(src, offs, 16, src.copy().setflags(write=False) or np.frombuffer(bytes(48), np.uint8)),
            ("TypeError", "float offsets"): lambda: _bench.memcpy_records(src, offs.astype(float), 16, out),
            ("TypeError", "uint64 offsets"): lambda: _bench.memcpy_records(src, np.array([2**63], np.uint64), 16, out),
            ("TypeError", "bool offsets"): lambda: _bench.memcpy_records(src, np.array([True]), 16, out),
            ("TypeError", "object src"): lambda: _bench.memcpy_records(np.array([object()] * 64), offs[:1], 1, out),
            ("IndexError", "negative offset"): lambda: _bench.memcpy_records(src, np.array([-1], np.int64), 16, out),
            ("IndexError", "past the end"): lambda: _bench.memcpy_records(src, np.array([4090], np.int64), 16, out),
            ("IndexError", "huge offset"): lambda: _bench.memcpy_records(src, np.array([2**63 - 1], np.int64), 16, out),
            ("ValueError", "out too small"): lambda: _bench.memcpy_records(src, offs, 17, out),
            ("ValueError", "record_bytes 0"): lambda: _bench.memcpy_records(src, offs, 0, out),
            ("ValueError", "depth 0"): lambda: _bench.pread_records(path, offs, 16, out, 0),
            ("IndexError", "pread past the end"): lambda: _bench.pread_records(path, np.array([4090], np.int64), 16, out),
            ("ValueError", "pread strided out"): lambda: _bench.pread_records(path, offs, 16, np.empty(96, np.uint8)[::2]),
        }
        for (kind, name), call in bad.items():
            try:
                call()
            except Exception as e:
                print(type(e).__name__ == kind, name, type(e).__name__, e)
            else:
                print(False, name, "no error")
    """, str(tmp_path / "records.bin"))
    lines = out.splitlines()
    assert len(lines) == 16 and all(line.startswith("True") for line in lines), out


def test_baselines_are_not_in_core():
    assert not hasattr(_core, "_baselines")
    from finegym_store import _bench
    assert _bench.__name__ == "finegym_store._bench"


# ---- indices -------------------------------------------------------------------------
def test_index_types_and_ranges(store):
    n = len(store)
    ref = store.gather("x", [0, n - 1], num_segments=3, mode="test")
    for bad in ([2**63], [2**64 - 1], np.array([2**63], np.uint64), np.array([0, 2**64 - 1], np.uint64),
                np.array([n], np.uint64), np.array([n], np.uint8) if n < 256 else np.array([n], np.uint16),
                [2**70], [0, -2**70], [n], [-n - 1]):
        with pytest.raises(IndexError, match="out of range"):
            store.gather("x", bad, num_segments=3, mode="test")
    with pytest.raises(IndexError, match=r"index 18446744073709551615 \(position 1\)"):
        store.gather("x", np.array([0, 2**64 - 1], np.uint64))
    for bad, what in (([0.0, 1.0], "float"), (np.array([1.5]), "float"), ([True, False], "bool"),
                      (np.array([True]), "bool"), (["a"], "str|<U1"), ([object()], "object"), ([1, None], "None"),
                      ([[0, 1]], "1-D"), (np.array([1 + 0j]), "complex")):
        with pytest.raises(TypeError, match=what):
            store.gather("x", bad, num_segments=3, mode="test")
    # Valid unsigned and object (Python int) indices work.
    np.testing.assert_array_equal(store.gather("x", np.array([0, n - 1], np.uint64), num_segments=3, mode="test"), ref)
    by_object = store.gather("x", np.array([0, n - 1], dtype=object), num_segments=3, mode="test")
    np.testing.assert_array_equal(by_object, ref)
    np.testing.assert_array_equal(store.gather("x", [0, -1], num_segments=3, mode="test"), ref)


def test_core_calls_reject_wrapping_and_non_integer_indices(store):
    f32 = np.dtype("float32")
    for cls in (_core.gather, _core.GatherJob):
        with pytest.raises(IndexError, match="out of range"):
            cls(store._reader, "x", np.array([2**63], np.uint64),
                _core.GatherSpec(3, "test", 1, "mmaction2", f32, 0), 0, None, 1)
        for bad in (np.array([True]), np.array([0.0]), np.array(["0"])):
            with pytest.raises(TypeError, match="integers"):
                cls(store._reader, "x", bad, _core.GatherSpec(3, "test", 1, "mmaction2", f32, 0), 0, None, 1)
        with pytest.raises(ValueError, match="mode must be"):
            cls(store._reader, "x", np.array([0]), _core.GatherSpec(3, "TRAIN", 1, "mmaction2", f32, 0), 0, None, 1)
        with pytest.raises(ValueError, match="rule must be"):
            cls(store._reader, "x", np.array([0]), _core.GatherSpec(3, "train", 1, "tsn", f32, 0), 0, None, 1)


def test_mode_and_sampling_are_validated_everywhere(store):
    for mode in ("TRAIN", "val", "Test"):
        with pytest.raises(ValueError, match="mode must be"):
            store.gather("x", [0], num_segments=3, mode=mode)
        with pytest.raises(ValueError, match="mode must be"):
            store.loader("x", batch_size=4, num_segments=3, mode=mode)
        with pytest.raises(ValueError, match="mode must be"):
            _core.sample_segments(12, 3, 1, mode)
    with pytest.raises(ValueError, match="rule must be"):
        store.gather("x", [0], num_segments=3, mode="test", rule="tsn")
    with pytest.raises(ValueError, match="rule must be"):
        store.loader("x", batch_size=4, num_segments=3, mode="train", rule="Exact")
    for kw, exc in (({"seed": -1}, ValueError), ({"epoch": -1}, ValueError), ({"seed": 2**64}, ValueError),
                    ({"clip_len": 0}, ValueError), ({"threads": 0}, ValueError), ({"seed": 1.5}, TypeError),
                    ({"num_segments": True}, TypeError), ({"threads": "2"}, TypeError)):
        with pytest.raises(exc, match=next(iter(kw))):
            store.gather("x", [0], **{"num_segments": 3, "mode": "test", **kw})


def test_sampling_is_threaded_through_gather_loader_and_jobs(store):
    # T = 12, K = 5, L = 2, test mode: mmaction2 starts 0, 2, 5, 8, 10; exact starts 1, 3, 5, 7, 9.
    idx = np.arange(len(store))
    f = store.column("x")
    kw = dict(num_segments=5, clip_len=2, mode="test")
    mm = store.gather("x", idx, **kw)
    exact = store.gather("x", idx, rule="exact", **kw)
    np.testing.assert_array_equal(mm[:, ::2], f[idx][:, [0, 2, 5, 8, 10]])
    np.testing.assert_array_equal(exact[:, ::2], f[idx][:, [1, 3, 5, 7, 9]])
    for sampling, expected in (("mmaction2", mm), ("exact", exact)):
        loader = store.loader("x", batch_size=50, shuffle=False, rule=sampling, **kw)
        np.testing.assert_array_equal(np.concatenate([b.features for b in loader]), expected)
        job = _core.GatherJob(store._reader, "x", idx,
                              _core.GatherSpec(5, "test", 2, sampling, np.dtype("float32"), 0), 0, None, 2)
        np.testing.assert_array_equal(job.wait(), expected)


# ---- fork -------------------------------------------------------------------------------
def test_jobs_belong_to_their_process_across_fork(store):
    """A child forked while background jobs are in flight: waiting on an inherited
    job raises, the inherited loader iterator raises instead of yielding garbage,
    dropping them and exiting normally is clean, and new work in the child works."""
    out = run_child("""
        import gc, os, signal, sys
        import numpy as np
        import finegym_store as fgs
        from finegym_store import _core
        s = fgs.open(sys.argv[1])
        loader = s.loader("x", batch_size=16, num_segments=3, mode="train", prefetch=3)
        it = iter(loader)
        first = next(it)
        idx = np.arange(len(s))
        job = _core.GatherJob(s._reader, "x", idx,
                              _core.GatherSpec(3, "train", 1, "mmaction2", np.dtype("float32"), 1), 2, None, 2)
        expected = s.gather("x", idx, num_segments=3, mode="train", seed=1, epoch=2)

        def child_checks():
            signal.alarm(60)  # a hang dies by SIGALRM, not silently
            assert not job.owned
            try:
                job.wait()
            except fgs.ForkedJobError as e:  # the public name of _core.ForkedJobError
                assert isinstance(e, RuntimeError) and "forked process" in str(e), e
            else:
                return 3
            try:
                next(it)
            except RuntimeError as e:
                assert "forked process" in str(e), e
            else:
                return 4
            # New work here runs on this process's own threads.
            again = _core.GatherJob(s._reader, "x", idx,
                                    _core.GatherSpec(3, "train", 1, "mmaction2", np.dtype("float32"), 1), 2, None, 2)
            if not np.array_equal(again.wait(), expected):
                return 5
            batches = list(s.loader("x", batch_size=16, num_segments=3, mode="train", prefetch=3))
            if sum(len(b) for b in batches) != len(s):
                return 6
            return 0

        # Child 1: all the checks, then a normal exit (finalizers, C++ static destructors).
        pid = os.fork()
        if pid == 0:
            try:
                code = child_checks()
            except BaseException as e:
                print("child failed:", repr(e), file=sys.stderr)
                code = 2
            sys.exit(code)
        _, status = os.waitpid(pid, 0)
        sys.stdout.flush()
        print("checks", os.WIFEXITED(status) and os.WEXITSTATUS(status), os.WIFSIGNALED(status) and os.WTERMSIG(status))

        # Child 2: drops the inherited iterator and job at once, exits normally.
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            del it, job
            gc.collect()
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        print("drop", os.WIFEXITED(status) and os.WEXITSTATUS(status), os.WIFSIGNALED(status) and os.WTERMSIG(status))

        # Child 3: exits normally with everything still referenced.
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        print("exit", os.WIFEXITED(status) and os.WEXITSTATUS(status), os.WIFSIGNALED(status) and os.WTERMSIG(status))

        # The parent's job and iterator are untouched.
        assert np.array_equal(job.wait(), expected)
        rest = [first] + list(it)
        assert sorted(np.concatenate([b.indices for b in rest]).tolist()) == list(range(len(s)))
        print("parent ok")
    """, store.path)
    assert out.splitlines() == ["checks 0 False", "drop 0 False", "exit 0 False", "parent ok"], out


# ---- threads ------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux /proc")
def test_threads_are_capped_and_reused(store):
    out = run_child("""
        import os, sys
        import numpy as np
        import finegym_store as fgs
        from finegym_store import _core
        def threads():
            return len(os.listdir("/proc/self/task"))
        s = fgs.open(sys.argv[1])
        base = threads()
        ref = s.gather("x", np.arange(len(s)), num_segments=3, mode="test", threads=1)
        got = s.gather("x", np.arange(len(s)), num_segments=3, mode="test", threads=1000)
        assert np.array_equal(ref, got)
        after_big = threads()
        loader = s.loader("x", batch_size=8, num_segments=3, mode="train", prefetch=3)
        list(loader)
        after_one = threads()
        for _ in range(3):
            list(loader)
        after_many = threads()
        print(_core.max_threads(), after_big - base, after_one - base, after_many - base)
    """, store.path)
    cap, big, one, many = map(int, out.split())
    assert cap == os.cpu_count()
    assert big <= cap - 1  # threads=1000 starts at most cores - 1 workers
    assert one <= (cap - 1) + 4  # plus the 4 persistent background-job threads
    assert many == one  # later epochs start no thread


def test_store_pickles_by_absolute_path(store, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "a" / "s.fgs"
    link.symlink_to(store.path)
    monkeypatch.chdir(tmp_path / "a")
    rel = fgs.open("s.fgs")  # a relative path
    monkeypatch.chdir(tmp_path)  # resolved at open, not when pickled
    blob = pickle.dumps(rel)
    out = run_child("""
        import pickle, sys
        s = pickle.loads(sys.stdin.buffer.read())
        print(len(s), s.path)
    """, cwd=tmp_path / "b", stdin=blob)
    n, path = out.split()
    assert int(n) == len(store) and os.path.isabs(path) and os.path.samefile(path, store.path)


def test_batch_unpacks_and_keeps_attributes(store):
    b = next(iter(store.loader("x", batch_size=10, num_segments=3, mode="train")))
    features, labels, indices = b
    assert isinstance(b, Batch) and isinstance(b, tuple)
    assert features is b.features and labels is b.labels and indices is b.indices
    assert len(b) == 10 and b.features.shape == (10, 3, 16)
    assert pickle.loads(pickle.dumps(b)).indices.tolist() == b.indices.tolist()
