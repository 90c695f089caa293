"""How many threads torch uses: a policy measured on a 2-core machine, not guessed.

What it rests on (measured side by side on a 2-core machine when issue 15 was filed;
the policy's own end-to-end measurement, ``scripts/benchmark.py``, is in the README):
- training steps run 1.6-1.8 times faster on 2 threads than on 1 on a quiet machine, but
  3.5 times slower when another process keeps one core busy: torch's threads wait for
  each other at every operation, and one of them waits for the busy core;
- batched sampling lost 4.6x on 2 threads with a core busy. Quiet, 2 threads gained only
  1.08x then, which made the first policy sample on 1 thread; once the allocator stopped
  the page faults (`minidpo.allocator`), the benchmark's quiet pipeline on 2 threads
  everywhere beat it by 1.23x, most of it in the sampling stages (evaluation 84 s
  against 126 s), so sampling now follows the same rule as training.

So the policy (``--threads auto``, the default): training and sampling phases
(`sampling_threads`, every ``sample_responses``) run on every core that is idle,
measured from ``/proc/stat`` over a short window at the start of each stage and again
every few hundred steps (`Policy.refresh`) or at each sampling phase, with this
process's own CPU time taken out, so its own threads never count as busy.

Under torchrun, which sets ``OMP_NUM_THREADS=1`` for its processes unless it is set
already, each process trains on that many threads.

``--threads N`` uses N threads everywhere, as does ``OMP_NUM_THREADS`` (the variable
people already set for torch) when ``--threads`` is not given. On a system without
``/proc/stat`` the policy sees every core as idle.

Reproducibility: a training step's float32 sums depend on the thread count (on this
machine 20 AdamW steps at 1 and at 2 threads end with weights that differ in the last
bits), so under ``auto`` a run on a busy machine can differ in the last bits from one
on a quiet machine. ``--threads N`` gives the same bits whatever the load. Sampling at 1
thread gave the same tokens as at 2 on 1,152 rows of the cpu SFT policy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minidpo.errors import MinidpoError

WINDOW_S = 0.25  # the idle-core measurement's window when there is no recent one
REFRESH_EVERY = 250  # training steps between two looks at the idle cores
ENV = "OMP_NUM_THREADS"


def parse_threads(value: str, cores: int | None = None, flag: str = "--threads") -> int | None:
    """None for "auto", else the count; a count above the cores is a warning, not an error."""
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise MinidpoError(f"{flag}: must be auto or a whole number >= 1, got {value!r}")
    n, cores = int(value), cores or os.cpu_count() or 1
    if n > cores:
        print(f"minidpo: warning: {flag} {n} is more than the {cores} cores here", file=sys.stderr)
    return n


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            values = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class _Snapshot:
    wall: float
    own: float
    cpu: tuple[float, float] | None


def _snapshot() -> _Snapshot:
    return _Snapshot(time.monotonic(), _own_cpu_s(), _cpu_times())


def busy_cores_between(a: _Snapshot, b: _Snapshot, cores: int) -> float:
    """Cores kept busy by other processes between two snapshots (0 .. cores)."""
    if a.cpu is None or b.cpu is None or b.cpu[1] <= a.cpu[1]:
        return 0.0
    busy_share = (b.cpu[0] - a.cpu[0]) / (b.cpu[1] - a.cpu[1])  # of all cores
    own = (b.own - a.own) / max(b.wall - a.wall, 1e-9)  # cores this process used
    return min(float(cores), max(0.0, busy_share * cores - own))


class Policy:
    """The process's thread policy; `configure` sets it from ``--threads``."""

    def __init__(self, fixed: int | None = None, cores: int | None = None) -> None:
        self.fixed = fixed
        self.cores = cores or os.cpu_count() or 1
        self._last: _Snapshot | None = None

    def training_threads(self, wait: bool = True) -> int:
        """Threads for training: the fixed count, or the idle cores since the last
        measurement (a fresh `WINDOW_S` one when there is none, if `wait`)."""
        if self.fixed is not None:
            return self.fixed
        now = _snapshot()
        if self._last is None or now.wall - self._last.wall < WINDOW_S / 2:
            if not wait:
                return torch.get_num_threads()
            start = now
            time.sleep(WINDOW_S)
            now = _snapshot()
        else:
            start = self._last
        self._last = now
        return max(1, self.cores - round(busy_cores_between(start, now, self.cores)))

    def refresh(self) -> None:
        """Set torch's threads for training (a stage's start, and every few hundred steps)."""
        n = self.training_threads(wait=self._last is None)
        if n != torch.get_num_threads():
            torch.set_num_threads(n)

    def tick(self, step: int) -> None:
        """`refresh` every `REFRESH_EVERY` steps of a training loop."""
        if step and step % REFRESH_EVERY == 0:
            self.refresh()

    def sampling_threads(self) -> int:
        """Threads for a sampling phase: as for training, the idle cores (measured once
        if there is no measurement yet)."""
        return self.training_threads(wait=self._last is None)


POLICY = Policy(fixed=None)


def configure(threads: str) -> Policy:
    """The policy of ``--threads`` ("auto" or N); "auto" defers to OMP_NUM_THREADS if set."""
    fixed = parse_threads(threads)
    if fixed is None and os.environ.get(ENV):
        fixed = parse_threads(os.environ[ENV], flag=ENV)
    POLICY.fixed = fixed
    POLICY._last = None
    if fixed is not None:
        torch.set_num_threads(fixed)
    return POLICY


@contextlib.contextmanager
def sampling() -> Iterator[None]:
    """Run the block (a sampling phase) on the policy's sampling threads, then restore."""
    before = torch.get_num_threads()
    n = POLICY.sampling_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
