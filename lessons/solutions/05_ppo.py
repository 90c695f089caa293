"""Solution to the exercise of lesson 05 (RLHF with PPO): generalized advantage estimation."""

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, both (B, T), zero outside `mask` (Schulman et al. 2016).

    A reverse loop over the T positions, vectorised over the B rows:
        delta_t = r_t + gamma V_{t+1} - V_t        (the TD residual)
        A_t     = delta_t + gamma lam A_{t+1}      (GAE paper, Eq. 16, as a recursion)
        R_t     = A_t + V_t                        (the value model's target)
    Masking the values makes V_{t+1} = 0 after a row's last response token (the episode
    ends there); masking A_t keeps anything from carrying into the prompt positions.
    """
    mask = mask.to(values.dtype)
    r = rewards * mask  # (B, T)
    v = values * mask  # (B, T): 0 outside the response
    B, T = r.shape
    advantages = torch.zeros_like(v)  # (B, T)
    next_adv = torch.zeros(B, dtype=v.dtype)  # (B,) A_{t+1}
    next_value = torch.zeros(B, dtype=v.dtype)  # (B,) V_{t+1}
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # (B,) A_t, 0 off the mask
        advantages[:, t] = next_adv
        next_value = v[:, t]
    returns = (advantages + v) * mask  # (B, T)
    return advantages, returns
