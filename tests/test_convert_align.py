"""convert's alignment options on the real gym99 val split: pickles that lack
split ids (missing="drop", --drop-missing), hold ids outside it
(extra="ignore", --ignore-extra), models of different instance sets (their
intersection); what was left out is printed and recorded; every path is
checked before the first pickle is read."""

from __future__ import annotations

import os

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import synth
from finegym_store.finegym import read_split

from conftest import shared_file
from test_cli import cli

SPLIT = "gym99_val_element.txt"


@pytest.fixture(scope="module")
def real():
    """(split path, ids, labels) of the real gym99 val split."""
    path = shared_file(SPLIT)
    ids, labels = read_split(path)
    return path, ids, labels


def table(ids, c: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """(2, c) features whose values say the id's position in the list."""
    return {k: np.full((2, c), i + seed, np.float32) for i, k in enumerate(ids)}


def misaligned(ids, lack: list[int], extra: int, c: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    t = table(ids, c, seed)
    for i in lack:
        del t[ids[i]]
    for j in range(extra):
        t[f"zzzzzzzzzzz_E_000000_00000{j}_A_0000_0001"] = np.zeros((2, c), np.float32)
    return t


LACK = [0, 17, 4000, 8519, 8520]


def test_default_is_an_error_listing_ids_and_naming_the_options(tmp_path, real):
    split, ids, _ = real
    with pytest.raises(fgs.ConversionError) as info:
        fgs.convert({"i3d": misaligned(ids, LACK, 7)}, tmp_path / "o.fgs", split=split, progress=False)
    msg = str(info.value)
    assert f"5 ids of {split} are missing: " in msg and repr(ids[17]) in msg
    assert "missing='drop', --drop-missing" in msg
    assert "7 ids are not in" in msg and "'zzzzzzzzzzz_E_000000_000000_A_0000_0001'" in msg
    assert "extra='ignore', --ignore-extra" in msg
    assert os.listdir(tmp_path) == []
    # Only one of the two allowed: the other still refused.
    with pytest.raises(fgs.ConversionError, match=r"7 ids are not in .*--ignore-extra") as info:
        fgs.convert({"i3d": misaligned(ids, LACK, 7)}, tmp_path / "o.fgs", split=split, missing="drop",
                    progress=False)
    assert "are missing" not in str(info.value)
    with pytest.raises(fgs.ConversionError, match=r"5 ids of .* are missing.*--drop-missing") as info:
        fgs.convert({"i3d": misaligned(ids, LACK, 7)}, tmp_path / "o.fgs", split=split, extra="ignore",
                    progress=False)
    assert "are not in" not in str(info.value)


def test_drop_missing_and_ignore_extra(tmp_path, real, capsys):
    split, ids, labels = real
    store = fgs.convert({"i3d": misaligned(ids, LACK, 7)}, tmp_path / "o.fgs", split=split, missing="drop",
                        extra="ignore", categories=shared_file("gym99_categories.txt"))
    keep = [i for i in range(len(ids)) if i not in LACK]
    assert store.ids.to_list() == [ids[i] for i in keep]  # split order
    np.testing.assert_array_equal(store.labels, labels[keep])
    np.testing.assert_array_equal(store.column("i3d").values[:, 0, 0], np.asarray(keep, np.float32))
    a = store.attrs["alignment"]
    assert a["missing"] == "drop" and a["extra"] == "ignore"
    assert a["dropped"]["count"] == 5 and a["dropped"]["ids"] == sorted(ids[i] for i in LACK)
    assert a["dropped"]["by_column"] == {"i3d": {"count": 5, "ids": sorted(ids[i] for i in LACK)}}
    assert a["ignored"]["i3d"]["count"] == 7 and len(a["ignored"]["i3d"]["ids"]) == 7
    err = capsys.readouterr().err
    assert f"dropped 5 ids of {split} that i3d (in-memory dict) lacks" in err
    assert f"ignored 7 ids of i3d (in-memory dict) not in {split}" in err
    # quiet: nothing printed, the same record
    fgs.convert({"i3d": misaligned(ids, LACK, 7)}, tmp_path / "q.fgs", split=split, missing="drop",
                extra="ignore", progress=False)
    assert capsys.readouterr().err == ""
    assert fgs.open(tmp_path / "q.fgs").attrs["alignment"] == a
    # Aligned input records the options and nothing dropped.
    aligned = fgs.convert({"i3d": table(ids)}, tmp_path / "a.fgs", split=split, missing="drop", progress=False)
    assert aligned.attrs["alignment"] == {"missing": "drop", "extra": "error"}


def test_more_than_100_dropped_records_the_first_100_and_the_count(tmp_path, real):
    split, ids, _ = real
    lack = list(range(0, 8521, 40))  # 214 ids
    store = fgs.convert({"x": misaligned(ids, lack, 0)}, tmp_path / "o.fgs", split=split, missing="drop",
                        progress=False)
    d = store.attrs["alignment"]["dropped"]
    assert d["count"] == len(lack) == 214 and d["ids"] == sorted(ids[i] for i in lack)[:100]
    assert len(store) == 8521 - 214


def test_models_of_different_instance_sets_keep_the_intersection(tmp_path, real):
    split, ids, labels = real
    # The second model lacks ids the first was already written for: the
    # conversion starts over with the intersection.
    tables = {"tsn": misaligned(ids, [1, 2], 0, c=4, seed=0), "i3d": misaligned(ids, [3, 8000], 2, c=5, seed=100000),
              "r50": misaligned(ids, [2, 5], 0, c=6, seed=200000)}
    store = fgs.convert(tables, tmp_path / "o.fgs", split=split, missing="drop", extra="ignore", progress=False)
    gone = {1, 2, 3, 5, 8000}
    keep = [i for i in range(len(ids)) if i not in gone]
    assert store.ids.to_list() == [ids[i] for i in keep]
    np.testing.assert_array_equal(store.labels, labels[keep])
    for name, seed, c in (("tsn", 0, 4), ("i3d", 100000, 5), ("r50", 200000, 6)):
        col = store.column(name)
        assert col.channels == c
        np.testing.assert_array_equal(col.values[:, 1, -1], np.asarray(keep, np.float32) + seed)
    d = store.attrs["alignment"]["dropped"]
    assert d["count"] == 5 and d["ids"] == sorted(ids[i] for i in gone)
    assert {k: v["count"] for k, v in d["by_column"].items()} == {"tsn": 2, "i3d": 2, "r50": 2}
    assert store.verify() == []


def test_without_split_the_first_column_is_the_reference(tmp_path, real):
    _, ids, _ = real
    a = table(ids[:50])
    b = misaligned(ids[:50], [7], 3)
    with pytest.raises(fgs.ConversionError, match=r"features\['b'\].*1 ids of the first column are missing.*"
                                                  r"3 ids are not in the first column"):
        fgs.convert({"a": a, "b": b}, tmp_path / "o.fgs", progress=False)
    store = fgs.convert({"a": a, "b": b}, tmp_path / "o.fgs", missing="drop", extra="ignore", progress=False)
    assert store.ids.to_list() == sorted(set(ids[:50]) - {ids[7]})
    assert store.attrs["alignment"]["dropped"]["ids"] == [ids[7]]


def test_empty_intersection_is_a_clear_error(tmp_path, real):
    split, ids, _ = real
    other = {f"zzzzzzzzzzz_E_000000_00000{j}_A_0000_0001": np.zeros((2, 3), np.float32) for j in range(3)}
    with pytest.raises(fgs.ConversionError, match=rf"features\['x'\] \(in-memory dict\): no id is left: each of the "
                                                  rf"8521 ids of {split} is missing from some table \(.* lacks 8521"):
        fgs.convert({"x": other}, tmp_path / "o.fgs", split=split, missing="drop", extra="ignore", progress=False)
    # Two models that share no id.
    with pytest.raises(fgs.ConversionError, match=r"no id is left"):
        fgs.convert({"a": table(ids[:4000]), "b": {k: v for k, v in table(ids).items()
                                                                         if k not in set(ids[:4000])}}, tmp_path / "o.fgs",
                    split=split, missing="drop", progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs,pattern", [
    ({"missing": "skip"}, r"missing must be one of \('error', 'drop'\), got 'skip'"),
    ({"missing": True}, r"missing must be one of"),
    ({"extra": "drop"}, r"extra must be one of \('error', 'ignore'\), got 'drop'"),
    ({"extra": None}, r"extra must be one of"),
    ({"allow_label_mismatch": 1}, r"allow_label_mismatch must be True or False, got 1"),
])
def test_bad_option_values(tmp_path, real, kwargs, pattern):
    split, ids, _ = real
    with pytest.raises(ValueError, match=pattern):
        fgs.convert({"x": table(ids)}, tmp_path / "o.fgs", split=split, progress=False, **kwargs)


def test_every_path_is_checked_before_the_first_pickle_is_read(tmp_path, real):
    split, ids, _ = real
    first = tmp_path / "first.pkl"
    first.write_bytes(b"not a pickle")  # reading it would fail differently
    with pytest.raises(FileNotFoundError, match=rf"features\['b'\]: no such file: {tmp_path / 'second.pkl'}"):
        fgs.convert({"a": first, "b": tmp_path / "second.pkl"}, tmp_path / "o.fgs", split=split, progress=False)
    with pytest.raises(FileNotFoundError, match=rf"^split: no such file: {tmp_path / 'x.txt'}$"):
        fgs.convert({"a": first}, tmp_path / "o.fgs", split=tmp_path / "x.txt", progress=False)
    with pytest.raises(FileNotFoundError, match=rf"^categories: no such file: {tmp_path / 'c.txt'}$"):
        fgs.convert({"a": first}, tmp_path / "o.fgs", split=split, categories=tmp_path / "c.txt", progress=False)
    with pytest.raises(IsADirectoryError, match=rf"^split: {tmp_path} is a folder"):
        fgs.convert({"a": first}, tmp_path / "o.fgs", split=tmp_path, progress=False)

    def one_line(*args):
        r = cli("convert", tmp_path / "o.fgs", *args, "-q")
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.returncode, r.stderr)
        return r.stderr

    assert one_line("-f", f"a={first}", "--split", "x.txt") == "error: --split: no such file: x.txt\n"
    assert one_line("-f", f"a={first}", "--split", split, "--categories", "c.txt") == \
        "error: --categories: no such file: c.txt\n"
    assert one_line("-f", f"a={first}", "-f", "b=none.pkl") == "error: -f b=: no such file: none.pkl\n"
    assert not (tmp_path / "o.fgs").exists()


def test_cli_drop_missing_ignore_extra(tmp_path, real):
    split, ids, labels = real
    synth.write_pickle(tmp_path / "i3d.pkl", misaligned(ids, LACK, 7))
    synth.write_pickle(tmp_path / "tsn.pkl", misaligned(ids, [9], 0, c=2))
    args = ["convert", tmp_path / "o.fgs", "-f", f"i3d={tmp_path / 'i3d.pkl'}", "-f", f"tsn={tmp_path / 'tsn.pkl'}",
            "--split", split]
    r = cli(*args, "-q")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--drop-missing" in r.stderr
    assert "--ignore-extra" in r.stderr and str(tmp_path / "i3d.pkl") in r.stderr
    r = cli(*args, "--drop-missing", "--ignore-extra")
    assert r.returncode == 0, r.stderr
    assert f"tsn ({tmp_path / 'tsn.pkl'}) lacks 1 ids the columns written so far hold; starting over" in r.stderr
    assert f"dropped 5 ids of {split} that i3d ({tmp_path / 'i3d.pkl'}) lacks" in r.stderr
    assert f"dropped 1 ids of {split} that tsn ({tmp_path / 'tsn.pkl'}) lacks" in r.stderr
    assert f"ignored 7 ids of i3d ({tmp_path / 'i3d.pkl'}) not in {split}" in r.stderr
    store = fgs.open(tmp_path / "o.fgs")
    assert len(store) == 8521 - 6
    assert store.attrs["alignment"]["dropped"]["count"] == 6
    r = cli(*args, "--drop-missing", "--ignore-extra", "-q", "--overwrite")
    assert r.returncode == 0 and r.stderr == ""
