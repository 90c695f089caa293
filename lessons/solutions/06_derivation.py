"""Solution to the optional exercise of lesson 06 (the derivation)."""

import numpy as np


def optimal_log_policy(log_pi_ref: np.ndarray, reward: np.ndarray, beta: float) -> np.ndarray:
    """log pi*(y|x) of Eq. 4 (arXiv 2305.18290): log pi_ref + r/beta - log Z(x), per row.

    log Z(x) = log sum_y exp(log pi_ref + r/beta) is computed with the row maximum
    subtracted first, so that exp never overflows however small beta is.
    """
    logits = np.asarray(log_pi_ref, dtype=np.float64) + np.asarray(reward) / beta  # (P, R)
    m = logits.max(axis=-1, keepdims=True)  # (P, 1)
    log_z = m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))  # (P, 1)
    return logits - log_z
