"""Plots (matplotlib, PNG): small, labelled, readable at a glance.

Each function takes numbers and a path and writes one PNG atomically; none of
them trains or samples anything.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from minidpo.atomic import atomic_write_bytes


def figure(
    nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 3.5), **subplots: Any
) -> tuple[Figure, Any]:
    """A figure and its axes, without pyplot: no global backend or state is touched, so
    importing this module leaves a notebook's inline plots alone."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically (120 dpi, tight)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def reward_histogram(rewards: Mapping[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """Overlaid histograms of oracle rewards, one per label, with each mean marked."""
    fig, ax = figure(figsize=(7, 4))
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
    return save_png(fig, path)
