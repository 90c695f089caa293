"""The performance benchmark: the pipeline quiet and with one core busy, under each thread
setting, and the step and sampling ratios, into one JSON.

    python scripts/benchmark.py [--preset cpu] [--configs quiet:auto,busy:auto,quiet:1,quiet:2]
                                [--repeat 1] [--micro] [--sweep] [--out FILE.json]

Each config is LOAD:THREADS[:glibc]. LOAD ``busy`` starts a busy-loop process (one core
spinning, started and stopped by this script) for the run; THREADS is passed as
``--threads`` (``auto``: the default policy of `minidpo.threads`); a third part
``glibc`` runs with ``MINIDPO_MALLOC=default`` (glibc's malloc as it comes, not
`minidpo.allocator`'s setting: the before of that change). Every config runs
``--command`` (``demo``, the default: what `make demo` runs, SFT then DPO against RM +
PPO; or ``pipeline``: every method) `--repeat` times, interleaved (config after config,
then again), each in a fresh run folder (removed first: a benchmark measures a cold run,
set-up excluded), and reads each stage's wall time and peak memory from the stamps it
wrote and SFT's training seconds from its summary. It prints the medians beside the
targets: the run in 5 minutes or less and SFT training in 120 s (quiet, auto), the run
with one core busy at most 1.5x its quiet time, and the quiet auto time within 15 % of
the best quiet setting. ``--micro`` adds, on the last run's SFT policy, a training step
beside transformers' GPT-2 and a DPO step beside an SFT step on the same rows
(`bench_steps.py`), sampling with the KV cache beside no cache and transformers'
generate (`bench_generate.py`), and both with glibc's malloc as it comes against
`minidpo.allocator`'s setting (`bench_allocator.py`). With ``--sweep``, `minidpo sweep`
then runs once on the last run's folder (target: 90 minutes). Run it on a quiet
machine: on 2 cores, anything else running slows torch several-fold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from minidpo.allocator import keep_freed_memory


def stage_costs(folder: Path) -> dict[str, dict]:
    """Stage name -> cost dict, from the stamps in ``stages/``."""
    out = {}
    for p in sorted((folder / "stages").glob("*.json")):
        out[p.stem] = json.loads(p.read_text())["cost"]
    return out


def timed(cmd: list[str], malloc: str = "keep") -> float:
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # --threads decides
    env["MINIDPO_MALLOC"] = malloc
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


@contextlib.contextmanager
def load(kind: str) -> Iterator[None]:
    """``busy``: one process spinning on a core for the block; ``quiet``: nothing."""
    if kind not in ("quiet", "busy"):
        raise SystemExit(f"benchmark: a config's load is quiet or busy, got {kind!r}")
    spin = None
    if kind == "busy":
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # running before the pipeline looks at the idle cores
    try:
        yield
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()


def one_pipeline(
    base: list[str], common: list[str], folder: Path, malloc: str, command: str = "demo"
) -> dict:
    """One cold run of `command`: total wall, per-stage costs, SFT's training seconds."""
    shutil.rmtree(folder, ignore_errors=True)
    wall = timed([*base, command, *common], malloc)
    sft = json.loads((folder / "sft" / "summary.json").read_text())
    return {"wall_s": wall, "sft_train_s": sft["wall_s"], "stages": stage_costs(folder)}


def summarize(reps: list[dict]) -> dict:
    """Medians over the repeats of one config: the pipeline, SFT training, each stage."""
    return {
        "pipeline_wall_s": statistics.median(r["wall_s"] for r in reps),
        "sft_train_s": statistics.median(r["sft_train_s"] for r in reps),
        "runs_wall_s": [r["wall_s"] for r in reps],
        "stages": {
            name: {
                "wall_s": statistics.median(r["stages"][name]["wall_s"] for r in reps),
                "peak_rss_mb": max(r["stages"][name]["peak_rss_mb"] or 0 for r in reps),
            }
            for name in reps[-1]["stages"]
        },
    }


def thread_ratios(configs: dict[str, dict]) -> dict[str, float]:
    """Each config's pipeline time over quiet:auto's, and the two targets' ratios."""
    wall = {c: r["pipeline_wall_s"] for c, r in configs.items()}
    if "quiet:auto" not in wall:
        return {}
    out = {f"pipeline {c} / quiet:auto": w / wall["quiet:auto"] for c, w in wall.items()}
    if "busy:auto:glibc" in wall and "quiet:auto:glibc" in wall:
        out["pipeline busy:auto:glibc / quiet:auto:glibc"] = (
            wall["busy:auto:glibc"] / wall["quiet:auto:glibc"]
        )
    quiet = [w for c, w in wall.items() if c.startswith("quiet:") and c.count(":") == 1]
    out["pipeline quiet:auto / best quiet"] = wall["quiet:auto"] / min(quiet)
    return out


def micro(checkpoint: Path, repeat: int) -> tuple[dict, dict, dict[str, float]]:
    """The step and sampling benchmarks on `checkpoint`, and their ratios."""
    import bench_allocator
    import bench_generate
    import bench_steps

    args = bench_steps.parser().parse_args(["--checkpoint", str(checkpoint), "--repeat",
                                            str(repeat)])  # fmt: skip
    steps = bench_steps.measure(args)
    gen = bench_generate.measure(str(checkpoint), repeat=repeat)
    g = gen["ratio_to_generate"]  # per-round ratios: this way / minidpo generate
    ratios = {
        "sft step / transformers GPT-2 step": steps["ratios"]["minidpo sft step / reference"],
        "dpo step / sft step on the same rows": steps["ratios"][
            "dpo step / sft step on the same 2B rows"
        ],
        "sampling: no cache / kv cache": g["no cache"],
        "sampling: transformers generate / minidpo": g["transformers generate"],
        "sampling: previous loop / minidpo": g["previous loop"],
        "sampling: bare decode loop / minidpo": g["bare decode loop"],
        "sampling: sampling step alone / minidpo": g["sampling step alone"],
    }
    alloc = bench_allocator.measure(str(checkpoint), repeat=repeat)
    ratios.update({f"allocator, {k}": v for k, v in alloc["ratios"].items()})
    return steps, {**gen, "allocator": alloc}, ratios


def verdicts(result: dict) -> list[str]:
    """One line per target: the measured value, the target, met or MISSED."""
    rows, quiet = [], result["configs"].get("quiet:auto")
    ratios = result["ratios"]
    checks = [
        ("sft training, quiet:auto", quiet and quiet["sft_train_s"], 120.0, "s"),
        (f"{result['run']}, quiet:auto", quiet and quiet["pipeline_wall_s"], 300.0, "s"),
        ("pipeline busy:auto / quiet:auto", ratios.get("pipeline busy:auto / quiet:auto"), 1.5, "x"),
        ("pipeline quiet:auto / best quiet", ratios.get("pipeline quiet:auto / best quiet"), 1.15,
         "x"),
        ("sweep", result.get("sweep_wall_s"), 5400.0, "s"),
    ]  # fmt: skip
    for what, value, target, unit in checks:
        if value is not None:
            verdict = "met" if value <= target else "MISSED"
            rows.append(f"{what}: {value:.2f}{unit} (target {target:g}{unit}: {verdict})")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--name", default="bench")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--configs", default="quiet:auto", help="LOAD:THREADS[:glibc],... (see above)")
    p.add_argument("--command", choices=("demo", "pipeline"), default="demo",
                   help="what each cold run runs (demo: what `make demo` runs)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="cold pipeline runs per config")
    p.add_argument("--micro", action="store_true", help="also the step and sampling ratios")
    p.add_argument("--micro-repeat", type=int, default=9)
    p.add_argument("--sweep", action="store_true", help="also time the frontier sweep (once)")
    p.add_argument("--out", help="write the measurements as JSON here")
    args = p.parse_args(argv)
    keep_freed_memory()  # the micro benchmarks run in this process: as the command line does
    if args.repeat < 1:
        p.error(f"--repeat: must be >= 1, got {args.repeat}")
    configs = args.configs.split(",")
    for c in configs:
        parts = c.split(":")
        tail_ok = parts[2:] in ([], ["glibc"])
        if len(parts) not in (2, 3) or parts[0] not in ("quiet", "busy") or not tail_ok:
            p.error(f"--configs: {c!r} is not LOAD:THREADS[:glibc] with LOAD quiet or busy")
    folder = Path(args.runs_dir) / args.name
    base = [sys.executable, "-m", "minidpo"]
    common = ["--preset", args.preset, "--name", args.name, "--runs-dir", args.runs_dir]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeat):  # interleaved: every config, then again
        for c in configs:
            kind, threads, *glibc = c.split(":")
            malloc = "default" if glibc else "keep"
            with load(kind):
                runs[c].append(one_pipeline(base, [*common, "--threads", threads], folder, malloc,
                                            args.command))  # fmt: skip
    result: dict = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "preset": args.preset,
        "run": f"minidpo {args.command}",
        "configs": {c: summarize(r) for c, r in runs.items()},
    }
    result["ratios"] = thread_ratios(result["configs"])
    if args.micro:
        steps, gen, ratios = micro(folder / "sft" / "checkpoint.pt", args.micro_repeat)
        result.update(steps=steps, generation=gen)
        result["ratios"].update(ratios)
    if args.sweep:
        result["sweep_wall_s"] = timed([*base, "sweep", *common])
        timing = json.loads((folder / "sweep" / "timing.json").read_text())
        result["sweep_stages"] = timing["stages"]
    rows = [
        f"{'config':<14} {'pipeline (s)':>13} {'sft train (s)':>14}   ({args.repeat} cold runs)"
    ]
    for c, r in result["configs"].items():
        rows.append(f"{c:<14} {r['pipeline_wall_s']:>13.1f} {r['sft_train_s']:>14.1f}")
    rows += [f"{k}: {v:.2f}x" for k, v in result["ratios"].items()]
    print("\n".join(rows + verdicts(result)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
