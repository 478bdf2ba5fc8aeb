"""Every error path of ``finegym_store.convert`` (and the inputs it must accept).

Each error is a ConversionError (a ValueError) whose message names the file
or the in-memory column and the offending key / line / field.
"""

from __future__ import annotations

import os
import pickle
import re
import sys

import numpy as np
import pytest

import finegym_store as fgs

CATS = """\
Clabel:   0; set:  1; Glabel:   1; (VT) round-off, flic-flac
Clabel:   1; set: 21; Glabel:  67; (FX) split jump
Clabel:   2; set: 31; Glabel: 120; (BB) wolf jump
"""


def _table(n: int = 6, t: int = 4, c: int = 8, seed: int = 0, prefix: str = "id") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}{i:03d}": rng.standard_normal((t, c, 1, 1)).astype(np.float32) for i in range(n)}


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def _pickle(path, obj, protocol: int = 4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _convert(tmp_path, features, **kw):
    kw.setdefault("progress", False)
    return fgs.convert(features, tmp_path / "out.fgs", **kw)


def _no_output(tmp_path):
    assert not (tmp_path / "out.fgs").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_conversion_error_is_value_error():
    assert issubclass(fgs.ConversionError, ValueError)
    assert issubclass(fgs.UnsafePickleError, fgs.ConversionError)


# -- values -------------------------------------------------------------------------


def test_int_array_names_file_and_key(tmp_path):
    table = _table()
    table["id003"] = np.ones((4, 8, 1, 1), dtype=np.int32)
    path = _pickle(tmp_path / "feats.pkl", table)
    with pytest.raises(fgs.ConversionError, match=r"feats\.pkl: key 'id003': .*floating-point.*int32"):
        _convert(tmp_path, {"x": path})
    _no_output(tmp_path)


def test_int_array_in_memory_names_column_and_key(tmp_path):
    table = _table()
    table["id001"] = np.ones((4, 8), dtype=np.int64)
    with pytest.raises(fgs.ConversionError, match=r"features\['x'\].*key 'id001'.*int64"):
        _convert(tmp_path, {"x": table})


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, object])
def test_other_non_float_dtypes(tmp_path, dtype):
    table = _table()
    table["id002"] = np.zeros((4, 8), dtype=dtype)
    with pytest.raises(fgs.ConversionError, match=r"key 'id002'.*floating-point"):
        _convert(tmp_path, {"x": table})


@pytest.mark.parametrize("shape", [(4, 8, 2), (4, 8, 1, 3), (), (2, 2, 2, 2, 2)])
def test_wrong_rank(tmp_path, shape):
    table = _table()
    table["id004"] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(fgs.ConversionError, match=r"key 'id004'.*expected shape .*got " + re.escape(str(shape))):
        _convert(tmp_path, {"x": table})
    _no_output(tmp_path)


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0,)])
def test_empty_arrays(tmp_path, shape):
    table = _table()
    table["id000"] = np.zeros(shape, dtype=np.float32)
    with pytest.raises(fgs.ConversionError, match=r"key 'id000': empty array"):
        _convert(tmp_path, {"x": table})


def test_channels_differ_between_instances(tmp_path):
    table = _table(c=8)
    table["id005"] = np.zeros((4, 9), dtype=np.float32)
    with pytest.raises(fgs.ConversionError, match=r"key 'id005' has C = 9 .*'id000' has C = 8"):
        _convert(tmp_path, {"x": table})
    _no_output(tmp_path)


def test_value_not_an_ndarray(tmp_path):
    table = _table()
    table["id002"] = [[1.0, 2.0]] * 4
    path = _pickle(tmp_path / "feats.pkl", table)
    with pytest.raises(fgs.ConversionError, match=r"feats\.pkl: key 'id002': expected a numpy array, got list"):
        _convert(tmp_path, {"x": path})


def test_empty_dict(tmp_path):
    with pytest.raises(fgs.ConversionError, match=r"features\['x'\].*the feature dict is empty"):
        _convert(tmp_path, {"x": {}})
    path = _pickle(tmp_path / "empty.pkl", {})
    with pytest.raises(fgs.ConversionError, match=r"empty\.pkl: the feature dict is empty"):
        _convert(tmp_path, {"x": path})
    _no_output(tmp_path)


def test_empty_second_column(tmp_path):
    with pytest.raises(fgs.ConversionError, match=r"features\['y'\].*the feature dict is empty"):
        _convert(tmp_path, {"x": _table(), "y": {}})
    _no_output(tmp_path)


def test_non_str_keys(tmp_path):
    table = {1: np.ones((2, 3), np.float32), 2: np.ones((2, 3), np.float32)}
    with pytest.raises(fgs.ConversionError, match=r"keys must be str element ids.*int 1"):
        _convert(tmp_path, {"x": table})
    _no_output(tmp_path)


def test_mixed_key_types(tmp_path):
    table = {"a": np.ones((2, 3), np.float32), 2: np.ones((2, 3), np.float32)}
    with pytest.raises(fgs.ConversionError, match=r"keys must be str element ids"):
        _convert(tmp_path, {"x": table})


def test_non_str_keys_with_split(tmp_path):
    split = _write(tmp_path / "split.txt", "a 0\nb 1\n")
    table = {"a": np.ones((2, 3), np.float32), b"b": np.ones((2, 3), np.float32)}
    with pytest.raises(fgs.ConversionError, match=r"keys must be str element ids.*bytes b'b'"):
        _convert(tmp_path, {"x": table}, split=split)


# -- pickle files ----------------------------------------------------------------------


def test_top_level_not_a_dict(tmp_path):
    path = _pickle(tmp_path / "list.pkl", [np.zeros((4, 8), np.float32)])
    with pytest.raises(fgs.ConversionError, match=r"list\.pkl: expected a dict of element id -> array, got list"):
        _convert(tmp_path, {"x": path})
    _no_output(tmp_path)


def test_top_level_array(tmp_path):
    path = _pickle(tmp_path / "arr.pkl", np.zeros((4, 8), np.float32))
    with pytest.raises(fgs.ConversionError, match=r"arr\.pkl: expected a dict .*got ndarray"):
        _convert(tmp_path, {"x": path})


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("keep", [0, 1, 2, 0.5, -1])
def test_truncated_pickle(tmp_path, protocol, keep):
    good = _pickle(tmp_path / "good.pkl", _table(), protocol=protocol)
    data = good.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    bad = tmp_path / "cut.pkl"
    bad.write_bytes(data[:cut])
    with pytest.raises(fgs.ConversionError, match=r"cut\.pkl: (the pickle ends early|not a readable pickle)"):
        _convert(tmp_path, {"x": bad})
    _no_output(tmp_path)


def test_not_a_pickle(tmp_path):
    bad = _write(tmp_path / "text.pkl", "element_id label\n")
    with pytest.raises(fgs.ConversionError, match=r"text\.pkl: not a readable pickle"):
        _convert(tmp_path, {"x": bad})


def test_missing_pickle(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl"):
        _convert(tmp_path, {"x": tmp_path / "nope.pkl"})


def test_source_of_wrong_type(tmp_path):
    with pytest.raises(TypeError, match=r"features\['x'\] must be a path \(a pickle, a folder of \.npy files, an HDF5 file\), an HDF5Source or a dict, got int"):
        _convert(tmp_path, {"x": 42})


# -- keys vs other columns and the split ---------------------------------------------------


def _no_column_written(monkeypatch):
    conv = __import__("sys").modules["finegym_store.convert"]

    def fail(*args, **kwargs):
        raise AssertionError("a column was written before the ids were checked")

    monkeypatch.setattr(conv, "_write_column", fail)


@pytest.mark.parametrize("bad", ["\ud800", "id\udfff", "a\udc80b"])
def test_ids_that_are_not_utf8_from_a_pickle(tmp_path, monkeypatch, bad):
    # A pickle's BINUNICODE may hold lone surrogates (as Python's own pickler
    # writes them): the ids are checked before any column is written.
    table = _table(n=3)
    table[bad] = table.pop("id001")
    path = _pickle(tmp_path / "feats.pkl", table)
    assert b"\xed" in path.read_bytes()  # surrogatepass-encoded in the file
    _no_column_written(monkeypatch)
    with pytest.raises(fgs.ConversionError,
                       match=rf"feats\.pkl: key {re.escape(repr(bad))} is not valid Unicode text "
                             r"\(surrogates not allowed at index \d\); element ids must be encodable as UTF-8"):
        _convert(tmp_path, {"x": path})
    _no_output(tmp_path)


def test_ids_that_are_not_utf8_in_memory_second_column(tmp_path, monkeypatch):
    split = _write(tmp_path / "split.txt", "a 0\nb 1\n")
    good = {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}
    bad = {"a": np.ones((2, 3), np.float32), "b\ud800": np.ones((2, 3), np.float32)}
    with pytest.raises(fgs.ConversionError, match=r"features\['y'\].*key 'b\\ud800' is not valid Unicode text"):
        _convert(tmp_path, {"x": good, "y": bad})
    _no_output(tmp_path)
    _no_column_written(monkeypatch)
    with pytest.raises(fgs.ConversionError, match=r"features\['x'\].*key 'b\\ud800' is not valid Unicode text"):
        _convert(tmp_path, {"x": bad}, split=split)
    _no_output(tmp_path)


def test_huge_key_is_cut_short_in_messages(tmp_path):
    long_key = "k" * 1_000_000
    table = {"a": np.ones((2, 3), np.float32), long_key: np.ones((2, 3), np.int32)}
    path = _pickle(tmp_path / "long.pkl", table)
    with pytest.raises(fgs.ConversionError, match=r"long\.pkl: key 'k{80}'\.\.\. \(1000000 characters\): "
                                                  r"expected a floating-point array") as info:
        _convert(tmp_path, {"x": path})
    assert len(str(info.value)) < 500
    with pytest.raises(fgs.ConversionError, match=r"long\.pkl: 1 ids are not in .*'k{80}'\.\.\. \(1000000 characters\)"):
        _convert(tmp_path, {"x": {"a": table["a"]}, "y": path})


def test_shared_array_within_the_cap_converts(tmp_path):
    # Sharing one array between keys is allowed while the arrays, counting
    # each reference, hold no more bytes than the file (safe_pickle's cap).
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = _pickle(tmp_path / "shared.pkl", {"a": x, "b": x, "c": x})
    assert path.stat().st_size > 3 * x.nbytes
    store = _convert(tmp_path, {"x": path})
    for i in range(3):
        np.testing.assert_array_equal(store.features("x", i), x)


def test_shared_array_beyond_the_cap_is_refused(tmp_path):
    x = np.ones((12, 64, 1, 1), np.float32)
    path = _pickle(tmp_path / "shared.pkl", dict.fromkeys([f"k{i}" for i in range(50)], x))
    assert path.stat().st_size < 50 * x.nbytes
    with pytest.raises(fgs.UnsafePickleError, match=r"shared\.pkl: refusing to unpickle: its arrays, counting every "
                                                    r"reference to them, hold more bytes than the file's \d+: an array "
                                                    r"is shared under several keys"):
        _convert(tmp_path, {"x": path})
    _no_output(tmp_path)
    store = _convert(tmp_path, {"x": path}, trust_pickle=True)  # the documented way out, for trusted files
    assert len(store) == 50


def test_key_mismatch_between_columns(tmp_path):
    a = _table(n=20)
    b = dict(a)
    for k in ["id001", "id002", "id003", "id004", "id005", "id006", "id007"]:
        del b[k]
    b["zz1"] = b["zz2"] = np.zeros((4, 8), np.float32)
    with pytest.raises(fgs.ConversionError) as info:
        _convert(tmp_path, {"a": a, "b": b})
    msg = str(info.value)
    assert "features['b']" in msg
    assert "7 ids of the first column are missing" in msg
    assert "'id001', 'id002', 'id003', 'id004', 'id005' (and 2 more)" in msg
    assert "2 ids are not in the first column: 'zz1', 'zz2'" in msg
    _no_output(tmp_path)


def test_split_ids_missing_from_pickle(tmp_path):
    table = _table(n=4)
    lines = [f"{k} 0" for k in table] + ["ghost1 1", "ghost2 2"]
    split = _write(tmp_path / "split.txt", "\n".join(lines) + "\n")
    path = _pickle(tmp_path / "feats.pkl", table)
    with pytest.raises(fgs.ConversionError, match=r"feats\.pkl: 2 ids of .*split\.txt are missing: 'ghost1', 'ghost2'"):
        _convert(tmp_path, {"x": path}, split=split)
    _no_output(tmp_path)


def test_pickle_ids_absent_from_split(tmp_path):
    table = _table(n=5)
    split = _write(tmp_path / "split.txt", "id000 0\nid001 1\n")
    with pytest.raises(fgs.ConversionError, match=r"3 ids are not in .*split\.txt: 'id002', 'id003', 'id004'"):
        _convert(tmp_path, {"x": table}, split=split)


def test_split_both_directions(tmp_path):
    table = _table(n=3)
    split = _write(tmp_path / "split.txt", "id000 0\nid001 0\nother 2\n")
    with pytest.raises(fgs.ConversionError) as info:
        _convert(tmp_path, {"x": table}, split=split)
    msg = str(info.value)
    assert "1 ids of" in msg and "'other'" in msg
    assert "1 ids are not in" in msg and "'id002'" in msg


# -- split files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("id000 0\nid001\n", r"split\.txt:2: expected '<element_id> <label>', got 'id001'"),
        ("id000 0\nid001 1 extra\n", r"split\.txt:2: expected '<element_id> <label>'"),
        ("\nid000 zero\n", r"split\.txt:2: label 'zero' of 'id000' is not an integer"),
        ("id000 1.5\n", r"split\.txt:1: label '1.5' of 'id000' is not an integer"),
        ("id000 0\nid001 1\nid000 2\n", r"split\.txt:3: id 'id000' is listed twice \(first on line 1\)"),
        ("id000 -2\n", r"split\.txt:1: label -2 is outside"),
        ("id000 2147483648\n", r"split\.txt:1: label 2147483648 is outside"),
        ("\n\n", r"split\.txt: the split file lists no instances"),
    ],
)
def test_malformed_split(tmp_path, text, pattern):
    split = _write(tmp_path / "split.txt", text)
    with pytest.raises(fgs.ConversionError, match=pattern):
        _convert(tmp_path, {"x": _table(n=2)}, split=split)
    _no_output(tmp_path)


def test_split_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nosplit\.txt"):
        _convert(tmp_path, {"x": _table(n=2)}, split=tmp_path / "nosplit.txt")


# -- categories files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("Clabel: 0; set: 1; Glabel: 1; (VT) ok\nthis is not a category\n",
         r"cats\.txt:2: expected 'Clabel: N; set: N; Glabel: N; \(EV\) name'.*got 'this is not a category'"),
        ("Clabel: x; set: 1; Glabel: 1; (VT) bad\n", r"cats\.txt:1: expected"),
        ("Clabel: 0; set: 1; Glabel: 1; (VT) a\nClabel: 0; set: 21; Glabel: 5; (FX) b\n",
         r"cats\.txt:2: class label 0 is listed twice"),
        ("\n", r"cats\.txt: the categories file lists no classes"),
    ],
)
def test_malformed_categories(tmp_path, text, pattern):
    cats = _write(tmp_path / "cats.txt", text)
    with pytest.raises(fgs.ConversionError, match=pattern):
        _convert(tmp_path, {"x": _table(n=2)}, categories=cats)
    _no_output(tmp_path)


def test_split_labels_absent_from_categories(tmp_path):
    cats = _write(tmp_path / "cats.txt", CATS)
    split = _write(tmp_path / "split.txt", "id000 0\nid001 7\nid002 -1\nid003 9\n")
    with pytest.raises(fgs.ConversionError, match=r"split\.txt: labels \[7, 9\] have no class in .*cats\.txt"):
        _convert(tmp_path, {"x": _table(n=4)}, split=split, categories=cats)
    _no_output(tmp_path)


def test_categories_round_trip(tmp_path):
    cats = _write(tmp_path / "cats.txt", CATS)
    split = _write(tmp_path / "split.txt", "id000 0\nid001 2\nid002 -1\n")
    store = _convert(tmp_path, {"x": _table(n=3)}, split=split, categories=cats)
    assert store.label_names == {0: "round-off, flic-flac", 1: "split jump", 2: "wolf jump"}
    assert store.classes.event.to_list() == ["VT", "FX", "BB"]
    np.testing.assert_array_equal(store.classes.glabel, [1, 67, 120])
    np.testing.assert_array_equal(store.labels, [0, 2, -1])


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a b", "feat/x", "ü", "a" * 41, "x.y", 3])
def test_bad_column_names(tmp_path, name):
    with pytest.raises(ValueError, match=r"column name .* must be 1\.\.40 characters"):
        _convert(tmp_path, {name: _table(n=2)})
    _no_output(tmp_path)


def test_longest_column_name_is_fine(tmp_path):
    store = _convert(tmp_path, {"A-z_9" * 8: _table(n=2)})
    assert store.columns == ("A-z_9" * 8,)


@pytest.mark.parametrize("features", [{}, [("x", {})], None])
def test_features_must_be_a_nonempty_mapping(tmp_path, features):
    with pytest.raises(ValueError, match=r"features must be a non-empty mapping"):
        _convert(tmp_path, features)


@pytest.mark.parametrize("dtype", ["float64", "int8", "bfloat16"])
def test_unsupported_store_dtype(tmp_path, dtype):
    # docs/converting.md promises ConversionError for bad input to convert; it is a
    # ValueError, so callers catching ValueError still do.
    with pytest.raises(fgs.ConversionError, match=rf"dtype='{dtype}' is not supported; use 'float32' or 'float16'"):
        _convert(tmp_path, {"x": _table(n=2)}, dtype=dtype)
    with pytest.raises(ValueError, match=rf"dtype='{dtype}' is not supported"):
        _convert(tmp_path, {"x": _table(n=2)}, dtype=dtype)
    _no_output(tmp_path)


def test_output_exists(tmp_path):
    out = tmp_path / "out.fgs"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"out\.fgs exists; pass overwrite=True"):
        fgs.convert({"x": _table(n=2)}, out, progress=False)
    assert out.read_bytes() == b"precious"
    store = fgs.convert({"x": _table(n=3, seed=5)}, out, overwrite=True, progress=False)
    assert len(store) == 3
    np.testing.assert_array_equal(store.features("x", 2), _table(n=3, seed=5)["id002"].reshape(4, 8))
    assert sorted(os.listdir(tmp_path)) == ["out.fgs"]


def test_output_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        fgs.convert({"x": _table(n=2)}, tmp_path / "no" / "out.fgs", progress=False)


# -- values that must be accepted -----------------------------------------------------------------


def test_nan_and_inf_stored_bit_exact(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    x[0, 0] = np.nan
    x[1, 1] = np.inf
    x[2, 2] = -np.inf
    x[2, 3] = np.float32(-0.0)
    weird_nan = np.array([0x7FC12345], dtype=np.uint32).view(np.float32)[0]  # NaN with a payload
    x[0, 5] = weird_nan
    store = _convert(tmp_path, {"x": {"a": x, "b": x[::-1].copy()}})
    got = store.features("x", 0)
    assert got.tobytes() == x.tobytes()
    assert np.isnan(got[0, 0]) and np.isnan(got[0, 5])
    assert np.isinf(got[1, 1]) and got[1, 1] > 0
    assert np.isinf(got[2, 2]) and got[2, 2] < 0
    assert np.signbit(got[2, 3])
    assert store.features("x", 1).tobytes() == x[::-1].tobytes()


def test_float64_input_stored_as_float32(tmp_path):
    rng = np.random.default_rng(3)
    table = {f"k{i}": rng.standard_normal((5, 7)) * 1e3 for i in range(4)}
    table["k0"][0, 0] = 1e300  # overflows float32 -> inf, as a cast would
    table["k0"][0, 1] = np.nan
    store = _convert(tmp_path, {"x": table})
    assert store.column("x").dtype == np.float32
    with np.errstate(over="ignore"):
        for i, k in enumerate(sorted(table)):
            assert store.features("x", i).tobytes() == table[k].astype(np.float32).tobytes()
    assert store.attrs["columns"]["x"]["source_dtypes"] == ["float64"]


@pytest.mark.parametrize("source", [np.float32, np.float64, np.float16])
def test_float16_storage(tmp_path, source):
    rng = np.random.default_rng(4)
    table = {f"k{i}": (rng.standard_normal((6, 10)) * 100).astype(source) for i in range(3)}
    table["k1"][0, 0] = np.nan
    table["k1"][0, 1] = np.inf
    if source is not np.float16:
        table["k1"][0, 2] = 70000.0  # beyond float16's range -> inf
        table["k1"][0, 3] = 1e-9  # below float16's subnormals -> 0
    store = _convert(tmp_path, {"x": table}, dtype="float16")
    col = store.column("x")
    assert col.dtype == np.float16 and col.values.dtype == np.float16
    with np.errstate(over="ignore"):
        for i, k in enumerate(sorted(table)):
            want = table[k].astype(np.float16)
            got = store.features("x", i)
            assert got.dtype == np.float16
            assert got.tobytes() == want.tobytes()
            finite = np.isfinite(table[k]) & (np.abs(table[k]) < 65504)
            np.testing.assert_allclose(got[finite].astype(np.float64), table[k][finite].astype(np.float64),
                                       rtol=2**-10, atol=2**-24)
    got = store.features("x", 1)
    assert np.isnan(got[0, 0]) and np.isinf(got[0, 1])
    if source is not np.float16:
        assert np.isinf(got[0, 2]) and got[0, 3] == 0


def test_vector_input_means_t_equals_1(tmp_path):
    table = {"a": np.arange(5, dtype=np.float32), "b": np.arange(5, 10, dtype=np.float32)}
    store = _convert(tmp_path, {"x": table})
    col = store.column("x")
    assert col.shape == (2, 1, 5)
    assert not col.ragged
    np.testing.assert_array_equal(store.features("x", 1), [[5, 6, 7, 8, 9]])


def test_trailing_unit_dims_squeezed(tmp_path):
    rng = np.random.default_rng(5)
    table = {f"k{i}": rng.standard_normal((12, 16, 1, 1, 1)).astype(np.float32) for i in range(3)}
    store = _convert(tmp_path, {"i3d": table})
    assert store.column("i3d").shape == (3, 12, 16)
    for i, k in enumerate(sorted(table)):
        assert store.features("i3d", i).shape == (12, 16)
        assert store.features("i3d", i).tobytes() == table[k].tobytes()


def test_ragged_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    lengths = [3, 1, 7, 3, 12]
    table = {f"k{i}": rng.standard_normal((t, 9, 1, 1)).astype(np.float32) for i, t in enumerate(lengths)}
    store = _convert(tmp_path, {"r": table})
    col = store.column("r")
    assert col.ragged
    assert col.shape == (5, None, 9)
    np.testing.assert_array_equal(col.lengths(), lengths)
    np.testing.assert_array_equal(col.offsets, np.concatenate([[0], np.cumsum(lengths)]))
    assert col.offsets.dtype == np.int64
    assert col.values.shape == (sum(lengths), 9)
    for i, k in enumerate(sorted(table)):
        assert store.features("r", i).tobytes() == table[k].tobytes()
    assert [v.shape[0] for v in col[1:4]] == lengths[1:4]
    assert store.attrs["columns"]["r"]["segments"] is None
    assert store.verify() == []


def test_ragged_row_count_larger_than_staging(tmp_path, monkeypatch):
    # Instances that do not fit the staging buffer together still land in order.
    monkeypatch.setattr(sys.modules["finegym_store._write"], "STAGING_BYTES", 4 * 9 * 5)  # 5 rows of 9 float32
    rng = np.random.default_rng(7)
    lengths = [3, 4, 8, 1, 2]
    table = {f"k{i}": rng.standard_normal((t, 9)).astype(np.float32) for i, t in enumerate(lengths)}
    store = _convert(tmp_path, {"r": table})
    for i, k in enumerate(sorted(table)):
        assert store.features("r", i).tobytes() == table[k].tobytes()


def test_several_columns_with_different_t(tmp_path):
    rng = np.random.default_rng(8)
    ids = [f"v{i}" for i in range(4)]
    a = {k: rng.standard_normal((12, 16, 1, 1)).astype(np.float32) for k in ids}
    b = {k: rng.standard_normal((3, 5, 1, 1, 1)).astype(np.float32) for k in ids}
    c = {k: rng.standard_normal((i + 1, 2)).astype(np.float32) for i, k in enumerate(ids)}
    d = {k: rng.standard_normal(7).astype(np.float32) for k in ids}
    split = _write(tmp_path / "split.txt", "v2 1\nv0 0\nv3 2\nv1 1\n")
    store = _convert(tmp_path, {"a": a, "b": b, "c": c, "d": d}, split=split)
    assert store.columns == ("a", "b", "c", "d")
    assert store.column("a").shape == (4, 12, 16)
    assert store.column("b").shape == (4, 3, 5)
    assert store.column("c").shape == (4, None, 2)
    assert store.column("d").shape == (4, 1, 7)
    assert list(store.ids) == ["v2", "v0", "v3", "v1"]
    for i, k in enumerate(store.ids):
        assert store.features("a", i).tobytes() == a[k].tobytes()
        assert store.features("b", i).tobytes() == b[k].tobytes()
        assert store.features("c", i).tobytes() == c[k].tobytes()
        assert store.features("d", i).tobytes() == d[k].tobytes()
    np.testing.assert_array_equal(store.column("c").lengths(), [3, 1, 4, 2])
    assert store.verify() == []


def test_non_contiguous_input(tmp_path):
    base = np.arange(2 * 6 * 10, dtype=np.float32).reshape(2, 6, 10)
    table = {"a": base[0, :, ::2], "b": base[1].T[:5].T}  # strided views
    store = _convert(tmp_path, {"x": table})
    assert store.features("x", 0).tobytes() == np.ascontiguousarray(table["a"]).tobytes()
    assert store.features("x", 1).tobytes() == np.ascontiguousarray(table["b"]).tobytes()


def test_convert_takes_features_then_out_and_names_the_swap(tmp_path):
    out = tmp_path / "out.fgs"
    with pytest.raises(TypeError, match=r"convert\(features, out\): the features mapping comes first"):
        fgs.convert(out, {"x": _table(n=2)}, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fgs.convert({"x": _table(n=2)}, out, None)  # type: ignore[misc] - options are keyword-only
    assert not out.exists()
