"""Solution to the exercise of lesson 11 (online DPO)."""

import itertools


def label_round(rewards: list[list[float]]) -> list[tuple[int, int, int]]:
    """One round's pairs at tau = 0 (the noiseless Bradley-Terry labeller).

    rewards: one list per prompt, the oracle reward of each of its K responses.
    Returns (prompt, chosen, rejected) for every pair i < j of the same prompt whose
    rewards differ, the higher reward chosen, in the order prompt, then i, then j.
    """
    out = []
    for p, row in enumerate(rewards):
        for i, j in itertools.combinations(range(len(row)), 2):
            if row[i] != row[j]:
                out.append((p, i, j) if row[i] > row[j] else (p, j, i))
    return out
