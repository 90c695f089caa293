"""Known answers and reference loops for minidpo.ppo_math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    explained_variance,
    kl_penalized_rewards,
    last_token_index,
    policy_loss,
    value_loss,
    whiten,
)

D = torch.float64
TOL = dict(atol=1e-12, rtol=0)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=D)


def test_last_token_index():
    mask = t([[0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 0]


def test_kl_penalized_rewards_known_answer():
    # Row 0: kl = [0.5, -1.0] -> -0.1 kl = [-0.05, 0.1]; score 1 added at the last token.
    # Row 1: a prompt position (mask 0) and padding get nothing; score -2 at index 1.
    score = t([1.0, -2.0])
    logp = t([[-1.0, -2.0, 0.0], [-9.0, -1.0, -3.0]])
    ref = t([[-1.5, -1.0, 0.0], [-1.0, -2.0, -3.0]])
    mask = t([[1, 1, 0], [0, 1, 0]])
    got = kl_penalized_rewards(score, logp, ref, mask, kl_coef=0.1)
    want = t([[-0.05, 0.1 + 1.0, 0.0], [0.0, -0.1 - 2.0, 0.0]])
    torch.testing.assert_close(got, want, **TOL, msg="per-token KL-penalised rewards")
    # The per-token rewards sum to score - beta * sequence log-ratio (Ziegler Eq. 2).
    seq = score - 0.1 * ((logp - ref) * mask).sum(1)
    torch.testing.assert_close(got.sum(1), seq, **TOL, msg="sum of rewards")


def test_kl_penalized_rewards_rejects_empty_row():
    with pytest.raises(ValueError, match="at least one response token"):
        kl_penalized_rewards(t([1.0]), t([[0.0]]), t([[0.0]]), t([[0.0]]), 0.1)


def test_gae_hand_worked_three_steps():
    # gamma 1, lam 0.5: delta = [0, 0, 0.5]; A_2 = 0.5, A_1 = 0.25, A_0 = 0.125.
    adv, ret = compute_gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]]), 1.0, 0.5)
    torch.testing.assert_close(adv, t([[0.125, 0.25, 0.5]]), **TOL, msg="advantages")
    torch.testing.assert_close(ret, t([[0.625, 0.75, 1.0]]), **TOL, msg="returns")


def test_gae_hand_worked_with_discount_and_padding():
    # gamma 0.9, lam 0.8, values [1, 2, 3], rewards [1, 0, 2], then a padding position.
    # delta_2 = 2 - 3 = -1; delta_1 = 0 + 0.9*3 - 2 = 0.7; delta_0 = 1 + 0.9*2 - 1 = 1.8
    # A_2 = -1; A_1 = 0.7 + 0.72*(-1) = -0.02; A_0 = 1.8 + 0.72*(-0.02) = 1.7856
    rewards = t([[1.0, 0.0, 2.0, 5.0]])  # the 5 on padding must be ignored
    values = t([[1.0, 2.0, 3.0, 7.0]])  # so must the 7
    adv, ret = compute_gae(rewards, values, t([[1, 1, 1, 0]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([[1.7856, -0.02, -1.0, 0.0]]), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, t([[2.7856, 1.98, 2.0, 0.0]]), atol=1e-12, rtol=0)


def gae_reference(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """Plain per-sequence reverse loop over one response's tokens (no padding)."""
    adv = [0.0] * len(r)
    last = 0.0
    for k in reversed(range(len(r))):
        nxt = v[k + 1] if k + 1 < len(r) else 0.0
        last = r[k] + gamma * nxt - v[k] + gamma * lam * last
        adv[k] = last
    return adv


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6)), min_size=1, max_size=5),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gae_matches_per_sequence_loop(lengths, gamma, lam, seed):
    """Rows with a prompt offset, a response run and right padding: the vectorised GAE
    equals the plain loop over each response alone, and is 0 outside the mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(off + n for off, n in lengths) + 2
    B = len(lengths)
    rewards = torch.randn(B, T, generator=g, dtype=D)
    values = torch.randn(B, T, generator=g, dtype=D)
    mask = torch.zeros(B, T, dtype=D)
    for i, (off, n) in enumerate(lengths):
        mask[i, off : off + n] = 1
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for i, (off, n) in enumerate(lengths):
        sl = slice(off, off + n)
        want = gae_reference(rewards[i, sl].tolist(), values[i, sl].tolist(), gamma, lam)
        torch.testing.assert_close(adv[i, sl], t(want), atol=1e-10, rtol=0, msg=f"row {i}")
        torch.testing.assert_close(ret[i, sl], t(want) + values[i, sl], atol=1e-10, rtol=0)
    torch.testing.assert_close(adv * (1 - mask), torch.zeros_like(adv), atol=0, rtol=0)


def test_gae_lambda_one_gamma_one_is_return_to_go_minus_value():
    # lam = 1, gamma = 1: A_t = sum_{k>=t} r_k - V_t (Monte Carlo advantage).
    r, v = t([[0.1, -0.2, 0.3, 1.0]]), t([[0.4, 0.3, -0.1, 0.2]])
    adv, ret = compute_gae(r, v, torch.ones(1, 4, dtype=D), 1.0, 1.0)
    togo = r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, togo, atol=1e-12, rtol=0, msg="returns = reward to go")
    torch.testing.assert_close(adv, togo - v, atol=1e-12, rtol=0, msg="advantages")


def test_whiten_known_answer_and_mask():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    # masked mean 2, unbiased variance ((1 + 0 + 1) / 3) * 3 / 2 = 1
    got = whiten(x, mask)
    torch.testing.assert_close(got, t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-7, rtol=0)
    kept = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, t([[1.0, 2.0, 3.0, 0.0]]), atol=1e-7, rtol=0)


def test_policy_loss_known_answer():
    # ratios [1.5, 0.5, 1.1, 0.7] with clip 0.2, advantages [1, 1, -1, -1]:
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5
    # token 2: max(1.1, 1.1) = 1.1; token 3: max(0.7, 0.8) = 0.8 (clipped)
    ratio = t([[1.5, 0.5, 1.1, 0.7]])
    old = t([[-1.0, -2.0, -0.5, -3.0]])
    new = old + ratio.log()
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=D)
    loss, clipfrac, approxkl = policy_loss(new, old, adv, mask, clip_range=0.2)
    torch.testing.assert_close(loss, t((-1.2 - 0.5 + 1.1 + 0.8) / 4), atol=1e-12, rtol=0)
    torch.testing.assert_close(clipfrac, t(0.5), atol=0, rtol=0)
    want_kl = 0.5 * float((ratio.log() ** 2).mean())
    torch.testing.assert_close(approxkl, t(want_kl), atol=1e-12, rtol=0)


def test_policy_loss_gradient_is_zero_when_clipped_and_pg_otherwise():
    old = t([[0.0, 0.0]])
    new = t([[math.log(1.5), math.log(1.1)]]).requires_grad_()
    adv = t([[1.0, 1.0]])
    loss, _, _ = policy_loss(new, old, adv, torch.ones(1, 2, dtype=D), 0.2)
    loss.backward()
    # token 0 clipped (1.5 > 1.2): no gradient; token 1: d(-rho A / 2)/d logp = -rho A / 2
    torch.testing.assert_close(new.grad, t([[0.0, -1.1 / 2]]), atol=1e-12, rtol=0)


def test_policy_loss_ignores_masked_tokens():
    old = t([[0.0, 0.0]])
    new = t([[0.1, 50.0]])
    adv = t([[2.0, 1e6]])
    loss, clipfrac, _ = policy_loss(new, old, adv, t([[1, 0]]), 0.2)
    torch.testing.assert_close(loss, t(-2.0 * math.exp(0.1)), atol=1e-12, rtol=0)
    torch.testing.assert_close(clipfrac, t(0.0), atol=0, rtol=0)


def test_value_loss_known_answer():
    # old 0, returns 1, clip 0.2. new 0.5: clipped 0.2 -> max(0.25, 0.64) = 0.64 (clipped)
    # new 1.0: clipped 0.2 -> max(0, 0.64) = 0.64 (clipped); new 0.1 -> max(0.81, 0.81)
    new = t([[0.5, 1.0, 0.1]])
    loss, clipfrac = value_loss(new, torch.zeros(1, 3, dtype=D), torch.ones(1, 3, dtype=D),
                                torch.ones(1, 3, dtype=D), 0.2)  # fmt: skip
    torch.testing.assert_close(loss, t(0.5 * (0.64 + 0.64 + 0.81) / 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(clipfrac, t(2 / 3), atol=1e-12, rtol=0)


def test_explained_variance():
    ret = t([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=D)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0, abs=1e-12)
    assert explained_variance(torch.full_like(ret, 2.5), ret, mask) == pytest.approx(0.0, abs=1e-12)
    # residuals [1, 1, 1, 1] - const: Var(R - V) = 0 -> 1; V = -R: Var(2R)/Var(R) = 4 -> -3
    assert explained_variance(-ret, ret, mask) == pytest.approx(-3.0, abs=1e-12)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask))


def test_adaptive_kl_controller_known_answer():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 9: error clip(9/6 - 1) = 0.2 (clipped from 0.5); beta *= 1 + 0.2 * 10 / 100
    assert ctl.update(9.0, n_steps=10) == pytest.approx(0.1 * 1.02, rel=1e-12)
    # KL 5.4: error -0.1; beta *= 1 - 0.1 * 50 / 100
    assert ctl.update(5.4, n_steps=50) == pytest.approx(0.1 * 1.02 * 0.95, rel=1e-12)
    # on target: unchanged
    assert ctl.update(6.0, n_steps=50) == pytest.approx(0.1 * 1.02 * 0.95, rel=1e-12)


def test_adaptive_kl_controller_steers_a_toy_kl_to_target():
    """A KL that falls as beta grows (KL = c / beta) is brought to the target."""
    ctl = AdaptiveKLController(0.01, target=4.0, horizon=64)
    for _ in range(400):
        ctl.update(0.2 / ctl.value, n_steps=16)
    np.testing.assert_allclose(0.2 / ctl.value, 4.0, rtol=1e-3, err_msg="KL at the fixed point")


def test_fixed_kl_controller_and_bad_args():
    assert FixedKLController(0.3).update(100.0, 10) == 0.3
    with pytest.raises(ValueError):
        AdaptiveKLController(0.0, 6.0, 10)
