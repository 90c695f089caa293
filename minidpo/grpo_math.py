"""The math of GRPO, as pure functions: group-relative advantages, the k3 KL estimator, the loss.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Sec. 4.1) is PPO without a value
model: for each prompt it samples a group of G responses, and each response's advantage
is its reward relative to the group's,

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                        (Sec. 4.1.2)

given to every token of the response. The KL to the reference is not in the reward (as
in PPO for RLHF) but in the loss, estimated at each sampled token by Schulman's k3,

    D_t = pi_ref(o_t)/pi(o_t) - log(pi_ref(o_t)/pi(o_t)) - 1  >= 0       (Eq. 4)

and the objective is the clipped surrogate minus beta D, averaged over each response's
tokens and then over the group (Eq. 3):

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta D_t ]

Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, Sec. 3.1) drops the two normalisations it
shows to be biased: no division by the group's std (a group of near-equal rewards is
not up-weighted), and no 1/|o_i| (a long wrong answer is not penalised less per token):
the token sum is divided by a constant instead (here the batch's rows times the
generation budget, so the scale does not depend on the lengths sampled).

Two facts the tests check, and one that `minidpo.exact_grpo` measures:
- k3 is unbiased for KL(pi || pi_ref) when o ~ pi: E_pi[pi_ref/pi - log(pi_ref/pi) - 1]
  = 1 - 1 + KL(pi || pi_ref);
- the group-mean baseline keeps the policy gradient's direction but shrinks it by
  (1 - 1/G) (each sample is part of its own baseline);
- the GRADIENT of k3 through log pi is not the gradient of KL(pi || pi_ref): in
  expectation it is the gradient of KL(pi_ref || pi), the reverse KL, so GRPO's
  fixed point is not the pi* of the DPO paper's Eq. 4 (`minidpo.exact_grpo`).
"""

from __future__ import annotations

import torch

from minidpo.ppo_math import masked_mean

LOSS_NORMS = ("sequence", "constant")  # GRPO's 1/|o_i|, Dr. GRPO's constant


def group_advantages(
    rewards: torch.Tensor, *, scale_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """(P, G) rewards, G responses per prompt -> (P, G) advantages.

    GRPO: (r - group mean) / (group std + eps), the std unbiased (n - 1) as in TRL;
    Dr. GRPO (`scale_std=False`): r - group mean.
    Example: [[1, 2, 3]] -> [[-1, 0, 1]] / (1 + 1e-4); unscaled [[-1, 0, 1]].
    """
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must be (prompts, G >= 2), got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)  # Sec. 4.1.2, arXiv 2402.03300


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) at sampled tokens (Eq. 4, arXiv 2402.03300):
    exp(u) - u - 1 with u = log pi_ref - log pi; >= 0, and 0 only where pi = pi_ref."""
    u = ref_logp - logp
    return torch.exp(u) - u - 1


def grpo_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
    beta: float,
    loss_norm: str = "sequence",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-J of Eq. 3 (arXiv 2402.03300) as a loss, and its parts (no gradient).

    new_logp, old_logp, ref_logp, mask: (B, T) over response tokens; advantages: (B,),
    one per response, given to each of its tokens. `loss_norm` "sequence" averages each
    response over its own tokens, then over the batch (GRPO); "constant" sums every
    token and divides by B * `max_tokens` (Dr. GRPO, arXiv 2503.20783).
    """
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    ratio = torch.exp(new_logp - old_logp)  # (B, T) rho_t
    adv = advantages[:, None]  # (B, 1)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * adv  # (B, T)
    surrogate = torch.minimum(ratio * adv, clipped)  # (B, T), the PPO clip of Eq. 3
    kl = k3_kl(new_logp, ref_logp)  # (B, T), Eq. 4
    per_token = -(surrogate - beta * kl) * mask  # (B, T): -(clipped term - beta D_t)
    if loss_norm == "sequence":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()  # 1/G sum_i 1/|o_i| sum_t
    else:
        if max_tokens is None or max_tokens < 1:
            raise ValueError("loss_norm='constant' needs max_tokens >= 1 (the generation budget)")
        loss = per_token.sum() / (mask.size(0) * max_tokens)
    with torch.no_grad():
        parts = {
            "kl": masked_mean(kl, mask),
            "clipfrac": masked_mean((clipped < ratio * adv).to(ratio.dtype), mask),
        }
    return loss, parts
