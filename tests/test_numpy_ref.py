"""The hand-derived NumPy reference against torch autograd, on CPU and (when present) CUDA."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from minidpo import numpy_ref
from minidpo.losses import LOSS_TYPES, preference_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (loss_type, beta, label_smoothing, nll_alpha, dpop_lambda)
    *[("sigmoid", b, e, 0.0, 0.0) for b in (0.1, 0.5, 2.0) for e in (0.0, 0.25)],
    *[("robust", b, e, 0.0, 0.0) for b in (0.1, 0.5, 2.0) for e in (0.0, 0.25)],
    *[("ipo", b, 0.0, 0.0, 0.0) for b in (0.1, 0.5, 2.0)],
    *[("hinge", b, 0.0, 0.0, 0.0) for b in (0.1, 0.5, 2.0)],
    # the displacement remedies: DPO + NLL (RPO), DPOP, both, on every loss type
    *[
        ("sigmoid", b, 0.0, a, lam)
        for b in (0.1, 2.0)
        for a, lam in ((1.0, 0.0), (0.0, 5.0), (0.5, 50.0))
    ],
    ("sigmoid", 0.5, 0.25, 0.5, 5.0),
    ("robust", 0.5, 0.25, 0.5, 5.0),
    ("ipo", 0.5, 0.0, 0.5, 5.0),
    ("hinge", 0.1, 0.0, 0.5, 5.0),
]
ARGS = ("loss_type", "beta", "eps", "alpha", "lam")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(seed: int, b: int = 3, t: int = 6, v: int = 9):
    """Logits (2B, T, V), labels (2B, T), right-padded response mask (2B, T), ref logps (2B,)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2 * b, t, v))  # (2B, T, V)
    labels = rng.integers(0, v, size=(2 * b, t))  # (2B, T)
    start = rng.integers(1, 3, size=2 * b)
    stop = rng.integers(4, t + 1, size=2 * b)
    pos = np.arange(t)[None, :]
    mask = ((pos >= start[:, None]) & (pos < stop[:, None])).astype(np.float64)  # (2B, T)
    ref = numpy_ref.sequence_logprobs(logits, labels, mask) + rng.normal(scale=2.0, size=2 * b)
    return logits, labels, mask, ref


def _torch_mean_loss(logits, labels, mask, ref, beta, loss_type, eps, alpha, lam, device, dtype):
    """Autograd: log_softmax, gather, masked sum, preference_loss, mean, backward to logits."""
    z = torch.tensor(logits, dtype=dtype, device=device, requires_grad=True)  # (2B, T, V)
    y = torch.tensor(labels, device=device)
    m = torch.tensor(mask, dtype=dtype, device=device)
    r = torch.tensor(ref, dtype=dtype, device=device)
    seq = (torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1) * m).sum(-1)  # (2B,)
    seq.retain_grad()
    b = seq.shape[0] // 2
    out = preference_loss(
        seq[:b], seq[b:], r[:b], r[b:], beta=beta, loss_type=loss_type, label_smoothing=eps,
        nll_alpha=alpha, dpop_lambda=lam, chosen_lengths=m[:b].sum(-1),
    )  # fmt: skip
    loss = out.losses.mean()
    loss.backward()
    to_np = lambda x: x.detach().cpu().double().numpy()  # noqa: E731
    return to_np(loss), to_np(seq.grad), to_np(z.grad)


def _compare(loss_type, beta, eps, alpha, lam, device, dtype, rtol, atol, seed=0):
    logits, labels, mask, ref = _batch(seed)
    # the reference sees the very numbers torch sees, rounded to `dtype`
    logits = torch.tensor(logits, dtype=dtype).double().numpy()
    ref = torch.tensor(ref, dtype=dtype).double().numpy()
    t_loss, t_dseq, t_dlogits = _torch_mean_loss(
        logits, labels, mask, ref, beta, loss_type, eps, alpha, lam, device, dtype
    )
    n_loss, n_dlogits = numpy_ref.dpo_logit_gradient(
        logits, labels, mask, ref, beta, loss_type, eps, nll_alpha=alpha, dpop_lambda=lam
    )
    seq = numpy_ref.sequence_logprobs(logits, labels, mask)
    b = len(seq) // 2
    out = numpy_ref.preference_loss(
        seq[:b], seq[b:], ref[:b], ref[b:], beta=beta, loss_type=loss_type, label_smoothing=eps,
        nll_alpha=alpha, dpop_lambda=lam, chosen_lengths=mask[:b].sum(-1),
    )  # fmt: skip
    n_dseq = np.concatenate([out.grad_policy_chosen, out.grad_policy_rejected]) / b
    tag = f"{loss_type} beta={beta} eps={eps} alpha={alpha} lambda={lam} {device} {dtype}"
    assert_allclose(t_loss, n_loss, rtol=rtol, atol=atol, err_msg=f"loss, {tag}")
    assert_allclose(t_dseq, n_dseq, rtol=rtol, atol=atol, err_msg=f"d loss/d logps, {tag}")
    assert_allclose(t_dlogits, n_dlogits, rtol=rtol, atol=atol, err_msg=f"d loss/d logits, {tag}")


@pytest.mark.parametrize(ARGS, CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_autograd_float64_cpu(loss_type, beta, eps, alpha, lam, seed):
    _compare(
        loss_type, beta, eps, alpha, lam, "cpu", torch.float64, rtol=1e-10, atol=1e-13, seed=seed
    )


def test_the_batches_cover_both_sides_of_the_dpop_kink():
    """Seed 0: every chosen row below its reference (DPOP's penalty on in all pairs);
    seed 1: on in one pair, off in two, so both branches of dh~/da_w reach the logits."""
    for seed, want in ((0, [True, True, True]), (1, [False, True, False])):
        logits, labels, mask, ref = _batch(seed)
        seq = numpy_ref.sequence_logprobs(logits, labels, mask)
        assert (ref[:3] > seq[:3]).tolist() == want, seed


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(ARGS, CONFIGS)
@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-10, 1e-13)]
)
def test_matches_torch_autograd_cuda(loss_type, beta, eps, alpha, lam, dtype, rtol, atol):
    _compare(loss_type, beta, eps, alpha, lam, "cuda", dtype, rtol=rtol, atol=atol)


def test_per_pair_gradients_match_autograd_for_all_four_inputs():
    rng = np.random.default_rng(1)
    x = [rng.normal(scale=5.0, size=7) for _ in range(4)]
    n_w = rng.integers(1, 12, size=7).astype(np.float64)  # |y_w| for DPO + NLL
    assert 0 < int(np.sum(x[2] > x[0])) < 7  # DPOP's penalty on in some pairs, off in others
    for loss_type, beta, eps, alpha, lam in CONFIGS:
        kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, nll_alpha=alpha,
                  dpop_lambda=lam)  # fmt: skip
        ts = [torch.tensor(v, requires_grad=True) for v in x]
        preference_loss(*ts, chosen_lengths=torch.tensor(n_w), **kw).losses.sum().backward()
        out = numpy_ref.preference_loss(*x, chosen_lengths=n_w, **kw)
        grads = [out.grad_policy_chosen, out.grad_policy_rejected, out.grad_ref_chosen,
                 out.grad_ref_rejected]  # fmt: skip
        for name, t, g in zip(("pi_c", "pi_r", "ref_c", "ref_r"), ts, grads, strict=True):
            assert_allclose(g, t.grad.numpy(), rtol=1e-10, atol=1e-15, err_msg=f"{kw} {name}")


def test_dpo_gradient_formula_on_a_known_pair():
    """DPO: dL/d log pi(y_w) = -beta sigma(-beta h), dL/d log pi(y_l) = +beta sigma(-beta h)."""
    out = numpy_ref.preference_loss([-12.3], [-8.5], [-14.1], [-7.2], beta=0.1)
    s = 1 / (1 + math.exp(0.31))  # sigma(-beta h), beta h = 0.1 * 3.1
    assert_allclose(out.losses, [math.log1p(math.exp(-0.31))], rtol=1e-14)
    assert_allclose(out.grad_policy_chosen, [-0.1 * s], rtol=1e-14)
    assert_allclose(out.grad_policy_rejected, [0.1 * s], rtol=1e-14)


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps", "want_loss", "want_grad_chosen"),
    [  # h = 1 (see tests/test_losses.py for the working)
        ("sigmoid", math.log(3), 0.0, math.log(4 / 3), -math.log(3) / 4),
        (
            "sigmoid",
            math.log(3),
            0.1,
            0.9 * math.log(4 / 3) + 0.1 * math.log(4),
            -0.15 * math.log(3),
        ),
        (
            "robust",
            math.log(3),
            0.1,
            (0.9 * math.log(4 / 3) - 0.1 * math.log(4)) / 0.8,
            -0.375 * math.log(3),
        ),
        ("ipo", 0.25, 0.0, 1.0, -2.0),
        ("hinge", 0.5, 0.0, 0.5, -0.5),
        ("hinge", 2.0, 0.0, 0.0, 0.0),
    ],
)
def test_known_answers_at_margin_one(loss_type, beta, eps, want_loss, want_grad_chosen):
    out = numpy_ref.preference_loss(
        [-1.5], [-4.5], [-3.0], [-5.0], beta=beta, loss_type=loss_type, label_smoothing=eps
    )  # h = (-1.5 + 3) - (-4.5 + 5) = 1
    assert_allclose(out.losses, [want_loss], rtol=1e-12, atol=1e-15)
    assert_allclose(out.grad_policy_chosen, [want_grad_chosen], rtol=1e-12, atol=1e-15)
    assert_allclose(out.grad_policy_rejected, [-want_grad_chosen], rtol=1e-12, atol=1e-15)


def test_log_softmax_and_sequence_logprobs_match_torch():
    logits, labels, mask, _ = _batch(2)
    assert_allclose(
        numpy_ref.log_softmax(logits),
        torch.log_softmax(torch.tensor(logits), -1).numpy(),
        rtol=1e-12,
        atol=1e-14,
    )
    want = (
        torch.log_softmax(torch.tensor(logits), -1).gather(-1, torch.tensor(labels)[..., None])
    ).squeeze(-1) * torch.tensor(mask)
    assert_allclose(
        numpy_ref.sequence_logprobs(logits, labels, mask), want.sum(-1).numpy(), rtol=1e-12
    )


def test_log_softmax_is_shift_invariant_and_overflow_free():
    z = np.array([[1000.0, 1000.0 + math.log(3.0)], [-1000.0, -1000.0 + math.log(3.0)]])
    with np.errstate(all="raise"):
        got = numpy_ref.log_softmax(z)
    assert_allclose(got, np.log([[0.25, 0.75], [0.25, 0.75]]), rtol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_numpy_losses_finite_at_huge_margins(loss_type):
    h = np.array([1e4, -1e4, 0.0])
    zeros = np.zeros(3)
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = numpy_ref.preference_loss(
            h, zeros, zeros, zeros, beta=1.0, loss_type=loss_type, label_smoothing=eps
        )
    for name in ("losses", "grad_policy_chosen", "grad_policy_rejected"):
        assert np.isfinite(getattr(out, name)).all(), (name, getattr(out, name))


def test_odd_batch_is_rejected():
    logits, labels, mask, ref = _batch(0)
    with pytest.raises(ValueError, match="chosen; rejected"):
        numpy_ref.dpo_logit_gradient(logits[:5], labels[:5], mask[:5], ref[:5], 0.1)


def test_check_gpu_script_passes_on_cpu_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("check_gpu", ROOT / "scripts" / "check_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu_check.json"
    assert mod.main(["--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "FAIL" not in printed, printed
    data = json.loads(out.read_text())
    assert data["passed"] is True
    assert {r["quantity"] for r in data["rows"]} == {"loss", "dlogps", "dlogits"}
    assert {r["loss_type"] for r in data["rows"]} == set(LOSS_TYPES)
    assert {r["dtype"] for r in data["rows"]} == {"float32", "float64"}
