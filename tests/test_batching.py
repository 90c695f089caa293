"""build_batch: the one masking convention every stage uses."""

import torch

from minidpo.batching import build_batch
from minidpo.logprobs import token_logprobs


def test_build_batch_hand_worked():
    # prompt [5, 6], response [7, 0] (0 = eot) and prompt [5], response [8, 9, 0]; pad 0
    b = build_batch([[5, 6], [5]], [[7, 0], [8, 9, 0]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [5, 8, 9]]
    assert b.labels.tolist() == [[6, 7, 0], [8, 9, 0]]
    assert b.mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_build_batch_right_pads_and_masks_padding():
    b = build_batch([[1, 2, 3], [1]], [[4, 0], [0]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4], [1, 0, 0, 0]]
    assert b.labels.tolist() == [[2, 3, 4, 0], [0, -1, -1, -1]]
    assert b.mask.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert b.n_tokens == 5


def test_all_tokens_mask_covers_prompt_labels():
    b = build_batch([[5, 6, 7]], [[8, 0]], pad_id=0, all_tokens=True)
    assert b.mask.tolist() == [[1, 1, 1, 1]]


def test_token_logprobs_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 4, 0], [2, -1, -1]])
    got = token_logprobs(logits, labels)
    lsm = torch.log_softmax(logits, -1)
    want = torch.tensor([[lsm[0, 0, 1], lsm[0, 1, 4], lsm[0, 2, 0]], [lsm[1, 0, 2], 0.0, 0.0]])
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
