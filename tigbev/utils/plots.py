"""Plots people would rather see than read: loss curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_loss_curves"]


def plot_loss_curves(path: str | Path, steps: Sequence[int], losses: Mapping[str, Sequence[float]],
                     title: str) -> Path:
    """One line per named loss against the optimiser step (log y), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, values in losses.items():
        ax.plot(steps[: len(values)], values, label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
