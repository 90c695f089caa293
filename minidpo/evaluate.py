"""Evaluation of any policy under the oracle reward, the same way for every method.

For each held-out prompt, N samples at temperature 1; then:
- oracle reward: mean and standard error over all samples;
- KL(pi || pi_ref): the mean over the policy's own samples of the sequence
  log-ratio log pi(y|x) - log pi_ref(y|x) (a Monte-Carlo estimate of the
  sequence-level KL, as on the x-axis of the paper's Figure 2, left); the
  log-probs are of the sampled token ids themselves, not of a re-encoding;
- win rate against SFT: sample i of the policy against sample i of pi_ref for
  the same prompt, judged by the oracle (a tie counts one half);
- mean length in tokens, the share of samples with an unparseable sentence, the
  share that never emitted end-of-text.

`summarize` is the pure part (numbers in, numbers out); `evaluate_policy`
samples and scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from minidpo.batching import build_batch
from minidpo.logprobs import sequence_logprobs
from minidpo.model import GPT
from minidpo.sampling import Sample, encode_prompt, sample_responses
from minidpo.scoring import oracle_breakdowns, oracle_scores
from minidpo.tokenizer import Tokenizer


@dataclass
class EvalResult:
    """What `evaluate_policy` measures (JSON-ready via `asdict`)."""

    n_samples: int
    reward_mean: float
    reward_se: float  # standard error of the mean
    reward_std: float
    kl_mean: float | None  # mean sequence log-ratio on own samples (None without a reference)
    kl_se: float | None
    win_rate_vs_ref: float | None
    mean_length: float  # tokens, end-of-text included
    unparseable_rate: float  # share of samples with at least one unparseable sentence
    unterminated_rate: float

    def to_dict(self) -> dict:
        return asdict(self)


def mean_se(x: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n)); se 0 for n < 2."""
    a = np.asarray(x, dtype=np.float64)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    return float(a.mean()), se


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of paired comparisons won (ties count 1/2).

    Example: win_rate([1, 0, 2], [0, 0, 3]) == (1 + 0.5 + 0) / 3
    """
    a, b = np.asarray(rewards), np.asarray(baseline)
    return float(((a > b) + 0.5 * (a == b)).mean())


@torch.no_grad()
def sample_logprobs(
    model: GPT, tok: Tokenizer, samples: Sequence[Sample], batch_size: int = 128
) -> torch.Tensor:
    """log pi(y|x) of each sample's own token ids under `model`: (N,) on CPU."""
    device = next(model.parameters()).device
    model.eval()
    block = model.config.block_size
    out = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        prompts = [encode_prompt(tok, x.prompt, block, 0) for x in chunk]
        batch = build_batch(prompts, [x.response_ids for x in chunk], pad_id=tok.eot_id)
        out.append(sequence_logprobs(model, batch.to(device)).float().cpu())
    return torch.cat(out)


def summarize(
    samples: Sequence[Sample],
    rewards: Sequence[float],
    unparseable: Sequence[bool],
    log_ratios: Sequence[float] | None,
    ref_rewards: Sequence[float] | None,
) -> EvalResult:
    """Aggregate per-sample numbers into an EvalResult."""
    r_mean, r_se = mean_se(rewards)
    kl_mean = kl_se = None
    if log_ratios is not None:
        kl_mean, kl_se = mean_se(log_ratios)
    return EvalResult(
        n_samples=len(samples),
        reward_mean=r_mean,
        reward_se=r_se,
        reward_std=float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0,
        kl_mean=kl_mean,
        kl_se=kl_se,
        win_rate_vs_ref=win_rate(rewards, ref_rewards) if ref_rewards is not None else None,
        mean_length=float(np.mean([len(s.response_ids) for s in samples])),
        unparseable_rate=float(np.mean(unparseable)),
        unterminated_rate=float(np.mean([not s.terminated for s in samples])),
    )


def evaluate_policy(
    model: GPT,
    tok: Tokenizer,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int,
    seed: int,
    ref: GPT | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    ref_rewards: Sequence[float] | None = None,
) -> tuple[EvalResult, list[Sample], list[float]]:
    """Sample, score and summarise a policy; with `ref`, also KL and win rate against it.

    Returns (result, samples, oracle rewards). The reference is sampled with the
    same seeds, so sample i of both answers the same prompt; pass `ref_rewards` (the
    oracle rewards of that very call on the reference) to skip sampling it again.
    """
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    kw = dict(seed=seed, temperature=temperature, max_new_tokens=max_new_tokens)
    samples = sample_responses(model, tok, expanded, **kw)
    breakdowns = oracle_breakdowns(samples)
    rewards = [b.total for b in breakdowns]
    unparseable = [b.unparseable > 0 for b in breakdowns]
    log_ratios = None
    if ref is None:
        ref_rewards = None
    else:
        log_ratios = (
            sample_logprobs(model, tok, samples) - sample_logprobs(ref, tok, samples)
        ).tolist()
        if ref_rewards is None:
            ref_samples = sample_responses(ref, tok, expanded, **kw)
            ref_rewards = oracle_scores(ref_samples).tolist()
        elif len(ref_rewards) != len(samples):
            raise ValueError(
                f"ref_rewards has {len(ref_rewards)} values for {len(samples)} samples"
            )
    return summarize(samples, rewards, unparseable, log_ratios, ref_rewards), samples, rewards
