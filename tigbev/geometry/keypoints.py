"""Foreground keypoints for inner-feature distillation (METHOD.md section 6).

Each box is enlarged by ``enlarge_m`` on every side (length and width each grow by 2 * enlarge_m), then a uniform
``grid_size x grid_size`` lattice is laid on the rotated BEV rectangle, edges included. Keypoint ``k = i * G + j``
sits at step ``i`` along the length axis (from the back, -l/2, to the front, +l/2) and step ``j`` along the width
axis (from the right, -w/2, to the left, +w/2). Output is metric (x, y) in the boxes' frame.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["KEYPOINT_ENLARGE_M", "KEYPOINT_GRID", "box_keypoints_xy"]

KEYPOINT_ENLARGE_M = 1.6
"""Metres each box is enlarged by on every side before keypoints are laid (METHOD.md section 6)."""
KEYPOINT_GRID = 24
"""Keypoints per box side: a 24 x 24 lattice (METHOD.md section 6)."""


def box_keypoints_xy(boxes: ArrayLike, *, enlarge_m: float = KEYPOINT_ENLARGE_M,
                     grid_size: int = KEYPOINT_GRID) -> NDArray[np.float64]:
    """Keypoints (N, grid_size**2, 2) of boxes (N, >=7) in the project layout."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] < 7:
        raise ValueError(f"boxes must have shape (N, >=7), got {b.shape}")
    if grid_size < 2:
        raise ValueError(f"grid_size must be >= 2 so the lattice includes both edges, got {grid_size}")
    if enlarge_m < 0:
        raise ValueError(f"enlarge_m must be >= 0, got {enlarge_m}")
    steps = np.linspace(-0.5, 0.5, grid_size)  # fraction of the enlarged extent, edges included
    length = b[:, 3] + 2 * enlarge_m  # enlarged extents
    width = b[:, 4] + 2 * enlarge_m
    along = steps[None, :, None] * length[:, None, None]  # (N, G, 1): step i along the length
    across = steps[None, None, :] * width[:, None, None]  # (N, 1, G): step j along the width
    along, across = np.broadcast_arrays(along, across)  # (N, G, G)
    cos, sin = np.cos(b[:, 6])[:, None, None], np.sin(b[:, 6])[:, None, None]
    x = b[:, 0, None, None] + cos * along - sin * across
    y = b[:, 1, None, None] + sin * along + cos * across
    return np.stack([x, y], axis=-1).reshape(len(b), grid_size * grid_size, 2)
