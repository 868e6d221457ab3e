"""The teacher cache from your own code: open a cache by URL, read samples as plain numpy arrays, check it against a
split. No torch, no tigbev training loop (the devkit only for :meth:`TeacherCache.check`).

```python
from tigbev.data.teacher_cache import open_cache

cache = open_cache("s3://bucket/cache-train")          # or a local directory, memory://..., any fsspec URL
cache.check("/data/nuscenes", "train")                 # refuses a cache of other samples, records or images
s = cache["3e8750f331d7499e9b5123e9eb70f2e2"]          # by sample token, or cache[0] by index
s.keypoint_features                                    # (M, K, C) float32: the teacher map at each box's keypoints
```

Frames and units are those of docs/COORDINATES.md: boxes and keypoints in the sample's key lidar frame (metres), the
teacher map ``(C, H, W)`` on :attr:`TeacherCache.grid`, read at metric points the way the training reads it
(bilinear, cell centres carry the cell's value, zero outside the map).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from tigbev.cache.record import CachedSample
from tigbev.cache.store import CacheError, CacheReader
from tigbev.data.classes import DETECTION_CLASSES
from tigbev.geometry import BevGrid

__all__ = ["TeacherCache", "TeacherSample", "open_cache", "sample_map_at"]


def sample_map_at(teacher_map: NDArray[np.floating], xy: NDArray[np.floating], grid: BevGrid
                  ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """A map ``(C, H, W)`` on ``grid`` read at metric points ``xy`` ``(..., 2)``: ``((..., C) float32, valid (...))``.

    Bilinear with cell centres carrying the cell's value and zeros beyond the border (torch's ``grid_sample`` with
    ``align_corners=False`` and zero padding, as :func:`tigbev.geometry.bev_sampling.sample_bev`); ``valid`` is
    False for points outside the grid's rectangle.
    """
    c, h, w = teacher_map.shape
    if (h, w) != grid.shape_hw:
        raise ValueError(f"map is {h} x {w} cells, the grid {grid.shape_hw[0]} x {grid.shape_hw[1]}")
    pts = np.asarray(xy, np.float64).reshape(-1, 2)
    fx = (pts[:, 0] - grid.x_min_m) / (grid.x_max_m - grid.x_min_m) * w - 0.5  # continuous column index
    fy = (pts[:, 1] - grid.y_min_m) / (grid.y_max_m - grid.y_min_m) * h - 0.5
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    out = np.zeros((len(pts), c), np.float64)
    flat = np.asarray(teacher_map, np.float32).reshape(c, h * w)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1.0 - np.abs(fx - xi)) * (1.0 - np.abs(fy - yi))
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            idx = np.where(inside, yi * w + xi, 0)
            out += np.where(inside, weight, 0.0)[:, None] * flat[:, idx].T
    valid = (pts[:, 0] >= grid.x_min_m) & (pts[:, 0] < grid.x_max_m) & (pts[:, 1] >= grid.y_min_m) \
        & (pts[:, 1] < grid.y_max_m)
    lead = np.shape(xy)[:-1]
    return out.astype(np.float32).reshape(*lead, c), valid.reshape(lead)


@dataclass(frozen=True)
class TeacherSample:
    """One cached sample as numpy arrays; ``variant`` names the stored map (0: the canonical one)."""

    index: int
    token: str
    boxes: NDArray[np.float32]
    """(M, 9) ``x, y, z, l, w, h, yaw, vx, vy`` in the key lidar frame (metres, radians, m/s)."""
    labels: NDArray[np.int64]
    """(M,) indices into :data:`class_names`."""
    keypoints_xy: NDArray[np.float32]
    """(M, K, 2) each box's keypoints (K = grid x grid), in the key lidar frame."""
    depth: NDArray[np.float32]
    """(P, 5) LiDAR points projected into the cameras: ``u, v`` original-image pixels, depth (m), box index (-1:
    none), camera index into :attr:`TeacherCache.cameras`."""
    map_from_lidar: NDArray[np.float32]
    """(4, 4) the stored map's frame (identity for the canonical map; a flip or a BDA draw for the variants)."""
    _cached: CachedSample
    _variant: int
    _grid: BevGrid

    class_names = DETECTION_CLASSES

    @cached_property
    def teacher_map(self) -> NDArray[np.float32]:
        """(C, H, W) float32 teacher BEV map; in a foreground cache, zeros where no cell is stored."""
        from tigbev.cache.record import dense_map

        m = self._cached.maps[self._variant]
        cells = None if m.cells is None else m.cells.astype(np.int64)
        return dense_map(cells, m.features(np.float32), self._grid)

    @cached_property
    def _at_keypoints(self) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        xy = self.keypoints_xy
        if not np.array_equal(self.map_from_lidar, np.eye(4, dtype=np.float32)):
            xy = (xy.astype(np.float64) @ self.map_from_lidar[:2, :2].T.astype(np.float64)).astype(np.float32)
        return sample_map_at(self.teacher_map, xy, self._grid)

    @property
    def keypoint_features(self) -> NDArray[np.float32]:
        """(M, K, C) float32: the teacher map at each keypoint (what TiG-BEV's inner-feature losses compare)."""
        return self._at_keypoints[0]

    @property
    def keypoint_valid(self) -> NDArray[np.bool_]:
        """(M, K) bool: the keypoint lies inside the teacher map."""
        return self._at_keypoints[1]


class TeacherCache:
    """A finished teacher cache, read only. Indexable by position or sample token, iterable, picklable (each
    process of a DataLoader opens the store itself)."""

    def __init__(self, url: str | os.PathLike[str]):
        self._reader = CacheReader(str(url))

    @property
    def url(self) -> str:
        return self._reader.url

    @property
    def grid(self) -> BevGrid:
        """The teacher map's BEV grid (range and cell size)."""
        return self._reader.manifest.grid

    @property
    def channels(self) -> int:
        return self._reader.manifest.features.channels

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera names, in the order of the depth rows' camera index."""
        return tuple(self._reader.manifest.depth.cameras)

    @property
    def variants(self) -> int:
        """Stored maps per sample (1 canonical; 4 flips; 1 + K draws)."""
        return self._reader.manifest.variants.count

    @property
    def tokens(self) -> list[str]:
        return self._reader.tokens

    @property
    def info(self) -> dict:
        """The manifest as a plain dict (teacher checkpoint sha256 and config, dataset fingerprint, storage)."""
        return self._reader.manifest.to_dict()

    def __len__(self) -> int:
        return len(self._reader)

    def __iter__(self) -> Iterator[TeacherSample]:
        return (self.sample(i) for i in range(len(self)))

    def __getitem__(self, key: int | str) -> TeacherSample:
        return self.sample(key)

    def sample(self, key: int | str, variant: int = 0) -> TeacherSample:
        """Sample ``key`` (position or token) with its stored map ``variant``; a CacheError names a missing or
        damaged sample."""
        if isinstance(key, str):
            index = self._reader.sample_idx(key)
        elif isinstance(key, int | np.integer):
            index = int(key) + (len(self) if key < 0 else 0)
        else:
            raise TypeError(f"a cache sample is named by its index or token, got {type(key).__name__}")
        cached = self._reader.read(index)
        if not 0 <= variant < len(cached.maps):
            raise CacheError(f"cache {self.url} stores {len(cached.maps)} map(s) per sample, no variant {variant}")
        return TeacherSample(index=index, token=cached.token, boxes=cached.boxes, labels=cached.labels,
                             keypoints_xy=np.ascontiguousarray(cached.keypoints, np.float32), depth=cached.depth,
                             map_from_lidar=np.asarray(cached.maps[variant].aug_from_lidar, np.float32),
                             _cached=cached, _variant=variant, _grid=self.grid)

    def check(self, dataroot: str | os.PathLike[str], split: str) -> None:
        """Raise a CacheError saying what differs unless this cache was extracted from exactly this split of this
        dataroot: its sample tokens, the table records that shape a sample, the image sizes."""
        from tigbev.data.nuscenes_reader import NuScenesReader

        reader = NuScenesReader(dataroot)
        num_sweeps = int(self._reader.manifest.teacher.config.get("num_sweeps", 1))
        self._reader.check_compatible(reader.fingerprint(split, reader.sample_tokens(split), num_sweeps=num_sweeps))


def open_cache(url: str | os.PathLike[str]) -> TeacherCache:
    """Open a finished teacher cache (a directory or an fsspec URL); refuses an incomplete or foreign store."""
    return TeacherCache(url)
