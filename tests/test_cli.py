"""The ``finegym-store`` command, run as a subprocess (``python -m
finegym_store``) the way a user runs it: exit codes, what it prints, and
what it writes. Plus the demo, in-process."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import synth
from finegym_store.demo import run_demo

from conftest import CHILD_CWD

N = 60


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finegym_store", *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd or CHILD_CWD,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two feature pickles in the release's layout, a split file and the gym99
    categories file, for N instances."""
    d = tmp_path_factory.mktemp("cli_inputs")
    ids = synth.make_ids(N, seed=5)
    labels = synth.long_tailed_labels(N, 99, seed=5)
    split = d / "gym99_sample_element.txt"
    synth.write_split(split, ids, labels)
    tables = {
        "tsn": synth.make_features(ids, labels, (12, 16, 1, 1), seed=5),
        "i3d": synth.make_features(ids, labels, (12, 8, 1, 1, 1), seed=6),
    }
    pickles = {}
    for name, table in tables.items():
        pickles[name] = d / f"{name}_sample.pkl"
        synth.write_pickle(pickles[name], table)
    categories = d / "gym99_categories.txt"
    categories.write_bytes((resources.files("finegym_store") / "sample" / "gym99_categories.txt").read_bytes())
    return {"dir": d, "ids": ids, "labels": labels, "split": split, "tables": tables, "pickles": pickles,
            "categories": categories}


def convert_args(inputs, out):
    return ["convert", out, "-f", f"tsn={inputs['pickles']['tsn']}", "-f", f"i3d={inputs['pickles']['i3d']}",
            "--split", inputs["split"], "--categories", inputs["categories"], "-q"]


@pytest.fixture(scope="module")
def converted(inputs):
    """(the convert run, the store path): a store made by the CLI."""
    out = inputs["dir"] / "sample.fgs"
    return cli(*convert_args(inputs, out)), out


@pytest.fixture
def store_copy(converted, tmp_path):
    """A private copy of the converted store, free to damage."""
    _, path = converted
    copy = tmp_path / "copy.fgs"
    shutil.copyfile(path, copy)
    return copy


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# -- convert ----------------------------------------------------------------------


def test_convert_two_pickles_with_split_and_categories(converted, inputs):
    proc, out = converted
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and f"{N} instances" in proc.stdout and "tsn, i3d" in proc.stdout
    assert proc.stderr == ""  # -q: no progress bars

    store = fgs.open(out)
    assert len(store) == N
    assert store.columns == ("tsn", "i3d")
    assert store.ids.to_list() == inputs["ids"]
    np.testing.assert_array_equal(store.labels, inputs["labels"])
    assert store.column("tsn").shape == (N, 12, 16)
    assert store.column("i3d").shape == (N, 12, 8)
    for i in (0, N // 2, N - 1):
        key = inputs["ids"][i]
        assert store.features("tsn", i).tobytes() == inputs["tables"]["tsn"][key].reshape(12, 16).tobytes()
        assert store.features("i3d", i).tobytes() == inputs["tables"]["i3d"][key].reshape(12, 8).tobytes()
    assert store.classes is not None and len(store.label_names) == 99
    assert store.verify() == []


def test_convert_float16(inputs, tmp_path):
    out = tmp_path / "half.fgs"
    proc = cli("convert", out, "-f", f"tsn={inputs['pickles']['tsn']}", "--dtype", "float16", "-q")
    assert proc.returncode == 0, proc.stderr
    store = fgs.open(out)
    assert store.column("tsn").dtype == np.float16
    assert store.ids.to_list() == sorted(inputs["ids"])  # no split: sorted by id, unlabelled
    assert (store.labels == -1).all()


def test_convert_refuses_an_existing_output(converted, inputs):
    proc, out = converted
    assert proc.returncode == 0
    before = out.read_bytes()
    again = cli(*convert_args(inputs, out))
    assert again.returncode == 2
    assert "--overwrite" in again.stderr and str(out) in again.stderr
    assert out.read_bytes() == before


def test_convert_overwrite_replaces(store_copy, inputs):
    proc = cli("convert", store_copy, "-f", f"tsn={inputs['pickles']['tsn']}", "--overwrite", "-q")
    assert proc.returncode == 0, proc.stderr
    assert fgs.open(store_copy).columns == ("tsn",)


def test_convert_bad_input_exits_2_and_writes_nothing(inputs, tmp_path):
    split = tmp_path / "split.txt"
    synth.write_split(split, inputs["ids"] + ["notInThePickle_E_000001_000002_A_0000_0001"],
                      np.append(inputs["labels"], 0))
    out = tmp_path / "bad.fgs"
    proc = cli("convert", out, "-f", f"tsn={inputs['pickles']['tsn']}", "--split", split, "-q")
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "notInThePickle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [split]  # no store, no temporary file left

    missing = cli("convert", out, "-f", f"tsn={tmp_path / 'nope.pkl'}", "-q")
    assert missing.returncode == 2 and "nope.pkl" in missing.stderr and "Traceback" not in missing.stderr
    assert not out.exists()


def test_convert_refuses_an_unsafe_pickle(tmp_path):
    import datetime

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"a": datetime.date(2020, 1, 1)}, f)
    proc = cli("convert", tmp_path / "x.fgs", "-f", f"x={path}", "-q")
    assert proc.returncode == 2
    assert "datetime" in proc.stderr and "--trust-pickle" in proc.stderr and str(path) in proc.stderr
    assert not (tmp_path / "x.fgs").exists()


# -- bad arguments and help -----------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["convert", "out.fgs", "-q"], "-f/--feature"),                    # missing -f
        (["convert", "out.fgs", "-f", "tsn"], "NAME=PATH"),                # no '='
        (["convert", "out.fgs", "-f", "=a.pkl"], "NAME=PATH"),             # no name
        (["convert", "out.fgs", "-f", "tsn="], "NAME=PATH"),               # no path
        (["convert", "out.fgs", "-f", "a=x.pkl", "--dtype", "float64"], "--dtype"),
        (["convert", "-f", "a=x.pkl"], "out"),                             # missing OUT
        ([], "COMMAND"),                                                   # no subcommand
        (["frobnicate"], "invalid choice"),
        (["info"], "store"),
        (["demo", "-n", "many"], "-n/--instances"),
    ],
)
def test_bad_arguments_print_usage(args, expected, tmp_path):
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: finegym-store" in proc.stderr
    assert expected in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_column_given_twice_is_refused(inputs, tmp_path):
    p = inputs["pickles"]["tsn"]
    proc = cli("convert", tmp_path / "x.fgs", "-f", f"a={p}", "-f", f"a={p}", "-q")
    assert proc.returncode == 2 and "twice" in proc.stderr
    assert not (tmp_path / "x.fgs").exists()


@pytest.mark.parametrize("command", [None, "convert", "info", "verify", "demo"])
def test_help(command):
    proc = cli(*([command] if command else []), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: finegym-store{' ' + command if command else ''}")


def test_version():
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"finegym-store {fgs.__version__}"


# -- info ------------------------------------------------------------------------------


def test_info(converted, inputs):
    _, out = converted
    proc = cli("info", out)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    counts = np.bincount(inputs["labels"])
    present = counts[counts > 0]
    assert f"finegym-store format v{fgs.FORMAT_VERSION}" in text
    assert f"instances: {N} ({N} labelled)" in text
    assert re.search(r"^\s+tsn\s+float32\s+\(60, 12, 16\)", text, re.M), text
    assert re.search(r"^\s+i3d\s+float32\s+\(60, 12, 8\)", text, re.M), text
    assert "label hierarchy: 99 classes" in text
    assert (f"classes present: {len(present)}; instances per class: min {present.min()}, "
            f"median {np.median(present):g}, max {present.max()}") in text
    largest = re.search(r"^\s+largest: (.*)$", text, re.M)
    smallest = re.search(r"^\s+smallest: (.*)$", text, re.M)
    assert largest and smallest, text
    top = int(np.argmax(counts))
    assert f"({counts.max()}" in largest.group(1)
    entry = r"(?:^|, )\d+ \(\d+(?:: |\))"  # 'K (COUNT: name' per class
    assert len(re.findall(entry, largest.group(1))) == 3 and len(re.findall(entry, smallest.group(1))) == 3
    assert str(top) in largest.group(1)


def test_info_json(converted, inputs):
    _, out = converted
    proc = cli("info", out, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    counts = np.bincount(inputs["labels"])
    present = counts[counts > 0]
    assert info["format_version"] == fgs.FORMAT_VERSION
    assert info["file_size"] == out.stat().st_size
    assert info["instances"] == N and info["labelled"] == N
    assert info["columns"] == {
        "tsn": {"dtype": "float32", "shape": [N, 12, 16], "bytes": N * 12 * 16 * 4},
        "i3d": {"dtype": "float32", "shape": [N, 12, 8], "bytes": N * 12 * 8 * 4},
    }
    assert info["classes_in_hierarchy"] == 99
    assert info["classes_present"] == len(present)
    assert info["class_sizes"] == {"min": int(present.min()), "median": float(np.median(present)),
                                   "max": int(present.max())}
    names = fgs.open(out).label_names
    for k, n, name in info["largest"] + info["smallest"]:
        assert counts[k] == n > 0 and name == names[k]
    assert info["largest"][0][1] == counts.max()
    assert info["smallest"][0][1] == present.min()


def test_info_histogram_lists_only_present_classes(tmp_path):
    """With fewer than three classes present, 'largest' must not list absent ones."""
    ids = synth.make_ids(7, seed=2)
    labels = np.array([0, 0, 0, 0, 0, 3, 3], dtype=np.int32)
    split = tmp_path / "s.txt"
    synth.write_split(split, ids, labels)
    out = tmp_path / "two.fgs"
    fgs.convert({"x": synth.make_features(ids, labels, (2, 3), seed=2)}, out, split=split, progress=False)
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["classes_present"] == 2
    assert [row[:2] for row in info["largest"]] == [[0, 5], [3, 2]]
    assert [row[:2] for row in info["smallest"]] == [[3, 2], [0, 5]]


def test_info_on_a_store_without_labels_or_hierarchy(inputs, tmp_path):
    out = tmp_path / "plain.fgs"
    fgs.convert({"tsn": inputs["tables"]["tsn"]}, out, progress=False)
    proc = cli("info", out)
    assert proc.returncode == 0, proc.stderr
    assert f"instances: {N} (0 labelled)" in proc.stdout
    assert "label hierarchy" not in proc.stdout and "classes present" not in proc.stdout
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["classes_in_hierarchy"] is None and info["classes_present"] == 0 and info["labelled"] == 0


def test_info_on_a_non_store_exits_2_naming_the_path(inputs, tmp_path):
    for path in (inputs["split"], inputs["pickles"]["tsn"]):
        proc = cli("info", path)
        assert proc.returncode == 2
        assert str(path) in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""
    # Too short to tell a foreign file from a truncated store: a damaged store.
    empty = tmp_path / "empty.fgs"
    empty.write_bytes(b"")
    proc = cli("info", empty)
    assert proc.returncode == 1 and str(empty) in proc.stderr


def test_info_on_a_missing_file_exits_2(tmp_path):
    proc = cli("info", tmp_path / "absent.fgs")
    assert proc.returncode == 2 and "absent.fgs" in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_store_exits_1(store_copy):
    data = store_copy.read_bytes()
    store_copy.write_bytes(data[:-100])
    for command in ("info", "verify"):
        proc = cli(command, store_copy)
        assert proc.returncode == 1
        assert str(store_copy) in proc.stderr and "Traceback" not in proc.stderr


# -- verify ----------------------------------------------------------------------------


def test_verify_good_store(converted):
    _, out = converted
    proc = cli("verify", out)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


@pytest.mark.parametrize("section", ["features/tsn", "features/i3d", "labels"])
def test_verify_names_a_damaged_section(store_copy, section):
    offset = next(s["offset"] for s in fgs.open(store_copy).sections() if s["name"] == section)
    flip_byte(store_copy, offset + 3)
    proc = cli("verify", store_copy)
    assert proc.returncode == 1
    assert "DAMAGED" in proc.stderr
    assert re.search(rf"sections: (.*, )?{re.escape(section)}(,|$)", proc.stderr.strip()), proc.stderr


def test_damaged_header_exits_1(store_copy):
    flip_byte(store_copy, 20)  # inside file_size: the header checksum no longer matches
    for command in ("info", "verify"):
        proc = cli(command, store_copy)
        assert proc.returncode == 1
        assert str(store_copy) in proc.stderr and "Traceback" not in proc.stderr


# -- demo --------------------------------------------------------------------------------


def test_demo_command(tmp_path):
    work = tmp_path / "work"
    proc = cli("demo", "-n", 300, "-q", "--workdir", work)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "300 synthetic FineGym instances" in out
    assert re.search(r"synthesized 2 pickles .* in \d+\.\d+ s", out), out
    assert re.search(r"converted to .* in \d+\.\d+ s", out), out
    assert re.search(r"open store: \d+\.\d+ ms\s+vs\s+load i3d pickle: \d+ ms", out), out
    assert re.search(r"20 train batches of 64 x 3 x 2048 \(TSN sampling\): store.gather \d+\.\d+ ms, "
                     r"pickle dict \+ Python sampling \d+\.\d+ ms; identical bytes", out), out
    assert re.search(r"one epoch through store.loader \(5 batches, prefetch 2\): \d+\.\d+ ms", out), out
    m = re.search(r"nearest-class-mean accuracy on mean-pooled tsn features: (\d+\.\d)%", out)
    assert m, out
    assert float(m.group(1)) > 20.0  # percent; chance is about 1
    assert (work / "sample.fgs").is_file()
    assert fgs.open(work / "sample.fgs").verify() == []


def test_demo_refuses_zero_instances():
    proc = cli("demo", "-n", 0, "-q")
    assert proc.returncode == 2 and "--instances" in proc.stderr


def test_run_demo_in_process():
    lines: list[str] = []
    report = run_demo(instances=300, progress=False, echo=lines.append)
    assert report["instances"] == 300
    for key in ("synthesize_s", "convert_s", "open_s", "pickle_load_s", "gather_store_s", "gather_pickle_s"):
        assert report[key] > 0, key
    assert report["nearest_mean_accuracy"] > 0.2  # chance is about 1/99
    assert len(lines) >= 6
    assert any("nearest-class-mean accuracy" in line for line in lines)
