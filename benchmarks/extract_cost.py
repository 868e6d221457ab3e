"""Extraction cost, measured side by side in one run: teacher forward-only rate vs. extraction rate, and bytes per
sample for each storage option. Prints a table and writes JSON.

    python benchmarks/extract_cost.py --teacher-checkpoint CKPT --dataroot D --split S --out DIR [--repeats 3]

Forward-only = load the sample's sweeps and run the frozen teacher (what any extraction must pay); extraction = the
whole ``extract-teacher`` stage into a fresh cache (loading, projection, keypoints, compression, writing). Each is
repeated and the median kept; the ratio is extraction / forward-only throughput.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch


def forward_only_rate(ckpt: Path, dataroot: Path, split: str, device: str) -> float:
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.models.teacher.checkpoint import load_teacher
    from tigbev.models.teacher.frozen import FrozenTeacher
    from tigbev.pipeline.provenance import pick_device

    dev = pick_device(device)
    model, cfg, _ = load_teacher(ckpt, dev)
    teacher = FrozenTeacher(model)
    reader = NuScenesReader(dataroot, num_sweeps=cfg.num_sweeps)
    tokens = reader.sample_tokens(split)
    teacher([torch.from_numpy(reader.load_sample(tokens[0]).lidar.points).to(dev)])  # warm-up
    start = time.perf_counter()
    for t in tokens:
        out = teacher([torch.from_numpy(reader.load_sample(t).lidar.points).to(dev)])
        out.bev_features.cpu()
    return len(tokens) / (time.perf_counter() - start)


def extraction(ckpt: Path, dataroot: Path, split: str, out: Path, device: str, features: str, dtype: str,
               workers: int) -> tuple[float, dict]:
    from tigbev.config import ExtractTeacherConfig
    from tigbev.stages import extract_teacher
    from tigbev.stages.cache_tools import cache_info

    shutil.rmtree(out, ignore_errors=True)
    cfg = ExtractTeacherConfig(teacher_checkpoint=ckpt, dataroot=dataroot, split=split, out=str(out),
                               features=features, feature_dtype=dtype, workers=workers, device=device,
                               shard_samples=8, batch_size=2)
    result = extract_teacher.run(cfg, progress=False)
    info = cache_info(str(out))
    return result.samples_written / result.seconds, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-checkpoint", type=Path, required=True)
    ap.add_argument("--dataroot", type=Path, required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rates", action=argparse.BooleanOptionalAction, default=True,
                    help="measure throughput (off: sizes only)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"split": args.split, "dataroot": str(args.dataroot), "storage": {}}
    if args.rates:
        fwd, ext = [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            fwd.append(forward_only_rate(args.teacher_checkpoint, args.dataroot, args.split, args.device))
            ext.append(extraction(args.teacher_checkpoint, args.dataroot, args.split, args.out / "rate",
                                  args.device, "foreground", "float16", args.workers)[0])
        report["forward_only_samples_per_s"] = statistics.median(fwd)
        report["extraction_samples_per_s"] = statistics.median(ext)
        report["extraction_over_forward"] = report["extraction_samples_per_s"] / report["forward_only_samples_per_s"]
    for features, dtype in (("dense", "float16"), ("foreground", "float16"), ("foreground", "int8")):
        _, info = extraction(args.teacher_checkpoint, args.dataroot, args.split, args.out / f"{features}-{dtype}",
                             args.device, features, dtype, args.workers)
        report["storage"][f"{features}-{dtype}"] = {
            "bytes_per_sample_total": info["bytes_per_sample_total"],
            "bytes_per_sample": info["bytes_per_sample"], "compression_ratio": info["compression_ratio"]}
    (args.out / "extract_cost.json").write_text(json.dumps(report, indent=1))
    if args.rates:
        print(f"forward-only {report['forward_only_samples_per_s']:.2f} samples/s, extraction "
              f"{report['extraction_samples_per_s']:.2f} samples/s, ratio {report['extraction_over_forward']:.2f}")
    print(f"{'storage':<20} {'KiB/sample':>12} {'ratio':>7}  per array (KiB)")
    for name, s in report["storage"].items():
        parts = ", ".join(f"{k} {v / 1024:.0f}" for k, v in s["bytes_per_sample"].items())
        print(f"{name:<20} {s['bytes_per_sample_total'] / 1024:12.1f} {s['compression_ratio']:7.2f}  {parts}")


if __name__ == "__main__":
    main()
