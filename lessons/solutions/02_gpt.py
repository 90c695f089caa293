"""Solution to the exercise of lesson 02 (the tiny GPT): causal attention for one head."""

from __future__ import annotations

import math

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M) v for one head, M = -inf above the diagonal.

    q, k, v: (T, d) -> (T, d). Row i averages the values of positions j <= i,
    weighted by the softmax of their scaled dot products with query i
    (Vaswani et al. 2017, Eq. 1, with the causal mask of a decoder).
    """
    T, d = q.shape
    scores = q @ k.T / math.sqrt(d)  # (T, T): query i against key j
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))  # j > i gets weight exp(-inf) = 0
    return torch.softmax(scores, dim=-1) @ v  # (T, d)
