"""Sequence log-probs: the batched, concatenated forward against a one-sequence loop."""

import numpy as np
import torch

from minidpo.batching import concatenated_batch
from minidpo.logprobs import (
    concatenated_logprobs,
    sequence_logprobs,
    sequence_logprobs_slow,
)
from minidpo.model import GPT, GPTConfig


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


def _rows(rng, n, lo, hi):
    return [rng.integers(1, 50, rng.integers(lo, hi)).tolist() for _ in range(n)]


def test_concatenated_matches_one_at_a_time_loop():
    model = _model()
    rng = np.random.default_rng(0)
    prompts = _rows(rng, 4, 1, 6)
    chosen = [[*r, 0] for r in _rows(rng, 4, 1, 9)]  # 0 plays end-of-text
    rejected = [[*r, 0] for r in _rows(rng, 4, 0, 12)]
    batch = concatenated_batch(prompts, chosen, rejected, pad_id=0)
    assert batch.input_ids.shape[0] == 8  # 2B rows, one forward
    with torch.no_grad():
        c, r = concatenated_logprobs(model, batch)
    want_c = [sequence_logprobs_slow(model, p, y) for p, y in zip(prompts, chosen, strict=True)]
    want_r = [sequence_logprobs_slow(model, p, y) for p, y in zip(prompts, rejected, strict=True)]
    torch.testing.assert_close(
        c.double(), torch.tensor(want_c, dtype=torch.float64), atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(
        r.double(), torch.tensor(want_r, dtype=torch.float64), atol=1e-4, rtol=1e-5
    )


def test_padding_does_not_change_a_rows_logprob():
    model = _model()
    short = concatenated_batch([[3, 4]], [[5, 0]], [[6, 0]], pad_id=0)
    long = concatenated_batch(
        [[3, 4], [3, 4]], [[5, 0], [7] * 20 + [0]], [[6, 0], [8, 0]], pad_id=0
    )
    with torch.no_grad():
        a = sequence_logprobs(model, short)
        b = sequence_logprobs(model, long)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)  # chosen of pair 0
    torch.testing.assert_close(a[1], b[2], atol=1e-5, rtol=1e-5)  # rejected of pair 0


def test_logprob_is_a_sum_of_negative_terms_and_has_gradients():
    model = _model()
    batch = concatenated_batch([[1, 2]], [[3, 4, 0]], [[5, 0]], pad_id=0)
    c, r = concatenated_logprobs(model, batch)
    assert float(c.detach()) < 0 and float(r.detach()) < 0
    (c - r).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
