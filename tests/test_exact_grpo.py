"""GRPO on the enumerable problem: its closed-form fixed point, and which variant reaches pi*."""

import numpy as np
import pytest
import torch

from minidpo.exact import kl, make_problem, optimal_policy
from minidpo.exact_grpo import fit_tabular_grpo, grpo_fixed_point
from minidpo.grpo_math import k3_kl

BETA = 0.5


@pytest.fixture(scope="module")
def problem():
    return make_problem(seed=0)


def test_the_fixed_point_is_stationary_for_the_expected_update(problem) -> None:
    """At the closed form, the expected Dr. GRPO gradient (c grad E[r] minus beta times the
    pathwise gradient of E[k3]) is zero, checked by autograd on a softmax table."""
    G = 16
    c = 1 - 1 / G
    log_fp = grpo_fixed_point(problem.log_pi_ref, problem.reward, BETA, G)
    assert np.allclose(np.exp(log_fp).sum(1), 1.0, atol=1e-12)
    theta = torch.tensor(log_fp, requires_grad=True)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    r, ref = torch.tensor(problem.reward), torch.tensor(problem.log_pi_ref)
    baseline = (pi * r).sum(-1, keepdim=True)
    objective = c * (pi * (r - baseline) * logp).sum() - BETA * (pi * k3_kl(logp, ref)).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    assert float(grad.abs().max()) < 1e-10


def test_the_fixed_point_is_not_pi_star_but_agrees_to_first_order(problem) -> None:
    log_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, BETA)
    fp = grpo_fixed_point(problem.log_pi_ref, problem.reward, BETA, 16)
    assert np.mean(kl(fp, log_star)) > 1e-2  # a different policy at beta 0.5
    big = 50.0  # (r - m) / beta small: the two agree to second order in 1/beta
    log_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, big)
    fp = grpo_fixed_point(problem.log_pi_ref, problem.reward, big, 10**9)
    assert np.mean(kl(fp, log_star)) < 1e-6


@pytest.mark.slow
def test_grpo_converges_where_its_kl_sends_it(problem) -> None:
    """KL in the reward (PPO's place), with or without the std scaling: to pi*. KL in the
    loss (GRPO's k3): to its own closed-form fixed point, measurably not pi*."""
    in_reward = fit_tabular_grpo(problem, BETA, kl_in="reward")
    scaled = fit_tabular_grpo(problem, BETA, kl_in="reward", scale_std=True)
    in_loss = fit_tabular_grpo(problem, BETA, kl_in="loss")
    log_star = optimal_policy(problem.log_pi_ref, problem.reward, BETA)[0]
    fp_gap = float(np.mean(kl(grpo_fixed_point(problem.log_pi_ref, problem.reward, BETA, 16),
                              log_star)))  # fmt: skip
    start = in_reward.kl_to_optimum[0]  # KL(pi_ref || pi*) = 1.56 here
    assert in_reward.kl_to_optimum[-1] < 0.005 * start  # measured 0.0011
    assert scaled.kl_to_optimum[-1] < 0.005 * start  # measured 0.0003
    assert in_loss.kl_to_fixed_point[-1] < 0.005 * in_loss.kl_to_fixed_point[0]  # 0.0003
    assert in_loss.kl_to_optimum[-1] == pytest.approx(fp_gap, rel=0.1)  # 0.260 vs 0.254
    assert in_loss.kl_to_optimum[-1] > 50 * in_reward.kl_to_optimum[-1]
