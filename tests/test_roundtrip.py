from __future__ import annotations

import pickle

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import synth


def test_fixed_roundtrip_is_byte_equal(tmp_path):
    ids = synth.make_ids(50, seed=1)
    labels = synth.long_tailed_labels(50, 99, seed=1)
    table = synth.make_features(ids, labels, (12, 16, 1, 1), seed=1)
    split = tmp_path / "split.txt"
    synth.write_split(split, ids, labels)
    store = fgs.convert({"tsn": table}, tmp_path / "s.fgs", split=split, progress=False)
    assert len(store) == 50
    assert list(store.ids) == ids
    np.testing.assert_array_equal(store.labels, labels)
    for i, key in enumerate(ids):
        view = store.features("tsn", i)
        assert view.shape == (12, 16)
        assert view.tobytes() == table[key].reshape(12, 16).tobytes()
    assert store.column("tsn").shape == (50, 12, 16)
    assert store.verify() == []


def test_views_keep_mapping_alive(tmp_path):
    table = {"a": np.arange(24, dtype=np.float32).reshape(2, 12)}
    store = fgs.convert({"x": table}, tmp_path / "s.fgs", progress=False)
    view = store.features("x", 0)
    del store
    assert view.sum() == sum(range(24))
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0, 0] = 1.0


def test_store_pickles_by_path(tmp_path):
    table = {"a": np.ones((3, 4), np.float32), "b": np.zeros((3, 4), np.float32)}
    store = fgs.convert({"x": table}, tmp_path / "s.fgs", progress=False)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path
    np.testing.assert_array_equal(clone.features("x", 1), store.features("x", 1))


def test_hash64_matches_reference_xxh64():
    xxhash = pytest.importorskip("xxhash")  # in the [test] extra, so present in CI
    from finegym_store import _core

    rng = np.random.default_rng(0)
    for n in [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100, 4097, 100_000]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _core.hash64(data) == xxhash.xxh64_intdigest(data), n


def test_dropping_a_store_unmaps_the_file_without_gc(tmp_path):
    import gc
    import weakref

    store = fgs.convert({"x": {"a": np.ones((2, 3), np.float32)}}, tmp_path / "s.fgs", progress=False)
    store.column("x")  # columns exist and must not keep the store alive in a cycle
    ref = weakref.ref(store._reader)
    gc.disable()
    try:
        del store
        assert ref() is None
    finally:
        gc.enable()
