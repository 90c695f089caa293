"""PPO checked against the derivation: a tabular policy trained by PPO approaches pi*.

On the enumerable one-step problem of `minidpo.exact` (a few prompts, a few tens of
opaque responses, a reference pi_ref and a reward r), the KL-regularised RL objective

    max_pi  E_x E_{y~pi}[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x))

has the closed-form optimum pi* = pi_ref exp(r/beta) / Z(x) (Eq. 4, arXiv 2305.18290).
`fit_tabular_ppo` trains a free table of logits theta(x, y), pi = softmax(theta), with
the same PPO pieces `minidpo.ppo` uses on the language model (`minidpo.ppo_math`):

- responses SAMPLED from pi (never the expectation), N per prompt per iteration;
- the KL-penalised reward r(x, y) - beta (log pi(y|x) - log pi_ref(y|x))
  (`kl_penalized_rewards`, with T = 1: the response is one action);
- advantage = reward - baseline, the baseline being the mean reward of the other
  samples of the same prompt (leave-one-out, so it carries no bias); no GAE: a
  one-step episode has nothing to bootstrap; whitened as in `minidpo.ppo`;
- a few epochs of the clipped surrogate (`policy_loss`, PPO Eq. 7) on each batch,
  Adam with a linearly decaying learning rate (to quiet the sampling noise at the end).

The penalty inside the reward is not differentiated (as in PPO for RLHF); the score
function gradient of E_pi[-beta log pi] equals the gradient of -beta E_pi[log pi] all
the same, because E_pi[grad log pi] = 0. So the fixed point of the update is pi*,
and KL(pi || pi*) falls towards 0, down to a floor set by the sampling noise.

Left out: value functions and GAE (one step), the language model, the
adaptive KL controller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minidpo.exact import ExactProblem, kl, make_problem, optimal_policy
from minidpo.ppo_math import kl_penalized_rewards, policy_loss, whiten


@dataclass
class TabularPPOResult:
    """The fitted policy and how far it was from pi* along the way."""

    log_pi: np.ndarray  # (P, R) final log pi
    kl_to_optimum: list[float]  # mean over prompts of KL(pi || pi*), before each iteration + end
    kl_to_ref: float  # mean over prompts of KL(pi || pi_ref) at the end
    kl_optimum_to_ref: float  # mean over prompts of KL(pi* || pi_ref)


def log_softmax(theta: torch.Tensor) -> torch.Tensor:
    """log softmax over the last axis, as theta - logsumexp(theta). (Same numbers as
    ``torch.log_softmax``, whose CPU kernel splits even a (3, 20) table across threads,
    which costs milliseconds per call on a busy machine.)"""
    return theta - torch.logsumexp(theta, dim=-1, keepdim=True)


def fit_tabular_ppo(
    problem: ExactProblem,
    beta: float,
    *,
    iterations: int = 150,
    samples_per_prompt: int = 128,
    ppo_epochs: int = 4,
    lr: float = 0.05,
    clip_range: float = 0.2,
    seed: int = 0,
) -> TabularPPOResult:
    """Train a tabular softmax policy, initialised at pi_ref, with PPO; see the module doc."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    P, N = problem.n_prompts, samples_per_prompt
    if N < 2:
        raise ValueError("samples_per_prompt must be >= 2 for the leave-one-out baseline")
    log_pi_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, beta)  # Eq. 4
    ref = torch.tensor(problem.log_pi_ref)  # (P, R)
    reward = torch.tensor(problem.reward)  # (P, R)
    theta = ref.clone().requires_grad_()  # (P, R) logits; pi starts at pi_ref
    opt = torch.optim.Adam([theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(P).repeat_interleave(N)  # (B,) prompt of each sample, B = P N
    mask = torch.ones(P * N, 1, dtype=torch.float64)  # (B, 1): one action per episode

    def kl_to_opt() -> float:
        log_pi = log_softmax(theta.detach()).numpy()
        return float(np.mean(kl(log_pi, log_pi_star)))

    history = [kl_to_opt()]
    for it in range(iterations):
        for g in opt.param_groups:
            g["lr"] = lr * (1.0 - it / iterations)  # linear decay to 0
        with torch.no_grad():
            log_pi = log_softmax(theta)  # (P, R)
            y = torch.multinomial(log_pi.exp(), N, replacement=True, generator=gen)  # (P, N)
            y = y.reshape(-1)  # (B,)
            old_logp = log_pi[rows, y][:, None]  # (B, 1)
            rewards = kl_penalized_rewards(
                reward[rows, y], old_logp, ref[rows, y][:, None], mask, beta
            )  # (B, 1): r - beta log(pi / pi_ref), Eq. 2 of Ziegler et al. 2019
            per_prompt = rewards.view(P, N)  # (P, N)
            loo = (per_prompt.sum(1, keepdim=True) - per_prompt) / (N - 1)  # (P, N) baseline
            adv = whiten((per_prompt - loo).reshape(-1, 1), mask)  # (B, 1)
        for _ in range(ppo_epochs):
            new_logp = log_softmax(theta)[rows, y][:, None]  # (B, 1)
            loss, _, _ = policy_loss(new_logp, old_logp, adv, mask, clip_range)  # PPO Eq. 7
            opt.zero_grad()
            loss.backward()
            opt.step()
        history.append(kl_to_opt())
    log_pi = log_softmax(theta.detach()).numpy()
    return TabularPPOResult(
        log_pi=log_pi,
        kl_to_optimum=history,
        kl_to_ref=float(np.mean(kl(log_pi, problem.log_pi_ref))),
        kl_optimum_to_ref=float(np.mean(kl(log_pi_star, problem.log_pi_ref))),
    )


def render_convergence(beta: float = 0.5, seed: int = 0) -> str:
    """A short table of KL(pi || pi*) over PPO iterations on the default problem."""
    problem = make_problem(seed=seed)
    res = fit_tabular_ppo(problem, beta, seed=seed)
    n = len(res.kl_to_optimum) - 1
    marks = sorted({0, n // 10, n // 4, n // 2, 3 * n // 4, n})
    lines = [
        f"tabular PPO on {problem.n_prompts} prompts x {problem.n_responses} responses, "
        f"beta={beta:g}; KL(pi* || pi_ref) = {res.kl_optimum_to_ref:.4f}",
        f"{'iteration':>10} {'KL(pi || pi*)':>14}",
        *(f"{i:>10} {res.kl_to_optimum[i]:14.6f}" for i in marks),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_convergence(), end="")
