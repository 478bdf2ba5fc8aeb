"""Arrow export (zero-copy tables, batches, the PyCapsule stream) and
from_arrow ingest, checked against pyarrow, Polars and DuckDB themselves."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store.finegym import parse_element_id, read_categories

from arrow_fixtures import CATEGORIES, RC, C, N, T, assert_same_store, make_store, require

pa = require("pyarrow")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> fgs.Store:
    return make_store(tmp_path_factory.mktemp("arrow"))


@pytest.fixture(scope="module")
def store16(tmp_path_factory: pytest.TempPathFactory) -> fgs.Store:
    return make_store(tmp_path_factory.mktemp("arrow16"), "float16")


def _ragged_rows(arr: pa.Array) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float32) for v in arr.to_pylist()]


# -- export ---------------------------------------------------------------------
def test_table_types_values_and_metadata(store: fgs.Store) -> None:
    t = store.to_arrow()
    t.validate(full=True)
    assert t.column_names == ["id", "label", "video", "event_start", "event_end", "element_start", "element_end",
                              "a", "r", "b"]
    assert t.schema.field("id").type == pa.large_utf8()
    assert t.schema.field("label").type == pa.int32()
    assert t.schema.field("a").type == pa.list_(pa.list_(pa.float32(), C), T)
    assert t.schema.field("b").type == pa.list_(pa.list_(pa.float32(), 3), 1)
    assert t.schema.field("r").type == pa.large_list(pa.list_(pa.float32(), RC))
    # Values, derived through pyarrow's own conversions.
    assert t.column("id").to_pylist() == store.ids.to_list()
    np.testing.assert_array_equal(t.column("label").to_numpy(), store.labels)
    parsed = [parse_element_id(k) for k in store.ids]
    assert t.column("video").to_pylist() == [p.video for p in parsed]
    assert t.column("element_end").to_pylist() == [p.element_end for p in parsed]
    np.testing.assert_array_equal(np.asarray(t.column("a").to_pylist(), np.float32), store.column("a").values)
    for i, rows in enumerate(_ragged_rows(t.column("r").combine_chunks())):
        np.testing.assert_array_equal(rows, store.features("r", i))
    doc = json.loads(t.schema.metadata[b"finegym_store"])
    assert doc["format_version"] == fgs.FORMAT_VERSION
    assert doc["columns"] == {"a": {"dtype": "float32", "length": T, "channels": C},
                              "r": {"dtype": "float32", "length": None, "channels": RC},
                              "b": {"dtype": "float32", "length": 1, "channels": 3}}
    cats = read_categories(CATEGORIES)
    assert doc["classes"]["name"] == cats.name and doc["classes"]["label"] == cats.label.tolist()
    assert doc["attrs"]["columns"]["a"]["source_dtypes"] == ["float64"]  # provenance of the store


def test_float16_is_arrow_halffloat(store16: fgs.Store) -> None:
    t = store16.to_arrow(["a"])
    t.validate(full=True)
    assert t.schema.field("a").type == pa.list_(pa.list_(pa.float16(), C), T)
    flat = t.column("a").combine_chunks().flatten().flatten().to_numpy()
    assert flat.dtype == np.float16
    np.testing.assert_array_equal(flat.reshape(N, T, C), store16.column("a").values)


def _mapping_range(store: fgs.Store) -> tuple[int, int]:
    """[start, end) addresses of the file mapping, from the reader's own views."""
    view = store.column("a").values
    offset = next(s["offset"] for s in store.sections() if s["name"] == "features/a")
    start = view.ctypes.data - offset
    return start, start + store.file_size


def test_zero_copy_buffers_are_the_mapping(store: fgs.Store) -> None:
    t = store.to_arrow()
    lo, hi = _mapping_range(store)
    a = t.column("a").chunk(0)
    values = a.values.values
    assert values.buffers()[1].address == store.column("a").values.ctypes.data
    r = t.column("r").chunk(0)
    assert r.buffers()[1].address == store.column("r").offsets.ctypes.data   # int64 offsets
    assert r.values.values.buffers()[1].address == store.column("r").values.ctypes.data
    ids = t.column("id").chunk(0)
    assert ids.buffers()[1].address == store.ids.offsets.ctypes.data
    assert ids.buffers()[2].address == store.ids.data.ctypes.data
    # int64 offsets are the reader's own copy, validated once at open (so a
    # file rewritten in place cannot hand Arrow out-of-range offsets): shared,
    # not copied per export. Every other buffer is the mapping itself.
    validated = {
        store.ids.offsets.ctypes.data: store.ids.offsets.nbytes,
        store.meta.video.offsets.ctypes.data: store.meta.video.offsets.nbytes,
        store.column("r").offsets.ctypes.data: store.column("r").offsets.nbytes,
    }
    assert all(not (lo <= address < hi) for address in validated)
    again = store.to_arrow()
    assert again.column("r").chunk(0).buffers()[1].address == r.buffers()[1].address
    for col in t.columns:
        for chunk in col.chunks:
            for arr in (chunk, getattr(chunk, "values", None), getattr(getattr(chunk, "values", None), "values", None)):
                if arr is None:
                    continue
                for buf in arr.buffers():
                    if buf is not None and buf.size:
                        in_mapping = lo <= buf.address and buf.address + buf.size <= hi
                        assert in_mapping or validated.get(buf.address) == buf.size


def test_table_outlives_the_store(tmp_path: Path) -> None:
    s = make_store(tmp_path)
    expected = s.column("a").values.copy()
    ragged = s.features("r", 3).copy()
    t = s.to_arrow()
    classes = s.classes_table()
    del s
    gc.collect()
    np.testing.assert_array_equal(np.asarray(t.column("a").to_pylist(), np.float32), expected)
    np.testing.assert_array_equal(np.asarray(t.column("r")[3].as_py(), np.float32), ragged)
    assert classes.num_rows == len(read_categories(CATEGORIES))
    t.validate(full=True)


def test_fixed_shape_tensor(store: fgs.Store) -> None:
    t = store.to_arrow(["id", "a", "r"], tensor_type="fixed_shape_tensor")
    t.validate(full=True)
    ty = t.schema.field("a").type
    assert ty.extension_name == "arrow.fixed_shape_tensor" and list(ty.shape) == [T, C]
    nd = t.column("a").combine_chunks().to_numpy_ndarray()
    assert nd.shape == (N, T, C)
    np.testing.assert_array_equal(nd, store.column("a").values)
    assert pa.types.is_large_list(t.schema.field("r").type)  # ragged stays a list


def test_columns_selection_and_errors(store: fgs.Store) -> None:
    assert store.to_arrow(["a", "id"]).column_names == ["a", "id"]
    assert store.to_arrow("label").column_names == ["label"]
    with pytest.raises(KeyError, match="'nope'"):
        store.to_arrow(["id", "nope"])
    with pytest.raises(ValueError, match="tensor_type"):
        store.to_arrow(tensor_type="tensor")
    with pytest.raises(ValueError, match="batch_size"):
        store.to_batches(batch_size=0)


def test_to_batches(store: fgs.Store) -> None:
    reader = store.to_batches(batch_size=10, columns=["id", "r"])
    assert isinstance(reader, pa.RecordBatchReader)
    batches = list(reader)
    assert [b.num_rows for b in batches] == [10, 10, 10, 7]
    whole = pa.Table.from_batches(batches)
    whole.validate(full=True)
    assert whole.equals(store.to_arrow(["id", "r"]))
    assert store.to_batches().read_all().num_rows == N


def test_classes_table(store: fgs.Store, tmp_path: Path) -> None:
    from conftest import synthetic_store

    t = store.classes_table()
    t.validate(full=True)
    cats = read_categories(CATEGORIES)
    assert t.column_names == ["label", "glabel", "set", "event", "name"]
    assert t.column("name").to_pylist() == cats.name
    assert t.column("event").to_pylist() == cats.event
    np.testing.assert_array_equal(t.column("glabel").to_numpy(), cats.glabel)
    assert synthetic_store(tmp_path, 5, 2).classes_table() is None


# -- the PyCapsule stream in real clients -----------------------------------------
def test_pyarrow_from_stream(store: fgs.Store) -> None:
    t = pa.RecordBatchReader.from_stream(store).read_all()
    t.validate(full=True)
    # The stream hands out guarded copies, never buffers inside the mapping
    # (a file truncated under them would be a SIGBUS in the consumer).
    lo, hi = _mapping_range(store)
    for name in t.column_names:
        for chunk in t.column(name).chunks:
            arrays = [chunk]
            while arrays:
                a = arrays.pop()
                a = a.storage if isinstance(a, pa.ExtensionArray) else a
                for buf in a.buffers():
                    if buf is not None and buf.size:
                        assert not lo <= buf.address < hi, name
                if hasattr(a, "values"):
                    arrays.append(a.values)
    assert t.equals(store.to_arrow())
    assert pa.schema(store).equals(store.to_arrow().schema)  # __arrow_c_schema__


def test_polars_reads_the_store(store: fgs.Store) -> None:
    pl = require("polars")
    df = pl.DataFrame(store)
    assert df.height == N
    assert df["id"].to_list() == store.ids.to_list()
    np.testing.assert_array_equal(df["label"].to_numpy(), store.labels)
    a = df["a"].to_numpy()
    assert a.shape == (N, T, C)
    np.testing.assert_array_equal(a, store.column("a").values)
    r = df["r"].to_list()
    for i in (0, 5, N - 1):
        np.testing.assert_array_equal(np.asarray(r[i], np.float32), store.features("r", i))


def test_duckdb_reads_the_store(store: fgs.Store) -> None:
    duckdb = require("duckdb")
    store_var = store  # noqa: F841 - DuckDB finds it by name (replacement scan)
    got = duckdb.sql("select label, count(*) from store_var group by label order by label").fetchall()
    labels, counts = np.unique(store.labels, return_counts=True)
    assert got == list(zip(labels.tolist(), counts.tolist()))
    types = dict(zip(duckdb.sql("select * from store_var").columns, duckdb.sql("select * from store_var").types))
    assert str(types["a"]) == f"FLOAT[{C}][{T}]"
    # DuckDB arrays are 1-based: a[t + 1][c + 1] is values[:, t, c].
    s = duckdb.sql("select sum(a[2][3]), max(a[5][1]), sum(len(r)) from store_var").fetchall()[0]
    v = store.column("a").values.astype(np.float64)
    assert s[0] == pytest.approx(v[:, 1, 2].sum(), rel=1e-6)
    assert s[1] == pytest.approx(v[:, 4, 0].max())
    assert s[2] == int(store.column("r").lengths().sum())


# -- from_arrow ---------------------------------------------------------------------
def _no_leftovers(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


def test_from_arrow_table_roundtrip(store: fgs.Store, store16: fgs.Store, tmp_path: Path) -> None:
    for src in (store, store16):
        out = tmp_path / f"t{src.column('a').dtype}.fgs"
        assert_same_store(src, fgs.from_arrow(src.to_arrow(), out, progress=False))
        assert_same_store(src, fgs.from_arrow(src.to_arrow(tensor_type="fixed_shape_tensor"), out,
                                              overwrite=True, progress=False))
    _no_leftovers(tmp_path, {"tfloat32.fgs", "tfloat16.fgs"})


def test_from_arrow_streams(store: fgs.Store, tmp_path: Path) -> None:
    # One feature column: one pass. Several: spilled beside the output, then removed.
    one = fgs.from_arrow(store.to_batches(batch_size=8, columns=["id", "label", "r"]), tmp_path / "one.fgs",
                         progress=False)
    assert one.columns == ("r",)
    assert one.column("r").values.tobytes() == store.column("r").values.tobytes()
    assert one.ids.to_list() == store.ids.to_list()
    assert one.classes is not None  # hierarchy from the stream's schema metadata
    assert_same_store(store, fgs.from_arrow(store.to_batches(batch_size=8), tmp_path / "all.fgs", progress=False))
    assert_same_store(store, fgs.from_arrow(store, tmp_path / "capsule.fgs", progress=False))
    _no_leftovers(tmp_path, {"one.fgs", "all.fgs", "capsule.fgs"})


def test_stream_import_keeps_no_named_temporary_files(store: fgs.Store, tmp_path: Path) -> None:
    # The spill file and the staged rows are unlinked as soon as they are
    # created: at every point of the import, a kill would leave nothing behind.
    for columns in (None, ["id", "label", "r"]):  # spilled (several columns) and staged (one)
        source = store.to_batches(batch_size=8, columns=columns)
        seen: list[set[str]] = []

        def batches():
            for b in source:
                seen.append({p.name for p in tmp_path.iterdir()})
                yield b

        out = tmp_path / f"s{len(columns or [])}.fgs"
        before = {p.name for p in tmp_path.iterdir()}
        reader = pa.RecordBatchReader.from_batches(source.schema, batches())
        got = fgs.from_arrow(reader, out, progress=False)
        if columns is None:
            assert_same_store(store, got)
        else:
            assert got.column("r").values.tobytes() == store.column("r").values.tobytes()
        assert seen and all(names == before for names in seen)


def test_polars_built_table_imports(tmp_path: Path) -> None:
    pl = require("polars")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    df = pl.DataFrame({"name": [f"v{i}" for i in range(6)], "y": [0, 1, 2, 0, 1, None]})
    df = df.with_columns(pl.Series("feat", x))            # Array(Float32, (3, 4))
    df = df.with_columns(pl.Series("flat", [row.ravel().tolist() for row in x]))  # List(Float64)
    s = fgs.from_arrow(df, tmp_path / "p.fgs", id_column="name", label_column="y",
                       length={"flat": 3}, channels={"flat": 4}, progress=False)
    assert s.ids.to_list() == [f"v{i}" for i in range(6)]
    np.testing.assert_array_equal(s.labels, [0, 1, 2, 0, 1, -1])
    np.testing.assert_array_equal(s.column("feat").values, x)
    np.testing.assert_array_equal(s.column("flat").values, x)   # float64 source -> float32
    assert s.column("flat").shape == (6, 3, 4)


def test_duckdb_built_table_imports(tmp_path: Path) -> None:
    duckdb = require("duckdb")
    rel = duckdb.sql(
        "select 'x' || i::varchar as id, (i % 3)::integer as label, "
        "[[i::float, (i * 10)::float]] || [[(-i)::float, 0.5::float] for j in range(i % 2)] as f "
        "from range(1, 8) t(i) order by i"
    )
    s = fgs.from_arrow(rel, tmp_path / "d.fgs", progress=False)
    assert s.column("f").ragged and s.column("f").channels == 2
    for k, i in enumerate(range(1, 8)):
        want = [[i, i * 10]] + [[-i, 0.5]] * (i % 2)
        np.testing.assert_array_equal(s.features("f", k), np.asarray(want, np.float32))
    np.testing.assert_array_equal(s.labels, [i % 3 for i in range(1, 8)])


def test_plain_list_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    lens = [1, 3, 2, 1]
    rows = [rng.standard_normal((n, 3)).astype(np.float32) for n in lens]
    t = pa.table({
        "id": ["a", "b", "c", "d"],
        "fixed": pa.array([r.ravel() for r in x], pa.list_(pa.float32(), 6)),
        "lst": pa.array([r.ravel() for r in x], pa.list_(pa.float32())),
        "big": pa.array([r.ravel() for r in rows], pa.large_list(pa.float32())),
        "vec": pa.array([r[0] for r in x], pa.list_(pa.float32(), 3)),
    })
    s = fgs.from_arrow(t, tmp_path / "l.fgs", length={"fixed": 2, "lst": 2}, channels={"lst": 3, "big": 3},
                       progress=False)
    for c in ("fixed", "lst"):
        assert s.column(c).shape == (4, 2, 3)
        np.testing.assert_array_equal(s.column(c).values, x)
    assert s.column("big").ragged
    np.testing.assert_array_equal(s.column("big").lengths(), lens)
    for i in range(4):
        np.testing.assert_array_equal(s.features("big", i), rows[i])
    assert s.column("vec").shape == (4, 1, 3)   # (C,) is T = 1, as in convert
    np.testing.assert_array_equal(s.labels, -1)


# -- bad input ------------------------------------------------------------------------
def _bad_tables() -> list[tuple[str, pa.Table, dict, str]]:
    f = pa.list_(pa.list_(pa.float32(), 2), 2)
    good = [[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[0, 0], [1, 1]]]
    feats = pa.array(good, f)
    return [
        ("missing id", pa.table({"key": ["a", "b", "c"], "x": feats}), {}, r"no id column 'id'"),
        ("null id", pa.table({"id": ["a", None, "c"], "x": feats}), {}, r"column 'id': row 1: the id is null"),
        ("duplicate id", pa.table({"id": ["a", "b", "a"], "x": feats}), {}, r"column 'id': row 2: id 'a' is a dup"),
        ("not float", pa.table({"id": ["a", "b", "c"], "x": pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.int32()))}),
         {"channels": 2}, r"column 'x'.*floating-point"),
        ("scalar feature", pa.table({"id": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]}), {"feature_columns": ["x"]},
         r"column 'x': expected a list"),
        ("not a multiple of C", pa.table({"id": ["a", "b", "c"],
                                          "x": pa.array([[1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0]])}),
         {"channels": 2}, r"column 'x': row 1: 3 values are not a whole number of rows of C = 2"),
        ("mismatched T", pa.table({"id": ["a", "b", "c"],
                                   "x": pa.array([[[1, 2]], [[1, 2]], [[1, 2], [3, 4]]], pa.list_(pa.list_(pa.float32(), 2)))}),
         {"length": 1}, r"column 'x': row 2: T = 2 rows where the column has fixed T = 1"),
        ("inner row of wrong C", pa.table({"id": ["a", "b", "c"],
                                           "x": pa.array([[[1.0, 2.0]], [[1.0, 2.0], [3.0]], [[1.0, 2.0]]])}),
         {}, r"column 'x': row 1: a row of 1 values where every row must hold C = 2"),
        ("null feature value", pa.table({"id": ["a", "b", "c"],
                                         "x": pa.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[0, None], [1, 1]]], f)}),
         {}, r"column 'x': row 2: a feature value is null"),
        ("unknown column", pa.table({"id": ["a", "b", "c"], "x": feats}), {"feature_columns": ["x", "y"]},
         r"no column 'y'"),
        ("unknown label column", pa.table({"id": ["a", "b", "c"], "x": feats}), {"label_column": "cls"},
         r"no label column 'cls'"),
        ("flat list without C", pa.table({"id": ["a", "b", "c"], "x": pa.array([[1.0], [2.0], [3.0]])}), {},
         r"column 'x': .*needs channels=C"),
    ]


@pytest.mark.parametrize("case", _bad_tables(), ids=lambda c: c[0])
def test_bad_input_raises_before_writing(case: tuple, tmp_path: Path) -> None:
    _, table, kwargs, message = case
    out = tmp_path / "bad.fgs"
    with pytest.raises(fgs.ConversionError, match=message):
        fgs.from_arrow(table, out, progress=False, **kwargs)
    _no_leftovers(tmp_path, set())
    # The same through a one-shot stream with a second (spilled) feature column.
    if "x" in table.column_names and "id" in table.column_names and not kwargs:
        stream = table.append_column("z", table.column("x")).to_reader(max_chunksize=1)
        with pytest.raises(fgs.ConversionError, match=message):
            fgs.from_arrow(stream, out, progress=False)
        _no_leftovers(tmp_path, set())


def test_existing_target_is_kept(store: fgs.Store, tmp_path: Path) -> None:
    out = tmp_path / "x.fgs"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        fgs.from_arrow(store.to_arrow(), out, progress=False)
    assert out.read_bytes() == b"keep"
    bad = pa.table({"id": ["a", "a"], "x": pa.array([[1.0], [2.0]], pa.list_(pa.float32(), 1))})
    with pytest.raises(fgs.ConversionError, match="duplicate"):
        fgs.from_arrow(bad, out, overwrite=True, progress=False)
    assert out.read_bytes() == b"keep"


def test_bad_length_or_channels(tmp_path: Path) -> None:
    t = pa.table({"id": ["a"], "x": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))})
    with pytest.raises(ValueError, match="column 'x': channels must be a positive integer, got 0"):
        fgs.from_arrow(t, tmp_path / "x.fgs", channels=0, progress=False)
    with pytest.raises(fgs.ConversionError, match="column 'x': 2 values per instance are not a multiple of length=3"):
        fgs.from_arrow(t.set_column(1, "x", pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))), tmp_path / "x.fgs",
                       length=3, progress=False)
    assert not (tmp_path / "x.fgs").exists()


def test_wrong_source_type(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="from_arrow: expected a pyarrow Table"):
        fgs.from_arrow({"id": ["a"]}, tmp_path / "x.fgs")


def test_hierarchy_from_classes_or_categories(store: fgs.Store, tmp_path: Path) -> None:
    bare = store.to_arrow(["id", "label", "a"]).replace_schema_metadata(None)
    assert fgs.from_arrow(bare, tmp_path / "none.fgs", progress=False).classes is None
    for kwargs in ({"classes": store.classes_table()}, {"categories": CATEGORIES}):
        s = fgs.from_arrow(bare, tmp_path / "h.fgs", overwrite=True, progress=False, **kwargs)
        assert s.classes_table().equals(store.classes_table())
        assert s.label_names == store.label_names
    few = store.classes_table().slice(0, 1)
    with pytest.raises(fgs.ConversionError, match=r"column 'label': labels \[.*\] have no class"):
        fgs.from_arrow(bare, tmp_path / "few.fgs", classes=few, progress=False)
    assert not (tmp_path / "few.fgs").exists()
