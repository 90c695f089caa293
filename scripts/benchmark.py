"""Wall time of every stage of the pipeline (and of the sweep), against the targets.

    python scripts/benchmark.py [--preset cpu] [--name bench] [--sweep] [--out FILE.json]

Runs `minidpo pipeline` (then `minidpo sweep` with --sweep) in a fresh run folder
(removed first: a benchmark measures a cold run, set-up excluded), reads each stage's
wall time and peak memory from the stamps it wrote, and prints one table with the
targets: the whole default pipeline in 5 minutes or less, the 3-seed sweep in 30.
Run it on a quiet machine: on 2 cores, anything else running slows torch several-fold.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

TARGETS_S = {"pipeline": 300.0, "sweep": 1800.0}


def stage_costs(folder: Path) -> dict[str, dict]:
    """Stage name -> cost dict, from the stamps in ``stages/``."""
    out = {}
    for p in sorted((folder / "stages").glob("*.json")):
        out[p.stem] = json.loads(p.read_text())["cost"]
    return out


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--name", default="bench")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--sweep", action="store_true", help="also time the frontier sweep")
    p.add_argument("--out", help="write the measurements as JSON here")
    args = p.parse_args(argv)
    folder = Path(args.runs_dir) / args.name
    shutil.rmtree(folder, ignore_errors=True)
    base = [sys.executable, "-m", "minidpo"]
    common = ["--preset", args.preset, "--name", args.name, "--runs-dir", args.runs_dir]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "preset": args.preset,
    }
    result["pipeline_wall_s"] = timed([*base, "pipeline", *common])
    result["pipeline_stages"] = stage_costs(folder)
    if args.sweep:
        result["sweep_wall_s"] = timed([*base, "sweep", *common])
        timing = json.loads((folder / "sweep" / "timing.json").read_text())
        result["sweep_stages"] = timing["stages"]
    rows = [f"{'stage':<40} {'wall (s)':>9} {'peak RSS (MB)':>14}"]
    for name, c in result["pipeline_stages"].items():
        rows.append(f"{name:<40} {c['wall_s']:>9.1f} {c['peak_rss_mb'] or 0:>14.0f}")
    for what in ("pipeline", "sweep"):
        if f"{what}_wall_s" in result:
            wall, target = result[f"{what}_wall_s"], TARGETS_S[what]
            verdict = "met" if wall <= target else "MISSED"
            rows.append(f"{what}: {wall:.0f} s (target {target:.0f} s: {verdict})")
    print("\n".join(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
