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


def markdown_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number of the block's first line, its text) for each fenced
    block of `language` in the Markdown file `path`."""
    import re

    out: list[tuple[int, str]] = []
    fence: tuple[str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if fence is None:
            m = re.match(r"^```(\S*)\s*$", line)
            if m:
                fence = (m.group(1), number + 1)
                body = []
        elif line.startswith("```"):
            if fence[0] == language:
                out.append((fence[1], "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{path.name}: the block opened at line {fence[1] - 1} is never closed"
    return out


def run_markdown_blocks(path: Path, select: str, namespace: dict, replace: dict[str, str] | None = None) -> dict:
    """Run, in order and in one namespace, the python blocks of `path` that
    contain `select` (after the replacements), with the Markdown file's line
    numbers in tracebacks."""
    found = [(line, code) for line, code in markdown_blocks(path, "python") if select in code]
    assert found, f"{path.name}: no python block contains {select!r}"
    for line, code in found:
        for old, new in (replace or {}).items():
            code = code.replace(old, new)
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
    return namespace


def example_store(folder: Path, name: str = "gym99_train.fgs", n: int = 120, channels: int = 32, seed: int = 0):
    """A small store named as the docs' examples name it: one column 'i3d'
    of (12, channels) features, gym99 labels and hierarchy."""
    import finegym_store as fgs
    from finegym_store import synth

    folder.mkdir(parents=True, exist_ok=True)
    ids = synth.make_ids(n, seed=seed)
    labels = synth.long_tailed_labels(n, 99, seed=seed)
    synth.write_split(folder / f"{name}.split.txt", ids, labels)
    table = synth.make_features(ids, labels, (12, channels, 1, 1, 1), seed=seed)
    categories = Path(fgs.__file__).parent / "sample" / "gym99_categories.txt"
    return fgs.convert({"i3d": table}, folder / name, split=folder / f"{name}.split.txt", categories=categories,
                       progress=False)


def run_fuzz_seeded(script: str, seed: int, cases: int, tmp_path: Path) -> dict:
    """Run tests/fuzz/SCRIPT --seeded in a child process and return its JSON
    summary, failing on a crash (a signal exit status) or any finding (exit 1)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(CHILD_CWD / "fuzz" / script), "--seeded", "--seed", str(seed), "--cases", str(cases),
         "--workdir", str(tmp_path / "work"), "--findings", str(tmp_path / "findings")],
        capture_output=True, text=True, timeout=600, cwd=CHILD_CWD, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (f"exit status {proc.returncode} (negative = killed by that signal) at "
                                  f"{lines[-1:]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(lines[-1])
    assert summary["executions"] == cases and summary["findings"] == 0
    return summary
