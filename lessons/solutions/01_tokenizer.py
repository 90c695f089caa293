"""Solution to the exercise of lesson 01 (the tokenizer): one BPE training step."""

from __future__ import annotations

from itertools import pairwise


def bpe_step(ids: list[int], new_id: int) -> tuple[tuple[int, int], list[int]]:
    """Merge the most frequent adjacent pair of `ids` into `new_id`; return (pair, new ids).

    Counts every adjacent pair (overlapping positions included, as `get_stats` does),
    picks the most frequent one, the smallest pair on a tie (as `train_bpe` does), then
    scans left to right replacing each occurrence without overlap (as `merge` does):
    bpe_step([5, 5, 5], 6) -> ((5, 5), [6, 5]).
    """
    counts: dict[tuple[int, int], int] = {}
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + 1
    top = max(counts.values())
    pair = min(p for p, n in counts.items() if n == top)
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return pair, out
