"""Solution to the exercise of lesson 10 (limits and what came after)."""

import numpy as np


def grpo_advantages(rewards: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """GRPO's group-relative advantage (Shao et al. 2024, arXiv 2402.03300, Sec. 4.1.2).

    rewards: (prompts, G), one row per group of G responses to the same prompt.
    Returns (r - mean of the row) / (std of the row + eps), the std with Bessel's
    correction (ddof=1, as torch.std and TRL use); a row of equal rewards gets 0.
    """
    r = np.asarray(rewards, dtype=np.float64)  # (P, G)
    mean = r.mean(axis=1, keepdims=True)  # (P, 1)
    std = r.std(axis=1, ddof=1, keepdims=True)  # (P, 1)
    return (r - mean) / (std + eps)
