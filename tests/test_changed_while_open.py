"""A store changed on disk while a reader has it open: truncated under the
mapping (SIGBUS territory) or rewritten in place. Every access path raises
OSError naming the file, or keeps serving the layout validated at open; none
may crash. Each scenario runs in a child process, so that a crash fails the
test instead of taking pytest down (a signal exit is a failure)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import synth

from conftest import CHILD_CWD

N = 9
RAG_T = [3, 1, 5, 2, 4, 1, 6, 2, 3]
CATS = "Clabel:   0; set:  1; Glabel:   1; (VT) round-off\nClabel:   1; set: 21; Glabel:  67; (FX) split leap\n"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("changed")
    rng = np.random.default_rng(5)
    ids = synth.make_ids(N, seed=5)
    (d / "split.txt").write_text("".join(f"{k} {i % 2}\n" for i, k in enumerate(ids)))
    (d / "cats.txt").write_text(CATS)
    paths = {}
    # 'big' spans several pages of features, so that a cut at a page boundary leaves some of them mapped.
    for name, c in (("small", 8), ("big", 1024)):
        fix = {k: rng.standard_normal((4, c)).astype(np.float32) for k in ids}
        rag = {k: rng.standard_normal((t, c)).astype(np.float32) for k, t in zip(ids, RAG_T)}
        fgs.convert({"fix": fix, "rag": rag}, d / f"{name}.fgs", split=d / "split.txt", categories=d / "cats.txt",
                    progress=False)
        paths[name] = str(d / f"{name}.fgs")
    return paths


CHILD = textwrap.dedent(
    r"""
    import faulthandler, json, os, shutil, sys
    import numpy as np
    import finegym_store as fgs

    path, action, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    faulthandler.enable()  # as pytest does: it hooks SIGBUS too
    store = fgs.open(path)
    store.gather("fix", [0, 1], num_segments=2, mode="test")  # installs the guard's handler (chained to faulthandler's)
    faulthandler.disable()
    faulthandler.enable()  # now faulthandler sits on top of the guard: the guard must notice and re-install
    before = {
        "lengths": store.column("rag").lengths().tolist(),
        "offsets": store.column("rag").offsets.tolist(),
        "ids": store.ids.to_list(),
        "gather": store.gather("rag", list(range(len(store))), num_segments=3, mode="test").tolist(),
        "features": [store.features("rag", i).tolist() for i in range(len(store))],
    }

    if action == "truncate":
        os.truncate(path, int(arg))
    elif action == "write":  # rewrite in place (same inode), like `cp new.fgs old.fgs`
        with open(arg, "rb") as src, open(path, "r+b") as dst:
            dst.truncate(0)
            dst.write(src.read())
    else:
        raise SystemExit("unknown action " + action)

    def loader_batch():
        return next(iter(store.loader("rag", batch_size=4, num_segments=2, mode="train", threads=2))).features

    ops = {
        "gather_fix": lambda: store.gather("fix", list(range(len(store))), threads=2),
        "gather_rag": lambda: store.gather("rag", list(range(len(store))), num_segments=3, mode="test", threads=2),
        "gather_f16": lambda: store.gather("rag", [0, -1], num_segments=2, mode="test", dtype=np.float16),
        "gather_concat": lambda: store.gather(["fix"], list(range(len(store))), concat=True, threads=2),
        "native_items": lambda: [store._copy_features("rag", i).tolist() for i in range(len(store))],
        "features": lambda: [store.features("rag", i).tolist() for i in range(len(store))],
        "column_index": lambda: store.column("fix")[0],
        "values": lambda: store.column("fix").values,
        "ids_item": lambda: store.ids[len(store) - 1],
        "ids_list": lambda: store.ids.to_list(),
        "index_of": lambda: store.index_of(before["ids"][0]),
        "video": lambda: store.meta.video.to_list(),
        "classes": lambda: store.classes.name.to_list(),
        "labels": lambda: store.labels,
        "attrs": lambda: store.attrs,
        "verify": lambda: store.verify(),
        "loader": loader_batch,
    }
    out = {"before": before, "ops": {}}
    for name, op in ops.items():
        try:
            value = op()
            out["ops"][name] = ["ok", value.tolist() if isinstance(value, np.ndarray) else value]
        except OSError as e:
            out["ops"][name] = ["OSError", str(e), e.errno]
        except fgs.FormatError as e:
            out["ops"][name] = ["FormatError", str(e)]
    # After all of that, the process is still healthy and a fresh open sees the file as it now is.
    try:
        fgs.open(path)
        out["reopen"] = "ok"
    except (OSError, fgs.FormatError) as e:
        out["reopen"] = type(e).__name__
    print(json.dumps(out))
    """
)


def run_child(path, action, arg):
    proc = subprocess.run([sys.executable, "-c", CHILD, path, action, str(arg)], capture_output=True, text=True,
                          timeout=120, cwd=CHILD_CWD)
    assert proc.returncode == 0, (f"child died of signal {-proc.returncode}" if proc.returncode < 0 else "") + \
        proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# Ops that read only from the reader's own copies (offsets, sizes) and need no mapped byte.
COPIES_ONLY = {"index_of"}


@pytest.mark.parametrize("which, cut", [("small", 0), ("small", 64), ("small", "half"), ("big", 4096),
                                        ("big", "half"), ("big", "table")])
def test_truncated_while_open_raises_oserror_naming_the_file(stores, tmp_path, which, cut):
    path = str(tmp_path / "t.fgs")
    shutil.copyfile(stores[which], path)
    size = os.path.getsize(path)
    table_offset = struct.unpack_from("<Q", _read(path), 32)[0]
    # Page-aligned cuts: the pages before the cut stay readable, so what reads
    # only them may still succeed; every op reading a page past it must fail.
    cut = {"half": size // 2 // 4096 * 4096, "table": table_offset // 4096 * 4096}.get(cut, cut)
    assert 0 <= cut < size
    out = run_child(path, "truncate", cut)
    before, ops = out["before"], out["ops"]
    for name, result in ops.items():
        if result[0] == "OSError":
            assert path in result[1] and result[2] is not None, (name, result)
        else:
            assert result[0] == "ok", (name, result)  # never FormatError: the data was not damaged, it is gone
    # The views and whole-file reads check the size first; verify reads the whole file.
    for name in ("features", "values", "labels", "verify", "attrs", "column_index"):
        assert ops[name][0] == "OSError", (name, ops[name])
    if cut < 4096:  # every section lies past the cut: the guarded copies fault too
        for name in set(ops) - COPIES_ONLY:
            assert ops[name][0] == "OSError", (name, ops[name])
        assert "changed under its memory mapping (SIGBUS" in ops["gather_rag"][1]
        assert "changed under its memory mapping (SIGBUS" in ops["ids_list"][1]
    if ops["gather_rag"][0] == "ok":  # then it read the bytes it read before
        assert ops["gather_rag"][1] == before["gather"]
    if ops["ids_list"][0] == "ok":
        assert ops["ids_list"][1] == before["ids"]
    if ops["native_items"][0] == "ok":
        assert ops["native_items"][1] == before["features"]
    if which == "big" and cut == 4096:  # features/fix starts at 4096: its pages are gone
        assert ops["gather_fix"][0] == ops["gather_rag"][0] == ops["loader"][0] == "OSError"
        assert ops["gather_concat"][0] == ops["native_items"][0] == "OSError"
    assert out["reopen"] == "FormatError"


def _with_rag_offsets(data: bytes, value: int) -> bytes:
    """The same store with every ragged offset after the first set to `value`
    (no header change: offsets are data the header checksum does not cover)."""
    store_table = None
    toff, count = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<I", data, 40)[0]
    buf = bytearray(data)
    for i in range(count):
        at = toff + 128 * i
        if bytes(buf[at : at + 64]).split(b"\0", 1)[0] == b"features/rag/offsets":
            store_table = struct.unpack_from("<QQ", buf, at + 64)
    assert store_table is not None
    off, length = store_table
    for j in range(1, length // 8):
        struct.pack_into("<q", buf, off + 8 * j, value)
    return bytes(buf)


def test_offsets_rewritten_in_place_are_not_reread(stores, tmp_path):
    path = str(tmp_path / "o.fgs")
    shutil.copyfile(stores["small"], path)
    evil = tmp_path / "evil.fgs"
    evil.write_bytes(_with_rag_offsets(_read(path), 10**12))  # 10^12 rows per instance
    out = run_child(path, "write", evil)
    before, ops = out["before"], out["ops"]
    assert before["lengths"] == RAG_T
    # The reader serves the offsets it validated at open, not the new ones.
    assert ops["features"] == ["ok", before["features"]]
    assert ops["gather_rag"] == ["ok", before["gather"]]
    assert ops["ids_list"] == ["ok", before["ids"]]
    assert ops["loader"][0] == "ok" and np.asarray(ops["loader"][1]).shape == (4, 2, 8)
    # verify() sees the change (the section's checksum no longer matches).
    assert ops["verify"] == ["ok", ["features/rag/offsets"]]
    assert out["reopen"] == "FormatError"  # a fresh open refuses the new offsets


def test_another_store_copied_over_an_open_one(stores, tmp_path):
    # `cp big.fgs small.fgs` while small.fgs is open: the file grows, the
    # mapping still covers the old size. No crash; verify() reports the change.
    path = str(tmp_path / "c.fgs")
    shutil.copyfile(stores["small"], path)
    out = run_child(path, "write", stores["big"])
    ops = out["ops"]
    assert ops["verify"][0] == "OSError" and path in ops["verify"][1]
    assert "changed on disk since it was opened" in ops["verify"][1]
    # Other reads see the new bytes through the old layout: whatever they hold
    # (the ids may now be cut from feature bytes, not UTF-8), never a crash,
    # and never rows outside the validated layout.
    assert ops["ids_list"][0] == "FormatError" or len(ops["ids_list"][1]) == N
    assert ops["gather_rag"][0] == "ok" and np.asarray(ops["gather_rag"][1]).shape == (N, 3, 8)
    assert [len(f) for f in ops["features"][1]] == RAG_T
    assert out["reopen"] == "ok"


def test_open_store_survives_its_file_being_replaced_by_rename(stores, tmp_path):
    # The writer's own way to replace a file (rename over it): the open
    # mapping keeps the old inode, so everything still reads the old store.
    path = str(tmp_path / "r.fgs")
    shutil.copyfile(stores["small"], path)
    store = fgs.open(path)
    ref = store.gather("rag", range(N), num_segments=3, mode="test")
    tmp = tmp_path / "new.fgs"
    shutil.copyfile(stores["big"], tmp)
    os.replace(tmp, path)
    np.testing.assert_array_equal(store.gather("rag", range(N), num_segments=3, mode="test"), ref)
    assert store.verify() == []


OUTSIDE = textwrap.dedent(
    r"""
    import faulthandler, os, signal, sys
    import finegym_store as fgs

    path, what = sys.argv[1], sys.argv[2]
    faulthandler.enable()
    store = fgs.open(path)
    store.gather("fix", [0], num_segments=2, mode="test")  # the guard's handler is installed now
    view = store.column("fix").values  # a view handed out before the change: not protected
    if what == "kill":
        os.kill(os.getpid(), signal.SIGBUS)
    else:
        os.truncate(path, 0)
        view.sum()
    print("survived")
    """
)


@pytest.mark.parametrize("what", ["kill", "held_view"])
def test_sigbus_outside_a_guarded_copy_still_crashes(stores, tmp_path, what):
    # The guard catches faults in its own copies only: any other SIGBUS goes to
    # the handler installed before it (here faulthandler, which reports it) and
    # then kills the process, as it would without finegym-store. A view the
    # user already holds is the documented unprotected case (FORMAT.md).
    path = str(tmp_path / "v.fgs")
    shutil.copyfile(stores["big"], path)
    proc = subprocess.run([sys.executable, "-c", OUTSIDE, path, what], capture_output=True, text=True, timeout=120,
                          cwd=CHILD_CWD)
    assert "survived" not in proc.stdout
    assert "Fatal Python error: Bus error" in proc.stderr, proc.stderr[-2000:]
    # Killed by the signal -- or, under `bash .ci/asan`, by the sanitizer's
    # handler, which faulthandler hands the signal on to and which exits with 1.
    sanitizer = "AddressSanitizer: BUS" in proc.stderr and proc.returncode == 1
    assert proc.returncode == -signal.SIGBUS or sanitizer, (proc.returncode, proc.stderr[-2000:])
