"""The bird's-eye-view grid: a metric rectangle in the lidar frame cut into square cells.

Array layout of every BEV map in the project: ``(..., H, W) = (..., ny, nx)``; row ``iy`` holds cells of increasing
y, column ``ix`` cells of increasing x. Cell ``(iy, ix)`` covers ``[x_min + ix * cell_m, x_min + (ix + 1) * cell_m)``
in x (same for y); its centre is half a cell further. ``grid_sample`` coordinates use ``align_corners=False``:
-1 and +1 are the outer edges of the map, so two maps of different resolution over the same range agree at every
metric point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["NUSCENES_POINT_RANGE_M", "BevGrid"]

NUSCENES_POINT_RANGE_M = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
"""(x_min, y_min, z_min, x_max, y_max, z_max) in the lidar frame: the nuScenes detection range, the teacher's point
range in both presets and the box filter of a student trained without a cache."""


@dataclass(frozen=True, kw_only=True)
class BevGrid:
    """A BEV grid over ``[x_min_m, x_max_m) x [y_min_m, y_max_m)`` with square cells of ``cell_m`` metres."""

    x_min_m: float
    x_max_m: float
    y_min_m: float
    y_max_m: float
    cell_m: float

    def __post_init__(self) -> None:
        if not self.cell_m > 0:
            raise ValueError(f"BevGrid.cell_m must be > 0, got {self.cell_m}")
        for name, lo, hi in (("x", self.x_min_m, self.x_max_m), ("y", self.y_min_m, self.y_max_m)):
            if not hi > lo:
                raise ValueError(f"BevGrid.{name}_max_m ({hi}) must exceed {name}_min_m ({lo})")
            cells = (hi - lo) / self.cell_m
            if abs(cells - round(cells)) > 1e-6:
                raise ValueError(f"BevGrid {name} range {hi - lo} m is not a whole number of {self.cell_m} m cells")

    @classmethod
    def square(cls, half_extent_m: float, cell_m: float) -> "BevGrid":
        """The grid ``[-half, half)^2`` around the sensor."""
        return cls(x_min_m=-half_extent_m, x_max_m=half_extent_m, y_min_m=-half_extent_m, y_max_m=half_extent_m,
                   cell_m=cell_m)

    @property
    def nx(self) -> int:
        return round((self.x_max_m - self.x_min_m) / self.cell_m)

    @property
    def ny(self) -> int:
        return round((self.y_max_m - self.y_min_m) / self.cell_m)

    @property
    def shape_hw(self) -> tuple[int, int]:
        """Array shape (H, W) = (ny, nx) of a map on this grid."""
        return (self.ny, self.nx)

    def contains(self, xy: ArrayLike) -> NDArray[np.bool_]:
        """Whether metric points (..., 2) lie inside the grid's rectangle (half-open, as the cells)."""
        p = np.asarray(xy, dtype=np.float64)
        return (
            (p[..., 0] >= self.x_min_m) & (p[..., 0] < self.x_max_m)
            & (p[..., 1] >= self.y_min_m) & (p[..., 1] < self.y_max_m)
        )

    def cell_index(self, xy: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
        """(iy, ix, valid) of the cell holding each metric point (..., 2); indices are clipped where not valid."""
        p = np.asarray(xy, dtype=np.float64)
        ix = np.floor((p[..., 0] - self.x_min_m) / self.cell_m).astype(np.int64)
        iy = np.floor((p[..., 1] - self.y_min_m) / self.cell_m).astype(np.int64)
        valid = (ix >= 0) & (ix < self.nx) & (iy >= 0) & (iy < self.ny)
        return np.clip(iy, 0, self.ny - 1), np.clip(ix, 0, self.nx - 1), valid

    def cell_centers_xy(self) -> NDArray[np.float64]:
        """Metric centres (H, W, 2) of all cells, last axis (x, y)."""
        xs = self.x_min_m + (np.arange(self.nx) + 0.5) * self.cell_m
        ys = self.y_min_m + (np.arange(self.ny) + 0.5) * self.cell_m
        gx, gy = np.meshgrid(xs, ys, indexing="xy")  # (H, W) each
        return np.stack([gx, gy], axis=-1)

    def normalized(self, xy: ArrayLike) -> NDArray[np.float64]:
        """Metric points (..., 2) -> ``grid_sample`` coordinates (..., 2) in [-1, 1] (align_corners=False)."""
        p = np.asarray(xy, dtype=np.float64)
        gx = 2.0 * (p[..., 0] - self.x_min_m) / (self.x_max_m - self.x_min_m) - 1.0
        gy = 2.0 * (p[..., 1] - self.y_min_m) / (self.y_max_m - self.y_min_m) - 1.0
        return np.stack([gx, gy], axis=-1)

    def with_cell(self, cell_m: float) -> "BevGrid":
        """The same range at another resolution (e.g. a teacher map at stride 8 of its voxels)."""
        return BevGrid(x_min_m=self.x_min_m, x_max_m=self.x_max_m, y_min_m=self.y_min_m, y_max_m=self.y_max_m,
                       cell_m=cell_m)

    def to_dict(self) -> dict[str, float]:
        return {"x_min_m": self.x_min_m, "x_max_m": self.x_max_m, "y_min_m": self.y_min_m,
                "y_max_m": self.y_max_m, "cell_m": self.cell_m}

    def is_close(self, other: "BevGrid", tol: float = 1e-6) -> bool:
        a, b = self.to_dict(), other.to_dict()
        return all(math.isclose(a[k], b[k], abs_tol=tol) for k in a)
