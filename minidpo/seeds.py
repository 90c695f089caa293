"""Every random stream of a run, named in one table: what each draws and from what.

A run has one seed. Each use of randomness draws from its own stream, named in
`STREAMS` with a tag of its own, and derived from the seed, that tag and an index
(such as the step) through ``np.random.SeedSequence([seed, tag, *index])``, so that
- a batch depends on (seed, step) only, and a resumed run draws what an
  uninterrupted one would;
- no two streams share a draw, nor one stream under two seeds: the entropy
  ``[seed, tag, *index]`` differs between any two of them (a "seed" stream's 32-bit
  word can still equal another's by chance, about 2**-32 for a pair), and adding a
  stream (with a new tag) changes no other.

Two kinds of stream:
- "rng": `stream(seed, name, *index)` is the NumPy generator
  ``default_rng([seed, tag, *index])``;
- "seed": `seed_of(seed, name, *index)` is an integer seed for the samplers (which
  seed one generator per row from it), the first word of
  ``SeedSequence([seed, tag, *index]).generate_state(1)``.

SeedSequence pads its entropy with zeros, so ``[seed, tag]`` and ``[seed, tag, 0]``
give one draw: call each stream with the same number of indices everywhere.
"""

from __future__ import annotations

import numpy as np

KINDS = ("rng", "seed")

# name: (tag, kind, what it draws); every tag is used once, never reused
STREAMS: dict[str, tuple[int, str, str]] = {
    "sft/demonstrations": (1, "rng", "the SFT demonstrations, training then held-out"),
    "sft/batch": (2, "rng", "the demonstrations of SFT step s"),
    "dpo/batch": (3, "rng", "the pairs of DPO step s"),
    "rm/batch": (4, "rng", "the pairs of reward-model step s"),
    "rm/normalisation": (5, "seed", "SFT samples that set the reward model's gain and bias"),
    "rm/report": (6, "seed", "fresh SFT samples for the reward model's Spearman correlation"),
    "preferred_ft/batch": (7, "rng", "the chosen responses of Preferred-FT step s"),
    "unlikelihood/batch": (8, "rng", "the pairs of Unlikelihood step s"),
    "ppo/prompts": (11, "rng", "the training prompts of PPO iteration i"),
    "ppo/rollout": (12, "seed", "the sampling seeds of PPO iteration i's rollouts"),
    "ppo/minibatches": (13, "rng", "the minibatch order of PPO iteration i"),
    "ppo/eval": (
        14,
        "seed",
        "the held-out samples of every PPO evaluation (the same draw each time)",
    ),
    "grpo/prompts": (21, "rng", "the training prompts of GRPO iteration i"),
    "grpo/rollout": (22, "seed", "the sampling seeds of GRPO iteration i's groups"),
    "grpo/minibatches": (23, "rng", "the minibatch order of GRPO iteration i"),
    "online_dpo/samples": (31, "seed", "the on-policy samples of online DPO round r"),
    "online_dpo/labels": (32, "rng", "the Bradley-Terry coin flips (and subset) of round r"),
    "online_dpo/round": (33, "seed", "the training seed of round r's DPO (its batches)"),
    "shaping/labels": (
        34,
        "rng",
        "the Bradley-Terry coin flips of the pairs relabelled by r_shaped",
    ),
    "prefs/labels": (41, "rng", "the Bradley-Terry coin flips of preference round k"),
    "prefs/samples": (42, "seed", "the SFT samples of preference round k"),
    "prefs/validation": (
        43,
        "rng",
        "the prompts carved from the training pairs as the validation split",
    ),
    "eval/samples": (51, "seed", "the held-out samples of every evaluated policy"),
    "eval/gravity": (52, "seed", 'the "Explain gravity." samples shown in the report'),
}


def _entropy(seed: int, name: str, kind: str, index: tuple[int, ...]) -> list[int]:
    tag, have, _ = STREAMS[name]
    if have != kind:
        call = "stream" if kind == "rng" else "seed_of"
        raise KeyError(f"{name} is a {have!r} stream; {call}() takes {kind!r} streams")
    return [seed, tag, *index]


def stream(seed: int, name: str, *index: int) -> np.random.Generator:
    """The NumPy generator of stream `name` (kind "rng") at `index`."""
    return np.random.default_rng(_entropy(seed, name, "rng", index))


def seed_of(seed: int, name: str, *index: int) -> int:
    """The integer sampling seed of stream `name` (kind "seed") at `index`."""
    entropy = _entropy(seed, name, "seed", index)
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
