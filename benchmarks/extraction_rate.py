"""Extraction against the teacher's forward-only rate at several sizes (the bench's extraction section, repeated).

    python benchmarks/extraction_rate.py --out runs/extraction-rate [--sizes 8,64,256] [--repeats 2] [--threads 1]

Per size: ``extract-teacher``'s steady loop (first batch to finalised index) against the teacher's forward-only rate
(read each sample's sweeps, frozen forward, nothing written), interleaved per repeat, on a synthetic world with at
least as many samples as the largest size (demo preset, seeded random teacher: the timings are real). The ratio is
the goal of 0.85x. Writes ``OUT/extraction-rate.json`` and ``OUT/extraction-rate.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm


def main() -> None:
    import torch

    from tigbev.bench.config import BenchConfig, cycle, preset_keypoint_grid
    from tigbev.bench.extraction import bench_extraction
    from tigbev.bench.world import prepare_data, prepare_teacher
    from tigbev.data.nuscenes_reader import NuScenesReader
    from tigbev.utils.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="8,64,256")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(preset="demo", out_dir=args.out, device=args.device, progress=True)
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    dataroot, split, _ = prepare_data(cfg, work, max(sizes))
    ckpt, teacher = prepare_teacher(cfg, work)
    tokens = NuScenesReader(dataroot).sample_tokens(split)
    rows = {}
    bar = tqdm(total=len(sizes) * args.repeats, desc="extraction vs forward-only", unit="run")
    for n in sizes:
        rows[n] = bench_extraction(ckpt, dataroot, split, cycle(tokens, n), work, repeats=args.repeats,
                                   keypoint_grid=preset_keypoint_grid("demo"), device=args.device, bar=bar)
    bar.close()
    report = {"sizes": sizes, "repeats": args.repeats, "threads": torch.get_num_threads(), "teacher": teacher,
              "split_samples": len(tokens), "rows": {str(n): r for n, r in rows.items()}, "provenance": provenance()}
    (args.out / "extraction-rate.json").write_text(json.dumps(report, indent=1))
    lines = [f"Demo preset, seeded random teacher, {torch.get_num_threads()} torch thread(s), {args.repeats} interleaved "
             "repeats, medians.", "",
             "| samples | forward-only (samples/s) | extraction loop (samples/s) | extraction / forward-only | "
             "extraction / map forward-only |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['forward_only_samples_per_s']:.2f} | {r['extraction_samples_per_s']:.2f} | "
                     f"{r['extraction_over_forward']:.2f}x | {r['extraction_over_map_forward']:.2f}x |")
    (args.out / "extraction-rate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
