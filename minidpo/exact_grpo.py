"""GRPO on the enumerable problem: where it converges, in closed form, and whether that is pi*.

On the one-step problem of `minidpo.exact` (prompts x, opaque responses y, a reference
pi_ref and a reward r) the KL-regularised objective E_pi[r] - beta KL(pi || pi_ref) has
the optimum pi* = pi_ref exp(r / beta) / Z (Eq. 4, arXiv 2305.18290), and PPO reaches it
(`minidpo.exact_ppo`). `fit_tabular_grpo` trains a free table of logits with GRPO's
pieces (`minidpo.grpo_math`): G responses SAMPLED per group, group-relative advantages,
the clipped surrogate, and the KL either where GRPO puts it (``kl_in="loss"``: k3 at the
sampled responses, differentiated through log pi) or where PPO puts it (``kl_in="reward"``:
r - beta log(pi / pi_ref) as the reward, not differentiated).

Where each converges (on-policy, rho = 1; c = 1 - 1/G, the shrink of the group-mean
baseline, see `minidpo.grpo_math`):

- KL in the reward, Dr. GRPO advantages: the expected update is c times the gradient of
  the objective itself, so the fixed point is pi*.
- KL in the loss (k3), Dr. GRPO advantages: E_pi[grad k3] = grad KL(pi_ref || pi), the
  REVERSE KL. Setting c grad E_pi[r] = beta grad KL(pi_ref || pi) for a softmax table
  gives, per prompt,

      pi(y) = beta pi_ref(y) / (beta - c (r(y) - m)),   m = E_pi[r]           (`grpo_fixed_point`)

  with m the one root of sum_y pi(y) = 1 above max r - beta / c. With d = r - m, its
  weight on pi_ref, 1 / (1 - c d / beta), agrees with pi*'s exp(d / beta) to first order
  in d / beta (for c near 1) and differs beyond: it grows faster above the mean (a pole
  at d = beta / c) and falls only like beta / |d| below it, where exp falls exponentially.
- With GRPO's std scaling each group's advantages are divided by one scalar, the
  group's std: no closed form, so measured only.

Measured (`python -m minidpo.exact_grpo`: 3 prompts x 20 responses, beta 0.5, G 16,
8 groups per prompt, 150 iterations; KL(pi_ref || pi*) = 1.56 at the start): KL in the
reward ends at KL(pi || pi*) = 0.0011 (0.0003 with the std scaling), as PPO does; KL in
the loss ends 0.0003 from `grpo_fixed_point` and 0.260 from pi* (the fixed point itself
is 0.254 from it), 0.48 with the std scaling. GRPO as published (k3 in the loss)
regularises towards pi_ref with the reverse KL, so it solves a different problem from
the one whose solution DPO's loss is built on.

Left out: the language model, the per-token normalisations (one action per episode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minidpo.exact import ExactProblem, kl, make_problem, optimal_policy
from minidpo.exact_ppo import log_softmax
from minidpo.grpo_math import group_advantages, grpo_loss

KL_PLACES = ("loss", "reward")


def grpo_fixed_point(
    log_pi_ref: np.ndarray, reward: np.ndarray, beta: float, group_size: int
) -> np.ndarray:
    """(P, R) log pi of the fixed point of Dr. GRPO with the k3 KL in the loss (module doc):
    pi = beta pi_ref / (beta - c (r - m)), c = 1 - 1/G, m found by bisection per prompt."""
    c = 1.0 - 1.0 / group_size
    ref = np.exp(log_pi_ref)
    out = np.empty_like(log_pi_ref)
    for x in range(reward.shape[0]):
        r = reward[x]

        def total(m: float, r: np.ndarray = r, x: int = x) -> float:
            return float(np.sum(beta * ref[x] / (beta - c * (r - m))))

        lo = float(r.max()) - beta / c  # total -> +inf as m -> lo from above
        hi = lo + 1.0
        while total(hi) > 1.0:  # total falls as m rises, towards 0
            hi = lo + 2 * (hi - lo)
        lo += 1e-15 * max(1.0, abs(lo))
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(mid) > 1.0 else (lo, mid)
        pi = beta * ref[x] / (beta - c * (r - 0.5 * (lo + hi)))
        out[x] = np.log(pi / pi.sum())
    return out


@dataclass
class TabularGRPOResult:
    """The fitted policy and its distance to pi* (and to GRPO's own fixed point) over time."""

    log_pi: np.ndarray  # (P, R)
    kl_to_optimum: list[float]  # mean over prompts of KL(pi || pi*), before each iteration + end
    kl_to_fixed_point: list[float] | None  # same to `grpo_fixed_point` (Dr. GRPO, KL in loss)


def fit_tabular_grpo(
    problem: ExactProblem,
    beta: float,
    *,
    group_size: int = 16,
    groups_per_prompt: int = 8,
    iterations: int = 150,
    epochs: int = 4,
    lr: float = 0.05,
    clip_range: float = 0.2,
    scale_std: bool = False,
    kl_in: str = "loss",
    seed: int = 0,
) -> TabularGRPOResult:
    """Train a tabular softmax policy, initialised at pi_ref, with GRPO; see the module doc."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if kl_in not in KL_PLACES:
        raise ValueError(f"kl_in must be one of {KL_PLACES}, got {kl_in!r}")
    P, G, K = problem.n_prompts, group_size, groups_per_prompt
    log_pi_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, beta)  # Eq. 4
    fixed = (grpo_fixed_point(problem.log_pi_ref, problem.reward, beta, G)
             if kl_in == "loss" and not scale_std else None)  # fmt: skip
    ref = torch.tensor(problem.log_pi_ref)  # (P, R)
    reward = torch.tensor(problem.reward)  # (P, R)
    theta = ref.clone().requires_grad_()  # (P, R) logits; pi starts at pi_ref
    opt = torch.optim.Adam([theta], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(P).repeat_interleave(K * G)  # (B,) prompt of each sample, B = P K G
    mask = torch.ones(P * K * G, 1, dtype=torch.float64)  # (B, 1): one action per episode

    def distances() -> tuple[float, float | None]:
        log_pi = log_softmax(theta.detach()).numpy()
        to_fixed = None if fixed is None else float(np.mean(kl(log_pi, fixed)))
        return float(np.mean(kl(log_pi, log_pi_star))), to_fixed

    history = [distances()]
    for it in range(iterations):
        for g in opt.param_groups:
            g["lr"] = lr * (1.0 - it / iterations)  # linear decay to 0
        with torch.no_grad():
            log_pi = log_softmax(theta)  # (P, R)
            y = torch.multinomial(log_pi.exp(), K * G, replacement=True, generator=gen)
            y = y.reshape(-1)  # (B,)
            old_logp = log_pi[rows, y][:, None]  # (B, 1)
            ref_logp = ref[rows, y][:, None]  # (B, 1)
            r = reward[rows, y]  # (B,)
            if kl_in == "reward":  # PPO's place: r - beta log(pi / pi_ref), not differentiated
                r = r - beta * (old_logp - ref_logp)[:, 0]
            adv = group_advantages(r.view(P * K, G), scale_std=scale_std).reshape(-1)  # (B,)
        for _ in range(epochs):
            new_logp = log_softmax(theta)[rows, y][:, None]  # (B, 1)
            loss, _ = grpo_loss(new_logp, old_logp, ref_logp, adv, mask, clip_range=clip_range,
                                beta=beta if kl_in == "loss" else 0.0)  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
        history.append(distances())
    return TabularGRPOResult(
        log_pi=log_softmax(theta.detach()).numpy(),
        kl_to_optimum=[a for a, _ in history],
        kl_to_fixed_point=None if fixed is None else [b for _, b in history],
    )


def render_fixed_points(beta: float = 0.5, seed: int = 0) -> str:
    """KL(pi || pi*) at the end of tabular GRPO, by where the KL goes and the std scaling."""
    problem = make_problem(seed=seed)
    log_pi_star, _ = optimal_policy(problem.log_pi_ref, problem.reward, beta)
    fp = grpo_fixed_point(problem.log_pi_ref, problem.reward, beta, 16)
    lines = [f"tabular GRPO, {problem.n_prompts} prompts x {problem.n_responses} responses, "
             f"beta={beta:g}, G=16; KL(fixed point || pi*) = {np.mean(kl(fp, log_pi_star)):.4f}",
             f"{'KL in':>8} {'std scaling':>12} {'KL(pi || pi*) at the end':>26}"]  # fmt: skip
    for kl_in in KL_PLACES:
        for scale in (False, True):
            res = fit_tabular_grpo(problem, beta, kl_in=kl_in, scale_std=scale, seed=seed)
            lines.append(
                f"{kl_in:>8} {('yes' if scale else 'no'):>12} {res.kl_to_optimum[-1]:26.6f}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_fixed_points(), end="")
