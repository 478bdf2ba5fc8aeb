"""finegym_store.ray.read_store on a real two-node Ray cluster started here
(docs/engines.md). One cluster serves the whole module."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import example_store, require, run_markdown_blocks, synthetic_store

require("ray.data", "Ray Data", 'pip install "finegym-store[ray]"; CI installs ray[data,train]')

import ray  # noqa: E402

import finegym_store  # noqa: E402

fr = require("finegym_store.ray", "Ray Data", 'pip install "finegym-store[ray]"')

# Ray warns about its own deprecated settings on import and while planning.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.slow,
]

N = 240
DOCS = Path(__file__).resolve().parents[1] / "docs" / "engines.md"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node and a second node, one process tree each, on loopback;
    the workers import finegym_store from where this process did."""
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    # Loopback only: without this, ray.init resolves 127.0.0.1 to the
    # machine's outward address, where the nodes are not listening.
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    root = os.path.dirname(os.path.dirname(os.path.abspath(finegym_store.__file__)))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    node = {"num_cpus": 2, "object_store_memory": 150 << 20, "include_dashboard": False}
    # The nodes' workers start in this folder and put it first on their path:
    # not the repository, whose finegym_store/ sources would shadow the
    # installed package (and its built extension).
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-cwd"))
    c = Cluster(initialize_head=True, head_node_args={**node, "node_ip_address": "127.0.0.1"})
    try:
        c.add_node(**node, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        assert len(ray.nodes()) == 2
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        os.chdir(here)
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("ray"), N, 7)


def _all(ds, **kw):
    return list(ds.iter_batches(batch_size=None, batch_format="numpy", **kw))


def _concat(batches, key):
    return np.concatenate([b[key] for b in batches])


def test_numpy_batches_are_tensors(cluster, store):
    ds = fr.read_store(store.path)
    # Known from the read tasks' metadata, before any read.
    assert ds.count() == N
    row = store.column("x").values[0].nbytes + 4 * 5
    assert ds.size_bytes() >= N * row
    b = next(iter(ds.iter_batches(batch_size=32, batch_format="numpy")))
    assert b["x"].dtype == np.float32 and b["x"].shape == (32, 12, 16)
    assert b["label"].dtype == np.int32
    assert isinstance(b["id"][0], str)
    idx = store.index_of(b["id"].tolist())
    np.testing.assert_array_equal(b["x"], store.column("x").values[idx])
    np.testing.assert_array_equal(b["label"], store.labels[idx])
    np.testing.assert_array_equal(b["element_end"], store.meta.element_end[idx])
    assert b["video"].tolist() == [store.meta.video[i] for i in idx]


def test_read_tasks_on_both_nodes_and_streaming_split_is_disjoint_and_complete(cluster, store):
    def where(batch):
        return {"id": batch["id"], "node": np.full(len(batch["id"]), ray.get_runtime_context().get_node_id())}

    # map_batches fuses with the read: it runs in the read task, on its node.
    ds = fr.read_store(store.path, columns=["id"], override_num_blocks=8).map_batches(where, batch_format="numpy")
    rows = _all(ds)
    nodes = set(_concat(rows, "node").tolist())
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]} and len(nodes) == 2
    assert sorted(_concat(rows, "id").tolist()) == sorted(store.ids.to_list())

    @ray.remote(num_cpus=0)
    def consume(it):
        out = []
        for b in it.iter_batches(batch_size=16, batch_format="numpy"):
            assert b["x"].shape[1:] == (12, 16)
            out += b["id"].tolist()
        return out

    split = fr.read_store(store.path, columns=["id", "x"]).streaming_split(2)
    a, b = ray.get([consume.remote(split[0]), consume.remote(split[1])])
    assert a and b and not set(a) & set(b)
    assert sorted(a + b) == sorted(store.ids.to_list())


def test_gather_spec_matches_store_gather(cluster, store):
    spec = finegym_store.SegmentSpec(3, mode="train", seed=5)
    ds = fr.read_store(store.path, columns=["id", "label", "x"], spec=spec, epoch=2)
    assert ds.schema().names == ["id", "label", "x"]
    rows = _all(ds)
    x, ids = _concat(rows, "x"), _concat(rows, "id").tolist()
    assert x.shape == (N, 3, 16) and x.dtype == np.float32
    idx = store.index_of(ids)
    np.testing.assert_array_equal(x, store.gather("x", idx, spec=spec, epoch=2))
    # Another epoch samples other segments; the same epoch the same ones.
    everything = np.arange(N)
    other = _concat(_all(fr.read_store(store.path, columns=["x"], spec=spec, epoch=3)), "x")
    again = _concat(_all(fr.read_store(store.path, columns=["x"], spec=spec, epoch=2)), "x")
    assert not np.array_equal(np.sort(other, axis=0), np.sort(store.gather("x", everything, spec=spec, epoch=2), axis=0))
    np.testing.assert_array_equal(np.sort(again, axis=0), np.sort(store.gather("x", everything, spec=spec, epoch=2), axis=0))
    half = finegym_store.SegmentSpec(4, mode="test", dtype="float16")
    h = _concat(_all(fr.read_store(store.path, columns=["x"], spec=half)), "x")
    assert h.dtype == np.float16 and h.shape == (N, 4, 16)


def test_projection_is_pushed_into_the_read(cluster, store):
    from ray.data._internal.logical.optimizers import LogicalOptimizer

    ds = fr.read_store(store.path).select_columns(["label", "x"])
    dag = LogicalOptimizer().optimize(ds._logical_plan).dag
    assert type(dag).__name__ == "Read" and dag.datasource.columns() == ["label", "x"]
    assert dag.datasource.estimate_inmemory_data_size() == N * (4 + 12 * 16 * 4)
    b = ds.take_batch(5)
    assert sorted(b) == ["label", "x"]


def test_torch_batches_and_map_batches(cluster, store):
    torch = require("torch", "torch", "pip install torch")
    spec = finegym_store.SegmentSpec(3, mode="test")
    ds = fr.read_store(store.path, columns=["label", "x"], spec=spec)
    b = next(iter(ds.iter_torch_batches(batch_size=16)))
    assert b["x"].shape == (16, 3, 16) and b["x"].dtype == torch.float32
    assert b["label"].dtype == torch.int32
    means = ds.map_batches(lambda b: {"m": b["x"].mean(axis=1)}, batch_format="numpy")
    m = _concat(_all(means), "m")
    assert m.shape == (N, 16)
    np.testing.assert_allclose(np.sort(m, axis=0),
                               np.sort(store.gather("x", np.arange(N), spec=spec).mean(axis=1), axis=0),
                               rtol=1e-6)


def test_ray_read_arguments_pass_through(cluster, store):
    ds = fr.read_store(store.path, columns=["id"], override_num_blocks=3, concurrency=1, num_cpus=0.5)
    assert ds.materialize().num_blocks() == 3
    with pytest.warns(DeprecationWarning, match="ray_remote_args"):
        ds = fr.read_store(store.path, columns=["id"], ray_remote_args={"num_cpus": 0.5})
    assert ds.count() == N


def test_bad_arguments(cluster, store):
    with pytest.raises(KeyError, match="no column 'nope'"):
        fr.read_store(store.path, columns=["nope"])
    with pytest.raises(TypeError, match="spec must be a finegym_store.SegmentSpec"):
        fr.read_store(store.path, spec={"num_segments": 3})
    with pytest.raises(ValueError, match="epoch"):
        fr.read_store(store.path, spec=finegym_store.SegmentSpec(3, mode="train"), epoch=-1)
    with pytest.raises(FileNotFoundError):
        fr.read_store(os.path.join(os.path.dirname(store.path), "missing.fgs"))


def test_docs_examples(cluster, tmp_path, monkeypatch):
    # docs/engines.md's Ray examples as written: reading, sampling, and the Ray Train example.
    require("torch", "torch", "pip install torch")
    example_store(tmp_path, n=N)
    monkeypatch.chdir(tmp_path)
    scope = run_markdown_blocks(DOCS, "finegym_store.ray", {"__name__": "docs_example"},
                                {'"/tmp/ray_results"': repr(str(tmp_path / "ray_results"))})
    result = scope["result"]
    assert result.error is None and result.checkpoint is not None
    # Each of the 2 workers took half the instances per epoch (Ray Train's equal split).
    assert result.metrics["instances"] == N // 2
    assert np.isfinite(result.metrics["loss"])
    assert scope["batch"]["i3d"].shape[1:] == (12, 32)


def test_ragged_and_float16_columns(cluster, tmp_path):
    from arrow_fixtures import make_store

    s = make_store(tmp_path, dtype="float16")
    rows = _all(fr.read_store(s.path, columns=["id", "a", "r"]))
    idx = s.index_of(_concat(rows, "id").tolist())
    a = _concat(rows, "a")
    assert a.dtype == np.float16 and a.shape == (len(s), 5, 6)
    np.testing.assert_array_equal(a, s.column("a").values[idx])
    # A ragged column gives each instance's (T_i, C) rows; a spec gathers it to (B, K, C).
    ragged = [r for b in rows for r in b["r"]]
    for i, r in zip(idx, ragged):
        np.testing.assert_array_equal(np.stack(r) if r.dtype == object else r, s.features("r", i))
    spec = finegym_store.SegmentSpec(2, mode="test", dtype="float32")
    rows = _all(fr.read_store(s.path, columns=["id", "r"], spec=spec))
    idx = s.index_of(_concat(rows, "id").tolist())
    np.testing.assert_array_equal(_concat(rows, "r"), s.gather("r", idx, spec=spec))
    with pytest.raises(ValueError, match="ragged"):
        fr.read_store(s.path, columns=["r"], spec=finegym_store.SegmentSpec(dtype="float32"))
