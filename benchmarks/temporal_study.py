"""Single frame against two key frames (BEVDepth4D) in the study configuration, paired by seed (reads only).

    .venv/bin/tigbev ablate --preset study --out runs/study --seeds 0,1,2 --rows depth,inter_keypoint
    .venv/bin/tigbev ablate --preset study --out runs/study --seeds 0,1,2 --rows depth,inter_keypoint --frames 2
    python benchmarks/temporal_study.py --out runs/study --write docs/img/temporal-study   # .md, .json, .png

Both tables come from one world (one teacher cache serves every frame count). Per row (the depth-supervised base,
BEVDepth, and TiG-BEV) and frame count: mean ± half the range over the seeds of mAP, NDS and the velocity and
orientation errors, read from each student's ``eval/metrics.json``; then the paired differences (mean of the per-seed
differences ± half their range): two frames over one for each row, and TiG-BEV over its base at each frame count,
beside the paper's. "every seed" when all differences share a sign, else "inside the noise".
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tigbev.pipeline.ablate import paired_verdict

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
    seeds = sorted(set(a) & set(b))
    scale = 100.0 if metric in ("mAP", "NDS") else 1.0
    diffs = [scale * (a[s][metric] - b[s][metric]) for s in seeds]
    return {"seeds": seeds, "mean": statistics.fmean(diffs), "half_range": (max(diffs) - min(diffs)) / 2,
            "per_seed": dict(zip(seeds, diffs)), "verdict": paired_verdict(diffs)}


def study(out: Path) -> dict[str, Any]:
    per_frames = {1: _students(out, 1), 2: _students(out, 2)}
    cells = []
    for key, label in ROWS.items():
        for frames, rows in per_frames.items():
            if key in rows:
                seeds = rows[key]
                cells.append({"row": key, "label": label, "frames": frames, "seeds": sorted(seeds), **{
                    m: {"mean": statistics.fmean(s[m] for s in seeds.values()),
                        "half_range": (max(s[m] for s in seeds.values()) - min(s[m] for s in seeds.values())) / 2}
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
            f"{c[m]['mean']:.4f} ± {c[m]['half_range']:.4f}" for m in METRICS) + " |")
    lines += ["", "| comparison | ΔmAP (points) | ΔNDS (points) | ΔmAVE (m/s) | ΔmAOE (rad) | published ΔmAP / ΔNDS | "
              "reading (mAP / NDS / mAVE) |", "|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        pub = "" if c["published"] is None else f"{c['published'][0]:+.1f} / {c['published'][1]:+.1f}"
        lines.append(f"| {c['what']} | {c['mAP']['mean']:+.1f} ± {c['mAP']['half_range']:.1f} | "
                     f"{c['NDS']['mean']:+.1f} ± {c['NDS']['half_range']:.1f} | "
                     f"{c['mAVE']['mean']:+.3f} ± {c['mAVE']['half_range']:.3f} | "
                     f"{c['mAOE']['mean']:+.3f} ± {c['mAOE']['half_range']:.3f} | {pub} | "
                     f"{c['mAP']['verdict']} / {c['NDS']['verdict']} / {c['mAVE']['verdict']} |")
    lines += ["", "Paired by seed: mean of the per-seed differences ± half their range; mAP and NDS in points, errors "
              "in their units (lower is better)."]
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
            ax.errorbar(xs, [c[metric]["mean"] for c in cells], yerr=[c[metric]["half_range"] for c in cells],
                        marker="o", capsize=3, label=ROWS[key])
        ax.set_xticks([1, 2], ["1 frame", "2 frames"])
        ax.set_title(f"{metric} (mean of seeds, ± half range)")
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
