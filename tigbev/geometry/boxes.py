"""3D boxes in the project layout, and their conversion from and to nuScenes.

The project layout (one row per box, float64 numpy or any float torch tensor)::

    x, y, z, l, w, h, yaw[, vx, vy]
    0  1  2  3  4  5   6     7   8

- (x, y, z): the geometric centre of the box (not the bottom face), in metres, in the frame the boxes are in
  (the key-sweep lidar frame after loading).
- (l, w, h): size along the box's own x (length, heading direction), y (width) and z (height) axes, metres.
  nuScenes stores (w, l, h): ``lwh_from_nuscenes_wlh`` / ``nuscenes_wlh_from_lwh`` are the only converters.
- yaw: rotation of the length axis about +z, counter-clockwise from the frame's +x, radians in (-pi, pi].
- (vx, vy): velocity over ground in metres per second, expressed in the frame's axes (rotation only: no ego
  motion is subtracted).

Corner order of ``box_corners`` (box frame: +x forward along the length, +y left, +z up)::

          4 -------- 5          top face:    4 5 6 7
         /|         /|          bottom face: 0 1 2 3
        7 -------- 6 .          front (+x):  1 2 6 5
        | |        | |
        . 0 -------- 1   -> +x (heading)
        |/         |/
        3 -------- 2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tigbev.geometry.frames import (
    quat_wxyz_from_yaw,
    transform_points,
    yaw_from_rotation,
    yaw_twist_of_pose,
)

if TYPE_CHECKING:  # the devkit is imported lazily: geometry stays usable without it
    from nuscenes.utils.data_classes import Box

__all__ = [
    "BOX_DIM",
    "BOX_DIM_VEL",
    "box_corners",
    "boxes_from_nuscenes",
    "boxes_to_nuscenes",
    "count_points_in_boxes",
    "first_box_of_points",
    "lwh_from_nuscenes_wlh",
    "nuscenes_wlh_from_lwh",
    "points_in_boxes",
    "transform_boxes",
    "wrap_angle",
]

BOX_DIM = 7  # x, y, z, l, w, h, yaw
BOX_DIM_VEL = 9  # ... + vx, vy

# Unit-cube corners in the order drawn in the module docstring (x forward, y left, z up).
_UNIT_CORNERS = 0.5 * np.array(
    [
        [-1, 1, -1], [1, 1, -1], [1, -1, -1], [-1, -1, -1],
        [-1, 1, 1], [1, 1, 1], [1, -1, 1], [-1, -1, 1],
    ],
    dtype=np.float64,
)


def wrap_angle(angle_rad: ArrayLike) -> NDArray[np.float64]:
    """Angles wrapped into (-pi, pi]."""
    a = np.asarray(angle_rad, dtype=np.float64)
    wrapped = np.mod(a + np.pi, 2 * np.pi) - np.pi
    return np.where(wrapped == -np.pi, np.pi, wrapped)


def lwh_from_nuscenes_wlh(wlh: ArrayLike) -> NDArray[np.float64]:
    """nuScenes (w, l, h) -> project (l, w, h), for arrays (..., 3)."""
    s = np.asarray(wlh, dtype=np.float64)
    return s[..., [1, 0, 2]]


def nuscenes_wlh_from_lwh(lwh: ArrayLike) -> NDArray[np.float64]:
    """Project (l, w, h) -> nuScenes (w, l, h), for arrays (..., 3)."""
    s = np.asarray(lwh, dtype=np.float64)
    return s[..., [1, 0, 2]]


def _as_boxes(boxes: ArrayLike) -> NDArray[np.float64]:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] < BOX_DIM:
        raise ValueError(f"boxes must have shape (N, >=7) in layout x, y, z, l, w, h, yaw[, vx, vy]; got {b.shape}")
    return b


def box_corners(boxes: ArrayLike) -> NDArray[np.float64]:
    """Corners (N, 8, 3) of boxes (N, >=7), in the order drawn in the module docstring."""
    b = _as_boxes(boxes)
    local = _UNIT_CORNERS[None] * b[:, None, 3:6]  # (N, 8, 3)
    cos, sin = np.cos(b[:, 6])[:, None], np.sin(b[:, 6])[:, None]
    x = cos * local[..., 0] - sin * local[..., 1]
    y = sin * local[..., 0] + cos * local[..., 1]
    return np.stack([x, y, local[..., 2]], axis=-1) + b[:, None, :3]


def points_in_boxes(points: ArrayLike, boxes: ArrayLike, *, chunk: int = 1 << 22) -> NDArray[np.bool_]:
    """Membership mask (P, N): point p lies inside or on the surface of box n.

    Points (P, >=3) and boxes (N, >=7) must be in the same frame. Work is chunked over points so that P x N
    temporaries stay below ``chunk`` elements.
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] < 3:
        raise ValueError(f"points must have shape (P, >=3), got {pts.shape}")
    b = _as_boxes(boxes)
    n_pts, n_boxes = pts.shape[0], b.shape[0]
    out = np.zeros((n_pts, n_boxes), dtype=bool)
    if n_pts == 0 or n_boxes == 0:
        return out
    cos, sin = np.cos(b[:, 6]), np.sin(b[:, 6])
    half = 0.5 * b[:, 3:6]
    step = max(1, chunk // n_boxes)
    for start in range(0, n_pts, step):
        d = pts[start : start + step, None, :3].astype(np.float64) - b[None, :, :3]  # (p, N, 3)
        # Rotate the offset into each box's frame by -yaw.
        local_x = cos * d[..., 0] + sin * d[..., 1]
        local_y = -sin * d[..., 0] + cos * d[..., 1]
        out[start : start + step] = (
            (np.abs(local_x) <= half[:, 0]) & (np.abs(local_y) <= half[:, 1]) & (np.abs(d[..., 2]) <= half[:, 2])
        )
    return out


def count_points_in_boxes(points: ArrayLike, boxes: ArrayLike) -> NDArray[np.int64]:
    """Number of points (P, >=3) inside each box (N, >=7): (N,) int64."""
    return points_in_boxes(points, boxes).sum(axis=0).astype(np.int64)


def first_box_of_points(points: ArrayLike, boxes: ArrayLike) -> NDArray[np.int64]:
    """(P,) index of the first box (M, >=7) that contains each point (P, >=3), -1 for none; both in one frame.

    The same membership test as ``points_in_boxes(points, boxes)`` (and the same answer as its first ``True`` per
    row), but run per box on the few points near it: points sorted by x give each box's candidates within half its
    footprint diagonal (plus 1 cm) in x by binary search, then in y, instead of testing all P x M pairs.
    """
    out = np.full(len(points), -1, dtype=np.int64)
    if not len(points) or not len(boxes):
        return out
    b = np.asarray(boxes, dtype=np.float64)
    pts = np.asarray(points)
    order = np.argsort(pts[:, 0], kind="stable")
    xs = pts[order, 0].astype(np.float64)
    reach = 0.5 * np.hypot(b[:, 3], b[:, 4]) + 0.01  # any point inside is at most this far in x and in y
    lo = np.searchsorted(xs, b[:, 0] - reach, side="left")
    hi = np.searchsorted(xs, b[:, 0] + reach, side="right")
    for m in range(len(b)):  # in box order: a point keeps the first box that contains it
        cand = order[lo[m]:hi[m]]
        cand = cand[(np.abs(pts[cand, 1].astype(np.float64) - b[m, 1]) <= reach[m]) & (out[cand] < 0)]
        if len(cand):
            out[cand[points_in_boxes(pts[cand], b[m:m + 1])[:, 0]]] = m
    return out


def transform_boxes(a_from_b: ArrayLike, boxes_b: ArrayLike) -> NDArray[np.float64]:
    """Boxes (N, 7 or 9) from frame b to frame a.

    Centres move with the full pose. Boxes stay upright (as in nuScenes and every LiDAR detector), so yaw and
    velocity turn by the pose's twist about z (``yaw_twist_of_pose``) and any tilt between the frames' z axes is
    dropped; the twist of ``b_from_a`` is exactly minus that of ``a_from_b``, so a conversion and its inverse
    cancel to rounding error.
    """
    b = _as_boxes(boxes_b)
    pose = np.asarray(a_from_b, dtype=np.float64)
    out = b.copy()
    out[:, :3] = transform_points(pose, b[:, :3])
    twist = yaw_twist_of_pose(pose)
    out[:, 6] = wrap_angle(b[:, 6] + twist)
    if b.shape[1] >= BOX_DIM_VEL:
        cos, sin = np.cos(twist), np.sin(twist)
        out[:, 7] = cos * b[:, 7] - sin * b[:, 8]
        out[:, 8] = sin * b[:, 7] + cos * b[:, 8]
    return out


def boxes_from_nuscenes(
    boxes: Sequence["Box"],
    frame_from_global: ArrayLike,
    velocities_global_xy: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """nuScenes devkit boxes in the global frame -> project boxes (N, 9) in the frame of ``frame_from_global``.

    ``velocities_global_xy`` (N, 2) m/s in global axes (NaN where unknown); zeros when not given. NaN velocities
    stay NaN so callers can mask them.
    """
    n = len(boxes)
    out = np.zeros((n, BOX_DIM_VEL), dtype=np.float64)
    if n == 0:
        return out
    out[:, :3] = np.array([b.center for b in boxes], dtype=np.float64)
    out[:, 3:6] = lwh_from_nuscenes_wlh(np.array([b.wlh for b in boxes], dtype=np.float64))
    rotations = np.stack([b.rotation_matrix for b in boxes])
    out[:, 6] = yaw_from_rotation(rotations)
    if velocities_global_xy is not None:
        vel = np.asarray(velocities_global_xy, dtype=np.float64)
        if vel.shape != (n, 2):
            raise ValueError(f"velocities_global_xy must have shape ({n}, 2), got {vel.shape}")
        out[:, 7:9] = vel
    return transform_boxes(frame_from_global, out)


def boxes_to_nuscenes(
    boxes: ArrayLike,
    global_from_frame: ArrayLike,
    *,
    names: Sequence[str] | None = None,
    scores: ArrayLike | None = None,
) -> list["Box"]:
    """Project boxes (N, 7 or 9) in some frame -> nuScenes devkit boxes in the global frame.

    Orientation becomes a yaw-only quaternion about global +z (the form of nuScenes annotations); velocities, when
    present, become ``Box.velocity = (vx, vy, 0)`` in global axes.
    """
    from nuscenes.utils.data_classes import Box
    from pyquaternion import Quaternion

    b = _as_boxes(boxes)
    g = transform_boxes(global_from_frame, b)
    quats = quat_wxyz_from_yaw(g[:, 6])
    score_arr = np.full(len(b), np.nan) if scores is None else np.asarray(scores, dtype=np.float64)
    out = []
    for i in range(len(b)):
        velocity = (g[i, 7], g[i, 8], 0.0) if b.shape[1] >= BOX_DIM_VEL else (np.nan, np.nan, np.nan)
        out.append(
            Box(
                center=g[i, :3].tolist(),
                size=nuscenes_wlh_from_lwh(g[i, 3:6]).tolist(),
                orientation=Quaternion(quats[i]),
                velocity=velocity,
                name=None if names is None else names[i],
                score=float(score_arr[i]),
            )
        )
    return out
