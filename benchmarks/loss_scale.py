"""How strongly each TiG-BEV loss term pulls on the student, and how that changes with the student's BEV channels.

    python benchmarks/loss_scale.py --out runs/study [--channels 128,256] [--batches 8] \
        [--checkpoint runs/study/student-ablate-inter_keypoint-s0/last.pt]

Uses the world of ``tigbev ablate --preset study --out OUT`` (its cache and pretrained backbone). For each student
width it builds the TiG-BEV student (the ablation's ``inter_keypoint`` row weights, the demo preset with
``bev_channels`` replaced), runs the first ``--batches`` training batches (batch 2, no augmentation) and measures
per loss term: the unweighted value, the weighted value, and the L2 norm of its gradient on the student's
parameters (the inter-channel adapter is not a student parameter), averaged over the batches. The ratio of each
term's gradient norm to the detection loss's (heatmap + bbox) says which term drives training. ``--checkpoint``
adds the same measurement for a trained student (its width must be one of ``--channels``' or is added).

Writes ``OUT/loss_scale.json`` and ``OUT/loss_scale.md``. Seconds per width on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import torch

from tigbev.cache.store import CacheReader
from tigbev.config import TrainStudentConfig
from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.models.student.checkpoint import load_student_checkpoint
from tigbev.models.student.resnet import load_torchvision_weights
from tigbev.models.student.student import FEATURE_STRIDE, StudentConfig, student_preset
from tigbev.pipeline.ablate import ABLATION_ROWS
from tigbev.pipeline.demo import DEMO_KEYPOINT_GRID
from tigbev.stages.train_student import _POINT_RANGE, DistillationModel, weighted_losses
from tigbev.utils.provenance import write_json_atomic

DETECTION = ("heatmap", "bbox")


def measure(out: Path, scfg: StudentConfig, batches: list[Any], *, state: dict[str, torch.Tensor] | None,
            backbone: Path | None) -> dict[str, dict[str, float]]:
    """Per loss term: mean unweighted value, weighted value and student-gradient norm over ``batches``."""
    weights = {r.key: r.weights for r in ABLATION_ROWS}["inter_keypoint"]
    cache = CacheReader(out / "cache-train")
    tcfg = TrainStudentConfig(preset="demo", dataroot=out / "synth", split="synth_train", out_dir=Path("unused"),
                              cache=str(out / "cache-train"), teacher="cache", weights=weights,
                              keypoint_grid=DEMO_KEYPOINT_GRID)
    torch.manual_seed(0)
    model = DistillationModel(scfg, tcfg, cache.manifest.grid, cache.manifest.features.channels)
    if state is not None:
        model.load_state_dict(state)
    elif backbone is not None:
        load_torchvision_weights(model.student.backbone, backbone)
    model.train()
    params = [p for p in model.student.parameters() if p.requires_grad]
    rows: dict[str, list[tuple[float, float, float]]] = {}
    hw = model.teacher_grid.shape_hw if model.teacher_grid is not None else (0, 0)
    for batch in batches:
        raw = model(batch, batch.teacher.dense_map(*hw) if batch.teacher is not None else None)  # unweighted
        weighted = weighted_losses(raw, model.weight_dict)
        terms = {k: (raw[k], v) for k, v in weighted.items() if k not in DETECTION}
        terms["detection"] = (sum(raw[k] for k in DETECTION), sum(weighted[k] for k in DETECTION))
        for name, (value, value_w) in terms.items():
            grads = torch.autograd.grad(value_w, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
            rows.setdefault(name, []).append((value.item(), value_w.item(), norm))
    result = {name: {"unweighted": statistics.fmean(r[0] for r in v), "weighted": statistics.fmean(r[1] for r in v),
                     "grad_norm": statistics.fmean(r[2] for r in v)} for name, v in rows.items()}
    for entry in result.values():
        entry["grad_ratio"] = entry["grad_norm"] / result["detection"]["grad_norm"]
    return result


def _markdown(table: dict[str, Any]) -> str:
    lines = ["| student | term | weight | unweighted | weighted | grad norm | grad / detection |",
             "|---|---|---|---|---|---|---|"]
    weights = dataclasses.asdict({r.key: r.weights for r in ABLATION_ROWS}["inter_keypoint"])
    for label, terms in table["students"].items():
        for name, t in terms.items():
            w = weights.get(name, 1.0)
            lines.append(f"| {label} | {name} | {w:g} | {t['unweighted']:.4g} | {t['weighted']:.4g} | "
                         f"{t['grad_norm']:.4g} | {t['grad_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--channels", default="128,256")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    base = student_preset("demo")
    reader = NuScenesReader(args.out / "synth")
    cache = CacheReader(args.out / "cache-train")
    tokens = reader.sample_tokens("synth_train")  # the whole split: the cache's fingerprint covers all of it
    dataset = CameraDetectionDataset(
        reader, tokens, cache=cache, split="synth_train", input_hw=base.input_hw, feature_stride=FEATURE_STRIDE,
        image_policy=ImageAugPolicy(input_hw=base.input_hw), bda_policy=None, seed=0, train=False,
        point_range_m=_POINT_RANGE, min_depth_m=cache.manifest.depth.min_depth_m)
    batches = [collate_camera([dataset[i], dataset[i + 1]]) for i in range(0, 2 * args.batches, 2)]
    backbone = args.out / "pretrain" / "backbone.pth"
    table: dict[str, Any] = {"batches": len(batches), "students": {}}
    for channels in [int(c) for c in args.channels.split(",") if c]:
        scfg = dataclasses.replace(base, bev_channels=channels)
        table["students"][f"{channels} ch, pretrained backbone"] = measure(
            args.out, scfg, batches, state=None, backbone=backbone if backbone.exists() else None)
    if args.checkpoint is not None:
        ckpt = load_student_checkpoint(args.checkpoint)
        scfg = StudentConfig.from_dict(ckpt["student_config"])
        table["students"][f"{scfg.bev_channels} ch, trained ({args.checkpoint.parent.name})"] = measure(
            args.out, scfg, batches, state=ckpt["model"], backbone=None)
    write_json_atomic(args.out / "loss_scale.json", table)
    (args.out / "loss_scale.md").write_text(_markdown(table))
    print(_markdown(table))


if __name__ == "__main__":
    main()
