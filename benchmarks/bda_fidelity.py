"""The bench's section "Under BEV augmentation" alone: each cache mode against the online teacher on the same
augmented samples, for a dataset and teacher where the whole bench takes too long (the nuscenes preset on CPU).

    python benchmarks/bda_fidelity.py --preset nuscenes --dataroot ../shared/data/nuscenes-real-slice \
        --split real_slice --out runs/bda-nusc [--teacher-checkpoint T.pt] [--samples 1] [--views 4] [--draws 4]

Without ``--teacher-checkpoint`` the teacher has seeded random weights (as in ``tigbev bench``). Writes
``OUT/bda.json`` and ``OUT/bda.md`` (the same table as bench.md's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from tigbev.bench.bda import AUG_KINDS, bench_bda
from tigbev.bench.config import BenchConfig, cycle, preset_keypoint_grid
from tigbev.bench.report import bda_table, finite_json
from tigbev.bench.world import prepare_teacher
from tigbev.data.nuscenes_reader import NuScenesReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("demo", "nuscenes"), required=True)
    ap.add_argument("--dataroot", type=Path, required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--teacher-checkpoint", type=Path)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(preset=args.preset, out_dir=args.out, dataroot=args.dataroot, split=args.split,
                      teacher_checkpoint=args.teacher_checkpoint, device=args.device, seed=args.seed)
    ckpt, teacher = prepare_teacher(cfg, work)
    tokens = cycle(NuScenesReader(args.dataroot).sample_tokens(args.split), args.samples)
    with tqdm(total=len(AUG_KINDS), desc="bda fidelity", unit="kind") as bar:
        bda = bench_bda(ckpt, args.dataroot, args.split, tokens, work, preset=args.preset,
                        keypoint_grid=preset_keypoint_grid(args.preset), device=args.device, seed=args.seed,
                        views=args.views, draws=args.draws, bar=bar)
    report = {"preset": args.preset, "dataroot": str(args.dataroot), "split": args.split, "teacher": teacher,
              "bda": bda}
    (args.out / "bda.json").write_text(json.dumps(finite_json(report), indent=1))
    md = "\n".join([f"Teacher: {'seeded random weights' if teacher['random_weights'] else teacher['checkpoint']}",
                    *bda_table(bda)]) + "\n"
    (args.out / "bda.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
