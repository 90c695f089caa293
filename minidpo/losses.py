"""The DPO loss and its close relatives, on sequence log-probabilities (PyTorch).

DPO (Rafailov et al. 2023, arXiv 2305.18290) turns the RLHF objective into a
classification loss on preference pairs. With h the policy's log-ratio margin over
the reference,

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),

the loss types are (names as in TRL's ``DPOTrainer``):

    "sigmoid"  DPO, Eq. 7:              -log sigma(beta h)
               with label_smoothing eps > 0, conservative DPO (cDPO, Mitchell 2023,
               "A note on DPO with noisy preferences", Eq. 3):
                                        -(1-eps) log sigma(beta h) - eps log sigma(-beta h)
    "robust"   robust DPO (Chowdhury et al. 2024, arXiv 2403.00409), an unbiased loss
               under labels flipped with probability eps:
                                        [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)]
                                        / (1 - 2 eps)
    "ipo"      IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17):  (h - 1/(2 beta))^2
    "hinge"    SLiC-HF calibration loss (Zhao et al. 2023, arXiv 2305.10425):
                                        relu(1 - beta h)

`bradley_terry_loss` is the reward model's loss that DPO replaces (Eq. 2): the same
-log sigma of a margin, on an explicit reward r(x, y) instead of beta h.

beta * (log pi - log pi_ref) is the implicit reward of Eq. 5 (up to beta log Z(x),
which cancels in every pair); it is returned, detached, for logging as TRL's
``rewards/chosen`` and ``rewards/rejected``.

Left out: computing the log-probs (see ``minidpo.logprobs``), the batch mean, and
the many later variants (KTO, ORPO, SimPO, ...). IPO's paper and TRL average the
token log-probs for IPO; here every loss takes whatever log-probs it is given
(summed, by the project's convention). ``minidpo.numpy_ref`` is the float64 NumPy
twin of this file with the gradients derived by hand.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minidpo.errors import MinidpoError

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "ipo", "hinge")


class PreferenceLoss(NamedTuple):
    """Per-pair losses and implicit rewards, each of shape (B,)."""

    losses: torch.Tensor  # (B,) differentiable; take .mean() for the batch loss
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi(y_w) - log pi_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (log pi(y_l) - log pi_ref(y_l)), detached


def check_loss_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise MinidpoError unless beta > 0, loss_type is known and 0 <= eps < 0.5."""
    if not beta > 0:
        raise MinidpoError(f"--beta: beta must be > 0, got {beta!r}")
    if loss_type not in LOSS_TYPES:
        raise MinidpoError(f"--loss: unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise MinidpoError(
            f"--label-smoothing: label_smoothing must be in [0, 0.5), got {label_smoothing!r}"
        )


def preference_loss(
    policy_chosen_logps: torch.Tensor,  # (B,) log pi_theta(y_w|x)
    policy_rejected_logps: torch.Tensor,  # (B,) log pi_theta(y_l|x)
    ref_chosen_logps: torch.Tensor,  # (B,) log pi_ref(y_w|x)
    ref_rejected_logps: torch.Tensor,  # (B,) log pi_ref(y_l|x)
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Per-pair preference losses for one batch of B pairs (see the module docstring).

    ``F.logsigmoid`` keeps the loss and its gradient finite for margins of any size.

    Example:
        >>> t = torch.tensor
        >>> out = preference_loss(t([-12.3]), t([-8.5]), t([-14.1]), t([-7.2]), beta=0.1)
        >>> round(out.losses.item(), 4)
        0.5501
    """
    check_loss_args(beta, loss_type, label_smoothing)
    eps = label_smoothing
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,) the margin inside Eq. 7
    if loss_type == "sigmoid":
        # Eq. 7, arXiv 2305.18290 (eps = 0); cDPO (Mitchell 2023, Eq. 3) for eps > 0
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        # robust DPO, arXiv 2403.00409: de-biased loss, sign as in the paper and TRL
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # Eq. 17, arXiv 2310.12036
    else:  # "hinge"
        losses = torch.relu(1 - beta * h)  # SLiC-HF calibration loss, arXiv 2305.10425
    # Eq. 5, arXiv 2305.18290: implicit reward r = beta log(pi/pi_ref) (+ beta log Z, dropped)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards)


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-pair reward-model loss (B,) from rewards (B,), (B,).

        -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2

    with m the optional margin (Llama 2) and c the centering coefficient (TRL).

    Example: r_w = 1, r_l = 0, no margin -> log(1 + e^-1) = 0.31326.
    """
    z = r_chosen - r_rejected  # (B,)
    if margin is not None:
        z = z - margin  # Llama 2 margin loss, Touvron et al. 2023, Eq. 2
    losses = -F.logsigmoid(z)  # Eq. 2, arXiv 2305.18290
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2  # TRL center_rewards
    return losses


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012): log(-expm1(x))
    near 0, log1p(-exp(x)) below -log 2. x = 0 (a certain token) gives -inf."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def unlikelihood_loss(
    chosen_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    alpha: float,
    min_unlikely: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair Unlikelihood loss (B,) from per-token log-probs and masks, (B, T) each:

        -log pi(y_w|x) - alpha * sum_t log(1 - pi(y_l,t | x, y_l,<t))

    the likelihood of the chosen response (the sum of its token log-probs) and the
    token-level unlikelihood of the rejected one (Welleck et al. 2019, arXiv 1908.04319,
    Eq. 4), the paper's Unlikelihood baseline (arXiv 2305.18290, Sec. 6). Each 1 - p is
    floored at `min_unlikely`, so a token the model is sure of costs -log(1e-6) = 13.8 at
    most, not infinity. Returns (losses, log pi(y_w|x), the unlikelihood sums), each (B,).

    Example: one chosen token at p = 0.5, one rejected token at p = 0.5, alpha = 1:
    -log 0.5 - log 0.5 = 1.3863.
    """
    chosen = (chosen_logps * chosen_mask).sum(-1)  # (B,)
    ceiling = math.log1p(-min_unlikely)  # log p <= log(1 - min_unlikely)
    unlikely = (log1mexp(rejected_logps.clamp(max=ceiling)) * rejected_mask).sum(-1)  # (B,)
    return -chosen - alpha * unlikely, chosen, unlikely
