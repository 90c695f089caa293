"""Unlikelihood (the paper's third baseline): the loss against known answers and an exact
computation, its gradient against finite differences, and a tiny run."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
import torch

from minidpo.checkpoints import load_checkpoint
from minidpo.errors import MinidpoError
from minidpo.losses import log1mexp, unlikelihood_loss
from minidpo.policy import load_policy
from minidpo.preferences import PreferencePair, load_pairs, save_pairs, tokenize_pairs
from minidpo.training import Job, read_metrics
from minidpo.unlikelihood import UnlikelihoodConfig, pair_losses, run_unlikelihood
from minidpo.world import load_world


def test_known_answers():
    half = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    losses, chosen, unlikely = unlikelihood_loss(half, one, half, one, alpha=1.0)
    assert float(losses) == pytest.approx(2 * math.log(2), abs=1e-12)  # 1.3863
    assert float(chosen) == pytest.approx(math.log(0.5)) and float(unlikely) == pytest.approx(
        math.log(0.5)
    )
    # alpha = 0: the chosen response's negative log-likelihood alone
    logps = torch.tensor([[-0.1, -2.0, -0.7], [-1.0, -3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    losses, _, _ = unlikelihood_loss(logps, mask, logps, mask, alpha=0.0)
    torch.testing.assert_close(losses, torch.tensor([2.8, 4.0], dtype=torch.float64))
    # a masked token counts nothing; a certain token costs -log(1e-6), not infinity
    certain = torch.tensor([[0.0, -5.0]], dtype=torch.float64)
    _, _, unlikely = unlikelihood_loss(certain, torch.ones(1, 2), certain, torch.ones(1, 2), 1.0)
    want = math.log(1e-6) + math.log1p(-math.exp(-5.0))
    assert float(unlikely) == pytest.approx(want, rel=1e-6)


def test_log1mexp_against_exact_decimal_arithmetic():
    getcontext().prec = 60
    for x in (-1e-12, -1e-6, -0.3, -math.log(2), -0.7, -5.0, -40.0):
        exact = float((1 - Decimal(x).exp()).ln())
        got = float(log1mexp(torch.tensor(x, dtype=torch.float64)))
        assert got == pytest.approx(exact, rel=1e-12), x


def test_gradient_against_finite_differences():
    gen = torch.Generator().manual_seed(0)
    logits_w = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    logits_l = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 6, (3, 4), generator=gen)
    mask = torch.tensor([[1.0] * 4, [1.0] * 3 + [0.0], [1.0] * 2 + [0.0] * 2], dtype=torch.float64)

    def loss(lw, ll):
        tw = torch.log_softmax(lw, -1).gather(-1, labels[..., None])[..., 0]
        tl = torch.log_softmax(ll, -1).gather(-1, labels[..., None])[..., 0]
        return unlikelihood_loss(tw, mask, tl, mask, alpha=0.5)[0]

    assert torch.autograd.gradcheck(loss, (logits_w, logits_l), eps=1e-6, atol=1e-7)


def test_alpha_outside_unit_interval_is_refused():
    with pytest.raises(MinidpoError, match="--unlikelihood-alpha"):
        UnlikelihoodConfig(alpha=1.5).validate()


def test_tiny_run_trains_and_its_unlikelihood_term_pushes_rejected_tokens_down(tiny_sft, tmp_path):
    """Ten steps at alpha 0 (Preferred-FT on the pairs' chosen side) and at alpha 1, same
    batches: both raise log pi(y_w|x); only the unlikelihood term keeps the rejected
    tokens' probability lower, so alpha 1 ends with the larger sum of log(1 - p)."""
    world = load_world()
    pairs = [PreferencePair(p.text, world.topics[p.topic].facts[i % 2], world.topics[p.topic].wrong[0])
             for i, p in enumerate(world.prompts("train")[:24])]  # fmt: skip
    train = save_pairs(tmp_path / "train.jsonl", pairs)
    sft, tok = load_policy(tiny_sft)
    data = tokenize_pairs(load_pairs(train)[0], tok, sft.config.block_size, "train")
    batch = data.batch(range(len(data)), tok.eot_id)
    with torch.no_grad():
        before = pair_losses(sft, batch, 1.0)[1]
    after = {}
    for alpha in (0.0, 1.0):
        cfg = UnlikelihoodConfig(alpha=alpha, steps=10, batch_size=8, lr=3e-3, warmup_steps=2,
                                 eval_every=5, ckpt_every=5)  # fmt: skip
        out = tmp_path / f"ul{alpha:g}"
        summary = run_unlikelihood(cfg, Job(out, 0, "cpu", progress=False), sft_path=tiny_sft,
                                   train_pairs=train, eval_pairs=train)  # fmt: skip
        ckpt = load_checkpoint(out / "checkpoint.pt", kind="policy")
        assert ckpt["stage"] == "unlikelihood" and ckpt["done"] and ckpt["step"] == 10
        rows = read_metrics(out / "metrics.jsonl")
        assert len(rows) == 10 and summary["train/loss"] == rows[-1]["train/loss"]
        assert "eval/unlikelihood" in rows[4] and "eval/unlikelihood" in rows[9]
        with torch.no_grad():
            after[alpha] = pair_losses(load_policy(out / "checkpoint.pt")[0], batch, 1.0)[1]
        assert after[alpha]["logps/chosen"] > before["logps/chosen"] + 1.0, (before, after)
    assert after[1.0]["unlikelihood"] > after[0.0]["unlikelihood"], after
    assert after[1.0]["logps/rejected"] < after[0.0]["logps/rejected"], after
