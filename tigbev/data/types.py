"""Typed frames produced at the data boundary. Everything here is in the key sweep's lidar frame unless named.

See docs/COORDINATES.md for the frames and layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["CameraView", "GtBoxes", "LidarSweeps", "SampleFrame", "POINT_FEATURES"]

# Columns of LidarSweeps.points.
POINT_FEATURES: tuple[str, ...] = ("x_m", "y_m", "z_m", "intensity", "time_lag_s")


@dataclass(frozen=True, kw_only=True)
class LidarSweeps:
    """The key sweep plus earlier sweeps, all moved into the key sweep's lidar frame.

    ``points`` (N, 5) float32, columns POINT_FEATURES: position in metres, raw intensity, and the time lag in
    seconds between the key sweep and the sweep a point comes from (0 for the key sweep, > 0 for earlier ones).
    ``num_key_points``: the first rows that belong to the key sweep.
    """

    points: NDArray[np.float32]
    num_key_points: int
    sweep_paths: tuple[Path, ...]

    @property
    def key_points(self) -> NDArray[np.float32]:
        return self.points[: self.num_key_points]


@dataclass(frozen=True, kw_only=True)
class CameraView:
    """One camera image of a sample with its calibration.

    ``cam_from_lidar`` maps key-lidar-frame points to this camera's frame (x right, y down, z forward), going
    through the global frame with each sensor's own ego pose at its own timestamp, as nuScenes does.
    ``intrinsics`` (3, 3) maps camera-frame points to pixels of the original image (``width`` x ``height``).
    """

    channel: str
    sample_data_token: str
    image_path: Path
    width: int
    height: int
    timestamp_us: int
    intrinsics: NDArray[np.float64]
    cam_from_lidar: NDArray[np.float64]

    def load_image(self) -> NDArray[np.uint8]:
        """The image as (H, W, 3) uint8 RGB."""
        from PIL import Image

        from tigbev.errors import DatasetError

        if not self.image_path.is_file():
            raise DatasetError(f"camera image of {self.channel} is missing: {self.image_path}")
        try:
            with Image.open(self.image_path) as img:
                arr = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError) as exc:  # PIL raises SyntaxError for some corrupt headers
            raise DatasetError(f"cannot read camera image {self.image_path}: {exc}") from exc
        if arr.shape[:2] != (self.height, self.width):
            raise DatasetError(
                f"camera image {self.image_path} is {arr.shape[1]}x{arr.shape[0]}, but sample_data says "
                f"{self.width}x{self.height}"
            )
        return arr


@dataclass(frozen=True, kw_only=True)
class GtBoxes:
    """Ground-truth boxes of one sample in the key lidar frame.

    ``boxes`` (N, 9): x, y, z, l, w, h, yaw, vx, vy (geometry/boxes.py); velocity is NaN where the devkit has none
    (an annotation with no linked neighbour). ``labels`` index DETECTION_CLASSES, -1 for categories outside the
    detection benchmark. ``attribute_names`` are '' where the annotation has none.
    """

    boxes: NDArray[np.float64]
    labels: NDArray[np.int64]
    category_names: tuple[str, ...]
    attribute_names: tuple[str, ...]
    num_lidar_pts: NDArray[np.int64]
    num_radar_pts: NDArray[np.int64]
    annotation_tokens: tuple[str, ...]
    instance_tokens: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, mask: NDArray[np.bool_]) -> "GtBoxes":
        """The subset of boxes where ``mask`` is true (e.g. ``labels >= 0``)."""
        idx = np.flatnonzero(mask)
        return GtBoxes(
            boxes=self.boxes[idx],
            labels=self.labels[idx],
            category_names=tuple(self.category_names[i] for i in idx),
            attribute_names=tuple(self.attribute_names[i] for i in idx),
            num_lidar_pts=self.num_lidar_pts[idx],
            num_radar_pts=self.num_radar_pts[idx],
            annotation_tokens=tuple(self.annotation_tokens[i] for i in idx),
            instance_tokens=tuple(self.instance_tokens[i] for i in idx),
        )


@dataclass(frozen=True, kw_only=True)
class SampleFrame:
    """One annotated key frame: LiDAR sweeps, camera views and GT boxes, all relative to the key lidar frame."""

    token: str
    scene_name: str
    timestamp_us: int
    lidar_sample_data_token: str
    ego_from_lidar: NDArray[np.float64]
    global_from_ego: NDArray[np.float64]  # ego pose at the key lidar timestamp
    lidar: LidarSweeps
    cameras: tuple[CameraView, ...]
    gt: GtBoxes

    @property
    def global_from_lidar(self) -> NDArray[np.float64]:
        return self.global_from_ego @ self.ego_from_lidar

    def camera(self, channel: str) -> CameraView:
        for cam in self.cameras:
            if cam.channel == channel:
                return cam
        raise KeyError(f"sample {self.token} has no camera {channel!r}")
