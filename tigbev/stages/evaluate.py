"""Stage: official nuScenes metrics for a checkpoint (``tigbev evaluate``).

Teacher and student checkpoints are told apart by their format; ``gt_as_predictions`` scores the ground truth itself
through the project's own conversion and result writer (the check for a dataset conversion). Output directory:
``results_nusc.json`` (global frame, w/l/h, quaternion, velocity, attribute), ``metrics.json`` (mAP, NDS, the five
TP errors, per-class AP, and the devkit's full output), ``metrics.md``, ``plots/`` (the devkit's summary and
per-class precision-recall curves) and ``bev_<token>.png`` (predictions against the ground truth, top view).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tigbev.checkpoint_file import load_weights_only
from tigbev.config import EvaluateConfig
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.results import gt_as_detection_records, write_results
from tigbev.engine.scoring import (
    evaluation_output,
    finish_scoring,
    load_student,
    predict_student,
    predict_teacher,
    score,
)
from tigbev.errors import TigbevError
from tigbev.utils.device import pick_device
from tigbev.utils.run_dir import check_output_dir

__all__ = ["EvaluateConfig", "EvaluateResult", "run"]


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, Any]
    out_dir: Path
    seconds: float


def run(cfg: EvaluateConfig, *, progress: bool = True) -> EvaluateResult:
    start = time.perf_counter()
    out = cfg.out_dir
    check_output_dir(out, owns=evaluation_output, what="tigbev evaluate")  # an earlier evaluation is replaced
    if cfg.gt_as_predictions:
        reader = NuScenesReader(cfg.dataroot)
        results, preds = {}, {}
        for token in reader.sample_tokens(cfg.split):
            frame = reader.load_sample(token)
            results[token] = gt_as_detection_records(frame)
            keep = (frame.gt.labels >= 0) & (frame.gt.num_lidar_pts + frame.gt.num_radar_pts > 0)
            preds[token] = (frame.gt.boxes[keep], np.ones(int(keep.sum())), frame.gt.labels[keep])
        path = write_results(out / "results_nusc.json", results, use_camera=False, use_lidar=False)
        metrics = finish_scoring(reader, cfg.split, path, out, plots=True, bev_samples=cfg.bev_samples, preds=preds)
        return EvaluateResult(metrics=metrics, out_dir=out, seconds=time.perf_counter() - start)
    device = pick_device(cfg.device)
    raw = load_weights_only(cfg.checkpoint, what="checkpoint")
    fmt = raw.get("format") if isinstance(raw, dict) else None
    del raw
    if fmt == "tigbev-teacher/1":
        from tigbev.models.teacher.checkpoint import load_teacher

        model, tcfg, _ = load_teacher(cfg.checkpoint, device)
        reader = NuScenesReader(cfg.dataroot, **tcfg.reader_options())
        preds = predict_teacher(model, reader, reader.sample_tokens(cfg.split), device, cfg.batch_size, progress)
        metrics = score(reader, cfg.split, preds, out, use_camera=False, use_lidar=True,
                        bev_samples=cfg.bev_samples)
    elif fmt == "tigbev-student/1":
        reader = NuScenesReader(cfg.dataroot)
        student = load_student(cfg.checkpoint, device)
        preds = predict_student(student, reader, reader.sample_tokens(cfg.split), device, cfg.batch_size, progress)
        metrics = score(reader, cfg.split, preds, out, use_camera=True, use_lidar=False,
                        bev_samples=cfg.bev_samples)
    else:
        raise TigbevError(f"{cfg.checkpoint} is neither a tigbev teacher nor a student checkpoint (format {fmt!r})")
    return EvaluateResult(metrics=metrics, out_dir=out, seconds=time.perf_counter() - start)
