"""The bench's data and teacher: a synthetic world (demo) or the given dataroot, a trained or seeded random
teacher, and caches extracted from them."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tigbev.bench.config import BenchConfig

__all__ = ["extract", "prepare_data", "prepare_teacher"]


def prepare_data(cfg: BenchConfig, work: Path, need: int) -> tuple[Path, str, dict[str, Any]]:
    """(dataroot, split, description); writes a synthetic world for the demo preset unless a dataroot is given."""
    res = cfg.resolved()
    if cfg.dataroot is not None:
        return cfg.dataroot, res["split"], {"source": str(cfg.dataroot), "synthetic": False}
    from tigbev.config import SynthConfig
    from tigbev.data.synth.writer import write_synthetic_dataset

    root = work / "synth"
    per_scene = 2 if cfg.tiny else 8
    scenes = max(1, math.ceil(need / per_scene))
    synth = SynthConfig(out_dir=root, scenes=scenes, samples_per_scene=per_scene, val_scenes=0, seed=cfg.seed,
                        image_width=192 if cfg.tiny else 480, image_height=108 if cfg.tiny else 270,
                        lidar_azimuth_steps=720 if cfg.tiny else 1084, sweeps_per_sample=1 if cfg.tiny else 2,
                        workers=1 if cfg.tiny else 2)
    marker = root / ".bench-complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_synthetic_dataset(synth, progress=cfg.progress)
        marker.write_text(json.dumps({"scenes": scenes, "samples_per_scene": per_scene, "tiny": cfg.tiny}))
    return root, res["split"], {"source": "synthetic (tigbev synth)", "synthetic": True, "scenes": scenes,
                                "samples_per_scene": per_scene, "image_wh": [synth.image_width, synth.image_height]}


def prepare_teacher(cfg: BenchConfig, work: Path) -> tuple[Path, dict[str, Any]]:
    if cfg.teacher_checkpoint is not None:
        return cfg.teacher_checkpoint, {"checkpoint": str(cfg.teacher_checkpoint), "random_weights": False}
    import torch

    from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
    from tigbev.models.teacher.checkpoint import save_checkpoint

    path = work / f"teacher-random-{cfg.preset}-seed{cfg.seed}.pt"
    if not path.exists():
        torch.manual_seed(cfg.seed)
        tcfg = teacher_preset(cfg.preset)
        save_checkpoint(path, {"model": CenterPoint(tcfg).state_dict(), "teacher_config": tcfg.to_dict()})
    return path, {"checkpoint": str(path), "random_weights": True,
                  "note": f"seeded random weights (seed {cfg.seed}): timings are real, fidelity and sizes are those "
                          f"of an untrained map"}


def extract(ckpt: Path, dataroot: Path, split: str, tokens: Sequence[str], out: Path, *, features: str = "foreground",
            dtype: str = "float16", compression: str = "auto", keypoint_grid: int, device: str,
            shard_samples: int = 8, batch_size: int = 2, workers: int = 1, variants: str = "canonical",
            draws: int = 4):
    from tigbev.config import ExtractTeacherConfig
    from tigbev.stages import extract_teacher

    shutil.rmtree(out, ignore_errors=True)
    shard_samples = min(shard_samples, len(tokens))
    batch_size = math.gcd(batch_size, shard_samples)
    ecfg = ExtractTeacherConfig(teacher_checkpoint=ckpt, dataroot=dataroot, split=split, out_dir=str(out),
                                features=features, feature_dtype=dtype, compression=compression, workers=workers,
                                variants=variants, draws=draws,
                                device=device,
                                shard_samples=shard_samples, batch_size=batch_size, keypoint_grid=keypoint_grid)
    return extract_teacher.run(ecfg, progress=False, tokens=tokens)
