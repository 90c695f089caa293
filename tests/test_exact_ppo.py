"""Tabular PPO on the enumerable problem converges to pi* = pi_ref exp(r/beta) / Z."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidpo.exact import kl, make_problem, optimal_policy
from minidpo.exact_ppo import fit_tabular_ppo, log_softmax, render_convergence


def test_log_softmax_matches_torch():
    x = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    # Measured (seed 0, 150 iterations, 128 samples per prompt): KL(pi || pi*) ends at
    # 3.5e-5 (beta 0.5), 1.6e-6 (beta 1), 3.1e-3 (beta 0.2, a peakier pi*); thresholds
    # leave an order of magnitude of room.
    ("beta", "threshold"),
    [(0.5, 1e-3), (1.0, 1e-3), (0.2, 2e-2)],
)
def test_ppo_approaches_the_optimal_policy(beta, threshold):
    problem = make_problem(seed=0)
    res = fit_tabular_ppo(problem, beta, seed=0)
    start, end = res.kl_to_optimum[0], res.kl_to_optimum[-1]
    assert start > 0.4, f"pi_ref should start far from pi*: KL {start:.4f}"
    assert end < threshold, f"KL(pi || pi*) after PPO: {end:.2e} (threshold {threshold:g})"
    assert end < start / 100, f"KL fell only from {start:.4f} to {end:.2e}"
    # The fitted policy sits at pi*'s distance from the reference, not further.
    np.testing.assert_allclose(
        res.kl_to_ref, res.kl_optimum_to_ref, atol=0.02, err_msg="KL(pi || pi_ref) vs pi*'s"
    )


def test_ppo_lands_on_its_own_beta_not_another():
    """The check can fail: the policy fitted with beta 0.5 is far from pi* of beta 1."""
    problem = make_problem(seed=1)
    res = fit_tabular_ppo(problem, 0.5, iterations=100, samples_per_prompt=64, seed=1)
    own, _ = optimal_policy(problem.log_pi_ref, problem.reward, 0.5)
    other, _ = optimal_policy(problem.log_pi_ref, problem.reward, 1.0)
    assert float(np.mean(kl(res.log_pi, own))) < 1e-3
    assert float(np.mean(kl(res.log_pi, other))) > 0.1


def test_same_seed_same_result_and_bad_args():
    problem = make_problem(n_prompts=2, n_responses=5, seed=2)
    a = fit_tabular_ppo(problem, 1.0, iterations=5, samples_per_prompt=8, seed=3)
    b = fit_tabular_ppo(problem, 1.0, iterations=5, samples_per_prompt=8, seed=3)
    np.testing.assert_array_equal(a.log_pi, b.log_pi)
    with pytest.raises(ValueError, match="beta"):
        fit_tabular_ppo(problem, 0.0)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        fit_tabular_ppo(problem, 1.0, samples_per_prompt=1)


def test_render_convergence_reports_falling_kl():
    text = render_convergence(beta=1.0)
    values = [float(line.split()[-1]) for line in text.splitlines()[2:]]
    assert values[0] > 0.4 and values[-1] < 1e-3, text
