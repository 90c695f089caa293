"""The DPO derivation (Eqs. 1, 4, 5, 7 of arXiv 2305.18290) checked on an enumerable problem."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from numpy.testing import assert_allclose

from minidpo import exact
from minidpo.exact import (
    beta_sweep,
    bradley_terry,
    fit_tabular_dpo,
    implied_reward,
    kl,
    make_problem,
    optimal_policy,
    render_beta_sweep,
)

BETAS = (0.05, 0.1, 0.5, 1.0, 5.0)


@pytest.fixture(scope="module")
def problem():
    return make_problem(n_prompts=3, n_responses=20, seed=0)


def test_problem_is_seeded_and_normalised(problem):
    again = make_problem(3, 20, seed=0)
    assert_allclose(again.log_pi_ref, problem.log_pi_ref, rtol=0, atol=0)
    assert_allclose(again.reward, problem.reward, rtol=0, atol=0)
    assert not np.allclose(make_problem(3, 20, seed=1).reward, problem.reward)
    assert problem.reward.shape == problem.log_pi_ref.shape == (3, 20)
    assert_allclose(np.exp(problem.log_pi_ref).sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_optimal_policy_is_normalised_and_maximises_the_objective(problem, beta):
    log_pi, log_z = optimal_policy(problem.log_pi_ref, problem.reward, beta)
    assert_allclose(np.exp(log_pi).sum(-1), 1.0, rtol=1e-12)
    # the maximum of E_pi[r] - beta KL(pi||pi_ref) is beta log Z(x), attained at pi*
    value = np.sum(np.exp(log_pi) * problem.reward, -1) - beta * kl(log_pi, problem.log_pi_ref)
    assert_allclose(value, beta * log_z, rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):  # any other policy does worse
        other = log_pi + rng.normal(scale=0.3, size=log_pi.shape)
        other = other - exact.logsumexp(other)[:, None]
        v = np.sum(np.exp(other) * problem.reward, -1) - beta * kl(other, problem.log_pi_ref)
        assert np.all(v < value), (v, value)


@pytest.mark.parametrize("beta", BETAS)
def test_eq5_recovers_the_reward_from_pi_star(problem, beta):
    log_pi, log_z = optimal_policy(problem.log_pi_ref, problem.reward, beta)
    assert_allclose(
        implied_reward(log_pi, problem.log_pi_ref, beta, log_z),
        problem.reward,
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("beta", BETAS)
def test_partition_function_cancels_in_bradley_terry(problem, beta):
    log_pi, log_z = optimal_policy(problem.log_pi_ref, problem.reward, beta)
    without_z = implied_reward(log_pi, problem.log_pi_ref, beta)  # beta log(pi*/pi_ref) only
    # without Z the implied reward is off by beta log Z(x), which is far from 0 ...
    assert np.all(np.abs(beta * log_z) > 1e-2), beta * log_z
    assert_allclose(
        problem.reward - without_z, np.broadcast_to(beta * log_z[:, None], (3, 20)), rtol=1e-10
    )
    # ... yet every pairwise difference, and so every preference probability, is exact
    diff = lambda r: r[:, :, None] - r[:, None, :]  # noqa: E731  (P, R, R)
    assert_allclose(diff(without_z), diff(problem.reward), rtol=1e-10, atol=1e-10)
    assert_allclose(bradley_terry(without_z), bradley_terry(problem.reward), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_on_the_population_loss_converges_to_pi_star(problem, beta):
    log_pi_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, beta)
    start = kl(log_pi_star, problem.log_pi_ref).max()
    assert start > 0.3, start  # the fit has somewhere to go: it starts at pi_ref
    fitted = fit_tabular_dpo(problem, beta)
    reached = kl(log_pi_star, fitted).max()
    assert abs(reached) < 1e-3, reached  # measured: ~1e-15, float64 round-off
    assert_allclose(np.exp(fitted), np.exp(log_pi_star), rtol=0, atol=1e-6)


def test_dpo_on_sampled_pairs_approaches_pi_star_with_more_data(problem):
    log_pi_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, 1.0)
    few = kl(log_pi_star, fit_tabular_dpo(problem, 1.0, pairs="sampled", n_pairs=1_000)).max()
    many = kl(log_pi_star, fit_tabular_dpo(problem, 1.0, pairs="sampled", n_pairs=50_000)).max()
    assert many < few, (many, few)
    assert many < 5e-3, many  # measured 4.1e-4 with seed 0 (1,000 pairs: 3.9e-2)
    assert few > 1e-3, few  # a finite sample does not land on pi*


def test_larger_beta_keeps_pi_star_closer_to_pi_ref(problem):
    rows = beta_sweep(problem, (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
    kls = [r.kl for r in rows]
    rewards = [r.expected_reward for r in rows]
    assert all(a > b for a, b in itertools.pairwise(kls)), kls  # strictly decreasing in beta
    assert all(a > b for a, b in itertools.pairwise(rewards)), rewards
    assert kls[-1] < 0.05 < 1.0 < kls[0], kls


@pytest.mark.parametrize("beta", [0.2, 1.0, 3.0])
def test_dkl_dbeta_matches_minus_variance_over_beta_cubed(problem, beta):
    d = 1e-5 * beta
    lo, hi = beta_sweep(problem, (beta - d, beta + d))
    numeric = (hi.kl - lo.kl) / (2 * d)
    log_pi, _ = optimal_policy(problem.log_pi_ref, problem.reward, beta)
    p = np.exp(log_pi)
    var = np.sum(p * problem.reward**2, -1) - np.sum(p * problem.reward, -1) ** 2
    assert_allclose(numeric, np.mean(-var / beta**3), rtol=1e-5)


def test_render_beta_sweep_reads_its_conclusion_off_the_numbers(problem):
    text = render_beta_sweep(problem, (0.1, 1.0, 10.0))
    rows = beta_sweep(problem, (0.1, 1.0, 10.0))
    for r in rows:
        assert f"{r.kl:16.6f}" in text and f"{r.expected_reward:10.4f}" in text
    assert f"falls strictly as beta grows ({rows[0].kl:.4f} at beta=0.1" in text
    assert f"to {rows[-1].kl:.4f} at beta=10)" in text
    assert "larger beta keeps the policy closer to pi_ref" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert exact._trend([3.0, 2.0, 1.0]) == "falls"
    assert exact._trend([1.0, 2.0]) == "rises"
    assert exact._trend([1.0, 2.0, 1.5]) == "is not monotone"


def test_bad_arguments(problem):
    with pytest.raises(ValueError, match="beta"):
        optimal_policy(problem.log_pi_ref, problem.reward, 0.0)
    with pytest.raises(ValueError, match="pairs"):
        fit_tabular_dpo(problem, 1.0, pairs="all")
    with pytest.raises(ValueError, match="responses"):
        make_problem(3, 1)
