"""Stage: official nuScenes metrics for a checkpoint (``tigbev evaluate``).

Teacher and student checkpoints are told apart by their format; ``gt_as_predictions`` scores the ground truth itself
through the project's own conversion and result writer (the check for a dataset conversion). Output directory:
``results_nusc.json`` (global frame, w/l/h, quaternion, velocity, attribute), ``metrics.json`` (mAP, NDS, the five
TP errors, per-class AP, and the devkit's full output), ``metrics.md``, ``plots/`` (the devkit's summary and
per-class precision-recall curves) and ``bev_<safe name of the token>.png`` (predictions against the ground truth,
top view; a picture that fails is a warning, never an error).

``metrics.json`` records its provenance (:func:`tigbev.engine.scoring.evaluation_provenance`): the checkpoint (path,
sha256, step, format) or the ground truth, the dataroot, split and dataset fingerprint, the tigbev version and git
commit. ``--out`` may hold an earlier evaluation of the same checkpoint (same sha256) or of the ground truth when
that is scored again, which is replaced; one of another checkpoint is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import json
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
    checkpoint_identity,
    evaluation_output,
    evaluation_provenance,
    finish_scoring,
    load_student,
    predict_student,
    predict_teacher,
    score,
)
from tigbev.errors import TigbevError
from tigbev.utils.device import pick_device
from tigbev.utils.provenance import file_sha256
from tigbev.utils.run_dir import check_output_dir

__all__ = ["EvaluateConfig", "EvaluateResult", "check_results_of", "run"]

_TEACHER_FORMAT = "tigbev-teacher/1"
_STUDENT_FORMAT = "tigbev-student/1"


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, Any]
    out_dir: Path
    seconds: float


def _describe(inputs: dict[str, Any] | None) -> str:
    """What an evaluation scored, from its provenance inputs, for a message."""
    if inputs is None:
        return "an unrecorded checkpoint (its metrics.json has no provenance)"
    if inputs.get("predictions") == "ground truth":
        return "the ground truth (--gt-as-predictions)"
    ckpt = inputs.get("checkpoint") or {}
    return f"checkpoint {ckpt.get('path', '?')} (sha256 {str(ckpt.get('sha256', '?'))[:12]})"


def _same_source(held: dict[str, Any] | None, checkpoint: dict[str, Any] | None) -> bool:
    """Whether the evaluation recorded in ``held`` scored what this one scores: the same checkpoint file content
    (sha256), or the ground truth both times."""
    if held is None:
        return False
    if checkpoint is None:
        return held.get("predictions") == "ground truth"
    return held.get("predictions") == "checkpoint" and (held.get("checkpoint") or {}).get("sha256") == \
        checkpoint["sha256"]


def check_results_of(out: Path, checkpoint: dict[str, Any] | None, *, overwrite: bool) -> None:
    """Refuse an ``out`` whose ``metrics.json`` holds the results of something else than ``checkpoint``
    (:func:`checkpoint_identity`; None: the ground truth) unless ``overwrite``. Reads only."""
    path = Path(out) / "metrics.json"
    if overwrite or not path.is_file():
        return
    try:
        held = json.loads(path.read_text())["provenance"]["inputs"]
        held = held if isinstance(held, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        held = None
    if not _same_source(held, checkpoint):
        raise TigbevError(f"--out {out} holds the results of {_describe(held)}; pass --overwrite to replace them, or "
                          "choose another --out")


def run(cfg: EvaluateConfig, *, progress: bool = True) -> EvaluateResult:
    """Score ``cfg.checkpoint`` (or the ground truth) on ``cfg.split``: --out is checked before anything is
    written (:func:`check_output_dir`, then :func:`check_results_of`)."""
    start = time.perf_counter()
    out = cfg.out_dir
    check_output_dir(out, owns=evaluation_output, what="tigbev evaluate")  # an earlier evaluation is replaced
    if cfg.gt_as_predictions:
        check_results_of(out, None, overwrite=cfg.overwrite)
        reader = NuScenesReader(cfg.dataroot)
        results, preds = {}, {}
        for token in reader.sample_tokens(cfg.split):
            frame = reader.load_sample(token)
            results[token] = gt_as_detection_records(frame)
            keep = (frame.gt.labels >= 0) & (frame.gt.num_lidar_pts + frame.gt.num_radar_pts > 0)
            preds[token] = (frame.gt.boxes[keep], np.ones(int(keep.sum())), frame.gt.labels[keep])
        origin = evaluation_provenance(reader, cfg.split, checkpoint=None)
        path = write_results(out / "results_nusc.json", results, use_camera=False, use_lidar=False)
        metrics = finish_scoring(reader, cfg.split, path, out, plots=True, bev_samples=cfg.bev_samples, preds=preds,
                                 origin=origin)
        return EvaluateResult(metrics=metrics, out_dir=out, seconds=time.perf_counter() - start)
    assert cfg.checkpoint is not None  # EvaluateConfig requires it without gt_as_predictions
    raw = load_weights_only(cfg.checkpoint, what="checkpoint")
    fmt = raw.get("format") if isinstance(raw, dict) else None
    step = raw.get("step") if isinstance(raw, dict) else None
    del raw
    if fmt not in (_TEACHER_FORMAT, _STUDENT_FORMAT):
        raise TigbevError(f"{cfg.checkpoint} is neither a tigbev teacher nor a student checkpoint (format {fmt!r})")
    identity = checkpoint_identity(cfg.checkpoint, step=step if isinstance(step, int) else None, fmt=fmt,
                                   sha256=file_sha256(cfg.checkpoint))
    check_results_of(out, identity, overwrite=cfg.overwrite)
    device = pick_device(cfg.device)
    if fmt == _TEACHER_FORMAT:
        from tigbev.models.teacher.checkpoint import load_teacher

        model, tcfg, _ = load_teacher(cfg.checkpoint, device)
        reader = NuScenesReader(cfg.dataroot, **tcfg.reader_options())
        preds = predict_teacher(model, reader, reader.sample_tokens(cfg.split), device, cfg.batch_size, progress)
        use_camera, use_lidar = False, True
    else:
        reader = NuScenesReader(cfg.dataroot)
        student = load_student(cfg.checkpoint, device)
        preds = predict_student(student, reader, reader.sample_tokens(cfg.split), device, cfg.batch_size, progress)
        use_camera, use_lidar = True, False
    metrics = score(reader, cfg.split, preds, out, use_camera=use_camera, use_lidar=use_lidar,
                    bev_samples=cfg.bev_samples, origin=evaluation_provenance(reader, cfg.split, checkpoint=identity))
    return EvaluateResult(metrics=metrics, out_dir=out, seconds=time.perf_counter() - start)
