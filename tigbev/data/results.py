"""nuScenes detection results: project boxes -> the official result JSON, and the devkit's DetectionEval.

The result format is the benchmark's: per sample token a list of boxes in the global frame with (w, l, h), a
[w, x, y, z] quaternion, global (vx, vy), a detection class, a score and an attribute name valid for that class.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from tigbev.data.classes import CLASS_ATTRIBUTES, DEFAULT_ATTRIBUTE, DETECTION_CLASSES
from tigbev.errors import TigbevError
from tigbev.geometry import BOX_DIM_VEL, boxes_to_nuscenes

if TYPE_CHECKING:
    from nuscenes.nuscenes import NuScenes

__all__ = ["detection_records", "evaluate_detection", "gt_as_detection_records", "summarize_metrics", "write_results"]


def detection_records(
    sample_token: str,
    boxes: NDArray[np.float64],
    labels: NDArray[np.int64],
    scores: NDArray[np.float64],
    global_from_lidar: NDArray[np.float64],
    attributes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Result records of one sample from boxes (N, 9) in its key lidar frame.

    Attributes that are empty or not valid for the class become the class's default; NaN velocities become 0.
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != BOX_DIM_VEL:
        raise ValueError(f"boxes of sample {sample_token} must have shape (N, 9), got {b.shape}")
    if not (len(labels) == len(scores) == len(b)):
        raise ValueError(f"sample {sample_token}: {len(b)} boxes, {len(labels)} labels, {len(scores)} scores")
    records = []
    for i, box in enumerate(boxes_to_nuscenes(b, global_from_lidar)):
        name = DETECTION_CLASSES[int(labels[i])]
        attribute = attributes[i] if attributes is not None else ""
        if attribute not in CLASS_ATTRIBUTES[name]:
            attribute = DEFAULT_ATTRIBUTE[name]
        vx, vy = (0.0 if math.isnan(v) else float(v) for v in box.velocity[:2])
        records.append({
            "sample_token": sample_token,
            "translation": [float(v) for v in box.center],
            "size": [float(v) for v in box.wlh],
            "rotation": [float(v) for v in box.orientation.q],
            "velocity": [vx, vy],
            "detection_name": name,
            "detection_score": float(scores[i]),
            "attribute_name": attribute,
        })
    return records


def gt_as_detection_records(frame) -> list[dict[str, Any]]:  # frame: tigbev.data.types.SampleFrame
    """A sample's ground truth as predictions with score 1, through the project's own conversion.

    Boxes outside the detection classes, and boxes the benchmark ignores (no LiDAR or radar point), are left out,
    exactly as DetectionEval filters the ground truth, so a correct conversion scores mAP = NDS = 1 where every
    class has a box with points.
    """
    gt = frame.gt
    keep = (gt.labels >= 0) & (gt.num_lidar_pts + gt.num_radar_pts > 0)
    g = gt.select(keep)
    return detection_records(frame.token, g.boxes, g.labels, np.ones(len(g)), frame.global_from_lidar,
                             g.attribute_names)


def write_results(path: str | Path, results: Mapping[str, list[dict[str, Any]]], *, use_camera: bool,
                  use_lidar: bool) -> Path:
    """Write the result JSON (with its ``meta`` block) atomically: a temporary file renamed into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"use_camera": use_camera, "use_lidar": use_lidar, "use_radar": False, "use_map": False,
            "use_external": False}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": dict(results)}))
    tmp.replace(out)
    return out


def _with_placeholder_if_empty(results_path: Path, out_dir: Path) -> Path:
    """The devkit crashes on a result file without a single box (it reads the class field off the first one).

    For that case only, write a copy with one box 10 km from the first sample, which the devkit's range filter
    removes before matching: the metrics are those of an empty prediction set.
    """
    data = json.loads(results_path.read_text())
    if any(data["results"].values()):
        return results_path
    first = next(iter(data["results"]), None)
    if first is None:
        return results_path
    data["results"][first] = [{
        "sample_token": first, "translation": [1e4, 1e4, 0.0], "size": [1.0, 1.0, 1.0], "rotation": [1, 0, 0, 0],
        "velocity": [0.0, 0.0], "detection_name": "car", "detection_score": 0.0, "attribute_name": "vehicle.parked",
    }]
    patched = out_dir / "results_placeholder.json"
    patched.write_text(json.dumps(data))
    return patched


def evaluate_detection(nusc: "NuScenes", results_path: str | Path, split: str, out_dir: str | Path,
                       *, verbose: bool = False, plots: bool = False) -> dict[str, Any]:
    """Run the devkit's DetectionEval (config detection_cvpr_2019); returns its serialised metrics. With ``plots``
    the devkit's own plotting draws its summary and per-class precision-recall curves as PNGs in ``out_dir/plots``.

    The result file must hold every sample of the split (the devkit's rule); a mismatch is reported by name.
    """
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = _with_placeholder_if_empty(Path(results_path), out)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext():
            ev = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(results_path), split, str(out),
                               verbose=verbose)
            metrics, metric_data = ev.evaluate()
            if plots:
                _render_curves(ev.cfg, metrics, metric_data, out / "plots")
    except AssertionError as exc:
        raise TigbevError(f"nuscenes-devkit rejected {results_path} for split {split!r}: {exc}") from exc
    return metrics.serialize()


def _render_curves(cfg, metrics, metric_data, plot_dir: Path) -> None:
    """The devkit's summary and per-class PR plots, as PNG (its ``render`` writes PDFs)."""
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    from nuscenes.eval.detection.render import class_pr_curve, summary_plot

    plot_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Perfect or empty curves give the devkit's axes identical limits, which matplotlib warns about.
        warnings.simplefilter("ignore", UserWarning)
        summary_plot(metric_data, metrics, min_precision=cfg.min_precision, min_recall=cfg.min_recall,
                     dist_th_tp=cfg.dist_th_tp, savepath=str(plot_dir / "summary.png"))
        for name in cfg.class_names:
            class_pr_curve(metric_data, metrics, name, cfg.min_precision, cfg.min_recall,
                           savepath=str(plot_dir / f"{name}_pr.png"))
    plt.close("all")


def summarize_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers people compare, from the devkit's serialised metrics: mAP, NDS, the five TP errors, class APs."""
    tp = metrics["tp_errors"]
    return {
        "mAP": metrics["mean_ap"], "NDS": metrics["nd_score"],
        "mATE": tp["trans_err"], "mASE": tp["scale_err"], "mAOE": tp["orient_err"], "mAVE": tp["vel_err"],
        "mAAE": tp["attr_err"], "per_class_AP": metrics["mean_dist_aps"],
    }
