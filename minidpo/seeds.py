"""Every random stream of a run, named in one table: what each draws and from what.

A run has one seed. Each use of randomness draws from its own stream, derived from
that seed and the stream's tag (and an index such as the step), so that
- a batch depends on (seed, step) only, and a resumed run draws what an
  uninterrupted one would;
- two stages never share draws by accident, and adding a stream changes no other.

`stream(seed, name, *index)` is a NumPy generator ``default_rng([seed, tag, *index])``;
`seed_of(seed, name, *index)` is an integer seed for the samplers (which seed one
generator per row), ``SeedSequence([seed, tag, *index])``'s first word, or for the
streams marked "offset" the seed plus a fixed offset (kept from the first round, so
the committed numbers stand).
"""

from __future__ import annotations

import numpy as np

# name: (tag, kind, what it draws)
STREAMS: dict[str, tuple[int, str, str]] = {
    "sft/demonstrations": (1, "rng", "the SFT demonstrations, training then held-out"),
    "sft/batch": (2, "rng", "the demonstrations of SFT step s"),
    "dpo/batch": (3, "rng", "the pairs of DPO step s"),
    "rm/batch": (4, "rng", "the pairs of reward-model step s"),
    "rm/normalisation": (5, "seed", "SFT samples that set the reward model's gain and bias"),
    "rm/report": (6, "seed", "fresh SFT samples for the reward model's Spearman correlation"),
    "preferred_ft/batch": (7, "rng", "the chosen responses of Preferred-FT step s"),
    "unlikelihood/batch": (8, "rng", "the pairs of Unlikelihood step s"),
    "ppo/prompts": (3, "rng", "the training prompts of PPO iteration i"),
    "ppo/rollout": (4, "seed", "the sampling seeds of PPO iteration i's rollouts"),
    "ppo/minibatches": (5, "rng", "the minibatch order of PPO iteration i"),
    "ppo/eval": (
        7,
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
    "prefs/labels": (4, "rng", "the Bradley-Terry coin flips of preference round k"),
    "prefs/samples": (17, "offset1000", "SFT samples of preference round k: seed * 1000 + 17 + k"),
    "eval/samples": (12345, "offset", "held-out samples of every evaluated policy"),
    "eval/gravity": (777, "offset", 'the "Explain gravity." samples shown in the report'),
}


def stream(seed: int, name: str, *index: int) -> np.random.Generator:
    """The NumPy generator of stream `name` (kind "rng") at `index`."""
    tag, kind, _ = STREAMS[name]
    if kind != "rng":
        raise KeyError(f"{name} is a {kind} stream, not a generator")
    return np.random.default_rng([seed, tag, *index])


def seed_of(seed: int, name: str, *index: int) -> int:
    """The integer sampling seed of stream `name` (kinds "seed", "offset", "offset1000")."""
    tag, kind, _ = STREAMS[name]
    if kind == "seed":
        return int(np.random.SeedSequence([seed, tag, *index]).generate_state(1)[0])
    if kind == "offset":
        return seed + tag + sum(index)
    if kind == "offset1000":
        return seed * 1000 + tag + sum(index)
    raise KeyError(f"{name} is a generator stream, not a seed")
