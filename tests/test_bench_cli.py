"""`finegym-store bench` end to end on a tiny store (figures not checked:
speed claims live in benchmarks/; this checks the tool runs every state and
reports every method, skipped peers included)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import CHILD_CWD

from finegym_store import bench
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
    for name in bench.PEERS:  # run or skipped with a reason, never missing, hot and cold
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


def test_bench_rejects_a_store_too_small(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path), "--instances", "1"]) == 2
    assert "--instances must be at least 2, got 1" in capsys.readouterr().err
