"""A float64 NumPy reference for the preference losses, with gradients derived by hand.

The same loss family as ``minidpo.losses`` (DPO Eq. 7 of arXiv 2305.18290, cDPO,
robust DPO, IPO, SLiC hinge; the DPOP penalty and the DPO + NLL term), written
without autograd so that every derivative is on the page and can be checked against
torch autograd to 1e-10.

Derivation. Write a_w = log pi(y_w|x), a_l = log pi(y_l|x), their reference twins
b_w, b_l, and

    h = (a_w - b_w) - (a_l - b_l),      u = beta h,      sigma(u) = 1 / (1 + e^-u).

Two facts do all the work: d/du log sigma(u) = sigma(-u) and d/du log sigma(-u) = -sigma(u).
Each loss depends on the log-probs only through h, and dh/da_w = +1, dh/da_l = -1
(dh/db_w = -1, dh/db_l = +1), so dL/da_w = dL/dh and dL/da_l = -dL/dh with

    sigmoid (DPO, Eq. 7; cDPO for eps > 0)
        L     = -(1-eps) log sigma(u) - eps log sigma(-u)
        dL/dh = beta [-(1-eps) sigma(-u) + eps sigma(u)]
        eps = 0:  dL/da_w = -beta sigma(-beta h),   dL/da_l = +beta sigma(-beta h)
        (the weight sigma(-beta h) is large when the implicit reward orders the pair
        wrongly; this is the gradient shown in Sec. 4 of the DPO paper)
    robust (arXiv 2403.00409)
        L     = [-(1-eps) log sigma(u) + eps log sigma(-u)] / (1 - 2 eps)
        dL/dh = beta [-(1-eps) sigma(-u) - eps sigma(u)] / (1 - 2 eps)
    ipo (arXiv 2310.12036, Eq. 17)
        L     = (h - 1/(2 beta))^2
        dL/dh = 2 (h - 1/(2 beta))
    hinge (SLiC-HF, arXiv 2305.10425)
        L     = max(0, 1 - u)
        dL/dh = -beta if u < 1 else 0      (0 at the kink, as torch.relu's gradient)

The two options against likelihood displacement (see ``minidpo.losses``):

    DPOP (arXiv 2402.13228, Eq. 3) puts the penalised margin in place of h in every loss,
        h~ = h - lambda max(0, b_w - a_w),   k = 1[b_w > a_w]  (0 at the kink, as torch.relu)
        dh~/da_w = 1 + lambda k,   dh~/db_w = -(1 + lambda k),   dh~/da_l = -1,   dh~/db_l = +1
    so dL/da_w = (1 + lambda k) dL/dh~ and dL/db_w = -(1 + lambda k) dL/dh~: while the
    chosen response sits below the reference, the margin's pull on a_w is (1 + lambda)-fold.
    DPO + NLL (RPO, arXiv 2404.19733) adds alpha NLL with NLL = -a_w / n_w (n_w = |y_w|
    in tokens), which touches a_w only:
        dL/da_w += -alpha / n_w.

From sequence log-probs to logits. A sequence log-prob is a masked sum over its
tokens, S = sum_t m_t log softmax(z_t)[y_t], with z_t in R^V the logits at step t.
Since log softmax(z)[y] = z_y - log sum_v exp(z_v),

    d log softmax(z)[y] / dz = onehot(y) - softmax(z),   so   dS/dz_t = m_t (onehot(y_t) - softmax(z_t)).

For a batch that is the concatenation [chosen; rejected] of 2B sequences and the
batch loss mean_i L_i over the B pairs, row i < B gets dL/dS_i = (1/B) dL_i/da_w
and row B + i gets dL/dS_{B+i} = (1/B) dL_i/da_l; the chain rule multiplies these
into dS/dz_t above.

For DPO + NLL, n_w is the chosen row's mask sum; the NLL's gradient takes the same
route, dL/dS_i gaining -alpha / (B n_w,i).

Left out: anything but float64 NumPy; no batching tricks, no reference-model
gradients through logits (the reference is frozen).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minidpo.losses import check_loss_args


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log sum exp(x) along `axis` (dropped), shifted by the max so nothing overflows."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax over the last axis: z - logsumexp(z).

    Example:
        >>> np.round(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), 6).tolist()
        [0.25, 0.75]
    """
    z = np.asarray(z, dtype=np.float64)
    return z - logsumexp(z, axis=-1)[..., None]


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log sigma(x) = -log(1 + e^-x), finite for any finite x."""
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """sigma(x) = exp(log sigma(x)), without overflow for large |x|."""
    return np.exp(log_sigmoid(x))


def sequence_logprobs(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked summed log-probs: S_n = sum_t m_nt log softmax(z_nt)[y_nt].

    logits (N, T, V), labels (N, T) integer token ids, mask (N, T) of 0/1 -> (N,).
    Labels at masked positions are still looked up, so they must be valid ids.
    """
    logp = log_softmax(logits)  # (N, T, V)
    token_logp = np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # (N, T)
    return np.sum(token_logp * mask, axis=-1)  # (N,)


class PreferenceLossNP(NamedTuple):
    """Per-pair losses, implicit rewards and hand-derived gradients, each of shape (B,).

    The gradients are of the per-pair loss L_i with respect to pair i's own inputs
    (equivalently, of sum_i L_i).
    """

    losses: np.ndarray
    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    grad_policy_chosen: np.ndarray  # dL_i / d log pi(y_w)
    grad_policy_rejected: np.ndarray  # dL_i / d log pi(y_l)
    grad_ref_chosen: np.ndarray  # dL_i / d log pi_ref(y_w)
    grad_ref_rejected: np.ndarray  # dL_i / d log pi_ref(y_l)


def preference_loss(
    policy_chosen_logps: np.ndarray,  # (B,)
    policy_rejected_logps: np.ndarray,  # (B,)
    ref_chosen_logps: np.ndarray,  # (B,)
    ref_rejected_logps: np.ndarray,  # (B,)
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_alpha: float = 0.0,
    dpop_lambda: float = 0.0,
    chosen_lengths: np.ndarray | None = None,  # (B,) |y_w| in tokens; needed if nll_alpha > 0
) -> PreferenceLossNP:
    """The losses of ``minidpo.losses.preference_loss`` and their gradients, in float64."""
    check_loss_args(beta, loss_type, label_smoothing, nll_alpha=nll_alpha, dpop_lambda=dpop_lambda)
    eps = label_smoothing
    a_w, a_l, b_w, b_l = (
        np.asarray(v, dtype=np.float64)
        for v in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )
    h = (a_w - b_w) - (a_l - b_l)  # (B,)
    slope_w = 1.0  # dh~/da_w; x * 1.0 is exact, so lambda = 0 changes no bit
    if dpop_lambda:
        # DPOP, arXiv 2402.13228 Eq. 3: h~ = h - lambda max(0, b_w - a_w)
        h = h - dpop_lambda * np.maximum(0.0, b_w - a_w)
        slope_w = np.where(b_w - a_w > 0, 1.0 + dpop_lambda, 1.0)  # (B,) 1 + lambda k
    u = beta * h
    if loss_type == "sigmoid":
        # Eq. 7, arXiv 2305.18290; cDPO for eps > 0
        losses = -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
        dl_dh = beta * (-(1 - eps) * sigmoid(-u) + eps * sigmoid(u))
    elif loss_type == "robust":
        # robust DPO, arXiv 2403.00409
        losses = (-(1 - eps) * log_sigmoid(u) + eps * log_sigmoid(-u)) / (1 - 2 * eps)
        dl_dh = beta * (-(1 - eps) * sigmoid(-u) - eps * sigmoid(u)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # Eq. 17, arXiv 2310.12036
        dl_dh = 2 * (h - 1 / (2 * beta))
    else:  # "hinge", SLiC-HF arXiv 2305.10425
        losses = np.maximum(0.0, 1 - u)
        dl_dh = np.where(1 - u > 0, -beta, 0.0)
    grad_chosen = dl_dh * slope_w  # dh~/da_w = 1 + lambda k
    if nll_alpha:
        if chosen_lengths is None:
            raise ValueError("preference_loss: nll_alpha > 0 needs chosen_lengths")
        n_w = np.asarray(chosen_lengths, dtype=np.float64)
        losses = losses + nll_alpha * (-a_w / n_w)  # DPO + NLL (RPO), arXiv 2404.19733
        grad_chosen = grad_chosen - nll_alpha / n_w  # d(-alpha a_w / n_w)/da_w
    return PreferenceLossNP(
        losses=losses,
        chosen_rewards=beta * (a_w - b_w),  # Eq. 5, arXiv 2305.18290, beta log Z dropped
        rejected_rewards=beta * (a_l - b_l),
        grad_policy_chosen=grad_chosen,
        grad_policy_rejected=-dl_dh,  # dh/da_l = -1
        grad_ref_chosen=-dl_dh * slope_w,  # dh~/db_w = -(1 + lambda k)
        grad_ref_rejected=dl_dh,
    )


def dpo_logit_gradient(
    logits: np.ndarray,  # (2B, T, V) policy logits, rows [chosen; rejected]
    labels: np.ndarray,  # (2B, T) token ids
    mask: np.ndarray,  # (2B, T) response mask, 0/1
    ref_logps: np.ndarray,  # (2B,) reference sequence log-probs, same row order
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    nll_alpha: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[float, np.ndarray]:
    """Mean preference loss over the B pairs and its gradient w.r.t. the logits (2B, T, V).

    The batch is the concatenation [chosen; rejected]: rows 0..B-1 are y_w, rows
    B..2B-1 the matching y_l; |y_w| for DPO + NLL is a chosen row's mask sum. See the
    module docstring for the derivation.
    """
    logits = np.asarray(logits, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    n = logits.shape[0]
    if n % 2:
        raise ValueError(f"batch of {n} rows is not [chosen; rejected]")
    b = n // 2
    logp = log_softmax(logits)  # (2B, T, V)
    token_logp = np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # (2B, T)
    seq = np.sum(token_logp * mask, axis=-1)  # (2B,)
    ref = np.asarray(ref_logps, dtype=np.float64)
    out = preference_loss(
        seq[:b], seq[b:], ref[:b], ref[b:],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        nll_alpha=nll_alpha, dpop_lambda=dpop_lambda, chosen_lengths=mask[:b].sum(-1),
    )  # fmt: skip
    # dL/dS per row for the mean over B pairs
    dl_dseq = np.concatenate([out.grad_policy_chosen, out.grad_policy_rejected]) / b  # (2B,)
    onehot = np.zeros_like(logits)  # (2B, T, V)
    np.put_along_axis(onehot, labels[..., None], 1.0, axis=-1)
    # dS/dz_t = m_t (onehot(y_t) - softmax(z_t))
    dlogits = (dl_dseq[:, None, None] * mask[..., None]) * (onehot - np.exp(logp))  # (2B, T, V)
    return float(np.mean(out.losses)), dlogits
