"""Damaged, truncated and foreign files: opening raises FormatError (a
ValueError naming the path and the problem) and never crashes.

Byte offsets follow docs/FORMAT.md. Tests that damage the header or the
section table recompute the header checksum, so that the check of the field
itself is what fails, not the checksum.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import _core, synth

from conftest import CHILD_CWD

N = 7
FIX_T, FIX_C = 4, 8
RAG_C = 6
RAG_T = [3, 1, 5, 2, 4, 1, 6]

CATS = """\
Clabel:   0; set:  1; Glabel:   1; (VT) round-off, flic-flac with 1/1 turn
Clabel:   1; set: 21; Glabel:  67; (FX) split leap
Clabel:   2; set: 31; Glabel: 120; (BB) wolf jump
"""

# Header fields: (byte offset, struct format).
HEADER = {
    "magic": (0, "8s"),
    "version": (8, "<I"),
    "header_size": (12, "<I"),
    "file_size": (16, "<Q"),
    "instance_count": (24, "<Q"),
    "section_table_offset": (32, "<Q"),
    "section_count": (40, "<I"),
    "section_entry_size": (44, "<I"),
    "flags": (48, "<Q"),
    "header_checksum": (56, "<Q"),
}
# Section table entry fields.
ENTRY = {"offset": (64, "<Q"), "length": (72, "<Q"), "checksum": (80, "<Q"), "dtype": (88, "<B"), "ndim": (89, "<B")}


def get(buf, field, table=HEADER, base=0):
    at, fmt = table[field]
    return struct.unpack_from(fmt, buf, base + at)[0]


def put(buf, field, value, table=HEADER, base=0):
    at, fmt = table[field]
    struct.pack_into(fmt, buf, base + at, value)


def rehash(buf: bytearray) -> None:
    """Recompute the header checksum the way a reader checks it: XXH64 of
    header bytes [0, 56) then section_count x 128 bytes at section_table_offset
    (whatever those fields now say)."""
    toff, count = get(buf, "section_table_offset"), get(buf, "section_count")
    table = bytes(buf[toff : toff + count * 128]) if toff < len(buf) else b""
    put(buf, "header_checksum", _core.hash64(bytes(buf[:56]) + table))


def entries(buf) -> dict[str, int]:
    """{section name: byte position of its table entry}."""
    toff, count = get(buf, "section_table_offset"), get(buf, "section_count")
    out = {}
    for i in range(count):
        at = toff + 128 * i
        out[bytes(buf[at : at + 64]).split(b"\0", 1)[0].decode()] = at
    return out


def set_name(buf, at: int, name: bytes) -> None:
    buf[at : at + 64] = name.ljust(64, b"\0")


@dataclass
class Base:
    path: str
    data: bytes
    sections: dict[str, dict]  # name -> {offset, length, shape, ...}

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def table_offset(self) -> int:
        return get(self.data, "section_table_offset")

    @property
    def section_count(self) -> int:
        return get(self.data, "section_count")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    d = tmp_path_factory.mktemp("corrupt_base")
    rng = np.random.default_rng(99)
    ids = synth.make_ids(N, seed=3)
    fix = {k: rng.standard_normal((FIX_T, FIX_C, 1, 1)).astype(np.float32) for k in ids}
    rag = {k: rng.standard_normal((t, RAG_C)).astype(np.float32) for k, t in zip(ids, RAG_T)}
    (d / "split.txt").write_text("".join(f"{k} {i % 3}\n" for i, k in enumerate(ids)))
    (d / "cats.txt").write_text(CATS)
    store = fgs.convert({"fix": fix, "rag": rag}, d / "base.fgs", split=d / "split.txt",
                        categories=d / "cats.txt", progress=False)
    assert store.column("rag").ragged and store.classes is not None and store.verify() == []
    sections = {s["name"]: s for s in store.sections()}
    return Base(store.path, (d / "base.fgs").read_bytes(), sections)


@pytest.fixture
def damaged(base, tmp_path):
    """write(bytes) -> path of a file holding them."""

    def write(data, name="damaged.fgs"):
        path = tmp_path / name
        path.write_bytes(bytes(data))
        return str(path)

    return write


def open_fails(path, pattern):
    with pytest.raises(fgs.FormatError, match=pattern) as info:
        fgs.open(path)
    msg = str(info.value)
    assert path in msg and "is not a valid finegym-store file" in msg
    return msg


def test_format_error_is_value_error():
    assert issubclass(fgs.FormatError, ValueError)


def test_base_store_is_valid(base):
    store = fgs.open(base.path)
    assert len(store) == N
    assert store.column("fix").shape == (N, FIX_T, FIX_C)
    assert store.column("rag").shape == (N, None, RAG_C)
    np.testing.assert_array_equal(store.column("rag").lengths(), RAG_T)
    assert base.sections["features/fix"]["offset"] % 4096 == 0
    assert get(base.data, "file_size") == base.size
    # The test's checksum recipe reproduces the writer's.
    buf = bytearray(base.data)
    rehash(buf)
    assert bytes(buf) == base.data


# -- (a) header fields -------------------------------------------------------------------------

HEADER_CASES = [
    ("magic", lambda b: b"FGSTORX\0", r"bad magic"),
    ("magic", lambda b: b"\0" * 8, r"bad magic"),
    ("magic", lambda b: b"FGSTORE1", r"bad magic"),
    ("version", lambda b: 0, r"format version 0 is not supported; this build reads versions 1 to 3"),
    ("version", lambda b: 4, r"format version 4 is not supported"),
    ("version", lambda b: 2**32 - 1, r"format version 4294967295 is not supported"),
    ("header_size", lambda b: 128, r"header_size is 128, expected 64"),
    ("header_size", lambda b: 0, r"header_size is 0, expected 64"),
    ("file_size", lambda b: b.size + 1, r"records a file of \d+ bytes but the file has \d+"),
    ("file_size", lambda b: b.size - 64, r"records a file of \d+ bytes but the file has \d+"),
    ("file_size", lambda b: 0, r"records a file of 0 bytes"),
    ("file_size", lambda b: 2**64 - 1, r"records a file of 18446744073709551615 bytes"),
    ("instance_count", lambda b: N + 1, rf"section 'ids/offsets' is int64\({N + 1},\), expected int64\({N + 2},\)"),
    ("instance_count", lambda b: N - 1, rf"section 'ids/offsets' is int64\({N + 1},\), expected int64\({N},\)"),
    ("instance_count", lambda b: 0, r"section 'ids/offsets' is int64\(8,\), expected int64\(1,\)"),
    ("instance_count", lambda b: 2**62, r"instance_count 4611686018427387904 is implausibly large"),
    ("instance_count", lambda b: 2**64 - 1, r"instance_count \d+ is implausibly large"),
    ("section_table_offset", lambda b: b.table_offset + 8, r"section_table_offset \d+ is not a multiple of 64"),
    ("section_table_offset", lambda b: b.table_offset + 1, r"section_table_offset \d+ is not a multiple of 64"),
    ("section_table_offset", lambda b: 0, r"section_table_offset 0 is not a multiple of 64 past the header"),
    ("section_table_offset", lambda b: b.size, r"the section table \(\d+ entries at offset \d+\) runs past the end"),
    ("section_table_offset", lambda b: b.table_offset + 64, r"section table .* runs past the end of the file"),
    ("section_table_offset", lambda b: 2**64 - 64, r"runs past the end of the file"),
    # Inside the file but not ending it: bytes after the table are refused (FORMAT.md, "Overview").
    ("section_table_offset", lambda b: 64, r"the section table \(\d+ entries at offset 64\) ends at \d+, but the "
     r"file goes on to \d+; the table must end the file"),
    ("section_table_offset", lambda b: b.table_offset - 64, r"the table must end the file \(no bytes after it\)"),
    ("section_count", lambda b: 0, r"section_count 0 is outside 1\.\.65536"),
    ("section_count", lambda b: 65537, r"section_count 65537 is outside 1\.\.65536"),
    ("section_count", lambda b: 2**32 - 1, r"section_count 4294967295 is outside"),
    ("section_count", lambda b: b.section_count + 1, r"runs past the end of the file"),
    ("section_count", lambda b: 65536, r"runs past the end of the file"),
    ("section_count", lambda b: b.section_count - 1, r"the table must end the file"),
    ("section_entry_size", lambda b: 64, r"section_entry_size is 64, expected 128"),
    ("section_entry_size", lambda b: 129, r"section_entry_size is 129, expected 128"),
    ("flags", lambda b: 1, r"unknown flags"),
    ("flags", lambda b: 2**63, r"unknown flags"),
]


@pytest.mark.parametrize("field, value, pattern", HEADER_CASES,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(HEADER_CASES)])
def test_header_field(base, damaged, field, value, pattern):
    buf = bytearray(base.data)
    put(buf, field, value(base))
    rehash(buf)
    open_fails(damaged(buf), pattern)


def test_header_field_names_all_covered():
    assert {f for f, _, _ in HEADER_CASES} == set(HEADER) - {"header_checksum"}


def test_unknown_flags_message_is_hex(base, damaged):
    buf = bytearray(base.data)
    put(buf, "flags", 0x10)
    rehash(buf)
    open_fails(damaged(buf), r"unknown flags 0x10 ")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda buf, b: put(buf, "instance_count", N + 1),
        lambda buf, b: put(buf, "header_checksum", get(buf, "header_checksum") ^ 1),
        lambda buf, b: put(buf, "dtype", 9, ENTRY, entries(buf)["labels"]),
        lambda buf, b: put(buf, "checksum", 0, ENTRY, entries(buf)["features/fix"]),
        lambda buf, b: buf.__setitem__(slice(b.size - 1, b.size), b"\x01"),  # last table byte (a zero shape dim)
    ],
    ids=["instance_count", "checksum_itself", "entry_dtype", "entry_checksum", "last_table_byte"],
)
def test_change_without_rehash_fails_the_checksum(base, damaged, mutate):
    buf = bytearray(base.data)
    mutate(buf, base)
    assert bytes(buf) != base.data
    open_fails(damaged(buf), r"header checksum mismatch \(the header or section table is damaged\)")


# -- (b) section table entries ----------------------------------------------------------------


def _name(name: bytes):
    def mutate(buf, at, b):
        set_name(buf, at, name)

    return mutate


def _field(field, value):
    def mutate(buf, at, b):
        put(buf, field, value(b) if callable(value) else value, ENTRY, at)

    return mutate


def _byte(pos, value):
    def mutate(buf, at, b):
        buf[at + pos] = value

    return mutate


def _shape(*dims):
    def mutate(buf, at, b):
        buf[at + 89] = len(dims)
        buf[at + 96 : at + 128] = b"\0" * 32
        for i, d in enumerate(dims):
            struct.pack_into("<Q", buf, at + 96 + 8 * i, d(b) if callable(d) else d)

    return mutate


def _all(*mutations):
    def mutate(buf, at, b):
        for m in mutations:
            m(buf, at, b)

    return mutate


S_RAG = sum(RAG_T)
FIX_BYTES = N * FIX_T * FIX_C * 4

ENTRY_CASES = [
    # name
    ("labels", _byte(10, ord("x")), r"section entry \d+ \('labels'\): name padding is not zero"),
    ("labels", _byte(63, 1), r"\('labels'\): name padding is not zero"),
    ("labels", _byte(0, ord("!")), r"section entry \d+: name contains byte 33, expected \[A-Za-z0-9_\./-\]"),
    ("labels", _byte(3, ord(" ")), r"section entry \d+: name contains byte 32"),
    ("labels", _byte(0, 0xC3), r"section entry \d+: name contains byte 195"),
    ("labels", _name(b"a" * 64), r"section entry \d+: name is not NUL-terminated within 64 bytes"),
    ("labels", _byte(0, 0), r"section entry \d+: empty name"),
    ("labels", _name(b"labelz"), r"required section 'labels' is missing"),
    ("attrs", _name(b"attrz"), r"unexpected section 'attrz'"),
    ("meta/event_end", _name(b"meta/event_start"), r"section 'meta/event_start' appears twice"),
    ("features/fix", _name(b"features/" + b"a" * 41), r"column name must be 1\.\.40 characters"),
    ("features/fix", _name(b"features/a.b"), r"'features/a\.b': column name must be"),
    ("features/rag/offsets", _name(b"features/zzz/offsets"), r"required section 'features/rag/offsets' is missing"),
    ("classes/glabel", _name(b"classes/glabels"), r"required section 'classes/glabel' is missing"),
    # offset
    ("labels", _field("offset", lambda b: b.sections["labels"]["offset"] + 8),
     r"section 'labels': offset \d+ is not a multiple of 64"),
    ("labels", _field("offset", 1), r"section 'labels': offset 1 is not a multiple of 64"),
    ("labels", _field("offset", 0), r"section 'labels': bytes \[0, \+28\) lie outside the data area \[64, \d+\)"),
    ("labels", _field("offset", lambda b: b.table_offset), r"section 'labels': bytes .* lie outside the data area"),
    ("labels", _field("offset", lambda b: b.size + 4096), r"lie outside the data area"),
    ("labels", _field("offset", 2**64 - 64), r"lie outside the data area"),
    ("features/fix", _field("offset", lambda b: b.table_offset - 64), r"section 'features/fix': bytes .* outside"),
    ("features/fix", _field("offset", lambda b: b.sections["features/fix"]["offset"] + 64),
     r"section 'features/fix' starts at \d+, not a multiple of 4096"),
    # length
    ("labels", _field("length", 4 * N + 4), r"section 'labels': length 32 does not match its shape and dtype"),
    ("labels", _field("length", 0), r"section 'labels': length 0 does not match"),
    ("labels", _field("length", 2**64 - 4), r"does not match its shape and dtype"),
    ("features/fix", _field("length", FIX_BYTES - 4), r"section 'features/fix': length \d+ does not match"),
    # dtype
    ("labels", _field("dtype", 0), r"section 'labels': unknown dtype code 0, expected 1\.\.5"),
    ("labels", _field("dtype", 9), r"section 'labels': unknown dtype code 9"),
    ("labels", _field("dtype", 255), r"unknown dtype code 255"),
    ("labels", _field("dtype", 5), rf"section 'labels' is float32\({N},\), expected int32\({N},\)"),
    ("ids/offsets", _field("dtype", 1), r"section 'ids/offsets': length \d+ does not match"),
    ("features/fix", _field("dtype", 2), r"section 'features/fix' is int32, expected float32 or float16"),
    ("ids/data", _shape(1, lambda b: b.sections["ids/data"]["length"]),
     r"section 'ids/data' is uint8\(1, \d+\), expected a 1-D uint8 array"),
    ("classes/event/data", _all(_field("dtype", 4), _shape(3)),  # "VTFXBB" as 3 float16
     r"section 'classes/event/data' is float16\(3,\), expected a 1-D uint8 array"),
    # ndim
    ("labels", _field("ndim", 0), r"section 'labels': ndim 0 is outside 1\.\.4"),
    ("labels", _field("ndim", 5), r"section 'labels': ndim 5 is outside 1\.\.4"),
    ("labels", _field("ndim", 255), r"ndim 255 is outside"),
    ("labels", _field("ndim", 2), r"section 'labels': length 28 does not match"),  # shape (N, 0)
    # reserved
    ("labels", _byte(90, 1), r"section 'labels': reserved bytes are not zero"),
    ("labels", _byte(95, 0x80), r"section 'labels': reserved bytes are not zero"),
    # shape
    ("labels", _shape(N + 1), r"section 'labels': length 28 does not match its shape"),
    ("labels", _shape(N, 1), rf"section 'labels' is int32\({N}, 1\), expected int32\({N},\)"),
    ("labels", _shape(1, N), rf"section 'labels' is int32\(1, {N}\), expected int32\({N},\)"),
    ("labels", _all(_shape(N), _byte(96 + 8, 1)), r"section 'labels': shape dim 1 is set but ndim is 1"),
    ("labels", _all(_shape(N), _byte(96 + 31, 1)), r"section 'labels': shape dim 3 is set but ndim is 1"),
    ("labels", _shape(2**40, 2**40), r"section 'labels': shape overflows"),
    ("labels", _shape(2**62, 4), r"section 'labels': shape overflows|does not match"),
    ("features/fix", _shape(N * FIX_T, FIX_C), r"required section 'features/fix/offsets' is missing"),
    # A different view of the same bytes, refused by the statistics of C = 8 channels.
    ("features/fix", _shape(N, FIX_T * FIX_C, 1),
     rf"section 'features/fix/stats' is float32\(2, {FIX_C}\), expected float32\(2, 1\)"),
    ("features/fix", _shape(N + 1, FIX_T, FIX_C), r"section 'features/fix': length \d+ does not match"),
    ("features/fix", _all(_shape(N, 0, FIX_C), _field("length", 0)),
     rf"section 'features/fix' has shape \({N}, 0, {FIX_C}\), expected \({N}, T > 0, C > 0\)"),
    ("features/fix", _shape(FIX_BYTES // 4), r"section 'features/fix' has 1 dims, expected 3 \(N, T, C\) or 2"),
    ("features/fix", _shape(N, FIX_T, FIX_C // 2, 2), r"has 4 dims, expected 3"),
    ("features/rag", _shape(1, S_RAG, RAG_C), rf"features/rag' has shape \(1, {S_RAG}, {RAG_C}\), expected \({N}, T > 0"),
    ("features/rag", _all(_shape(S_RAG, 0), _field("length", 0)), r"section 'features/rag' has C = 0 channels"),
    ("features/rag/offsets", _shape(N + 1, 1), rf"section 'features/rag/offsets' is int64\({N + 1}, 1\), expected"),
    ("classes/label", _shape(1, 3), r"section 'classes/label' must be 1-D"),
    ("classes/set", _all(_shape(2), _field("length", 8)), r"section 'classes/set' is int32\(2,\), expected int32\(3,\)"),
    ("attrs", _shape(1, lambda b: b.sections["attrs"]["length"]), r"section 'attrs' must be 1-D uint8"),
]


@pytest.mark.parametrize("section, mutate, pattern", ENTRY_CASES,
                         ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(ENTRY_CASES)])
def test_section_entry(base, damaged, section, mutate, pattern):
    buf = bytearray(base.data)
    at = entries(buf)[section]
    mutate(buf, at, base)
    assert bytes(buf) != base.data
    rehash(buf)
    path = damaged(buf)
    if pattern is None:
        assert len(fgs.open(path)) == N
    else:
        open_fails(path, pattern)


def test_entries_in_another_order_still_open(base, damaged):
    # The order of the table carries no meaning: reversing it is still a valid store.
    buf = bytearray(base.data)
    toff, count = base.table_offset, base.section_count
    rows = [bytes(buf[toff + 128 * i : toff + 128 * (i + 1)]) for i in range(count)]
    buf[toff : toff + 128 * count] = b"".join(reversed(rows))
    rehash(buf)
    store = fgs.open(damaged(buf))
    ref = fgs.open(base.path)
    for i in range(N):
        np.testing.assert_array_equal(store.features("rag", i), ref.features("rag", i))
    assert store.verify() == []


# -- (c) data sections the header checksum does not cover ------------------------------------------


def _put_offsets(buf, base, name, index, value):
    struct.pack_into("<q", buf, base.sections[name]["offset"] + 8 * index, value)


def _offsets(base, name):
    s = base.sections[name]
    return np.frombuffer(base.data, dtype="<i8", count=s["length"] // 8, offset=s["offset"])


@pytest.mark.parametrize(
    "name, index, value, pattern",
    [
        ("features/rag/offsets", 2, lambda o: o[1] - 1,
         r"section 'features/rag/offsets' entry 2 is \d+; offsets must start at 0, never decrease"),
        ("features/rag/offsets", 0, lambda o: 1, r"section 'features/rag/offsets' entry 0 is 1; offsets must start at 0"),
        ("features/rag/offsets", 3, lambda o: -1, r"section 'features/rag/offsets' entry 3 is -1"),
        ("features/rag/offsets", N, lambda o: o[N] - 1, rf"section 'features/rag/offsets' ends at {S_RAG - 1}, expected {S_RAG}"),
        ("features/rag/offsets", N, lambda o: o[N] + 1, rf"'features/rag/offsets' entry {N} is {S_RAG + 1}.*stay within {S_RAG}"),
        ("features/rag/offsets", 4, lambda o: 2**62, rf"'features/rag/offsets' entry 4 is \d+.*stay within {S_RAG}"),
        ("features/rag/offsets", 1, lambda o: -(2**63), r"'features/rag/offsets' entry 1 is -9223372036854775808"),
        ("ids/offsets", N, lambda o: o[N] + 1, rf"section 'ids/offsets' entry {N} is \d+.*stay within \d+"),
        ("ids/offsets", 3, lambda o: 10**9, r"section 'ids/offsets' entry 3 is 1000000000"),
        ("ids/offsets", N, lambda o: o[N] - 1, r"section 'ids/offsets' ends at \d+, expected \d+"),
        ("meta/video/offsets", 2, lambda o: o[3] + 1, r"section 'meta/video/offsets' entry 3 is"),
        ("meta/video/offsets", 0, lambda o: -5, r"section 'meta/video/offsets' entry 0 is -5"),
        ("classes/name/offsets", 3, lambda o: o[3] + 1000, r"section 'classes/name/offsets' entry 3 is"),
        ("classes/event/offsets", 1, lambda o: o[2] + 1, r"section 'classes/event/offsets' entry 2 is"),
    ],
)
def test_bad_offsets_in_data(base, damaged, name, index, value, pattern):
    buf = bytearray(base.data)
    _put_offsets(buf, base, name, index, int(value(_offsets(base, name))))
    open_fails(damaged(buf), pattern)


@pytest.mark.parametrize(
    "names",
    [["features/fix"], ["features/rag"], ["labels"], ["ids/data"], ["features/fix", "classes/name/data"]],
)
def test_verify_names_damaged_sections(base, damaged, names):
    buf = bytearray(base.data)
    for name in names:
        s = base.sections[name]
        buf[s["offset"] + s["length"] // 2] ^= 0x01
    store = fgs.open(damaged(buf))  # data bytes are not checked on open
    assert len(store) == N
    table_order = [n for n in base.sections if n in names]
    assert store.verify() == table_order
    assert fgs.open(base.path).verify() == []


def test_verify_cli_reports_damage(base, damaged):
    buf = bytearray(base.data)
    s = base.sections["features/rag"]
    buf[s["offset"]] ^= 0xFF
    path = damaged(buf)
    from finegym_store.cli import main

    assert main(["verify", path]) == 1
    assert main(["verify", base.path]) == 0


# -- (d) truncation and non-files ------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["0", "1", "63", "64", "65", "4096", "half", "table", "size-128", "size-1"])
def test_truncated(base, damaged, cut):
    length = {"half": base.size // 2, "table": base.table_offset, "size-128": base.size - 128,
              "size-1": base.size - 1}.get(cut) or int(cut)
    path = damaged(base.data[:length])
    if length < 64:
        open_fails(path, rf"it is {length} bytes, smaller than the 64-byte header")
    else:
        open_fails(path, rf"records a file of {base.size} bytes but the file has {length} \(truncated or appended to\)")


def test_appended_bytes(base, damaged):
    open_fails(damaged(base.data + b"\0"), r"truncated or appended to")


def test_empty_file(damaged):
    open_fails(damaged(b""), r"it is 0 bytes, smaller than the 64-byte header")


def test_foreign_files(damaged):
    open_fails(damaged(b"PK\x03\x04" + b"\0" * 200), r"bad magic")
    open_fails(damaged(pickle_bytes()), r"bad magic")
    open_fails(damaged(b"FGSTORE\0" + b"\0" * 56), r"format version 0")


def pickle_bytes():
    return pickle.dumps({"a": np.zeros((4, 8), np.float32)})


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        fgs.open(tmp_path)


def test_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.fgs"):
        fgs.open(tmp_path / "nope.fgs")


def test_symlink_to_store_opens(base, tmp_path):
    link = tmp_path / "link.fgs"
    os.symlink(base.path, link)
    assert len(fgs.open(link)) == N


# -- (e) fuzz, in a child process so that a crash cannot take pytest down ---------------------------

FUZZ = textwrap.dedent(
    r"""
    import collections, json, os, random, struct, sys
    import numpy as np
    import finegym_store as fgs
    from finegym_store import _core

    base_path, work, count, seed, regions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
    data_regions, ragged = json.loads(sys.argv[6]), json.loads(sys.argv[7])  # non-offsets sections; ragged offsets [start, N+1]
    base = open(base_path, "rb").read()
    toff = struct.unpack_from("<Q", base, 32)[0]
    nsec = struct.unpack_from("<I", base, 40)[0]
    rnd = random.Random(seed)
    outcomes = collections.Counter()

    def rehash(b):
        t = struct.unpack_from("<Q", b, 32)[0]
        c = struct.unpack_from("<I", b, 40)[0]
        table = bytes(b[t : t + 128 * c]) if t < len(b) else b""
        struct.pack_into("<Q", b, 56, _core.hash64(bytes(b[:56]) + table))

    def value():
        return rnd.choice([0, 1, 0xFF, 0x7F, 0x80, 0x40, rnd.randrange(256)])

    def mutate():
        kind = rnd.choice(["header", "table", "table", "offsets", "offsets", "garbage", "cut", "fields", "data", "data",
                           "ragged", "ragged"])
        if kind == "garbage":
            n = rnd.choice([0, 1, 8, 63, 64, 65, 128, 500, 4096, len(base)])
            data = bytearray(rnd.randrange(256) for _ in range(n))
            if n >= 8 and rnd.random() < 0.7:
                data[:8] = b"FGSTORE\0"
            if n >= 64 and rnd.random() < 0.7:
                struct.pack_into("<IIQ", data, 8, 1, 64, n)
            return kind, data
        b = bytearray(base)
        if kind == "cut":
            n = rnd.randrange(64, len(base))
            b = b[:n]
            struct.pack_into("<Q", b, 16, n)
            rehash(b)
            return kind, b
        if kind == "fields":  # a whole u64 of an entry (offset, length, shape) set to a nasty value
            e = toff + 128 * rnd.randrange(nsec)
            at = e + rnd.choice([64, 72, 96, 104, 112, 120])
            v = rnd.choice([0, 1, 63, 64, 4096, 2**32, 2**63, 2**64 - 1, 2**64 - 64, len(base), toff, rnd.randrange(len(base))])
            struct.pack_into("<Q", b, at, v)
            rehash(b)
            return kind, b
        if kind == "data":  # bytes no check at open covers: the store opens, reads see them, verify reports them
            lo, hi = data_regions[rnd.randrange(len(data_regions))]
            for _ in range(rnd.randint(1, 6)):
                b[rnd.randrange(lo, hi)] = value()
            return kind, b
        if kind == "ragged":  # another valid partition of the rows (or one with an empty instance)
            at, m = ragged[rnd.randrange(len(ragged))]
            total = struct.unpack_from("<q", b, at + 8 * (m - 1))[0]
            cuts = sorted(rnd.sample(range(1, total), m - 2)) if total > m - 1 else list(range(1, m - 1))
            if rnd.random() < 0.2:
                cuts[rnd.randrange(len(cuts))] = cuts[0]  # an instance with T = 0
            for j, v in enumerate([0] + sorted(cuts) + [total]):
                struct.pack_into("<q", b, at + 8 * j, v)
            return kind, b
        if kind == "header":
            lo, hi = 0, 56
        elif kind == "table":
            lo, hi = toff, len(base)
        else:
            lo, hi = regions[rnd.randrange(len(regions))]
        for _ in range(rnd.randint(1, 6)):
            b[rnd.randrange(lo, hi)] = value()
        if kind != "offsets" and rnd.random() < 0.85:
            rehash(b)
        return kind, b

    path = os.path.join(work, "fuzz.fgs")
    for i in range(count):
        kind, data = mutate()
        with open(path, "wb") as f:
            f.write(data)
        try:
            store = fgs.open(path)
        except fgs.FormatError:
            outcomes["FormatError"] += 1
            continue
        outcomes["opened"] += 1
        # Everything a reader can reach must stay inside the mapping, and
        # every failure must be one of the documented exceptions.
        n = len(store)
        store.labels.tobytes()
        for name in store.columns:
            col = store.column(name)
            col.values.tobytes()
            assert (col.lengths() > 0).all()
            for j in range(n):
                store.features(name, j).tobytes()
            if n:
                idx = list(range(n)) + [-1]
                store.gather(name, idx, num_segments=3, mode="train", seed=i, threads=2)
                store.gather(name, idx, num_segments=2, mode="test", dtype=np.float16)
                if not col.ragged:
                    store.gather(name, idx)
                batch = next(iter(store.loader(name, batch_size=min(n, 4), num_segments=2, mode="train",
                                               prefetch=1, threads=2)))
                assert batch.features.shape[:2] == (min(n, 4), 2)
        meta = store.meta
        strings = [store.ids, meta.video]
        if store.classes is not None:
            strings += [store.classes.name, store.classes.event]
        for s in strings:
            try:
                s.to_list()
                [s[j] for j in range(len(s))]
            except fgs.FormatError as e:  # UTF-8 is not checked on open
                assert "not valid UTF-8" in str(e), e
                outcomes["bad UTF-8"] += 1
        try:
            store.attrs
        except fgs.FormatError as e:
            assert "attrs" in str(e), e
        try:
            store.verify()
            store.index_of(store.ids[0]) if n else None
        except fgs.FormatError as e:  # duplicate ids (verify), or ids that are not UTF-8
            assert "appears twice" in str(e) or "not valid UTF-8" in str(e), e
            outcomes["verify FormatError"] += 1
        store.sections()
        if kind == "cut" or rnd.random() < 0.1:  # and now truncate it under the open reader
            os.truncate(path, rnd.randrange(len(data)))
            for op in (lambda: store.verify(), lambda: store.ids.to_list(), lambda: store.features(store.columns[0], 0),
                       lambda: store.gather(store.columns[0], list(range(n)), num_segments=2, mode="test")):
                try:
                    op()
                except OSError as e:
                    assert path in str(e), e
                    outcomes["OSError after truncation"] += 1
                except (fgs.FormatError, IndexError):
                    pass
        del store
    print(json.dumps(outcomes))
    """
)


def test_fuzz_open_never_crashes(base, tmp_path):
    regions = [
        [s["offset"], s["offset"] + s["length"]]
        for name, s in base.sections.items()
        if name.endswith("/offsets") and s["length"] > 0
    ]
    data_regions = [[s["offset"], s["offset"] + s["length"]] for name, s in base.sections.items()
                    if not name.endswith("/offsets") and s["length"] > 0]
    ragged = [[s["offset"], s["shape"][0]] for name, s in base.sections.items() if name.startswith("features/")
              and name.endswith("/offsets")]
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ, base.path, str(tmp_path), "300", "1234", json.dumps(regions),
         json.dumps(data_regions), json.dumps(ragged)],
        capture_output=True, text=True, timeout=120, cwd=CHILD_CWD,
    )
    assert proc.returncode == 0, f"child died (signal {-proc.returncode})" if proc.returncode < 0 else proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(outcomes) <= {"FormatError", "opened", "bad UTF-8", "verify FormatError", "OSError after truncation"}
    assert outcomes.get("FormatError", 0) > 100
    assert outcomes.get("opened", 0) > 50
    assert outcomes.get("OSError after truncation", 0) > 0
    assert outcomes["FormatError"] + outcomes["opened"] == 300


def test_invalid_utf8_in_ids_raises_format_error(tmp_path):
    table = {"abc": np.ones((2, 3), np.float32), "abd": np.ones((2, 3), np.float32)}
    store = fgs.convert({"x": table}, tmp_path / "u.fgs", progress=False)
    data = store.sections()
    ids = next(s for s in data if s["name"] == "ids/data")
    raw = bytearray((tmp_path / "u.fgs").read_bytes())
    raw[ids["offset"]] = 0xFF  # not UTF-8; the header checksum does not cover data
    (tmp_path / "bad.fgs").write_bytes(bytes(raw))
    bad = fgs.open(tmp_path / "bad.fgs")
    with pytest.raises(fgs.FormatError, match="ids.*not valid UTF-8"):
        bad.ids[0]
    with pytest.raises(fgs.FormatError, match="not valid UTF-8"):
        bad.ids.to_list()
    assert bad.verify() == ["ids/data"]


# -- (f) what FORMAT.md forbids and no checksum covers: layout, T > 0, uniqueness, names ------------


def _table(buf):
    toff, count = get(buf, "section_table_offset"), get(buf, "section_count")
    return [bytes(buf[toff + 128 * i : toff + 128 * (i + 1)]) for i in range(count)]


def _with_table(buf, rows):
    """buf with its section table replaced by `rows`, the file ending at the table."""
    toff = get(buf, "section_table_offset")
    out = bytearray(buf[:toff]) + b"".join(rows)
    put(out, "section_count", len(rows))
    put(out, "file_size", len(out))
    rehash(out)
    return out


def _entry_name(row):
    return row[:64].split(b"\0", 1)[0].decode()


def test_zero_row_instance_in_ragged_column_is_refused(base, damaged):
    # Instance 2 loses its rows to instance 3: offsets stay in bounds and sum up,
    # but T_2 = 0 (which made gather divide by zero).
    buf = bytearray(base.data)
    o = _offsets(base, "features/rag/offsets")
    _put_offsets(buf, base, "features/rag/offsets", 3, int(o[2]))
    open_fails(damaged(buf), r"section 'features/rag/offsets' entry 3 equals entry 2 \(\d+\): instance 2 has no "
                             r"rows; every instance needs T > 0")


def test_zero_row_last_instance_is_refused(base, damaged):
    buf = bytearray(base.data)
    o = _offsets(base, "features/rag/offsets")
    _put_offsets(buf, base, "features/rag/offsets", N - 1, int(o[N]))
    open_fails(damaged(buf), rf"entry {N} equals entry {N - 1} .*instance {N - 1} has no rows")


def test_empty_strings_are_still_fine(tmp_path):
    # T > 0 is for feature rows; strings may be empty (meta/video of ids that do not parse is "").
    table = {"a": np.ones((2, 3), np.float32), "b": np.ones((1, 3), np.float32)}
    store = fgs.convert({"x": table}, tmp_path / "s.fgs", progress=False)
    assert store.meta.video.to_list() == ["", ""]
    assert store.verify() == []


def test_writer_refuses_zero_rows(tmp_path):
    w = _core.Writer(str(tmp_path / "w.fgs"), 2)
    try:
        w.begin_features("x", np.dtype(np.float32), 0, 3)
        w.append_features(np.ones((3, 3), np.float32))
        with pytest.raises(ValueError, match=r"ragged column 'x': instance 1 has 0 rows; every instance needs T > 0"):
            w.end_features(np.array([3, 0], np.int64))
    finally:
        w.discard()
    assert not (tmp_path / "w.fgs").exists()


def test_converter_refuses_zero_rows(tmp_path):
    table = {"a": np.ones((2, 3), np.float32), "b": np.ones((0, 3), np.float32)}
    with pytest.raises(fgs.ConversionError, match=r"key 'b': empty array of shape \(0, 3\)"):
        fgs.convert({"x": table}, tmp_path / "z.fgs", progress=False)
    assert not (tmp_path / "z.fgs").exists()


def test_nonzero_padding_is_refused(base, damaged):
    # The writer puts features/fix at 4096: bytes 64..4095 are padding, covered by no checksum.
    first = min(s["offset"] for s in base.sections.values())
    assert first == 4096 and base.data[64:4096] == bytes(4032)
    buf = bytearray(base.data)
    buf[1000] = 0x5A
    open_fails(damaged(buf), r"padding byte at offset 1000 \(between the header and section 'features/fix'\) is 90, "
                             r"expected 0")


def test_nonzero_padding_before_the_table_is_refused(base, damaged):
    last = max(s["offset"] + s["length"] for s in base.sections.values())
    assert last < base.table_offset, "the base store should end its data off the 64-byte grid"
    buf = bytearray(base.data)
    buf[base.table_offset - 1] = 1
    open_fails(damaged(buf), rf"padding byte at offset {base.table_offset - 1} \(between section '.*' and the section "
                             r"table\) is 1")


def test_gap_wider_than_alignment_is_refused(base, damaged):
    # 64 more zero bytes before the table: aligned, zero, but not padding.
    toff = base.table_offset
    buf = bytearray(base.data[:toff]) + bytes(64) + bytearray(base.data[toff:])
    put(buf, "section_table_offset", toff + 64)
    put(buf, "file_size", len(buf))
    rehash(buf)
    open_fails(damaged(buf), r"there are \d+ bytes between section '.*' \(ends at \d+\) and the section table \(at "
                             rf"{toff + 64}\); only padding to the next multiple of 64 may lie between sections")


@pytest.mark.parametrize("victim, onto", [("meta/event_end", "meta/event_start"), ("labels", "meta/element_end"),
                                          ("classes/set", "classes/glabel")])
def test_overlapping_sections_are_refused(base, damaged, victim, onto):
    # Same dtype and shape, so the entry is valid on its own; the bytes are shared.
    buf = bytearray(base.data)
    at = entries(buf)[victim]
    put(buf, "offset", base.sections[onto]["offset"], ENTRY, at)
    rehash(buf)
    open_fails(damaged(buf), r"(overlaps section '.*'|there are \d+ bytes between)")


def test_overlap_message(base, damaged):
    buf = bytearray(base.data)
    at = entries(buf)["meta/event_end"]
    start = base.sections["meta/event_start"]["offset"]
    put(buf, "offset", start, ENTRY, at)
    rehash(buf)
    open_fails(damaged(buf), rf"section '(meta/event_end|meta/event_start)' at offset {start} overlaps section "
                             rf"'(meta/event_start|meta/event_end)' \(which ends at {start + 4 * N}\)")


def test_store_without_feature_columns_is_refused(base, damaged):
    rows = [r for r in _table(base.data) if not _entry_name(r).startswith("features/")]
    assert len(rows) == base.section_count - 7  # two columns' features, blocks and stats, one's offsets
    open_fails(damaged(_with_table(base.data, rows)),
               r"no feature column \(no 'features/NAME' section\); a store needs at least one")


def test_writer_refuses_store_without_features(tmp_path):
    w = _core.Writer(str(tmp_path / "nf.fgs"), 1)
    try:
        w.add_strings("ids", ["a"])
        w.add_array("labels", np.zeros(1, np.int32))
        w.add_strings("meta/video", [""])
        for name in ("event_start", "event_end", "element_start", "element_end"):
            w.add_array(f"meta/{name}", np.zeros(1, np.int32))
        with pytest.raises(fgs.FormatError, match=r"no feature column"):
            w.commit()
    finally:
        w.discard()
    assert not (tmp_path / "nf.fgs").exists()


def _duplicate_id(base):
    """base with id 1 overwritten by id 0 and the ids/data checksum (and header) recomputed,
    so that the checksums match and only uniqueness is wrong."""
    buf = bytearray(base.data)
    o = _offsets(base, "ids/offsets")
    d = base.sections["ids/data"]
    assert o[1] - o[0] == o[2] - o[1], "synthetic FineGym ids all have the same length"
    first = bytes(buf[d["offset"] + o[0] : d["offset"] + o[1]])
    buf[d["offset"] + o[1] : d["offset"] + o[2]] = first
    put(buf, "checksum", _core.hash64(bytes(buf[d["offset"] : d["offset"] + d["length"]])), ENTRY,
        entries(buf)["ids/data"])
    rehash(buf)
    return buf, first.decode()


def test_duplicate_ids_fail_verify_and_index_of(base, damaged):
    buf, dup = _duplicate_id(base)
    path = damaged(buf)
    store = fgs.open(path)  # open does not read string bytes
    assert store.ids[0] == store.ids[1] == dup
    with pytest.raises(fgs.FormatError, match=rf"id '{dup}' appears twice \(instances 0 and 1\); ids must be unique") as e:
        store.verify()
    assert path in str(e.value)
    with pytest.raises(fgs.FormatError, match=rf"{path}.*id '{dup}' appears twice \(instances 0 and 1\)"):
        store.index_of(dup)
    from finegym_store.cli import main

    assert main(["verify", path]) != 0


def test_damaged_ids_are_reported_as_damage_not_duplicates(base, damaged):
    # Without the recomputed checksum the same change is plain damage.
    buf = bytearray(base.data)
    o = _offsets(base, "ids/offsets")
    d = base.sections["ids/data"]
    buf[d["offset"] + o[1] : d["offset"] + o[2]] = buf[d["offset"] + o[0] : d["offset"] + o[1]]
    assert fgs.open(damaged(buf)).verify() == ["ids/data"]


@pytest.mark.parametrize("name", ["offsets"])
def test_column_names_that_collide_with_suffixes_are_refused_up_front(tmp_path, name):
    assert not _core.valid_column_name(name)
    assert _core.valid_column_name(name + "2") and _core.valid_column_name("my_" + name)

    class Exploding(dict):  # the conversion must stop before it reads any feature
        def __getitem__(self, key):
            raise AssertionError("features were read before the column name was checked")

    with pytest.raises(fgs.ConversionError, match=rf"column name '{name}' must be .* and not 'offsets'"):
        fgs.convert({"x": {"a": np.ones((1, 2), np.float32)}, name: Exploding(a=1)}, tmp_path / "c.fgs",
                    progress=False)
    assert not (tmp_path / "c.fgs").exists()
    w = _core.Writer(str(tmp_path / "w.fgs"), 1)
    try:
        with pytest.raises(ValueError, match=rf"column name '{name}' must be"):
            w.begin_features(name, np.dtype(np.float32), 1, 2)
    finally:
        w.discard()


def test_a_column_named_data_is_valid(tmp_path):
    # Version-1 writers accepted it and "features/data" is unambiguous: it
    # converts, opens and gathers like any other column.
    assert _core.valid_column_name("data")
    table = {"a": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.ones((3, 2), np.float32)}
    s = fgs.convert({"data": table}, tmp_path / "d.fgs", progress=False)
    assert s.columns == ("data",) and s.verify() == []
    np.testing.assert_array_equal(s.gather("data", [0]), table["a"][None])


@pytest.mark.parametrize(
    "payload, pattern",
    [
        (b"\xff\xfe", r"section 'attrs' is not UTF-8 JSON \(.*can't decode"),
        (b"{not json", r"section 'attrs' is not UTF-8 JSON \(Expecting"),
        (b"[1, 2]", r"section 'attrs' holds a JSON list, expected an object"),
    ],
)
def test_damaged_attrs_raise_format_error(base, damaged, payload, pattern):
    buf = bytearray(base.data)
    a = base.sections["attrs"]
    buf[a["offset"] : a["offset"] + a["length"]] = payload.ljust(a["length"], b" ")
    path = damaged(buf)
    store = fgs.open(path)
    with pytest.raises(fgs.FormatError, match=pattern) as e:
        store.attrs
    assert path in str(e.value)
    assert store.verify() == ["attrs"]


def _many_sections_store(columns: int) -> bytes:
    """A valid store of N = 0 instances with `columns` fixed feature columns,
    crafted byte by byte (the writer would take a while to make it): every
    section is empty, so the file is little more than its table."""
    names = [("ids/offsets", 3, (1,), 8), ("ids/data", 1, (0,), 0), ("labels", 2, (0,), 0),
             ("meta/video/offsets", 3, (1,), 8), ("meta/video/data", 1, (0,), 0)]
    names += [(f"meta/{f}", 2, (0,), 0) for f in ("event_start", "event_end", "element_start", "element_end")]
    names += [(f"features/c{i}", 5, (0, 1, 1), 0) for i in range(columns)]
    # Layout: ids/offsets at 64 (8 zero bytes = [0]), meta/video/offsets at 128,
    # the empty sections at 192, the empty feature sections at 4096, table at 4096.
    rows, offsets = [], {"ids/offsets": 64, "meta/video/offsets": 128}
    for name, dtype, shape, length in names:
        off = offsets.get(name, 4096 if name.startswith("features/") else 192)
        data = bytes(length)
        row = bytearray(128)
        row[: len(name)] = name.encode()
        struct.pack_into("<QQQBB", row, 64, off, length, _core.hash64(data), dtype, len(shape))
        for k, d in enumerate(shape):
            struct.pack_into("<Q", row, 96 + 8 * k, d)
        rows.append(bytes(row))
    buf = bytearray(4096) + b"".join(rows)
    buf[:8] = b"FGSTORE\0"
    struct.pack_into("<IIQQQIIQ", buf, 8, 1, 64, len(buf), 0, 4096, len(rows), 128, 0)
    rehash(buf)
    return bytes(buf)


def test_open_handles_the_maximum_section_count(damaged):
    # 65,536 sections: the schema check is O(sections) (it was quadratic).
    # Correctness only here; benchmarks/ holds timings.
    columns = 65536 - 9
    store = fgs.open(damaged(_many_sections_store(columns)))
    assert len(store) == 0 and len(store.columns) == columns
    assert store.columns[-1] == f"c{columns - 1}"
    assert store.verify() == []


def test_sections_dict_names_the_schema(base):
    s = _core.SECTIONS
    expected = {s["ids"] + s["offsets_suffix"], s["ids"] + s["data_suffix"], s["labels"],
                s["meta_video"] + s["offsets_suffix"], s["meta_video"] + s["data_suffix"], *s["meta_ints"],
                *s["class_ints"], *(c + x for c in s["class_strings"] for x in (s["offsets_suffix"], s["data_suffix"])),
                s["attrs"], s["feature_prefix"] + "fix", s["feature_prefix"] + "rag",
                s["feature_prefix"] + "rag" + s["offsets_suffix"],
                *(s["feature_prefix"] + c + x for c in ("fix", "rag") for x in (s["blocks_suffix"], s["stats_suffix"]))}
    assert set(base.sections) == expected
    # The spelling of docs/FORMAT.md, independently of the code.
    assert s["meta_ints"] == ("meta/event_start", "meta/event_end", "meta/element_start", "meta/element_end")
    assert s["class_ints"] == ("classes/label", "classes/glabel", "classes/set")
    assert (s["ids"], s["feature_prefix"], s["offsets_suffix"], s["attrs"]) == ("ids", "features/", "/offsets", "attrs")
    assert s["blocks_suffix"] == "/blocks" and s["stats_suffix"] == "/stats"


# -- format version 2: block checksums ------------------------------------------------


def test_block_checksum_section_of_the_wrong_length_is_refused(base, damaged):
    buf = bytearray(base.data)
    at = entries(buf)["features/fix/blocks"]
    put(buf, "length", 16, ENTRY, at)
    struct.pack_into("<Q", buf, at + 96, 2)  # shape (2,): one block of features/fix needs (1,)
    rehash(buf)
    open_fails(damaged(buf), r"section 'features/fix/blocks' is int64\(2,\), expected int64\(1,\)")


def test_missing_block_checksums_are_refused_in_version_2(base, damaged):
    rows = [r for r in _table(base.data) if _entry_name(r) != "features/rag/blocks"]
    open_fails(damaged(_with_table(base.data, rows)), r"required section 'features/rag/blocks' is missing")


def test_block_checksums_in_a_version_1_file_are_refused(base, damaged):
    buf = bytearray(base.data)
    put(buf, "version", 1)
    rehash(buf)
    open_fails(damaged(buf), r"section 'features/fix/blocks': column name must be")
