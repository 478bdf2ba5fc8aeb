"""`finegym-store bench` end to end on a tiny store (figures not checked:
speed claims live in benchmarks/; this checks the tool runs every state and
reports every method, skipped peers included)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CHILD_CWD

from finegym_store.bench.peers import PEERS
from finegym_store.cli import main


def test_bench_runs_every_state_and_reports_every_method(tmp_path):
    # In a child process: the peers' packages (lance warns at every fork
    # once imported) stay out of the test process.
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "finegym_store", "bench", "--data", str(tmp_path), "--instances", "24",
         "--states", "hot,cold,half,peers,peers-cold", "--k", "3", "--batch", "8", "--batches", "2", "--rounds", "1",
         "--json", str(out)], cwd=CHILD_CWD, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    report = json.loads(out.read_text())
    assert report["instances"] == 24 and report["machine"]["cores"] >= 1
    rows = report["results"]
    states = {(r["state"], r["method"]) for r in rows}
    for m in ("gather:auto", "gather:on", "gather:off", "numpy memmap", "pread QD32"):
        assert ("cold", m) in states, m
    assert ("hot", "memcpy 1T") in states and ("half", "gather:auto") in states
    for name in PEERS:  # run or skipped with a reason, never missing, hot and cold
        for state in ("peers", "peers-cold"):
            row = next(r for r in rows if r["state"] == state and r["method"] == name)
            assert (row["skipped"] is None) == (row["instances_per_s"] is not None), row
            if state == "peers-cold" and row["skipped"] is None:
                assert len(row["open_s"]) == 1 and row["open_s"][0] > 0, row
        assert name in text
    assert ("peers-cold", "gather:auto") in states
    assert all(r["instances_per_s"] > 0 for r in rows if r["skipped"] is None)
    # Cold states also report each round's rate after the first batch; hot ones do not.
    for r in rows:
        assert len(r["later_s"]) == (len(r["batch_s"]) if r["state"] in ("cold", "half", "peers-cold") else 0), r
    assert "after 1st batch" in text
    # One ratio direction: gather_speedup = time(method) / time(gather:auto) of the same state, K and B.
    for r in rows:
        if r["skipped"] is None and r["instances_per_s"] is not None:
            ref = next(x for x in rows if (x["state"], x["k"], x["b"], x["method"])
                       == (r["state"], r["k"], r["b"], "gather:auto"))
            assert r["gather_speedup"] == pytest.approx(r["median_s"] / ref["median_s"]), r
    # Progress on stderr, the table alone on stdout.
    assert "\n[bench] " in proc.stderr and "resident before" in proc.stderr
    assert not any(line.lstrip().startswith("[") for line in text.splitlines()) and "resident before" not in text
    assert text.splitlines()[0].startswith("gather speedup = time(method) / time(gather:auto)")


BAD_BENCH_ARGS = [
    (["--instances", "0"], "argument --instances: must be between 2 and"),
    (["--instances", "1"], "argument --instances: must be between 2 and"),
    (["--instances", "x"], "argument --instances: expected an integer, got 'x'"),
    (["--k", "-3"], "argument --k: must be between 1 and 1024, got -3"),
    (["--k", "3,0"], "argument --k: must be between 1 and 1024, got 0"),
    (["--k", ""], "argument --k: expected comma-separated integers"),
    (["--threads", "-1"], "argument --threads: must be between 0 and 1024, got -1"),
    (["--batch", "0"], "argument --batch: must be between 1 and"),
    (["--batch", "-1"], "argument --batch: must be between 1 and"),
    (["--batch", "8,,16"], "argument --batch: expected comma-separated integers, got '8,,16'"),
    (["--rounds", "0"], "argument --rounds: must be between 1 and 1000, got 0"),
    (["--batches", "0"], "argument --batches: must be between 1 and"),
    (["--batches", "1.5"], "argument --batches: expected an integer, got '1.5'"),
    (["--states", "hot,lukewarm"], "argument --states: unknown 'lukewarm'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_BENCH_ARGS)
def test_bench_refuses_each_bad_number_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--data", str(tmp_path / "data"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["usage: finegym-store bench [options]", err[1]] and err[1].startswith(
        "finegym-store bench: error: "), err
    assert message in err[1]
    assert not (tmp_path / "data").exists()  # refused before anything is built


def test_bench_refuses_a_batch_larger_than_the_store(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "data"), "--instances", "4", "--batch", "2,8"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --batch 8 is larger than the store's 4 instances "
                   "(--instances must be at least the largest --batch)"]
    assert not (tmp_path / "data").exists()


def test_bench_module_refuses_without_a_traceback(tmp_path):
    # python -m finegym_store.bench: the same checks, the same exit status.
    for args in (["--batch", "-1"], ["--instances", "3", "--batch", "4"]):
        proc = subprocess.run([sys.executable, "-m", "finegym_store.bench", "--data", str(tmp_path / "d"), *args],
                              cwd=CHILD_CWD, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith(
            ("finegym-store bench: error: argument --batch", "error: --batch 4 is larger")), proc.stderr
        assert proc.stdout == ""


def small_store(path, n=40, t=6, c=32):
    import numpy as np

    import finegym_store as fgs

    rng = np.random.default_rng(0)
    return fgs.convert({"feat": {f"v{i:04d}": rng.random((t, c), dtype=np.float32) for i in range(n)}}, path,
                       progress=False)


def test_bench_measures_the_users_store(tmp_path):
    store = small_store(tmp_path / "mine.fgs")
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "finegym_store", "bench", "--store", store.path, "--data", str(tmp_path / "data"),
         "--quick", "--states", "hot,cold", "--k", "3,6", "--batch", "8", "--json", str(out)],
        cwd=CHILD_CWD, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["store"] == store.path and report["column"] == "feat" and report["instances"] == 40
    rows = report["results"]
    assert {(r["state"], r["k"]) for r in rows} == {("hot", 3), ("hot", 6), ("cold", 3), ("cold", 6)}
    assert all(len(r["batch_s"]) == 1 for r in rows)  # --quick: one round
    assert "6 x 32 float32" in proc.stderr and "gather speedup" in proc.stdout
    assert not (tmp_path / "data" / "i3d_2048.fgs").exists()  # nothing generated


def test_bench_plot_without_matplotlib_writes_table_and_json_first(tmp_path, capsys, monkeypatch):
    store = small_store(tmp_path / "mine.fgs")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--store", store.path, "--data", str(tmp_path / "data"), "--states", "hot", "--k", "3",
               "--batch", "8", "--rounds", "1", "--batches", "2", "--json", str(out), "--plot", str(png)])
    captured = capsys.readouterr()
    assert rc == 2
    assert json.loads(out.read_text())["results"] and not png.exists()
    assert "gather:auto" in captured.out and "numpy memmap" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: --plot needs matplotlib") and 'pip install "finegym-store[plot]"' in last


@pytest.mark.parametrize(("args", "message"), [
    (["--instances", "64"], "--instances and --small size a generated store; --store measures yours"),
    (["--small"], "--instances and --small size a generated store"),
    (["--column", "nope"], "no feature column 'nope'"),
    (["--batch", "41"], "--batch 41 is larger than the store's 40 instances"),
])
def test_bench_store_refusals(tmp_path, capsys, args, message):
    store = small_store(tmp_path / "mine.fgs")
    assert main(["bench", "--store", store.path, "--data", str(tmp_path / "data"), *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bench_refuses_an_unknown_generated_column(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path / "data"), "--column", "flow"]) == 2
    assert "--column of the generated store must be one of i3d, tsn, got 'flow'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_bench_data_folder_defaults_to_the_users_cache(tmp_path, monkeypatch):
    from finegym_store.bench.inputs import default_folder

    monkeypatch.delenv("FINEGYM_BENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_folder() == tmp_path / "xdg" / "finegym-store" / "bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_folder() == tmp_path / "home" / ".cache" / "finegym-store" / "bench"
    monkeypatch.setenv("FINEGYM_BENCH_DIR", str(tmp_path / "here"))
    assert default_folder() == tmp_path / "here"
