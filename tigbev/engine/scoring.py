"""Scoring with the official nuScenes metrics, shared by every stage that evaluates (train-teacher,
train-student, evaluate): predictions of a teacher or a student, the devkit result file, DetectionEval, the metrics
files and top-view pictures. A library module: stages import it, it imports no stage.

``metrics.json`` records where its numbers come from under ``provenance`` (:func:`evaluation_provenance`): the
checkpoint (absolute path, sha256 of the file, training step, format) or the ground truth, the dataroot and split,
the dataset's content fingerprint (:meth:`NuScenesReader.fingerprint`, the one the teacher cache records), and the
tigbev version, git commit, command line, host and time (:func:`tigbev.utils.provenance.provenance`).

Top-view pictures are named ``bev_<safe name of the sample token>.png`` (:func:`tigbev.utils.names.safe_name`):
a token is data and never becomes a path by itself. A picture is an extra: one that cannot be drawn or written is
reported on stderr as a one-line warning naming the sample, and the scoring goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tigbev.data.classes import DETECTION_CLASSES, attribute_from_velocity
from tigbev.data.nuscenes_reader import LIDAR_CHANNEL, NuScenesReader
from tigbev.data.results import (
    detection_records,
    evaluate_detection,
    summarize_metrics,
    write_results,
)
from tigbev.errors import TigbevError
from tigbev.geometry import NUSCENES_POINT_RANGE_M
from tigbev.models.student.checkpoint import load_student_checkpoint
from tigbev.utils.names import safe_name, shown
from tigbev.utils.provenance import file_sha256, provenance, write_json_atomic

__all__ = ["Predictions", "bev_picture_name", "checkpoint_identity", "evaluation_output", "evaluation_provenance",
           "finish_scoring", "load_student", "metrics_markdown", "plot_bev", "predict_student", "predict_teacher",
           "score"]

# token -> (boxes (N, 9) in the key lidar frame, scores (N,), labels (N,))
Predictions = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def predict_teacher(model, reader: NuScenesReader, tokens: Sequence[str], device: torch.device, batch_size: int,
                    progress: bool = True) -> Predictions:
    from tqdm import tqdm

    from tigbev.models.heads import numpy_detections

    preds: Predictions = {}
    for start in tqdm(range(0, len(tokens), batch_size), desc="predict", unit="batch", disable=not progress):
        frames = [reader.load_sample(t) for t in tokens[start:start + batch_size]]
        with torch.inference_mode():
            out = model([torch.from_numpy(f.lidar.points).to(device) for f in frames])
            for f, det in zip(frames, model.head.decode(out.preds)):
                preds[f.token] = numpy_detections(det)
    return preds


def predict_student(student, reader: NuScenesReader, tokens: Sequence[str], device: torch.device, batch_size: int,
                    progress: bool = True) -> Predictions:
    """Camera student predictions with the deterministic eval transform (no augmentation)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
    from tigbev.data.image_aug import ImageAugPolicy
    from tigbev.models.heads import numpy_detections
    from tigbev.models.student.student import FEATURE_STRIDE

    scfg = student.cfg
    dataset = CameraDetectionDataset(reader, tokens, cache=None, input_hw=scfg.input_hw, feature_stride=FEATURE_STRIDE,
                                     image_policy=ImageAugPolicy(input_hw=scfg.input_hw), bda_policy=None,
                                     train=False, point_range_m=NUSCENES_POINT_RANGE_M, frames=scfg.frames)
    student.eval()
    preds: Predictions = {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_camera)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
            batch = batch.to(device)
            for token, det in zip(batch.tokens, student.head.decode(student(batch).preds)):
                preds[token] = numpy_detections(det)
    return preds


def checkpoint_identity(path: Path, *, step: int | None, fmt: str | None, sha256: str | None = None
                        ) -> dict[str, Any]:
    """What identifies a checkpoint in ``metrics.json``: its absolute path, the sha256 of the file (``sha256`` when
    the caller has already hashed it), the training step it was saved at (None when it records none) and its
    format."""
    return {"path": str(Path(path).resolve()), "sha256": sha256 or file_sha256(path), "step": step, "format": fmt}


def evaluation_provenance(reader: NuScenesReader, split: str, *, checkpoint: Mapping[str, Any] | None
                          ) -> dict[str, Any]:
    """The ``provenance`` block of ``metrics.json``: :func:`~tigbev.utils.provenance.provenance` (versions, git
    commit, command, time, host) with the inputs ``predictions`` ('checkpoint', or 'ground truth' for a scoring of
    the ground truth itself), ``checkpoint`` (:func:`checkpoint_identity`, or None), ``dataroot``, ``split``,
    ``dataset`` (the content fingerprint of the split's samples, :meth:`NuScenesReader.fingerprint`, as the teacher
    cache records it) and ``num_sweeps`` (the LiDAR sweeps per sample that fingerprint covers: the reader's)."""
    fingerprint = reader.fingerprint(split, reader.sample_tokens(split), num_sweeps=reader.num_sweeps)
    return provenance(predictions="checkpoint" if checkpoint is not None else "ground truth",
                      checkpoint=None if checkpoint is None else dict(checkpoint), dataroot=str(reader.dataroot),
                      split=split, dataset=dataclasses.asdict(fingerprint), num_sweeps=reader.num_sweeps)


def score(reader: NuScenesReader, split: str, preds: Predictions, out_dir: Path, *, use_camera: bool,
          use_lidar: bool, origin: Mapping[str, Any], plots: bool = True, bev_samples: int = 0) -> dict[str, Any]:
    """Predictions -> result JSON -> DetectionEval -> metrics.json (with ``origin``, see
    :func:`evaluation_provenance`), metrics.md, plots and BEV pictures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for token in reader.sample_tokens(split):
        if token not in preds:
            raise TigbevError(f"no predictions for sample {shown(token)} of split {split!r}: the devkit needs "
                              "every sample")
        boxes, scores, labels = preds[token]
        lidar_token = reader.nusc.get("sample", token)["data"][LIDAR_CHANNEL]
        attrs = [attribute_from_velocity(DETECTION_CLASSES[int(lb)], float(np.hypot(*b[7:9])))
                 for b, lb in zip(boxes, labels)]
        results[token] = detection_records(token, boxes, labels, scores, reader.global_from_sensor(lidar_token),
                                           attrs)
    path = write_results(out_dir / "results_nusc.json", results, use_camera=use_camera, use_lidar=use_lidar)
    return finish_scoring(reader, split, path, out_dir, plots=plots, bev_samples=bev_samples, preds=preds,
                          origin=origin)


def finish_scoring(reader: NuScenesReader, split: str, results_path: Path, out_dir: Path, *, plots: bool,
                   bev_samples: int, preds: Predictions, origin: Mapping[str, Any]) -> dict[str, Any]:
    """DetectionEval of a written result file -> ``metrics.json`` (the summary, ``provenance``: ``origin``, and the
    devkit's full output), ``metrics.md``, then the top-view pictures of the first ``bev_samples`` samples, which
    replace those of an earlier evaluation in ``out_dir``. A picture that fails is a warning, never an error: the
    metrics are written by then."""
    devkit = evaluate_detection(reader.nusc, results_path, split, out_dir / "devkit", plots=plots)
    summary = summarize_metrics(devkit)
    write_json_atomic(out_dir / "metrics.json", {"split": split, **summary, "provenance": dict(origin),
                                                 "devkit": devkit})
    (out_dir / "metrics.md").write_text(metrics_markdown(summary, split))
    for old in out_dir.glob("bev_*.png"):
        with contextlib.suppress(OSError):
            old.unlink()
    for token in reader.sample_tokens(split)[:bev_samples]:
        _picture_or_warning(reader, token, preds.get(token), out_dir / bev_picture_name(token))
    return summary


def bev_picture_name(token: str) -> str:
    """The file name of a sample's top-view picture: ``bev_<safe_name(token)>.png``, one path component whatever
    the token holds."""
    return f"bev_{safe_name(token)}.png"


def _picture_or_warning(reader: NuScenesReader, token: str, pred: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                        path: Path) -> Path | None:
    """:func:`plot_bev`, or a one-line warning on stderr naming the sample (and no half-written file) when the
    picture cannot be drawn or written."""
    try:
        return plot_bev(reader, token, pred, path)
    except Exception as exc:  # noqa: BLE001 - a picture never fails an evaluation whose metrics are written
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        sys.stderr.write(f"warning: no top-view picture of sample {shown(token)} ({reason}); skipped\n")
        return None


def metrics_markdown(summary: dict[str, Any], split: str) -> str:
    lines = [f"# nuScenes detection metrics ({split})", "",
             "| mAP | NDS | mATE | mASE | mAOE | mAVE | mAAE |", "|---|---|---|---|---|---|---|",
             "| " + " | ".join(f"{summary[k]:.4f}" for k in ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"))
             + " |", "", "| class | AP |", "|---|---|"]
    lines += [f"| {c} | {ap:.4f} |" for c, ap in summary["per_class_AP"].items()]
    return "\n".join(lines) + "\n"


def plot_bev(reader: NuScenesReader, token: str, pred: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
             path: Path, score_threshold: float = 0.3) -> Path:
    """Top view of one sample: LiDAR (grey), GT boxes (green), predictions above the threshold (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = reader.load_sample(token)
    fig, ax = plt.subplots(figsize=(7, 7), dpi=100)
    try:
        _draw_bev(ax, frame, pred, score_threshold, title=safe_name(token))
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _draw_bev(ax: Any, frame: Any, pred: tuple[np.ndarray, np.ndarray, np.ndarray] | None, score_threshold: float,
              *, title: str) -> None:
    from tigbev.geometry import box_corners

    pts = frame.lidar.key_points
    ax.scatter(pts[:, 0], pts[:, 1], s=0.2, c="0.6", linewidths=0)
    gt = frame.gt.boxes[frame.gt.labels >= 0]
    for corners in box_corners(gt)[:, [0, 1, 2, 3, 0], :2]:
        ax.plot(corners[:, 0], corners[:, 1], color="tab:green", linewidth=1.2)
    if pred is not None:
        boxes, scores, _ = pred
        for corners in box_corners(boxes[scores >= score_threshold])[:, [0, 1, 2, 3, 0], :2]:
            ax.plot(corners[:, 0], corners[:, 1], color="tab:red", linewidth=1.0)
    ax.set_xlim(-51.2, 51.2)
    ax.set_ylim(-51.2, 51.2)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, lidar frame)")
    ax.set_ylabel("y (m)")
    ax.set_title(f"{title}: ground truth (green), predictions >= {score_threshold} (red)")


def evaluation_output(name: str) -> bool:
    """Whether a file or folder name is one that an evaluation writes (what a rerun may replace)."""
    return name in ("results_nusc.json", "results_nusc.json.tmp", "devkit", "metrics.json", "metrics.md") or (
        name.startswith("bev_") and name.endswith(".png")) or name.startswith(".metrics.json.tmp")


def load_student(path: Path, device: torch.device):
    """A student from a train-student checkpoint (weights_only)."""
    from tigbev.models.student.student import CameraStudent, StudentConfig

    ckpt = load_student_checkpoint(path)
    student = CameraStudent(StudentConfig.from_dict(ckpt["student_config"]))
    prefix = "student."
    student.load_state_dict({k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)})
    return student.to(device).eval()
