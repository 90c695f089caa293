"""Evaluation: known answers for the aggregates, and a policy against itself."""

import math

import pytest

from minidpo.evaluate import evaluate_policy, mean_se, sample_logprobs, summarize, win_rate
from minidpo.policy import load_policy
from minidpo.sampling import Sample


def test_mean_se_known_answer():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5, abs=1e-12)
    # sample std sqrt(5/3), over sqrt(4)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2, abs=1e-12)
    assert mean_se([7.0]) == (7.0, 0.0)


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 0, 2], [0, 0, 3]) == pytest.approx(0.5, abs=1e-12)
    assert win_rate([1, 1], [0, 0]) == 1.0


def test_summarize_rates():
    samples = [Sample("p", "a", [1, 0], True), Sample("p", "b", [1, 2, 3], False)]
    r = summarize(samples, [1.0, -1.0], [False, True], [0.5, 1.5], [0.0, -1.0])
    assert r.reward_mean == 0.0 and r.kl_mean == pytest.approx(1.0, abs=1e-12)
    assert r.win_rate_vs_ref == pytest.approx(0.75, abs=1e-12)
    assert r.mean_length == 2.5 and r.unparseable_rate == 0.5 and r.unterminated_rate == 0.5


def test_policy_against_itself_has_zero_kl_and_even_win_rate(tiny_sft):
    model, tok = load_policy(tiny_sft)
    prompts = ["Explain gravity.", "What is friction?"]
    result, samples, rewards = evaluate_policy(
        model, tok, prompts, samples_per_prompt=3, seed=5, ref=model, max_new_tokens=24
    )
    assert result.n_samples == 6 and len(rewards) == 6
    assert result.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert result.win_rate_vs_ref == pytest.approx(0.5, abs=1e-12)
    assert -5.0 <= result.reward_mean <= 5.0
    logps = sample_logprobs(model, tok, samples)
    assert (logps < 0).all()
