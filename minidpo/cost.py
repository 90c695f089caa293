"""What a stage costs: wall time and peak memory, measured while it runs.

`measure()` wraps a stage. Wall time is ``time.perf_counter``. Peak memory is
the peak of the process's resident set size (RSS) during the stage, read from
``/proc/self/statm`` every 10 ms by a background thread (CPU), or
``torch.cuda.max_memory_allocated`` after a reset (CUDA). Where neither can be
read (no /proc), it is left as None rather than guessed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """The process's current resident set size, or None where /proc is absent."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Cost:
    """One stage's measured cost."""

    wall_s: float = 0.0
    peak_rss_mb: float | None = None  # host memory, the whole process
    start_rss_mb: float | None = None  # the same at the stage's start
    peak_cuda_mb: float | None = None  # device memory allocated by torch


@contextmanager
def measure(device: torch.device | str = "cpu", interval_s: float = 0.01) -> Iterator[Cost]:
    """Measure the wall time and peak memory of the block; fills the yielded Cost."""
    cost = Cost()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    peak = [rss_bytes()]
    cost.start_rss_mb = None if peak[0] is None else peak[0] / 2**20
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            now = rss_bytes()
            if now is not None and (peak[0] is None or now > peak[0]):
                peak[0] = now

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            cost.peak_cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
        cost.wall_s = time.perf_counter() - t0
        stop.set()
        watcher.join()
        last = rss_bytes()
        if last is not None and peak[0] is not None:
            peak[0] = max(peak[0], last)
        cost.peak_rss_mb = None if peak[0] is None else peak[0] / 2**20
