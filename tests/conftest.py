from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

#: The real FineGym annotation files (CI has them; users need not): the
#: folder FINEGYM_SHARED names, else ../shared/finegym beside the repository.
SHARED = Path(os.environ.get("FINEGYM_SHARED") or Path(__file__).resolve().parents[1].parent / "shared" / "finegym")


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path} is missing; CI must provide ../shared/finegym")
        pytest.skip(f"{path} not present (only CI and developer machines have ../shared/finegym)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def require(module: str, name: str, install: str):
    """`module` imported, or a skip where it is not installed. Never a skip in
    CI, which installs the [test] extra: there the ImportError fails the run."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name} is not installed ({install})", allow_module_level=True)


def require_torch():
    return require("torch", "torch", "pip install torch; CI installs torch==2.13.0")


def synthetic_store(folder: Path, n: int, num_classes: int, shape: tuple[int, ...] = (12, 16, 1, 1), seed: int = 0):
    """A store of n synthetic FineGym instances (column 'x', split labels)."""
    import finegym_store as fgs
    from finegym_store import synth

    ids = synth.make_ids(n, seed=seed)
    labels = synth.long_tailed_labels(n, num_classes, seed=seed)
    table = synth.make_features(ids, labels, shape, seed=seed)
    synth.write_split(folder / "split.txt", ids, labels)
    return fgs.convert({"x": table}, folder / "s.fgs", split=folder / "split.txt", progress=False)


#: Working folder for child Pythons. `python -m` and `python -c` put the cwd
#: first on sys.path; from the repository root, the uncompiled sources there
#: would shadow the installed package, so children run from tests/ instead.
CHILD_CWD = Path(__file__).resolve().parent
