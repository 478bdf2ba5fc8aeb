"""finegym_store.probe and ``finegym-store probe``: the FineGym evaluation
protocol on small synthetic stores (numpy and torch trainers), the hierarchy
levels against the real gym99 / gym288 categories files, and the command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finegym_store as fgs
from finegym_store import metrics, synth
from finegym_store.cli import main
from finegym_store.finegym import read_split
from finegym_store.probe import (
    EVENT_ORDER,
    Hierarchy,
    ProbeTable,
    class_tick_labels,
    evaluate,
    make_demo_pair,
    run_probe,
    run_probes,
)

from conftest import CHILD_CWD, require, require_torch, shared_file

#: Small and quick: a strong class signal, few epochs, one thread (the test
#: machine may be busy; spinning thread pools would dominate tiny products).
FAST = dict(epochs=5, batch_size=64, lr=3e-3, threads=1, compute_threads=1, hidden=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A gym99-like train/val pair (shared class prototypes, gym99 hierarchy),
    columns 'a' (12 x 32) and 'b' (6 x 16)."""
    d = tmp_path_factory.mktemp("probe_pair")
    return make_demo_pair(d, train=600, val=300, columns={"a": (12, 32, 1, 1), "b": (6, 16, 1, 1)}, signal=1.0)


def plain_pair(folder: Path, n_train: int, n_val: int, unlabelled_every: int = 0, categories=None):
    """A train/val pair over 10 classes without a hierarchy (unless
    ``categories``); every ``unlabelled_every``-th instance gets label -1
    (its features keep their class signal)."""
    n = n_train + n_val
    ids = synth.make_ids(n, seed=3)
    labels = synth.long_tailed_labels(n, 10, seed=3)
    labels[:10] = np.arange(10)  # every class in train: the probe refuses val labels that are not train classes
    table = synth.make_features(ids, labels, (4, 8, 1, 1), seed=3, signal=1.5)
    stored = labels.copy()
    if unlabelled_every:
        stored[::unlabelled_every] = -1
    out = []
    for part, sl in (("train", slice(0, n_train)), ("val", slice(n_train, n))):
        synth.write_split(folder / f"{part}.txt", ids[sl], stored[sl])
        out.append(fgs.convert({"x": {k: table[k] for k in ids[sl]}}, folder / f"{part}.fgs",
                               split=folder / f"{part}.txt", categories=categories, progress=False))
    return out[0], out[1], labels[n_train:]


# -- the probe learns, and both trainers agree ---------------------------------


def test_probe_learns_far_above_chance_on_demo_features(tmp_path):
    # The demo's own recipe: tsn at its released width, signal 0.15, gym99 long tail.
    tr, va = make_demo_pair(tmp_path, train=800, val=400, columns={"tsn": synth.MODELS["tsn"]})
    r = run_probe(tr, va, "tsn", num_segments=3, backend="numpy", **FAST)
    chance = 1 / 99
    assert r.levels["element"]["top1"] > 30 * chance
    assert r.levels["element"]["mean_class_acc"] > 15 * chance
    assert r.num_classes == 99 and r.train_instances == 800 and r.val_instances == 400
    assert r.dataset == "Gym99"


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_numpy_and_torch_backends_agree(pair, head):
    require_torch()
    tr, va = pair
    a = run_probe(tr, va, "a", head=head, backend="numpy", seed=5, **FAST)
    b = run_probe(tr, va, "a", head=head, backend="torch", seed=5, **FAST)
    assert (a.backend, b.backend) == ("numpy", "torch")
    assert a.levels["element"]["top1"] > 0.2  # learned something (chance ~ 0.01)
    assert abs(a.levels["element"]["top1"] - b.levels["element"]["top1"]) < 0.03
    assert abs(a.levels["element"]["mean_class_acc"] - b.levels["element"]["mean_class_acc"]) < 0.03
    assert np.mean(a.predictions == b.predictions) > 0.95
    assert abs(a.final_loss - b.final_loss) < 0.02 * max(1.0, a.final_loss)


def test_numpy_probe_is_deterministic_and_seeded(pair):
    tr, va = pair
    a = run_probe(tr, va, "b", backend="numpy", seed=1, **FAST)
    b = run_probe(tr, va, "b", backend="numpy", seed=1, **FAST)
    np.testing.assert_array_equal(a.predictions, b.predictions)
    assert a.final_loss == b.final_loss


def test_result_fields_match_metrics(pair):
    tr, va = pair
    r = run_probe(tr, va, "a", backend="numpy", levels=("element", "set", "event"), **FAST)
    y = np.asarray(va.labels)
    np.testing.assert_array_equal(r.labels, y)
    assert r.levels["element"]["top1"] == pytest.approx(np.mean(r.predictions == y))
    pc = r.per_class
    assert pc["class"] == sorted(set(y.tolist()))
    assert pc["val_support"] == [int((y == c).sum()) for c in pc["class"]]
    assert pc["train_count"] == [int((np.asarray(tr.labels) == c).sum()) for c in pc["class"]]
    assert r.levels["element"]["mean_class_acc"] == pytest.approx(np.mean(pc["recall"]))
    assert sum(m["instances"] for m in r.per_event.values()) == len(y)
    t = r.timing
    assert 0 <= t["data_wait_s"] <= t["total_s"] and t["data_wait_fraction"] == pytest.approx(
        t["data_wait_s"] / t["total_s"])
    d = r.to_dict()
    assert "predictions" not in d and json.loads(json.dumps(d)) == d


def test_unlabelled_instances_are_skipped_and_counted(tmp_path):
    tr, va, true_val = plain_pair(tmp_path, 300, 140, unlabelled_every=7)
    r = run_probe(tr, va, "x", num_segments=2, backend="numpy", **FAST)
    keep = np.asarray(va.labels) >= 0
    assert r.val_unlabelled == int((~keep).sum()) == 20 and r.val_instances == int(keep.sum())
    assert r.train_instances == int((np.asarray(tr.labels) >= 0).sum())
    np.testing.assert_array_equal(r.labels, true_val[keep])
    assert r.levels["element"]["top1"] > 0.5  # 10 classes
    assert r.per_event == {} and r.dataset == "val"  # no hierarchy: named by the val file


def test_refusals(tmp_path):
    tr, va, _ = plain_pair(tmp_path, 60, 30)
    with pytest.raises(ValueError, match="needs the label hierarchy"):
        run_probe(tr, va, "x", levels=("set",), backend="numpy", **FAST)
    with pytest.raises(ValueError, match="head must be one of"):
        run_probe(tr, va, "x", head="svm")
    with pytest.raises(ValueError, match="level must be one of"):
        run_probe(tr, va, "x", levels=("video",))
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        run_probe(tr, va, "x", epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        run_probe(tr, va, "x", lr=float("nan"))
    with pytest.raises(ValueError, match="compute_threads must be at least 1"):
        run_probe(tr, va, "x", compute_threads=0)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        run_probe(tr, va, "x", threads=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        run_probe(tr, va, "x", backend="jax")
    with pytest.raises(KeyError, match="no feature column 'y'"):
        run_probe(tr, va, "y")


def test_channel_mismatch_and_all_unlabelled(tmp_path):
    d1, d2 = tmp_path / "one", tmp_path / "two"
    d1.mkdir()
    d2.mkdir()
    tr, _, _ = plain_pair(d1, 40, 20)
    ids = synth.make_ids(20, seed=9)
    synth.write_split(d2 / "s.txt", ids, np.full(20, -1, np.int32))
    wide = fgs.convert({"x": synth.make_features(ids, np.zeros(20, np.int32), (4, 9, 1, 1))}, d2 / "wide.fgs",
                       split=d2 / "s.txt", progress=False)
    with pytest.raises(ValueError, match=r"column 'x' has 8 channels in .*train\.fgs but 9 in .*wide\.fgs"):
        run_probe(tr, wide, "x", backend="numpy")
    with pytest.raises(ValueError, match=r"wide\.fgs: no labelled instance to train on"):
        run_probe(wide, wide, "x", backend="numpy")


# -- several columns and datasets: one table ------------------------------------


def test_table_of_columns_and_datasets(tmp_path, pair):
    tr2, va2, _ = plain_pair(tmp_path, 100, 50)
    # columns differ between the two pairs: probe 'a' and 'b' on the gym99 pair, 'x' on the plain one
    t1 = run_probes([pair], ["a", "b"], backend="numpy", levels=("element", "event"), **FAST)
    t2 = run_probes([(tr2, va2)], ["x"], backend="numpy", **FAST)
    table = ProbeTable(t1.results + t2.results)
    md = table.to_markdown().splitlines()
    assert md[0] == ("| Model | Gym99 Mean Class Acc | Gym99 Top-1 | Gym99 event Mean Class Acc | Gym99 event Top-1 "
                     "| val Mean Class Acc | val Top-1 | val event Mean Class Acc | val event Top-1 |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md[2:5]}
    assert set(rows) == {"a", "b", "x"}
    a = t1.results[0]
    cells = rows["a"].strip("| ").split(" | ")
    assert cells[1:5] == [f"{100 * a.levels[lv][m]:.1f}" for lv in ("element", "event")
                          for m in ("mean_class_acc", "top1")]
    assert cells[5:] == ["–"] * 4  # 'a' was not probed on the plain pair
    assert "Per event, element level" in table.to_markdown()
    data = json.loads(table.to_json())
    assert [(r["dataset"], r["column"]) for r in data["results"]] == [("Gym99", "a"), ("Gym99", "b"), ("val", "x")]


def test_run_probes_names_repeated_datasets_and_checks_columns_first(tmp_path, pair):
    table = run_probes([pair, pair], ["b"], backend="numpy", **FAST)
    assert [r.dataset for r in table.results] == ["Gym99 (1)", "Gym99 (2)"]
    with pytest.raises(KeyError, match="no feature column 'zzz'"):
        run_probes([pair], ["a", "zzz"], backend="numpy", **FAST)
    with pytest.raises(ValueError, match="named twice"):
        run_probes([pair], ["a", "a"])


def test_plot_writes_a_png(tmp_path, pair):
    require("matplotlib", "matplotlib", "pip install '.[plot]'")
    table = run_probes([pair], ["a"], backend="numpy", **FAST)
    table.plot(tmp_path / "per_class.png")
    assert (tmp_path / "per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the hierarchy levels against the real category files -----------------------


def parse_categories(path: Path) -> dict[int, int]:
    """Clabel -> set id, parsed here independently of finegym_store."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            fields = [f.strip() for f in line.split(";")]
            out[int(fields[0].split(":")[1])] = int(fields[1].split(":")[1])
    return out


def event_of_set(set_id: int) -> str:
    """The tens digit of a set id is the event (shared/finegym/README.md)."""
    return {0: "VT", 2: "FX", 3: "BB", 4: "UB"}[set_id // 10]


def hierarchy_of(tmp_path: Path, categories: Path) -> Hierarchy:
    ids = synth.make_ids(2, seed=1)
    synth.write_split(tmp_path / "s.txt", ids, np.array([0, 1], np.int32))
    store = fgs.convert({"x": synth.make_features(ids, np.array([0, 1]), (1, 2, 1, 1))}, tmp_path / "h.fgs",
                        split=tmp_path / "s.txt", categories=categories, progress=False)
    h = Hierarchy.from_store(store)
    assert h is not None
    return h


@pytest.mark.parametrize("subset", ["gym99", "gym288"])
def test_levels_against_real_categories(tmp_path, subset):
    cats = parse_categories(shared_file(f"{subset}_categories.txt"))
    assert len(cats) == int(subset[3:])
    h = hierarchy_of(tmp_path, shared_file(f"{subset}_categories.txt"))
    labels = np.array(sorted(cats))
    np.testing.assert_array_equal(h.map(labels, "set"), [cats[c] for c in labels])
    assert [h.events[e] for e in h.map(labels, "event")] == [event_of_set(cats[c]) for c in labels]
    assert h.events[:4] == EVENT_ORDER
    with pytest.raises(ValueError, match=f"class {len(cats)} is not in the stored label hierarchy"):
        h.map(np.array([0, len(cats)]), "set")

    # The real val split, and predictions that are always another element of
    # the true set: wrong at the element level (except sets of one element),
    # right at the set and event levels.
    y = read_split(shared_file(f"{subset}_val_element.txt"))[1].astype(np.int64)
    by_set: dict[int, list[int]] = {}
    for c in sorted(cats):
        by_set.setdefault(cats[c], []).append(c)
    sibling = {c: members[(members.index(c) + 1) % len(members)] for members in by_set.values() for c in members}
    pred = np.array([sibling[c] for c in y.tolist()])
    out = evaluate(y, pred, h, ("element", "set", "event"))
    singleton = np.array([len(by_set[cats[c]]) == 1 for c in y.tolist()])
    assert out["levels"]["element"]["top1"] == pytest.approx(singleton.mean())
    assert out["levels"]["set"]["top1"] == 1.0 and out["levels"]["set"]["mean_class_acc"] == 1.0
    assert out["levels"]["event"]["top1"] == 1.0
    assert out["levels"]["set"]["classes"] == len({cats[c] for c in y.tolist()})
    assert out["levels"]["event"]["classes"] == 4

    # Predictions of an element from another set of the same event (vault has
    # one set only, so it stays right): event right, set wrong off vault.
    other_set = {}
    for c in sorted(cats):
        same_event = [d for d in sorted(cats) if event_of_set(cats[d]) == event_of_set(cats[c]) and cats[d] != cats[c]]
        other_set[c] = same_event[0] if same_event else c
    pred2 = np.array([other_set[c] for c in y.tolist()])
    out2 = evaluate(y, pred2, h, ("set", "event"))
    vault = np.array([event_of_set(cats[c]) == "VT" for c in y.tolist()])
    assert out2["levels"]["event"]["top1"] == 1.0
    assert out2["levels"]["set"]["top1"] == pytest.approx(vault.mean())

    # Per-event breakdown of element results: perfect except on UB.
    events = np.array([event_of_set(cats[c]) for c in y.tolist()])
    pred3 = np.where(events == "UB", pred, y)
    out3 = evaluate(y, pred3, h)
    assert set(out3["per_event"]) == set(EVENT_ORDER)
    for ev in EVENT_ORDER:
        m = out3["per_event"][ev]
        assert m["instances"] == int((events == ev).sum())
        expected = np.mean(pred3[events == ev] == y[events == ev])
        assert m["top1"] == pytest.approx(expected)
    assert out3["per_event"]["VT"]["top1"] == 1.0 and out3["per_event"]["UB"]["top1"] < 0.2


def test_gym288_train_lacks_class_138_but_the_hierarchy_maps_it(tmp_path):
    y_train = read_split(shared_file("gym288_train_element_v1.0.txt"))[1]
    assert 138 not in set(y_train.tolist())
    h = hierarchy_of(tmp_path, shared_file("gym288_categories.txt"))
    cats = parse_categories(shared_file("gym288_categories.txt"))
    assert int(h.map(np.array([138]), "set")[0]) == cats[138]


def test_predictions_outside_the_hierarchy_count_as_wrong(tmp_path):
    h = hierarchy_of(tmp_path, Path(fgs.__file__).parent / "sample" / "gym99_categories.txt")
    out = evaluate(np.array([0, 0]), np.array([0, 500]), h, ("element", "set", "event"))
    assert out["levels"]["set"]["top1"] == 0.5 and out["levels"]["event"]["top1"] == 0.5


# -- the command -----------------------------------------------------------------


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finegym_store", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=CHILD_CWD)


def test_cli_probe_table_json_and_plot(tmp_path, pair):
    tr, va = pair
    out_json, out_png = tmp_path / "r.json", tmp_path / "p.png"
    args = [tr.path, va.path, "--column", "a", "--column", "b", "--num-segments", "3", "--level", "element",
            "--level", "set", "--backend", "numpy", "--epochs", "4", "--batch-size", "64", "--lr", "3e-3",
            "--threads", "1", "--compute-threads", "1", "--json", out_json, "--plot", out_png]
    require("matplotlib", "matplotlib", "pip install '.[plot]'")
    p = cli("probe", *args)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "| Model | Gym99 Mean Class Acc | Gym99 Top-1 | Gym99 set Mean Class Acc | Gym99 set Top-1 |"
    data = json.loads(out_json.read_text())["results"]
    assert [r["column"] for r in data] == ["a", "b"]
    for line, r in zip(lines[2:4], data):
        cells = line.strip("| ").split(" | ")
        assert cells == [r["column"]] + [f"{100 * r['levels'][lv][m]:.1f}" for lv in ("element", "set")
                                          for m in ("mean_class_acc", "top1")]
        assert r["epochs"] == 4 and r["backend"] == "numpy" and r["num_segments"] == 3
    assert re.search(r"Gym99 / a: linear head, numpy, K=3, 4 epochs, 600 train / 300 val instances; "
                     r"top-5 [\d.]+%, [\d.]+ s, waiting for batches [\d.]+%", p.stdout)
    assert "epoch 4/4" in p.stderr  # progress on stderr
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_probe_json_to_stdout_and_quiet(pair, capsys):
    tr, va = pair
    rc = main(["probe", tr.path, va.path, "--column", "b", "--backend", "numpy", "--epochs", "1", "--threads", "1",
               "--json", "-", "-q", "--num-segments", "0", "--head", "mlp", "--hidden", "8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    r = json.loads(out)["results"][0]
    assert r["head"] == "mlp" and r["num_segments"] is None and err == ""


@pytest.mark.parametrize("args, message", [
    (["{tr}"], "TRAIN VAL pairs; got 1 paths"),
    (["{tr}", "{va}", "--column", "nope"], "no feature column 'nope'"),
    (["{tr}", "{tmp}/missing.fgs"], "missing.fgs"),
])
def test_cli_probe_errors(tmp_path, pair, capsys, args, message):
    tr, va = pair
    rc = main(["probe", *(a.format(tr=tr.path, va=va.path, tmp=tmp_path) for a in args), "-q"])
    assert rc == 2 and message in capsys.readouterr().err


BAD_PROBE_ARGS = [
    (["--hidden", "1e9"], "argument --hidden: expected an integer, got '1e9'"),
    (["--hidden", "1000000000"], "argument --hidden: must be between 1 and 16777216, got 1000000000"),
    (["--hidden", "0"], "argument --hidden: must be between 1 and"),
    (["--epochs", "0"], "argument --epochs: must be between 1 and"),
    (["--epochs", "2.5"], "argument --epochs: expected an integer"),
    (["--batch-size", "0"], "argument --batch-size: must be between 1 and"),
    (["--batch-size", "-4"], "argument --batch-size: must be between 1 and"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["--weight-decay=-1e-4"], "argument --weight-decay: must be a finite number >= 0, got -1e-4"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0"),
    (["--num-segments", "-1"], "argument --num-segments: must be between 0 and 1024, got -1"),
    (["--num-segments", "100000"], "argument --num-segments: must be between 0 and 1024"),
    (["--threads", "0"], "argument --threads: must be between 1 and 1024, got 0"),
    (["--compute-threads", "-2"], "argument --compute-threads: must be between 1 and 1024, got -2"),
    (["--seed", "-1"], "argument --seed: must be between 0 and"),
]


@pytest.mark.parametrize("args, message", BAD_PROBE_ARGS)
def test_cli_probe_refuses_each_bad_number_with_one_line(tmp_path, capsys, args, message):
    # Refused while parsing: the stores are never opened (they do not exist).
    with pytest.raises(SystemExit) as e:
        main(["probe", str(tmp_path / "t.fgs"), str(tmp_path / "v.fgs"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("usage: finegym-store probe TRAIN VAL"), err
    assert err[1].startswith("finegym-store probe: error: ") and message in err[1], err


def test_run_probe_refuses_bad_python_arguments(tmp_path):
    tr, va, _ = plain_pair(tmp_path, 60, 30)
    for kw, exc, message in [
        (dict(epochs=True), TypeError, "epochs must be an integer, got True"),
        (dict(batch_size=2.5), TypeError, "batch_size must be an integer, got float 2.5"),
        (dict(hidden="64"), TypeError, "hidden must be an integer, got str '64'"),
        (dict(num_segments=np.bool_(True)), TypeError, "num_segments must be an integer"),
        (dict(threads=1.5), TypeError, "threads must be an integer"),
        (dict(seed=-1), ValueError, "seed must be at least 0"),
        (dict(prefetch=-1), ValueError, "prefetch must be at least 0"),
        (dict(lr=True), TypeError, "lr must be a number, got bool True"),
        (dict(lr="0.1"), TypeError, "lr must be a number, got str"),
        (dict(lr=-1.0), ValueError, "lr must be a positive number (finite), got -1.0"),
        (dict(lr=float("inf")), ValueError, "lr must be a positive number"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay must be a number >= 0 (finite), got nan"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay must be a number >= 0"),
        (dict(weight_decay=False), TypeError, "weight_decay must be a number, got bool"),
    ]:
        with pytest.raises(exc, match=re.escape(message)):
            run_probe(tr, va, "x", backend="numpy", **{**FAST, **kw})


def test_run_probe_refuses_floats_as_counts_as_every_entry_point_does(tmp_path):
    tr, va, _ = plain_pair(tmp_path, 60, 30)
    with pytest.raises(TypeError, match="epochs must be an integer, got float 1.0"):
        run_probe(tr, va, "x", backend="numpy", **{**FAST, "epochs": 1.0})


def test_run_probe_refuses_a_model_too_large_before_allocating(tmp_path, monkeypatch):
    from finegym_store import probe

    tr, va, _ = plain_pair(tmp_path, 60, 30)
    monkeypatch.setattr(probe, "_memory_bytes", lambda: 10**11)  # a 100 GB machine
    # 8 x 1e9 + 1e9 x 10 weights, 32 bytes each, and 60 x (1e9 + 10) activations, 16 bytes each.
    with pytest.raises(ValueError, match=r"hidden=1000000000: the mlp classifier \(8 x 1000000000 x 10, "
                                         r"19,000,000,010 parameters\) needs about 1,568\.0 GB .* "
                                         r"more than this machine's 100\.0 GB of memory"):
        run_probe(tr, va, "x", head="mlp", backend="numpy", **{**FAST, "hidden": 10**9})
    # With 1 GB, a 10M-unit MLP is refused too, and so are batches too large for it.
    monkeypatch.setattr(probe, "_memory_bytes", lambda: 10**9)
    with pytest.raises(ValueError, match="more than this machine's 1.0 GB of memory; use a smaller hidden"):
        run_probe(tr, va, "x", head="mlp", backend="numpy", **{**FAST, "hidden": 10**7})
    with pytest.raises(ValueError, match=r"num_segments=100000000, batch_size=32: .* use fewer segments"):
        run_probe(tr, va, "x", backend="numpy", **{**FAST, "num_segments": 10**8, "batch_size": 32})


def test_cli_probe_help():
    p = cli("probe", "--help")
    assert p.returncode == 0 and "Mean Class Acc" in p.stdout and "--level" in p.stdout


def test_cli_probe_plot_without_matplotlib_fails_before_training(pair, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    tr, va = pair
    rc = main(["probe", tr.path, va.path, "--plot", str(tmp_path / "p.png")])
    out, err = capsys.readouterr()
    assert rc == 2 and "--plot needs matplotlib: pip install 'finegym-store[plot]'" in err
    assert "epoch" not in err and out == ""


def test_refuses_huge_labels_nan_features_and_divergence(tmp_path):
    ids = synth.make_ids(30, seed=4)
    labels = synth.long_tailed_labels(30, 3, seed=4)
    table = synth.make_features(ids, labels, (2, 4, 1, 1), seed=4)
    big = labels.copy()
    big[5] = 50_000
    synth.write_split(tmp_path / "big.txt", ids, big)
    s_big = fgs.convert({"x": table}, tmp_path / "big.fgs", split=tmp_path / "big.txt", progress=False)
    with pytest.raises(ValueError, match=r"big\.fgs: labels go up to 50000; the probe takes class ids below 10000"):
        run_probe(s_big, s_big, "x", backend="numpy")
    synth.write_split(tmp_path / "ok.txt", ids, labels)
    nan_table = {k: v.copy() for k, v in table.items()}
    nan_table[ids[7]][1, 2] = np.nan
    s_nan = fgs.convert({"x": nan_table}, tmp_path / "nan.fgs", split=tmp_path / "ok.txt", progress=False)
    with pytest.raises(ValueError, match=r"nan\.fgs: column 'x' holds NaN or infinite values \(instance 7\)"):
        run_probe(s_nan, s_nan, "x", num_segments=None, backend="numpy")
    s_ok = fgs.convert({"x": table}, tmp_path / "ok.fgs", split=tmp_path / "ok.txt", progress=False)
    with pytest.raises(ValueError, match="training diverged"):
        run_probe(s_ok, s_ok, "x", backend="numpy", lr=1e30, epochs=3, batch_size=4, threads=1, compute_threads=1)


# -- what the JSON holds, several seeds, the plot's class names ------------------------


def test_json_holds_top5_per_instance_predictions_and_the_confusion_matrix(pair):
    tr, va = pair
    r = run_probe(tr, va, "a", backend="numpy", **FAST)
    d = json.loads(ProbeTable([r]).to_json())["results"][0]
    y = np.asarray(va.labels)
    n = len(y)
    inst = d["per_instance"]
    assert inst["id"] == va.ids.to_list() and inst["label"] == y.tolist()
    pred = np.asarray(inst["predicted"])
    top5 = np.asarray(inst["top5"])
    assert pred.shape == (n,) and top5.shape == (n, 5)
    assert (top5[:, 0] == pred).all()  # the best class is the prediction
    assert all(len(set(row)) == 5 for row in top5.tolist())
    assert d["levels"]["element"]["top1"] == pytest.approx(np.mean(pred == y))
    assert d["top5"] == pytest.approx(np.mean((top5 == y[:, None]).any(axis=1)))
    assert d["top5"] >= d["levels"]["element"]["top1"]
    cm = d["confusion_matrix"]
    classes = np.asarray(cm["classes"])
    matrix = np.asarray(cm["matrix"])
    np.testing.assert_array_equal(classes, np.union1d(y, pred))
    assert matrix.shape == (len(classes), len(classes)) and matrix.sum() == n
    full = metrics.confusion_matrix(y, pred, num_classes=99)
    np.testing.assert_array_equal(matrix, full[np.ix_(classes, classes)])
    assert np.trace(matrix) == int((pred == y).sum())
    # the recall of each class, from the matrix, is the per-class accuracy
    row = {int(c): k for k, c in enumerate(classes)}
    recall = [matrix[row[c], row[c]] / matrix[row[c]].sum() for c in d["per_class"]["class"]]
    assert d["per_class"]["recall"] == pytest.approx(recall)
    assert d["per_class"]["name"] == [va.label_names[c] for c in d["per_class"]["class"]]


def test_top5_classes_rank_as_topk_accuracy_does(pair):
    tr, va = pair
    r = run_probe(tr, va, "b", backend="numpy", **FAST)
    assert r.top5 == pytest.approx(np.mean((r.top5_classes == r.labels[:, None]).any(axis=1)))


def test_class_names_are_none_without_a_hierarchy(tmp_path):
    tr, va, _ = plain_pair(tmp_path, 100, 50)
    r = run_probe(tr, va, "x", backend="numpy", **FAST)
    assert r.top5_classes.shape == (50, 5) and r.to_dict()["per_class"]["name"] == [None] * len(r.per_class["class"])


def test_seeds_report_the_spread_of_single_seed_runs(pair):
    tr, va = pair
    table = run_probes([pair], ["b"], backend="numpy", levels=("element", "set"), seeds=3, seed=4, **FAST)
    assert [r.seed for r in table.results] == [4, 5, 6]
    singles = [run_probe(tr, va, "b", backend="numpy", levels=("element", "set"), seed=s, **FAST) for s in (4, 5, 6)]
    for got, single in zip(table.results, singles):
        np.testing.assert_array_equal(got.predictions, single.predictions)
    (entry,) = table.over_seeds()
    assert entry["seeds"] == [4, 5, 6] and (entry["dataset"], entry["column"]) == ("Gym99", "b")
    for level in ("element", "set"):
        for m in ("mean_class_acc", "top1"):
            values = [s.levels[level][m] for s in singles]
            spread = entry["levels"][level][m]
            assert spread["mean"] == pytest.approx(np.mean(values))
            assert spread["std"] == pytest.approx(np.std(values, ddof=1))
            assert (spread["min"], spread["max"]) == (min(values), max(values))
    data = json.loads(table.to_json())
    assert data["over_seeds"] == json.loads(json.dumps(table.over_seeds())) and len(data["results"]) == 3
    md = table.to_markdown().splitlines()
    cells = md[2].strip("| ").split(" | ")
    e = entry["levels"]["element"]["mean_class_acc"]
    assert cells[1] == f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}"
    assert "element, 3 seeds: Mean Class Acc" in table.summary()
    assert "over_seeds" not in json.loads(ProbeTable(singles[:1]).to_json())


def test_cli_seeds(pair, capsys):
    tr, va = pair
    rc = main(["probe", tr.path, va.path, "--column", "b", "--backend", "numpy", "--epochs", "1", "--threads", "1",
               "--json", "-", "-q", "--seeds", "2", "--seed", "7"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads(out)
    assert [r["seed"] for r in data["results"]] == [7, 8] and data["over_seeds"][0]["seeds"] == [7, 8]
    with pytest.raises(SystemExit):
        main(["probe", tr.path, va.path, "--seeds", "0"])
    assert "argument --seeds: must be between 1 and 1000" in capsys.readouterr().err


def test_plot_names_the_classes(pair):
    require("matplotlib", "matplotlib", "pip install '.[plot]'")
    import matplotlib.pyplot as plt

    _, va = pair
    table = run_probes([pair], ["a"], backend="numpy", seeds=2, **FAST)
    fig = table.figure()
    try:
        (ax, _twin) = fig.axes
        labels = [t.get_text() for t in ax.get_xticklabels()]
    finally:
        plt.close(fig)
    pc = table.results[0].per_class
    order = np.argsort(-np.asarray(pc["train_count"]), kind="stable")
    assert labels == class_tick_labels(pc, order)
    names = va.label_names
    first = pc["class"][order[0]]
    assert labels[0].startswith(f"{first} ") and names[first][:20] in labels[0]
    assert len(labels) == len(pc["class"])


def test_class_tick_labels_without_names_and_long_names():
    pc = {"class": [3, 7], "name": [None, "x" * 50]}
    assert class_tick_labels(pc, [1, 0], width=10) == ["7 xxxxxxxxx…", "3"]
    assert class_tick_labels({"class": [1]}, [0]) == ["1"]
