"""Build and execute the lesson notebooks.

    python scripts/lessons.py run [NOTEBOOK ...]     execute in place, keep the outputs
    python scripts/lessons.py check [NOTEBOOK ...]   execute a copy, fail on any error
    python scripts/lessons.py build SRC.py OUT.ipynb  percent-format script -> notebook

`run` is what `make lessons` does: every notebook, in order, top to bottom, with
the outputs saved so they read well on GitHub; it prints each one's wall time.
`check` is what the tests do (with MINIDPO_LESSONS_FAST=1 for the tiny preset).
`build` is an authoring aid: write a lesson as a script whose cells start with
``# %%`` (code) or ``# %% [markdown]`` (markdown, each line starting with ``# ``).
A notebook that raises, or a cell that fails an assertion, exits with code 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

LESSONS = Path(__file__).resolve().parents[1] / "lessons"
TIMEOUT_S = 600


def notebooks(names: list[str]) -> list[Path]:
    """The named notebooks, or every lessons/NN_*.ipynb in order."""
    if names:
        return [Path(n) for n in names]
    return sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, save: bool) -> float:
    """Run one notebook top to bottom in its own folder; returns the wall time."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - t0
    if save:
        nbformat.write(nb, path)
    return wall


def build(src: Path, out: Path) -> None:
    """Turn a percent-format script into a notebook (no outputs)."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(
                x[2:] if x.startswith("# ") else x.lstrip("#") for x in text.split("\n")
            )
            cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in src.read_text().split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "check"):
        sub.add_parser(name).add_argument("notebooks", nargs="*")
    b = sub.add_parser("build")
    b.add_argument("src", type=Path)
    b.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.src, args.out)
        return 0
    failed = 0
    for path in notebooks(args.notebooks):
        try:
            wall = execute(path, save=args.cmd == "run")
            print(f"{path.name}: ok, {wall:.1f} s", flush=True)
        except CellExecutionError as e:
            failed += 1
            print(f"{path.name}: FAILED\n{str(e)[-2000:]}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
