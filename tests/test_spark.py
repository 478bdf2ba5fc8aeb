"""The PySpark data source (finegym_store.spark) in local mode (docs/engines.md).
One Spark session serves the whole module."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from pathlib import Path

from conftest import example_store, require, run_markdown_blocks, synthetic_store

import finegym_store

require("pyspark.sql.datasource", "PySpark >= 4.0", 'pip install "finegym-store[spark]"; CI installs pyspark 4.3')
fs = require("finegym_store.spark", "PySpark >= 4.0", 'pip install "finegym-store[spark]"')

pytestmark = [
    # PySpark 4.3 warns about pandas 3 on import; nothing here uses pandas.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
    pytest.mark.slow,
]

N = 150


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    # Python workers run this interpreter (the package and pyarrow are
    # installed here); everything binds to loopback.
    saved = {k: os.environ.get(k) for k in ("PYSPARK_PYTHON", "SPARK_LOCAL_IP")}
    # Spark's Python workers start in this folder and put it first on their
    # path: not the repository, whose finegym_store/ sources would shadow the
    # installed package (and its built extension).
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("spark-cwd"))
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = (SparkSession.builder.master("local[2]").appName("finegym-store-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        fs.register(session)
        yield session
    finally:
        session.stop()
        os.chdir(here)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("spark"), N, 5)


def _reader(spark, **options):
    r = spark.read.format("finegym_store")
    for k, v in options.items():
        r = r.option(k, v)
    return r


def test_dataframe_holds_the_store(spark, store):
    df = _reader(spark).load(store.path)
    assert df.schema.simpleString() == (
        "struct<id:string,label:int,video:string,event_start:int,event_end:int,element_start:int,"
        "element_end:int,x:array<array<float>>>")
    rows = df.collect()
    assert len(rows) == N
    idx = store.index_of([r["id"] for r in rows])
    assert sorted(idx.tolist()) == list(range(N))
    np.testing.assert_array_equal(np.array([r["x"] for r in rows], dtype=np.float32), store.column("x").values[idx])
    np.testing.assert_array_equal([r["label"] for r in rows], store.labels[idx])
    np.testing.assert_array_equal([r["event_start"] for r in rows], store.meta.event_start[idx])
    assert [r["video"] for r in rows] == [store.meta.video[i] for i in idx]


def test_partitions_are_instance_ranges(spark, store):
    from pyspark.sql.functions import spark_partition_id

    df = _reader(spark, numPartitions=4, columns="id").load(store.path)
    assert df.rdd.getNumPartitions() == 4
    rows = df.withColumn("part", spark_partition_id()).collect()
    by_part: dict[int, list[int]] = {}
    for r in rows:
        by_part.setdefault(r["part"], []).append(int(store.index_of(r["id"])))
    assert len(by_part) == 4
    ranges = sorted((min(v), max(v), len(v)) for v in by_part.values())
    assert all(hi - lo + 1 == n for lo, hi, n in ranges)  # contiguous
    assert ranges[0][0] == 0 and ranges[-1][1] == N - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint, no gap


def test_columns_are_pruned_by_option_or_schema(spark, store):
    df = _reader(spark, columns="label, x").load(store.path)
    assert df.columns == ["label", "x"]
    assert df.count() == N
    df = spark.read.format("finegym_store").schema("id string, label int").load(store.path)
    got = {r["id"]: r["label"] for r in df.collect()}
    assert got == dict(zip(store.ids.to_list(), store.labels.tolist()))
    with pytest.raises(Exception, match="column 'label' is int, but the schema given asks for string"):
        spark.read.format("finegym_store").schema("label string").load(store.path).collect()
    with pytest.raises(Exception, match="no column 'nope'"):
        _reader(spark, columns="nope").load(store.path).schema  # noqa: B018


def test_segment_sampling_options(spark, store):
    df = _reader(spark, columns="id,x", numSegments=3, mode="train", seed=4, epoch=1).load(store.path)
    rows = df.collect()
    idx = store.index_of([r["id"] for r in rows])
    x = np.array([r["x"] for r in rows], dtype=np.float32)
    assert x.shape == (N, 3, 16)
    spec = finegym_store.SegmentSpec(3, mode="train", seed=4)
    np.testing.assert_array_equal(x, store.gather("x", idx, spec=spec, epoch=1))
    with pytest.raises(Exception, match="mode"):
        _reader(spark, numSegments=3, mode="eval").load(store.path).collect()
    with pytest.raises(Exception, match="option epoch needs numSegments"):
        _reader(spark, epoch=2).load(store.path).collect()


def test_ragged_and_float16_columns(spark, tmp_path):
    from arrow_fixtures import make_store

    s = make_store(tmp_path, dtype="float16")
    rows = _reader(spark, columns="id,a,r").load(s.path).collect()
    for r in rows:
        i = s.index_of(r["id"])
        np.testing.assert_array_equal(np.array(r["a"], dtype=np.float32), s.features("a", i).astype(np.float32))
        np.testing.assert_array_equal(np.array(r["r"], dtype=np.float32).reshape(-1, 4),
                                      s.features("r", i).astype(np.float32))
    rows = _reader(spark, columns="id,r", numSegments=2, mode="test").load(s.path).collect()
    idx = s.index_of([r["id"] for r in rows])
    spec = finegym_store.SegmentSpec(2, mode="test", dtype="float32")
    np.testing.assert_array_equal(np.array([r["r"] for r in rows], dtype=np.float32), s.gather("r", idx, spec=spec))


def test_docs_example(spark, tmp_path, monkeypatch):
    # docs/engines.md's Spark example as written, with this module's session as `spark`.
    local = example_store(tmp_path, n=N)
    monkeypatch.chdir(tmp_path)
    page = Path(__file__).resolve().parents[1] / "docs" / "engines.md"
    scope = run_markdown_blocks(page, "finegym_store.spark", {"__name__": "docs_example", "spark": spark})
    rows = scope["df"].select("id", "label").collect()
    assert [r["id"] for r in rows] == local.ids.to_list()
    assert [r["label"] for r in rows] == local.labels.tolist()


def test_float32_parquet_export_reads_in_spark(spark, tmp_path):
    # Spark reads no FLOAT16 Parquet column; dtype="float32" writes it upcast.
    from arrow_fixtures import make_store

    s = make_store(tmp_path, dtype="float16")
    path = s.to_parquet(tmp_path / "s32.parquet", ["id", "label", "a", "r"], dtype="float32")
    rows = spark.read.parquet(path).collect()
    assert [r["id"] for r in rows] == s.ids.to_list()
    np.testing.assert_array_equal([r["label"] for r in rows], s.labels)
    for i, r in enumerate(rows):
        a, rr = np.array(r["a"], dtype=np.float64), np.array(r["r"], dtype=np.float64)
        assert a.shape == s.features("a", i).shape and rr.shape == s.features("r", i).shape
        # float32 holds every float16 exactly: the values are the stored ones.
        np.testing.assert_array_equal(a, s.features("a", i).astype(np.float64))
        np.testing.assert_array_equal(rr, s.features("r", i).astype(np.float64))
