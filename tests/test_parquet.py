"""Parquet export/import: exact round trips, the file's encodings read back
from its own metadata, real clients (DuckDB, Polars, Hugging Face datasets),
folders of files, bad input, and the export/import commands."""

from __future__ import annotations

import math
from pathlib import Path

import os

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store.arrow import default_batch_rows
from finegym_store.cli import main

from arrow_fixtures import C, N, T, assert_same_store, make_store, require

pa = require("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


@pytest.fixture(scope="module", params=["float32", "float16"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> fgs.Store:
    return make_store(tmp_path_factory.mktemp("pq"), request.param)


@pytest.fixture(scope="module")
def parquet(store: fgs.Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pqfile") / "s.parquet"
    store.to_parquet(path, row_group_size=10)
    return path


def _chunks(path: Path, column: str) -> list:
    md = pq.ParquetFile(path).metadata
    out = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        out += [rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema.split(".")[0] == column]
    return out


def test_roundtrip_is_exact(store: fgs.Store, parquet: Path, tmp_path: Path) -> None:
    back = fgs.from_parquet(parquet, tmp_path / "back.fgs", progress=False)
    assert_same_store(store, back)
    assert back.attrs["imported_from"]["source"] == store.path  # provenance carried through
    t = pq.read_table(parquet)
    t.validate(full=True)
    assert t.equals(store.to_arrow())   # types and schema metadata survive Parquet


def test_row_groups_and_encodings(store: fgs.Store, parquet: Path) -> None:
    md = pq.ParquetFile(parquet).metadata
    assert md.num_row_groups == math.ceil(N / 10)
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [10, 10, 10, 7]
    for col in ("a", "r", "b"):
        for chunk in _chunks(parquet, col):
            assert not any("DICTIONARY" in e for e in chunk.encodings), chunk.encodings
            assert chunk.compression == "UNCOMPRESSED"
    # The default row group: about 128 MiB of features -> one group for this store.
    assert default_batch_rows(store) == 65536
    leaf = pq.ParquetFile(parquet).schema.column(
        next(i for i, c in enumerate(pq.ParquetFile(parquet).schema) if c.path.startswith("a.")))
    if store.column("a").dtype == np.float16:
        assert leaf.physical_type == "FIXED_LEN_BYTE_ARRAY" and str(leaf.logical_type) == "Float16"
    else:
        assert leaf.physical_type == "FLOAT"


def test_byte_stream_split_zstd(store: fgs.Store, parquet: Path, tmp_path: Path) -> None:
    path = Path(store.to_parquet(tmp_path / "z.parquet", compression="zstd", byte_stream_split=True))
    for col in ("a", "r", "b"):
        for chunk in _chunks(path, col):
            assert "BYTE_STREAM_SPLIT" in chunk.encodings and chunk.compression == "ZSTD"
    assert_same_store(store, fgs.from_parquet(path, tmp_path / "z.fgs", progress=False))
    with pytest.raises(ValueError, match="compression must be one of .*got .lzma."):
        store.to_parquet(tmp_path / "bad.parquet", compression="lzma")
    assert not (tmp_path / "bad.parquet").exists()


def test_column_subset_and_default_row_group(store: fgs.Store, tmp_path: Path) -> None:
    path = store.to_parquet(tmp_path / "sub.parquet", columns=["id", "label", "r"])
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    s = fgs.from_parquet(path, tmp_path / "sub.fgs", progress=False)
    assert s.columns == ("r",)
    assert s.column("r").values.tobytes() == store.column("r").values.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.fgs", "sub.parquet"]  # no temporary files left


def test_folder_of_files(store: fgs.Store, tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    t = store.to_arrow()
    pq.write_table(t.slice(0, 20), folder / "part-0.parquet")
    pq.write_table(t.slice(20), folder / "part-1.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    assert_same_store(store, fgs.from_parquet(folder, tmp_path / "ds.fgs", progress=False))
    pq.write_table(t.select(["id", "label"]), folder / "part-2.parquet")
    with pytest.raises(fgs.ConversionError, match="part-2.parquet: its schema differs"):
        fgs.from_parquet(folder, tmp_path / "ds2.fgs", progress=False)
    assert not (tmp_path / "ds2.fgs").exists()


def test_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(fgs.ConversionError, match="x.parquet: not a readable Parquet file"):
        fgs.from_parquet(tmp_path / "x.parquet", tmp_path / "x.fgs", progress=False)
    with pytest.raises(FileNotFoundError):
        fgs.from_parquet(tmp_path / "missing.parquet", tmp_path / "x.fgs", progress=False)
    assert not (tmp_path / "x.fgs").exists()


def test_bad_rows_in_parquet(tmp_path: Path) -> None:
    t = pa.table({"id": ["a", "b", "c", "d"], "label": pa.array([0, 1, 0, 1], pa.int32()),
                  "x": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0], [6.0, 7.0]], pa.large_list(pa.float32()))})
    pq.write_table(t, tmp_path / "bad.parquet", row_group_size=2)
    with pytest.raises(fgs.ConversionError, match=r"column 'x': row 2: 1 values are not a whole number"):
        fgs.from_parquet(tmp_path / "bad.parquet", tmp_path / "bad.fgs", channels=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]


# -- real clients read the exported Parquet ------------------------------------------
def test_duckdb_reads_parquet(store: fgs.Store, parquet: Path) -> None:
    duckdb = require("duckdb")
    got = duckdb.sql(f"select label, count(*) from '{parquet}' group by label order by label").fetchall()
    labels, counts = np.unique(store.labels, return_counts=True)
    assert got == list(zip(labels.tolist(), counts.tolist()))
    # DuckDB reads Parquet FLOAT16 as FLOAT (float32); lists are 1-based.
    rows = duckdb.sql(f"select a[4][2], len(r), r[1][3] from '{parquet}'").fetchall()
    v = store.column("a").values.astype(np.float32)
    np.testing.assert_array_equal(np.asarray([r[0] for r in rows], np.float32), v[:, 3, 1])
    np.testing.assert_array_equal([r[1] for r in rows], store.column("r").lengths())
    first = np.asarray([store.features("r", i)[0, 2] for i in range(N)], np.float32)
    np.testing.assert_array_equal(np.asarray([r[2] for r in rows], np.float32), first)
    assert duckdb.sql(f"select typeof(a) from '{parquet}' limit 1").fetchall()[0][0] == "FLOAT[][]"


def test_polars_reads_parquet(store: fgs.Store, parquet: Path) -> None:
    pl = require("polars")
    df = pl.read_parquet(parquet)
    assert df["id"].to_list() == store.ids.to_list()
    a = df["a"].to_numpy()
    assert a.shape == (N, T, C)
    assert a.dtype == store.column("a").dtype   # polars keeps float16 as Float16
    np.testing.assert_array_equal(a, store.column("a").values)
    counts = df.group_by("label").len().sort("label")
    labels, n = np.unique(store.labels, return_counts=True)
    assert counts["label"].to_list() == labels.tolist() and counts["len"].to_list() == n.tolist()


def test_hf_datasets_loads_parquet(store: fgs.Store, parquet: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    datasets = require("datasets")
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files=str(parquet), split="train", cache_dir=str(tmp_path / "hf"))
    got = ds.with_format("numpy")[:]
    assert got["a"].shape == (N, T, C)
    np.testing.assert_array_equal(got["a"], store.column("a").values)
    np.testing.assert_array_equal(got["label"], store.labels)
    assert list(got["id"]) == store.ids.to_list()
    # The canonical tensor extension is refused by datasets (documented).
    tensor = store.to_parquet(tmp_path / "t.parquet", columns=["id", "a"], tensor_type="fixed_shape_tensor")
    with pytest.raises(ValueError, match="fixed_shape_tensor"):
        datasets.load_dataset("parquet", data_files=tensor, split="train", cache_dir=str(tmp_path / "hf2"))


# -- command line -----------------------------------------------------------------------
def test_cli_export_import(store: fgs.Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.parquet"
    assert main(["export", store.path, str(out), "--compression", "zstd", "--byte-stream-split", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", store.path, str(out), "-q"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["import", str(out), str(tmp_path / "e.fgs"), "-q"]) == 0
    assert_same_store(store, fgs.open(tmp_path / "e.fgs"))
    ipc = tmp_path / "e.arrow"
    assert main(["export", store.path, str(ipc), "--columns", "id", "a", "-q"]) == 0
    with pa.memory_map(str(ipc)) as f:
        t = pa.ipc.open_file(f).read_all()
    t.validate(full=True)
    assert t.column_names == ["id", "a"] and t.equals(store.to_arrow(["id", "a"]))
    assert main(["export", store.path, str(tmp_path / "x.parquet"), "--columns", "nope", "-q"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.parquet"), str(tmp_path / "m.fgs"), "-q"]) == 2
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "m.fgs").exists()


def test_compression_none_means_uncompressed_as_in_pyarrow(tmp_path):
    store = make_store(tmp_path)
    a = store.to_parquet(tmp_path / "a.parquet", compression=None)
    b = store.to_parquet(tmp_path / "b.parquet", compression="none")
    assert pq.ParquetFile(a).metadata.row_group(0).column(0).compression == "UNCOMPRESSED"
    assert os.path.getsize(a) == os.path.getsize(b)
    with pytest.raises(ValueError, match="compression must be one of"):
        store.to_parquet(tmp_path / "c.parquet", compression="zip")
    with pytest.raises(TypeError, match="compression must be one of"):
        store.to_parquet(tmp_path / "c.parquet", compression=3)
    assert not (tmp_path / "c.parquet").exists()
