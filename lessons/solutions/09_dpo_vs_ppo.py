"""Solution to the exercise of lesson 09 (DPO vs PPO): the upper (Pareto) frontier."""


def upper_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper frontier of (kl, reward) points, in increasing KL.

    Sort by KL (for equal KL, the higher reward first), then walk right keeping each
    point whose reward beats every reward kept so far: what a method reaches at each
    KL budget. Same rule as `minidpo.report.pareto`, on tuples instead of dicts.
    """
    front: list[tuple[float, float]] = []
    best = float("-inf")
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if reward > best:
            front.append((kl, reward))
            best = reward
    return front
