"""`finegym-store bench` end to end on a tiny store (figures not checked:
speed claims live in benchmarks/; this checks the tool runs every state and
reports every method, skipped peers included)."""

from __future__ import annotations

import json

from finegym_store import bench
from finegym_store.cli import main


def test_bench_runs_every_state_and_reports_every_method(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--data", str(tmp_path), "--instances", "24", "--states", "hot,cold,half,peers",
               "--k", "3", "--batch", "8", "--batches", "2", "--rounds", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["instances"] == 24 and report["machine"]["cores"] >= 1
    rows = report["results"]
    states = {(r["state"], r["method"]) for r in rows}
    for m in ("gather:auto", "gather:on", "gather:off", "numpy memmap", "pread QD32"):
        assert ("cold", m) in states, m
    assert ("hot", "memcpy 1T") in states and ("half", "gather:auto") in states
    for name in bench.PEERS:  # run or skipped with a reason, never missing
        row = next(r for r in rows if r["state"] == "peers" and r["method"] == name)
        assert (row["skipped"] is None) == (row["instances_per_s"] is not None), row
        assert name in text
    assert all(r["instances_per_s"] > 0 for r in rows if r["skipped"] is None)


def test_bench_rejects_a_store_too_small(tmp_path, capsys):
    assert main(["bench", "--data", str(tmp_path), "--instances", "1"]) == 2
    assert "--instances must be at least 2, got 1" in capsys.readouterr().err
