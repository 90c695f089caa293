"""glibc's malloc as it comes against `minidpo.allocator`'s setting, side by side.

    python scripts/bench_allocator.py --checkpoint runs/cpu/sft/checkpoint.pt [--repeat 9]
                                      [--out FILE.json]

The allocator is process-wide and cannot be set back, so each setting gets its own
worker process (``keep``: `minidpo.allocator.keep_freed_memory`, as the command line
does; ``default``: glibc untouched), both loaded with the same checkpoint. The parent
asks them in turn for one timing of each way, round after round (interleaved, so a slow
minute of the machine hits both; which setting goes first alternates by round), and
reports medians:

    generate        minidpo's batched sampling, 64 rows x 64 new tokens, 1 thread, as
                    in `bench_generate.py`
    previous loop   the loop before the preallocated cache (cache grown by
                    concatenation, mask rebuilt every step): with ``default`` this is
                    sampling as it was when issue 15 was filed
    sft step        one SFT training step at the preset's batch (`bench_steps.py`), on
                    every core
    dpo step        one DPO step on the same batch as pairs, on every core

Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

WAYS = ("generate", "previous loop", "sft step", "dpo step")
SETTINGS = ("keep", "default")


def _worker(conn, setting: str, checkpoint: str) -> None:
    """One process: apply `setting`, build every way, then time whichever way is asked."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root), str(root / "scripts"), str(root / "tests")]
    os.environ["MINIDPO_MALLOC"] = setting
    from minidpo.allocator import keep_freed_memory

    applied = keep_freed_memory()
    import torch
    from bench_generate import workload
    from bench_steps import ways as step_ways
    from test_model import _generate_before

    from minidpo.checkpoints import load_checkpoint
    from minidpo.sampling import generate

    model, _, prompts, kw = workload(checkpoint)
    batch = int(load_checkpoint(checkpoint, kind="policy")["stage_config"]["sft"]["batch_size"])
    steps, _ = step_ways(Path(checkpoint), batch, 64, "cpu", False, False)
    cores = os.cpu_count() or 1
    no_grad, grad = torch.no_grad, contextlib.nullcontext
    table = {  # way -> (threads, gradient mode, function)
        "generate": (1, no_grad, lambda: generate(model, prompts, **kw)),
        "previous loop": (1, no_grad, lambda: _generate_before(model, prompts, **kw)),
        "sft step": (cores, grad, steps["minidpo sft step"][0]),
        "dpo step": (cores, grad, steps["minidpo dpo step"][0]),
    }
    conn.send(applied)
    while (way := conn.recv()) is not None:
        threads, mode, fn = table[way]
        torch.set_num_threads(threads)
        with mode():
            t0 = time.perf_counter()
            fn()
            conn.send(time.perf_counter() - t0)


def measure(checkpoint: str, repeat: int = 9, warmup: int = 2) -> dict:
    """Interleaved medians per (setting, way), and the ratios default / keep."""
    ctx = mp.get_context("spawn")
    workers = {}
    for s in SETTINGS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, s, checkpoint), daemon=True)
        proc.start()
        workers[s] = (parent, proc)
    applied = {s: conn.recv() for s, (conn, _) in workers.items()}
    times: dict[str, dict[str, list[float]]] = {s: {w: [] for w in WAYS} for s in SETTINGS}
    try:
        for r in range(warmup + repeat):
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]  # neither always goes first
            for way in WAYS:
                for s in order:
                    time.sleep(0.05)  # the other worker's threads stop spinning
                    conn = workers[s][0]
                    conn.send(way)
                    t = conn.recv()
                    if r >= warmup:
                        times[s][way].append(t)
    finally:
        for conn, proc in workers.values():
            conn.send(None)
            proc.join(timeout=30)
    med = {s: {w: statistics.median(v) for w, v in ws.items()} for s, ws in times.items()}
    return {
        "applied": applied,
        "median_s": med,
        "runs_s": times,
        "ratios": {
            **{f"{w}: default / keep": med["default"][w] / med["keep"][w] for w in WAYS},
            "sampling as at issue 15 (previous loop, default) / now (generate, keep)": (
                med["default"]["previous loop"] / med["keep"]["generate"]
            ),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--out")
    a = ap.parse_args()
    result = measure(a.checkpoint, a.repeat)
    for s in SETTINGS:
        for w, v in result["median_s"][s].items():
            print(f"{s:<8} {w:<14} {v * 1000:8.1f} ms")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x")
    if a.out:
        out = {"command": " ".join(["python", *sys.argv]), **result}
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
