"""Intervals and verdicts: how every comparison of the report says "holds", "does not
hold" or "undecided at this power".

An interval is 95 % from the t distribution with n - 1 degrees of freedom over n
independent repeats (seeds), or, where a run has one seed, from the normal distribution
over the sampling standard error alone (and it says so). A verdict compares an interval
with a threshold: it holds where the whole interval is on the claim's side, does not
hold where the whole interval is on the other side, and is undecided otherwise. The
same rule serves a claim in DPO's favour and one against it.

Left out: corrections for many comparisons (each verdict is read on its own, and the
report prints every interval so a reader can apply one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

HOLDS = "holds"
NOT_HERE = "does not hold"
UNDECIDED = "undecided at this power"
INCONCLUSIVE = "inconclusive"  # the experiment's positive control failed: it could not tell
NOT_YET = "not measured yet"

LEVEL = 0.95


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom, by Simpson's rule on the
    density over x = atan-substituted (-pi/2, atan t], which is smooth and bounded."""
    if df == 1:
        return 0.5 + math.atan(t) / math.pi
    if df == 2:
        return 0.5 + t / (2 * math.sqrt(2 + t * t))
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def g(u: float) -> float:  # the density of T at tan(u), times d tan(u) / du
        x = math.tan(u)
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df)) * (1 + x * x)

    a, b, n = -math.pi / 2, math.atan(t), 2000  # n even
    h = (b - a) / n
    s = g(b) + sum((4 if i % 2 else 2) * g(a + i * h) for i in range(1, n))  # g(a) = 0 for df > 1
    return s * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` >= 1 degrees of freedom (bisection on the
    CDF; closed forms for df 1 and 2).

    Example: t_quantile(0.975, 4) is 2.776 (the 95 % interval of 5 seeds)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    lo, hi = -50.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def normal_quantile(p: float) -> float:
    """The p-quantile of the standard normal (bisection on erf)."""
    lo, hi = -40.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """A mean with its 95 % interval, and what the interval is over."""

    mean: float
    lo: float
    hi: float
    n: int
    over: str  # "5 seeds (t, 4 df)", "sampling only (1 seed)"

    def text(self, spec: str = "+.3f") -> str:
        return f"{self.mean:{spec}} [{self.lo:{spec}}, {self.hi:{spec}}]"


def t_interval(xs: Sequence[float], level: float = LEVEL, what: str = "seeds") -> Interval:
    """The mean of `xs` (n >= 2 independent repeats) and its t interval, n - 1 df."""
    n = len(xs)
    if n < 2:
        raise ValueError(f"t_interval: needs at least 2 values, got {n}")
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, f"{n} {what} (t, {n - 1} df)")


def normal_interval(mean: float, se: float, level: float = LEVEL, over: str = "") -> Interval:
    """`mean` ± z * `se`: the interval of one run, from its sampling standard error."""
    half = normal_quantile(0.5 + level / 2) * se
    return Interval(mean, mean - half, mean + half, 1, over or "sampling only (1 seed)")


def seed_interval(xs: Sequence[float], ses: Sequence[float | None] = ()) -> Interval | None:
    """The interval of a quantity measured once per seed: t over the seeds when there are
    two or more, else the one seed's normal interval from its sampling se (None: no se)."""
    if len(xs) >= 2:
        return t_interval(xs)
    if len(xs) == 1 and ses and ses[0] is not None:
        return normal_interval(float(xs[0]), float(ses[0]))
    return None


def bootstrap_interval(
    stat: Callable[[list[list[float]]], float],
    groups: Sequence[Sequence[float]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Percentile bootstrap of ``stat(groups)``: each group (a run's values over seeds) is
    resampled with replacement, `n_boot` times, from a generator seeded with `seed`.

    For statistics without a t interval, such as a spread of seed means. Example: the
    standard deviation of [1, 2, 3] lies in about [0, 1.15] over its bootstrap samples.
    """
    rng = np.random.default_rng(seed)
    point = float(stat([list(g) for g in groups]))
    draws = [float(stat([[g[i] for i in rng.integers(0, len(g), len(g))] for g in groups]))
             for _ in range(n_boot)]  # fmt: skip
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    n = min(len(g) for g in groups)
    return Interval(point, float(lo), float(hi), n, f"{n} seeds (bootstrap, {n_boot} draws)")


def above(iv: Interval | None, threshold: float = 0.0) -> str:
    """The verdict on "the quantity is above `threshold`": HOLDS if the whole interval is
    above it, NOT_HERE if the whole interval is below it, else UNDECIDED (None: NOT_YET)."""
    if iv is None:
        return NOT_YET
    if iv.lo > threshold:
        return HOLDS
    if iv.hi < threshold:
        return NOT_HERE
    return UNDECIDED


def below(iv: Interval | None, threshold: float = 0.0) -> str:
    """The verdict on "the quantity is below `threshold`" (the mirror of `above`)."""
    if iv is None:
        return NOT_YET
    if iv.hi < threshold:
        return HOLDS
    if iv.lo > threshold:
        return NOT_HERE
    return UNDECIDED
