"""Solution to the exercise of lesson 04 (preferences and the Bradley-Terry reward model)."""

import torch
import torch.nn.functional as F


def bradley_terry_nll(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected): the reward model's loss, Eq. 2
    of arXiv 2305.18290, for rewards of shape (B,).

    ``F.logsigmoid`` computes log sigmoid(z) without forming sigmoid(z), so a large
    negative margin gives a large finite loss (about -z) instead of -log(0) = inf.
    """
    margin = r_chosen - r_rejected  # (B,) r(x, y_w) - r(x, y_l)
    return -F.logsigmoid(margin).mean()  # -E[log sigma(margin)]
