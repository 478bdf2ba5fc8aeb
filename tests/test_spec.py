"""SegmentSpec (one validated gather spec), argument conversion everywhere,
keyword-only options, and store properties computed once."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import SegmentSpec, _core
from conftest import require_torch, synthetic_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec")
    return synthetic_store(folder, 40, 5, shape=(12, 16, 1, 1))


# ---- the spec --------------------------------------------------------------------------
BAD_SPECS = [
    ({"num_segments": True, "mode": "test"}, TypeError, "num_segments"),
    ({"num_segments": 2.0, "mode": "test"}, TypeError, "num_segments"),
    ({"num_segments": "3", "mode": "test"}, TypeError, "num_segments"),
    ({"num_segments": 0, "mode": "test"}, ValueError, "num_segments"),
    ({"num_segments": -1, "mode": "test"}, ValueError, "num_segments"),
    ({"num_segments": 2**54, "mode": "test"}, ValueError, "num_segments"),
    ({"num_segments": 3, "mode": "TRAIN"}, ValueError, "mode"),
    ({"num_segments": 3, "mode": 1}, TypeError, "mode"),
    ({"num_segments": 3, "mode": "test", "clip_len": 0}, ValueError, "clip_len"),
    ({"num_segments": 3, "mode": "test", "clip_len": 1.0}, TypeError, "clip_len"),
    ({"num_segments": 3, "mode": "test", "clip_len": True}, TypeError, "clip_len"),
    ({"clip_len": 2}, ValueError, "clip_len"),
    ({"num_segments": 2**30, "mode": "test", "clip_len": 2**30}, ValueError, "num_segments x clip_len"),
    ({"rule": "tsn"}, ValueError, "rule"),
    ({"rule": None}, TypeError, "rule"),
    ({"dtype": "int32"}, ValueError, "dtype"),
    ({"dtype": "float64"}, ValueError, "dtype"),
    ({"dtype": np.dtype("f4").newbyteorder("S")}, ValueError, "dtype"),
    ({"dtype": object()}, TypeError, "dtype"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 2**64}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": True}, TypeError, "seed"),
]


@pytest.mark.parametrize("kw, exc, name", BAD_SPECS)
def test_bad_spec_values_name_the_field(kw, exc, name):
    with pytest.raises(exc, match=name) as e:
        SegmentSpec(**kw)
    assert type(e.value) is exc


def test_mode_is_required_with_num_segments(store):
    for call in (lambda: SegmentSpec(3),
                 lambda: store.gather("x", [0], num_segments=3),
                 lambda: store.loader("x", 4, num_segments=3),
                 lambda: fgs.Loader(store, "x", 4, num_segments=3)):
        with pytest.raises(ValueError, match=r'mode="train" \(training.*mode="test" \(evaluation'):
            call()
    # All T segments need no mode; a mode there changes nothing.
    everything = store.gather("x", [0, 1])
    assert everything.shape == (2, 12, 16)
    np.testing.assert_array_equal(everything, store.gather("x", [0, 1], mode="train", seed=3, epoch=2))
    np.testing.assert_array_equal(everything, store.column("x")[[0, 1]])


def test_spec_is_a_value(store):
    a = SegmentSpec(3, mode="test", dtype=np.float16, seed=np.uint8(4))
    b = SegmentSpec(3, mode="test", dtype="float16", seed=4)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert (a.dtype, type(a.seed)) == ("float16", int)
    assert a != SegmentSpec(3, mode="train", dtype="float16", seed=4)
    assert a.rows == 3 and SegmentSpec().rows is None and SegmentSpec(4, mode="test", clip_len=2).rows == 8
    with pytest.raises(AttributeError):
        a.mode = "train"  # type: ignore[misc]
    with pytest.raises(TypeError):
        SegmentSpec(3, "test")  # type: ignore[misc]  # everything after num_segments is keyword-only
    assert a.replace(mode="train").mode == "train"
    with pytest.raises(ValueError, match="mode"):
        a.replace(mode=None)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        c = pickle.loads(pickle.dumps(a, protocol))
        assert c == a and hash(c) == hash(a)
        assert (c._native.num_segments, c._native.mode, c._native.dtype) == (3, "test", np.float16)
        np.testing.assert_array_equal(store.gather("x", [0, 5], spec=c), store.gather("x", [0, 5], spec=a))


def test_pickle_carries_fields_only_and_revalidates():
    raw = pickle.dumps(SegmentSpec(3, mode="train"))
    assert b"GatherSpec" not in raw
    with pytest.raises(TypeError):
        pickle.dumps(SegmentSpec(3, mode="train")._native)


def test_sample_segments_takes_a_spec_or_its_fields():
    spec = SegmentSpec(5, mode="train", clip_len=2, rule="exact", seed=9)
    by_spec = _core.sample_segments(20, spec._native, epoch=3, index=7)
    by_fields = _core.sample_segments(20, 5, 2, "train", seed=9, epoch=3, index=7, rule="exact")
    np.testing.assert_array_equal(by_spec, by_fields)
    with pytest.raises(TypeError):
        _core.sample_segments(20, 5, 2, "train", 9)  # seed, epoch and index are keyword-only
    with pytest.raises(ValueError, match="num_segments"):
        _core.sample_segments(20, SegmentSpec()._native)


def test_spec_or_keywords_not_both(store):
    spec = SegmentSpec(3, mode="test")
    with pytest.raises(TypeError, match="not both"):
        store.gather("x", [0], spec=spec, seed=1)
    with pytest.raises(TypeError, match="not both"):
        store.loader("x", 4, spec=spec, num_segments=2)
    with pytest.raises(TypeError, match="spec must be a finegym_store.SegmentSpec"):
        store.gather("x", [0], spec={"num_segments": 3})
    for name in ("sampling", "prefetch", "segments"):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            store.gather("x", [0], **{name: "x"})
    np.testing.assert_array_equal(store.gather("x", [0, 3], spec=spec),
                                  store.gather("x", [0, 3], num_segments=3, mode="test"))


# ---- keyword-only options --------------------------------------------------------------
def test_options_are_keyword_only(store, tmp_path):
    calls = {
        "gather": lambda: store.gather("x", [0], SegmentSpec()),  # type: ignore[misc]
        "gather old positional": lambda: store.gather("x", [0], 2, "train", 1, 2),  # type: ignore[misc]
        "loader": lambda: store.loader("x", 4, SegmentSpec()),  # type: ignore[misc]
        "Loader": lambda: fgs.Loader(store, "x", 4, SegmentSpec()),  # type: ignore[misc]
        "to_arrow": lambda: store.to_arrow(None, "nested"),  # type: ignore[misc]
        "to_batches": lambda: store.to_batches(None, 10),  # type: ignore[misc]
        "to_parquet": lambda: store.to_parquet(tmp_path / "p.parquet", None, 10),  # type: ignore[misc]
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="positional"):
            call()
    assert not (tmp_path / "p.parquet").exists()


# ---- counts and indices ----------------------------------------------------------------
def test_bools_and_floats_are_not_counts_or_indices(store):
    spec = SegmentSpec(3, mode="test")
    bad = [
        ("indices", lambda: store.gather("x", [2.5], spec=spec)),
        ("indices", lambda: store.gather("x", [2.0], spec=spec)),
        ("bools", lambda: store.gather("x", [True], spec=spec)),
        ("indices", lambda: store.gather("x", np.array([0.0]), spec=spec)),
        ("epoch", lambda: store.gather("x", [0], spec=spec, epoch=1.0)),
        ("epoch", lambda: store.gather("x", [0], spec=spec, epoch=True)),
        ("threads", lambda: store.gather("x", [0], spec=spec, threads=2.0)),
        ("threads", lambda: store.gather("x", [0], spec=spec, threads=True)),
        ("batch_size", lambda: store.loader("x", 2.5, spec=spec)),
        ("batch_size", lambda: store.loader("x", True, spec=spec)),
        ("batch_size", lambda: store.loader("x", 4.0, spec=spec)),
        ("world_size", lambda: store.loader("x", 4, spec=spec, world_size=2.0)),
        ("rank", lambda: store.loader("x", 4, spec=spec, rank=True)),
        ("prefetch", lambda: store.loader("x", 4, spec=spec, prefetch=1.0)),
        ("threads", lambda: store.loader("x", 4, spec=spec, threads=True)),
        ("shuffle", lambda: store.loader("x", 4, spec=spec, shuffle=1)),
        ("index", lambda: store.ids[2.5]),
        ("index", lambda: store.ids[True]),
        ("index", lambda: store.ids[np.float64(1)]),
        ("index", lambda: store.features("x", 1.0)),
        ("index", lambda: store.features("x", True)),
        ("sampler", lambda: store.loader("x", 4, spec=spec, sampler=None)),
    ]
    for name, call in bad:
        with pytest.raises(TypeError, match=name):
            call()
    loader = store.loader("x", 4, spec=spec)
    with pytest.raises(TypeError, match="epoch"):
        loader.set_epoch(True)
    with pytest.raises(TypeError, match="epoch"):
        loader.indices(1.0)
    # Values, not types: ValueError naming the argument.
    for name, call in (("batch_size", lambda: store.loader("x", 0, spec=spec)),
                       ("world_size", lambda: store.loader("x", 4, spec=spec, world_size=0)),
                       ("rank", lambda: store.loader("x", 4, spec=spec, rank=2, world_size=2)),
                       ("prefetch", lambda: store.loader("x", 4, spec=spec, prefetch=-1)),
                       ("sampler", lambda: store.loader("x", 4, spec=spec, sampler="random")),
                       ("readahead", lambda: store.gather("x", [0], spec=spec, readahead="always"))):
        with pytest.raises(ValueError, match=name):
            call()
    # Integers of any integer type are fine.
    assert store.ids[np.int32(1)] == store.ids[1] == store.ids[-len(store) + 1]
    assert len(store.loader("x", np.int64(8), spec=spec, world_size=np.uint8(2))) == 3
    with pytest.raises(IndexError, match="out of range"):
        store.ids[len(store)]


def test_dataset_refuses_bools_and_floats(store):
    require_torch()
    from finegym_store.torch import StoreDataset

    with pytest.raises(ValueError, match="mode"):
        StoreDataset(store, "x", num_segments=3)
    with pytest.raises(TypeError, match="positional"):
        StoreDataset(store, "x", SegmentSpec())  # type: ignore[misc]
    with pytest.raises(TypeError, match="threads"):
        StoreDataset(store, "x", threads=2.0)
    with pytest.raises(TypeError, match="num_segments"):
        StoreDataset(store, "x", num_segments=True, mode="test")
    ds = StoreDataset(store, "x", spec=SegmentSpec(3, mode="test"))
    for bad in (2.5, 2.0, True):
        with pytest.raises(TypeError):
            ds[bad]
        with pytest.raises(TypeError):
            ds.__getitems__([0, bad])
    with pytest.raises(TypeError, match="epoch"):
        ds.set_epoch(1.0)
    # No entry point defaults to train or test segments: without a spec, all T.
    assert StoreDataset(store, "x")[0][0].shape == (12, 16)
    # The dataset crosses a spawn boundary by pickle, its spec by fields.
    again = pickle.loads(pickle.dumps(ds))
    assert again.spec == ds.spec and again.spec is not ds.spec
    np.testing.assert_array_equal(again.__getitems__([1, 2]).features.numpy(),
                                  ds.__getitems__([1, 2]).features.numpy())


# ---- the loader over a spec --------------------------------------------------------------
def test_loader_keeps_the_spec_and_crosses_pickle(store):
    spec = SegmentSpec(3, mode="train", seed=5, dtype="float16")
    loader = store.loader("x", 16, spec=spec, prefetch=1)
    assert loader.spec is spec and loader.seed == 5
    for gone in ("num_segments", "mode", "clip_len", "dtype", "sampling", "rule"):
        assert not hasattr(loader, gone)
    loader.set_epoch(2)
    again = pickle.loads(pickle.dumps(loader))
    assert again.spec == spec and again.epoch == 2
    a, b = list(loader), list(again)
    assert len(a) == len(b) == len(loader)
    for x, y in zip(a, b):
        assert x.features.dtype == np.float16
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.indices, y.indices)
    # The batches are gather's with the same spec and epoch; the seed also keys the order.
    first = a[0]
    np.testing.assert_array_equal(first.features, store.gather("x", first.indices, spec=spec, epoch=2))
    other_seed = store.loader("x", 16, spec=spec.replace(seed=6))
    other_seed.set_epoch(2)
    assert not np.array_equal(other_seed.indices(), loader.indices(2))
    # Through the keyword shorthand: the same spec.
    assert store.loader("x", 16, num_segments=3, mode="train", seed=5, dtype="float16").spec == spec


# ---- properties computed once ------------------------------------------------------------
def test_store_properties_are_computed_once(store):
    assert store.attrs is store.attrs
    assert store.meta is store.meta
    assert store.classes is store.classes
    assert store.label_names is store.label_names
    col = store.column("x")
    assert (col.length, col.ragged, col.shape) == (12, False, (len(store), 12, 16))
    assert not hasattr(col, "segments")
