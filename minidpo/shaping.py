"""Reward shaping: an auxiliary term a user adds to r*, and what each method can do with it.

The study card's third limitation: DPO has no reward to shape. Here the auxiliary term
is one a user of a chat model would want, brevity: a penalty of `weight` per sentence
beyond `free_sentences`,

    r_shaped(x, y) = r*(x, y) - weight * max(0, n_sentences(y) - free_sentences).

PPO and GRPO optimise r_shaped directly (it is their score function); the closest DPO
can come is to relabel its offline pairs by Bradley-Terry on r_shaped (same prompts,
same responses, the offline labeller) and train on those: `relabel_pairs`. Every
policy is then measured on both r_shaped and r* (`minidpo.limits`).

The default charges every sentence beyond the first: r* pays for each true fact, so the
term conflicts with r* and a method that optimises r_shaped must visibly trade r* for
it. That is the ledger's positive control (`minidpo.claims.shaping_row`): if PPO and GRPO
gain nothing on r_shaped either, the run cannot tell what DPO misses.

Sentences are counted as the oracle splits them (`minidpo.oracle.reward_breakdown`'s
labels), so an unparseable fragment counts as a sentence too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from minidpo.config import _f
from minidpo.errors import MinidpoError
from minidpo.oracle import RewardBreakdown
from minidpo.preferences import PreferencePair, bradley_terry_prob
from minidpo.sampling import Sample
from minidpo.scoring import ScoreFn, oracle_breakdowns
from minidpo.world import load_world


@dataclass
class ShapingConfig:
    """The auxiliary reward: a penalty per sentence beyond the first."""

    weight: float = _f(0.5, "penalty per sentence beyond --free-sentences (r* units)")
    free_sentences: int = _f(1, "sentences a response may have before the penalty starts")

    def validate(self, flag_prefix: str = "") -> None:
        """Raise MinidpoError naming the flag of the first bad value."""
        f = f"--{flag_prefix}"
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise MinidpoError(f"{f}weight: must be finite and >= 0, got {self.weight}")
        if self.free_sentences < 0:
            raise MinidpoError(f"{f}free-sentences: must be >= 0, got {self.free_sentences}")


def shaping_term(n_sentences: int, cfg: ShapingConfig) -> float:
    """The auxiliary reward of a response with `n_sentences` sentences (<= 0)."""
    return -cfg.weight * max(0, n_sentences - cfg.free_sentences)


def shaped_reward(b: RewardBreakdown, cfg: ShapingConfig) -> float:
    """r_shaped = r* + the shaping term, from the oracle's breakdown of one response."""
    return b.total + shaping_term(len(b.labels), cfg)


def shaped_score_fn(cfg: ShapingConfig) -> ScoreFn:
    """A `ScoreFn` of r_shaped (PPO's and GRPO's reward when they optimise it)."""

    def score(samples: Sequence[Sample]) -> torch.Tensor:
        out = [shaped_reward(b, cfg) for b in oracle_breakdowns(samples)]
        return torch.tensor(out, dtype=torch.float64)

    return score


def shaped_of_text(prompt: str, response: str, terminated: bool, cfg: ShapingConfig) -> float:
    """r_shaped of one response given as text."""
    s = Sample(prompt, response, [], terminated)
    return shaped_reward(oracle_breakdowns([s], load_world())[0], cfg)


def relabel_pairs(
    pairs: Sequence[PreferencePair], cfg: ShapingConfig, *, tau: float, rng: np.random.Generator
) -> list[PreferencePair]:
    """The same response pairs labelled again by a Bradley-Terry draw on r_shaped (DPO's
    way to take a shaped reward: offline, through its labels). Pairs whose two shaped
    rewards tie are dropped, as `label_pairs` drops ties."""
    out = []
    for p in pairs:
        a = shaped_of_text(p.prompt, p.chosen, p.chosen_terminated, cfg)
        b = shaped_of_text(p.prompt, p.rejected, p.rejected_terminated, cfg)
        if a == b:
            continue
        a_wins = rng.random() < bradley_terry_prob(a, b, tau)
        win = (p.chosen, a, p.chosen_terminated)
        lose = (p.rejected, b, p.rejected_terminated)
        if not a_wins:
            win, lose = lose, win
        out.append(PreferencePair(prompt=p.prompt, chosen=win[0], rejected=lose[0],
                                  score_chosen=win[1], score_rejected=lose[1],
                                  chosen_terminated=win[2], rejected_terminated=lose[2]))  # fmt: skip
    return out
