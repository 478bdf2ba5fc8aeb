"""What the ``finegym-store`` command says when something goes wrong: each
error names the argument or file and the fix; a target that another writer
creates meanwhile is left alone; Ctrl-C and a closed stdout end the command
quietly. Signals and pipes are tested on real child processes."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import _write, cli, synth

from conftest import CHILD_CWD, require

N = 40


def run_cli(*args: object, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finegym_store", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=CHILD_CWD, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A store, the pickle and split it came from, and files that are not stores."""
    d = tmp_path_factory.mktemp("cli_errors")
    ids = synth.make_ids(N, seed=3)
    labels = synth.long_tailed_labels(N, 99, seed=3)
    synth.write_split(d / "split.txt", ids, labels)
    synth.write_pickle(d / "tsn.pkl", synth.make_features(ids, labels, (12, 16, 1, 1), seed=3))
    fgs.convert({"tsn": d / "tsn.pkl"}, d / "s.fgs", split=d / "split.txt", progress=False)
    (d / "fake.parquet").write_bytes(b"PAR1" + bytes(60) + b"PAR1")
    (d / "fake.arrow").write_bytes(b"ARROW1\0\0" + bytes(60))
    with open(d / "other.pickle", "wb") as f:
        pickle.dump({"a": 1}, f, protocol=2)
    return d


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0][len("error: "):]


# -- what the messages say ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "verify", "export", "select", "probe"])
@pytest.mark.parametrize("name, kind, fix", [
    ("tsn.pkl", "a pickle", "finegym-store convert OUT.fgs -f NAME={path}"),
    ("other.pickle", "a pickle", "finegym-store convert OUT.fgs -f NAME={path}"),
    ("fake.parquet", "a Parquet file", "finegym-store import {path} OUT.fgs"),
    ("fake.arrow", "an Arrow IPC file", "finegym-store import {path} OUT.fgs"),
    ("split.txt", None, "finegym-store convert"),
])
def test_a_file_that_is_not_a_store_exits_2_with_the_command_to_use(files, tmp_path, command, name, kind, fix):
    path = files / name
    args = {"info": [path], "verify": [path], "export": [path, tmp_path / "x.parquet"],
            "select": [path, tmp_path / "y.fgs", "--rows", "0:2"], "probe": [files / "s.fgs", path]}[command]
    proc = run_cli(command, *args)
    assert proc.returncode == 2, proc.stderr
    msg = one_error_line(proc)
    argument = {"probe": "VAL"}.get(command, "STORE")
    assert msg.startswith(f"{argument}: {path} is "), msg
    assert (kind or "not a finegym-store file") in msg
    assert fix.format(path=path) in msg
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_damaged_store_still_exits_1(files, tmp_path):
    bad = tmp_path / "bad.fgs"
    bad.write_bytes((files / "s.fgs").read_bytes()[:-50])
    proc = run_cli("info", bad)
    assert proc.returncode == 1 and str(bad) in one_error_line(proc)


@pytest.mark.parametrize("command", ["info", "verify", "export", "select", "probe"])
def test_a_missing_store_names_the_argument(files, tmp_path, command):
    absent = tmp_path / "absent.fgs"
    args = {"export": [absent, tmp_path / "x.parquet"], "select": [absent, tmp_path / "y.fgs", "--rows", "0:1"],
            "probe": [absent, files / "s.fgs"]}.get(command, [absent])
    proc = run_cli(command, *args)
    assert proc.returncode == 2
    argument = "TRAIN" if command == "probe" else "STORE"
    assert one_error_line(proc) == f"{argument}: no such file: {absent}"


@pytest.mark.parametrize("command", ["convert", "select", "export", "import"])
def test_a_missing_output_folder_is_named(files, tmp_path, command):
    out = tmp_path / "nodir" / "out.fgs"
    args = {"convert": ["convert", out, "-f", f"tsn={files / 'tsn.pkl'}", "--split", files / "split.txt", "-q"],
            "select": ["select", files / "s.fgs", out, "--rows", "0:2"],
            "export": ["export", files / "s.fgs", out.with_suffix(".parquet"), "-q"],
            "import": ["import", files / "fake.parquet", out, "-q"]}[command]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert one_error_line(proc) == f"OUT: the folder '{tmp_path / 'nodir'}' does not exist"
    assert list(tmp_path.iterdir()) == []


def test_a_relative_missing_output_folder(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finegym_store", "convert", "nodir/s.fgs", "-f",
                           f"tsn={files / 'tsn.pkl'}", "-q"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(Path(fgs.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 2
    assert one_error_line(proc) == "OUT: the folder 'nodir' does not exist"


def test_probe_output_folders_are_checked_before_training(files, tmp_path):
    for option in ("--json", "--plot"):
        proc = run_cli("probe", files / "s.fgs", files / "s.fgs", option, tmp_path / "no" / "r.out", "-q")
        assert proc.returncode == 2
        assert one_error_line(proc) == f"{option}: the folder '{tmp_path / 'no'}' does not exist"


def test_demo_workdir_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("demo", "-n", 10, "-q", "--workdir", blocker / "sub")
    assert proc.returncode == 2
    assert one_error_line(proc).startswith(f"--workdir: cannot create the folder {blocker / 'sub'}: ")


def test_key_errors_print_without_quotes(files):
    proc = run_cli("probe", files / "s.fgs", files / "s.fgs", "--column", "nope", "-q")
    assert proc.returncode == 2
    assert one_error_line(proc) == "no feature column 'nope' in " + str(files / "s.fgs") + "; columns: tsn"


def test_one_line_unwraps_key_and_os_errors():
    assert cli._one_line(KeyError("no column 'x'")) == "no column 'x'"
    assert cli._one_line(FileNotFoundError(2, "open failed for 'a.fgs': No such file or directory",
                                           "a.fgs")) == "open failed for 'a.fgs': No such file or directory"
    assert cli._one_line(PermissionError(13, "Permission denied", "b")) == "Permission denied: b"
    assert cli._one_line(FileExistsError("x exists; pass overwrite=True to replace it")) == \
        "x exists; use --overwrite to replace it"


# -- two writers, one target -------------------------------------------------------------


def appear_before_commit(monkeypatch, target: Path) -> None:
    """Create ``target`` (another writer's file) just before the store's commit."""
    original = _write.commit

    def late(raw):
        target.write_bytes(b"the other writer's file")
        return original(raw)

    monkeypatch.setattr(_write, "commit", late)


def expect_loser(capsys, status: int, target: Path, what: str) -> None:
    err = capsys.readouterr().err
    assert status == 2
    assert err == (f"error: {target} appeared while this {what} (another writer?); nothing was replaced; "
                   "use --overwrite to replace it\n")
    assert target.read_bytes() == b"the other writer's file"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_convert_loses_a_race_without_replacing(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.fgs"
    appear_before_commit(monkeypatch, out)
    status = cli.main(["convert", str(out), "-f", f"tsn={files / 'tsn.pkl'}", "--split", str(files / "split.txt"),
                       "-q"])
    expect_loser(capsys, status, out, "store was written")


def test_select_loses_a_race_without_replacing(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.fgs"
    appear_before_commit(monkeypatch, out)
    status = cli.main(["select", str(files / "s.fgs"), str(out), "--rows", "0:5"])
    expect_loser(capsys, status, out, "store was written")


def test_import_loses_a_race_without_replacing(files, tmp_path, monkeypatch, capsys):
    require("pyarrow", "pyarrow", "pip install pyarrow")
    source = tmp_path / "in" / "s.parquet"
    source.parent.mkdir()
    fgs.open(files / "s.fgs").to_parquet(source)
    out = tmp_path / "o" / "out.fgs"
    out.parent.mkdir()
    appear_before_commit(monkeypatch, out)
    status = cli.main(["import", str(source), str(out), "-q"])
    expect_loser(capsys, status, out, "store was written")


def test_export_loses_a_race_without_replacing(files, tmp_path, monkeypatch, capsys):
    require("pyarrow", "pyarrow", "pip install pyarrow")
    from finegym_store import arrow

    out = tmp_path / "out.parquet"
    original = arrow._guarded_batches

    def batches(*args, **kwargs):
        yield from original(*args, **kwargs)
        out.write_bytes(b"the other writer's file")

    monkeypatch.setattr(arrow, "_guarded_batches", batches)
    status = cli.main(["export", str(files / "s.fgs"), str(out), "-q"])
    expect_loser(capsys, status, out, "export ran")


def test_two_real_conversions_to_one_target(files, tmp_path):
    """Two processes convert to the same OUT at once: one writes it, the
    other says it lost; whichever order they commit in, OUT is a whole store."""
    table = {k: np.tile(v, (1, 64, 1, 1)) for k, v in synth.make_features(
        synth.make_ids(600, seed=1), synth.long_tailed_labels(600, 99, seed=1), (12, 16, 1, 1), seed=1).items()}
    synth.write_pickle(tmp_path / "big.pkl", table)
    out = tmp_path / "out" / "s.fgs"
    out.parent.mkdir()
    args = [sys.executable, "-m", "finegym_store", "convert", str(out), "-f", f"x={tmp_path / 'big.pkl'}", "-q"]
    procs = [subprocess.Popen(args, cwd=CHILD_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    loser = next(err for rc, _, err in results if rc == 2)
    # Either the loser saw OUT before it began (the usual refusal) or while it wrote.
    refused = f"error: {out} exists; use --overwrite to replace it\n"
    lost = (f"error: {out} appeared while this store was written (another writer?); nothing was replaced; "
            "use --overwrite to replace it\n")
    assert loser in (refused, lost), loser
    assert fgs.open(out).verify() == [] and len(fgs.open(out)) == 600
    assert [p.name for p in out.parent.iterdir()] == ["s.fgs"]


# -- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_during_a_conversion_exits_130_and_leaves_nothing(files, tmp_path):
    """SIGINT to a conversion that is writing its first feature rows (a hook in
    the child says when it is there, and then waits): exit 130, one line, and
    no file left in OUT's folder."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ready = tmp_path / "ready"
    child = textwrap.dedent(f"""
        import sys, time
        from finegym_store import _write, cli
        original = _write.ColumnWriter.append
        def append(self, rows):
            original(self, rows)
            open({str(ready)!r}, "w").close()
            while True:
                time.sleep(0.05)
        _write.ColumnWriter.append = append
        sys.exit(cli.main(sys.argv[1:]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, "convert", str(out_dir / "s.fgs"),
                             "-f", f"tsn={files / 'tsn.pkl'}", "--split", str(files / "split.txt")],
                            cwd=CHILD_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the conversion never reached its first rows"
            time.sleep(0.02)
        # The store's file is open (an O_TMPFILE inode, or a hidden temporary name) at this point.
        fds = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
        assert any(target.startswith(str(out_dir)) for target in fds), fds
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr, stderr
    assert stdout == ""
    assert list(out_dir.iterdir()) == []


# -- a closed pipe -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, runs", [(["info"], 20), (["info", "--json"], 2), (["verify"], 2)])
def test_a_closed_stdout_exits_141_quietly(files, args, runs):
    """stdout is a pipe whose reader is gone before the command writes (the
    worst case of `| head`): exit 141, as for cat, and nothing on stderr."""
    procs = []
    for _ in range(runs):
        r, w = os.pipe()
        os.close(r)
        procs.append(subprocess.Popen([sys.executable, "-m", "finegym_store", args[0], str(files / "s.fgs"),
                                       *args[1:]], cwd=CHILD_CWD, stdout=w, stderr=subprocess.PIPE))
        os.close(w)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert (p.returncode, err) == (141, b"")


def test_help_into_a_closed_pipe(files):
    """Quiet too; argparse itself ignores a failed write of --help (exit 0),
    what it leaves buffered fails at the flush (141)."""
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.run([sys.executable, "-m", "finegym_store", "probe", "--help"], cwd=CHILD_CWD, stdout=w,
                          stderr=subprocess.PIPE, timeout=120)
    os.close(w)
    assert proc.returncode in (0, 141) and proc.stderr == b""


def test_info_piped_into_head(files):
    for _ in range(3):
        proc = subprocess.run(f"'{sys.executable}' -m finegym_store info '{files / 's.fgs'}' | head -1",
                              shell=True, cwd=CHILD_CWD, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0
        assert proc.stdout.startswith(f"{files / 's.fgs'}: finegym-store format v") and \
            proc.stdout.count("\n") == 1
        assert proc.stderr == ""


# -- demo ---------------------------------------------------------------------------------------


def test_demo_prints_no_path_it_deletes():
    proc = run_cli("demo", "-n", 200, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "finegym-demo-" not in proc.stdout and os.sep + "tmp" not in proc.stdout
    assert "in a temporary folder, deleted at the end (--workdir DIR keeps the files)" in proc.stdout
    assert "converted to sample.fgs " in proc.stdout


def test_demo_with_a_workdir_says_the_files_stay(tmp_path):
    proc = run_cli("demo", "-n", 200, "-q", "--workdir", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    assert f"in {tmp_path / 'w'} (the files stay there)" in proc.stdout
    assert f"converted to {tmp_path / 'w' / 'sample.fgs'} " in proc.stdout
    assert (tmp_path / "w" / "sample.fgs").is_file()


def test_bench_and_import_name_their_file_options(files, tmp_path):
    proc = run_cli("bench", "--quick", "--store", files / "tsn.pkl")
    assert proc.returncode == 2
    assert one_error_line(proc).startswith(f"--store: {files / 'tsn.pkl'} is a pickle, not a finegym-store file; ")
    proc = run_cli("bench", "--quick", "--store", files / "s.fgs", "--json", tmp_path / "no" / "b.json")
    assert proc.returncode == 2
    assert one_error_line(proc) == f"--json: the folder '{tmp_path / 'no'}' does not exist"
    proc = run_cli("import", files / "fake.parquet", tmp_path / "z.fgs", "--categories", tmp_path / "absent.txt")
    assert proc.returncode == 2
    assert one_error_line(proc) == f"--categories: no such file: {tmp_path / 'absent.txt'}"
