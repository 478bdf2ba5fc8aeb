"""The field's other layouts: folders of per-instance .npy files, HDF5 files
(one dataset per instance, or an array plus an id dataset), Arrow IPC files
and streams; list columns whose instances all have one T stored fixed; the
ragged gather error's suggestion; hostile inputs; `finegym-store import`'s
dispatch by path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import synth
from finegym_store._write import StoreWriter
from finegym_store.cli import main

from conftest import require

N = 24


@pytest.fixture
def data(tmp_path: Path):
    """(ids, labels, {id: (12, 8, 1, 1) float32}, split path, the store convert makes of the dict)."""
    ids = synth.make_ids(N, seed=3)
    labels = synth.long_tailed_labels(N, 5, seed=3)
    table = synth.make_features(ids, labels, (12, 8, 1, 1), seed=3)
    split = tmp_path / "split.txt"
    synth.write_split(split, ids, labels)
    ref = fgs.convert({"x": table}, tmp_path / "ref.fgs", split=split, progress=False)
    return ids, labels, table, split, ref


def _same(a: fgs.Store, b: fgs.Store) -> None:
    assert list(a.ids) == list(b.ids)
    assert np.array_equal(np.asarray(a.labels), np.asarray(b.labels))
    assert a.columns == b.columns
    for c in a.columns:
        assert a.column(c).shape == b.column(c).shape
        assert np.array_equal(np.asarray(a.column(c).values), np.asarray(b.column(c).values))


def _npy_folder(folder: Path, table: dict) -> Path:
    folder.mkdir()
    for k, v in table.items():
        np.save(folder / f"{k}.npy", v)
    return folder


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert os.listdir(out.parent) == []


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "o.fgs"


# -- .npy folders ------------------------------------------------------------------------------------------
def test_npy_folder_converts_like_the_dict(tmp_path, data):
    ids, _, table, split, ref = data
    folder = _npy_folder(tmp_path / "feats", table)
    _same(fgs.convert({"x": folder}, tmp_path / "a.fgs", split=split, progress=False), ref)
    _same(fgs.convert({"x": str(folder)}, tmp_path / "b.fgs", split=split, progress=False), ref)


def test_npy_folder_keeps_dtypes_orders_and_c_vectors(tmp_path):
    rng = np.random.default_rng(0)
    table = {"a": rng.standard_normal((3, 4)).astype(np.float16),
             "b": np.asfortranarray(rng.standard_normal((3, 4))),  # float64, Fortran order
             "c": rng.standard_normal((3, 4)).astype(">f4")}       # big-endian
    folder = _npy_folder(tmp_path / "f", table)
    got = fgs.convert({"x": folder}, tmp_path / "a.fgs", progress=False)
    ref = fgs.convert({"x": table}, tmp_path / "b.fgs", progress=False)
    _same(got, ref)
    vectors = _npy_folder(tmp_path / "v", {"a": np.ones(5, np.float32), "b": np.zeros(5, np.float32)})
    assert fgs.convert({"x": vectors}, tmp_path / "c.fgs", progress=False).column("x").shape == (2, 1, 5)


def test_npy_folder_with_a_split_checks_ids_as_pickles_do(tmp_path, data):
    ids, _, table, split, _ = data
    folder = _npy_folder(tmp_path / "feats", {k: table[k] for k in ids[1:]})
    with pytest.raises(fgs.ConversionError, match="1 ids of .* are missing"):
        fgs.convert({"x": folder}, tmp_path / "a.fgs", split=split, progress=False)
    store = fgs.convert({"x": folder}, tmp_path / "a.fgs", split=split, missing="drop", progress=False)
    assert list(store.ids) == ids[1:]


def _hostile(folder: Path, name: str, make) -> Path:
    folder.mkdir(exist_ok=True)
    np.save(folder / "good.npy", np.ones((2, 3), np.float32))
    make(folder / name)
    return folder / name


def _truncated(p: Path) -> None:
    np.save(p, np.ones((4, 3), np.float32))
    p.write_bytes(p.read_bytes()[:-5])


def _lying(p: Path) -> None:
    np.save(p, np.ones((4, 3), np.float32))
    raw = p.read_bytes()
    p.write_bytes(raw.replace(b"(4, 3)", b"(9, 3)"))


def _lying_small(p: Path) -> None:
    np.save(p, np.ones((4, 3), np.float32))
    p.write_bytes(p.read_bytes().replace(b"(4, 3)", b"(2, 3)"))


def _pickled(p: Path) -> None:
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _npy_header(text: bytes) -> bytes:
    text = text.ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def _loop(p: Path) -> None:
    os.symlink(p.name, p)  # x.npy -> x.npy


@pytest.mark.parametrize("name,make,message", [
    ("x.npy", _pickled, "holds Python objects"),
    ("x.npy", lambda p: np.save(p, np.arange(6).reshape(2, 3)), "dtype int64"),
    ("x.npy", lambda p: np.save(p, np.array(["a", "b"])), "dtype <U1"),
    ("x.npy", _truncated, "the file holds"),
    ("x.npy", _lying, "header claims shape (9, 3)"),
    ("x.npy", _lying_small, "header claims shape (2, 3)"),
    ("x.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 100), "not a readable .npy"),
    ("x.npy", lambda p: p.write_bytes(b"not numpy at all"), "not a readable .npy"),
    ("x.npy", lambda p: p.write_bytes(_npy_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,")),
     "not a readable .npy"),  # the tokenizer's error, not a ValueError
    ("x.npy", lambda p: os.mkfifo(p), "a FIFO"),
    ("x.npy", _loop, "a link loop"),
    ("x.npy", lambda p: os.symlink("nowhere.npy", p), "cannot be read"),
    ("x.npy", lambda p: p.mkdir(), "a folder"),
    ("notes.txt", lambda p: p.write_text("hi"), "not a .npy file"),
    ("x.npy", lambda p: np.save(p, np.ones((2, 3, 4), np.float32)), "expected shape"),
    ("x.npy", lambda p: np.save(p, np.ones((0, 3), np.float32)), "empty array"),
])
def test_hostile_npy_is_a_conversion_error_naming_the_file(tmp_path, out, name, make, message):
    bad = _hostile(tmp_path / "feats", name, make)
    with pytest.raises(fgs.ConversionError) as e:
        fgs.convert({"x": tmp_path / "feats"}, out, progress=False)
    assert str(bad) in str(e.value) and message in str(e.value), str(e.value)
    _nothing_at(out)


def test_npy_name_that_is_not_utf8(tmp_path, out):
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "good.npy", np.ones((2, 3), np.float32))
    bad = os.path.join(os.fsencode(folder), b"\xff\xfe.npy")
    with open(bad, "wb") as f:
        np.save(f, np.ones((2, 3), np.float32))
    with pytest.raises(fgs.ConversionError, match="not valid UTF-8"):
        fgs.convert({"x": folder}, out, progress=False)
    _nothing_at(out)


def test_empty_npy_folder(tmp_path, out):
    (tmp_path / "feats").mkdir()
    with pytest.raises(fgs.ConversionError, match="holds no .npy files"):
        fgs.convert({"x": tmp_path / "feats"}, out, progress=False)


# -- HDF5 -------------------------------------------------------------------------------------------------
def test_hdf5_one_dataset_per_instance(tmp_path, data):
    h5py = require("h5py", "h5py", 'pip install "finegym-store[hdf5]"')
    ids, _, table, split, ref = data
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for k in reversed(ids):
            f[k] = table[k]
    _same(fgs.convert({"x": tmp_path / "f.h5"}, tmp_path / "a.fgs", split=split, progress=False), ref)


@pytest.mark.parametrize("squeeze", [False, True])
def test_hdf5_array_and_ids(tmp_path, data, squeeze):
    h5py = require("h5py", "h5py", 'pip install "finegym-store[hdf5]"')
    ids, _, table, split, ref = data
    order = ids[::-1]
    feats = np.stack([table[k] for k in order])
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        f["features"] = feats[:, :, :, 0, 0] if squeeze else feats
        f.create_dataset("ids", data=order, dtype=h5py.string_dtype())
    _same(fgs.convert({"x": tmp_path / "f.hdf5"}, tmp_path / "a.fgs", split=split, progress=False), ref)


def test_hdf5_datasets_named_when_ambiguous(tmp_path, data, out):
    h5py = require("h5py", "h5py", 'pip install "finegym-store[hdf5]"')
    ids, _, table, split, ref = data
    feats = np.stack([table[k] for k in ids])[:, :, :, 0, 0]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["i3d"] = feats
        f["tsn"] = feats[:, :, :4] + 1
        f["names"] = np.array(ids, dtype="S")
    with pytest.raises(fgs.ConversionError, match=r"f\.h5: which datasets .* ambiguous.*HDF5Source"):
        fgs.convert({"x": tmp_path / "f.h5"}, out, split=split, progress=False)
    _nothing_at(out)
    got = fgs.convert({"x": fgs.HDF5Source(tmp_path / "f.h5", features="i3d", ids="names")}, tmp_path / "a.fgs",
                      split=split, progress=False)
    _same(got, ref)
    got = fgs.convert({"x": fgs.HDF5Source(tmp_path / "f.h5", features="tsn")}, tmp_path / "b.fgs",
                      split=split, progress=False)
    assert got.column("x").shape == (N, 12, 4)


def test_hostile_hdf5(tmp_path, out):
    h5py = require("h5py", "h5py", 'pip install "finegym-store[hdf5]"')
    strings = tmp_path / "strings.h5"
    with h5py.File(strings, "w") as f:
        f["a"] = np.ones((2, 3), np.float32)
        f.create_dataset("b", data=["x", "y", "z"], dtype=h5py.string_dtype())
    not_h5 = tmp_path / "text.h5"
    not_h5.write_text("not HDF5")
    group = tmp_path / "group.h5"
    with h5py.File(group, "w") as f:
        f["a"] = np.ones((2, 3), np.float32)
        f.create_group("g")
    dup = tmp_path / "dup.h5"
    with h5py.File(dup, "w") as f:
        f["x"] = np.ones((2, 3), np.float32)
        f["ids"] = np.array([b"a", b"a"])
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    for path, message in [(strings, "key 'b': expected a floating-point array"), (not_h5, "not a readable HDF5"),
                          (group, "'g' is a group"), (dup, "row 1: id 'a' is a duplicate"), (fifo, "a FIFO")]:
        with pytest.raises(fgs.ConversionError) as e:
            fgs.convert({"x": path}, out, progress=False)
        assert str(path) in str(e.value) and message in str(e.value), str(e.value)
        _nothing_at(out)


# -- Arrow IPC --------------------------------------------------------------------------------------------
def test_arrow_ipc_file_and_stream(tmp_path, data):
    pa = require("pyarrow", "pyarrow", 'pip install "finegym-store[arrow]"')
    _, _, _, _, ref = data
    for name in ("a.arrow", "a.feather"):
        assert main(["export", "-q", str(ref.path), str(tmp_path / name)]) == 0
        _same(fgs.from_ipc(tmp_path / name, tmp_path / f"{name}.fgs", progress=False), ref)
    table = ref.to_arrow()
    with pa.OSFile(str(tmp_path / "s.ipc"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for b in table.to_batches(max_chunksize=5):
            w.write_batch(b)
    _same(fgs.from_ipc(tmp_path / "s.ipc", tmp_path / "s.fgs", progress=False), ref)


def test_hostile_arrow_ipc(tmp_path, data, out):
    require("pyarrow", "pyarrow", 'pip install "finegym-store[arrow]"')
    _, _, _, _, ref = data
    text = tmp_path / "text.arrow"
    text.write_text("not Arrow")
    fifo = tmp_path / "fifo.arrow"
    os.mkfifo(fifo)
    good = tmp_path / "good.arrow"
    ref.to_arrow()  # the export writes one batch per row group
    assert main(["export", "-q", str(ref.path), str(good), "--row-group-size", "5"]) == 0
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, message in [(text, "not a readable Arrow IPC"), (fifo, "a FIFO"), (cut, "")]:
        with pytest.raises(fgs.ConversionError) as e:
            fgs.from_ipc(path, out, progress=False)
        assert str(path) in str(e.value) and message in str(e.value), str(e.value)
        _nothing_at(out)


# -- one T for every row: stored fixed ---------------------------------------------------------------------
def test_duckdb_parquet_of_an_export_imports_fixed(tmp_path, data):
    require("pyarrow", "pyarrow", 'pip install "finegym-store[arrow]"')
    duckdb = require("duckdb", "duckdb", "pip install duckdb")
    import pyarrow.parquet as pq

    _, _, _, _, ref = data
    ref.to_parquet(tmp_path / "e.parquet")
    duck = tmp_path / "duck.parquet"
    con = duckdb.connect()
    con.execute(f"COPY (SELECT id, label, x FROM read_parquet('{tmp_path / 'e.parquet'}')) TO '{duck}' "
                "(FORMAT parquet)")
    t = pq.read_schema(duck).field("x").type
    assert not (hasattr(t, "list_size") or hasattr(t.value_type, "list_size"))  # T and C not in the type
    store = fgs.from_parquet(duck, tmp_path / "d.fgs", progress=False)
    assert store.column("x").shape == (N, 12, 8) and not store.column("x").ragged
    assert np.array_equal(np.asarray(store.column("x").values), np.asarray(ref.column("x").values))
    # The same through the command line.
    assert main(["import", "-q", str(duck), str(tmp_path / "cli.fgs")]) == 0
    assert fgs.open(tmp_path / "cli.fgs").column("x").shape == (N, 12, 8)


def test_varying_lengths_stay_ragged_and_streams_are_detected(tmp_path):
    pa = require("pyarrow", "pyarrow", 'pip install "finegym-store[arrow]"')
    rows = [[[1.0, 2.0]] * 3, [[3.0, 4.0]] * 3]
    same = pa.table({"id": ["a", "b"], "x": pa.array(rows, pa.list_(pa.list_(pa.float32())))})
    reader = pa.RecordBatchReader.from_batches(same.schema, same.to_batches(max_chunksize=1))
    assert fgs.from_arrow(reader, tmp_path / "s.fgs", progress=False).column("x").shape == (2, 3, 2)
    varied = pa.table({"id": ["a", "b"], "x": pa.array([rows[0], rows[1][:2]], pa.list_(pa.list_(pa.float32())))})
    col = fgs.from_arrow(varied, tmp_path / "v.fgs", progress=False).column("x")
    assert col.ragged and col.values.shape == (5, 2)


def _ragged_store(path: Path, lengths: list[int]) -> fgs.Store:
    with StoreWriter.create(str(path), len(lengths), overwrite=False) as w:
        c = w.column("x", np.dtype(np.float32), None, 4)
        c.append(np.ones((sum(lengths), 4), np.float32))
        c.close(np.asarray(lengths))
        w.finish([f"i{k}" for k in range(len(lengths))], None, None, {})
    return fgs.open(path)


def test_ragged_gather_error_suggests_length_when_t_is_one(tmp_path):
    store = _ragged_store(tmp_path / "r.fgs", [12, 12, 12])
    with pytest.raises(ValueError, match=r"every instance has T = 12: pass num_segments=K, or import it again "
                                         r"with length=12 \(finegym-store import --length 12\)"):
        store.gather("x", [0, 1])
    with pytest.raises(ValueError, match="length=12"):
        fgs.Loader(store, "x", batch_size=2)
    varied = _ragged_store(tmp_path / "v.fgs", [12, 11, 12])
    with pytest.raises(ValueError, match=r"is ragged \(T varies\).*pass num_segments=K$"):
        varied.gather("x", [0, 1])
    assert varied.gather("x", [0, 1], num_segments=3, mode="test").shape == (2, 3, 4)


# -- the command line ---------------------------------------------------------------------------------------
def test_import_dispatches_by_path(tmp_path, data, capsys):
    ids, labels, table, split, ref = data
    folder = _npy_folder(tmp_path / "feats", table)
    assert main(["import", "-q", str(folder), str(tmp_path / "n.fgs"), "--column", "x", "--split", str(split)]) == 0
    _same(fgs.open(tmp_path / "n.fgs"), ref)
    assert main(["import", "-q", str(folder), str(tmp_path / "d.fgs")]) == 0
    assert fgs.open(tmp_path / "d.fgs").columns == ("features",)
    if os.environ.get("CI") or _has("h5py"):
        import h5py

        with h5py.File(tmp_path / "f.h5", "w") as f:
            f["feat"] = np.stack([table[k] for k in ids])
            f["name"] = np.array(ids, dtype="S")
        assert main(["import", "-q", str(tmp_path / "f.h5"), str(tmp_path / "h.fgs"), "--column", "x",
                     "--split", str(split), "--h5-features", "feat"]) == 0
        _same(fgs.open(tmp_path / "h.fgs"), ref)
    if os.environ.get("CI") or _has("pyarrow"):
        assert main(["export", "-q", str(ref.path), str(tmp_path / "e.feather")]) == 0
        assert main(["import", "-q", str(tmp_path / "e.feather"), str(tmp_path / "i.fgs")]) == 0
        _same(fgs.open(tmp_path / "i.fgs"), ref)
    capsys.readouterr()

    (tmp_path / "notes.txt").write_text("x")
    cases = [
        ([str(tmp_path / "notes.txt")], "not a format import reads"),
        ([str(tmp_path / "ref.fgs")], "not a format import reads"),
        ([str(tmp_path / "nothing")], "no such file or folder"),
        ([str(folder), "--length", "12"], "--length is for Parquet and Arrow IPC"),
        ([str(folder), "--column", "a", "b"], "give it one name"),
        ([str(folder), "--split", str(tmp_path / "none.txt")], "--split: no such file"),
        ([str(tmp_path / "e.parquet"), "--split", str(split)], "--split is for .npy folders and HDF5"),
    ]
    for argv, message in cases:
        assert main(["import", "-q", argv[0], str(tmp_path / "x.fgs"), *argv[1:]]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
    assert main(["import", "-q", str(tmp_path / "notes.txt"), str(tmp_path / "o.fgs")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "notes.txt") in err and ".parquet" in err and ".arrow" in err and ".npy" in err \
        and ".h5" in err, err


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
