"""Sequence log-probabilities: log pi(y|x) = sum over response tokens of log pi(y_t | x, y_<t).

Shared by DPO (policy and reference log-probs), the reward model and PPO. The
log-prob of a response is the SUM of its tokens' log-probs, end-of-text included,
prompt and padding excluded (as in the paper and TRL); see `minidpo.batching` for
the mask. For a preference batch, chosen and rejected responses are stacked into
one batch of 2B rows and scored in ONE forward pass (as in the reference DPO
implementation's `concatenated_forward`): rows [0, B) are chosen, [B, 2B) rejected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minidpo.batching import Batch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | tokens_<t) at each position: (B, T, V), (B, T) -> (B, T).

    Padding labels (-1) get log-prob 0; mask them before summing anyway.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    safe = labels.clamp(min=0).unsqueeze(-1)  # (B, T, 1)
    out = logp.gather(-1, safe).squeeze(-1)  # (B, T)
    return out.masked_fill(labels < 0, 0.0)


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed response log-probs of each row: (B, T) batch -> (B,)."""
    logits = model(batch.input_ids)  # (B, T, V)
    return (token_logprobs(logits, batch.labels) * batch.mask).sum(-1)  # (B,)


def concatenated_logprobs(
    model: torch.nn.Module, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps (B,), rejected_logps (B,)) from one forward over a `concatenated_batch`."""
    logps = sequence_logprobs(model, batch)  # (2B,)
    B = logps.shape[0] // 2
    return logps[:B], logps[B:]


@torch.no_grad()
def sequence_logprobs_slow(
    model: torch.nn.Module, prompt: Sequence[int], response: Sequence[int]
) -> float:
    """The same quantity for one sequence, token by token with no padding: the test reference."""
    device = next(model.parameters()).device
    tokens = list(prompt) + list(response)
    total = 0.0
    for t in range(len(prompt), len(tokens)):
        ctx = torch.tensor([tokens[:t]], device=device)  # (1, t)
        logp = torch.log_softmax(model(ctx)[0, -1].double(), dim=-1)  # (V,)
        total += float(logp[tokens[t]])
    return total
