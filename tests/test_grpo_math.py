"""GRPO's pure pieces against known answers, exact expectations and autograd."""

import numpy as np
import pytest
import torch

from minidpo.grpo_math import group_advantages, grpo_loss, k3_kl


def test_group_advantages_known_answer() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]])
    got = group_advantages(r)
    # group 1: mean 2, std 1; group 2: mean 6, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    want = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]])
    want = want / torch.tensor([[1.0 + 1e-4], [3**0.5 + 1e-4]])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    torch.testing.assert_close(group_advantages(r, scale_std=False),
                               torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]))  # fmt: skip
    # a group of equal rewards carries no signal, with or without the std
    assert torch.equal(group_advantages(torch.full((1, 4), 2.0)), torch.zeros(1, 4))


def test_group_advantages_refuse_groups_of_one() -> None:
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_k3_is_nonnegative_and_zero_only_at_the_reference() -> None:
    u = torch.tensor([-5.0, -1.0, -0.01, 0.0, 0.01, 1.0, 5.0], dtype=torch.float64)
    d = k3_kl(torch.zeros_like(u), u)  # log pi = 0, log pi_ref = u
    assert d[3] == 0 and (d[u != 0] > 0).all()
    torch.testing.assert_close(d[[2, 4]], u[[2, 4]] ** 2 / 2, rtol=1e-2, atol=0)  # ~ u^2 / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k3_is_unbiased_for_kl_exactly_and_by_sampling(seed) -> None:
    """E_{y~pi}[k3(y)] = KL(pi || pi_ref) over an enumerable distribution: exactly as a
    sum, and within 4 standard errors as a mean of 200,000 samples."""
    g = np.random.default_rng(seed)
    logp = torch.log_softmax(torch.tensor(g.normal(size=12)), 0)  # pi
    ref = torch.log_softmax(torch.tensor(g.normal(size=12)), 0)  # pi_ref
    exact_kl = float((logp.exp() * (logp - ref)).sum())
    expected_k3 = float((logp.exp() * k3_kl(logp, ref)).sum())
    assert expected_k3 == pytest.approx(exact_kl, rel=1e-12)
    y = torch.multinomial(logp.exp(), 200_000, replacement=True,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
    d = k3_kl(logp[y], ref[y])
    se = float(d.std()) / len(d) ** 0.5
    assert abs(float(d.mean()) - exact_kl) < 4 * se


def test_the_pathwise_gradient_of_k3_is_the_reverse_kl_gradient() -> None:
    """Differentiated through log pi at y ~ pi, E[grad k3] = grad KL(pi_ref || pi), not
    grad KL(pi || pi_ref): checked exactly on a softmax table (GRPO's fixed point)."""
    g = np.random.default_rng(0)
    theta = torch.tensor(g.normal(size=8), requires_grad=True)
    ref = torch.log_softmax(torch.tensor(g.normal(size=8)), 0)
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp().detach()
    (pathwise,) = torch.autograd.grad((pi * k3_kl(logp, ref)).sum(), theta)  # E_pi, pi held
    logp = torch.log_softmax(theta, 0)
    (reverse,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)
    logp = torch.log_softmax(theta, 0)
    (forward,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), theta)
    torch.testing.assert_close(pathwise, reverse, atol=1e-12, rtol=0)
    assert (pathwise - forward).abs().max() > 1e-2


def _batch():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    new = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 2
    old = new.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = new.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]],
                        dtype=torch.float64)  # fmt: skip
    return new, old, ref, adv, mask


def test_grpo_loss_equals_eq3_written_out() -> None:
    """-J of Eq. 3, token by token in plain Python, for both normalisations."""
    new, old, ref, adv, mask = _batch()
    eps, beta = 0.2, 0.04
    per_seq, total = [], 0.0
    for i in range(new.size(0)):
        terms = []
        for t in range(new.size(1)):
            if mask[i, t] == 0:
                continue
            rho = float(torch.exp(new[i, t] - old[i, t]))
            clip = min(max(rho, 1 - eps), 1 + eps)
            u = float(ref[i, t] - new[i, t])
            d = np.exp(u) - u - 1
            terms.append(min(rho * float(adv[i]), clip * float(adv[i])) - beta * d)
        per_seq.append(-sum(terms) / len(terms))
        total += -sum(terms)
    got, _ = grpo_loss(new, old, ref, adv, mask, clip_range=eps, beta=beta)
    assert float(got) == pytest.approx(np.mean(per_seq), rel=1e-12)
    got, _ = grpo_loss(new, old, ref, adv, mask, clip_range=eps, beta=beta,
                       loss_norm="constant", max_tokens=7)  # fmt: skip
    assert float(got) == pytest.approx(total / (4 * 7), rel=1e-12)


def test_on_policy_without_kl_the_gradient_is_minus_advantage_times_score() -> None:
    """At rho = 1 the clip is inactive: d loss / d logp_t = -A_i / |o_i| (sequence norm)."""
    new, _, ref, adv, mask = _batch()
    new = new.clone().requires_grad_()
    loss, parts = grpo_loss(new, new.detach(), ref, adv, mask, clip_range=0.2, beta=0.0)
    (grad,) = torch.autograd.grad(loss, new)
    want = -adv[:, None] / mask.sum(1, keepdim=True) / new.size(0) * mask
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)
    assert float(parts["clipfrac"]) == 0.0


def test_the_clip_stops_the_gradient_where_it_binds() -> None:
    new = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(1, 2, dtype=torch.float64)  # rho = 1.5 and 0.5
    mask = torch.ones(1, 2, dtype=torch.float64)
    for a, binds in ((1.0, [True, False]), (-1.0, [False, True])):
        loss, parts = grpo_loss(new, old, old, torch.tensor([a], dtype=torch.float64), mask,
                                clip_range=0.2, beta=0.0)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, new)
        assert [bool(g == 0) for g in grad[0]] == binds
        assert float(parts["clipfrac"]) == 0.5


def test_bad_normalisation_arguments() -> None:
    new, old, ref, adv, mask = _batch()
    with pytest.raises(ValueError, match="loss_norm"):
        grpo_loss(new, old, ref, adv, mask, clip_range=0.2, beta=0.0, loss_norm="token")
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_loss(new, old, ref, adv, mask, clip_range=0.2, beta=0.0, loss_norm="constant")
