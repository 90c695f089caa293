"""The DPO loss and its close relatives, on sequence log-probabilities (PyTorch).

DPO (Rafailov et al. 2023, arXiv 2305.18290) turns the RLHF objective into a
classification loss on preference pairs. With h the policy's log-ratio margin over
the reference,

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),

the loss types are (names as in TRL's ``DPOTrainer``; which version each matches is below):

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

Two options against likelihood displacement, DPO lowering log pi(y_w|x) along with
log pi(y_l|x) while their margin grows (Razin et al. 2024, arXiv 2410.08847); each is
off at 0 and then skipped entirely, so the losses above are computed bit for bit:

    dpop_lambda  DPOP (Pal et al. 2024, "Smaug", arXiv 2402.13228, Eq. 3), with the
                 penalised margin h~ = h - lambda max(0, log pi_ref(y_w|x) - log pi(y_w|x)):
                                        -log sigma(beta h~)
                 The penalty is subtracted from h before the loss type is applied, so
                 every loss type and label smoothing see the penalised margin h~ in place
                 of h (cDPO's eps term included: it is cDPO on h~, not DPOP of the swapped
                 pair). The paper defines it for "sigmoid" only; the others are this
                 project's extension. The implicit rewards stay beta (log pi - log pi_ref).
    nll_alpha    DPO + NLL (RPO, Pang et al. 2024, arXiv 2404.19733; TRL's ``rpo_alpha``,
                 ``loss_type=["sigmoid", "sft"]``), added to any loss type L:
                                        L + alpha NLL,   NLL = -log pi(y_w|x) / |y_w|
                 the chosen response's mean token NLL, |y_w| its tokens in the response
                 mask (end-of-text included). This is a per-pair mean; TRL's "sft" term
                 averages over all chosen tokens of the batch (a token mean), which equals
                 the batch mean of this only when the chosen lengths are equal.

`bradley_terry_loss` is the reward model's loss that DPO replaces (Eq. 2): the same
-log sigma of a margin, on an explicit reward r(x, y) instead of beta h.

beta * (log pi - log pi_ref) is the implicit reward of Eq. 5 (up to beta log Z(x),
which cancels in every pair); it is returned, detached, for logging as TRL's
``rewards/chosen`` and ``rewards/rejected``.

Which TRL version each name matches (read in the code of TRL 0.28.0, 0.29.0, 1.16.0;
`tests/test_trl_parity.py` runs the pinned 1.16.0 against this file):
- "sigmoid", "robust", "hinge": the same formulas in all three; the parity test
  trains each side by side with TRL's DPOTrainer and the losses agree to 3e-7.
- cDPO ("sigmoid" with label_smoothing > 0) is TRL's ``sigmoid`` + ``label_smoothing``
  up to 0.28 only: from 0.29 on TRL ignores ``label_smoothing`` for ``sigmoid`` (it
  serves ``robust``, ``exo_pair`` and the ``aot`` losses), and has no cDPO.
- "ipo" is not TRL's: TRL (0.28 and 1.16 alike) divides each response's log-ratio by its
  length before Eq. 17, so the same beta means something else there. Here every loss
  takes whatever log-probs it is given (summed, by the project's convention, which is
  how the paper writes Eq. 17).

Left out: computing the log-probs (see ``minidpo.logprobs``), the batch mean, and
the many later variants (KTO, ORPO, SimPO, ...). ``minidpo.numpy_ref`` is the float64 NumPy
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
    nll: torch.Tensor | None = None  # (B,) -log pi(y_w) / |y_w|, detached; None: nll_alpha = 0
    dpop_penalty: torch.Tensor | None = None  # (B,) DPOP's max(0, ...), detached; None: lambda 0


def check_loss_args(
    beta: float,
    loss_type: str,
    label_smoothing: float,
    *,
    nll_alpha: float = 0.0,
    dpop_lambda: float = 0.0,
) -> None:
    """Raise MinidpoError unless beta is finite and > 0, loss_type is known, 0 <= eps < 0.5,
    and nll_alpha, dpop_lambda are finite and >= 0 (each message names its flag)."""
    if not (beta > 0 and math.isfinite(beta)):
        raise MinidpoError(f"--beta: beta must be finite and > 0, got {beta!r}")
    if loss_type not in LOSS_TYPES:
        raise MinidpoError(f"--loss: unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise MinidpoError(
            f"--label-smoothing: label_smoothing must be in [0, 0.5), got {label_smoothing!r}"
        )
    for name, value in (("nll_alpha", nll_alpha), ("dpop_lambda", dpop_lambda)):
        if not (value >= 0 and math.isfinite(value)):
            flag = "--" + name.replace("_", "-")
            raise MinidpoError(f"{flag}: {name} must be finite and >= 0, got {value!r}")


def preference_loss(
    policy_chosen_logps: torch.Tensor,  # (B,) log pi_theta(y_w|x)
    policy_rejected_logps: torch.Tensor,  # (B,) log pi_theta(y_l|x)
    ref_chosen_logps: torch.Tensor,  # (B,) log pi_ref(y_w|x)
    ref_rejected_logps: torch.Tensor,  # (B,) log pi_ref(y_l|x)
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_alpha: float = 0.0,
    dpop_lambda: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,  # (B,) |y_w| in tokens; needed if nll_alpha > 0
) -> PreferenceLoss:
    """Per-pair preference losses for one batch of B pairs (see the module docstring).

    ``F.logsigmoid`` keeps the loss and its gradient finite for margins of any size.
    `chosen_lengths` counts each chosen response's masked tokens (the loader refuses
    empty responses, so each is >= 1).

    Example:
        >>> t = torch.tensor
        >>> out = preference_loss(t([-12.3]), t([-8.5]), t([-14.1]), t([-7.2]), beta=0.1)
        >>> round(out.losses.item(), 4)
        0.5501
    """
    check_loss_args(beta, loss_type, label_smoothing, nll_alpha=nll_alpha, dpop_lambda=dpop_lambda)
    eps = label_smoothing
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,) the margin inside Eq. 7
    penalty = None
    if dpop_lambda:
        # DPOP, Eq. 3 of arXiv 2402.13228: max(0, log pi_ref(y_w) - log pi(y_w)), kink gradient 0
        penalty = torch.relu(-chosen_logratios)  # (B,)
        h = h - dpop_lambda * penalty  # (B,) the penalised margin h~, for every loss type
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
    nll = None
    if nll_alpha:
        if chosen_lengths is None:
            raise ValueError("preference_loss: nll_alpha > 0 needs chosen_lengths")
        nll = -policy_chosen_logps / chosen_lengths  # (B,) mean token NLL of y_w
        losses = losses + nll_alpha * nll  # DPO + NLL (RPO), arXiv 2404.19733
    # Eq. 5, arXiv 2305.18290: implicit reward r = beta log(pi/pi_ref) (+ beta log Z, dropped)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    nll = None if nll is None else nll.detach()
    penalty = None if penalty is None else penalty.detach()
    return PreferenceLoss(losses, chosen_rewards, rejected_rewards, nll, penalty)


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
