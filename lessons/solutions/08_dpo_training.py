"""Solution to the optional exercise of lesson 08 (training with DPO)."""

import torch


def implicit_reward_accuracy(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> float:
    """Share of pairs whose implicit reward (Eq. 5, arXiv 2305.18290, less beta log Z)
    prefers the chosen response: beta log(pi/pi_ref)(y_w) > beta log(pi/pi_ref)(y_l).

    A tie counts as wrong, as in TRL's ``rewards/accuracies``. For beta > 0 the answer
    does not depend on beta: it is the sign of the log-ratio margin h.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # (B,)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # (B,)
    return (chosen > rejected).float().mean().item()
