"""Copy a run's small result files (no checkpoints, no samples) into a folder to commit.

    python scripts/publish_results.py runs/cpu docs/results/cpu

Copies what the report, the ledger and the lessons read: ``report.md``, ``pipeline.json``,
the plots, every stage stamp, ``eval/results.json``, each run's ``summary.json`` and
``metrics.jsonl``, the sweep's ``points.json``, ``limits.json`` and ``timing.json``, each
seed's DPO-family metrics and summaries and its pairs' and reward model's summaries, the
held-out pairs' reference log-probs (the displacement table's baseline) and Best-of-N's
curve. The destination is replaced whole, so nothing of an earlier run is left in it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP = (
    "report.md",
    "pipeline.json",
    "plots/*.png",
    "stages/*.json",
    "eval/results.json",
    "*/summary.json",
    "*/metrics.jsonl",
    "prefs/eval.ref-*.pt",
    "best-of-n/curve.json",
    "sweep/*.json",
    "sweep/seed*/*/summary.json",
    "sweep/seed*/*/metrics.jsonl",
)
LEAVE_OUT = ("sweep/seed*/limits-*",)  # the limits runs: their table is sweep/limits.json


def files(src: Path) -> list[Path]:
    """The files of `src` that KEEP names and LEAVE_OUT does not."""
    out = {p for pattern in KEEP for p in src.glob(pattern) if p.is_file()}
    drop = {p for pattern in LEAVE_OUT for d in src.glob(pattern) for p in d.rglob("*")}
    return sorted(out - drop)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/publish_results.py RUN_FOLDER DEST", file=sys.stderr)
        return 2
    src, dest = Path(argv[0]), Path(argv[1])
    if not (src / "report.md").is_file():
        print(f"{src}: no report.md: not a finished run folder", file=sys.stderr)
        return 2
    chosen = files(src)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in chosen:
        target = tmp / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    print(f"{len(chosen)} files from {src} to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
