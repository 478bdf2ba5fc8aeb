"""Each client library hands a store's data to ``from_arrow`` in its own
object (Polars DataFrame / LazyFrame, DuckDB relation, Hugging Face Dataset,
an ``__arrow_c_array__`` struct array) and reads the store's exports back
with its own reader; every check uses the real client."""

from __future__ import annotations

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
