"""Single frame against two key frames (BEVDepth4D) in the study configuration, paired by seed (reads only).

    .venv/bin/tigbev ablate --preset study --out runs/study --seeds 0,1,2 --rows depth,inter_keypoint
    .venv/bin/tigbev ablate --preset study --out runs/study --seeds 0,1,2 --rows depth,inter_keypoint --frames 2
    python benchmarks/temporal_study.py --out runs/study --write docs/img/temporal-study   # .md, .json, .png

Both tables come from one world (one teacher cache serves every frame count). Per row (the depth-supervised base,
BEVDepth, and TiG-BEV) and frame count: the mean over the seeds of mAP, NDS and the velocity and orientation errors
± the half-width of its 95 % t interval, read from each student's ``eval/metrics.json``; then the paired differences
(the mean of the per-seed differences ± the half-width of its 95 % t interval): two frames over one for each row,
and TiG-BEV over its base at each frame count, beside the paper's. "resolved" where the interval excludes 0, else
"inside the noise"; the sign agreement over the seeds is shown beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tigbev.utils.paired import mean_interval, paired_difference

ROWS = {"depth": "+ dense depth (BEVDepth)", "inter_keypoint": "TiG-BEV"}
METRICS = ("mAP", "NDS", "mAVE", "mAOE", "mATE")
# TiG-BEV-R50 on nuScenes val: single frame 33.8 / 37.5, 4D 36.6 / 46.1 (METHOD.md).
PUBLISHED_4D_OVER_1 = {"inter_keypoint": (2.8, 8.6)}
PUBLISHED_TIG_OVER_BASE = {1: (2.4, 2.3)}


def _students(out: Path, frames: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per row, per seed: the student's metrics, from the ablation table's students."""
    stem = "ablation" if frames == 1 else f"ablation-f{frames}"
    table = json.loads((out / f"{stem}.json").read_text())
    tag = "" if frames == 1 else f"-f{frames}"
    got: dict[str, dict[str, dict[str, float]]] = {}
    for row in table["rows"]:
        if row["key"] not in ROWS:
            continue
        for seed in row["per_seed"]:
            m = json.loads((out / f"student-ablate{tag}-{row['key']}-s{seed}" / "eval" / "metrics.json").read_text())
            got.setdefault(row["key"], {})[seed] = {k: float(m[k]) for k in METRICS}
    return got


def _paired(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], metric: str) -> dict[str, Any]:
    seeds = sorted(set(a) & set(b), key=int)
    scale = 100.0 if metric in ("mAP", "NDS") else 1.0
    d = paired_difference({s: a[s][metric] for s in seeds}, {s: b[s][metric] for s in seeds}, scale=scale)
    assert d is not None, "no seed in common"
    return {"seeds": seeds, "mean": d.mean, "ci95_half": d.half_width if d.n > 1 else None,
            "per_seed": d.per_seed, "verdict": d.reading, "signs": d.signs,
            "cell": d.cell(1 if metric in ("mAP", "NDS") else 3)}


def study(out: Path) -> dict[str, Any]:
    per_frames = {1: _students(out, 1), 2: _students(out, 2)}
    cells = []
    for key, label in ROWS.items():
        for frames, rows in per_frames.items():
            if key in rows:
                seeds = rows[key]
                cells.append({"row": key, "label": label, "frames": frames, "seeds": sorted(seeds), **{
                    m: dict(zip(("mean", "ci95_half"), mean_interval([s[m] for s in seeds.values()])))
                    for m in METRICS}})
    comparisons = []
    for key, label in ROWS.items():
        if key in per_frames[1] and key in per_frames[2]:
            comparisons.append({"what": f"{label}: 2 frames over 1", "published": PUBLISHED_4D_OVER_1.get(key),
                                **{m: _paired(per_frames[2][key], per_frames[1][key], m) for m in METRICS}})
    for frames, rows in per_frames.items():
        if "inter_keypoint" in rows and "depth" in rows:
            comparisons.append({"what": f"TiG-BEV over its base, {frames} frame(s)",
                                "published": PUBLISHED_TIG_OVER_BASE.get(frames),
                                **{m: _paired(rows["inter_keypoint"], rows["depth"], m) for m in METRICS}})
    return {"cells": cells, "comparisons": comparisons}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| row | frames | seeds | mAP | NDS | mAVE (m/s) | mAOE (rad) | mATE (m) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        lines.append(f"| {c['label']} | {c['frames']} | {len(c['seeds'])} | " + " | ".join(
            f"{c[m]['mean']:.4f} ± {c[m]['ci95_half']:.4f}" for m in METRICS) + " |")
    lines += ["", "| comparison | ΔmAP (points) | ΔNDS (points) | ΔmAVE (m/s) | ΔmAOE (rad) | published ΔmAP / ΔNDS | "
              "reading (mAP / NDS / mAVE) | signs (mAP / NDS / mAVE) |", "|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        pub = "" if c["published"] is None else f"{c['published'][0]:+.1f} / {c['published'][1]:+.1f}"
        lines.append(f"| {c['what']} | {c['mAP']['cell']} | {c['NDS']['cell']} | {c['mAVE']['cell']} | "
                     f"{c['mAOE']['cell']} | {pub} | {c['mAP']['verdict']} / {c['NDS']['verdict']} / "
                     f"{c['mAVE']['verdict']} | {c['mAP']['signs']} / {c['NDS']['signs']} / {c['mAVE']['signs']} |")
    lines += ["", "Paired by seed: the mean of the per-seed differences ± the half-width of its 95 % t interval; "
              "resolved where the interval excludes 0. mAP and NDS in points, errors in their units (lower is "
              "better)."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, metric in zip(axes, ("mAP", "NDS", "mAVE")):
        for i, key in enumerate(ROWS):
            cells = [c for c in result["cells"] if c["row"] == key]
            xs = [c["frames"] + (i - 0.5) * 0.08 for c in cells]
            ax.errorbar(xs, [c[metric]["mean"] for c in cells], yerr=[c[metric]["ci95_half"] for c in cells],
                        marker="o", capsize=3, label=ROWS[key])
        ax.set_xticks([1, 2], ["1 frame", "2 frames"])
        ax.set_title(f"{metric} (mean of seeds, 95 % CI)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Study configuration: single frame against BEVDepth4D-style two key frames")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the study folder (both ablation tables)")
    parser.add_argument("--write", type=Path, required=True, help="path prefix of the .md, .json and .png written")
    args = parser.parse_args()
    result = study(args.out)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    args.write.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.write.with_suffix(".md").write_text(markdown(result))
    plot(result, args.write.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
