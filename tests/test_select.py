"""Store.select and ``finegym-store select``: rows or ids into a new store,
fixed and ragged columns, hierarchy and provenance kept; the train v1.0 rows
of a real v1.1 store by its split file; every way to select wrongly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store.finegym import read_split
from finegym_store.labelspace import LabelSpace

from conftest import shared_file
from test_cli import cli


@pytest.fixture(scope="module")
def v11(tmp_path_factory):
    """The real gym99 train v1.1 split with the gym99 categories: a fixed
    column (3 x 4) and a ragged one (1..4 x 2), stored as float16."""
    d = tmp_path_factory.mktemp("select")
    split = shared_file("gym99_train_element_v1.1.txt")
    ids, _ = read_split(split)
    fixed = {k: np.full((3, 4), i, np.float32) + np.arange(12, dtype=np.float32).reshape(3, 4) / 16
             for i, k in enumerate(ids)}
    ragged = {k: np.full((1 + i % 4, 2), -i, np.float64) for i, k in enumerate(ids)}
    return fgs.convert({"f": fixed, "r": ragged}, d / "gym99_train_v1.1.fgs", split=split,
                       categories=shared_file("gym99_categories.txt"), dtype="float16", progress=False)


def same_rows(src: fgs.Store, out: fgs.Store, rows) -> None:
    rows = np.asarray(rows)
    assert len(out) == len(rows)
    assert out.ids.to_list() == [src.ids[int(r)] for r in rows]
    np.testing.assert_array_equal(out.labels, np.asarray(src.labels)[rows])
    for name in ("video", "event_start", "event_end", "element_start", "element_end"):
        a, b = getattr(out.meta, name), getattr(src.meta, name)
        assert list(a) == [b[int(r)] for r in rows]
    np.testing.assert_array_equal(out.column("f").values, src.column("f").values[rows])
    assert [out.column(c).dtype for c in out.columns] == [src.column(c).dtype for c in src.columns]
    assert out.columns == src.columns and out.column("r").ragged and not out.column("f").ragged
    np.testing.assert_array_equal(out.column("r").lengths(), src.column("r").lengths()[rows])
    for j, r in enumerate(rows.tolist()):
        np.testing.assert_array_equal(out.features("r", j), src.features("r", r))
    assert out.verify() == []


def test_train_v10_rows_of_a_v11_store_by_split(tmp_path, v11):
    from finegym_store.select import split_ids

    v10 = shared_file("gym99_train_element_v1.0.txt")
    ids, labels = read_split(v10)
    out = v11.select(split_ids(v11, v10), tmp_path / "v10.fgs")
    assert out.ids.to_list() == ids  # the split's order
    np.testing.assert_array_equal(out.labels, labels)
    same_rows(v11, out, v11.index_of(ids))
    # hierarchy and provenance kept; selected_from added
    assert out.label_names == v11.label_names
    assert out.label_space == v11.label_space == LabelSpace("gym99", 99, "c36b0100512744ef")
    attrs, src = out.attrs, v11.attrs
    assert attrs["split"] == src["split"] and attrs["columns"] == src["columns"]
    assert attrs["selected_from"] == {"path": os.path.abspath(v11.path), "instances": 26320, "selected": 20484,
                                      "how": "20484 ids"}
    # The CLI: the same store.
    r = cli("select", v11.path, tmp_path / "cli.fgs", "--split", v10)
    assert r.returncode == 0, r.stderr
    assert "20484 of the 26320 instances" in r.stdout
    cli_store = fgs.open(tmp_path / "cli.fgs")
    assert cli_store.ids.to_list() == ids
    assert cli_store.attrs["selected_from"]["how"] == f"split {v10}"
    np.testing.assert_array_equal(cli_store.column("f").values, out.column("f").values)


def test_rows_slices_ranges_and_ids(tmp_path, v11):
    rows = [5, 3, 26319, 0]
    same_rows(v11, v11.select(rows, tmp_path / "a.fgs"), rows)
    out = v11.select(np.array(rows, np.uint32), tmp_path / "b.fgs")
    same_rows(v11, out, rows)
    assert out.attrs["selected_from"]["how"] == "4 rows"
    same_rows(v11, v11.select([v11.ids[r] for r in rows], tmp_path / "c.fgs"), rows)
    out = v11.select(slice(100, 110), tmp_path / "d.fgs")
    same_rows(v11, out, range(100, 110))
    assert out.attrs["selected_from"]["how"] == "rows 100:110"
    out = v11.select(range(26310, 26320), tmp_path / "e.fgs")
    same_rows(v11, out, range(26310, 26320))
    assert out.attrs["selected_from"]["how"] == "rows 26310:26320"
    same_rows(v11, v11.select(slice(26315, None), tmp_path / "e2.fgs"), range(26315, 26320))
    same_rows(v11, v11.select(slice(None, None, -5000), tmp_path / "e3.fgs"), range(26319, -1, -5000))
    out = fgs.open(tmp_path / "d.fgs")
    # A selection of a selection: the earlier entry is kept inside the new one.
    again = out.select([9, 0], tmp_path / "f.fgs")
    assert again.ids.to_list() == [v11.ids[109], v11.ids[100]]
    assert again.attrs["selected_from"]["selected_from"]["how"] == "rows 100:110"
    # CLI --rows and --ids
    r = cli("select", v11.path, tmp_path / "g.fgs", "--rows", "10:20")
    assert r.returncode == 0, r.stderr
    same_rows(v11, fgs.open(tmp_path / "g.fgs"), range(10, 20))
    (tmp_path / "ids.txt").write_text("".join(f"{v11.ids[r]}\n" for r in rows))
    r = cli("select", v11.path, tmp_path / "h.fgs", "--ids", tmp_path / "ids.txt")
    assert r.returncode == 0, r.stderr
    same_rows(v11, fgs.open(tmp_path / "h.fgs"), rows)


def test_label_space_without_hierarchy_is_kept(tmp_path):
    split = shared_file("gym288_val_element.txt")
    ids, labels = read_split(split)
    store = fgs.convert({"x": {k: np.zeros((1, 1), np.float32) for k in ids}}, tmp_path / "v.fgs", split=split,
                        progress=False)
    assert store.label_space == LabelSpace("gym288", 288, None)
    low = np.flatnonzero(labels < 10)[:20]  # these rows alone span 10 classes
    out = store.select(low, tmp_path / "low.fgs")
    assert out.classes is None and out.label_space == LabelSpace("gym288", 288, None)


def test_select_refusals(tmp_path, v11):
    out = tmp_path / "o.fgs"
    cases = [
        ([], ValueError, r"the selection from .* is empty"),
        (slice(5, 5), ValueError, r"is empty"),
        (np.zeros(0, np.int64), ValueError, r"is empty"),
        ([3, 7, 3], ValueError, rf"names row 3 \(id '{v11.ids[3]}'\) twice, at positions 0 and 2"),
        ([v11.ids[1], v11.ids[2], v11.ids[1]], ValueError, r"names row 1 .* twice, at positions 0 and 2"),
        ([0, 26320], IndexError, r"row 26320 \(position 1 of the selection\) is out of range for .* rows 0\.\.26319"),
        ([-1], IndexError, r"row -1 \(position 0 of the selection\) is out of range"),
        (["nope"], KeyError, r"id 'nope' \(position 0\) is not in"),
        ([v11.ids[0], 1], TypeError, r"a selection of ids holds a int"),
        ([True, False], TypeError, r"got bool values; for a boolean mask pass np.flatnonzero"),
        ([1, True], TypeError, r"got int64 values|got bool|row positions"),
        (np.ones(len(v11), bool), TypeError, r"boolean mask"),
        ([0.0, 1.0], TypeError, r"got float64 values"),
        (v11.ids[0], TypeError, r"not one str"),
        (np.zeros((2, 2), np.int64), TypeError, r"1-D"),
        (7, TypeError, r"got int"),
    ]
    for sel, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            v11.select(sel, out)
        assert not out.exists() and [n for n in os.listdir(tmp_path)] == [], sel


def test_select_never_replaces_what_it_was_not_asked_to(tmp_path, v11):
    source = tmp_path / "src.fgs"
    source.write_bytes(Path(v11.path).read_bytes())
    src = fgs.open(source)
    before = source.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is the store being selected from"):
            src.select([0, 1], source, overwrite=overwrite)
        os.link(source, tmp_path / "hard.fgs")
        with pytest.raises(ValueError, match="is the store being selected from"):
            src.select([0, 1], tmp_path / "hard.fgs", overwrite=overwrite)
        os.unlink(tmp_path / "hard.fgs")
    assert source.read_bytes() == before
    (tmp_path / "taken.fgs").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="taken.fgs exists; pass overwrite=True"):
        src.select([0], tmp_path / "taken.fgs")
    assert (tmp_path / "taken.fgs").read_bytes() == b"keep me"
    assert len(src.select([0], tmp_path / "taken.fgs", overwrite=True)) == 1
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        src.select([0], tmp_path / "x.fgs", overwrite="yes")


def test_cli_select_errors(tmp_path, v11):
    def one_line(*args):
        r = cli("select", v11.path, tmp_path / "o.fgs", *args)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.returncode, r.stderr)
        assert not (tmp_path / "o.fgs").exists()
        return r.stderr

    assert "--rows: expected A:B (e.g. 0:1000), got 'x'" in one_line("--rows", "x")
    assert "--rows 5:2: need 0 <= A < B <= 26320" in one_line("--rows", "5:2")
    assert "--rows 0:99999: need" in one_line("--rows", "0:99999")
    assert "--rows: expected A:B" in one_line("--rows", "1:2:3")
    assert f"--ids: no such file: {tmp_path / 'none.txt'}" in one_line("--ids", tmp_path / "none.txt")
    assert f"--split: no such file: {tmp_path / 'none.txt'}" in one_line("--split", tmp_path / "none.txt")
    # A split of other instances, or other labels for them.
    other = shared_file("gym99_val_element.txt")
    assert "8521 of its 8521 ids are not in" in one_line("--split", other)
    ids, labels = read_split(shared_file("gym99_train_element_v1.0.txt"))
    (tmp_path / "relabelled.txt").write_text("".join(f"{k} {(y + 1) % 99}\n" for k, y in zip(ids[:5], labels[:5])))
    assert "has label" in one_line("--split", tmp_path / "relabelled.txt")
    (tmp_path / "dup.txt").write_text(f"{ids[0]}\n{ids[1]}\n{ids[0]}\n")
    assert "twice, at positions 0 and 2" in one_line("--ids", tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    assert "is empty" in one_line("--ids", tmp_path / "empty.txt")
    r = cli("select", v11.path, tmp_path / "o.fgs")
    assert r.returncode == 2 and "one of the arguments --ids --split --rows is required" in r.stderr
