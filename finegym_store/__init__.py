"""finegym-store: a memory-mapped, columnar store for FineGym features.

    import finegym_store as fgs
    fgs.convert({"i3d": "i3d_gym99_val.pkl"}, "gym99_val.fgs", split="gym99_val_element.txt")
    store = fgs.open("gym99_val.fgs")
    x = store.features("i3d", 0)        # (12, 2048) float32 view, no copy
"""

from __future__ import annotations

__version__ = "0.3.0"

from ._core import FORMAT_VERSION
from .errors import ConversionError, ForkedJobError, FormatError, LabelSpaceError, UnsafePickleError
from .labelspace import LabelSpace
from .loader import Batch, Loader
from .spec import SegmentSpec
from .stats import ColumnStats, add_stats
from .store import Classes, Column, Meta, Store, Strings, open
from .sources import HDF5Source
from .convert import convert  # noqa: E402 (needs __version__)
from .ingest import ImportOptions, from_arrow, from_ipc, from_parquet  # noqa: E402 (pyarrow imported on first call)

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "open",
    "convert",
    "HDF5Source",
    "from_arrow",
    "from_parquet",
    "from_ipc",
    "ImportOptions",
    "Store",
    "Column",
    "Strings",
    "Meta",
    "Classes",
    "SegmentSpec",
    "ColumnStats",
    "add_stats",
    "Batch",
    "Loader",
    "FormatError",
    "ConversionError",
    "LabelSpaceError",
    "LabelSpace",
    "UnsafePickleError",
    "ForkedJobError",
]
