"""The reward-KL frontier of a method, and two methods compared where both have points.

A method's points are its evaluated snapshots (oracle reward against KL(pi || pi_ref)),
every setting of it together. A mixture of two of its policies reaches the chord between
their points or better (reward is linear in the mixture weight, KL convex), so the
frontier is the upper concave hull of the points, taken as "the best reward within a KL
budget k": non-decreasing, flat after its peak, and defined only from the method's
smallest KL to its largest. SFT is nobody's point: a method is compared only where it
has points of its own.

`matched_kl` compares method a with method b on the KLs where every seed of both has
a frontier: the gap a - b at evenly spaced KLs in that overlap and its mean over it,
each with a 95 % interval over seeds (paired: seed s of both methods trained on seed s's
pairs and reward model), or from the sampling standard errors alone with one seed.
No overlap: None for the interval, and the report says the run cannot decide.

Left out: the bias of a frontier toward a method with more points (a maximum of noisy
points is biased upward); the report prints how many points each method has.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minidpo.stats import Interval, normal_interval, t_interval

Point = dict[str, Any]  # {"kl", "reward", "reward_se", "seed", ...}


def upper_hull(points: Sequence[Point]) -> list[Point]:
    """The upper concave hull of (kl, reward), left to right (Andrew's monotone chain)."""
    hull: list[Point] = []
    for p in sorted(points, key=lambda p: (p["kl"], p["reward"])):
        while hull and hull[-1]["kl"] == p["kl"]:
            hull.pop()  # same KL: the higher reward (sorted last) stays
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = (
                (hull[-2]["kl"], hull[-2]["reward"]),
                (hull[-1]["kl"], hull[-1]["reward"]),
            )
            if (x2 - x1) * (p["reward"] - y1) - (y2 - y1) * (p["kl"] - x1) >= 0:
                hull.pop()  # the middle point is on or below the chord
            else:
                break
        hull.append(p)
    return hull


def frontier_at(points: Sequence[Point], kls: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(reward, sampling se) of the frontier of `points` at each KL in `kls` (all within
    the points' range): linear between hull vertices up to the highest one, flat after."""
    hull = upper_hull(points)
    peak = max(range(len(hull)), key=lambda i: hull[i]["reward"])
    rising = hull[: peak + 1]
    x = np.array([p["kl"] for p in rising])
    y = np.array([p["reward"] for p in rising])
    s = np.array([p.get("reward_se") or 0.0 for p in rising])
    k = np.asarray(kls, dtype=float)
    if len(rising) == 1:
        return np.full(len(k), y[0]), np.full(len(k), s[0])
    return np.interp(k, x, y), np.interp(k, x, s)  # beyond the peak: np.interp holds the end


@dataclass
class MatchedKL:
    """Method a against method b on the KLs where both have points."""

    a: str
    b: str
    seeds: int
    points: dict[str, int]  # method -> points (all seeds)
    ranges: dict[str, tuple[float, float]]  # method -> (smallest, largest) KL of its points
    overlap: tuple[float, float] | None  # None: no KL where both have points
    kls: list[float] = field(default_factory=list)
    gaps: list[Interval] = field(default_factory=list)  # a - b at each of `kls`
    mean_gap: Interval | None = None  # a - b averaged over the overlap

    def where(self) -> str:
        """The gaps as text: "+0.09 [+0.05, +0.13] at KL 0.52, ..."."""
        return ", ".join(
            f"{g.text('+.2f')} at KL {k:.2f}" for k, g in zip(self.kls, self.gaps, strict=True)
        )


GRID = 5  # KLs at which the gap is reported
MEAN_GRID = 41  # KLs over which the mean gap is taken


def matched_kl(points: Sequence[Point], a: str, b: str) -> MatchedKL:
    """Compare method `a` with method `b` (their ``method`` fields) on the overlap of
    their KL ranges, every seed of each (see the module docstring)."""
    by: dict[str, dict[int, list[Point]]] = {a: defaultdict(list), b: defaultdict(list)}
    for p in points:
        if p["method"] in by:
            by[p["method"]][int(p.get("seed", 0))].append(p)
    seeds = sorted(set(by[a]) & set(by[b]))
    counts = {m: sum(len(v) for v in by[m].values()) for m in (a, b)}
    ranges = {m: r for m in (a, b) if (r := kl_range(points, m)) is not None}
    out = MatchedKL(a, b, len(seeds), counts, ranges, None)
    if not seeds:
        return out
    lo = max(min(p["kl"] for p in by[m][s]) for m in (a, b) for s in seeds)
    hi = min(max(p["kl"] for p in by[m][s]) for m in (a, b) for s in seeds)
    if not hi > lo:
        return out
    out.overlap = (lo, hi)
    out.kls = np.linspace(lo, hi, GRID).tolist()
    fine = np.linspace(lo, hi, MEAN_GRID)
    per_seed, per_seed_mean, ses, mean_ses = [], [], [], []
    for s in seeds:
        (ra, sa), (rb, sb) = frontier_at(by[a][s], out.kls), frontier_at(by[b][s], out.kls)
        (fa, fsa), (fb, fsb) = frontier_at(by[a][s], fine), frontier_at(by[b][s], fine)
        per_seed.append(ra - rb)
        per_seed_mean.append(float(np.mean(fa - fb)))
        ses.append(np.hypot(sa, sb))
        mean_ses.append(float(np.mean(np.hypot(fsa, fsb))))  # as if fully correlated: wider
    if len(seeds) >= 2:
        d = np.array(per_seed)  # (seeds, GRID)
        out.gaps = [t_interval(d[:, j].tolist()) for j in range(GRID)]
        out.mean_gap = t_interval(per_seed_mean)
    else:
        out.gaps = [
            normal_interval(float(g), float(se)) for g, se in zip(per_seed[0], ses[0], strict=True)
        ]
        out.mean_gap = normal_interval(per_seed_mean[0], mean_ses[0])
    return out


def kl_range(points: Sequence[Point], method: str) -> tuple[float, float] | None:
    """The smallest and largest KL among a method's points (every seed)."""
    kls = [p["kl"] for p in points if p["method"] == method]
    return (min(kls), max(kls)) if kls else None
