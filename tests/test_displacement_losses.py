"""DPOP and DPO + NLL, the options of the preference loss against likelihood displacement.

Known answers worked by hand, the options' definitions checked for every loss type,
bit-identity with the plain losses when both are off, and their argument checks. The
hand gradients against autograd, down to the logits, are in tests/test_numpy_ref.py.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose

from minidpo import numpy_ref
from minidpo.config import DPOConfig, add_dataclass_args, resolve
from minidpo.errors import MinidpoError
from minidpo.losses import LOSS_TYPES, preference_loss

PAPER = (-12.3, -8.5, -14.1, -7.2)  # log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l)
# the same pair with the chosen response displaced: pi(y_w) below pi_ref(y_w)
DISPLACED = (-14.1, -8.5, -12.3, -7.2)
EPS_OF = {"sigmoid": 0.25, "robust": 0.25, "ipo": 0.0, "hinge": 0.0}


def _leaves(values, dtype=torch.float64):
    return [torch.tensor([v], dtype=dtype, requires_grad=True) for v in values]


def _sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpop_penalty_is_off_where_the_chosen_log_prob_rose():
    """The paper's pair: log pi(y_w) = -12.3 > log pi_ref(y_w) = -14.1, so
    max(0, -14.1 - (-12.3)) = max(0, -1.8) = 0 and DPOP at lambda = 50 is plain DPO:
    h = 1.8 - (-1.3) = 3.1, loss = log(1 + e^-0.31) = 0.5501, exactly the same bits."""
    plain = preference_loss(*_leaves(PAPER), beta=0.1)
    x = _leaves(PAPER)
    dpop = preference_loss(*x, beta=0.1, dpop_lambda=50.0)
    dpop.losses.sum().backward()
    assert torch.equal(dpop.losses, plain.losses), (dpop.losses, plain.losses)
    assert round(dpop.losses.item(), 4) == 0.5501
    assert dpop.dpop_penalty.item() == 0.0
    s = _sigma(-0.31)  # sigma(-beta h)
    torch.testing.assert_close(x[0].grad.item(), -0.1 * s, rtol=1e-12, atol=0)
    torch.testing.assert_close(x[2].grad.item(), 0.1 * s, rtol=1e-12, atol=0)
    out = numpy_ref.preference_loss(*PAPER, beta=0.1, dpop_lambda=50.0)
    assert_allclose(out.losses, [math.log1p(math.exp(-0.31))], rtol=1e-14)
    assert_allclose(out.grad_policy_chosen, [-0.1 * s], rtol=1e-14)


@pytest.mark.parametrize("lam", [1.0, 50.0])
def test_dpop_known_answer_where_the_chosen_log_prob_fell(lam):
    """Displaced pair: log pi(y_w) = -14.1 < log pi_ref(y_w) = -12.3, so the penalty is
    max(0, -12.3 + 14.1) = 1.8; h = -1.8 - (-1.3) = -0.5 and h~ = -0.5 - 1.8 lambda.
    lambda = 1: beta h~ = -0.23, loss = log(1 + e^0.23) = 0.81475,
                dL/d log pi(y_w) = -(1 + 1) 0.1 sigma(0.23) = -0.11145.
    lambda = 50: beta h~ = -9.05, loss = 9.05 + log(1 + e^-9.05) = 9.05012,
                dL/d log pi(y_w) = -51 * 0.1 sigma(9.05) = -5.0994."""
    u = 0.1 * (-0.5 - 1.8 * lam)  # beta h~
    want_loss = math.log1p(math.exp(-u))
    w = 0.1 * _sigma(-u)  # beta sigma(-beta h~)
    want = {"pi_c": -(1 + lam) * w, "pi_r": w, "ref_c": (1 + lam) * w, "ref_r": -w}
    if lam == 1.0:
        assert round(want_loss, 5) == 0.81475 and round(want["pi_c"], 5) == -0.11145
    else:
        assert round(want_loss, 5) == 9.05012 and round(want["pi_c"], 4) == -5.0994
    x = _leaves(DISPLACED)
    out = preference_loss(*x, beta=0.1, dpop_lambda=lam)
    out.losses.sum().backward()
    torch.testing.assert_close(out.losses.item(), want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.dpop_penalty.item(), 1.8, rtol=1e-12, atol=0)
    n = numpy_ref.preference_loss(*DISPLACED, beta=0.1, dpop_lambda=lam)
    assert_allclose(n.losses, [want_loss], rtol=1e-12)
    grads = [n.grad_policy_chosen, n.grad_policy_rejected, n.grad_ref_chosen, n.grad_ref_rejected]
    for (name, g), t, hand in zip(want.items(), x, grads, strict=True):
        torch.testing.assert_close(t.grad.item(), g, rtol=1e-12, atol=0, msg=f"autograd {name}")
        assert_allclose(hand, [g], rtol=1e-12, err_msg=f"numpy_ref {name}")
    # the implicit rewards stay beta * log-ratio: -0.18 and -0.13
    torch.testing.assert_close(out.chosen_rewards.item(), -0.18, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.rejected_rewards.item(), -0.13, rtol=1e-12, atol=0)


def test_nll_known_answer():
    """The paper's pair with |y_w| = 6 tokens and alpha = 0.5: NLL = 12.3 / 6 = 2.05,
    loss = 0.55011 + 0.5 * 2.05 = 1.57511, dL/d log pi(y_w) = -0.1 sigma(-0.31) - 0.5/6
    = -0.04231 - 0.08333 = -0.12564; the other three gradients are plain DPO's."""
    dpo = math.log1p(math.exp(-0.31))
    s = _sigma(-0.31)
    want_loss, want_grad = dpo + 0.5 * 12.3 / 6, -0.1 * s - 0.5 / 6
    assert round(want_loss, 5) == 1.57511 and round(want_grad, 5) == -0.12564
    x = _leaves(PAPER)
    lengths = torch.tensor([6.0], dtype=torch.float64)
    out = preference_loss(*x, beta=0.1, nll_alpha=0.5, chosen_lengths=lengths)
    out.losses.sum().backward()
    torch.testing.assert_close(out.losses.item(), want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.nll.item(), 2.05, rtol=1e-12, atol=0)
    torch.testing.assert_close(x[0].grad.item(), want_grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(x[1].grad.item(), 0.1 * s, rtol=1e-12, atol=0)
    torch.testing.assert_close(x[2].grad.item(), 0.1 * s, rtol=1e-12, atol=0)
    n = numpy_ref.preference_loss(*PAPER, beta=0.1, nll_alpha=0.5, chosen_lengths=[6])
    assert_allclose(n.losses, [want_loss], rtol=1e-12)
    assert_allclose(n.grad_policy_chosen, [want_grad], rtol=1e-12)
    assert_allclose(n.grad_ref_chosen, [0.1 * s], rtol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps_on", [False, True])
def test_dpop_is_the_loss_of_the_penalised_margin_for_every_loss_type(loss_type, eps_on):
    """The penalty is taken off h before any loss type or label smoothing: DPOP equals the
    plain loss of a pair whose rejected log-prob is raised by lambda * penalty."""
    eps = EPS_OF[loss_type] if eps_on else 0.0
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (5 * torch.randn(64, generator=g, dtype=torch.float64) for _ in range(4))
    lam = 2.5
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps)
    dpop = preference_loss(pc, pr, rc, rr, dpop_lambda=lam, **kw)
    penalty = torch.clamp(rc - pc, min=0)
    assert 0 < int((penalty > 0).sum()) < 64  # both sides of the kink are exercised
    shifted = preference_loss(pc, pr + lam * penalty, rc, rr, **kw)
    torch.testing.assert_close(dpop.losses, shifted.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dpop.dpop_penalty, penalty, rtol=0, atol=0)
    n = numpy_ref.preference_loss(pc.numpy(), pr.numpy(), rc.numpy(), rr.numpy(),
                                  dpop_lambda=lam, **kw)  # fmt: skip
    assert_allclose(n.losses, dpop.losses.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nll_adds_alpha_times_the_mean_token_nll_for_every_loss_type(loss_type):
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (5 * torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4))
    pc = -pc.abs()  # a log-prob
    lengths = torch.randint(1, 20, (16,), generator=g).double()
    kw = dict(beta=0.5, loss_type=loss_type, label_smoothing=EPS_OF[loss_type])
    plain = preference_loss(pc, pr, rc, rr, **kw)
    rpo = preference_loss(pc, pr, rc, rr, nll_alpha=0.7, chosen_lengths=lengths, **kw)
    torch.testing.assert_close(rpo.losses - plain.losses, 0.7 * (-pc / lengths), rtol=1e-12,
                               atol=1e-12)  # fmt: skip
    assert (rpo.nll > 0).all() and not rpo.nll.requires_grad


def _losses_before(pc, pr, rc, rr, beta, loss_type, eps):
    """The per-pair losses exactly as minidpo.losses computed them before the options."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return torch.relu(1 - beta * h)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options_off_give_the_same_bits_as_before(loss_type, dtype):
    g = torch.Generator().manual_seed(5)
    x = [3 * torch.randn(32, generator=g, dtype=dtype) for _ in range(4)]
    cfg = DPOConfig(loss=loss_type, label_smoothing=EPS_OF[loss_type])
    leaves = [v.clone().requires_grad_() for v in x]
    out = preference_loss(*leaves, beta=cfg.beta, loss_type=cfg.loss,
                          label_smoothing=cfg.label_smoothing, nll_alpha=cfg.nll_alpha,
                          dpop_lambda=cfg.dpop_lambda,
                          chosen_lengths=torch.full((32,), 7.0, dtype=dtype))  # fmt: skip
    old_leaves = [v.clone().requires_grad_() for v in x]
    old = _losses_before(*old_leaves, cfg.beta, cfg.loss, cfg.label_smoothing)
    assert torch.equal(out.losses, old), (out.losses - old).abs().max()
    assert out.nll is None and out.dpop_penalty is None
    out.losses.sum().backward()
    old.sum().backward()
    for name, a, b in zip(("pi_c", "pi_r", "ref_c", "ref_r"), leaves, old_leaves, strict=True):
        assert torch.equal(a.grad, b.grad), (name, (a.grad - b.grad).abs().max())


def test_numpy_options_off_give_the_same_bits():
    rng = np.random.default_rng(6)
    x = [rng.normal(scale=3.0, size=9) for _ in range(4)]
    for loss_type in LOSS_TYPES:
        kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=EPS_OF[loss_type])
        a = numpy_ref.preference_loss(*x, **kw)
        b = numpy_ref.preference_loss(*x, nll_alpha=0.0, dpop_lambda=0.0, chosen_lengths=[1] * 9,
                                      **kw)  # fmt: skip
        for name in a._fields:
            assert np.array_equal(getattr(a, name), getattr(b, name)), (loss_type, name)
        h = (x[0] - x[2]) - (x[1] - x[3])
        if loss_type == "hinge":
            assert np.array_equal(a.losses, np.maximum(0.0, 1 - 0.2 * h))
            assert np.array_equal(a.grad_ref_chosen, -np.where(1 - 0.2 * h > 0, -0.2, 0.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nll_alpha": -0.1}, "--nll-alpha"),
        ({"nll_alpha": float("nan")}, "--nll-alpha"),
        ({"nll_alpha": float("inf")}, "--nll-alpha"),
        ({"dpop_lambda": -1.0}, "--dpop-lambda"),
        ({"dpop_lambda": float("nan")}, "--dpop-lambda"),
        ({"dpop_lambda": float("inf")}, "--dpop-lambda"),
        ({"beta": float("inf")}, "--beta"),
    ],
)
def test_bad_weights_raise_one_line_errors_naming_the_flag(kwargs, match):
    kwargs = {"beta": 0.1, **kwargs}
    with pytest.raises(MinidpoError, match=match):
        preference_loss(*_leaves(PAPER), chosen_lengths=torch.ones(1), **kwargs)
    with pytest.raises(MinidpoError, match=match):
        numpy_ref.preference_loss(*PAPER, chosen_lengths=[1], **kwargs)


def test_nll_without_lengths_is_a_programming_error():
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(*_leaves(PAPER), beta=0.1, nll_alpha=1.0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        numpy_ref.preference_loss(*PAPER, beta=0.1, nll_alpha=1.0)


@pytest.mark.parametrize("prefix", ["", "dpo_"])
def test_flags_come_from_the_config_fields(prefix):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, DPOConfig, "dpo", prefix=prefix)
    flag = "--" + prefix.replace("_", "-")
    args = parser.parse_args([f"{flag}nll-alpha", "0.5", f"{flag}dpop-lambda", "50"])
    cfg = resolve(DPOConfig, "dpo", "tiny", args, prefix=prefix)
    assert (cfg.nll_alpha, cfg.dpop_lambda) == (0.5, 50.0)
    default = resolve(DPOConfig, "dpo", "tiny", None)
    assert (default.nll_alpha, default.dpop_lambda) == (0.0, 0.0)
