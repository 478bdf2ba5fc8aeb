"""Golden stores: committed files of every format version must keep opening
with the same content. tests/data/golden_v1.fgs, golden_v2.fgs and
golden_v3.fgs were each made once by tests/data/make_golden.py; these tests read the committed bytes
and never regenerate them."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs

DATA = Path(__file__).resolve().parent / "data"


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_make_golden()
GOLDEN_V1 = DATA / "golden_v1.fgs"
GOLDEN_V2 = DATA / "golden_v2.fgs"
GOLDEN_V3 = DATA / "golden_v3.fgs"

#: The section names a store made from golden_inputs() has, in format v1.
V1_SECTIONS = {
    "features/tsn", "features/frames", "features/frames/offsets",
    "ids/offsets", "ids/data", "labels",
    "meta/video/offsets", "meta/video/data",
    "meta/event_start", "meta/event_end", "meta/element_start", "meta/element_end",
    "classes/label", "classes/glabel", "classes/set",
    "classes/name/offsets", "classes/name/data", "classes/event/offsets", "classes/event/data",
    "attrs",
}
#: Format v2 adds the block checksums of every feature column.
V2_SECTIONS = V1_SECTIONS | {"features/tsn/blocks", "features/frames/blocks"}
#: Format v3 adds the per-channel statistics of every feature column.
V3_SECTIONS = V2_SECTIONS | {"features/tsn/stats", "features/frames/stats"}


def _is_feature(name: str) -> bool:
    return name.startswith("features/") and "/" not in name[len("features/"):]


def assert_golden_content(store: fgs.Store) -> None:
    """Every piece of content of ``store`` equals golden_inputs()."""
    g = make_golden.golden_inputs()
    n = len(g["ids"])
    assert len(store) == n
    assert store.ids.to_list() == g["ids"]
    assert [store.ids[i] for i in range(n)] == g["ids"]
    assert store.labels.dtype == np.int32
    np.testing.assert_array_equal(store.labels, g["labels"])
    np.testing.assert_array_equal(store.index_of(g["ids"]), np.arange(n))

    meta = store.meta
    assert meta.video.to_list() == g["meta"]["video"]
    for field in ("event_start", "event_end", "element_start", "element_end"):
        arr = getattr(meta, field)
        assert arr.dtype == np.int32, field
        assert arr.tolist() == g["meta"][field], field

    classes = store.classes
    assert classes is not None
    clabel, set_id, glabel, event, name = (list(x) for x in zip(*g["classes"]))
    assert classes.label.dtype == classes.glabel.dtype == classes.set.dtype == np.int32
    assert classes.label.tolist() == clabel
    assert classes.set.tolist() == set_id
    assert classes.glabel.tolist() == glabel
    assert classes.event.to_list() == event
    assert classes.name.to_list() == name
    assert store.label_names == dict(zip(clabel, name))

    assert store.columns == tuple(g["columns"])
    dtype = np.dtype(g["store_dtype"])
    for col_name, table in g["columns"].items():
        col = store.column(col_name)
        lengths = g["lengths"][col_name]
        c = g["channels"][col_name]
        ragged = len(set(lengths)) > 1
        assert col.dtype == dtype
        assert col.ragged == ragged
        assert col.shape == (n, None if ragged else lengths[0], c)
        assert col.lengths().tolist() == lengths
        expected_rows = np.concatenate([table[k].reshape(-1, c) for k in g["ids"]]).astype(dtype)
        if ragged:
            assert col.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
            assert col.values.tobytes() == expected_rows.tobytes()
        else:
            assert col.values.tobytes() == expected_rows.tobytes()
        for i, key in enumerate(g["ids"]):
            want = table[key].reshape(lengths[i], c).astype(dtype)
            got = store.features(col_name, i)
            assert got.shape == want.shape and got.dtype == dtype
            assert got.tobytes() == want.tobytes(), (col_name, key)
            np.testing.assert_array_equal(col[i], want)
    assert store.verify() == []


# -- the committed golden files ---------------------------------------------------


def test_format_version_is_3():
    # Bumping the format version must add tests/data/golden_v{N}.fgs (keeping the
    # old ones opening, as far as the new reader promises) and update this file.
    assert fgs.FORMAT_VERSION == 3


def test_a_golden_file_exists_for_every_version():
    for version in range(1, fgs.FORMAT_VERSION + 1):
        path = DATA / f"golden_v{version}.fgs"
        assert path.is_file(), f"{path} is missing: every format version needs a golden file"


def test_golden_v1_header_bytes():
    raw = GOLDEN_V1.read_bytes()
    assert 4 << 10 <= len(raw) <= 64 << 10  # small, and committed as is
    magic, version, header_size, file_size, count, table_offset, section_count, entry_size, flags = (
        struct.unpack_from("<8sIIQQQIIQ", raw, 0))
    assert magic == b"FGSTORE\0"
    assert version == 1
    assert header_size == 64 and entry_size == 128 and flags == 0
    assert file_size == len(raw)
    assert count == len(make_golden.golden_inputs()["ids"])
    assert table_offset % 64 == 0 and table_offset + section_count * 128 == len(raw)


def test_golden_v1_opens_with_its_content():
    store = fgs.open(GOLDEN_V1)
    assert store.format_version == 1
    assert store.file_size == GOLDEN_V1.stat().st_size
    assert {s["name"] for s in store.sections()} == V1_SECTIONS
    for s in store.sections():
        assert s["offset"] % (4096 if _is_feature(s["name"]) else 64) == 0, s
    assert_golden_content(store)
    attrs = store.attrs
    assert attrs["split"] == make_golden.SPLIT_NAME
    assert attrs["categories"] == make_golden.CATEGORIES_NAME
    assert attrs["columns"]["tsn"]["source_dtypes"] == ["float32"]
    assert attrs["columns"]["frames"]["source_dtypes"] == ["float16"]


def test_golden_v1_sources_have_the_declared_dtypes():
    g = make_golden.golden_inputs()
    assert {v.dtype for v in g["columns"]["tsn"].values()} == {np.dtype("float32")}
    assert {v.dtype for v in g["columns"]["frames"].values()} == {np.dtype("float16")}
    assert [len(g["columns"]["frames"][k]) for k in g["ids"]] == g["lengths"]["frames"]
    assert -1 in g["labels"].tolist()


def test_golden_v2_opens_with_its_content_and_block_checksums():
    raw = GOLDEN_V2.read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == 2
    store = fgs.open(GOLDEN_V2)
    assert store.format_version == 2
    assert {s["name"] for s in store.sections()} == V2_SECTIONS
    assert_golden_content(store)
    by_name = {s["name"]: s for s in store.sections()}
    block = fgs._core.BLOCK_SIZE
    assert block == 1 << 20
    for col in store.columns:
        feat, sums = by_name[f"features/{col}"], by_name[f"features/{col}/blocks"]
        assert sums["dtype"] == "int64" and sums["shape"] == (-(-feat["length"] // block),)
        want = [fgs._core.hash64(raw[o : min(o + block, feat["offset"] + feat["length"])])
                for o in range(feat["offset"], feat["offset"] + feat["length"], block)]
        got = np.frombuffer(raw, "<u8", len(want), sums["offset"]).tolist()
        assert got == want, col
    # Same content sections as version 1, byte for byte.
    v1 = {s["name"]: s for s in fgs.open(GOLDEN_V1).sections()}
    for name in V1_SECTIONS - {"attrs"}:
        assert by_name[name]["checksum"] == v1[name]["checksum"], name


def golden_stats(column: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and population std (float64) of every row of a golden column, and the row count."""
    g = make_golden.golden_inputs()
    c = g["channels"][column]
    rows = np.concatenate([g["columns"][column][k].reshape(-1, c) for k in g["ids"]]).astype(np.float64)
    return rows.mean(axis=0), rows.std(axis=0), len(rows)


def test_golden_v3_opens_with_its_content_and_statistics():
    raw = GOLDEN_V3.read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == 3
    store = fgs.open(GOLDEN_V3)
    assert store.format_version == 3
    assert {s["name"] for s in store.sections()} == V3_SECTIONS
    assert_golden_content(store)
    by_name = {s["name"]: s for s in store.sections()}
    for col in store.columns:
        mean, std, count = golden_stats(col)
        sec = by_name[f"features/{col}/stats"]
        assert sec["dtype"] == "float32" and sec["shape"] == (2, len(mean))
        on_disk = np.frombuffer(raw, "<f4", 2 * len(mean), sec["offset"]).reshape(2, -1)
        # float64 statistics rounded to float32 (the golden values make them exact in float64)
        np.testing.assert_array_equal(on_disk[0], mean.astype(np.float32))
        np.testing.assert_allclose(on_disk[1], std, rtol=1e-7)
        st = store.stats(col)
        assert st.count == count and st.mean.dtype == st.std.dtype == np.float32
        np.testing.assert_array_equal(st.mean, on_disk[0])
        np.testing.assert_array_equal(st.std, on_disk[1])
    # Same sections as version 2 byte for byte, statistics aside.
    v2 = {s["name"]: s for s in fgs.open(GOLDEN_V2).sections()}
    for name in V2_SECTIONS - {"attrs"}:
        assert by_name[name]["checksum"] == v2[name]["checksum"], name


def test_older_golden_files_have_no_statistics_until_added(tmp_path):
    for path in (GOLDEN_V1, GOLDEN_V1_F16, GOLDEN_V2):
        old = fgs.open(path)
        with pytest.raises(ValueError, match=r"format version [12]\) holds no statistics for column 'tsn'.*"
                                             r"finegym-store stats"):
            old.stats("tsn")
        with pytest.raises(ValueError, match=r"normalize=True needs the per-channel statistics of column 'tsn'"):
            old.gather("tsn", [0], normalize=True)
        new = fgs.add_stats(old, tmp_path / f"{path.stem}_v3.fgs")
        assert new.format_version == 3 and new.verify() == []
        for col in new.columns:
            np.testing.assert_array_equal(np.asarray(new.column(col).values), np.asarray(old.column(col).values))
            np.testing.assert_array_equal(new.stats(col).mean, fgs.open(GOLDEN_V3).stats(col).mean)
        assert new.ids.to_list() == old.ids.to_list()
        np.testing.assert_array_equal(new.labels, old.labels)
        assert new.attrs["selected_from"]["how"] == "every row, to add per-channel statistics"


def test_block_checksums_cover_several_blocks(tmp_path):
    # A column of 2.5 blocks: three checksums, the last over a short block.
    block = fgs._core.BLOCK_SIZE
    n, t, c = 5, 4, block // 32  # 5 * 4 * c * 4 bytes = 2.5 blocks
    ids = [f"v{i:02d}_E_0_1_A_0_1" for i in range(n)]
    table = {k: np.full((t, c), i, np.float32) + np.arange(c, dtype=np.float32) for i, k in enumerate(ids)}
    store = fgs.convert({"feat": table}, tmp_path / "b.fgs", progress=False)
    raw = (tmp_path / "b.fgs").read_bytes()
    by_name = {s["name"]: s for s in store.sections()}
    feat, sums = by_name["features/feat"], by_name["features/feat/blocks"]
    assert feat["length"] == n * t * c * 4 and sums["shape"] == (3,)
    ends = [feat["offset"] + min(k + block, feat["length"]) for k in range(0, feat["length"], block)]
    want = [fgs._core.hash64(raw[e - min(block, e - feat["offset"] - k) : e])
            for k, e in zip(range(0, feat["length"], block), ends)]
    assert np.frombuffer(raw, "<u8", 3, sums["offset"]).tolist() == want
    assert store.verify() == []


# -- a fresh conversion gives the same content --------------------------------------


def test_fresh_conversion_has_the_golden_content(tmp_path):
    store = make_golden.build(tmp_path / "fresh.fgs", tmp_path)
    assert store.format_version == fgs.FORMAT_VERSION
    assert {s["name"] for s in store.sections()} == V3_SECTIONS
    assert_golden_content(store)

    golden = fgs.open(GOLDEN_V3)
    by_name = {s["name"]: s for s in golden.sections()}
    for s in store.sections():
        if s["name"] == "attrs":  # provenance: paths differ
            continue
        g = by_name[s["name"]]
        assert (s["dtype"], s["shape"], s["checksum"]) == (g["dtype"], g["shape"], g["checksum"]), s["name"]


def test_golden_split_and_categories_round_trip_through_the_readers(tmp_path):
    from finegym_store.finegym import parse_element_id, read_categories, read_split

    g = make_golden.golden_inputs()
    make_golden.write_split(tmp_path / "s.txt", g)
    make_golden.write_categories(tmp_path / "c.txt", g)
    ids, labels = read_split(tmp_path / "s.txt")
    assert ids == g["ids"] and labels.tolist() == g["labels"].tolist()
    cats = read_categories(tmp_path / "c.txt")
    assert list(zip(cats.label.tolist(), cats.set.tolist(), cats.glabel.tolist(), cats.event, cats.name)) == [
        tuple(c) for c in g["classes"]]
    parsed = [parse_element_id(k) for k in g["ids"]]
    assert [p.video if p else "" for p in parsed] == g["meta"]["video"]


def test_fresh_float16_conversion_is_exact_on_golden_values(tmp_path):
    """The golden values are exact in float16 too: a float16 store holds them unchanged."""
    dtype = "float16"
    g = make_golden.golden_inputs()
    make_golden.write_split(tmp_path / "s.txt", g)
    store = fgs.convert(g["columns"], tmp_path / "h.fgs", split=tmp_path / "s.txt", dtype=dtype, progress=False)
    for name, table in g["columns"].items():
        assert store.column(name).dtype == np.dtype(dtype)
        for i, key in enumerate(g["ids"]):
            np.testing.assert_array_equal(store.features(name, i).astype(np.float32),
                                          table[key].reshape(store.features(name, i).shape).astype(np.float32))


GOLDEN_V1_F16 = DATA / "golden_v1_f16.fgs"


def test_golden_v1_f16_opens_with_its_content(tmp_path):
    """The committed float16 golden file: dtype code 4 on disk, values exact."""
    store = fgs.open(GOLDEN_V1_F16)
    assert store.format_version == 1
    assert store.verify() == []
    g = make_golden.golden_inputs()
    by_name = {s["name"]: s for s in store.sections()}
    for name, table in g["columns"].items():
        assert by_name[f"features/{name}"]["dtype"] == "float16"
        col = store.column(name)
        assert col.dtype == np.dtype("float16")
        for i, key in enumerate(g["ids"]):
            view = store.features(name, i)
            assert view.tobytes() == table[key].reshape(view.shape).astype(np.float16).tobytes()
    assert list(store.ids) == g["ids"]
    np.testing.assert_array_equal(store.labels, g["labels"])
    # A fresh float16 conversion writes the same sections (attrs aside).
    fresh = make_golden.build(tmp_path / "fresh16.fgs", tmp_path, dtype="float16")
    for s in fresh.sections():
        if s["name"] != "attrs" and s["name"] in V1_SECTIONS:  # blocks and stats: versions 2 and 3
            assert s["checksum"] == by_name[s["name"]]["checksum"], s["name"]


def _layout_of(data: bytes):
    """Sections of a store parsed with struct from docs/FORMAT.md alone:
    [(name, offset, length, dtype, shape)], and the table offset."""
    toff, count = struct.unpack_from("<QI", data, 32)
    out = []
    for i in range(count):
        e = toff + 128 * i
        name = data[e : e + 64].split(b"\0", 1)[0].decode()
        offset, length, _, dtype, ndim = struct.unpack_from("<QQQBB", data, e + 64)
        out.append((name, offset, length, dtype, struct.unpack_from(f"<{ndim}Q", data, e + 96)))
    return out, toff, count


def test_golden_files_meet_the_layout_rules():
    # The rules FORMAT.md states for every file (table ends the
    # file, no overlap, only minimal zero padding, T > 0, unique ids), checked
    # on the committed golden bytes independently of the reader: tightening
    # the reader must not turn away files that version 1 always wrote.
    for path in sorted(DATA.glob("golden_v*.fgs")):
        data = path.read_bytes()
        sections, toff, count = _layout_of(data)
        assert toff + 128 * count == len(data), path
        end = 64
        for name, offset, length, _, _ in sorted(sections, key=lambda s: (s[1], s[2])):
            align = 4096 if _is_feature(name) else 64
            assert offset >= end and offset - end < align, (path, name)
            assert data[end:offset] == bytes(offset - end), (path, name)
            end = offset + length
        assert toff - end < 64 and data[end:toff] == bytes(toff - end)
        by_name = {s[0]: s for s in sections}
        ragged = [n for n in by_name if n.startswith("features/") and n.endswith("/offsets")]
        assert ragged, "the golden files include a ragged column"
        for n in ragged:
            _, offset, length, _, _ = by_name[n]
            assert (np.diff(np.frombuffer(data, "<i8", length // 8, offset)) > 0).all(), (path, n)
        _, o_off, o_len, _, _ = by_name["ids/offsets"]
        _, d_off, _, _, _ = by_name["ids/data"]
        o = np.frombuffer(data, "<i8", o_len // 8, o_off)
        ids = [data[d_off + a : d_off + b] for a, b in zip(o[:-1], o[1:])]
        assert len(set(ids)) == len(ids)
        assert fgs.open(path).verify() == []
