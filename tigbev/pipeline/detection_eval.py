"""Run a detector over a split, write the nuScenes result JSON, score it with the devkit, save the metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tigbev.data.classes import DETECTION_CLASSES, attribute_from_velocity
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.results import detection_records, evaluate_detection, write_results
from tigbev.data.types import SampleFrame
from tigbev.pipeline.provenance import write_json_atomic

__all__ = ["PredictFn", "evaluate_split", "summarize_metrics"]

# frames -> per frame (boxes (N, 9) lidar frame, scores (N,), labels (N,))
PredictFn = Callable[[Sequence[SampleFrame]], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def summarize_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers people compare: mAP, NDS, the five TP errors and per-class AP."""
    tp = metrics["tp_errors"]
    return {
        "mAP": metrics["mean_ap"], "NDS": metrics["nd_score"],
        "mATE": tp["trans_err"], "mASE": tp["scale_err"], "mAOE": tp["orient_err"], "mAVE": tp["vel_err"],
        "mAAE": tp["attr_err"], "per_class_AP": metrics["mean_dist_aps"],
    }


def evaluate_split(predict: PredictFn, reader: NuScenesReader, split: str, out_dir: str | Path, *,
                   batch_size: int = 4, use_camera: bool, use_lidar: bool, progress: bool = True) -> dict[str, Any]:
    """Predict every sample of ``split``, write ``results_nusc.json``, evaluate, write ``metrics.json``."""
    from tqdm import tqdm

    out = Path(out_dir)
    tokens = reader.sample_tokens(split)
    results: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(tokens), desc=f"predict {split}", unit="sample", disable=not progress)
    for start in range(0, len(tokens), batch_size):
        frames = [reader.load_sample(t) for t in tokens[start:start + batch_size]]
        for frame, (boxes, scores, labels) in zip(frames, predict(frames), strict=True):
            attrs = [attribute_from_velocity(DETECTION_CLASSES[int(lb)], float(np.hypot(*b[7:9])))
                     for b, lb in zip(boxes, labels)]
            results[frame.token] = detection_records(frame.token, boxes, labels, scores, frame.global_from_lidar,
                                                     attrs)
        bar.update(len(frames))
    bar.close()
    path = write_results(out / "results_nusc.json", results, use_camera=use_camera, use_lidar=use_lidar)
    metrics = evaluate_detection(reader.nusc, path, split, out / "devkit")
    summary = summarize_metrics(metrics)
    write_json_atomic(out / "metrics.json", {"split": split, **summary, "devkit": metrics})
    return summary
