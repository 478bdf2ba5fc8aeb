"""Writes are atomic: a store appears complete under its name or not at all,
whatever happens to the conversion, and replacing a store never damages the
old one or the views taken from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import finegym_store as fgs

from conftest import CHILD_CWD

WRITE_MODULE = sys.modules["finegym_store._write"]


def _table(n=5, t=3, c=4, value=None, seed=0):
    rng = np.random.default_rng(seed)
    if value is not None:
        return {f"k{i}": np.full((t, c), value, np.float32) for i in range(n)}
    return {f"k{i}": rng.standard_normal((t, c)).astype(np.float32) for i in range(n)}


class _WriterProxy:
    """Wraps the C++ writer to inject failures at chosen points."""

    def __init__(self, real, hooks):
        self._w = real
        self._hooks = hooks
        self.appends = 0

    def __getattr__(self, name):
        return getattr(self._w, name)

    def append_features(self, rows):
        self._w.append_features(rows)
        self.appends += 1
        if "append" in self._hooks:
            self._hooks["append"](self.appends)

    def commit(self):
        if "commit" in self._hooks:
            self._hooks["commit"]()
        self._w.commit()


@pytest.fixture
def inject(monkeypatch):
    """inject(**hooks): route convert's writer through _WriterProxy."""
    real_core = WRITE_MODULE._core

    def install(**hooks):
        class Core:
            def __getattr__(self, name):
                return getattr(real_core, name)

            @staticmethod
            def Writer(*args):  # noqa: N802 - mirrors _core.Writer
                return _WriterProxy(real_core.Writer(*args), hooks)

        monkeypatch.setattr(WRITE_MODULE, "_core", Core())

    return install


# -- (a) failures inside the conversion --------------------------------------------------------------


def test_bad_second_column_leaves_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    before = sorted(os.listdir(tmp_path))
    bad = _table()
    bad["k3"] = [1.0, 2.0]  # not an array; found after column 1 is written
    with pytest.raises(fgs.ConversionError, match=r"features\['b'\].*key 'k3'"):
        fgs.convert({"a": _table(), "b": bad}, tmp_path / "out.fgs", progress=False)
    assert sorted(os.listdir(tmp_path)) == before


def test_error_after_all_features_leaves_nothing(tmp_path, monkeypatch):
    before = sorted(os.listdir(tmp_path))

    def boom(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(WRITE_MODULE, "parse_element_id", boom)  # inside finish(), after every column
    with pytest.raises(RuntimeError, match="disk on fire"):
        fgs.convert({"a": _table(), "b": _table(seed=1)}, tmp_path / "out.fgs", progress=False)
    assert sorted(os.listdir(tmp_path)) == before


def test_keyboard_interrupt_mid_column_leaves_nothing(tmp_path, inject, monkeypatch):
    monkeypatch.setattr(WRITE_MODULE, "STAGING_BYTES", 4 * 4 * 3)  # 3 rows per append

    def interrupt(n):
        if n == 2:
            raise KeyboardInterrupt

    inject(append=interrupt)
    with pytest.raises(KeyboardInterrupt):
        fgs.convert({"a": _table()}, tmp_path / "out.fgs", progress=False)
    assert os.listdir(tmp_path) == []


def test_target_created_meanwhile_is_not_clobbered(tmp_path, inject):
    out = tmp_path / "out.fgs"
    inject(commit=lambda: out.write_bytes(b"someone else's file"))
    with pytest.raises(FileExistsError):
        fgs.convert({"a": _table()}, out, progress=False)
    assert out.read_bytes() == b"someone else's file"
    assert os.listdir(tmp_path) == ["out.fgs"]


def test_target_created_meanwhile_with_overwrite_is_replaced(tmp_path, inject):
    out = tmp_path / "out.fgs"
    inject(commit=lambda: out.write_bytes(b"someone else's file"))
    store = fgs.convert({"a": _table(value=2.0)}, out, overwrite=True, progress=False)
    np.testing.assert_array_equal(store.features("a", 0), np.full((3, 4), 2.0))
    assert os.listdir(tmp_path) == ["out.fgs"]


# -- (b) a conversion killed with SIGKILL -------------------------------------------------------------

CHILD = textwrap.dedent(
    r"""
    import sys, time
    import numpy as np
    import finegym_store as fgs

    out, pause_at, overwrite = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    conv = sys.modules["finegym_store._write"]
    real = conv._core

    class Writer:
        def __init__(self, *args):
            self._w = real.Writer(*args)
            self.appends = 0

        def __getattr__(self, name):
            return getattr(self._w, name)

        def append_features(self, rows):
            self._w.append_features(rows)
            self.appends += 1
            if self.appends == pause_at:
                print("writing", flush=True)
                time.sleep(120)  # killed here

    class Core:
        Writer = Writer

        def __getattr__(self, name):
            return getattr(real, name)

    if pause_at:
        conv._core = Core()
    n, t, c = 3000, 12, 2048
    a = np.zeros((n, t, c), np.float32)
    a[:, 0, 0] = np.arange(n)
    b = np.zeros((n, t, c), np.float32)
    ids = [f"v{i:05d}" for i in range(n)]
    features = {"a": {k: a[i] for i, k in enumerate(ids)}, "b": {k: b[i] for i, k in enumerate(ids)}}
    print("ready", flush=True)
    fgs.convert(features, out, overwrite=overwrite, progress=False)
    print("done", flush=True)
    """
)


def _has_o_tmpfile(folder) -> bool:
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True


def _leftovers(folder, before) -> list[str]:
    """Files in `folder` that were not there before. Where the filesystem has
    no O_TMPFILE the writer falls back to a hidden named temporary file, which
    a SIGKILL cannot clean up; the documented promise there is only that
    nothing appears under the target name."""
    new = sorted(set(os.listdir(folder)) - set(before))
    if not _has_o_tmpfile(folder):
        new = [n for n in new if not (n.startswith(".") and n.endswith(".tmp"))]
    return new


def _temp_files_of(pid: int, folder: str) -> list[str]:
    """The child's open files in `folder`: an O_TMPFILE inode shows as
    'FOLDER/#123 (deleted)', the fallback as 'FOLDER/.NAME.xxxx.tmp'."""
    found = []
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return found
    for fd in fds:
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith(folder + "/") and (target.endswith("(deleted)") or target.endswith(".tmp")):
            found.append(target)
    return found


def _spawn(out, pause_at, overwrite):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), str(pause_at), "1" if overwrite else "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CHILD_CWD,
    )
    proc.watchdog = threading.Timer(120, proc.kill)  # never let a stuck child hang the test run
    proc.watchdog.start()
    return proc


def _kill(proc):
    proc.watchdog.cancel()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    "pause_at, overwrite",
    [(1, False), (7, False), (3, True)],
    ids=["first-column", "second-column", "overwrite"],
)
def test_sigkill_mid_write_leaves_no_file(tmp_path, pause_at, overwrite):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "big.fgs"
    old = None
    if overwrite:
        fgs.convert({"a": _table(value=7.0)}, out, progress=False)
        old = out.read_bytes()
    before = sorted(os.listdir(folder))
    proc = _spawn(out, pause_at, overwrite)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        temps = _temp_files_of(proc.pid, str(folder))
        assert len(temps) == 1, temps  # the half-written store exists, unnamed
    finally:
        _kill(proc)
    assert _leftovers(folder, before) == []
    assert sorted(os.listdir(folder)) == before or not _has_o_tmpfile(folder)
    if overwrite:
        assert out.read_bytes() == old
        store = fgs.open(out)
        assert store.verify() == []
        np.testing.assert_array_equal(store.features("a", 0), np.full((3, 4), 7.0))
    else:
        assert not out.exists()


def test_sigkill_at_a_random_moment_of_a_large_write(tmp_path):
    # No injected pause: kill as soon as the child has a temporary file open.
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "big.fgs"
    proc = _spawn(out, 0, False)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        deadline = time.monotonic() + 60
        while not _temp_files_of(proc.pid, str(folder)):
            assert proc.poll() is None, "the conversion ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        _kill(proc)
    assert _leftovers(folder, []) == []
    assert not out.exists()


# -- (c) overwrite ------------------------------------------------------------------------------------


def test_failed_overwrite_keeps_old_store(tmp_path):
    out = tmp_path / "s.fgs"
    fgs.convert({"a": _table(value=1.0)}, out, progress=False)
    old_bytes = out.read_bytes()
    old_inode = os.stat(out).st_ino
    bad = _table(value=2.0)
    bad["k4"] = np.zeros((3, 4), np.int16)
    with pytest.raises(fgs.ConversionError, match=r"key 'k4'"):
        fgs.convert({"a": _table(value=2.0), "b": bad}, out, overwrite=True, progress=False)
    assert os.listdir(tmp_path) == ["s.fgs"]
    assert out.read_bytes() == old_bytes
    assert os.stat(out).st_ino == old_inode
    store = fgs.open(out)
    assert store.verify() == []
    np.testing.assert_array_equal(store.features("a", 4), np.ones((3, 4)))


def test_overwrite_interrupted_mid_write_keeps_old_store(tmp_path, inject, monkeypatch):
    out = tmp_path / "s.fgs"
    fgs.convert({"a": _table(value=1.0)}, out, progress=False)
    old_bytes = out.read_bytes()
    monkeypatch.setattr(WRITE_MODULE, "STAGING_BYTES", 4 * 4 * 3)

    def fail(n):
        if n == 3:
            raise OSError(28, "No space left on device")

    inject(append=fail)
    with pytest.raises(OSError, match="No space left"):
        fgs.convert({"a": _table(value=2.0)}, out, overwrite=True, progress=False)
    assert os.listdir(tmp_path) == ["s.fgs"]
    assert out.read_bytes() == old_bytes


def test_overwrite_replaces_with_a_new_inode(tmp_path):
    out = tmp_path / "s.fgs"
    fgs.convert({"a": _table(value=1.0)}, out, progress=False)
    old_inode = os.stat(out).st_ino
    store = fgs.convert({"b": _table(n=2, t=5, c=6, value=3.0)}, out, overwrite=True, progress=False)
    assert os.stat(out).st_ino != old_inode  # renamed over, not rewritten in place
    assert store.columns == ("b",) and len(store) == 2
    assert os.listdir(tmp_path) == ["s.fgs"]


# -- (d) views of a replaced store -----------------------------------------------------------------------


def test_old_views_survive_overwrite(tmp_path):
    out = tmp_path / "s.fgs"
    old = fgs.convert({"a": _table(value=1.0)}, out, progress=False)
    view = old.features("a", 2)
    column = old.column("a").values
    ids = old.ids
    new = fgs.convert({"a": _table(n=3, value=5.0, t=2, c=2)}, out, overwrite=True, progress=False)
    # The old mapping belongs to the old inode: unchanged, and still checksummed clean.
    np.testing.assert_array_equal(view, np.ones((3, 4)))
    assert column.shape == (5, 3, 4) and (column == 1.0).all()
    assert list(ids) == [f"k{i}" for i in range(5)]
    assert old.verify() == []
    assert len(old) == 5
    # The name now gives the new store.
    np.testing.assert_array_equal(new.features("a", 2), np.full((2, 2), 5.0))
    np.testing.assert_array_equal(fgs.open(out).features("a", 0), np.full((2, 2), 5.0))
    del old, column, ids
    np.testing.assert_array_equal(view, np.ones((3, 4)))  # the view alone keeps the old mapping


def test_old_views_survive_unlink(tmp_path):
    out = tmp_path / "s.fgs"
    store = fgs.convert({"a": _table(value=4.0)}, out, progress=False)
    view = store.features("a", 0)
    del store
    os.unlink(out)
    np.testing.assert_array_equal(view, np.full((3, 4), 4.0))
