"""Projection of 3D points into pinhole cameras.

Pixel convention (nuScenes, OpenCV): u grows to the right, v downwards, and the centre of pixel (column i, row j)
is at (u, v) = (i, j); an image of W x H pixels covers u in [-0.5, W - 0.5) and v in [-0.5, H - 0.5).
Camera frame: x right, y down, z forward (depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tigbev.geometry.frames import transform_points

__all__ = ["ProjectedPoints", "project_points", "project_to_image"]


def project_points(points_cam: ArrayLike, intrinsics: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pinhole projection of camera-frame points (N, 3): returns (uv (N, 2) pixels, depth_m (N,)).

    Points with depth <= 0 get non-finite uv; callers filter on depth first.
    """
    p = np.asarray(points_cam, dtype=np.float64)
    k = np.asarray(intrinsics, dtype=np.float64)
    if k.shape != (3, 3):
        raise ValueError(f"intrinsics must be 3x3, got {k.shape}")
    depth = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        homog = p @ k.T
        uv = homog[:, :2] / depth[:, None]
    return uv, depth


@dataclass(frozen=True)
class ProjectedPoints:
    """Points that land in one image: pixel coordinates, depth along the optical axis, and source indices."""

    uv: NDArray[np.float64]  # (M, 2) pixels, convention of this module
    depth_m: NDArray[np.float64]  # (M,)
    index: NDArray[np.int64]  # (M,) row of each point in the input array

    def __len__(self) -> int:
        return len(self.depth_m)


def project_to_image(
    points: ArrayLike,
    cam_from_points: ArrayLike,
    intrinsics: ArrayLike,
    image_wh: tuple[int, int],
    *,
    min_depth_m: float = 1e-3,
    margin_px: float = 0.0,
) -> ProjectedPoints:
    """Project points (N, >=3) given in some frame into a W x H image.

    ``cam_from_points`` (4, 4) maps the points' frame to the camera frame. A point is kept when its depth exceeds
    ``min_depth_m`` and it falls inside the image shrunk by ``margin_px`` on every side.
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] < 3:
        raise ValueError(f"points must have shape (N, >=3), got {pts.shape}")
    width, height = image_wh
    cam = transform_points(cam_from_points, pts[:, :3])
    uv, depth = project_points(cam, intrinsics)
    keep = depth > min_depth_m
    with np.errstate(invalid="ignore"):
        keep &= (uv[:, 0] >= -0.5 + margin_px) & (uv[:, 0] < width - 0.5 - margin_px)
        keep &= (uv[:, 1] >= -0.5 + margin_px) & (uv[:, 1] < height - 0.5 - margin_px)
    index = np.flatnonzero(keep)
    return ProjectedPoints(uv=uv[index], depth_m=depth[index], index=index.astype(np.int64))
