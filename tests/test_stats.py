"""Intervals and three-way verdicts (`minidpo.stats`) against closed forms and tables."""

import math

import numpy as np
import pytest

from minidpo.stats import (
    HOLDS,
    NOT_HERE,
    NOT_YET,
    UNDECIDED,
    _t_cdf,
    above,
    below,
    normal_interval,
    normal_quantile,
    t_interval,
    t_quantile,
)

# Student's t, 97.5 % quantiles, from any printed table (4 significant digits)
TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 30: 2.042}


@pytest.mark.parametrize("df", sorted(TABLE))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(TABLE[df], abs=1e-3)


def test_t_quantile_is_symmetric_and_tends_to_the_normal():
    for df in (1, 3, 7):
        assert t_quantile(0.1, df) == pytest.approx(-t_quantile(0.9, df), abs=1e-9)
    assert t_quantile(0.975, 2000) == pytest.approx(normal_quantile(0.975), abs=2e-3)
    assert normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)


def test_the_integrated_cdf_matches_the_closed_form_at_3_df():
    """df 3 takes the numerical path; its CDF has a closed form to check it against."""
    for t in (-4.0, -1.0, 0.0, 0.5, 2.0, 10.0):
        closed = (
            0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
        )
        assert _t_cdf(t, 3) == pytest.approx(closed, abs=1e-9), t


def test_t_interval_known_answer():
    iv = t_interval([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert (iv.mean, iv.n) == (3.0, 5)
    assert iv.lo == pytest.approx(3 - half, abs=1e-6) and iv.hi == pytest.approx(3 + half, abs=1e-6)
    assert iv.over == "5 seeds (t, 4 df)"
    with pytest.raises(ValueError):
        t_interval([1.0])


def test_the_t_interval_covers_the_mean_95_percent_of_the_time():
    """5 draws a time from N(0, 1): the interval holds 0 in about 95 % of 4,000 tries
    (binomial se 0.34 %); a z interval on the same draws would cover only about 88 %."""
    rng = np.random.default_rng(0)
    hits = sum((iv := t_interval(rng.normal(size=5).tolist())).lo < 0 < iv.hi for _ in range(4000))
    assert abs(hits / 4000 - 0.95) < 0.012


def test_normal_interval():
    iv = normal_interval(1.0, 0.1)
    assert iv.lo == pytest.approx(1 - 0.196, abs=1e-4) and iv.n == 1


@pytest.mark.parametrize(
    ("xs", "want_above", "want_below"),
    [([1.0, 1.1, 0.9, 1.05, 0.95], HOLDS, NOT_HERE),
     ([-1.0, -1.1, -0.9, -1.05, -0.95], NOT_HERE, HOLDS),
     ([1.0, -1.0, 0.5, -0.5, 0.1], UNDECIDED, UNDECIDED)],
)  # fmt: skip
def test_verdicts_say_holds_does_not_hold_or_undecided(xs, want_above, want_below):
    iv = t_interval(xs)
    assert above(iv) == want_above and below(iv) == want_below


def test_a_threshold_moves_the_verdict_and_none_is_not_measured():
    iv = t_interval([1.0, 1.1, 0.9, 1.05, 0.95])
    assert above(iv, 0.5) == HOLDS and above(iv, 1.5) == NOT_HERE and above(iv, 1.0) == UNDECIDED
    assert above(None) == NOT_YET and below(None) == NOT_YET
