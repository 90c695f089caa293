"""Wall time of every stage of the pipeline (and of the sweep), against the targets.

    python scripts/benchmark.py [--preset cpu] [--name bench] [--repeat 3] [--sweep] [--out FILE.json]

Runs `minidpo pipeline` `--repeat` times, each in a fresh run folder (removed first:
a benchmark measures a cold run, set-up excluded), reads each stage's wall time and
peak memory from the stamps it wrote and SFT's training seconds from its summary,
and prints the median of every number over the repeats beside the targets: SFT
training in 120 s or less, the whole default pipeline in 5 minutes or less. With
--sweep, `minidpo sweep` then runs once on the last pipeline's folder (target: 30
minutes). Run it on a quiet machine: on 2 cores, anything else running slows torch
several-fold.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# (printed name, result key, target seconds, the per-run key of `one_pipeline` or None)
TARGETS = [
    ("sft training", "sft_train_s", 120.0, "sft_train_s"),
    ("pipeline", "pipeline_wall_s", 300.0, "wall_s"),
    ("sweep", "sweep_wall_s", 1800.0, None),
]


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


def one_pipeline(base: list[str], common: list[str], folder: Path) -> dict:
    """One cold pipeline run: total wall, per-stage costs, SFT's training seconds."""
    shutil.rmtree(folder, ignore_errors=True)
    wall = timed([*base, "pipeline", *common])
    sft = json.loads((folder / "sft" / "summary.json").read_text())
    return {"wall_s": wall, "sft_train_s": sft["wall_s"], "stages": stage_costs(folder)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--name", default="bench")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--repeat", type=int, default=3, help="cold pipeline runs (medians reported)")
    p.add_argument("--sweep", action="store_true", help="also time the frontier sweep (once)")
    p.add_argument("--out", help="write the measurements as JSON here")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat: must be >= 1, got {args.repeat}")
    folder = Path(args.runs_dir) / args.name
    base = [sys.executable, "-m", "minidpo"]
    common = ["--preset", args.preset, "--name", args.name, "--runs-dir", args.runs_dir]
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "preset": args.preset,
        "repeats": [one_pipeline(base, common, folder) for _ in range(args.repeat)],
    }
    reps = result["repeats"]
    result["pipeline_wall_s"] = statistics.median(r["wall_s"] for r in reps)
    result["sft_train_s"] = statistics.median(r["sft_train_s"] for r in reps)
    result["pipeline_stages"] = {
        name: {
            "wall_s": statistics.median(r["stages"][name]["wall_s"] for r in reps),
            "peak_rss_mb": max(r["stages"][name]["peak_rss_mb"] or 0 for r in reps),
        }
        for name in reps[-1]["stages"]
    }
    if args.sweep:
        result["sweep_wall_s"] = timed([*base, "sweep", *common])
        timing = json.loads((folder / "sweep" / "timing.json").read_text())
        result["sweep_stages"] = timing["stages"]
    n = len(reps)
    rows = [f"{'stage':<40} {'median wall (s)':>16} {'peak RSS (MB)':>14}   ({n} cold runs)"]
    for name, c in result["pipeline_stages"].items():
        rows.append(f"{name:<40} {c['wall_s']:>16.1f} {c['peak_rss_mb']:>14.0f}")
    for what, key, target, per_run in TARGETS:
        if key in result:
            wall = result[key]
            verdict = "met" if wall <= target else "MISSED"
            runs = f", runs: {', '.join(f'{r[per_run]:.0f}' for r in reps)}" if per_run else ""
            rows.append(f"{what}: {wall:.0f} s (target {target:.0f} s: {verdict}{runs})")
    print("\n".join(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
