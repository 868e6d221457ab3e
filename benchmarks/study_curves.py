"""Learning curves of the study's students: the detection losses against the step, one line per ablation row.

    python benchmarks/study_curves.py --out runs/study [--rows depth,inter_keypoint,online] [--png study-curves.png]

Reads ``OUT/student-ablate-<row>-s<seed>/metrics.jsonl`` (what ``tigbev ablate --preset study --out OUT`` wrote),
averages each logged step over the seeds found, and plots the heatmap and box-regression losses (the terms every
row shares, so the rows compare; weighted as trained, and for these two terms the weight is 1). A curve still
falling at the last step says that the budget, not the method, limits the row. Writes the PNG (default
``study-curves.png`` here: nothing is added to the study directory, which ablate keeps to its own files) and
prints, per row, the first and last logged values and how much the mean fell from the fourth to the last fifth of
the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tigbev.pipeline.ablate import ABLATION_ROWS

TERMS = ("heatmap", "bbox")


def row_curves(out: Path, key: str) -> tuple[list[int], dict[str, list[float]], int]:
    """(steps, term -> mean over seeds, number of seeds) of one row; empty when no seed has finished."""
    per_seed = []
    for path in sorted(out.glob(f"student-ablate-{key}-s*/metrics.jsonl")):
        steps = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "step":
                steps[rec["step"]] = {t: rec[t] for t in TERMS}
        per_seed.append(steps)
    if not per_seed:
        return [], {}, 0
    common = sorted(set.intersection(*(set(s) for s in per_seed)))
    curves = {t: [statistics.fmean(s[step][t] for s in per_seed) for step in common] for t in TERMS}
    return common, curves, len(per_seed)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default=",".join(r.key for r in ABLATION_ROWS))
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {r.key: r.label for r in ABLATION_ROWS}
    fig, axes = plt.subplots(1, len(TERMS), figsize=(12, 4.2), dpi=110)
    print("| row | seeds | term | first | last | mean of the 4th fifth minus mean of the 5th |")
    print("|---|---|---|---|---|---|")
    for key in [k for k in args.rows.split(",") if k]:
        steps, curves, seeds = row_curves(args.out, key)
        if not steps:
            continue
        for ax, term in zip(axes, TERMS):
            ax.plot(steps, _smooth(curves[term]), label=f"{labels[key]} ({seeds} seeds)", linewidth=1.2)
            fifth = max(1, len(steps) // 5)
            v = curves[term]
            fall = statistics.fmean(v[-2 * fifth:-fifth]) - statistics.fmean(v[-fifth:])
            print(f"| {key} | {seeds} | {term} | {curves[term][0]:.3f} | {curves[term][-1]:.3f} | {fall:+.3f} |")
    for ax, term in zip(axes, TERMS):
        ax.set_yscale("log")
        ax.set_xlabel("step (batch 2)")
        ax.set_ylabel(f"{term} loss")
        last = max((line.get_xdata()[-1] for line in ax.get_lines()), default=0)
        for frac in (19 / 24, 23 / 24):  # the student schedule's learning-rate steps (x 0.1 each)
            ax.axvline(frac * last, color="0.5", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("study students: detection losses against the step (mean over seeds, 5-step running mean; "
                 "dotted: learning rate x 0.1)", fontsize=10)
    fig.tight_layout()
    png = args.png or Path("study-curves.png")
    fig.savefig(png)
    plt.close(fig)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
