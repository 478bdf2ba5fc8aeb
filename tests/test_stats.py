"""Per-channel statistics (format version 3) and standardisation in the gather.

The statistics are checked against numpy's float64 mean and std of every
stored row; normalize=True against numpy's float32 (x - mean) * (1 / std)
over the plain gather, bit for bit."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import _core, synth
from finegym_store.cli import main

from conftest import CHILD_CWD

from test_corrupt import entries, get, put, rehash

N = 40


def _ids(n: int = N) -> list[str]:
    return synth.make_ids(n, seed=5)


def _rows(store: fgs.Store, column: str) -> np.ndarray:
    """Every stored row of a column, widened to float64."""
    col = store.column(column)
    return np.asarray(col.values).reshape(-1, col.channels).astype(np.float64)


def _expected(store: fgs.Store, column: str) -> tuple[np.ndarray, np.ndarray]:
    rows = _rows(store, column)
    return rows.mean(axis=0), rows.std(axis=0)


def _reference(store: fgs.Store, column: str, x: np.ndarray) -> np.ndarray:
    """numpy's standardisation of a float32 gather output, the operations normalize=True defines."""
    st = store.stats(column)
    safe = np.where(st.std > 0, st.std, np.float32(1))
    scale = np.where(st.std > 0, np.float32(1) / safe, np.float32(1)).astype(np.float32)
    return (x.astype(np.float32) - st.mean) * scale


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Fixed float32 (mean far from 0), fixed float16 and ragged columns, in float32 and float16 stores."""
    d = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(7)
    ids = _ids()
    fixed = {k: (rng.normal(0, 1, (12, 24)) * np.linspace(0.01, 5, 24) + np.linspace(-300, 1e4, 24))
             .astype(np.float32) for k in ids}
    ragged = {k: rng.normal(2, 3, (int(t), 5)).astype(np.float32) for k, t in zip(ids, rng.integers(1, 9, N))}
    out = {}
    for dtype in ("float32", "float16"):
        out[dtype] = fgs.convert({"fix": fixed, "rag": ragged}, d / f"{dtype}.fgs", dtype=dtype, progress=False)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("column", ["fix", "rag"])
def test_conversion_writes_the_statistics_of_the_stored_values(stores, dtype, column):
    store = stores[dtype]
    assert store.format_version == fgs.FORMAT_VERSION == 3
    st = store.stats(column)
    mean, std = _expected(store, column)  # from the values as stored (float16 ones for a float16 store)
    assert isinstance(st, fgs.ColumnStats)
    assert st.mean.dtype == st.std.dtype == np.float32 and st.mean.shape == st.std.shape == mean.shape
    assert st.count == len(_rows(store, column))
    np.testing.assert_allclose(st.mean, mean, rtol=2e-7, atol=1e-6 * np.abs(mean).max())
    np.testing.assert_allclose(st.std, std, rtol=1e-5)


def test_statistics_stay_accurate_far_from_zero(tmp_path):
    # mean 1e6, spread 1e-1: the sum-of-squares formula around 0 would lose every digit of the variance.
    ids = _ids(200)
    rng = np.random.default_rng(0)
    table = {k: (1e6 + rng.normal(0, 0.1, (4, 3))).astype(np.float32) for k in ids}
    store = fgs.convert({"x": table}, tmp_path / "far.fgs", progress=False)
    mean, std = _expected(store, "x")
    np.testing.assert_allclose(store.stats("x").std, std, rtol=1e-6)
    np.testing.assert_allclose(store.stats("x").mean, mean, rtol=1e-7)


def test_imports_and_selections_write_statistics(stores, tmp_path):
    pa = pytest.importorskip("pyarrow")
    src = stores["float32"]
    table = src.to_arrow()
    imported = fgs.from_arrow(table, tmp_path / "imported.fgs")
    streamed = fgs.from_arrow(pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=7)),
                              tmp_path / "streamed.fgs")
    src.to_parquet(tmp_path / "s.parquet", row_group_size=9)
    parquet = fgs.from_parquet(tmp_path / "s.parquet", tmp_path / "parquet.fgs")
    sub = src.select(range(5, 25), tmp_path / "sub.fgs")
    for store in (imported, streamed, parquet):
        for column in ("fix", "rag"):  # the same rows in the same order: the same statistics, bit for bit
            np.testing.assert_array_equal(store.stats(column).mean, src.stats(column).mean)
            np.testing.assert_array_equal(store.stats(column).std, src.stats(column).std)
    for store in (imported, sub):
        assert store.format_version == 3
        for column in ("fix", "rag"):
            mean, std = _expected(store, column)
            np.testing.assert_allclose(store.stats(column).std, std, rtol=1e-5)
            np.testing.assert_allclose(store.stats(column).mean, mean, rtol=1e-6, atol=1e-3)
    assert isinstance(table, pa.Table)


def test_constant_and_non_finite_channels(tmp_path):
    ids = _ids(6)
    table = {k: np.stack([np.full(3, 2.5), np.arange(3.0), np.arange(3.0)], axis=1).astype(np.float32)
             for k in ids}
    table[ids[2]][1, 2] = np.nan
    store = fgs.convert({"x": table}, tmp_path / "odd.fgs", progress=False)
    st = store.stats("x")
    assert st.mean[0] == 2.5 and st.std[0] == 0  # constant channel
    assert np.isnan(st.mean[2]) and np.isnan(st.std[2])  # a NaN makes its channel's statistics NaN
    assert np.isfinite(st.mean[1]) and st.std[1] > 0
    with pytest.raises(ValueError, match=r"normalize=True cannot standardise column 'x' of '.*odd\.fgs': "
                                         r"channel 2 has mean nan .*NaN or Inf"):
        store.gather("x", [0], normalize=True)
    with pytest.raises(ValueError, match="channel 2"):
        store.loader("x", 2, normalize=True)
    assert store.gather("x", [0]).shape == (1, 3, 3)  # without normalize, nothing changes


def test_constant_channel_normalises_to_zero(tmp_path):
    ids = _ids(4)
    table = {k: np.stack([np.full(5, -7.25), np.arange(5.0) + i], axis=1).astype(np.float32)
             for i, k in enumerate(ids)}
    store = fgs.convert({"x": table}, tmp_path / "const.fgs", progress=False)
    got = store.gather("x", np.arange(4), normalize=True)
    assert (got[..., 0] == 0).all()
    np.testing.assert_array_equal(got, _reference(store, "x", store.gather("x", np.arange(4))))


@pytest.mark.parametrize("stored", ["float32", "float16"])
@pytest.mark.parametrize("out", [None, "float32", "float16"])
@pytest.mark.parametrize("spec", [dict(num_segments=3, mode="train"), dict(num_segments=4, mode="test", clip_len=2),
                                  dict()])
def test_normalize_equals_numpy_bit_for_bit(stores, stored, out, spec):
    store = stores[stored]
    idx = np.array([0, 5, 5, 39, -1, 17])
    columns = ["fix", "rag"] if spec else ["fix"]  # all segments: fixed columns only
    for column in columns:
        for epoch in (0, 3):
            plain = store.gather(column, idx, dtype="float32", epoch=epoch, **spec)
            got = store.gather(column, idx, dtype=out, epoch=epoch, normalize=True, **spec)
            want = _reference(store, column, plain)
            assert got.dtype == np.dtype(out or stored)
            if got.dtype == np.float16:
                want = want.astype(np.float16)
            np.testing.assert_array_equal(got, want)
            assert np.abs(got.astype(np.float32)).max() < 20  # standardised: a few std at most here


def test_normalize_with_out_threads_and_spec(stores):
    store = stores["float32"]
    spec = fgs.SegmentSpec(3, mode="train", seed=4, normalize=True)
    assert spec.normalize is True and spec.replace(normalize=False).normalize is False
    assert pickle.loads(pickle.dumps(spec)) == spec and pickle.loads(pickle.dumps(spec))._native.normalize
    idx = np.arange(N)
    out = np.empty((N, 3, 24), np.float32)
    assert store.gather("fix", idx, spec=spec, out=out, threads=1) is out
    np.testing.assert_array_equal(out, store.gather("fix", idx, spec=spec, threads=2))
    np.testing.assert_array_equal(out, _reference(store, "fix", store.gather("fix", idx, spec=spec.replace(
        normalize=False))))
    for bad in (1, "yes", None, np.float32(1)):
        with pytest.raises(TypeError, match="normalize must be True or False"):
            fgs.SegmentSpec(normalize=bad)


def test_loader_normalises_every_batch(stores):
    store = stores["float16"]
    loader = store.loader("fix", 16, num_segments=3, mode="train", dtype="float32", normalize=True, seed=1)
    plain = store.loader("fix", 16, num_segments=3, mode="train", dtype="float32", seed=1)
    for _ in range(2):  # two epochs: fresh segments, same rule
        for a, b in zip(loader, plain, strict=True):
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_array_equal(a.features, _reference(store, "fix", b.features))


def test_loader_state_from_before_normalize_still_loads(stores):
    store = stores["float32"]
    loader = store.loader("fix", 8, num_segments=3, mode="test")
    state = loader.state_dict()
    del state["spec"]["normalize"]  # a state saved by 0.2
    fresh = store.loader("fix", 8, num_segments=3, mode="test")
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="spec differs"):
        store.loader("fix", 8, num_segments=3, mode="test", normalize=True).load_state_dict(state)


# -- damaged statistics ---------------------------------------------------------------


def _stats_entry(buf: bytes, column: str) -> tuple[int, int]:
    at = entries(buf)[f"features/{column}/stats"]
    return at, struct.unpack_from("<Q", buf, at + 64)[0]


def test_a_flipped_bit_in_the_statistics_fails_open(stores, tmp_path):
    buf = bytearray(Path(stores["float32"].path).read_bytes())
    _, offset = _stats_entry(buf, "fix")
    buf[offset + 5] ^= 0x10
    path = tmp_path / "flipped.fgs"
    path.write_bytes(buf)
    with pytest.raises(fgs.FormatError, match=r"section 'features/fix/stats' does not match its checksum"):
        fgs.open(path)


def test_a_negative_std_with_a_valid_checksum_fails_open(stores, tmp_path):
    buf = bytearray(Path(stores["float32"].path).read_bytes())
    at, offset = _stats_entry(buf, "rag")
    struct.pack_into("<f", buf, offset + 4 * (5 + 1), -1.0)  # std of channel 1
    length = struct.unpack_from("<Q", buf, at + 72)[0]
    struct.pack_into("<Q", buf, at + 80, _core.hash64(bytes(buf[offset : offset + length])))
    rehash(buf)
    path = tmp_path / "negative.fgs"
    path.write_bytes(buf)
    with pytest.raises(fgs.FormatError, match=r"'features/rag/stats' gives channel 1 a negative standard deviation"):
        fgs.open(path)


def test_a_version_3_file_without_statistics_or_with_the_wrong_shape_fails_open(stores, tmp_path):
    buf = bytearray(Path(stores["float32"].path).read_bytes())
    at, _ = _stats_entry(buf, "fix")
    renamed = bytearray(buf)
    renamed[at : at + 64] = b"features/fix/other".ljust(64, b"\0")
    rehash(renamed)
    (tmp_path / "renamed.fgs").write_bytes(renamed)
    with pytest.raises(fgs.FormatError, match="required section 'features/fix/stats' is missing"):
        fgs.open(tmp_path / "renamed.fgs")
    # The same file labelled version 2 refuses the stats section.
    older = bytearray(buf)
    put(older, "version", 2)
    rehash(older)
    (tmp_path / "v2.fgs").write_bytes(older)
    with pytest.raises(fgs.FormatError, match="section 'features/fix/stats'"):
        fgs.open(tmp_path / "v2.fgs")
    assert get(buf, "version") == 3


# -- finegym-store stats and add_stats -------------------------------------------------------


@pytest.fixture
def old_store(tmp_path):
    """A copy of the committed version-2 golden store."""
    src = os.path.join(os.path.dirname(__file__), "data", "golden_v2.fgs")
    path = tmp_path / "old.fgs"
    path.write_bytes(Path(src).read_bytes())
    return path


def test_cli_prints_the_statistics(stores, capsys):
    assert main(["stats", stores["float32"].path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["column", "C", "rows"]
    assert any(line.split()[:2] == ["fix", "24"] for line in out.splitlines())
    assert main(["stats", stores["float32"].path, "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    st = stores["float32"].stats("rag")
    assert doc["rag"]["mean"] == st.mean.tolist() and doc["rag"]["count"] == st.count


def test_cli_old_store_needs_output_or_in_place(old_store, tmp_path, capsys):
    assert main(["stats", str(old_store)]) == 2
    err = capsys.readouterr().err
    assert "format version 2" in err and "--output" in err and "--in-place" in err and err.count("\n") == 1
    out = tmp_path / "new.fgs"
    assert main(["stats", str(old_store), "--output", str(out)]) == 0
    assert fgs.open(out).format_version == 3 and fgs.open(old_store).format_version == 2
    assert main(["stats", str(old_store), "--output", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["stats", str(old_store), "--output", str(out), "--overwrite"]) == 0
    assert main(["stats", str(old_store), "--output", str(old_store)]) == 2
    assert "use --in-place" in capsys.readouterr().err
    assert main(["stats", str(old_store), "--overwrite"]) == 2
    assert main(["stats", str(tmp_path / "absent.fgs")]) == 2


def test_in_place_replaces_atomically_and_open_readers_keep_the_old_file(old_store, tmp_path):
    before = fgs.open(old_store)
    old_values = np.array(before.column("tsn").values)
    link = tmp_path / "link.fgs"
    link.symlink_to(old_store)
    assert main(["stats", str(link), "--in-place"]) == 0
    assert link.is_symlink()  # the target was replaced, not the link
    after = fgs.open(link)
    assert after.format_version == 3 and after.verify() == []
    np.testing.assert_array_equal(after.column("tsn").values, old_values)
    np.testing.assert_array_equal(before.column("tsn").values, old_values)  # the old mapping still reads
    assert before.format_version == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.fgs", "old.fgs"]  # no temporary left
    inode = os.stat(old_store).st_ino
    assert main(["stats", str(old_store), "--in-place"]) == 0  # already has them: left as it is
    assert os.stat(old_store).st_ino == inode


def test_add_stats_refuses_to_replace_without_overwrite(old_store, tmp_path):
    with pytest.raises(FileExistsError, match="is the source store; pass overwrite=True"):
        fgs.add_stats(old_store, old_store)
    (tmp_path / "taken.fgs").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        fgs.add_stats(old_store, tmp_path / "taken.fgs")
    assert (tmp_path / "taken.fgs").read_bytes() == b"mine"
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        fgs.add_stats(old_store, tmp_path / "x.fgs", overwrite=1)


def test_in_place_interrupted_leaves_the_source_and_no_temporary(old_store, tmp_path):
    # A child killed while writing: the source is intact and nothing else is left in the folder.
    code = f"""
import os, signal, finegym_store as fgs
from finegym_store import _write
real = _write.ColumnWriter.close
def close(self, *args):
    real(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)
_write.ColumnWriter.close = close
fgs.add_stats({str(old_store)!r}, {str(old_store)!r}, overwrite=True)
"""
    before = old_store.read_bytes()
    proc = subprocess.run([sys.executable, "-c", code], cwd=CHILD_CWD, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    assert old_store.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["old.fgs"]


def test_store_dataset_normalises(stores):
    from conftest import require_torch

    torch = require_torch()
    from finegym_store.torch import StoreDataset, collate

    store = stores["float16"]
    ds = StoreDataset(store, "fix", num_segments=3, mode="test", dtype="float32", normalize=True)
    want = store.gather("fix", np.arange(8), num_segments=3, mode="test", dtype="float32", normalize=True)
    np.testing.assert_array_equal(ds[2][0].numpy(), want[2])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate)
    np.testing.assert_array_equal(next(iter(loader)).features.numpy(), want)


# -- another store's statistics (stats_from / --from) ------------------------------------------


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """A 'training' store: the columns of `stores`, other values (other means and deviations)."""
    rng = np.random.default_rng(11)
    ids = synth.make_ids(30, seed=9)
    fixed = {k: rng.normal(50, 7, (12, 24)).astype(np.float32) for k in ids}
    ragged = {k: rng.normal(-4, 0.5, (int(t), 5)).astype(np.float32) for k, t in zip(ids, rng.integers(1, 6, 30))}
    return fgs.convert({"fix": fixed, "rag": ragged}, tmp_path_factory.mktemp("train") / "train.fgs",
                       progress=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stats_from_gives_the_training_statistics(stores, train, tmp_path, dtype):
    val = stores[dtype]
    out = fgs.add_stats(val, tmp_path / "val.fgs", stats_from=train.path)
    assert out.verify() == [] and out.format_version == 3
    for column in ("fix", "rag"):
        mine, theirs = out.stats(column), train.stats(column)
        np.testing.assert_array_equal(mine.mean, theirs.mean)
        np.testing.assert_array_equal(mine.std, theirs.std)
        assert mine.count == theirs.count != val.stats(column).count
        np.testing.assert_array_equal(np.asarray(out.column(column).values), np.asarray(val.column(column).values))
    assert out.attrs["stats_from"] == {"path": os.path.abspath(train.path),
                                       "counts": {c: train.stats(c).count for c in ("fix", "rag")}}
    assert out.ids.to_list() == val.ids.to_list()
    # normalize=True standardises with the training statistics, bit for bit as numpy does.
    idx = np.arange(len(out))
    plain = out.gather("fix", idx, num_segments=3, mode="test", dtype="float32")
    got = out.gather("fix", idx, num_segments=3, mode="test", dtype="float32", normalize=True)
    np.testing.assert_array_equal(got, _reference(train, "fix", plain))
    assert not np.array_equal(got, val.gather("fix", idx, num_segments=3, mode="test", dtype="float32",
                                              normalize=True))
    # A selection of it computes its own rows' statistics again and drops the record.
    sub = out.select(slice(0, 10), tmp_path / "sub.fgs")
    np.testing.assert_allclose(sub.stats("fix").mean, _expected(sub, "fix")[0], rtol=1e-6)
    assert "stats_from" not in sub.attrs and sub.stats("fix").count == 10 * 12


def test_stats_from_refuses_other_columns_and_stores_without_statistics(stores, train, old_store, tmp_path):
    other = fgs.convert({"fix": {k: np.ones((12, 24), np.float32) for k in _ids(4)}}, tmp_path / "one.fgs",
                        progress=False)
    with pytest.raises(ValueError, match=r"has no column 'rag' \(it has fix\)"):
        fgs.add_stats(stores["float32"], tmp_path / "a.fgs", stats_from=other)
    narrow = fgs.convert({"fix": {k: np.ones((12, 8), np.float32) for k in _ids(4)},
                          "rag": {k: np.ones((2, 5), np.float32) for k in _ids(4)}}, tmp_path / "narrow.fgs",
                         progress=False)
    with pytest.raises(ValueError, match="column 'fix' has 8 channels in .*narrow.fgs but 24 in"):
        fgs.add_stats(stores["float32"], tmp_path / "a.fgs", stats_from=narrow)
    v2 = fgs.open(old_store)
    with pytest.raises(ValueError, match="format version 2.*finegym-store stats"):
        fgs.add_stats(v2, tmp_path / "a.fgs", stats_from=v2)
    with pytest.raises(TypeError, match="stats_from must be a Store, a path or None, got int"):
        fgs.add_stats(stores["float32"], tmp_path / "a.fgs", stats_from=3)
    assert not (tmp_path / "a.fgs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow.fgs", "old.fgs", "one.fgs"]


def test_stats_from_a_version_2_store_into_a_copy(old_store, tmp_path):
    # The usual upgrade: an old validation store given its (upgraded) training store's statistics.
    upgraded = fgs.add_stats(old_store, tmp_path / "train3.fgs")
    out = fgs.add_stats(old_store, tmp_path / "val3.fgs", stats_from=upgraded)
    for name in out.columns:
        np.testing.assert_array_equal(out.stats(name).mean, upgraded.stats(name).mean)


def test_cli_stats_from(stores, train, tmp_path, capsys):
    val = stores["float32"].path
    assert main(["stats", val, "--from", train.path]) == 2
    err = capsys.readouterr().err
    assert f"--from {train.path}" in err and "--output OUT" in err and "--in-place" in err
    assert main(["stats", val, "--from", str(tmp_path / "absent.fgs"), "--output", str(tmp_path / "o.fgs")]) == 2
    assert "--from: no such file" in capsys.readouterr().err
    out = tmp_path / "val.fgs"
    assert main(["stats", val, "--from", train.path, "--output", str(out)]) == 0
    assert f"statistics of {train.path}" in capsys.readouterr().out
    np.testing.assert_array_equal(fgs.open(out).stats("rag").std, train.stats("rag").std)
    # --in-place over a store that already holds statistics replaces them with TRAIN's.
    inode = os.stat(out).st_ino
    assert main(["stats", str(out), "--in-place", "--from", val]) == 0
    assert os.stat(out).st_ino != inode
    np.testing.assert_array_equal(fgs.open(out).stats("rag").std, stores["float32"].stats("rag").std)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.fgs"]


def test_a_damaged_stats_from_record_falls_back_to_the_own_row_count(train):
    store = fgs.open(train.path)
    own = store.stats("fix").count
    for record in ({"counts": {"fix": "9"}}, {"counts": {"fix": -1}}, {"counts": ["fix"]}, "x", {"counts": None},
                   {"counts": {"fix": True}}):
        store.__dict__["attrs"] = {"stats_from": record}
        assert store.stats("fix").count == own


def test_the_writer_checks_given_statistics(tmp_path):
    w = _core.Writer(str(tmp_path / "w.fgs"), 1, False)
    with pytest.raises(RuntimeError, match="outside begin_features"):
        w.set_feature_stats(np.zeros(4, np.float32))
    w.begin_features("x", np.dtype(np.float32), 1, 2)
    with pytest.raises(ValueError, match="has 2 channels: its statistics are 4 values .* got 3"):
        w.set_feature_stats(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="channel 1 has standard deviation -1.0+ \\(a finite value >= 0"):
        w.set_feature_stats(np.array([0, 0, 1, -1], np.float32))
    with pytest.raises(ValueError, match="channel 0 has mean nan"):
        w.set_feature_stats(np.array([np.nan, 0, 1, 1], np.float32))
    w.discard()
    assert list(tmp_path.iterdir()) == []
