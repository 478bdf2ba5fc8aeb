"""Each client library hands a store's data to ``from_arrow`` in its own
object (Polars DataFrame / LazyFrame, DuckDB relation, Hugging Face Dataset,
an ``__arrow_c_array__`` struct array) and reads the store's exports back
with its own reader; every check uses the real client."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs

from arrow_fixtures import RC, C, T, make_store, require

pa = require("pyarrow")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> fgs.Store:
    return make_store(tmp_path_factory.mktemp("clients"))


@pytest.fixture(scope="module")
def store16(tmp_path_factory: pytest.TempPathFactory) -> fgs.Store:
    return make_store(tmp_path_factory.mktemp("clients16"), "float16")


def assert_imported(src: fgs.Store, got: fgs.Store) -> None:
    """Same ids, labels and feature columns (dtype, T, C, fixed or ragged, bytes)."""
    assert got.ids.to_list() == src.ids.to_list()
    np.testing.assert_array_equal(got.labels, src.labels)
    assert got.columns == src.columns
    for c in src.columns:
        a, b = src.column(c), got.column(c)
        assert (b.dtype, b.length, b.channels, b.ragged) == (a.dtype, a.length, a.channels, a.ragged), c
        assert b.values.tobytes() == a.values.tobytes(), c
        if a.ragged:
            np.testing.assert_array_equal(b.offsets, a.offsets)


# -- imports: what clients hand over ---------------------------------------------------
def test_from_polars_dataframe_and_lazyframe(store: fgs.Store, tmp_path: Path) -> None:
    pl = require("polars")
    df = pl.from_arrow(store.to_arrow())
    assert df.schema["a"] == pl.Array(pl.Float32, (T, C))
    got = fgs.from_arrow(df, tmp_path / "df.fgs", progress=False)
    assert_imported(store, got)
    assert not got.column("a").ragged and got.column("a").shape == (len(store), T, C)
    lazy = df.lazy().filter(pl.col("label") >= -1)   # a query, run by from_arrow
    assert isinstance(lazy, pl.LazyFrame)
    assert_imported(store, fgs.from_arrow(lazy, tmp_path / "lazy.fgs", progress=False))


def test_from_duckdb_relation_keeps_fixed_arrays(store: fgs.Store, tmp_path: Path) -> None:
    duckdb = require("duckdb")
    con = duckdb.connect()
    con.register("t", store.to_arrow())
    rel = con.sql("select * from t")
    types = dict(zip(rel.columns, map(str, rel.types)))
    assert types["a"] == f"FLOAT[{C}][{T}]"       # DuckDB's fixed-size ARRAY type
    assert types["r"] == f"FLOAT[{RC}][]"
    got = fgs.from_arrow(rel, tmp_path / "d.fgs", progress=False)
    assert_imported(store, got)
    # An ARRAY column DuckDB builds itself is stored fixed-T too.
    rel = con.sql(f"select id, label, a::FLOAT[{C}][{T}] as x from t")
    x = fgs.from_arrow(rel, tmp_path / "x.fgs", progress=False).column("x")
    assert not x.ragged and x.shape == (len(store), T, C)
    assert x.values.tobytes() == store.column("a").values.tobytes()


def test_from_hf_dataset(store: fgs.Store, tmp_path: Path) -> None:
    datasets = require("datasets")
    ds = datasets.Dataset(store.to_arrow())
    got = fgs.from_arrow(ds, tmp_path / "hf.fgs", progress=False)
    assert_imported(store, got)
    # With an indices mapping (select, shuffle): the Dataset's rows, in its order.
    order = np.arange(len(store))[::-1]
    sub = fgs.from_arrow(ds.select(order), tmp_path / "sel.fgs", progress=False)
    assert sub.ids.to_list() == store.ids.to_list()[::-1]
    np.testing.assert_array_equal(sub.column("a").values, store.column("a").values[::-1])


def test_from_arrow_c_array(store: fgs.Store, tmp_path: Path) -> None:
    batch = pa.Table.from_batches(store.to_batches()).combine_chunks().to_batches()[0]

    class Handover:  # only the PyCapsule array protocol, as nanoarrow and arro3 objects offer
        def __arrow_c_array__(self, requested_schema=None):
            return batch.__arrow_c_array__(requested_schema)

    assert not hasattr(Handover(), "__arrow_c_stream__")
    assert_imported(store, fgs.from_arrow(Handover(), tmp_path / "c.fgs", progress=False))
    arr = pa.array([1.0, 2.0])

    class NotABatch:
        def __arrow_c_array__(self, requested_schema=None):
            return arr.__arrow_c_array__(requested_schema)

    with pytest.raises(fgs.ConversionError, match="NotABatch array is not a record batch"):
        fgs.from_arrow(NotABatch(), tmp_path / "n.fgs", progress=False)
    assert not (tmp_path / "n.fgs").exists()


# -- exports: what each client reads (docs/arrow.md, "Which call for which client") ------------------
def _flat(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The values of a nested feature column (fixed or ragged), flattened."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.flatten().flatten().to_numpy()


def assert_features(src: fgs.Store, table: pa.Table, dtype: str | None = None) -> None:
    """``table`` (read back by a client) holds the store's ids and features,
    upcast to float32 when ``dtype`` says so, bit-exact."""
    assert table.column("id").to_pylist() == src.ids.to_list()
    for c in ("a", "r"):
        want = src.column(c).values.ravel()
        got = _flat(table.column(c))
        assert got.dtype == (np.float32 if dtype == "float32" else want.dtype), c
        assert got.tobytes() == want.astype(got.dtype).tobytes(), c


@pytest.mark.parametrize("which", ["store", "store16"])
def test_pyarrow_reads_table_stream_and_parquet(which: str, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    s = request.getfixturevalue(which)
    assert_features(s, s.to_arrow())
    assert_features(s, pa.table(s))                                    # the PyCapsule stream
    assert_features(s, pq.read_table(s.to_parquet(tmp_path / "s.parquet")))
    up = s.to_arrow(["id", "a", "r"], dtype="float32")
    assert_features(s, up, "float32")
    assert_features(s, pq.read_table(s.to_parquet(tmp_path / "u.parquet", dtype="float32")), "float32")
    assert_features(s, pa.Table.from_batches(s.to_batches(batch_size=8, dtype="float32")), "float32")
    with pytest.raises(ValueError, match="dtype must be one of None, 'float32', got 'float64'"):
        s.to_batches(dtype="float64")


def test_duckdb_scans_float32_batches(store16: fgs.Store, tmp_path: Path) -> None:
    duckdb = require("duckdb")
    half = store16.to_batches(["id", "a", "r"])  # noqa: F841 - scanned by name below
    with pytest.raises(duckdb.NotImplementedException):   # DuckDB's Arrow scan has no half floats
        duckdb.sql("select a from half").fetchall()
    batches = store16.to_batches(["id", "a", "r"], dtype="float32")  # noqa: F841
    rel = duckdb.sql("select id, a, r from batches")
    assert list(map(str, rel.types)) == ["VARCHAR", "FLOAT[6][5]", "FLOAT[4][]"]
    assert_features(store16, rel.to_arrow_table(), "float32")
    # Its Parquet reader reads FLOAT16 columns as FLOAT itself.
    path = store16.to_parquet(tmp_path / "h.parquet", ["id", "a", "r"])
    assert_features(store16, duckdb.sql(f"select id, a, r from read_parquet('{path}')").to_arrow_table(),
                    "float32")


@pytest.mark.parametrize("which", ["store", "store16"])
def test_polars_reads_the_stream_and_parquet(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pl = require("polars")
    s = request.getfixturevalue(which)
    df = pl.DataFrame(s)
    assert df.schema["a"] == pl.Array(pl.Float16 if s.column("a").dtype == np.float16 else pl.Float32, (T, C))
    np.testing.assert_array_equal(df["a"].to_numpy(), s.column("a").values)
    assert_features(s, df.select("id", "a", "r").to_arrow())
    assert_features(s, pl.read_parquet(s.to_parquet(tmp_path / "s.parquet")).to_arrow())


def test_pandas_reads_to_arrow(store16: fgs.Store) -> None:
    require("pandas")
    df = store16.to_arrow(["id", "label", "a"]).to_pandas()
    assert df["id"].tolist() == store16.ids.to_list()
    np.testing.assert_array_equal(df["label"].to_numpy(), store16.labels)
    a = np.stack([np.stack(list(row)) for row in df["a"]])   # object column of (T,) arrays of (C,) rows
    assert a.dtype == np.float16 and a.tobytes() == store16.column("a").values.tobytes()


def test_hf_dataset_over_to_arrow(store16: fgs.Store, tmp_path: Path) -> None:
    datasets = require("datasets")
    ds = datasets.Dataset(store16.to_arrow(["id", "label", "a", "r"]))
    assert ds.num_rows == len(store16)
    got = ds.with_format("numpy")[:]
    # Its numpy format gives float16 columns as float32: the stored values, upcast exactly.
    assert got["a"].dtype == np.float32
    assert got["a"].tobytes() == store16.column("a").values.astype(np.float32).tobytes()
    assert_features(store16, ds.with_format("arrow")[:])
    assert_features(store16, datasets.Dataset.from_parquet(
        str(store16.to_parquet(tmp_path / "s.parquet", ["id", "a", "r"])),
        cache_dir=str(tmp_path / "hf-cache")).data.table)


_LANCE = """
import sys
import lance
import pyarrow as pa
import finegym_store as fgs

store, folder = fgs.open(sys.argv[1]), sys.argv[2]
lance.write_dataset(store.to_batches(["id", "label", "a", "r"], batch_size=8), folder + "/s.lance")
lance.write_dataset(store.to_batches(["id", "a", "r"], dtype="float32"), folder + "/u.lance")
for name in ("s", "u"):
    table = lance.dataset(f"{folder}/{name}.lance").to_table()
    with pa.ipc.new_file(f"{folder}/{name}.arrow", table.schema) as w:
        w.write_table(table)
"""


def test_lance_writes_the_batches(store16: fgs.Store, tmp_path: Path) -> None:
    # In a child process: importing lance installs an at-fork warning that
    # would fail every later test that forks.
    if importlib.util.find_spec("lance") is None:
        require("lance", "pylance", 'pip install ".[test]"')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # cwd: not the repository, whose finegym_store/ sources `python -c` would put first on the path.
    done = subprocess.run([sys.executable, "-c", _LANCE, store16.path, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert_features(store16, pa.ipc.open_file(str(tmp_path / "s.arrow")).read_all())
    assert_features(store16, pa.ipc.open_file(str(tmp_path / "u.arrow")).read_all(), "float32")


def test_cli_export_dtype_float32(store16: fgs.Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    from finegym_store.cli import main

    for out in (tmp_path / "u.parquet", tmp_path / "u.arrow"):
        assert main(["export", store16.path, str(out), "--dtype", "float32", "-q"]) in (0, None)
        t = pq.read_table(out) if out.suffix == ".parquet" else pa.ipc.open_file(str(out)).read_all()
        assert_features(store16, t, "float32")
        # The metadata keeps the stored dtype: importing the export rebuilds the float16 store.
        assert_imported(store16, fgs.from_arrow(t, tmp_path / f"{out.stem}{out.suffix}.fgs", progress=False))
    assert "wrote" in capsys.readouterr().out
