"""The cheap baselines: Best-of-N (selection, n = 1, batching) and Preferred-FT (tiny run)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.baselines import (
    PreferredFTConfig,
    best_of_n,
    chosen_data,
    chosen_loss,
    run_preferred_ft,
)
from minidpo.checkpoints import load_checkpoint
from minidpo.errors import MinidpoError
from minidpo.policy import load_policy
from minidpo.preferences import save_pairs
from minidpo.sampling import sample_responses
from minidpo.scoring import oracle_scores
from minidpo.training import Job, read_metrics

PROMPTS = ["Explain gravity.", "What is gravity?", "Explain photosynthesis."]


@pytest.fixture(scope="module")
def policy(tiny_sft):
    return load_policy(tiny_sft)


def test_best_of_one_is_plain_sampling(policy):
    model, tok = policy
    got = best_of_n(model, tok, PROMPTS, n=1, score_fn=oracle_scores, seed=5, max_new_tokens=24)
    want = sample_responses(model, tok, PROMPTS, seed=5, max_new_tokens=24)
    assert got == want


def test_best_of_n_keeps_the_highest_score_and_the_earliest_on_ties(policy):
    model, tok = policy
    n = 4
    candidates = sample_responses(
        model, tok, [p for p in PROMPTS for _ in range(n)], seed=2, max_new_tokens=24
    )

    def by_length(samples):
        return torch.tensor([float(len(s.response_ids)) for s in samples])

    got = best_of_n(model, tok, PROMPTS, n=n, score_fn=by_length, seed=2, max_new_tokens=24)
    for i, s in enumerate(got):
        group = candidates[i * n : (i + 1) * n]
        lengths = [len(c.response_ids) for c in group]
        assert s == group[lengths.index(max(lengths))]  # list.index: the first maximum
    constant = best_of_n(
        model,
        tok,
        PROMPTS,
        n=n,
        score_fn=lambda ss: torch.zeros(len(ss)),
        seed=2,
        max_new_tokens=24,
    )
    assert constant == candidates[::n]


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_best_of_n_under_the_oracle_never_loses_to_the_first_sample(policy, n, seed):
    model, tok = policy
    kw = dict(seed=seed, max_new_tokens=24)
    best = best_of_n(model, tok, PROMPTS, n=n, score_fn=oracle_scores, **kw)
    candidates = sample_responses(model, tok, [p for p in PROMPTS for _ in range(n)], **kw)
    first = candidates[::n]  # the first of each prompt's n candidates
    assert [s.prompt for s in best] == PROMPTS
    for b, f in zip(oracle_scores(best), oracle_scores(first), strict=True):
        assert float(b) >= float(f)


def test_best_of_n_rejects_bad_n_and_bad_scores(policy):
    model, tok = policy
    with pytest.raises(MinidpoError, match="n >= 1"):
        best_of_n(model, tok, PROMPTS, n=0, score_fn=oracle_scores, seed=0)
    with pytest.raises(ValueError, match="shape"):
        best_of_n(model, tok, PROMPTS, n=2, score_fn=lambda ss: torch.zeros(1), seed=0)


def test_preferred_ft_tiny_run_lowers_chosen_loss_and_writes_a_policy(
    tiny_sft, tmp_path, fact_pairs
):
    train = save_pairs(tmp_path / "train.jsonl", fact_pairs("train", 24))
    evals = save_pairs(tmp_path / "eval.jsonl", fact_pairs("eval", 8))
    cfg = PreferredFTConfig(steps=10, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=5)
    out = tmp_path / "preferred_ft"
    job = Job(out, 0, "cpu", progress=False)
    summary = run_preferred_ft(cfg, job, sft_path=tiny_sft, train_pairs=train, eval_pairs=evals)
    ckpt = load_checkpoint(out / "checkpoint.pt", kind="policy")
    assert ckpt["stage"] == "preferred_ft" and ckpt["done"] and ckpt["step"] == 10
    tuned, tok = load_policy(out / "checkpoint.pt")  # loadable like any policy
    sft, _ = load_policy(tiny_sft)
    prompts, chosen = chosen_data(train, tok, tuned.config.block_size)
    before = chosen_loss(sft, prompts, chosen, tok.eot_id)
    after = chosen_loss(tuned, prompts, chosen, tok.eot_id)
    assert after < before - 0.1, f"chosen loss {before:.4f} -> {after:.4f}"
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 10 and "eval/loss" in rows[4] and "eval/loss" in rows[9]
    assert summary["train/loss"] == pytest.approx(rows[-1]["train/loss"], abs=1e-12)


def test_preferred_ft_resumes_to_the_uninterrupted_weights_and_restarts(
    tiny_sft, tmp_path, fact_pairs
):
    """`resume` continues an interrupted run from its last checkpoint (same weights and
    metrics as an uninterrupted one); without it, the run starts afresh. (Which of the
    two a rerun does is the stage layer's decision: test_stage.py.)"""
    train = save_pairs(tmp_path / "train.jsonl", fact_pairs("train", 24))
    cfg = PreferredFTConfig(steps=10, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=5,
                            ckpt_every=2)  # fmt: skip

    def run(out, **kw):
        job = Job(out, 0, "cpu", progress=False, **kw)
        return run_preferred_ft(cfg, job, sft_path=tiny_sft, train_pairs=train, eval_pairs=None)

    run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=5)
    assert not load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["done"]
    run(tmp_path / "cut", resume=True)  # on from step 5
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert cut["done"] and cut["step"] == 10
    for k in full["model"]:
        torch.testing.assert_close(cut["model"][k], full["model"][k], atol=0, rtol=0, msg=k)
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in
             read_metrics(tmp_path / "full" / "metrics.jsonl")]  # fmt: skip
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in
                     read_metrics(tmp_path / "cut" / "metrics.jsonl")]  # fmt: skip
    mtime = (tmp_path / "cut" / "checkpoint.pt").stat().st_mtime_ns
    run(tmp_path / "cut")  # afresh: rewritten, same numbers
    assert (tmp_path / "cut" / "checkpoint.pt").stat().st_mtime_ns != mtime
    again = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    for k in full["model"]:
        torch.testing.assert_close(again[k], full["model"][k], atol=0, rtol=0, msg=k)
