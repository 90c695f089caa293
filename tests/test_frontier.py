"""The frontier (upper concave hull) and the matched-KL comparison (`minidpo.frontier`)."""

import numpy as np
import pytest

from minidpo.frontier import frontier_at, matched_kl, upper_hull
from minidpo.stats import HOLDS, NOT_HERE, UNDECIDED, above, normal_quantile


def _pts(xy, method="A", seed=0, se=0.01):
    return [{"method": method, "seed": seed, "kl": x, "reward": y, "reward_se": se} for x, y in xy]


def test_hull_known_answer():
    pts = _pts([(0, 0), (1, 0.2), (2, 1.0), (3, 1.1), (4, 0.5), (2, 0.3)])
    assert [(p["kl"], p["reward"]) for p in upper_hull(pts)] == [
        (0, 0),
        (2, 1.0),
        (3, 1.1),
        (4, 0.5),
    ]


def test_hull_lies_on_or_above_every_point_and_is_concave():
    rng = np.random.default_rng(1)
    for _ in range(50):
        pts = _pts(zip(rng.uniform(0, 5, 12).tolist(), rng.normal(size=12).tolist(), strict=True))
        hull = upper_hull(pts)
        x, y = np.array([p["kl"] for p in hull]), np.array([p["reward"] for p in hull])
        assert np.all(np.diff(x) > 0)
        assert np.all(np.diff(np.diff(y) / np.diff(x)) < 1e-12)  # slopes fall: concave
        for p in pts:
            assert p["reward"] <= np.interp(p["kl"], x, y) + 1e-12


def test_frontier_is_linear_between_vertices_and_flat_after_its_peak():
    pts = _pts([(1, 1.0), (3, 2.0), (4, 1.5)], se=0.1)
    r, s = frontier_at(pts, [1, 2, 3, 3.5, 4])
    np.testing.assert_allclose(r, [1.0, 1.5, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(s, [0.1] * 5)


def _method(name, seed, shift, kls):
    rng = np.random.default_rng(seed * 7 + len(name))
    return _pts([(k, np.sqrt(k) + shift + rng.normal(0, 0.01)) for k in kls], name, seed)


def test_no_overlap_cannot_decide():
    pts = [*_method("DPO", 0, 0.0, [0.1, 0.3, 0.5]), *_method("PPO", 0, 0.0, [0.8, 2, 4]),
           {"method": "SFT", "seed": 0, "kl": 0.0, "reward": 0.0, "reward_se": 0.01}]  # fmt: skip
    m = matched_kl(pts, "DPO", "PPO")
    assert m.overlap is None and m.mean_gap is None
    assert m.ranges == {"DPO": (0.1, 0.5), "PPO": (0.8, 4)}


@pytest.mark.parametrize(("shift", "verdict"), [(0.2, HOLDS), (-0.2, NOT_HERE), (0.0, UNDECIDED)])
def test_the_comparison_says_yes_no_or_undecided(shift, verdict):
    """5 seeds; a's frontier is b's moved by `shift`, plus per-seed noise (0.01 each point;
    with shift 0 the noise's sign differs across seeds)."""
    pts = []
    for s in range(5):
        pts += _method("a", s, shift, [0.2, 0.5, 1, 2])
        pts += _method("b", s, 0.0, [0.3, 0.6, 1.5, 3])
    if shift == 0.0:
        pts = [dict(p, reward=p["reward"] + (0.05 if p["seed"] % 2 else -0.05) * (p["method"] == "a"))
               for p in pts]  # fmt: skip
    m = matched_kl(pts, "a", "b")
    assert m.overlap == (0.3, 2)  # from b's first point to a's last, SFT not a stand-in
    assert m.seeds == 5 and m.mean_gap.n == 5
    assert above(m.mean_gap) == verdict
    if shift:
        assert m.mean_gap.mean == pytest.approx(shift, abs=0.05)


def test_one_seed_uses_the_sampling_standard_errors():
    pts = [*_method("a", 0, 0.1, [0.2, 1, 2]), *_method("b", 0, 0.0, [0.2, 1, 2])]
    m = matched_kl(pts, "a", "b")
    assert m.mean_gap.n == 1 and "sampling" in m.mean_gap.over
    assert m.mean_gap.hi - m.mean_gap.lo == pytest.approx(
        2 * normal_quantile(0.975) * np.hypot(0.01, 0.01), rel=1e-6
    )
