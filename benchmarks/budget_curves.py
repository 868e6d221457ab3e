"""The study's budget: mAP and NDS of one student against its schedule, from separate runs (reads only).

    for e in 2 3 4; do tigbev ablate --preset study --augment --student-epochs $e --rows inter_keypoint --seeds 0 \
        --out runs/study; done
    python benchmarks/budget_curves.py --out runs/study --row inter_keypoint --augment --epochs 1,2,3,4 \
        --write docs/img/budget-curves            # writes .json, .md and .png

Each budget is a separate student of the table ``ablation[-e<N>][-aug].json`` (its own learning-rate schedule, with
the step decay at the same fractions of it), so a point is what a table at that budget would train. The chosen
budget is the smallest whose mAP reaches ``--target`` (default 0.20); if none does, the largest one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tigbev.pipeline.demo import world_preset


def _table(out: Path, epochs: int, augment: bool) -> Path:
    default = world_preset("study")["student_epochs"]
    return out / ("ablation" + (f"-e{epochs}" if epochs != default else "") + ("-aug" if augment else "") + ".json")


def curves(out: Path, row: str, epochs: list[int], augment: bool, target: float) -> dict[str, Any]:
    points = []
    for e in epochs:
        path = _table(out, e, augment)
        if not path.exists():
            continue
        table = json.loads(path.read_text())
        r = next((r for r in table["rows"] if r["key"] == row), None)
        if r is None:
            continue
        for seed, m in r["per_seed"].items():
            points.append({"epochs": e, "seed": seed, **{k: m[k] for k in ("mAP", "NDS", "mATE", "mAOE")},
                           "step_s": m["step_s"], "table": path.name})
    reached = sorted(p["epochs"] for p in points if p["mAP"] >= target)
    chosen = reached[0] if reached else (max(p["epochs"] for p in points) if points else None)
    return {"row": row, "augment": augment, "target_mAP": target, "points": points, "chosen_epochs": chosen,
            "reached": bool(reached)}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| epochs | seed | mAP | NDS | mATE | mAOE | step (s) |", "|---|---|---|---|---|---|---|"]
    for p in sorted(result["points"], key=lambda p: (p["epochs"], p["seed"])):
        lines.append(f"| {p['epochs']} | {p['seed']} | {p['mAP']:.4f} | {p['NDS']:.4f} | {p['mATE']:.3f} | "
                     f"{p['mAOE']:.3f} | {p['step_s']:.2f} |")
    chosen = result["chosen_epochs"]
    lines += ["", f"Chosen budget: {chosen} epoch(s) (" + (f"the smallest with mAP >= {result['target_mAP']:.2f}"
                                                          if result["reached"] else
                                                          f"no budget reached mAP {result['target_mAP']:.2f}: the "
                                                          "largest") + ")."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("mAP", "NDS")):
        pts = sorted(result["points"], key=lambda p: p["epochs"])
        ax.plot([p["epochs"] for p in pts], [p[metric] for p in pts], "o-")
        if metric == "mAP":
            ax.axhline(result["target_mAP"], color="grey", ls="--", lw=1, label=f"target {result['target_mAP']:.2f}")
            ax.legend(fontsize=8)
        if result["chosen_epochs"] is not None:
            ax.axvline(result["chosen_epochs"], color="tab:green", lw=1)
        ax.set_xlabel("student epochs (1 epoch = 500 steps of batch 2)")
        ax.set_title(f"{metric} on synth_val")
        ax.grid(alpha=0.3)
    fig.suptitle(f"TiG-BEV from the canonical cache{' with image augmentation and BDA' if result['augment'] else ''}"
                 ", one seed, a separate run per budget", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the study folder")
    parser.add_argument("--row", default="inter_keypoint")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--epochs", default="1,2,3,4")
    parser.add_argument("--target", type=float, default=0.20)
    parser.add_argument("--write", type=Path, required=True, help="path prefix of the .json, .md and .png written")
    args = parser.parse_args()
    result = curves(args.out, args.row, [int(e) for e in args.epochs.split(",")], args.augment, args.target)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    args.write.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.write.with_suffix(".md").write_text(markdown(result))
    plot(result, args.write.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
