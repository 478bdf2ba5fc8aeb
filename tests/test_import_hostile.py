"""Hostile Arrow and Parquet input to from_arrow / from_parquet and the
import command: every attack is refused with one exception type whose
message names the file (or source), the column and the row where there is
one, and nothing appears under the target name. Anything that could crash
the interpreter runs in a child process."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import ingest
from finegym_store.arrow import FIELD_KEY, METADATA_KEY
from finegym_store.cli import main

from arrow_fixtures import require
from conftest import CHILD_CWD, run_fuzz_seeded

pa = require("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

N = 37  # rows of the sample tables: an odd count whose zigzag varint (0x4a) is easy to find in a footer
C = 6


def _table(n: int = N, columns: tuple[str, ...] = ("x",), metadata: dict | None = None) -> pa.Table:
    cols = {"id": pa.array([f"v{i:03d}" for i in range(n)]), "label": pa.array(np.arange(n, dtype=np.int32) % 3)}
    for k, name in enumerate(columns):
        values = pa.array(np.arange(n * 2 * C, dtype=np.float32) + 1000 * k)
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(values, C), 2)
    t = pa.table(cols)
    return t.replace_schema_metadata(metadata) if metadata is not None else t


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(f".{out.name}")]


def _refused(call, out: Path, exc: type[BaseException], *parts: str) -> str:
    with pytest.raises(exc) as e:
        call()
    msg = str(e.value)
    for p in parts:
        assert p in msg, (p, msg)
    _nothing_at(out)
    return msg


# -- Arrow data that lies about its lengths ------------------------------------------------------------


def _lying_ipc(path: Path, extra: int, stream: bool = False) -> None:
    """A valid two-row list<float> Arrow IPC file whose child array claims
    ``extra`` more values (field node length and last offset patched) than
    its 32-byte buffer holds."""
    col = pa.ListArray.from_arrays(pa.array([0, 4, 8], pa.int32()), pa.array(np.arange(8, dtype=np.float32)))
    t = pa.table({"id": ["a", "b"], "x": col})
    sink = io.BytesIO()
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, t.schema) as w:
        w.write_table(t)
    data = bytearray(sink.getvalue())
    node = data.index(struct.pack("<qq", 8, 0))  # the float child's FieldNode (length, null_count)
    data[node:node + 8] = struct.pack("<q", 8 + extra)
    offs = data.index(struct.pack("<iii", 0, 4, 8))
    data[offs + 8:offs + 12] = struct.pack("<i", 8 + extra)
    path.write_bytes(bytes(data))


LYING = r"""
import json, sys
import pyarrow as pa
import finegym_store as fgs
path, out, stream = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
src = pa.ipc.open_stream(path) if stream else pa.ipc.open_file(path).read_all()
try:
    fgs.from_arrow(src, out, channels=4, progress=False)
    print(json.dumps({"outcome": "store"}))
except Exception as e:
    print(json.dumps({"outcome": type(e).__name__, "message": str(e)}))
"""


@pytest.mark.parametrize("extra", [2**26, 2**29])
@pytest.mark.parametrize("stream", [False, True], ids=["file", "stream"])
def test_arrow_child_longer_than_its_buffer_is_refused_before_copying(tmp_path, extra, stream):
    path, out = tmp_path / "lying.arrow", tmp_path / "out.fgs"
    _lying_ipc(path, extra, stream)
    proc = subprocess.run([sys.executable, "-c", LYING, str(path), str(out), "1" if stream else "0"],
                          capture_output=True, text=True, timeout=120, cwd=CHILD_CWD)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["outcome"] == "ConversionError", result
    where = "the record batch stream: batch 0" if stream else "the Arrow table"
    assert result["message"].startswith(where) and "invalid Arrow data" in result["message"]
    assert "rows 0..1" in result["message"] and "too small" in result["message"]
    _nothing_at(out)


def test_stream_batch_with_another_schema_is_refused(tmp_path):
    good = _table(4).to_batches()[0]
    other = pa.RecordBatch.from_arrays([good.column(0), good.column(1), pa.array([[1.0]] * 4)],
                                       names=["id", "label", "x"])

    class Stream:  # a producer that ignores its own declared schema
        def __arrow_c_stream__(self, requested_schema=None):
            return pa.RecordBatchReader.from_batches(good.schema, iter([good, other])).__arrow_c_stream__()

    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(Stream(), out, progress=False), out, fgs.ConversionError,
             "the Stream stream: batch 1")


def test_invalid_utf8_id_names_the_row(tmp_path):
    good = pa.array(["ok", "fine"])
    offsets, data = good.buffers()[1], pa.py_buffer(b"ok\xff\xfeine")
    ids = pa.Array.from_buffers(pa.string(), 2, [None, offsets, data])
    t = _table(2).set_column(0, "id", ids)
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(t, out, progress=False), out, fgs.ConversionError,
             "the Arrow table", "column 'id'", "row 1", "not valid UTF-8")


DESCENDING = r"""
import json, sys
import numpy as np
import pyarrow as pa
import finegym_store as fgs
# offsets 0, 6, 2**30, 8: first and last inside the data (basic validation
# passes), the middle ones not; the row lookup of bad UTF-8 must not slice them.
offsets = pa.py_buffer(np.array([0, 6, 2**30, 8], np.int32).tobytes())
ids = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"abc\xffdefgh")])
x = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6, np.float32)), 2)
try:
    fgs.from_arrow(pa.table({"id": ids, "x": x}), sys.argv[1], progress=False)
    print(json.dumps({"outcome": "store"}))
except Exception as e:
    print(json.dumps({"outcome": type(e).__name__, "message": str(e)}))
"""


def test_string_offsets_out_of_order_are_refused_without_reading_them(tmp_path):
    out = tmp_path / "out.fgs"
    proc = subprocess.run([sys.executable, "-c", DESCENDING, str(out)], capture_output=True, text=True,
                          timeout=120, cwd=CHILD_CWD)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["outcome"] == "ConversionError", result
    assert result["message"].startswith("the Arrow table: rows 0..2: invalid Arrow data"), result
    _nothing_at(out)


@pytest.mark.parametrize("type_", [pa.uint8(), pa.uint64(), pa.int64()])
def test_labels_of_any_integer_type_with_nulls(tmp_path, type_):
    t = _table(3).set_column(1, "label", pa.array([2, None, 1], type_))
    assert list(fgs.from_arrow(t, tmp_path / "ok.fgs", progress=False).labels) == [2, -1, 1]
    if type_.bit_width < 32:
        return
    big = _table(3).set_column(1, "label", pa.array([2, None, 2**31], type_))
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(big, out, progress=False), out, fgs.ConversionError,
             "the Arrow table: column 'label'", "row 2", str(2**31))


def test_binary_ids_are_taken_when_utf8_and_refused_naming_the_row_otherwise(tmp_path):
    t = _table(3).set_column(0, "id", pa.array([b"a", b"b", b"c"], pa.binary()))
    assert fgs.from_arrow(t, tmp_path / "ok.fgs", progress=False).ids[:] == ["a", "b", "c"]
    bad = _table(3).set_column(0, "id", pa.array([b"a", b"b", b"\xc3("], pa.binary()))
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(bad, out, progress=False), out, fgs.ConversionError,
             "the Arrow table: column 'id'", "row 2", "not valid UTF-8")


# -- Parquet: snapshots, folders, footers, pages ------------------------------------------------------


def test_parquet_file_replaced_between_passes(tmp_path, monkeypatch):
    src, out = tmp_path / "s.parquet", tmp_path / "out.fgs"
    pq.write_table(_table(columns=("x", "y")), src)
    original = ingest._write_column
    calls = []

    def write_then_replace(*args, **kwargs):
        result = original(*args, **kwargs)
        if not calls:
            other = tmp_path / "other.parquet"
            pq.write_table(_table(columns=("x", "y")).slice(0, 5), other)
            os.replace(other, src)
        calls.append(1)
        return result

    monkeypatch.setattr(ingest, "_write_column", write_then_replace)
    _refused(lambda: fgs.from_parquet(src, out, progress=False), out, fgs.ConversionError,
             str(src), "changed while it was imported")
    assert len(calls) == 1


def test_parquet_file_rewritten_in_place_during_the_last_pass(tmp_path, monkeypatch):
    src, out = tmp_path / "s.parquet", tmp_path / "out.fgs"
    pq.write_table(_table(), src)
    original = ingest._ParquetSource.batches

    def batches(self, columns, batch_rows):
        for b in original(self, columns, batch_rows):
            yield b
            with open(src, "ab") as f:  # appended to in place: same inode, new size
                f.write(b"\0")

    monkeypatch.setattr(ingest._ParquetSource, "batches", batches)
    _refused(lambda: fgs.from_parquet(src, out, progress=False), out, fgs.ConversionError,
             str(src), "changed while it was imported")


def test_folder_walk_skips_hidden_underscore_and_spark_temporary_and_survives_link_loops(tmp_path):
    folder = tmp_path / "ds"
    (folder / "part").mkdir(parents=True)
    t = _table(10)
    pq.write_table(t.slice(0, 5), folder / "part" / "a.parquet")
    pq.write_table(t.slice(5, 5), folder / "b.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(t.slice(0, 3), folder / "_temporary" / "0" / "part-uncommitted.parquet")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.parquet").write_bytes(b"not parquet")
    (folder / "part" / "_meta").write_bytes(b"not parquet")
    os.symlink(folder, folder / "part" / "loop")  # a link back up: never followed
    store = fgs.from_parquet(folder, tmp_path / "out.fgs", progress=False)
    assert list(store.ids) == [f"v{i:03d}" for i in range(5, 10)] + [f"v{i:03d}" for i in range(5)]


def test_fifo_source_is_refused_without_opening_it(tmp_path):
    fifo, out = tmp_path / "in.parquet", tmp_path / "out.fgs"
    os.mkfifo(fifo)  # opening it for reading would block forever
    _refused(lambda: fgs.from_parquet(fifo, out, progress=False), out, fgs.ConversionError,
             str(fifo), "a FIFO")
    folder = tmp_path / "ds"
    folder.mkdir()
    os.mkfifo(folder / "p.parquet")
    _refused(lambda: fgs.from_parquet(folder, out, progress=False), out, fgs.ConversionError,
             str(folder / "p.parquet"), "a FIFO")


def test_socket_and_device_sources_are_refused(tmp_path):
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_parquet("/dev/zero", out, progress=False), out, fgs.ConversionError,
             "/dev/zero", "a device")
    path = tmp_path / "s"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        _refused(lambda: fgs.from_parquet(path, out, progress=False), out, fgs.ConversionError,
                 str(path), "a socket")
    finally:
        s.close()


def test_symlink_to_a_file_is_a_source(tmp_path):
    pq.write_table(_table(4), tmp_path / "real.parquet")
    os.symlink(tmp_path / "real.parquet", tmp_path / "link.parquet")
    assert len(fgs.from_parquet(tmp_path / "link.parquet", tmp_path / "out.fgs", progress=False)) == 4


def _patched_footer(data: bytes, old: bytes, new: bytes, which: int) -> bytes:
    """``data`` with the ``which``-th ``old`` in its footer replaced by ``new``
    (the footer length updated)."""
    flen = struct.unpack("<I", data[-8:-4])[0]
    start = len(data) - 8 - flen
    foot = data[start:-8]
    at = [i for i in range(len(foot)) if foot[i:i + len(old)] == old][which]
    foot = foot[:at] + new + foot[at + len(old):]
    return data[:start] + foot + struct.pack("<I", len(foot)) + b"PAR1"


def _zigzag_varint(v: int) -> bytes:
    v = (v << 1) ^ (v >> 63)
    v &= 2**64 - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _rows_patched(tmp_path: Path, file_rows: int | None, group_rows: int | None,
                  chunk_values: int | None = None) -> Path:
    """A one-row-group Parquet file of N rows with the footer's file-level
    num_rows, row group num_rows and/or the flat columns' num_values replaced
    (thrift compact: field header 0x16, then the zigzag varint)."""
    src = tmp_path / "clean.parquet"
    pq.write_table(_table(), src)
    data = src.read_bytes()
    old = b"\x16" + _zigzag_varint(N)
    # Find which occurrences are the file's and the row group's num_rows.
    roles: dict[str, int] = {}
    values = []
    for k in range(8):
        try:
            trial = _patched_footer(data, old, b"\x16" + _zigzag_varint(N - 1), k)
        except IndexError:
            break
        (tmp_path / "t.parquet").write_bytes(trial)
        md = pq.ParquetFile(tmp_path / "t.parquet").metadata
        if md.num_rows == N - 1:
            roles["file"] = k
        elif md.row_group(0).num_rows == N - 1:
            roles["group"] = k
        else:
            values.append(k)
    assert set(roles) == {"file", "group"} and len(values) == 2  # num_values of id and label
    # Patch the later occurrence first so the earlier ones' indexes hold.
    edits = [(roles["file"], file_rows), (roles["group"], group_rows)] + [(k, chunk_values) for k in values]
    for k, rows in sorted(edits, reverse=True):
        if rows is not None:
            data = _patched_footer(data, old, b"\x16" + _zigzag_varint(rows), k)
    path = tmp_path / "hostile.parquet"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("file_rows,group_rows,chunk_values,expect", [
    (N + 5, None, None, f"the footer claims {N + 5} rows, but its row groups hold {N}"),
    (None, N + 5, N + 5, f"the footer claims {N} rows, but its row groups hold {N + 5}"),
    (N + 1, N + 1, None, f"row group 0: the footer claims {N + 1} rows, the pages hold {N}"),
    (N + 1, N + 1, N + 1, f"row group 0: the footer claims {N + 1} rows, the pages hold {N}"),
    (2**63 - 1, None, None, f"the footer claims {2**63 - 1} rows"),
    (None, 2**63 - 1, None, f"row group 0: the footer claims {2**63 - 1} rows"),
    (-5, -5, -5, "row group 0: the footer claims -5 rows"),
])
def test_footer_row_counts_that_lie(tmp_path, file_rows, group_rows, chunk_values, expect):
    path, out = _rows_patched(tmp_path, file_rows, group_rows, chunk_values), tmp_path / "out.fgs"
    _refused(lambda: fgs.from_parquet(path, out, progress=False), out, fgs.ConversionError, str(path), expect)


def test_footer_whose_counts_agree_is_believed(tmp_path):
    # Every count says N - 1 rows; the reader stops there, so the last row's
    # values in the pages are never read: a consistent (shorter) file.
    path = _rows_patched(tmp_path, N - 1, N - 1)
    store = fgs.from_parquet(path, tmp_path / "out.fgs", progress=False)
    assert len(store) == N - 1 and store.ids[N - 2] == f"v{N - 2:03d}"


def test_footer_longer_than_the_file(tmp_path):
    src, out = tmp_path / "s.parquet", tmp_path / "out.fgs"
    pq.write_table(_table(), src)
    data = src.read_bytes()
    src.write_bytes(data[:-8] + struct.pack("<I", 2**31) + b"PAR1")
    _refused(lambda: fgs.from_parquet(src, out, progress=False), out, fgs.ConversionError,
             str(src), "not a readable Parquet file")


def test_column_chunk_outside_the_file(tmp_path):
    src, out = tmp_path / "s.parquet", tmp_path / "out.fgs"
    pq.write_table(_table(), src)
    md = pq.ParquetFile(src).metadata
    size = md.row_group(0).column(2).total_compressed_size  # the x column's chunk
    data = src.read_bytes()
    # ColumnMetaData field 6 (total_uncompressed_size) then 7 (total_compressed_size): header 0x16 each.
    hostile = _patched_footer(data, b"\x16" + _zigzag_varint(size), b"\x16" + _zigzag_varint(2**62), -1)
    src.write_bytes(hostile)
    assert pq.ParquetFile(src).metadata.row_group(0).column(2).total_compressed_size == 2**62
    _refused(lambda: fgs.from_parquet(src, out, progress=False), out, fgs.ConversionError,
             str(src), "row group 0: unreadable data")


def test_corrupt_data_page_names_the_file_and_row_group(tmp_path):
    src, out = tmp_path / "s.parquet", tmp_path / "out.fgs"
    pq.write_table(_table(200), src, compression="zstd", row_group_size=100, use_dictionary=False)
    md = pq.ParquetFile(src).metadata
    chunk = md.row_group(1).column(2)
    data = bytearray(src.read_bytes())
    start = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[start:start + 64] = bytes(64)  # zeros in the middle of a zstd frame
    src.write_bytes(bytes(data))
    _refused(lambda: fgs.from_parquet(src, out, progress=False), out, fgs.ConversionError,
             str(src), "row group 1")


# -- metadata and arguments ----------------------------------------------------------------------------


def _meta(doc) -> dict:
    return {METADATA_KEY: doc if isinstance(doc, bytes) else json.dumps(doc).encode()}


@pytest.mark.parametrize("doc,parts", [
    (b"{not json", ["not readable JSON"]),
    (b"[" * 100_000 + b"]" * 100_000, ["not readable JSON"]),
    ([1, 2], ["expected a JSON object, got list"]),
    ({"columns": [1]}, ["'columns' must be an object, got list"]),
    ({"columns": {"x": [2, 3]}}, ["columns['x']", "expected a JSON object, got list"]),
    ({"columns": {"x": {"segments": 2, "channels": 2**70}}}, ["columns['x']", "'channels'", str(2**70)]),
    ({"columns": {"x": {"segments": 2**63, "channels": C}}}, ["columns['x']", "'segments'"]),
    ({"columns": {"x": {"segments": "2"}}}, ["columns['x']", "'segments'"]),
    ({"columns": {"x": {"dtype": "int8"}}}, ["columns['x']", "'dtype'"]),
    ({"classes": [1]}, ["'classes' must be an object"]),
    ({"classes": {"label": [2**40], "glabel": [0], "set": [0], "event": ["VT"], "name": ["a"]}},
     ["classes", "'label'[0]", str(2**40)]),
    ({"classes": {"label": [[0]], "glabel": [0], "set": [0], "event": ["VT"], "name": ["a"]}},
     ["classes", "'label'[0]"]),
    ({"classes": {"label": [0, 1], "glabel": [0], "set": [0], "event": ["VT"], "name": ["a"]}},
     ["classes", "'glabel' holds 1 entries"]),
    ({"classes": {"label": [0, 0], "glabel": [0, 1], "set": [0, 0], "event": ["VT", "VT"],
                  "name": ["a", "b"]}}, ["classes", "'label'[1]", "duplicate"]),
    ({"classes": {"label": [0]}}, ["classes", "missing glabel"]),
])
def test_hostile_schema_metadata(tmp_path, doc, parts):
    t = _table(metadata=_meta(doc))
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(t, out, progress=False), out, fgs.ConversionError,
             "the Arrow table", "'finegym_store'", *parts)


def test_hostile_schema_metadata_in_a_parquet_file_names_the_file(tmp_path):
    src, out = tmp_path / "s.parquet", tmp_path / "out.fgs"
    pq.write_table(_table(metadata=_meta(b"{oops")), src)
    _refused(lambda: fgs.from_parquet(src, out, progress=False), out, fgs.ConversionError,
             str(src), "'finegym_store'", "not readable JSON")


def test_hostile_field_metadata(tmp_path):
    t = _table()
    field = t.schema.field("x").with_metadata({FIELD_KEY: b'{"segments": "x"'})
    t = t.cast(t.schema.set(2, field))
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(t, out, progress=False), out, fgs.ConversionError,
             "column 'x'", "'finegym_store.column'", "not readable JSON")


def test_duplicate_labels_in_classes_argument(tmp_path):
    classes = {"label": [0, 1, 1], "glabel": [0, 1, 2], "set": [0, 0, 0], "event": ["VT"] * 3,
               "name": ["a", "b", "c"]}
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(_table(), out, classes=classes, progress=False), out, fgs.ConversionError,
             "classes", "'label'[2]", "duplicate")


def test_zero_channels_from_the_type(tmp_path):
    t = pa.table({"id": ["a", "b", "c"], "x": pa.array([[]] * 3, pa.list_(pa.float32(), 0))})
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(t, out, progress=False), out, fgs.ConversionError,
             "the Arrow table: column 'x'", "channels = 0")
    nested = pa.table({"id": ["a"], "x": pa.array([[[]]], pa.list_(pa.list_(pa.float32(), 0)))})
    _refused(lambda: fgs.from_arrow(nested, out, progress=False), out, fgs.ConversionError,
             "column 'x'", "channels = 0")


def test_duplicate_column_names(tmp_path):
    t = _table()
    t = pa.table(t.columns + [t.column("x")], names=t.column_names + ["x"])
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(t, out, progress=False), out, fgs.ConversionError,
             "the Arrow table: column 'x' appears more than once")


def test_numpy_integer_arguments_work(tmp_path):
    flat = pa.table({"id": ["a", "b"], "x": pa.array([[1.0, 2.0, 3.0, 4.0]] * 2, pa.list_(pa.float32()))})
    store = fgs.from_arrow(flat, tmp_path / "a.fgs", channels=np.int64(2), length=np.int32(2), progress=False)
    assert store.column("x").values.shape == (2, 2, 2)
    store = fgs.from_arrow(flat, tmp_path / "b.fgs", channels={"x": np.uint8(4)}, batch_size=np.int64(1),
                           progress=False)
    assert store.column("x").values.shape == (2, 1, 4)  # every row has T = 1: stored fixed


@pytest.mark.parametrize("value,exc", [(-1, ValueError), (0, ValueError), (True, TypeError), (2.5, TypeError),
                                       ("8", TypeError), (2**63, ValueError)])
def test_bad_batch_size(tmp_path, value, exc):
    out = tmp_path / "out.fgs"
    msg = _refused(lambda: fgs.from_arrow(_table(), out, batch_size=value, progress=False), out, exc, "batch_size")
    assert "no rows" not in msg
    pq.write_table(_table(), tmp_path / "s.parquet")
    _refused(lambda: fgs.from_parquet(tmp_path / "s.parquet", out, batch_size=value, progress=False), out, exc,
             "batch_size")


@pytest.mark.parametrize("what", ["length", "channels"])
def test_huge_length_or_channels_argument(tmp_path, what):
    flat = pa.table({"id": ["a"], "x": pa.array([[1.0, 2.0]], pa.list_(pa.float32()))})
    out = tmp_path / "out.fgs"
    _refused(lambda: fgs.from_arrow(flat, out, progress=False, **{"channels": 2, what: 2**63}), out, ValueError,
             "column 'x'", what, str(2**63))


# -- the command -----------------------------------------------------------------------------------


def test_import_command_exits_2_with_one_line(tmp_path, capsys):
    good = tmp_path / "good.parquet"
    pq.write_table(_table(), good)
    bad_meta = tmp_path / "meta.parquet"
    pq.write_table(_table(metadata=_meta({"columns": {"x": {"channels": 2**70}}})), bad_meta)
    lying = _rows_patched(tmp_path, N + 3, None)
    fifo = tmp_path / "fifo.parquet"
    os.mkfifo(fifo)
    existing = tmp_path / "exists.fgs"
    existing.write_bytes(b"keep")
    out = tmp_path / "out.fgs"
    cases = [
        [str(bad_meta), str(out)],
        [str(lying), str(out)],
        [str(fifo), str(out)],
        [str(tmp_path / "missing.parquet"), str(out)],
        [str(good), str(existing)],
        [str(good), str(out), "--length", "0"],
        [str(good), str(out), "--columns", "nope"],
        [str(tmp_path / "text.parquet"), str(out)],
    ]
    (tmp_path / "text.parquet").write_text("not Parquet")
    for argv in cases:
        assert main(["import", "-q", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (argv, err)
        assert argv[0] in err or argv[1] in err or "nope" in err or "length" in err, (argv, err)
        _nothing_at(out)
    assert existing.read_bytes() == b"keep"


def test_import_command_in_a_child_prints_no_traceback(tmp_path):
    src = tmp_path / "in.parquet"
    os.mkfifo(src)
    proc = subprocess.run([sys.executable, "-m", "finegym_store", "import", "-q", str(src), str(tmp_path / "o.fgs")],
                          capture_output=True, text=True, timeout=120, cwd=CHILD_CWD)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(src) in proc.stderr and "FIFO" in proc.stderr


# -- the fuzz harness, seeded ---------------------------------------------------------------------------

def test_seeded_mutants_import_without_crash(tmp_path):
    # A few hundred mutants of Arrow IPC files and streams, Parquet files
    # (footer and pages) and the metadata JSON, each imported in a child
    # process: a crash shows as a signal exit status; any outcome other than a
    # store or a ConversionError naming the source is a finding (exit 1).
    summary = run_fuzz_seeded("fuzz_import.py", 20261204, 400, tmp_path)
    outcomes = summary["outcomes"]
    assert outcomes.get("store", 0) > 0 and outcomes.get("conversion_error", 0) > 0
    assert sum(outcomes.values()) == 400
