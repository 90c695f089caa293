"""Solution to the exercise of lesson 03 (SFT): the masked next-token loss."""

from __future__ import annotations

import torch


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions: the SFT loss on response tokens.

    logits (B, T, V), labels (B, T) long with -1 on padding, mask (B, T) float -> scalar.
    -log softmax(logits)[label] at each position, times the mask, summed, divided by the
    mask's sum. Padding labels (-1) are replaced by 0 before the lookup (any valid index
    would do: the mask is 0 there, so their value never reaches the loss).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (nll * mask).sum() / mask.sum()
