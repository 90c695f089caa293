"""The thread policy: its parsing, its idle-core measurement, and the phases it sets."""

import os
import subprocess
import sys
import time

import pytest
import torch

from minidpo import threads
from minidpo.errors import MinidpoError
from minidpo.threads import Policy, _Snapshot, busy_cores_between, parse_threads


def test_parse_threads(capsys):
    assert parse_threads("auto") is None
    assert parse_threads("1", cores=2) == 1
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(MinidpoError, match="--threads: must be auto or a whole number >= 1"):
            parse_threads(bad)
    assert parse_threads("8", cores=2) == 8  # allowed, with a warning
    assert "--threads 8 is more than the 2 cores here" in capsys.readouterr().err


def test_busy_cores_take_this_process_out():
    def snap(wall, own, busy, total):
        return _Snapshot(wall, own, (busy, total))

    # 1 s on 2 cores = 200 jiffies; 100 busy: one core busy
    assert busy_cores_between(snap(0, 0, 0, 0), snap(1, 0, 100, 200), 2) == pytest.approx(1.0)
    # the same, all of it this process's own: nobody else is busy
    assert busy_cores_between(snap(0, 0, 0, 0), snap(1, 1, 100, 200), 2) == pytest.approx(0.0)
    # everything busy, half of it ours
    assert busy_cores_between(snap(0, 0, 0, 0), snap(1, 1, 200, 200), 2) == pytest.approx(1.0)
    assert busy_cores_between(snap(0, 0, 0, 0), _Snapshot(1, 0, None), 2) == 0.0


def test_fixed_count_and_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.configure("auto").fixed == 1  # the variable people already set
        assert threads.configure("2").fixed == 2  # the flag wins over it
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.configure("auto").fixed is None
        monkeypatch.setenv("OMP_NUM_THREADS", "zero")
        with pytest.raises(MinidpoError, match="OMP_NUM_THREADS: must be auto or"):
            threads.configure("auto")
    finally:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        threads.configure("auto")
        torch.set_num_threads(before)


@pytest.mark.parametrize("busy, expected", [(100, 1), (0, 2)], ids=["one-busy", "quiet"])
def test_sampling_phase_takes_the_idle_cores_then_restores(monkeypatch, busy, expected):
    before = torch.get_num_threads()
    # two looks at /proc/stat 1 s apart on 2 cores (200 jiffies): `busy` of them taken
    looks = iter([_Snapshot(0, 0, (0, 0)), _Snapshot(1, 0, (busy, 200))])
    monkeypatch.setattr(threads, "_snapshot", lambda: next(looks))
    monkeypatch.setattr(threads, "WINDOW_S", 0.0)
    monkeypatch.setattr(threads.POLICY, "cores", 2)
    try:
        threads.configure("auto")
        with threads.sampling():
            assert torch.get_num_threads() == expected
        assert torch.get_num_threads() == before
        threads.configure("3")
        with threads.sampling():  # a fixed count is used everywhere
            assert torch.get_num_threads() == 3
    finally:
        threads.configure("auto")
        torch.set_num_threads(before)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_a_busy_core_is_seen_and_left_alone():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        n = Policy().training_threads()
    finally:
        busy.kill()
        busy.wait()
    assert n < (os.cpu_count() or 1)
