"""ImportOptions: one value for how from_arrow / from_parquet read a source."""

from __future__ import annotations

import json

import numpy as np
import pytest

import finegym_store as fgs
from arrow_fixtures import require

pa = require("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from finegym_store import ImportOptions  # noqa: E402


def _flat(n: int = 4, t: int = 3, c: int = 2) -> "pa.Table":
    values = np.arange(n * t * c, dtype=np.float32).reshape(n, t * c)
    return pa.table({"name": [f"v{i}" for i in range(n)], "y": pa.array(np.arange(n) % 2, pa.int64()),
                     "x": pa.array(list(values), pa.list_(pa.float32()))})


def test_options_object_and_keywords(tmp_path):
    opts = ImportOptions(id_column="name", label_column="y", length=3, channels=2, progress=False)
    s = fgs.from_arrow(_flat(), tmp_path / "a.fgs", opts)
    assert s.column("x").shape == (4, 3, 2) and list(s.labels) == [0, 1, 0, 1]
    # Keywords replace the object's fields; the object is unchanged.
    s16 = fgs.from_arrow(_flat(), tmp_path / "b.fgs", opts, dtype="float16")
    assert s16.column("x").dtype == np.float16 and opts.dtype is None
    np.testing.assert_array_equal(s16.features("x", 3), s.features("x", 3).astype(np.float16))


def test_options_are_checked_where_given(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword 'segments' \\(T is called length\\)"):
        fgs.from_arrow(_flat(), tmp_path / "a.fgs", segments=3)
    with pytest.raises(TypeError, match="options must be an ImportOptions, got dict"):
        fgs.from_arrow(_flat(), tmp_path / "a.fgs", {"length": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ImportOptions("name")  # type: ignore[misc] - keyword-only
    with pytest.raises(TypeError, match="batch_size"):
        ImportOptions(batch_size=True)
    with pytest.raises(ValueError, match="batch_size"):
        ImportOptions(batch_size=0)
    with pytest.raises(TypeError, match="label_column"):
        ImportOptions(label_column=3)  # type: ignore[arg-type]
    assert not (tmp_path / "a.fgs").exists()


def test_bad_dtype_is_a_conversion_error_as_in_convert(tmp_path):
    t = _flat()
    with pytest.raises(fgs.ConversionError, match="dtype='int8' is not supported"):
        fgs.from_arrow(t, tmp_path / "a.fgs", id_column="name", length=3, channels=2, dtype="int8", progress=False)
    with pytest.raises(fgs.ConversionError, match="dtype='int8' is not supported"):
        fgs.convert({"x": {"a": np.zeros((2, 3), np.float32)}}, tmp_path / "b.fgs", dtype="int8", progress=False)


def test_exports_of_0_1_with_segments_metadata_import(tmp_path):
    # 0.1 wrote each column's T as "segments" in the finegym_store metadata.
    s = fgs.from_arrow(_flat(), tmp_path / "a.fgs", id_column="name", label_column="y", length=3, channels=2,
                       progress=False)
    t = s.to_arrow()
    doc = json.loads(t.schema.metadata[b"finegym_store"])
    doc["columns"]["x"] = {"dtype": "float32", "segments": 3, "channels": 2}
    fields = [f.remove_metadata() for f in t.schema]
    flat = pa.array(list(s.column("x").values.reshape(4, 6)), pa.list_(pa.float32()))
    old = pa.table(dict(zip(t.column_names, t.columns)), schema=pa.schema(fields)).set_column(
        t.column_names.index("x"), "x", flat).replace_schema_metadata({b"finegym_store": json.dumps(doc)})
    pq.write_table(old, tmp_path / "old.parquet")
    back = fgs.from_parquet(tmp_path / "old.parquet", tmp_path / "back.fgs", progress=False)
    assert back.column("x").shape == (4, 3, 2)
    np.testing.assert_array_equal(back.column("x").values, s.column("x").values)
