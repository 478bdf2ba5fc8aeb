"""The real FineGym annotation files (../shared/finegym): every id parses, the
facts stated in its README hold, the category files read, and the real gym99
val split converts end to end (with generated features: the released feature
values are no longer downloadable)."""

from __future__ import annotations

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import synth
from finegym_store.finegym import EVENTS, ElementId, parse_element_id, read_categories, read_split

from conftest import shared_file

#: file -> line count, from ../shared/finegym/README.md
SPLITS = {
    "gym99_train_element_v1.0.txt": 20484,
    "gym99_val_element.txt": 8521,
    "gym288_train_element_v1.0.txt": 22671,
    "gym288_val_element.txt": 9646,
    "gym99_train_element_v1.1.txt": 26320,
    "gym288_train_element_v1.1.txt": 29334,
}
NUM_CLASSES = {"gym99": 99, "gym288": 288}

_cache: dict[str, tuple[list[str], np.ndarray]] = {}


def split(name: str) -> tuple[list[str], np.ndarray]:
    """(ids, labels) of a real split file, read once per session."""
    if name not in _cache:
        _cache[name] = read_split(shared_file(name))
    return _cache[name]


def subset(name: str) -> str:
    return name.split("_", 1)[0]


# -- split files ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPLITS))
def test_split_file_layout_and_every_id_parses(name):
    path = shared_file(name)
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    lines = raw.decode("ascii").split("\n")[:-1]
    assert len(lines) == SPLITS[name]
    for line in lines:  # '<element_id> <label>', a single space
        key, sep, label = line.partition(" ")
        assert sep and " " not in label and label.isdigit(), line

    ids, labels = split(name)
    assert len(ids) == SPLITS[name] == len(labels)
    assert ids == [line.partition(" ")[0] for line in lines]  # file order
    assert len(set(ids)) == len(ids)  # unique within a file
    assert labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == NUM_CLASSES[subset(name)] - 1

    for key in ids:
        p = parse_element_id(key)
        assert isinstance(p, ElementId), key
        assert len(p.video) == 11
        # the id is exactly what its fields print as
        assert key == (f"{p.video}_E_{p.event_start:06d}_{p.event_end:06d}"
                       f"_A_{p.element_start:04d}_{p.element_end:04d}")
        assert p.event_start <= p.event_end
        assert p.element_start <= p.element_end  # AS may equal AE


@pytest.mark.parametrize("name", ["gym99_train_element_v1.0.txt", "gym99_val_element.txt",
                                  "gym288_val_element.txt", "gym99_train_element_v1.1.txt",
                                  "gym288_train_element_v1.1.txt"])
def test_every_label_is_present(name):
    _, labels = split(name)
    assert set(np.unique(labels).tolist()) == set(range(NUM_CLASSES[subset(name)]))


def test_gym288_train_v10_lacks_label_138():
    _, labels = split("gym288_train_element_v1.0.txt")
    present = set(np.unique(labels).tolist())
    assert present == set(range(288)) - {138}


@pytest.mark.parametrize("sub", ["gym99", "gym288"])
def test_train_and_val_share_no_id(sub):
    val = set(split(f"{sub}_val_element.txt")[0])
    for version in ("v1.0", "v1.1"):
        train = set(split(f"{sub}_train_element_{version}.txt")[0])
        assert not train & val, version


@pytest.mark.parametrize("sub", ["gym99", "gym288"])
def test_train_v11_is_a_superset_of_v10_with_the_same_labels(sub):
    old = dict(zip(*split(f"{sub}_train_element_v1.0.txt")))
    new = dict(zip(*split(f"{sub}_train_element_v1.1.txt")))
    assert set(old) < set(new)
    assert all(new[k] == v for k, v in old.items())


def test_gym99_train_class_sizes_are_long_tailed():
    _, labels = split("gym99_train_element_v1.0.txt")
    sizes = np.bincount(labels, minlength=99)
    assert len(sizes) == 99
    assert sizes.min() == 47 and sizes.max() == 1130


def test_39_videos_appear_in_both_gym99_train_and_val():
    def videos(name):
        return {parse_element_id(k).video for k in split(name)[0]}

    assert len(videos("gym99_train_element_v1.0.txt") & videos("gym99_val_element.txt")) == 39


# -- category files ---------------------------------------------------------------


@pytest.mark.parametrize("sub, count", [("gym99", 99), ("gym288", 288), ("gym530", 530)])
def test_categories(sub, count):
    cats = read_categories(shared_file(f"{sub}_categories.txt"))
    assert len(cats) == count
    assert len(cats.label) == len(cats.glabel) == len(cats.set) == len(cats.event) == count
    assert cats.label.tolist() == list(range(count))
    assert set(cats.event) <= {"VT", "FX", "BB", "UB"}
    assert set(cats.event) == {"VT", "FX", "BB", "UB"}
    for s, ev in zip(cats.set.tolist(), cats.event):
        assert EVENTS[s // 10] == ev, (s, ev)  # tens digit: 0 (set 1) VT, 2x FX, 3x BB, 4x UB
    assert cats.glabel.min() >= 0 and cats.glabel.max() <= 529
    assert len(set(cats.glabel.tolist())) == count
    assert all(n for n in cats.name)
    if sub == "gym530":
        assert (cats.glabel == cats.label).all()  # Glabel is the label


def test_gym99_covers_14_sets_without_23():
    sets = set(read_categories(shared_file("gym99_categories.txt")).set.tolist())
    assert len(sets) == 14 and 23 not in sets
    all_sets = {int(line.split(";")[0].split(":")[1])
                for line in shared_file("set_categories.txt").read_text().splitlines() if line.strip()}
    assert len(all_sets) == 15 and sets == all_sets - {23}


@pytest.mark.parametrize("sub", ["gym99", "gym288"])
def test_hierarchy_agrees_with_gym530(sub):
    """A gym99/gym288 class is the gym530 element of its Glabel."""
    g530 = read_categories(shared_file("gym530_categories.txt"))
    by_glabel = {g: (s, e, n) for g, s, e, n in zip(g530.glabel.tolist(), g530.set.tolist(), g530.event, g530.name)}
    cats = read_categories(shared_file(f"{sub}_categories.txt"))
    for g, s, e, n in zip(cats.glabel.tolist(), cats.set.tolist(), cats.event, cats.name):
        assert by_glabel[g] == (s, e, n), g


def test_shipped_sample_categories_is_the_real_file():
    from importlib import resources

    shipped = (resources.files("finegym_store") / "sample" / "gym99_categories.txt").read_bytes()
    assert shipped == shared_file("gym99_categories.txt").read_bytes()


# -- end to end: the real gym99 val split ------------------------------------------


def test_convert_real_gym99_val(tmp_path):
    split_path = shared_file("gym99_val_element.txt")
    cats_path = shared_file("gym99_categories.txt")
    ids, labels = split("gym99_val_element.txt")
    shape = (12, 8, 1, 1)
    table = synth.make_features(ids, labels, shape, seed=3)
    # dict order differs from the split order: the split must decide the order
    table = dict(sorted(table.items()))

    store = fgs.convert({"tsn": table}, tmp_path / "gym99_val.fgs", split=split_path,
                        categories=cats_path, progress=False)
    assert len(store) == 8521
    assert store.format_version == fgs.FORMAT_VERSION
    assert store.columns == ("tsn",)
    assert store.column("tsn").shape == (8521, 12, 8)
    assert store.ids.to_list() == ids
    np.testing.assert_array_equal(store.labels, labels)

    parsed = [parse_element_id(k) for k in ids]
    meta = store.meta
    assert meta.video.to_list() == [p.video for p in parsed]
    for field in ("event_start", "event_end", "element_start", "element_end"):
        arr = getattr(meta, field)
        assert arr.dtype == np.int32
        np.testing.assert_array_equal(arr, [getattr(p, field) for p in parsed], err_msg=field)

    cats = read_categories(cats_path)
    names = store.label_names
    assert names is not None and len(names) == 99
    for label in np.unique(labels).tolist():
        assert names[label] == cats.name[label]
    classes = store.classes
    assert classes is not None
    np.testing.assert_array_equal(classes.label, cats.label)
    np.testing.assert_array_equal(classes.glabel, cats.glabel)
    np.testing.assert_array_equal(classes.set, cats.set)
    assert classes.event.to_list() == cats.event
    assert classes.name.to_list() == cats.name

    rng = np.random.default_rng(0)
    sample = np.concatenate([[0, len(ids) - 1], rng.choice(len(ids), 300, replace=False)])
    col = store.column("tsn")
    for i in sample.tolist():
        expected = table[ids[i]].reshape(12, 8).tobytes()
        assert store.features("tsn", i).tobytes() == expected
        assert col[i].tobytes() == expected

    np.testing.assert_array_equal(store.index_of(ids), np.arange(len(ids)))
    assert store.index_of(ids[1234]) == 1234
    assert store.verify() == []
