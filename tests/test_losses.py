"""Known answers, stability and argument checks for minidpo.losses.preference_loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.errors import MinidpoError
from minidpo.losses import LOSS_TYPES, preference_loss

LN3 = math.log(3.0)


def _pair(h: float, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """One pair with margin h: chosen log-ratio h/2 + 1, rejected log-ratio 1 - h/2."""
    t = lambda x: torch.tensor([x], dtype=dtype, requires_grad=True)  # noqa: E731
    return t(-2.0 + h / 2), t(-4.0 - h / 2), t(-3.0), t(-5.0)


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps", "want_loss", "want_grad_chosen"),
    [
        # h = 1, beta = ln 3: sigma(beta h) = 3/4, so -log sigma = ln(4/3),
        # dL/d log pi(y_w) = -beta sigma(-beta h) = -ln3 / 4
        ("sigmoid", LN3, 0.0, math.log(4 / 3), -LN3 / 4),
        # cDPO: 0.9 ln(4/3) + 0.1 ln 4; grad beta(-0.9 * 1/4 + 0.1 * 3/4) = -0.15 ln 3
        ("sigmoid", LN3, 0.1, 0.9 * math.log(4 / 3) + 0.1 * math.log(4), -0.15 * LN3),
        # robust: (0.9 ln(4/3) - 0.1 ln 4) / 0.8; grad beta(-0.9/4 - 0.1 * 3/4) / 0.8
        ("robust", LN3, 0.1, (0.9 * math.log(4 / 3) - 0.1 * math.log(4)) / 0.8, -0.375 * LN3),
        ("robust", LN3, 0.0, math.log(4 / 3), -LN3 / 4),
        # IPO: (1 - 1/(2 * 0.25))^2 = 1, grad 2 (1 - 2) = -2; beta = 0.5: exactly 0, grad 0
        ("ipo", 0.25, 0.0, 1.0, -2.0),
        ("ipo", 0.5, 0.0, 0.0, 0.0),
        # hinge: relu(1 - 0.5) = 0.5, grad -beta; beta = 2: relu(-1) = 0, grad 0
        ("hinge", 0.5, 0.0, 0.5, -0.5),
        ("hinge", 2.0, 0.0, 0.0, 0.0),
    ],
)
def test_known_answers_at_margin_one(loss_type, beta, eps, want_loss, want_grad_chosen):
    pc, pr, rc, rr = _pair(1.0)
    out = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    out.losses.sum().backward()
    torch.testing.assert_close(out.losses.item(), want_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pc.grad.item(), want_grad_chosen, rtol=1e-12, atol=1e-15)
    # h depends on the rejected log-prob with the opposite sign, on the refs oppositely
    torch.testing.assert_close(pr.grad.item(), -want_grad_chosen, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rc.grad.item(), -want_grad_chosen, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rr.grad.item(), want_grad_chosen, rtol=1e-12, atol=1e-15)


def test_zero_margin_gives_log_two_for_the_logistic_losses():
    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.3), ("robust", 0.3)]:
        out = preference_loss(*_pair(0.0), beta=0.7, loss_type=loss_type, label_smoothing=eps)
        torch.testing.assert_close(out.losses.item(), math.log(2), rtol=1e-12, atol=0)


def test_implicit_rewards_are_beta_log_ratios_and_detached():
    pc, pr, rc, rr = _pair(1.0)  # chosen log-ratio 1.5, rejected 0.5
    out = preference_loss(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(out.chosen_rewards.item(), 0.3, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.rejected_rewards.item(), 0.1, rtol=1e-12, atol=0)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_margins_stay_finite_with_finite_gradients(loss_type, dtype):
    h = torch.tensor([1e4, -1e4, 0.0], dtype=dtype)
    pc = (h / 2).requires_grad_()
    pr = (-h / 2).requires_grad_()
    zeros = torch.zeros(3, dtype=dtype)
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    out = preference_loss(pc, pr, zeros, zeros, beta=1.0, loss_type=loss_type, label_smoothing=eps)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all(), out.losses
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), (pc.grad, pr.grad)
    if loss_type == "sigmoid" and dtype == torch.float64:
        # -log sigma(-1e4) = 1e4 + log(1 + e^-1e4) = 1e4 exactly in float64
        want = torch.tensor([0.1 * 1e4, 0.9 * 1e4, math.log(2)], dtype=dtype)
        torch.testing.assert_close(out.losses, want, rtol=1e-12, atol=1e-12)


def test_robust_loss_is_unbiased_under_label_flips():
    """Chowdhury et al.'s defining property: E over flips with prob eps = the clean DPO loss."""
    h = torch.linspace(-5, 5, 11, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    eps, beta = 0.2, 0.7
    kept = preference_loss(
        h, zeros, zeros, zeros, beta=beta, loss_type="robust", label_smoothing=eps
    )
    flipped = preference_loss(
        zeros, h, zeros, zeros, beta=beta, loss_type="robust", label_smoothing=eps
    )
    clean = preference_loss(h, zeros, zeros, zeros, beta=beta)
    expected = (1 - eps) * kept.losses + eps * flipped.losses
    torch.testing.assert_close(expected, clean.losses, rtol=1e-12, atol=1e-14)


@settings(max_examples=50, deadline=None)
@given(
    h=st.floats(-50, 50),
    beta=st.floats(0.01, 5.0),
    eps=st.floats(0.0, 0.49),
)
def test_cdpo_is_dpo_on_soft_labels(h, beta, eps):
    """cDPO = (1-eps) * DPO(y_w > y_l) + eps * DPO(y_l > y_w), the swapped pair."""
    x = torch.tensor([h], dtype=torch.float64)
    z = torch.zeros(1, dtype=torch.float64)
    soft = preference_loss(x, z, z, z, beta=beta, label_smoothing=eps).losses
    fwd = preference_loss(x, z, z, z, beta=beta).losses
    back = preference_loss(z, x, z, z, beta=beta).losses
    torch.testing.assert_close(soft, (1 - eps) * fwd + eps * back, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": -0.01}, "label_smoothing"),
        ({"beta": 0.1, "loss_type": "kto"}, "loss_type"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    with pytest.raises(MinidpoError, match=match):
        preference_loss(*_pair(1.0), **kwargs)


def test_batch_shapes_are_kept():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(5, generator=g) for _ in range(4)]
    for loss_type in LOSS_TYPES:
        out = preference_loss(*x, beta=0.1, loss_type=loss_type)
        assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (5,)
