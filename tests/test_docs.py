"""The documentation runs: every ```python block of README.md and docs/*.md is
executed, the README's Quick start is the two commands CI runs, and every
relative link points at a file (and heading) that exists.

The blocks of one file run in order in one namespace, like a doctest session,
in a temporary folder filled with small synthetic versions of the files the
examples name (FineGym's released file names, a few hundred instances)."""

from __future__ import annotations

import re
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest

from conftest import markdown_blocks, require

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Pages whose examples need a running engine or server: the tests that start
#: one run them (a Ray cluster, a Spark session, S3 and HTTP servers).
RUN_BY = {"engines.md": ["test_ray.py", "test_spark.py"], "remote.md": ["test_remote.py"]}
LINKED = [*DOCS, ROOT / "benchmarks" / "README.md"]

#: An id the examples spell out (a real FineGym element id).
EXAMPLE_ID = "A0xAXXysHUo_E_002184_002237_A_0035_0036"

#: Stores each page makes itself, so its folder must not hold them beforehand
#: (a conversion never replaces a file it was not asked to).
MADE_BY = {"README.md": {"gym99_val.fgs"}, "converting.md": {"gym99_val.fgs"}}

#: What a block needs beyond numpy: (pattern in the block, module, install hint).
NEEDS = [
    (r"\btorch\b", "torch", 'pip install ".[torch]"'),
    (r"to_arrow|to_parquet|to_batches|from_arrow|from_parquet|classes_table|pyarrow", "pyarrow",
     'pip install ".[arrow]"'),
    (r"\bpolars\b", "polars", 'pip install ".[test]"'),
    (r"\bduckdb\b", "duckdb", 'pip install ".[test]"'),
    (r"\.plot\(", "matplotlib", 'pip install ".[plot]"'),
]


def blocks(path: Path, language: str) -> list[tuple[int, str]]:
    return markdown_blocks(path, language)


# ---- the files the examples name -----------------------------------------------------------


def _release(folder: Path, subset_split: str, n: int, models: dict[str, tuple[int, ...]], seed: int,
             first_id: str | None = None) -> None:
    """A split file and one pickle per model, named as FineGym released them."""
    from finegym_store import synth

    ids = synth.make_ids(n, seed=seed)
    if first_id is not None and first_id not in ids:
        ids[0] = first_id
    labels = synth.long_tailed_labels(n, 99, seed=seed)
    synth.write_split(folder / f"{subset_split}_element.txt", ids, labels)
    for k, (model, shape) in enumerate(models.items()):
        synth.write_pickle(folder / f"{model}_{subset_split}.pkl",
                           synth.make_features(ids, labels, shape, seed=seed + k))


@pytest.fixture(scope="session")
def example_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import finegym_store as fgs

    folder = tmp_path_factory.mktemp("doc-files")
    shutil.copy(Path(fgs.__file__).parent / "sample" / "gym99_categories.txt", folder / "gym99_categories.txt")
    # TSN's (T, C, 1, 1) and I3D's (T, C, 1, 1, 1) layouts; I3D keeps its 2048
    # channels, which the Arrow example spells out.
    models = {"tsn": (12, 32, 1, 1), "i3d": (12, 2048, 1, 1, 1)}
    _release(folder, "gym99_val", 300, models, seed=1, first_id=EXAMPLE_ID)
    _release(folder, "gym99_train", 400, models, seed=2)
    for subset_split in ("gym99_val", "gym99_train"):
        fgs.convert({m: folder / f"{m}_{subset_split}.pkl" for m in models}, folder / f"{subset_split}.fgs",
                    split=folder / f"{subset_split}_element.txt", categories=folder / "gym99_categories.txt",
                    progress=False)
    # A later release of the train split and the earlier one's split file (a subset).
    shutil.copy(folder / "gym99_train.fgs", folder / "gym99_train_v1.1.fgs")
    lines = (folder / "gym99_train_element.txt").read_text().splitlines(keepends=True)
    (folder / "gym99_train_element_v1.0.txt").write_text("".join(lines[::3]))
    return folder


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p in DOCS if blocks(p, "python") and p.name not in RUN_BY],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path, example_files: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    found = blocks(path, "python")
    for f in example_files.iterdir():
        if f.name not in MADE_BY.get(path.name, set()):
            shutil.copy(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)
    name = str(path.relative_to(ROOT))
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for line, code in found:
        for pattern, module, install in NEEDS:
            if re.search(pattern, code):
                require(module, module, install)
        # Padded so that tracebacks give the line numbers of the Markdown file.
        compiled = compile("\n" * (line - 1) + code, name, "exec")
        failure = None
        try:
            exec(compiled, namespace)
        except Exception:
            failure = traceback.format_exc()
        if failure is not None:
            pytest.fail(f"{name}, the python block at line {line} failed:\n{failure}", pytrace=False)


def test_quick_start_is_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Quick start")
    first = min(line for line, _ in blocks(ROOT / "README.md", "bash")
                if line > text[:start].count("\n") + 1)
    code = dict(blocks(ROOT / "README.md", "bash"))[first]
    commands = [c for c in code.splitlines() if c.strip()]
    assert commands == ['pip install . && finegym-store demo', 'pip install ".[test]" && pytest']


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_blocks_are_found() -> None:
    # The parser sees the tour, so a change of fence style cannot empty the test.
    assert len(blocks(ROOT / "README.md", "python")) >= 1
    assert np.all([code.strip() for _, code in blocks(ROOT / "README.md", "python")])


def test_readme_lists_every_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    docs = readme[readme.index("## Documentation"):]
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in docs]
    assert not missing, f"README.md's Documentation list lacks {', '.join(missing)}"


def test_install_names_every_extra() -> None:
    # The [project.optional-dependencies] table, read without tomllib (Python 3.11+).
    toml = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = toml[toml.index("[project.optional-dependencies]"):]
    table = table[:table.index("\n[", 1)]
    extras = re.findall(r"^([A-Za-z0-9_-]+) = \[", table, re.M)
    assert "torch" in extras and "test" in extras
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("## Install"):readme.index("\n## ", readme.index("## Install") + 1)]
    missing = [name for name in extras if f"| `{name}` |" not in install]
    assert not missing, f"README.md's Install table lacks the extras {', '.join(missing)}"


@pytest.mark.parametrize("page", sorted(RUN_BY))
def test_pages_run_elsewhere_are_run_there(page: str) -> None:
    # Each test file named runs the page's examples through run_markdown_blocks.
    assert blocks(ROOT / "docs" / page, "python")
    for test in RUN_BY[page]:
        text = (ROOT / "tests" / test).read_text(encoding="utf-8")
        assert f'"docs" / "{page}"' in text and "run_markdown_blocks(" in text, (page, test)
