"""What each lever of the study configuration buys: one student trained per (lever, row, seed) on the study world.

    python benchmarks/study_levers.py --out runs/study --levers reference,no_pretrain,augment \
        --rows depth,inter_keypoint        [--seeds 0] [--workers 1]

Uses (or first builds) the world of ``tigbev ablate --preset study --out OUT`` (synth, teacher, cache, pretrained
backbone) and trains each lever's variant of the study budget as ``OUT/student-lever-<lever>-<row>-s<seed>``.
Finished students are reused on rerun, so the table grows across sessions. Writes ``OUT/levers.json`` and
``OUT/levers.md`` (mAP, NDS, mATE, mAOE and the step time per lever and row; mean over the seeds given).
Levers change the budget (``augment``, ``lr_*``, ``epochs_2``, ``input_*``), the world (``no_pretrain``) or one
loss weight of the row (``inner_depth_*``, ``inter_channel_*``: the weight sweep). ``--png`` draws the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tigbev.config import LossWeights
from tigbev.pipeline.ablate import ABLATION_ROWS, plot_ablation
from tigbev.pipeline.demo import (
    DemoConfig,
    DemoWorld,
    prepare_world,
    train_demo_student,
    world_preset,
)
from tigbev.utils.provenance import write_json_atomic

Lever = Callable[[DemoConfig, DemoWorld, LossWeights], tuple[DemoConfig, DemoWorld, LossWeights]]


def _budget(**changes: Any) -> Lever:
    return lambda c, w, lw: (dataclasses.replace(c, **changes), w, lw)


def _weight(name: str, value: float) -> Lever:
    """The row's weights with one term's weight replaced (0 leaves the row without that term)."""
    return lambda c, w, lw: (c, w, dataclasses.replace(lw, **{name: value}))


LEVERS: dict[str, tuple[str, Lever]] = {
    "reference": ("the study budget as it is", lambda c, w, lw: (c, w, lw)),
    "no_pretrain": ("random initial backbone (no pretraining)",
                    lambda c, w, lw: (c, dataclasses.replace(w, backbone=None), lw)),
    "augment": ("image augmentation and BDA on", _budget(student_augment=True)),
    "lr_1e-3": ("learning rate 1e-3", _budget(student_lr=1e-3)),
    "lr_4e-3": ("learning rate 4e-3", _budget(student_lr=4e-3)),
    "epochs_2": ("two epochs (twice the steps)", _budget(student_epochs=2)),
    # Input resolution (the world renders 480 x 270; the study's students see 128 x 352, 0.73x and cropped).
    "input_96x264": ("input 96 x 264 (0.56x the pixels)", _budget(student_input_hw=(96, 264))),
    "input_192x528": ("input 192 x 528 (2.25x the pixels)", _budget(student_input_hw=(192, 528))),
    # The weight sweep of the two terms that hurt in the demo world (published: inner-depth 1, inter-channel 10).
    **{f"inner_depth_{v:g}": (f"inner-depth weight {v:g}", _weight("inner_depth", v)) for v in (0.25, 4.0)},
    **{f"inter_channel_{v:g}": (f"inter-channel weight {v:g}", _weight("inter_channel", v)) for v in (1.0, 100.0)},
}
_METRICS = ("mAP", "NDS", "mATE", "mAOE", "step_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--levers", default="reference,no_pretrain")
    parser.add_argument("--rows", default="depth,inter_keypoint")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--png", type=Path, default=None,
                        help="Also draw mAP and NDS per lever (a bar at the mean, a dot per seed) to this file.")
    parser.add_argument("--reference", type=Path, default=None,
                        help="An ablation.json of the same world whose rows the chart shows first (the study budget).")
    args = parser.parse_args()
    levers = [x for x in args.levers.split(",") if x]
    unknown = [x for x in levers if x not in LEVERS]
    if unknown:
        parser.error(f"unknown levers {unknown}; choose from {sorted(LEVERS)}")
    rows = {r.key: r for r in ABLATION_ROWS}
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = DemoConfig(out_dir=args.out, seed=seeds[0], workers=args.workers, **world_preset("study"))
    world = prepare_world(base)
    path = args.out / "levers.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    for lever in levers:
        label, apply = LEVERS[lever]
        for key in args.rows.split(","):
            row = rows[key]
            per_seed = {}
            for seed in seeds:
                cfg, w, weights = apply(base, world, row.weights)
                m = train_demo_student(cfg, w, f"lever-{lever}-{key}-s{seed}", weights, row.source, seed=seed)
                per_seed[str(seed)] = {k: m[k] for k in _METRICS}
            entry = table.setdefault(lever, {"label": label, "rows": {}})
            old = entry["rows"].get(key, {}).get("per_seed", {})
            per_seed = {**old, **per_seed}
            entry["rows"][key] = {"per_seed": per_seed,
                                  "mean": {k: statistics.fmean(s[k] for s in per_seed.values()) for k in _METRICS}}
            write_json_atomic(path, table)
            (args.out / "levers.md").write_text(_markdown(table))
    print(_markdown(table))
    if args.png is not None:
        _plot(table, args.png, args.reference)


def _plot(table: dict, path: Path, reference: Path | None) -> None:
    """The levers' rows (and the ablation's rows of ``reference``, the study budget itself) as the ablation's chart."""
    rows = [] if reference is None else [{**r, "label": f"{r['label']} (the study budget)"}
                                         for r in json.loads(reference.read_text())["rows"]]
    rows += [{"label": f"{entry['label']} ({key})", **r}
             for entry in table.values() for key, r in entry["rows"].items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_ablation(path, {"rows": rows, "seeds": sorted({s for r in rows for s in r["per_seed"]})})


def _markdown(table: dict) -> str:
    lines = ["| lever | row | seeds | mAP | NDS | mATE | mAOE | step (s) |", "|---|---|---|---|---|---|---|---|"]
    for entry in table.values():
        for key, r in entry["rows"].items():
            m = r["mean"]
            lines.append(f"| {entry['label']} | {key} | {len(r['per_seed'])} | {m['mAP']:.4f} | {m['NDS']:.4f} | "
                         f"{m['mATE']:.3f} | {m['mAOE']:.3f} | {m['step_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
