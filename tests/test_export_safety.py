"""Export and batch paths against a store truncated while they run, export
targets that must not be replaced, and Stores that cannot reopen in a
multiprocessing worker.

Truncation scenarios run in a child process: a SIGBUS there fails the test
(a signal exit) instead of killing pytest."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import finegym_store as fgs
from finegym_store import arrow
from finegym_store.cli import main

from conftest import CHILD_CWD, require, require_torch, synthetic_store

require("pyarrow", "pyarrow", 'pip install "finegym-store[arrow]"')

N = 64


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    # 12 x 1024 float32 per instance: 3 MiB of features over many pages, then the
    # other sections (labels among them) after the features.
    return synthetic_store(tmp_path_factory.mktemp("exp"), N, 4, shape=(12, 1024, 1, 1)).path


@pytest.fixture
def store_path(source: str, tmp_path: Path) -> str:
    path = str(tmp_path / "s.fgs")
    shutil.copyfile(source, path)
    return path


def _cut(path: str, where: str) -> int:
    store = fgs.open(path)
    if where == "labels":  # every section from labels on is gone; the features stay
        labels = next(s for s in store.sections() if s["name"] == "labels")
        assert labels["offset"] > store.column("x").values.nbytes
        return labels["offset"] // 4096 * 4096
    return store.file_size // 2 // 4096 * 4096


CHILD = textwrap.dedent(
    r"""
    import faulthandler, json, os, sys
    import numpy as np
    import finegym_store as fgs
    from finegym_store import arrow

    path, scenario, cut, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    faulthandler.enable()
    store = fgs.open(path)
    out = {"batches": 0}

    def truncate():
        os.truncate(path, cut)

    def truncating_batches(*args):
        # The real guarded batches, with the file truncated after the first.
        it = orig(*args)
        yield next(it)
        truncate()
        yield from it

    orig = arrow._guarded_batches
    try:
        if scenario == "loader":
            before = [b.labels.tolist() for b in store.loader("x", batch_size=8, num_segments=3, mode="train", seed=1)]
            loader = store.loader("x", batch_size=8, num_segments=3, mode="train", seed=1, prefetch=1, threads=2)
            labels = []
            for i, b in enumerate(loader):
                labels.append(b.labels.tolist())
                out["batches"] += 1
                if i == 0:
                    truncate()
            out["same"] = labels == before
        elif scenario == "dataset":
            from finegym_store.torch import StoreDataset
            ds = StoreDataset(store, "x", num_segments=3, mode="train")
            first = ds.__getitems__([0, 1])
            truncate()
            for s in range(0, len(ds), 8):
                b = ds.__getitems__(list(range(s, min(len(ds), s + 8))))
                out["batches"] += 1
            ds[len(ds) - 1]
        elif scenario in ("parquet", "ipc"):
            arrow._guarded_batches = truncating_batches
            write = arrow.to_parquet if scenario == "parquet" else arrow.to_ipc
            kw = {"row_group_size": 4} if scenario == "parquet" else {"batch_size": 4}
            write(store, target, **kw)
        elif scenario == "parquet_progress":  # truncated from the progress bar's update, after one row group
            import tqdm.auto
            update = tqdm.auto.tqdm.update
            def hook(self, n=1):
                truncate()
                return update(self, n)
            tqdm.auto.tqdm.update = hook
            arrow.to_parquet(store, target, row_group_size=4, progress=True)
        elif scenario == "truncated_before":  # the schema built, the file truncated, then the export
            store.to_arrow()
            truncate()
            arrow.to_ipc(store, target)
        elif scenario == "polars":
            import polars as pl
            arrow._guarded_batches = truncating_batches
            arrow.default_batch_rows = lambda *a: 4
            pl.DataFrame(store)
        elif scenario == "duckdb":
            import duckdb
            arrow._guarded_batches = truncating_batches
            arrow.default_batch_rows = lambda *a: 4
            duckdb.sql("select sum(label) from store").fetchall()
        elif scenario == "pyarrow_stream":
            import pyarrow as pa
            arrow._guarded_batches = truncating_batches
            reader = pa.RecordBatchReader.from_stream(store.to_batches(batch_size=4))
            for b in reader:
                out["batches"] += 1
        out["result"] = "ok"
    except OSError as e:
        out["result"] = "OSError"
        out["message"] = str(e)
    except Exception as e:
        out["result"] = type(e).__name__
        out["message"] = str(e)
    print(json.dumps(out))
    """
)


def run_child(path: str, scenario: str, cut: int, target: str = "") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, path, scenario, str(cut), target], capture_output=True,
                          text=True, timeout=120, cwd=CHILD_CWD)
    assert proc.returncode == 0, (f"child died of signal {-proc.returncode}" if proc.returncode < 0 else "") + \
        proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loader_epoch_survives_labels_truncated_mid_epoch(store_path: str) -> None:
    # The features stay; the labels section is gone. The Loader indexes its
    # guarded copy of the labels, so the epoch completes with the same labels.
    out = run_child(store_path, "loader", _cut(store_path, "labels"))
    assert out["result"] == "ok", out
    assert out["batches"] == N // 8 and out["same"]


def test_loader_epoch_with_features_truncated_raises_oserror(store_path: str) -> None:
    out = run_child(store_path, "loader", _cut(store_path, "half"))
    assert out["result"] == "OSError" and store_path in out["message"], out
    assert 1 <= out["batches"] < N // 8


@pytest.mark.parametrize("where", ["labels", "half"])
def test_store_dataset_truncated_while_serving(store_path: str, where: str) -> None:
    require_torch()
    out = run_child(store_path, "dataset", _cut(store_path, where))
    if where == "labels":
        assert out["result"] == "ok", out
    else:
        assert out["result"] == "OSError" and store_path in out["message"], out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "s.fgs")


@pytest.mark.parametrize("scenario, name", [("parquet", "o.parquet"), ("ipc", "o.arrow"),
                                            ("parquet_progress", "o.parquet"), ("truncated_before", "o.arrow")])
@pytest.mark.parametrize("where", ["labels", "half"])
def test_export_of_a_store_truncated_meanwhile(store_path: str, tmp_path: Path, scenario: str, name: str,
                                               where: str) -> None:
    target = str(tmp_path / name)
    out = run_child(store_path, scenario, _cut(store_path, where), target)
    assert out["result"] == "OSError" and store_path in out["message"], out
    if scenario != "truncated_before":  # then a size check may come first; mid-write it is the guard
        assert "SIGBUS" in out["message"], out
    assert _leftovers(tmp_path) == []  # neither the target nor a temporary file


@pytest.mark.parametrize("consumer", ["polars", "duckdb", "pyarrow_stream"])
def test_stream_consumer_of_a_store_truncated_meanwhile(store_path: str, consumer: str) -> None:
    if consumer != "pyarrow_stream":
        require(consumer, consumer, f"pip install {consumer}")
    out = run_child(store_path, consumer, _cut(store_path, "half"))
    # The consumer's own error type, carrying the OSError's message.
    expected = "OSError" if consumer == "pyarrow_stream" else {"polars": "ComputeError",
                                                               "duckdb": "InvalidInputException"}[consumer]
    assert out["result"] == expected, out
    assert store_path in out["message"] and "SIGBUS" in out["message"], out


# -- targets -----------------------------------------------------------------------
WRITERS = [("parquet", "o.parquet"), ("ipc", "o.arrow")]


def _write(kind: str, store: fgs.Store, target: str, **kw) -> str:
    if kind == "parquet":
        return arrow.to_parquet(store, target, **kw)
    return arrow.to_ipc(store, target, **kw)


@pytest.mark.parametrize("kind, name", WRITERS)
def test_existing_target_needs_overwrite(store_path: str, tmp_path: Path, kind: str, name: str) -> None:
    store = fgs.open(store_path)
    target = tmp_path / name
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True") as e:
        _write(kind, store, str(target))
    assert str(target) in str(e.value)
    assert target.read_bytes() == b"keep me"
    _write(kind, store, str(target), overwrite=True)
    assert target.read_bytes() != b"keep me"
    assert _leftovers(tmp_path) == [name]


@pytest.mark.parametrize("kind, name", WRITERS)
def test_new_file_gets_the_umask_mode(store_path: str, tmp_path: Path, kind: str, name: str) -> None:
    old = os.umask(0o027)
    try:
        _write(kind, fgs.open(store_path), str(tmp_path / name))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640
    assert _leftovers(tmp_path) == [name]


def _fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo.parquet"
    os.mkfifo(p)
    return p


def _dir(tmp_path: Path) -> Path:
    p = tmp_path / "dir.parquet"
    p.mkdir()
    (p / "inside").write_text("x")
    return p


def _link_to_dir(tmp_path: Path) -> Path:
    p = tmp_path / "link.parquet"
    p.symlink_to(_dir(tmp_path))
    return p


def _link_to_fifo(tmp_path: Path) -> Path:
    p = tmp_path / "link.parquet"
    p.symlink_to(_fifo(tmp_path))
    return p


@pytest.mark.parametrize("make", [_fifo, _dir, _link_to_dir, _link_to_fifo])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["parquet", "ipc"])
def test_non_regular_target_is_never_replaced(store_path: str, tmp_path: Path, make, overwrite: bool,
                                              kind: str) -> None:
    target = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    kinds = {p.name: stat.S_IFMT(os.lstat(p).st_mode) for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="not a regular file|a directory|a FIFO") as e:
        _write(kind, fgs.open(store_path), str(target), overwrite=overwrite)
    assert str(target) in str(e.value) and "choose another target" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left
    assert {p.name: stat.S_IFMT(os.lstat(p).st_mode) for p in tmp_path.iterdir()} == kinds


@pytest.mark.parametrize("overwrite", [False, True])
def test_dev_null_is_refused(store_path: str, overwrite: bool) -> None:
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(ValueError, match="/dev/null is a device"):
        # Refused before any temporary file is created (there, in /dev).
        arrow.check_target(fgs.open(store_path), "/dev/null", overwrite)
    with pytest.raises(ValueError, match="/dev/null is a device"):
        arrow.to_ipc(fgs.open(store_path), "/dev/null", overwrite=overwrite)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("kind", ["parquet", "ipc"])
def test_the_store_itself_is_never_replaced(store_path: str, tmp_path: Path, how: str, kind: str) -> None:
    target = tmp_path / "self.parquet"
    if how == "same":
        target = Path(store_path)
    elif how == "symlink":
        target.symlink_to(store_path)
    else:
        os.link(store_path, target)
    data = Path(store_path).read_bytes()
    store = fgs.open(store_path)
    with pytest.raises(ValueError, match="is the store being exported") as e:
        _write(kind, store, str(target), overwrite=True)
    assert str(target) in str(e.value)
    assert Path(store_path).read_bytes() == data
    assert store.verify() == []


def test_failed_export_leaves_no_temporary(store_path: str, tmp_path: Path) -> None:
    store = fgs.open(store_path)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        arrow.to_parquet(store, str(tmp_path / "no-such-folder" / "o.parquet"))
    with pytest.raises(KeyError):
        arrow.to_parquet(store, str(tmp_path / "o.parquet"), columns=["nope"])
    with pytest.raises(ValueError, match="compression"):
        arrow.to_parquet(store, str(tmp_path / "o.parquet"), compression="nope")
    assert _leftovers(tmp_path) == []


# -- the CLI -------------------------------------------------------------------------
def test_cli_export_refusals(store_path: str, tmp_path: Path, capsys) -> None:
    existing = tmp_path / "e.parquet"
    existing.write_bytes(b"keep")
    assert main(["export", "-q", store_path, str(existing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(existing) in err and "--overwrite" in err
    assert existing.read_bytes() == b"keep"
    fifo = _fifo(tmp_path)
    assert main(["export", "-q", "--overwrite", store_path, str(fifo)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(fifo) in err and "FIFO" in err
    assert main(["export", "-q", "--overwrite", store_path, store_path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is the store being exported" in err
    assert main(["export", "-q", "--overwrite", store_path, "/dev/null"]) == 2
    assert "device" in capsys.readouterr().err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert main(["export", "-q", "--overwrite", store_path, str(existing)]) == 0
    assert existing.read_bytes() != b"keep"


# -- a Store that cannot reopen in a worker ----------------------------------------------
def _length(store: fgs.Store) -> int:
    return len(store)


def _is_store(store: fgs.Store) -> bool:
    return isinstance(store, fgs.Store)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # fork, Python >= 3.12
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_store_that_cannot_reopen_in_a_pool_worker_raises(store_path: str, method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    store = fgs.open(store_path)
    os.unlink(store_path)
    with multiprocessing.get_context(method).Pool(1) as pool:
        assert pool.apply_async(_is_store, (store,)).get(timeout=60) is True
        with pytest.raises(FileNotFoundError, match="could not reopen") as e:
            pool.apply_async(_length, (store,)).get(timeout=60)
    assert store_path in str(e.value)


def test_unopened_store_raises_at_first_use(store_path: str, tmp_path: Path) -> None:
    import pickle

    store = fgs.open(store_path)
    blob = pickle.dumps(store)
    data = Path(store_path).read_bytes()
    del store
    Path(store_path).write_bytes(b"not a store" * 100)
    other = pickle.loads(blob)  # never raises
    assert isinstance(other, fgs.Store)
    assert store_path in repr(other)
    for use in (lambda: len(other), lambda: other.labels, lambda: other.gather("x", [0]), lambda: other.path):
        with pytest.raises(fgs.FormatError, match="could not reopen") as e:
            use()
        assert store_path in str(e.value)
    # Pickled again, it tries again where it is unpickled: here, once the file is back.
    Path(store_path).write_bytes(data)
    again = pickle.loads(pickle.dumps(other))
    assert type(again) is fgs.Store and len(again) == N


@pytest.mark.parametrize("kind, name", WRITERS)
def test_target_appearing_during_export_is_kept(store_path: str, tmp_path: Path, monkeypatch, kind: str,
                                                name: str) -> None:
    target = tmp_path / name
    real = arrow._guarded_batches

    def batches(*args):
        it = real(*args)
        yield next(it)
        target.write_bytes(b"someone else's")  # created while the export runs
        yield from it

    monkeypatch.setattr(arrow, "_guarded_batches", batches)
    kw = {"row_group_size": 8} if kind == "parquet" else {"batch_size": 8}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(kind, fgs.open(store_path), str(target), **kw)
    assert target.read_bytes() == b"someone else's"
    assert _leftovers(tmp_path) == [name]


def test_store_replaced_by_rename_is_still_not_overwritten(store_path: str, tmp_path: Path) -> None:
    # The path now names another file; a hard link still names the mapped one.
    store = fgs.open(store_path)
    link = tmp_path / "old.parquet"
    os.link(store_path, link)
    shutil.copyfile(store_path, tmp_path / "new.fgs")
    os.replace(tmp_path / "new.fgs", store_path)
    with pytest.raises(ValueError, match="is the store being exported"):
        arrow.to_parquet(store, str(link), overwrite=True)
    with pytest.raises(ValueError, match="is the store being exported"):
        arrow.to_parquet(store, store_path, overwrite=True)


def test_symlink_to_a_regular_file_replaces_the_link(store_path: str, tmp_path: Path) -> None:
    kept = tmp_path / "kept.parquet"
    kept.write_bytes(b"kept")
    link = tmp_path / "link.parquet"
    link.symlink_to(kept)
    with pytest.raises(FileExistsError):
        arrow.to_parquet(fgs.open(store_path), str(link))
    arrow.to_parquet(fgs.open(store_path), str(link), overwrite=True)
    assert not link.is_symlink() and kept.read_bytes() == b"kept"
