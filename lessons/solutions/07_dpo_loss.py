"""Solution to the exercise of lesson 07 (the DPO loss by hand)."""

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean DPO loss (Eq. 7, arXiv 2305.18290) over a batch of B pairs, from (B,) log-probs.

    -log sigmoid(beta * h) with h the chosen log-ratio minus the rejected log-ratio;
    F.logsigmoid keeps it finite for margins of any size.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * h).mean()
