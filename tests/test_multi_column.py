"""Several feature columns in one gather: one draw of segments, a dict of
arrays or one concatenated array, from Store.gather and the Loader (the
torch Dataset's are in test_torch.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require

import finegym_store as fgs
from finegym_store import synth


def _tables(n: int, lengths, seed: int):
    """Column 'a' (C = 8, T from `lengths`), 'b' = 2 * a[:, :5] and 'c' (C = 3, random, same T)."""
    rng = np.random.default_rng(seed)
    ids = synth.make_ids(n, seed=seed)
    a = {k: rng.standard_normal((int(t), 8)).astype(np.float32) for k, t in zip(ids, lengths)}
    b = {k: 2 * v[:, :5] for k, v in a.items()}
    c = {k: rng.standard_normal((len(v), 3)).astype(np.float32) for k, v in a.items()}
    return ids, a, b, c


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Fixed T = 12: columns a, b = 2a[:, :5], c; d has T = 6."""
    folder = tmp_path_factory.mktemp("multi")
    ids, a, b, c = _tables(37, [12] * 37, seed=3)
    labels = synth.long_tailed_labels(37, 5, seed=3)
    synth.write_split(folder / "split.txt", ids, labels)
    d = {k: v[:6, :2] for k, v in a.items()}
    return fgs.convert({"a": a, "b": b, "c": c, "d": d}, folder / "s.fgs", split=folder / "split.txt",
                       progress=False)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """Ragged a and b = 2a[:, :5] (equal T per instance); e ragged with other T; f fixed T = 12."""
    folder = tmp_path_factory.mktemp("ragged")
    lengths = np.random.default_rng(5).integers(2, 20, 25)
    ids, a, b, _ = _tables(25, lengths, seed=5)
    e = {k: np.ones((len(v) + (j == 7), 4), np.float32) for j, (k, v) in enumerate(a.items())}
    f = {k: np.zeros((12, 2), np.float32) for k in ids}
    return fgs.convert({"a": a, "b": b, "e": e, "f": f}, folder / "r.fgs", progress=False)


SPECS = [{"num_segments": 3, "mode": "train"}, {"num_segments": 4, "mode": "test"},
         {"num_segments": 2, "mode": "train", "clip_len": 3, "seed": 7}, {"num_segments": None}]


@pytest.mark.parametrize("spec", SPECS)
def test_dict_is_the_single_column_gathers_with_one_draw(store, spec):
    idx = np.array([5, 0, 36, -1, 5, 17])
    for epoch in range(3):
        got = store.gather(["c", "a", "b"], idx, epoch=epoch, **spec)
        assert list(got) == ["c", "a", "b"]
        for name, values in got.items():
            single = store.gather(name, idx, epoch=epoch, **spec)
            assert values.dtype == single.dtype and values.tobytes() == single.tobytes()
        # One draw: b is 2a wherever the segments are drawn (train mode, K < T).
        np.testing.assert_array_equal(got["b"], 2 * got["a"][:, :, :5])
        cat = store.gather(("b", "c", "a"), idx, epoch=epoch, concat=True, **spec)
        np.testing.assert_array_equal(cat, np.concatenate([got["b"], got["c"], got["a"]], axis=2))
        assert cat.flags.c_contiguous and cat.shape[2] == 5 + 3 + 8


def test_train_segments_differ_between_epochs_and_stay_paired(store):
    idx = np.arange(len(store))
    e0 = store.gather(["a", "b"], idx, num_segments=3, mode="train", epoch=0)
    e1 = store.gather(["a", "b"], idx, num_segments=3, mode="train", epoch=1)
    assert e0["a"].tobytes() != e1["a"].tobytes()
    np.testing.assert_array_equal(e1["b"], 2 * e1["a"][:, :, :5])


def test_one_column_forms(store):
    idx = [3, 1]
    plain = store.gather("a", idx, num_segments=3, mode="test")
    assert store.gather("a", idx, num_segments=3, mode="test", concat=True).tobytes() == plain.tobytes()
    one = store.gather(["a"], idx, num_segments=3, mode="test")
    assert list(one) == ["a"] and one["a"].tobytes() == plain.tobytes()
    assert store.gather(["a"], idx, num_segments=3, mode="test", concat=True).tobytes() == plain.tobytes()
    empty = store.gather(["a", "c"], [], num_segments=3, mode="test", concat=True)
    assert empty.shape == (0, 3, 11)
    with pytest.raises(TypeError, match="concat"):
        store.gather("a", idx, num_segments=3, mode="test", concat="yes")


def test_out_forms(store):
    idx = np.array([2, 9, 4])
    want = store.gather(["a", "c"], idx, num_segments=3, mode="train", epoch=2)
    out = {"c": np.full((3, 3, 3), np.nan, np.float32), "a": np.full((3, 3, 8), np.nan, np.float32)}
    got = store.gather(["a", "c"], idx, num_segments=3, mode="train", epoch=2, out=out)
    assert list(got) == ["a", "c"] and got["a"] is out["a"] and got["c"] is out["c"]
    for name in want:
        np.testing.assert_array_equal(out[name], want[name])
    big = np.full((3, 3, 11), np.nan, np.float32)
    assert store.gather(["a", "c"], idx, num_segments=3, mode="train", epoch=2, out=big, concat=True) is big
    np.testing.assert_array_equal(big, np.concatenate([want["a"], want["c"]], axis=2))

    with pytest.raises(TypeError, match="dict of arrays keyed by column"):
        store.gather(["a", "c"], idx, num_segments=3, mode="train", out=big)
    with pytest.raises(ValueError, match="one array per column"):
        store.gather(["a", "c"], idx, num_segments=3, mode="train", out={"a": out["a"]})
    with pytest.raises(ValueError, match="shape"):  # a wrong array in the dict: the core's message
        store.gather(["a", "c"], idx, num_segments=3, mode="train", out={"a": out["c"], "c": out["a"]})
    for bad in (np.zeros((3, 3, 12), np.float32), np.zeros((3, 3, 11), np.float16),
                np.zeros((3, 11, 3), np.float32).transpose(0, 2, 1), big[:, :, :].copy()[:, :, ::-1]):
        with pytest.raises(ValueError, match=r"writeable C-contiguous float32 array of shape \(3, 3, 11\)"):
            store.gather(["a", "c"], idx, num_segments=3, mode="train", out=bad, concat=True)
    readonly = np.zeros((3, 3, 11), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        store.gather(["a", "c"], idx, num_segments=3, mode="train", out=readonly, concat=True)


def test_single_column_out_may_be_a_column_slice(store):
    # The core writes rows at a stride: a column slice of a C-contiguous array.
    idx = np.arange(len(store))
    for spec in ({"num_segments": 5, "mode": "train", "clip_len": 2}, {"num_segments": None},
                 {"num_segments": 1, "mode": "test"}, {"num_segments": 3, "mode": "test", "dtype": "float16"}):
        want = store.gather("a", idx, **spec)
        wide = np.full((len(idx), want.shape[1], 19), 7, want.dtype)
        assert np.shares_memory(store.gather("a", idx, out=wide[:, :, 4:12], **spec), wide)
        np.testing.assert_array_equal(wide[:, :, 4:12], want)
        assert (wide[:, :, :4] == 7).all() and (wide[:, :, 12:] == 7).all()
    wide = np.zeros((len(idx), 3, 19), np.float32)
    for bad, why in ((wide[:, :, 0:16:2], "every other channel"), (wide[:, :, 12:].copy()[:, :, :0], "no channels"),
                     (np.zeros((3, len(idx), 19), np.float32).transpose(1, 0, 2)[:, :, :8], "rows apart"),
                     (wide[::-1, :, :8], "negative stride")):
        with pytest.raises(ValueError, match="C-contiguous or a column slice"):
            store.gather("a", idx, num_segments=3, mode="train", out=bad)
        assert why
    readonly = wide[:, :, :8]
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        store.gather("a", idx, num_segments=3, mode="train", out=readonly)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Column h stored float16, f float32, T = 6."""
    pa = require("pyarrow", "pyarrow", "pip install pyarrow; CI installs the arrow extra")
    rng = np.random.default_rng(2)
    values = rng.standard_normal((9, 6, 4)).astype(np.float32)
    t = pa.list_(pa.list_(pa.float32(), 4), 6)
    table = pa.table({"id": [f"v{i}" for i in range(9)],
                      "h": pa.array(values.tolist(), type=t), "f": pa.array((values * 3).tolist(), type=t)})
    path = tmp_path_factory.mktemp("mixed") / "m.fgs"
    return fgs.from_arrow(table, path, dtype={"h": "float16", "f": "float32"}, progress=False)


def test_mixed_dtypes(mixed):
    assert mixed.column("h").dtype == np.float16 and mixed.column("f").dtype == np.float32
    idx = np.arange(9)
    got = mixed.gather(["h", "f"], idx, num_segments=2, mode="train")
    assert got["h"].dtype == np.float16 and got["f"].dtype == np.float32
    with pytest.raises(ValueError, match=r"'h' float16, 'f' float32.*dtype=\"float32\""):
        mixed.gather(["h", "f"], idx, num_segments=2, mode="train", concat=True)
    cat = mixed.gather(["h", "f"], idx, num_segments=2, mode="train", concat=True, dtype="float32")
    assert cat.dtype == np.float32
    np.testing.assert_array_equal(cat, np.concatenate([got["h"].astype(np.float32), got["f"]], axis=2))
    half = mixed.gather(["f", "h"], idx, num_segments=None, concat=True, dtype="float16")
    np.testing.assert_array_equal(half[:, :, 4:], mixed.gather("h", idx))


def test_unequal_t_is_an_error_naming_both_columns(store, ragged):
    with pytest.raises(ValueError, match=r"columns 'a' \(T = 12 \(every instance\)\) and 'd' \(T = 6 \(every "
                                         r"instance\)\) differ in T at instance 0 \(id '.+'\).*one segment draw"):
        store.gather(["a", "b", "d"], [0], num_segments=3, mode="train")
    i = ragged.ids.to_list().index(synth.make_ids(25, seed=5)[7])  # e has one more segment there
    t = ragged.column("a").lengths()[i]
    with pytest.raises(ValueError, match=rf"'a' \(T = {t}\) and 'e' \(T = {t + 1}\) differ in T at instance {i} "
                                         rf"\(id '{ragged.ids[i]}'\)"):
        ragged.gather(["a", "e"], [0], num_segments=3, mode="train")
    t0 = ragged.column("a").lengths()[0]
    with pytest.raises(ValueError, match=rf"'f' \(T = 12 \(every instance\)\) and 'a' \(T = {t0}\) differ in T "
                                         r"at instance 0"):
        ragged.gather(["f", "a"], [1], num_segments=3, mode="train")
    with pytest.raises(ValueError, match="differ in T"):
        store.loader(["a", "d"], 4, num_segments=3, mode="train")
    with pytest.raises(ValueError, match="differ in T"):  # again: a failed check is not cached
        store.gather(["d", "a"], [0], num_segments=3, mode="train")


def test_ragged_columns_with_equal_t(ragged):
    idx = np.arange(len(ragged))
    for mode in ("train", "test"):
        for epoch in range(2):
            got = ragged.gather(["a", "b"], idx, num_segments=4, mode=mode, epoch=epoch)
            for name in got:
                assert got[name].tobytes() == ragged.gather(name, idx, num_segments=4, mode=mode,
                                                            epoch=epoch).tobytes()
            np.testing.assert_array_equal(got["b"], 2 * got["a"][:, :, :5])
    for concat in (False, True):
        with pytest.raises(ValueError, match="ragged.*num_segments=K"):
            ragged.gather(["a", "b"], idx, num_segments=None, concat=concat)


def test_hostile_column_arguments(store):
    idx = [0]
    kw = {"num_segments": 3, "mode": "test"}
    with pytest.raises(ValueError, match="empty list names no column.*columns: a, b, c, d"):
        store.gather([], idx, **kw)
    with pytest.raises(ValueError, match=r"'a' appears twice in the list \(positions 0 and 1\)"):
        store.gather(["a"] * 1000, idx, **kw)
    with pytest.raises(ValueError, match=r"'b' appears twice in the list \(positions 1 and 3\)"):
        store.gather(("a", "b", "c", "b"), idx, **kw)
    for bad, what in ((["a", 3], "entry 1 must be a str.*int 3"), ([b"a"], "entry 0 must be a str.*bytes"),
                      ([["a", "b"]], "entry 0 must be a str.*list"), ([None], "entry 0.*NoneType"),
                      ({"a", "b"}, "a str or a list or tuple of str.*set"), (3, "got int"),
                      (np.array(["a", "b"]), "got ndarray"), ({"a": 1}, "got dict")):
        with pytest.raises(TypeError, match=what):
            store.gather(bad, idx, **kw)
    with pytest.raises(KeyError, match="no feature column 'nope'.*columns: a, b, c, d"):
        store.gather(["a", "nope"], idx, **kw)
    with pytest.raises(KeyError, match="no feature column 'a,b'"):  # a str is one name, never split
        store.gather("a,b", idx, **kw)
    with pytest.raises(KeyError, match="no feature column 'ab'"):
        store.gather(["ab"], idx, **kw)
    with pytest.raises(TypeError, match="concat must be"):
        store.gather(["a", "b"], idx, concat=1, **kw)


# ---- loader --------------------------------------------------------------------------
@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
def test_loader_of_several_columns(store, concat, reuse):
    loader = store.loader(["a", "c", "b"], 8, num_segments=3, mode="train", seed=4, concat=concat,
                          reuse_buffers=reuse, prefetch=2)
    seen: list[list[int]] = []
    alive = []
    for epoch in range(2):
        seen.append([])
        for batch in loader:
            want = store.gather(["a", "c", "b"], batch.indices, num_segments=3, mode="train", seed=4,
                                epoch=epoch, concat=concat)
            if concat:
                assert isinstance(batch.features, np.ndarray)
                np.testing.assert_array_equal(batch.features, want)
                np.testing.assert_array_equal(batch.features[:, :, 11:], 2 * batch.features[:, :, :5])
                seen[-1].append(batch.features.__array_interface__["data"][0])
            else:
                assert list(batch.features) == ["a", "c", "b"]
                for name in want:
                    np.testing.assert_array_equal(batch.features[name], want[name])
                seen[-1].append(batch.features["a"].__array_interface__["data"][0])
            np.testing.assert_array_equal(batch.labels, store.labels[batch.indices])
            alive.append(batch.features)  # no address freed and handed out again
    for epoch in seen:
        assert len(epoch) == len(loader) == 5
        # With reuse_buffers the full batches of an epoch come back in a few
        # buffers (prefetch + 1 in flight, one held); without, each is new.
        assert len(set(epoch[:4])) == (3 if reuse else 4)


def test_loader_state_of_several_columns(store):
    def make(columns=("a", "b"), concat=True):
        return store.loader(list(columns), 5, num_segments=2, mode="train", seed=1, concat=concat)

    loader = make()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["column"] == ["a", "b"] and state["concat"] is True and state["batches"] == 3
    rest = [b.features for b in it]
    resumed = make()
    resumed.load_state_dict(state)
    again = [b.features for b in resumed]
    assert len(again) == len(rest) and all(x.tobytes() == y.tobytes() for x, y in zip(rest, again))
    with pytest.raises(ValueError, match="concat differs"):
        make(concat=False).load_state_dict(state)
    with pytest.raises(ValueError, match="column differs"):
        make(columns=("b", "a")).load_state_dict(state)
    single = store.loader("a", 5, num_segments=2, mode="train", seed=1)
    single_state = single.state_dict()
    assert single_state["column"] == "a" and "concat" not in single_state
    with pytest.raises(ValueError, match="column differs"):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match="column differs"):
        make().load_state_dict(single_state)
    store.loader("a", 5, num_segments=2, mode="train", seed=1).load_state_dict(single_state)
