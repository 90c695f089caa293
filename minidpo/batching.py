"""Turning (prompt, response) token lists into padded training tensors.

One function, `build_batch`, used by every stage that scores responses (SFT,
sequence log-probs for DPO, the reward model, PPO), so the masking convention
lives in one place:

    tokens    = prompt_ids + response_ids          (response_ids end with <|endoftext|>)
    input_ids = tokens[:-1]                        right-padded to the longest row
    labels    = tokens[1:]                         label t is the token predicted at t
    mask      = 1 where the label is a response token (end-of-text included),
                0 on prompt tokens and padding

Right padding needs no attention mask: padding sits after every real token, so a
causal model never attends to it from a real position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Padded tensors for a batch of B sequences of (padded) length T."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long: next token at each position
    mask: torch.Tensor  # (B, T) float: 1 on response labels (or all real labels)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.mask.to(device))

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) positions: the tokens a forward pass processes usefully."""
        return int((self.labels != -1).sum())


def build_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    all_tokens: bool = False,
) -> Batch:
    """Right-padded (input_ids, labels, mask) for prompt/response token lists.

    `all_tokens=True` also puts the prompt's labels in the mask (plain language
    modelling); the default masks them out (the SFT/DPO convention).

    Example: prompts [[5, 6]], responses [[7, 0]] (0 = end-of-text), pad 0 ->
    input_ids [[5, 6, 7]], labels [[6, 7, 0]], mask [[0, 1, 1]].
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    T = max(len(r) for r in rows) - 1
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -1, dtype=torch.long)  # -1 marks padding
    mask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        n = len(row) - 1
        input_ids[i, :n] = torch.tensor(row[:-1])
        labels[i, :n] = torch.tensor(row[1:])
        first = 0 if all_tokens else len(p) - 1  # label index of the first response token
        mask[i, first:n] = 1.0
    return Batch(input_ids, labels, mask)


def concatenated_batch(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    *,
    pad_id: int,
) -> Batch:
    """One right-padded batch of 2B rows: B (prompt, chosen) rows, then B (prompt, rejected)."""
    return build_batch([*prompts, *prompts], [*chosen, *rejected], pad_id=pad_id)
