"""Scoring samples: the oracle reward r*(x, y) of each, the one way every stage does it.

A `ScoreFn` maps samples to one score each, a (B,) tensor: `oracle_scores` (r*, for
PPO-GT, the preference labels and every evaluation), or a reward model's
`minidpo.reward_model.RewardModel.score` (RLHF's PPO, Best-of-N). `oracle_breakdowns`
keeps the rule-by-rule counts too, for the unparseable share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from minidpo.oracle import RewardBreakdown, reward_breakdown
from minidpo.sampling import Sample
from minidpo.world import World, load_world

ScoreFn = Callable[[Sequence[Sample]], torch.Tensor]


def oracle_breakdowns(
    samples: Sequence[Sample], world: World | None = None
) -> list[RewardBreakdown]:
    """r* of each sample, rule by rule (an unterminated sample is charged by r* itself)."""
    world = world or load_world()
    return [
        reward_breakdown(s.prompt, s.response, terminated=s.terminated, world=world)
        for s in samples
    ]


def oracle_scores(samples: Sequence[Sample], world: World | None = None) -> torch.Tensor:
    """r*(x, y) of each sample: (B,) float64 (``.tolist()`` gives the exact floats)."""
    totals = [b.total for b in oracle_breakdowns(samples, world)]
    return torch.tensor(totals, dtype=torch.float64)
