"""The cost meter: wall time and peak resident memory of a block."""

import time

import numpy as np
import pytest

from minidpo.cost import measure, rss_bytes


@pytest.mark.skipif(rss_bytes() is None, reason="no /proc/self/statm here")
def test_measure_sees_a_transient_allocation():
    size = 200 * 2**20  # 200 MiB, freed before the block ends
    with measure(interval_s=0.002) as cost:
        a = np.ones(size // 8)
        time.sleep(0.05)
        del a
    assert cost.peak_rss_mb - cost.start_rss_mb >= 0.8 * size / 2**20
    assert 0.05 <= cost.wall_s < 5


def test_measure_wall_time():
    with measure() as cost:
        time.sleep(0.1)
    assert cost.wall_s == pytest.approx(0.1, abs=0.3)
    assert cost.peak_cuda_mb is None
