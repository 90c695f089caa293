"""Solution to the exercise of lesson 09 (DPO vs PPO): a method's frontier."""


def upper_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The frontier of (kl, reward) points, in increasing KL: the upper concave hull up to
    its highest point (a mixture of two policies reaches the chord between them).

    Andrew's monotone chain on the points sorted by (kl, reward): a point at the same KL
    as the last one replaces it (it has the higher reward), and the last point is dropped
    while it lies on or below the chord from the one before it to the new point. Same
    rule as `minidpo.report.rising_hull`, on tuples instead of dicts.
    """
    hull: list[tuple[float, float]] = []
    for x, y in sorted(points):
        while hull and hull[-1][0] == x:
            hull.pop()
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append((x, y))
    if not hull:
        return []
    peak = max(range(len(hull)), key=lambda i: hull[i][1])
    return hull[: peak + 1]
