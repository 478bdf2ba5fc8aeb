"""Label spaces against the real FineGym files (../shared/finegym): every
pairing of a split with a categories file converts only when both are of one
subset; Store.label_space; the Arrow importer's check; the probe's refusal of
train/val stores of different label spaces."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import labelspace
from finegym_store.errors import LabelSpaceError
from finegym_store.finegym import read_categories, read_split
from finegym_store.labelspace import LabelSpace
from finegym_store.probe import evaluate, Hierarchy, run_probe, run_probes

from conftest import require, shared_file
from test_cli import cli

SPLITS = ["gym99_train_element_v1.0.txt", "gym99_train_element_v1.1.txt", "gym99_val_element.txt",
          "gym288_train_element_v1.0.txt", "gym288_train_element_v1.1.txt", "gym288_val_element.txt"]
CATEGORIES = ["gym99_categories.txt", "gym288_categories.txt", "gym530_categories.txt"]
#: fingerprints of the real category files (labelspace.KNOWN_HIERARCHIES)
FINGERPRINTS = {"gym99": "c36b0100512744ef", "gym288": "3fd2735231ac4076", "gym530": "34472c930c1367ab"}


def subset(name: str) -> str:
    return name.split("_", 1)[0]


class Untouchable(Mapping):
    """A feature table that fails the test if convert reads it."""

    def __getitem__(self, key):
        raise AssertionError("the feature table was read before the labels were checked")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the feature table was read before the labels were checked")

    def __len__(self) -> int:
        raise AssertionError("the feature table was read before the labels were checked")


def tiny(ids, c: int = 2) -> dict[str, np.ndarray]:
    """Features (1, c) for every id: the labels are what these tests are about."""
    return {k: np.full((1, c), i % 7, np.float32) for i, k in enumerate(ids)}


def real_store(folder: Path, split: str, categories: str | None, name: str | None = None, **kw) -> fgs.Store:
    """A store of the whole real split (tiny features), with the real categories."""
    ids, _ = read_split(shared_file(split))
    return fgs.convert({"x": tiny(ids)}, folder / (name or split.replace(".txt", ".fgs")), split=shared_file(split),
                       categories=shared_file(categories) if categories else None, progress=False, **kw)


# -- every pairing of the real files ---------------------------------------------------


@pytest.mark.parametrize("split,categories", list(itertools.product(SPLITS, CATEGORIES)))
def test_every_real_pairing(tmp_path, split, categories):
    split_path, cats_path = shared_file(split), shared_file(categories)
    if subset(split) == subset(categories):
        # The right categories convert (the first 50 ids of the split: what
        # the check sees is the whole split file, read before any pickle).
        ids, labels = read_split(split_path)
        store = fgs.convert({"x": tiny(ids[:50])}, tmp_path / "ok.fgs", split=split_path, categories=cats_path,
                            missing="drop", progress=False)
        want = LabelSpace(subset(split), int(subset(split)[3:]), FINGERPRINTS[subset(split)])
        assert store.label_space == want
        assert store.attrs["label_space"] == want.to_dict()
        if split == "gym99_val_element.txt":
            import json

            info = json.loads(cli("info", store.path, "--json").stdout)
            assert info["label_space"] == want.to_dict()
        assert "label_mismatch_allowed" not in store.attrs
        np.testing.assert_array_equal(store.labels, labels[:50])
        return
    with pytest.raises(LabelSpaceError) as info:
        fgs.convert({"x": Untouchable()}, tmp_path / "bad.fgs", split=split_path, categories=cats_path,
                    progress=False)
    msg = str(info.value)
    assert str(split_path) in msg and str(cats_path) in msg
    assert f"{subset(split)} (labels 0..{int(subset(split)[3:]) - 1} span" in msg  # what the split looks like
    assert f"like {subset(categories)} ({int(subset(categories)[3:])} classes)" in msg  # ... and the categories
    assert "--allow-label-mismatch" in msg
    assert isinstance(info.value, fgs.ConversionError)
    assert not (tmp_path / "bad.fgs").exists()
    assert os.listdir(tmp_path) == []


def test_gym99_with_gym288_categories_names_what_would_go_wrong(tmp_path):
    split, cats = shared_file("gym99_val_element.txt"), shared_file("gym288_categories.txt")
    with pytest.raises(LabelSpaceError, match=r"its labels would take the names of other classes \(label \d+ "
                                              r"would be '.+' \((VT|FX|BB|UB)\)\)"):
        fgs.convert({"x": Untouchable()}, tmp_path / "bad.fgs", split=split, categories=cats, progress=False)


def test_gym288_split_with_gym99_categories_lists_labels_without_class(tmp_path):
    split, cats = shared_file("gym288_val_element.txt"), shared_file("gym99_categories.txt")
    with pytest.raises(LabelSpaceError, match=r"labels \[99, 100, .*, and 179 more\] have no class in "
                                              r".*gym99_categories\.txt; the labels look like gym288"):
        fgs.convert({"x": Untouchable()}, tmp_path / "bad.fgs", split=split, categories=cats, progress=False)


def test_the_split_file_name_alone_says_the_subset(tmp_path):
    # 60 gym99 val instances whose labels span fewer classes: the name says gym99.
    ids, labels = read_split(shared_file("gym99_val_element.txt"))
    keep = np.flatnonzero(labels < 40)[:60]
    named = tmp_path / "gym99_small.txt"
    named.write_text("".join(f"{ids[i]} {labels[i]}\n" for i in keep))
    plain = tmp_path / "small.txt"
    plain.write_bytes(named.read_bytes())
    table = tiny([ids[i] for i in keep])
    with pytest.raises(LabelSpaceError, match=r"gym99_small\.txt looks like gym99 \(labels up to \d+; its name "
                                              r"says gym99\) but .*gym288_categories\.txt looks like gym288"):
        fgs.convert(table, tmp_path / "a.fgs", split=named, categories=shared_file("gym288_categories.txt"),
                    progress=False)
    # Unnamed and not spanning a subset: nothing says these are not gym288 labels.
    store = fgs.convert({"x": table}, tmp_path / "b.fgs", split=plain,
                        categories=shared_file("gym288_categories.txt"), progress=False)
    assert store.label_space.subset == "gym288"


def test_allow_label_mismatch_is_recorded(tmp_path):
    store = real_store(tmp_path, "gym99_val_element.txt", "gym288_categories.txt", allow_label_mismatch=True)
    assert store.label_space == LabelSpace("gym288", 288, FINGERPRINTS["gym288"])
    reason = store.attrs["label_mismatch_allowed"]
    assert "gym99_val_element.txt looks like gym99" in reason and "gym288_categories.txt" in reason
    # The CLI's option does the same; without it, exit 2 and one line naming both files.
    ids, _ = read_split(shared_file("gym99_val_element.txt"))
    from finegym_store import synth

    synth.write_pickle(tmp_path / "x.pkl", tiny(ids))
    args = ["convert", tmp_path / "c.fgs", "-f", f"x={tmp_path / 'x.pkl'}", "--split",
            shared_file("gym99_val_element.txt"), "--categories", shared_file("gym530_categories.txt"), "-q"]
    r = cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "gym99_val_element.txt" in r.stderr and "gym530_categories.txt" in r.stderr
    assert not (tmp_path / "c.fgs").exists()
    r = cli(*args, "--allow-label-mismatch")
    assert r.returncode == 0, r.stderr
    reason = fgs.open(tmp_path / "c.fgs").attrs["label_mismatch_allowed"]
    assert reason.startswith(f"{shared_file('gym99_val_element.txt')} looks like gym99")


def test_bad_allow_label_mismatch_value(tmp_path):
    with pytest.raises(ValueError, match="allow_label_mismatch must be True or False, got 'yes'"):
        fgs.convert({"x": Untouchable()}, tmp_path / "a.fgs", split=shared_file("gym99_val_element.txt"),
                    allow_label_mismatch="yes", progress=False)


# -- Store.label_space ----------------------------------------------------------------------


def test_fingerprint_ignores_line_order_and_sees_every_field(tmp_path):
    lines = shared_file("gym99_categories.txt").read_text(encoding="utf-8").splitlines()
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    assert labelspace.of_categories(read_categories(shuffled)) == LabelSpace("gym99", 99, FINGERPRINTS["gym99"])
    for k, edit in enumerate([lambda s: s.replace("(VT)", "(FX)", 1), lambda s: s.replace("set:  1;", "set:  2;", 1),
                              lambda s: s[:-1] + "x", lambda s: s.replace("Glabel:   1", "Glabel:   2", 1)]):
        edited = tmp_path / f"edited{k}.txt"
        edited.write_text("\n".join([edit(lines[0])] + lines[1:]) + "\n", encoding="utf-8")
        space = labelspace.of_categories(read_categories(edited))
        assert space.fingerprint != FINGERPRINTS["gym99"] and space.num_classes == 99
        assert space.subset == "gym99"  # recognised by its class count


def test_label_space_without_hierarchy(tmp_path):
    store = real_store(tmp_path, "gym288_train_element_v1.0.txt", None)  # label 138 absent, span 288
    r = cli("info", store.path)
    assert r.returncode == 0 and "label space: gym288 (288 classes, no hierarchy)" in r.stdout
    assert store.classes is None
    assert store.label_space == LabelSpace("gym288", 288, None)
    assert store.attrs["label_space"] == {"subset": "gym288", "num_classes": 288, "fingerprint": None}
    # A store of unrecognised labels: its span.
    from finegym_store import synth

    ids = synth.make_ids(5)
    synth.write_split(tmp_path / "s.txt", ids, np.array([0, 3, 1, -1, 2], np.int32))
    small = fgs.convert({"x": tiny(ids)}, tmp_path / "s.fgs", split=tmp_path / "s.txt", progress=False)
    assert small.label_space == LabelSpace(None, 4, None)
    unlabelled = fgs.convert({"x": tiny(ids)}, tmp_path / "u.fgs", progress=False)
    assert unlabelled.label_space == LabelSpace(None, 0, None)
    assert LabelSpace.from_dict({"subset": "gym7", "num_classes": 7, "fingerprint": None}) is None
    assert LabelSpace.from_dict({"subset": None, "num_classes": True, "fingerprint": None}) is None


# -- the Arrow/Parquet importer ----------------------------------------------------------


def test_import_refuses_labels_that_do_not_fit(tmp_path):
    require("pyarrow", "pyarrow", "pip install pyarrow")
    store = real_store(tmp_path, "gym99_val_element.txt", "gym99_categories.txt")
    table = store.to_arrow(["id", "label", "x"])
    with pytest.raises(LabelSpaceError, match=r"column 'label' looks like gym99 .* but .*gym288_categories\.txt "
                                              r"looks like gym288 \(288 classes\)"):
        fgs.from_arrow(table, tmp_path / "bad.fgs", categories=shared_file("gym288_categories.txt"), progress=False)
    assert not (tmp_path / "bad.fgs").exists()
    with pytest.raises(LabelSpaceError, match=r"labels \[\d+.*\] have no class in .*gym99_categories"):
        gym288 = real_store(tmp_path, "gym288_val_element.txt", "gym288_categories.txt")
        fgs.from_arrow(gym288.to_arrow(["id", "label", "x"]), tmp_path / "bad.fgs",
                       categories=shared_file("gym99_categories.txt"), progress=False)
    ok = fgs.from_arrow(table, tmp_path / "ok.fgs", progress=False)  # the hierarchy in the table's metadata
    assert ok.label_space == store.label_space


# -- the probe ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_stores")
    return {
        "gym99_train": real_store(d, "gym99_train_element_v1.0.txt", "gym99_categories.txt"),
        "gym99_val": real_store(d, "gym99_val_element.txt", "gym99_categories.txt"),
        "gym288_val": real_store(d, "gym288_val_element.txt", "gym288_categories.txt"),
        "gym288_train": real_store(d, "gym288_train_element_v1.0.txt", "gym288_categories.txt"),
        "gym99_train_bare": real_store(d, "gym99_train_element_v1.0.txt", None, "gym99_train_bare.fgs"),
        "gym288_val_bare": real_store(d, "gym288_val_element.txt", None, "gym288_val_bare.fgs"),
        "gym99_val_bare": real_store(d, "gym99_val_element.txt", None, "gym99_val_bare.fgs"),
    }


@pytest.mark.parametrize("train,val,pattern", [
    ("gym99_train", "gym288_val", r"different label hierarchies: train .*gym99_train_element_v1\.0\.fgs is gym99 "
                                  r"\(99 classes, hierarchy c36b0100512744ef\) but val .*gym288_val_element\.fgs "
                                  r"is gym288 \(288 classes, hierarchy 3fd2735231ac4076\)"),
    ("gym288_train", "gym99_val", r"different label hierarchies"),
    ("gym99_train_bare", "gym288_val_bare", r"different label spaces: train .*gym99_train_bare\.fgs is gym99 "
                                            r"\(99 classes, no hierarchy\) but val .*gym288_val_bare\.fgs is gym288"),
    ("gym99_train", "gym288_val_bare", r"different label spaces"),
    ("gym99_train_bare", "gym288_val", r"different label spaces"),
])
def test_probe_refuses_stores_of_different_label_spaces(real_stores, train, val, pattern):
    with pytest.raises(LabelSpaceError, match=pattern):
        run_probe(real_stores[train], real_stores[val], "x", backend="numpy", epochs=1)
    with pytest.raises(LabelSpaceError, match=pattern):  # before the first pair trains
        run_probes([(real_stores["gym99_train"], real_stores["gym99_val"]), (real_stores[train], real_stores[val])],
                   ["x"], backend="numpy", epochs=1, log=lambda m: pytest.fail(f"trained: {m}"))


def test_probe_refuses_val_labels_outside_the_train_classes(tmp_path, real_stores):
    # gym99 val labels 0..98, a train store of labels 0..49 and no hierarchy.
    ids, labels = read_split(shared_file("gym99_train_element_v1.0.txt"))
    keep = [i for i in range(len(ids)) if labels[i] < 50]
    (tmp_path / "half.txt").write_text("".join(f"{ids[i]} {labels[i]}\n" for i in keep))
    half = fgs.convert({"x": tiny([ids[i] for i in keep])}, tmp_path / "half.fgs", split=tmp_path / "half.txt",
                       progress=False)
    with pytest.raises(LabelSpaceError, match=r"val .*gym99_val_bare\.fgs has labels 50, 51, .* \(and 39 more\) "
                                              r"that are not classes of train .*half\.fgs \(its classes 0\.\.49\)"):
        run_probe(half, real_stores["gym99_val_bare"], "x", backend="numpy", epochs=1)
    # With the hierarchy, the classes are the hierarchy's: gym288 train v1.0 lacks label 138, val has it.
    y = np.asarray(real_stores["gym288_train"].labels)
    assert 138 not in y and 138 in np.asarray(real_stores["gym288_val"].labels)
    labelspace.check_pair(real_stores["gym288_train"], real_stores["gym288_val"], ("element", "set", "event"))


def test_probe_refuses_train_labels_outside_the_val_hierarchy(tmp_path, real_stores):
    # gym288 train labels below 120 (a span no subset has), no hierarchy, against gym99 val with its hierarchy.
    ids, labels = read_split(shared_file("gym288_train_element_v1.0.txt"))
    keep = [i for i in range(len(ids)) if labels[i] < 120]
    (tmp_path / "t.txt").write_text("".join(f"{ids[i]} {labels[i]}\n" for i in keep))
    train = fgs.convert({"x": tiny([ids[i] for i in keep])}, tmp_path / "t.fgs", split=tmp_path / "t.txt",
                        progress=False)
    assert train.label_space == LabelSpace(None, 120, None)
    with pytest.raises(LabelSpaceError, match=r"train .*t\.fgs has labels 99, 100, .* \(and 11 more\) that are not "
                                              r"classes of the hierarchy stored in .*gym99_val_element\.fgs"):
        run_probe(train, real_stores["gym99_val"], "x", backend="numpy", epochs=1)


def test_probe_refuses_levels_without_hierarchy(real_stores):
    with pytest.raises(LabelSpaceError, match=r"level 'event' needs the label hierarchy, but neither train "
                                              r".*gym99_train_bare\.fgs nor val .*gym99_val_bare\.fgs has one"):
        run_probe(real_stores["gym99_train_bare"], real_stores["gym99_val_bare"], "x", backend="numpy",
                  levels=("element", "event"))


def test_probe_cli_exits_2_with_one_line(real_stores):
    for train, val, words in [("gym99_train_bare", "gym288_val_bare", "different label spaces"),
                              ("gym99_train", "gym288_val", "different label hierarchies")]:
        r = cli("probe", real_stores[train].path, real_stores[val].path, "--backend", "numpy", "--epochs", "1")
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr
        assert real_stores[train].path in r.stderr and real_stores[val].path in r.stderr
    r = cli("probe", real_stores["gym99_train_bare"].path, real_stores["gym99_val_bare"].path, "--level", "set",
            "--backend", "numpy")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs the label hierarchy" in r.stderr


def test_evaluate_refuses_scores_of_another_label_set(tmp_path, real_stores):
    h = Hierarchy.from_store(real_stores["gym288_val"])
    y = np.asarray(real_stores["gym99_val"].labels)[:100].astype(np.int64)
    with pytest.raises(LabelSpaceError, match="the scores have 99 class columns but the label hierarchy has "
                                              "classes 0..287"):
        evaluate(y, np.zeros((100, 99), np.float32), h, ("element", "set"))
    out = evaluate(y, np.zeros((100, 288), np.float32), h, ("element", "set"))
    assert out["levels"]["element"]["instances"] == 100


@pytest.mark.parametrize("split", SPLITS)
def test_set_categories_and_swapped_files_are_refused(tmp_path, split):
    sets = shared_file("set_categories.txt")
    with pytest.raises(fgs.ConversionError, match=rf"{sets}:1: expected 'Clabel: N; set: N; Glabel: N; \(EV\) name'"):
        fgs.convert({"x": Untouchable()}, tmp_path / "o.fgs", split=shared_file(split), categories=sets,
                    progress=False)
    cats = shared_file(f"{subset(split)}_categories.txt")
    with pytest.raises(fgs.ConversionError, match=rf"{cats}:1: expected '<element_id> <label>'"):
        fgs.convert({"x": Untouchable()}, tmp_path / "o.fgs", split=cats, categories=shared_file(split),
                    progress=False)
    assert os.listdir(tmp_path) == []


def test_a_name_its_labels_contradict_is_not_trusted(tmp_path):
    # gym288 val labels in a file named gym99: the labels span 288 classes, so it is gym288.
    split = tmp_path / "gym99_val_element.txt"
    split.write_bytes(shared_file("gym288_val_element.txt").read_bytes())
    ids, labels = read_split(split)
    store = fgs.convert({"x": tiny(ids)}, tmp_path / "a.fgs", split=split,
                        categories=shared_file("gym288_categories.txt"), progress=False)
    assert store.label_space.subset == "gym288"
    # Labels 0..149 (no subset's span) named gym99: not gym99 either.
    keep = np.flatnonzero(labels < 150)
    named = tmp_path / "gym99_part.txt"
    named.write_text("".join(f"{ids[i]} {labels[i]}\n" for i in keep))
    part = fgs.convert({"x": tiny([ids[i] for i in keep])}, tmp_path / "b.fgs", split=named, progress=False)
    assert part.label_space == LabelSpace(None, 150, None)
    fgs.convert({"x": tiny([ids[i] for i in keep])}, tmp_path / "c.fgs", split=named,
                categories=shared_file("gym288_categories.txt"), progress=False)
