"""Solution to the exercise of lesson 07: the DPO gradient with respect to the logits, by hand.

Float64 NumPy, no autograd, and on purpose none of ``minidpo.numpy_ref``: the three
links of the chain rule are written out here (the lesson's section 2 derives them).
"""

import numpy as np


def dpo_logit_grad(
    logits: np.ndarray,  # (2B, T, V) policy logits, rows [chosen; rejected]
    labels: np.ndarray,  # (2B, T) token ids
    mask: np.ndarray,  # (2B, T) response mask, 0/1
    ref_logps: np.ndarray,  # (2B,) reference sequence log-probs, same row order
    beta: float,
) -> np.ndarray:
    """dL/dlogits (2B, T, V) of L = (1/B) sum_i -log sigmoid(beta h_i) (Eq. 7, arXiv 2305.18290).

    h_i = (S_i - ref_i) - (S_{B+i} - ref_{B+i}) with S the masked summed log-probs. Chain:
    dL/dS_i = -(beta/B) sigmoid(-beta h_i) for a chosen row, +(beta/B) sigmoid(-beta h_i)
    for its rejected row; dS_n/dz_nt = m_nt (onehot(y_nt) - softmax(z_nt)).
    """
    z = np.asarray(logits, dtype=np.float64)  # (2B, T, V)
    y = np.asarray(labels)[..., None]  # (2B, T, 1)
    m = np.asarray(mask, dtype=np.float64)  # (2B, T)
    b = z.shape[0] // 2
    shifted = z - z.max(axis=-1, keepdims=True)  # the max shift keeps exp finite
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (2B, T, V)
    seq = (np.take_along_axis(logp, y, axis=-1)[..., 0] * m).sum(axis=-1)  # (2B,) S
    logratio = seq - np.asarray(ref_logps, dtype=np.float64)  # (2B,)
    h = logratio[:b] - logratio[b:]  # (B,) the margin inside Eq. 7
    weight = np.exp(-np.logaddexp(0.0, beta * h))  # (B,) sigmoid(-beta h), finite for any h
    dl_dseq = beta / b * np.concatenate([-weight, weight])  # (2B,) dh/dS = +1 chosen, -1 rejected
    onehot = np.zeros_like(z)  # (2B, T, V)
    np.put_along_axis(onehot, y, 1.0, axis=-1)
    return (dl_dseq[:, None, None] * m[..., None]) * (onehot - np.exp(logp))  # (2B, T, V)
