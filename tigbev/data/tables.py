"""The nuScenes tables without nuscenes-devkit, for machines that cannot install it.

nuscenes-devkit 1.2.0 needs ``numpy<2`` and imports OpenCV, scikit-learn and matplotlib when it loads its
``NuScenes`` class, so a CUDA box with a numpy-2 torch and nothing else cannot train a student through it.
:class:`NuScenesTables` is the read-only part of ``NuScenes`` that :class:`~tigbev.data.nuscenes_reader.NuScenesReader`
uses, built the way the devkit builds it (token index, the ``category_name`` / ``channel`` / ``sensor_modality``
short-cuts, ``sample['data']`` and ``sample['anns']``), with ``get``, ``get_box`` and ``box_velocity`` computed as
the devkit computes them. The devkit stays the reader's first choice; a test loads the real key frame and a
synthetic world both ways and finds every array equal.

Evaluation (``DetectionEval``) and nuScenes' predefined split lists are devkit-only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tigbev.errors import DatasetError
from tigbev.geometry.frames import matrix_from_quat_wxyz

__all__ = ["AnnotationBox", "NuScenesTables", "devkit_available"]

# The tables the reader touches, in the order the devkit loads them (map and log are not needed for training data).
_TABLES = ("category", "attribute", "sensor", "calibrated_sensor", "ego_pose", "instance", "sample", "sample_data",
           "sample_annotation", "scene")


def devkit_available() -> bool:
    """Whether ``nuscenes.nuscenes`` imports here (it needs numpy < 2, OpenCV, scikit-learn, matplotlib)."""
    try:
        import nuscenes.nuscenes  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class AnnotationBox:
    """What :func:`~tigbev.geometry.boxes.boxes_from_nuscenes` reads of a devkit ``Box``: global centre, size
    (w, l, h) and the rotation matrix of the annotation's unit quaternion."""

    center: NDArray[np.float64]
    wlh: NDArray[np.float64]
    rotation_matrix: NDArray[np.float64]
    name: str
    token: str


class NuScenesTables:
    """One ``v1.0-*`` table folder, indexed as ``nuscenes.nuscenes.NuScenes`` indexes it (read-only subset)."""

    def __init__(self, version: str, dataroot: str | os.PathLike[str]):
        self.version = version
        self.dataroot = str(dataroot)
        table_dir = Path(dataroot) / version
        for name in _TABLES:
            path = table_dir / f"{name}.json"
            if not path.is_file():
                raise DatasetError(f"table folder {table_dir} lacks {name}.json")
            try:
                records = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise DatasetError(f"table file {path} is not valid JSON: {exc}") from exc
            if not isinstance(records, list):
                raise DatasetError(f"table file {path} does not hold a list of records")
            setattr(self, name, records)
        self._token2ind: dict[str, dict[str, int]] = {
            name: {rec["token"]: i for i, rec in enumerate(getattr(self, name))} for name in _TABLES}
        self._decorate(table_dir)

    def _decorate(self, table_dir: Path) -> None:
        """The devkit's reverse index: the short-cuts its users (and the reader) rely on."""
        try:
            for rec in self.sample_annotation:
                inst = self.get("instance", rec["instance_token"])
                rec["category_name"] = self.get("category", inst["category_token"])["name"]
            for rec in self.sample_data:
                sensor = self.get("sensor", self.get("calibrated_sensor", rec["calibrated_sensor_token"])["sensor_token"])
                rec["sensor_modality"] = sensor["modality"]
                rec["channel"] = sensor["channel"]
            for rec in self.sample:
                rec["data"], rec["anns"] = {}, []
            for rec in self.sample_data:
                if rec["is_key_frame"]:
                    self.get("sample", rec["sample_token"])["data"][rec["channel"]] = rec["token"]
            for rec in self.sample_annotation:
                self.get("sample", rec["sample_token"])["anns"].append(rec["token"])
        except KeyError as exc:
            raise DatasetError(f"tables in {table_dir} do not link up: missing record or field {exc}") from exc

    def get(self, table_name: str, token: str) -> dict[str, Any]:
        """A record by token (KeyError when absent, as the devkit)."""
        return getattr(self, table_name)[self._token2ind[table_name][token]]

    def get_box(self, sample_annotation_token: str) -> AnnotationBox:
        rec = self.get("sample_annotation", sample_annotation_token)
        quat = np.asarray(rec["rotation"], dtype=np.float64)
        return AnnotationBox(center=np.asarray(rec["translation"], dtype=np.float64),
                             wlh=np.asarray(rec["size"], dtype=np.float64),
                             rotation_matrix=matrix_from_quat_wxyz(quat / np.linalg.norm(quat)),
                             name=rec["category_name"], token=rec["token"])

    def box_velocity(self, sample_annotation_token: str, max_time_diff: float = 1.5) -> NDArray[np.float64]:
        """Global velocity (3,) in m/s: the centred difference over the neighbouring annotations, a one-sided one
        at a track's ends, NaN for a lone annotation or neighbours more than ``max_time_diff`` s apart (twice that
        for the centred difference), as the devkit estimates it."""
        current = self.get("sample_annotation", sample_annotation_token)
        has_prev, has_next = current["prev"] != "", current["next"] != ""
        if not has_prev and not has_next:
            return np.full(3, np.nan)
        first = self.get("sample_annotation", current["prev"]) if has_prev else current
        last = self.get("sample_annotation", current["next"]) if has_next else current
        diff = np.asarray(last["translation"], dtype=np.float64) - np.asarray(first["translation"], dtype=np.float64)
        dt = 1e-6 * self.get("sample", last["sample_token"])["timestamp"] - 1e-6 * self.get(
            "sample", first["sample_token"])["timestamp"]
        limit = 2 * max_time_diff if has_prev and has_next else max_time_diff
        return np.full(3, np.nan) if dt > limit else diff / dt
