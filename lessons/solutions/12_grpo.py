"""Solution to the exercise of lesson 12 (GRPO)."""

import numpy as np


def k3(logp: np.ndarray, ref_logp: np.ndarray) -> np.ndarray:
    """GRPO's per-token KL estimate (Shao et al. 2024, Eq. 4) at sampled tokens:
    pi_ref/pi - log(pi_ref/pi) - 1, computed from log-probs."""
    u = np.asarray(ref_logp, dtype=np.float64) - np.asarray(logp, dtype=np.float64)
    return np.exp(u) - u - 1
