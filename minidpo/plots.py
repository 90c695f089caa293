"""Plots (matplotlib, PNG): small, labelled, readable at a glance.

Each function takes numbers and a path and writes one PNG atomically; none of
them trains or samples anything.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from minidpo.atomic import atomic_write_bytes


def _save(fig: plt.Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def reward_histogram(rewards: Mapping[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """Overlaid histograms of oracle rewards, one per label, with each mean marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lo = min(min(v) for v in rewards.values())
    hi = max(max(v) for v in rewards.values())
    bins = np.arange(np.floor(lo * 4) / 4 - 0.125, hi + 0.375, 0.25)
    for i, (label, values) in enumerate(rewards.items()):
        color = f"C{i}"
        mean = float(np.mean(values))
        ax.hist(values, bins=bins, alpha=0.5, color=color, density=True,
                label=f"{label} (n={len(values)}, mean {mean:+.2f})")  # fmt: skip
        ax.axvline(mean, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("oracle reward r*(x, y)")
    ax.set_ylabel("share of responses (density)")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _save(fig, path)
