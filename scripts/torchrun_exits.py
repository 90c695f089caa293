"""Does a torchrun run end cleanly, every time? Repeated 2-process tiny SFT runs.

    python scripts/torchrun_exits.py [--runs 45] [--dir /tmp/minidpo-exits]

Each run is `torchrun --standalone --nproc-per-node 2 -m minidpo sft --preset tiny` in a
fresh runs folder, its output captured to pipes as the tests capture it (1 thread per
rank). A run whose exit code is not 0 is counted, and its output kept in the folder
(`failed-<i>.txt`). Before ranks ended with `os._exit` (`minidpo.distributed.end_process`),
3 of 80 runs aborted at exit this way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(runs: Path) -> subprocess.CompletedProcess:
    shutil.rmtree(runs, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONFAULTHANDLER": "1"}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "minidpo", "sft", "--preset", "tiny",
               "--runs-dir", str(runs), "--name", "exits"]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=45, help="how many runs (default 45)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/minidpo-exits"),
                        help="the scratch folder (default /tmp/minidpo-exits)")  # fmt: skip
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: must be at least 1")
    args.dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for i in range(args.runs):
        result = one_run(args.dir / "runs")
        if result.returncode:
            failed += 1
            (args.dir / f"failed-{i}.txt").write_text(f"{result.stdout}\n=====\n{result.stderr}")
            print(f"run {i}: exit code {result.returncode}", flush=True)
    print(f"{failed} of {args.runs} runs failed")


if __name__ == "__main__":
    main()
