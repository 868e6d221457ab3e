"""Training targets built from a sample, shared by the teacher, the extraction, the student's dataset and losses.

``training_boxes`` (the GT boxes a detector learns from), ``depth_points`` (the key sweep projected into each camera,
the cache's depth rows), ``DepthBins`` and ``nearest_depth_map`` (the per-feature-cell depth target). Data-layer
code: the models and stages import it, it imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from tigbev.data.nuscenes_reader import CAMERA_CHANNELS
from tigbev.data.types import SampleFrame
from tigbev.geometry import first_box_of_points, project_to_image

__all__ = ["DepthBins", "depth_bins", "depth_points", "nearest_depth_map", "training_boxes"]


def training_boxes(frame: SampleFrame, point_range_m: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """GT boxes a detector learns from: detection classes, at least one LiDAR point, centre inside the range."""
    gt = frame.gt
    x0, y0, _, x1, y1, _ = point_range_m
    centre = gt.boxes[:, :2]
    keep = (gt.labels >= 0) & (gt.num_lidar_pts > 0)
    keep &= (centre[:, 0] >= x0) & (centre[:, 0] < x1) & (centre[:, 1] >= y0) & (centre[:, 1] < y1)
    boxes = gt.boxes[keep].copy()
    boxes[:, 7:9] = np.nan_to_num(boxes[:, 7:9], nan=0.0)  # unknown velocity: no motion (as mmdetection3d)
    return boxes, gt.labels[keep]


def depth_points(frame: SampleFrame, boxes: NDArray, *, min_depth_m: float) -> NDArray[np.float32]:
    """The key sweep projected into each camera, in the cache's layout (cache.schema.DEPTH_COLUMNS): rows
    (u, v, depth_m, box index, camera index) in original pixels, float32, sorted by camera (CAMERA_CHANNELS order).

    ``boxes`` (M, >=7) in the un-augmented lidar frame; a point inside several boxes takes the first.
    """
    key = frame.lidar.key_points
    box_of_point = first_box_of_points(key, boxes)
    rows = []
    for ci, channel in enumerate(CAMERA_CHANNELS):
        cam = frame.camera(channel)
        proj = project_to_image(key, cam.cam_from_lidar, cam.intrinsics, (cam.width, cam.height),
                                min_depth_m=min_depth_m)
        rows.append(np.column_stack([proj.uv, proj.depth_m, box_of_point[proj.index], np.full(len(proj), ci)]))
    return np.concatenate(rows).astype(np.float32).reshape(-1, 5)


# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DepthBins:
    """Uniform depth bins over ``[d_min_m, d_max_m)``: bin ``k`` covers ``[d_min + k * step, d_min + (k + 1) * step)``.

    TiG-BEV: ``[1, 60)`` step 1 -> 59 bins; BEVDepth: ``[2, 58)`` step 0.5 -> 112 bins.
    """

    d_min_m: float
    d_max_m: float
    step_m: float

    def __post_init__(self) -> None:
        if not self.step_m > 0:
            raise ValueError(f"DepthBins.step_m must be > 0, got {self.step_m}")
        if not self.d_max_m > self.d_min_m >= 0:
            raise ValueError(f"DepthBins needs 0 <= d_min_m < d_max_m, got [{self.d_min_m}, {self.d_max_m})")
        n = (self.d_max_m - self.d_min_m) / self.step_m
        if abs(n - round(n)) > 1e-6:
            raise ValueError(f"DepthBins range {self.d_max_m - self.d_min_m} m is not a whole number of "
                             f"{self.step_m} m steps")

    @property
    def num(self) -> int:
        """Number of bins D."""
        return round((self.d_max_m - self.d_min_m) / self.step_m)

    def centers_m(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bin centres (D,) float32 in metres: the values the predicted depth distribution is averaged over."""
        k = torch.arange(self.num, dtype=torch.float64, device=device)
        return (self.d_min_m + (k + 0.5) * self.step_m).float()

    def index(self, depth_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin index int64, valid bool) of depths (...) in metres; out-of-range, zero and non-finite depths are not
        valid (their index is clipped to [0, D) only so that it can be used for gathering)."""
        d = depth_m.double()  # float64: a depth just below d_max must not round up into bin D
        k = torch.floor((d - self.d_min_m) / self.step_m).long()
        valid = torch.isfinite(d) & (d >= self.d_min_m) & (d < self.d_max_m) & (k >= 0) & (k < self.num)
        return k.clamp(0, self.num - 1), valid


def depth_bins(d_min_m: float, d_max_m: float, step_m: float) -> DepthBins:
    """The bins ``[d_min_m, d_max_m)`` in steps of ``step_m`` metres (see DepthBins)."""
    return DepthBins(d_min_m=d_min_m, d_max_m=d_max_m, step_m=step_m)


def nearest_depth_map(uv: torch.Tensor, depth_m: torch.Tensor, box_index: torch.Tensor, image_hw: tuple[int, int],
                      stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of the nearest LiDAR point in every ``stride x stride`` feature cell of one image, and its box.

    Args:
        uv: (P, 2) pixel coordinates in the (augmented) input image; pixel centres are integers, so the image covers
            ``u in [-0.5, W - 0.5)``, ``v in [-0.5, H - 0.5)``. Points outside it are dropped.
        depth_m: (P,) camera depth in metres; points with depth <= 0 or non-finite are dropped.
        box_index: (P,) int index of the GT box holding the point, -1 for none.
        image_hw: (H, W) of the input image in pixels.
        stride: pixels per feature cell. The feature map is ``(ceil(H / stride), ceil(W / stride))``, as a strided
            convolutional backbone with padding gives; cell of a point = ``floor((u + 0.5) / stride)``.

    Returns:
        depth map (h, w) float32, 0 where no point falls; box-index map (h, w) int64, -1 where no point falls or the
        nearest point lies in no box. Per cell the smallest depth wins; among equal depths, the first point.
    """
    if uv.ndim != 2 or uv.shape[-1] != 2 or depth_m.shape != uv.shape[:1] or box_index.shape != uv.shape[:1]:
        raise ValueError(f"need uv (P, 2), depth_m (P,), box_index (P,), got {tuple(uv.shape)}, "
                         f"{tuple(depth_m.shape)}, {tuple(box_index.shape)}")
    img_h, img_w = image_hw
    h, w = math.ceil(img_h / stride), math.ceil(img_w / stride)
    device = uv.device
    # float64 so a point on a cell border lands in the same cell as a float64 reference computation.
    u, v, d = uv[:, 0].double(), uv[:, 1].double(), depth_m.double()
    keep = (torch.isfinite(u) & torch.isfinite(v) & torch.isfinite(d) & (d > 0)
            & (u >= -0.5) & (u < img_w - 0.5) & (v >= -0.5) & (v < img_h - 0.5))
    u, v, d, box = u[keep], v[keep], d[keep], box_index[keep].long()
    col = torch.floor((u + 0.5) / stride).long()
    row = torch.floor((v + 0.5) / stride).long()
    cell = row * w + col  # (P',) flat cell index
    n_cells = h * w
    d_min = torch.full((n_cells,), math.inf, dtype=torch.float64, device=device)
    d_min = d_min.scatter_reduce(0, cell, d, reduce="amin")
    # Ties: among the points at the cell's minimum depth, the first one (smallest original order) wins.
    order = torch.arange(len(d), device=device)
    at_min = d == d_min[cell]
    first = torch.full((n_cells,), len(d), dtype=torch.long, device=device)
    first = first.scatter_reduce(0, cell[at_min], order[at_min], reduce="amin")
    has = first < len(d)
    depth_map = torch.where(has, d_min, 0.0).float().reshape(h, w)
    box_map = torch.full((n_cells,), -1, dtype=torch.long, device=device)
    box_map[has] = box[first[has]]
    return depth_map, box_map.reshape(h, w)
