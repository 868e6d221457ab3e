"""Rigid transforms between named frames.

Every pose is a 4x4 homogeneous matrix named ``a_from_b``: it maps points written in frame ``b`` to frame ``a``, so
chains read left to right cancel (``global_from_lidar = global_from_ego @ ego_from_lidar``). Quaternions follow
nuScenes: ``[w, x, y, z]``. See docs/COORDINATES.md.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "invert_pose",
    "make_pose",
    "matrix_from_quat_wxyz",
    "quat_wxyz_from_matrix",
    "quat_wxyz_from_yaw",
    "rotate_vectors",
    "transform_points",
    "yaw_from_quat_wxyz",
    "yaw_from_rotation",
    "yaw_twist_of_pose",
]


def matrix_from_quat_wxyz(quat_wxyz: ArrayLike) -> NDArray[np.float64]:
    """Rotation matrix (..., 3, 3) of unit quaternions (..., 4) in nuScenes order [w, x, y, z].

    The quaternion is normalised first, so slightly denormalised values from JSON tables are accepted.
    """
    q = np.asarray(quat_wxyz, dtype=np.float64)
    if q.shape[-1] != 4:
        raise ValueError(f"quaternion must have 4 components [w, x, y, z], got shape {q.shape}")
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError("quaternion has zero norm")
    w, x, y, z = np.moveaxis(q / norm, -1, 0)
    rot = np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    )
    return rot.reshape(q.shape[:-1] + (3, 3))


def quat_wxyz_from_matrix(rotation: ArrayLike) -> NDArray[np.float64]:
    """Unit quaternion [w, x, y, z] (w >= 0) of one 3x3 rotation matrix (Shepperd's method, stable for all angles)."""
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape != (3, 3):
        raise ValueError(f"rotation must be 3x3, got {r.shape}")
    trace = np.trace(r)
    # Pick the largest of w, x, y, z to divide by; the others follow without catastrophic cancellation.
    diag = np.array([trace, r[0, 0], r[1, 1], r[2, 2]])
    k = int(np.argmax(diag))
    if k == 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif k == 1:
        s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif k == 2:
        s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    quat = np.asarray(q)
    quat /= np.linalg.norm(quat)
    return -quat if quat[0] < 0 else quat


def quat_wxyz_from_yaw(yaw_rad: ArrayLike) -> NDArray[np.float64]:
    """Quaternions (..., 4) of rotations by ``yaw_rad`` about +z."""
    half = 0.5 * np.asarray(yaw_rad, dtype=np.float64)
    zeros = np.zeros_like(half)
    return np.stack([np.cos(half), zeros, zeros, np.sin(half)], axis=-1)


def yaw_from_rotation(rotation: ArrayLike) -> NDArray[np.float64]:
    """Heading (rad, in (-pi, pi]) of the rotated x axis projected on the xy plane, for (..., 3, 3) rotations."""
    r = np.asarray(rotation, dtype=np.float64)
    return np.arctan2(r[..., 1, 0], r[..., 0, 0])


def yaw_from_quat_wxyz(quat_wxyz: ArrayLike) -> NDArray[np.float64]:
    """Heading (rad) of quaternions (..., 4): the direction of the rotated x axis in the xy plane."""
    return yaw_from_rotation(matrix_from_quat_wxyz(quat_wxyz))


def yaw_twist_of_pose(a_from_b: ArrayLike) -> float:
    """The rotation angle about z (rad) of a pose's rotation in its swing-twist decomposition.

    ``R = Rz(twist) @ R_swing`` with ``R_swing`` a rotation about a horizontal axis. For the inverse pose the
    twist is exactly the negative, which is what makes upright-box conversions invertible.
    """
    pose = np.asarray(a_from_b, dtype=np.float64)
    w, _, _, z = quat_wxyz_from_matrix(pose[:3, :3])
    return float(2.0 * np.arctan2(z, w))


def make_pose(rotation: ArrayLike, translation: ArrayLike) -> NDArray[np.float64]:
    """4x4 pose from a rotation (3x3 matrix or [w, x, y, z] quaternion) and a translation (3,)."""
    rot = np.asarray(rotation, dtype=np.float64)
    if rot.shape == (4,):
        rot = matrix_from_quat_wxyz(rot)
    if rot.shape != (3, 3):
        raise ValueError(f"rotation must be a 3x3 matrix or a [w, x, y, z] quaternion, got shape {rot.shape}")
    t = np.asarray(translation, dtype=np.float64)
    if t.shape != (3,):
        raise ValueError(f"translation must have shape (3,), got {t.shape}")
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = t
    return pose


def invert_pose(a_from_b: ArrayLike) -> NDArray[np.float64]:
    """``b_from_a`` of a rigid ``a_from_b`` (..., 4, 4): R^T and -R^T t, exact where a general inverse is not."""
    pose = np.asarray(a_from_b, dtype=np.float64)
    rot_t = np.swapaxes(pose[..., :3, :3], -1, -2)
    inv = np.zeros_like(pose)
    inv[..., :3, :3] = rot_t
    inv[..., :3, 3] = -np.einsum("...ij,...j->...i", rot_t, pose[..., :3, 3])
    inv[..., 3, 3] = 1.0
    return inv


def transform_points(a_from_b: ArrayLike, points_b: ArrayLike) -> NDArray[np.float64]:
    """Points (N, 3) in frame b -> (N, 3) in frame a. Extra columns (N, 3 + k) are carried through unchanged."""
    pose = np.asarray(a_from_b, dtype=np.float64)
    pts = np.asarray(points_b)
    if pts.ndim != 2 or pts.shape[1] < 3:
        raise ValueError(f"points must have shape (N, >=3), got {pts.shape}")
    xyz = pts[:, :3].astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]
    if pts.shape[1] == 3:
        return xyz
    return np.concatenate([xyz, pts[:, 3:].astype(np.float64)], axis=1)


def rotate_vectors(a_from_b: ArrayLike, vectors_b: ArrayLike) -> NDArray[np.float64]:
    """Free vectors (N, 3) (velocities, directions) from frame b to frame a: rotation only, no translation."""
    pose = np.asarray(a_from_b, dtype=np.float64)
    vec = np.asarray(vectors_b, dtype=np.float64)
    return vec @ pose[:3, :3].T
