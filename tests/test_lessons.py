"""Every lesson notebook runs top to bottom (tiny preset) without an error.

A notebook's "check yourself" cells assert what the reader should have seen, so a
lesson whose numbers drift from what its text says fails here. The notebooks share
one run folder in a temporary directory, as they share runs/lessons-cpu in a real run.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import lessons

NOTEBOOKS = lessons.notebooks([])


@pytest.fixture(scope="module")
def lesson_env(tmp_path_factory):
    old = {k: os.environ.get(k) for k in ("MINIDPO_LESSONS_FAST", "MINIDPO_LESSONS_RUNS")}
    os.environ["MINIDPO_LESSONS_FAST"] = "1"
    os.environ["MINIDPO_LESSONS_RUNS"] = str(tmp_path_factory.mktemp("lesson-runs"))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_there_are_lessons():
    assert len(NOTEBOOKS) >= 1, "no lessons/NN_*.ipynb found"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, lesson_env):
    lessons.execute(path, save=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_shape(path):
    """First cell prints the versions; the lesson says what it teaches; outputs stay small."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "versions()" in code[0].source, f"{path.name}: first code cell must print versions()"
    assert "import minidpo" in code[0].source or "from minidpo" in code[0].source
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown").lower()
    assert "what you will learn" in text, f"{path.name}: no 'What you will learn' paragraph"
    assert "check yourself" in text, f"{path.name}: no 'Check yourself' section"
    size = path.stat().st_size
    assert size < 1_500_000, f"{path.name}: {size} bytes; keep outputs small"
