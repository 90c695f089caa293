"""The DPO derivation checked exactly, on a problem small enough to enumerate every response.

A few prompts x, a few tens of responses y each, a fixed reference policy pi_ref(y|x)
and a reward r(x, y) (both seeded random). With every response enumerable, the
paper's closed forms (Rafailov et al. 2023, arXiv 2305.18290) can be evaluated
exactly instead of estimated:

    Eq. 4   pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x),
            Z(x) = sum_y pi_ref(y|x) exp(r(x,y)/beta)        the KL-regularised optimum
    Eq. 5   r(x,y) = beta log(pi*(y|x)/pi_ref(y|x)) + beta log Z(x)    its inverse
    Eq. 1   P(y_a > y_b | x) = sigma(r(x,y_a) - r(x,y_b))         Bradley-Terry; Z(x) cancels
    Eq. 7   the DPO loss, minimised over a tabular policy, recovers pi*

and the role of beta can be measured: KL(pi*||pi_ref) as a function of beta
(``beta_sweep``; analytically dKL/dbeta = -Var_{pi*}(r) / beta^3 < 0, so a larger
beta keeps pi* closer to pi_ref).

``fit_tabular_dpo`` trains a free table of logits theta(x, y), pi_theta =
softmax(theta), with ``minidpo.losses.preference_loss``. To converge to pi* it uses
the population loss: every ordered pair (a, b) weighted by its Bradley-Terry
probability sigma(r_a - r_b), i.e. soft labels, the expectation of the loss over
preferences drawn from the reward. Its minimiser is exactly pi*, since
beta h_ab = r_a - r_b for all pairs there. h is linear in theta (the softmax's
normaliser cancels in it), so the loss is convex and L-BFGS reaches the minimum in
well under a second. ``pairs="sampled"`` fits on a finite set of pairs with hard
Bradley-Terry labels instead, as a real preference data set would be, and lands
near pi* but not on it.

Left out: any neural network or token sequence (responses are opaque indices),
and the sampling error of estimating KL or reward from samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from minidpo.losses import preference_loss
from minidpo.numpy_ref import log_softmax, logsumexp, sigmoid

DEFAULT_BETAS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class ExactProblem:
    """A reference policy and a reward over every response of every prompt."""

    log_pi_ref: np.ndarray  # (P, R) log pi_ref(y|x); each row's exp sums to 1
    reward: np.ndarray  # (P, R) r(x, y)
    seed: int

    @property
    def n_prompts(self) -> int:
        return self.reward.shape[0]

    @property
    def n_responses(self) -> int:
        return self.reward.shape[1]


class BetaSweepRow(NamedTuple):
    beta: float
    kl: float  # mean over prompts of KL(pi* || pi_ref)
    expected_reward: float  # mean over prompts of E_{y ~ pi*}[r(x, y)]


def make_problem(n_prompts: int = 3, n_responses: int = 20, seed: int = 0) -> ExactProblem:
    """Seeded random pi_ref (softmax of N(0, 1) logits) and reward r ~ N(0, 1)."""
    if n_prompts < 1 or n_responses < 2:
        raise ValueError(f"need >= 1 prompt and >= 2 responses, got {n_prompts}, {n_responses}")
    rng = np.random.default_rng(seed)
    log_pi_ref = log_softmax(rng.normal(size=(n_prompts, n_responses)))  # (P, R)
    reward = rng.normal(size=(n_prompts, n_responses))  # (P, R)
    return ExactProblem(log_pi_ref=log_pi_ref, reward=reward, seed=seed)


def optimal_policy(
    log_pi_ref: np.ndarray, reward: np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """log pi* (P, R) and log Z(x) (P,) of Eq. 4, all in log space."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logits = log_pi_ref + reward / beta  # (P, R) log(pi_ref exp(r/beta))
    log_z = logsumexp(logits, axis=-1)  # (P,) Eq. 4: Z(x) = sum_y pi_ref exp(r/beta)
    return logits - log_z[:, None], log_z  # Eq. 4: pi* = pi_ref exp(r/beta) / Z(x)


def implied_reward(
    log_pi: np.ndarray, log_pi_ref: np.ndarray, beta: float, log_z: np.ndarray | float = 0.0
) -> np.ndarray:
    """Eq. 5: r = beta log(pi/pi_ref) + beta log Z(x) (P, R); log_z (P,) or 0 to leave it out."""
    log_z = np.asarray(log_z, dtype=np.float64)
    return beta * (log_pi - log_pi_ref) + beta * (log_z[..., None] if log_z.ndim else log_z)


def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """KL(p || q) = sum_y p (log p - log q) over the last axis, from log-probabilities."""
    return np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)


def bradley_terry(reward: np.ndarray) -> np.ndarray:
    """P(y_a > y_b | x) = sigma(r_a - r_b), Eq. 1; (P, R, R) indexed [x, a, b], zero diagonal."""
    p = sigmoid(reward[:, :, None] - reward[:, None, :])  # (P, R, R)
    return p * (1 - np.eye(reward.shape[1]))


def sample_preferences(problem: ExactProblem, n_pairs: int, seed: int) -> np.ndarray:
    """Win counts (P, R, R) [x, a, b] from n_pairs random pairs per prompt, labelled by Eq. 1."""
    rng = np.random.default_rng(seed)
    p, r = problem.n_prompts, problem.n_responses
    wins = np.zeros((p, r, r))
    bt = bradley_terry(problem.reward)
    for x in range(p):
        a = rng.integers(0, r, size=n_pairs)
        b = (a + rng.integers(1, r, size=n_pairs)) % r  # a different response
        a_wins = rng.random(n_pairs) < bt[x, a, b]
        np.add.at(wins[x], (np.where(a_wins, a, b), np.where(a_wins, b, a)), 1.0)
    return wins


def fit_tabular_dpo(
    problem: ExactProblem,
    beta: float,
    *,
    pairs: str = "population",
    n_pairs: int = 20_000,
    seed: int = 0,
    max_iter: int = 100,
) -> np.ndarray:
    """Fit a tabular policy (P, R) with the DPO loss (Eq. 7); return its log-probabilities.

    pairs="population": every ordered pair weighted by sigma(r_a - r_b) (soft labels,
    the expected loss over Bradley-Terry preferences); its minimiser is pi*.
    pairs="sampled": ``n_pairs`` random pairs per prompt with hard labels drawn from
    Bradley-Terry (``seed``); converges towards pi* as n_pairs grows.
    The policy starts at pi_ref, as DPO starts from the SFT model.
    """
    if pairs == "population":
        weights = bradley_terry(problem.reward)  # (P, R, R)
    elif pairs == "sampled":
        weights = sample_preferences(problem, n_pairs, seed)  # (P, R, R)
    else:
        raise ValueError(f"pairs must be 'population' or 'sampled', got {pairs!r}")
    x_idx, a_idx, b_idx = np.nonzero(weights)  # every ordered pair (a beats b) with weight > 0
    w = torch.tensor(weights[x_idx, a_idx, b_idx])  # (N,)
    w = w / w.sum()
    ref = torch.tensor(problem.log_pi_ref)  # (P, R)
    theta = ref.clone().requires_grad_()  # (P, R) policy logits, pi_theta = softmax(theta)
    opt = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        log_pi = torch.log_softmax(theta, dim=-1)  # (P, R)
        out = preference_loss(
            log_pi[x_idx, a_idx], log_pi[x_idx, b_idx], ref[x_idx, a_idx], ref[x_idx, b_idx],
            beta=beta,
        )  # fmt: skip  # Eq. 7, arXiv 2305.18290, on every weighted pair
        loss = torch.sum(w * out.losses)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(theta.detach(), dim=-1).numpy()


def beta_sweep(
    problem: ExactProblem, betas: tuple[float, ...] = DEFAULT_BETAS
) -> list[BetaSweepRow]:
    """For each beta: mean KL(pi* || pi_ref) and mean E_{pi*}[r], from the closed form Eq. 4."""
    rows = []
    for beta in betas:
        log_pi_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, beta)
        expected = np.sum(np.exp(log_pi_star) * problem.reward, axis=-1)  # (P,)
        rows.append(
            BetaSweepRow(
                float(beta),
                float(np.mean(kl(log_pi_star, problem.log_pi_ref))),
                float(np.mean(expected)),
            )
        )
    return rows


def _trend(values: list[float]) -> str:
    diffs = np.diff(values)
    if np.all(diffs < 0):
        return "falls"
    if np.all(diffs > 0):
        return "rises"
    return "is not monotone"


def render_beta_sweep(
    problem: ExactProblem | None = None, betas: tuple[float, ...] = DEFAULT_BETAS
) -> str:
    """The beta sweep as a table, with a conclusion read off the numbers."""
    problem = problem if problem is not None else make_problem()
    rows = beta_sweep(problem, betas)
    ref_reward = float(np.mean(np.sum(np.exp(problem.log_pi_ref) * problem.reward, axis=-1)))
    best = float(np.mean(np.max(problem.reward, axis=-1)))
    lines = [
        f"pi* = pi_ref exp(r/beta) / Z(x) (Eq. 4, arXiv 2305.18290) on {problem.n_prompts} "
        f"prompts x {problem.n_responses} responses (seed {problem.seed})",
        f"E_pi_ref[r] = {ref_reward:.4f}; max_y r = {best:.4f} (means over prompts)",
        "",
        f"{'beta':>8} {'KL(pi*||pi_ref)':>16} {'E_pi*[r]':>10}",
        *(f"{r.beta:8g} {r.kl:16.6f} {r.expected_reward:10.4f}" for r in rows),
        "",
    ]
    kl_trend = _trend([r.kl for r in rows])
    reward_trend = _trend([r.expected_reward for r in rows])
    first, last = rows[0], rows[-1]
    if kl_trend == "falls":
        lines.append(
            f"KL(pi*||pi_ref) falls strictly as beta grows ({first.kl:.4f} at beta={first.beta:g} "
            f"to {last.kl:.4f} at beta={last.beta:g}),\nand E_pi*[r] {reward_trend}: "
            "a larger beta keeps the policy closer to pi_ref;\n"
            "it does not change it more aggressively."
        )
    elif kl_trend == "rises":
        lines.append(
            f"KL(pi*||pi_ref) rises strictly as beta grows ({first.kl:.4f} to {last.kl:.4f}): "
            "a larger beta moves the policy further from pi_ref."
        )
    else:
        lines.append("KL(pi*||pi_ref) is not monotone in beta over these values.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_beta_sweep(), end="")
