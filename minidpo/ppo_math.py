"""The math of PPO for language models, as pure functions on (B, T) tensors.

PPO (Schulman et al. 2017, arXiv 1707.06347) applied to a language model the way
OpenAI's lm-human-preferences (Ziegler et al. 2019, arXiv 1909.08593) and TRL's PPO
trainer do it: each response token is an action, the episode is one response, and
the reward is the sequence score minus a per-token KL penalty towards the frozen
reference policy. Every tensor is (B, T) over token positions, with a `mask` that
is 1 on response tokens and 0 elsewhere (prompt, padding). Each row's mask is ONE
contiguous run (the response); positions after it hold no value and no reward.

    kl_penalized_rewards   r_t = -beta (log pi(y_t) - log pi_ref(y_t)),  + score at the
                           row's last response token (Ziegler et al. 2019, Eq. 2 / Sec. 2.2)
    compute_gae            delta_t = r_t + gamma V_{t+1} - V_t,
                           A_t = delta_t + gamma lam A_{t+1}  (Schulman et al. 2016,
                           arXiv 1506.02438, Eq. 16),  returns R_t = A_t + V_t
    whiten                 (x - mean) / std over the masked entries
    policy_loss            the clipped surrogate, PPO Eq. 7, negated (a loss)
    value_loss             the clipped value loss of the OpenAI baselines / TRL
    explained_variance     1 - Var(R - V) / Var(R)
    AdaptiveKLController   beta_{t+1} = beta_t (1 + K e_t), e_t = clip(KL/KL_target - 1,
                           -0.2, 0.2) (Ziegler et al. 2019, Sec. 2.2)
    FixedKLController      beta constant

Means over tokens are over ALL masked tokens of the batch (TRL's ``masked_mean``),
so a long response weighs more than a short one.

Left out: the models, sampling and the training loop (`minidpo.ppo`); the
k2/k3 KL estimators (only k1 = log pi - log pi_ref, the one in the reward); value
normalisation; reward clipping; entropy bonuses.
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1 (all masked tokens of the batch)."""
    return (x * mask).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked entries; unbiased (n - 1) by default, as TRL."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)  # Bessel's correction
    return var


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last masked position: (B, T) -> (B,) long.

    Example: [[0, 1, 1, 0], [1, 1, 1, 1]] -> [2, 3].
    """
    T = mask.size(1)
    pos = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=1)  # (B,)


def kl_penalized_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef (log pi - log pi_ref) on response tokens, and the
    sequence score (B,) added at each row's last response token.

    R(x, y) = r(x, y) - beta log(pi(y|x) / pi_ref(y|x))  (Ziegler et al. 2019, Eq. 2),
    spread over tokens: the log-ratio of a sequence is the sum of its tokens' log-ratios,
    so the per-token penalties sum to the sequence penalty and the score arrives once,
    at the end, as in lm-human-preferences and TRL.

    Example: score [1.0], logprobs [[-1, -2]], ref [[-1.5, -1]], mask [[1, 1]],
    kl_coef 0.1 -> [[-0.05, 0.1 + 1.0]].
    """
    if score.dim() != 1 or score.size(0) != logprobs.size(0):
        raise ValueError(f"score must be (B,) with B={logprobs.size(0)}, got {tuple(score.shape)}")
    if (mask.sum(dim=1) == 0).any():
        raise ValueError("every row needs at least one response token in `mask`")
    kl = (logprobs - ref_logprobs) * mask  # (B, T) per-token k1 estimate of KL
    rewards = -kl_coef * kl  # (B, T)
    last = last_token_index(mask)  # (B,)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)  # score at the last response token
    return rewards


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns, both (B, T), zero outside `mask`.

    Reverse loop over T, vectorised over B:
        delta_t = r_t + gamma V_{t+1} - V_t              (the TD residual, Schulman et al. 2016, Sec. 3)
        A_t     = delta_t + gamma lam A_{t+1}            (Schulman et al. 2016, Eq. 16)
        R_t     = A_t + V_t                              (the value target, TRL/baselines)
    V_{t+1} and A_{t+1} are 0 past a row's last response token (the episode ends there).

    Example (one row, gamma 1, lam 0.5): r = [0, 0, 1], V = [0.5, 0.5, 0.5] ->
    delta = [0, 0, 0.5], A = [0.125, 0.25, 0.5], R = [0.625, 0.75, 1.0].
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(
            f"shapes differ: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    mask = mask.to(values.dtype)
    r = rewards * mask  # (B, T)
    v = values * mask  # (B, T): 0 outside the response, so V after the end is 0
    B, T = r.shape
    advantages = torch.zeros_like(v)  # (B, T)
    last_gae = torch.zeros(B, dtype=v.dtype, device=v.device)  # (B,) A_{t+1}
    for t in reversed(range(T)):
        next_value = v[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)  # (B,)
        delta = r[:, t] + gamma * next_value - v[:, t]  # TD residual, arXiv 1506.02438 Sec. 3
        last_gae = delta + gamma * lam * last_gae  # Eq. 16, arXiv 1506.02438
        last_gae = last_gae * mask[:, t]  # nothing carries into the prompt positions
        advantages[:, t] = last_gae
    returns = (advantages + v) * mask  # (B, T)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; masked-out entries -> 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as TRL
    does for rewards. The variance is the unbiased one, as in TRL's ``masked_whiten``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate as a loss, plus (clipfrac, approxkl), each a scalar.

    L^CLIP = E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)],
    rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)                     (PPO, Eq. 7, arXiv 1707.06347)
    The loss is -L^CLIP = mean of max(-rho A, -clip(rho) A) over masked tokens.
    clipfrac: share of tokens where the clipped term is the one taken;
    approxkl: 0.5 mean (log rho)^2, TRL's estimate of KL(pi_old || pi) (no gradient).
    """
    log_ratio = new_logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T) rho_t
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # -Eq. 7, arXiv 1707.06347
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(log_ratio.dtype), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approxkl


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 mean max((V - R)^2, (V_clip - R)^2) and its clipfrac.

    V_clip = V_old + clip(V - V_old, -eps_v, eps_v): the value may not move further than
    eps_v from the value it had at rollout time, as in OpenAI baselines' PPO2,
    lm-human-preferences and TRL. clipfrac: share of tokens where the clipped error wins.
    """
    v_clipped = old_values + torch.clamp(
        new_values - old_values, -clip_range_value, clip_range_value
    )
    err = (new_values - returns) ** 2  # (B, T)
    err_clipped = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).to(new_values.dtype), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over masked tokens: 1 perfect, 0 no better than the mean,
    negative worse. NaN when the returns do not vary (as in cleanrl / baselines)."""
    var_r = float(masked_var(returns, mask, unbiased=False))
    if var_r == 0.0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_r


class AdaptiveKLController:
    """The KL coefficient beta steered towards a target KL (Ziegler et al. 2019, Sec. 2.2).

        e_t         = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1}  = beta_t (1 + K_beta e_t),   K_beta = n_steps / horizon

    as in lm-human-preferences' ``AdaptiveKLController``: after `horizon` samples of a
    KL persistently 20% off target, beta has changed by about e^{0.2}. KL_t is the mean
    sequence-level KL of the rollouts.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef, target, horizon > 0, got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta after a batch of `n_steps` samples whose mean KL was `current_kl`."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # e_t, Ziegler Sec. 2.2
        self.value *= 1.0 + error * n_steps / self.horizon  # beta_{t+1} = beta_t (1 + K e_t)
        return self.value


class FixedKLController:
    """A constant KL coefficient, with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
