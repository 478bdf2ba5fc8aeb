"""Spark: a PySpark Python data source that reads a .fgs file.

    import finegym_store.spark
    finegym_store.spark.register(spark)
    df = spark.read.format("finegym_store").load("train.fgs")
    df.printSchema()    # id, label, video, event_start, ..., i3d: array<array<float>>

Each partition is a contiguous range of instances; its Python task opens the
store where it runs and hands Spark Arrow record batches over that range of
the mapping (features cast to Spark's list layout). The path must name the
same file on every executor. PySpark >= 4.0 (its Python data source API)
with pyarrow: ``pip install "finegym-store[spark]"``.
"""

from __future__ import annotations

import os

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

try:
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
    from pyspark.sql.types import ArrayType, DataType, FloatType, IntegerType, StringType, StructField, StructType
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError('finegym_store.spark needs PySpark >= 4.0: pip install "finegym-store[spark]"') from None

from ._ranges import Sampling, bytes_per_row, range_table, select
from .arrow import INSTANCE_FIELDS
from .spec import SegmentSpec

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

    from .store import Store

__all__ = ["register", "StoreDataSource", "FORMAT"]

#: The name for ``spark.read.format(...)``.
FORMAT = "finegym_store"
#: Default bytes of data per partition and per Arrow record batch.
PARTITION_BYTES = 64 << 20
BATCH_BYTES = 8 << 20


def register(spark: SparkSession) -> None:
    """Register the data source with a session: ``spark.read.format(
    "finegym_store").load(path)`` then reads .fgs files."""
    spark.dataSource.register(StoreDataSource)


def _spark_type(store: Store, name: str) -> DataType:
    if name in ("id", "video"):
        return StringType()
    if name in INSTANCE_FIELDS:
        return IntegerType()
    store.column(name)
    return ArrayType(ArrayType(FloatType(), containsNull=False), containsNull=False)


def _option(options: Mapping[str, str], key: str, default: Any, kind: type = int) -> Any:
    value = options.get(key)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"option {key}={value!r} is not a valid {kind.__name__}") from None


def _sampling(options: Mapping[str, str]) -> Sampling | None:
    """The gather the options ask for (numSegments, mode, clipLen, rule,
    seed, epoch; float32, Spark's float), or None."""
    if options.get("numsegments") is None:
        for k in ("mode", "cliplen", "rule", "seed", "epoch"):
            if options.get(k) is not None:
                raise ValueError(f"option {k} needs numSegments (segment sampling)")
        return None
    spec = SegmentSpec(_option(options, "numSegments", None), mode=_option(options, "mode", None, str),
                       clip_len=_option(options, "clipLen", 1), rule=_option(options, "rule", "mmaction2", str),
                       dtype="float32", seed=_option(options, "seed", 0))
    return Sampling(spec, _option(options, "epoch", 0))


class RangePartition(InputPartition):
    """Instances [start, stop) of the store."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__((start, stop))
        self.start = start
        self.stop = stop


class StoreDataSource(DataSource):
    """``spark.read.format("finegym_store")``: options ``path`` (what
    ``load`` is given), ``columns`` (comma-separated; default: all),
    ``numPartitions``, and ``numSegments``/``mode``/``clipLen``/``rule``/
    ``seed``/``epoch`` for segment sampling at read time (a SegmentSpec;
    docs/engines.md)."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def _path(self) -> str:
        path = self.options.get("path")
        if not path:
            raise ValueError('finegym_store needs a path: spark.read.format("finegym_store").load(path)')
        path = str(path)
        if "://" not in path and not os.path.isabs(path) and not os.path.exists(path):
            # Spark runs the data source in Python workers whose folder is not the caller's.
            raise FileNotFoundError(f"{path}: no such file in the folder of Spark's Python worker "
                                    f"({os.getcwd()}); pass an absolute path")
        return path

    def schema(self) -> StructType:
        from .store import open as open_store

        store = open_store(self._path())
        cols = self.options.get("columns")
        names = select(store, None if cols is None else [c.strip() for c in cols.split(",") if c.strip()])
        return StructType([StructField(n, _spark_type(store, n), nullable=False) for n in names])

    def reader(self, schema: StructType) -> StoreReader:
        return StoreReader(self._path(), schema, self.options)


class StoreReader(DataSourceReader):
    """Reads the columns of ``schema`` (the data source's, or one the user
    gave with ``.schema(...)``, which selects columns) over instance ranges."""

    def __init__(self, path: str, schema: StructType, options: Mapping[str, str]) -> None:
        from .store import open as open_store

        store = open_store(path)
        self.path = store.path
        self.names = select(store, schema.fieldNames())
        for f in schema.fields:
            want = _spark_type(store, f.name)
            if f.dataType != want:
                raise ValueError(f"{path}: column {f.name!r} is {want.simpleString()}, "
                                 f"but the schema given asks for {f.dataType.simpleString()}")
        self.schema = schema
        self.sampling = _sampling(options)
        if self.sampling is not None:
            for n in self.names:
                if n in store.columns:
                    self.sampling.gather(store, n, [], 1)  # bad arguments fail at planning
        self.num_rows = len(store)
        row = max(1, sum(bytes_per_row(store, n, self.sampling) for n in self.names))
        default = max(1, min(self.num_rows, math.ceil(self.num_rows * row / PARTITION_BYTES)))
        self.num_partitions = _option(options, "numPartitions", default)
        if self.num_partitions < 1:
            raise ValueError(f"option numPartitions must be at least 1, got {self.num_partitions}")
        self.batch_rows = max(1, BATCH_BYTES // row)

    def partitions(self) -> list[RangePartition]:
        n, parts = self.num_rows, max(1, min(self.num_partitions, max(1, self.num_rows)))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        return [RangePartition(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        from pyspark.sql.pandas.types import to_arrow_schema

        from .store import open as open_store

        assert isinstance(partition, RangePartition)
        store = open_store(self.path)
        if len(store) < partition.stop:
            raise ValueError(f"{self.path} holds {len(store)} instances, but the scan was planned for at least "
                             f"{partition.stop}; the file changed after planning (or differs between executors)")
        target = to_arrow_schema(self.schema, timezone="UTC")
        for start in range(partition.start, partition.stop, self.batch_rows):
            stop = min(partition.stop, start + self.batch_rows)
            table = range_table(store, self.names, start, stop, self.sampling, threads=1, nested=True)
            # Spark takes list<list<float>> and utf8: offsets are made, values stay where they are.
            yield from table.cast(target).to_batches()
