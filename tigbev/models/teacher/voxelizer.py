"""Hard voxelisation in plain, vectorised torch (deterministic on CPU and CUDA).

Semantics follow mmcv's hard voxeliser as CenterPoint uses it: points outside the range are dropped; voxels are
numbered in the order of their first point; each voxel keeps its first ``max_points_per_voxel`` points (in input
order) and only the first ``max_voxels`` voxels are kept. The voxel feature is the mean of its kept points
(mmdetection3d's HardSimpleVFE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["VoxelBatch", "Voxelizer"]


@dataclass(frozen=True)
class VoxelBatch:
    """Voxels of a batch. ``coords`` (V, 4) int32 rows are (batch index, z, y, x), spconv's order."""

    features: torch.Tensor  # (V, C) mean of the kept points
    coords: torch.Tensor  # (V, 4) int32
    num_points: torch.Tensor  # (V,) points kept per voxel
    batch_size: int


class Voxelizer(nn.Module):
    """Points (N, C) with xyz first -> voxels on the grid ``point_range`` / ``voxel_size``.

    Args:
        point_range_m: (x_min, y_min, z_min, x_max, y_max, z_max) in the lidar frame.
        voxel_size_m: (dx, dy, dz).
        max_points_per_voxel: points averaged per voxel at most.
        max_voxels: voxels kept per sample at most.
    """

    def __init__(self, point_range_m: Sequence[float], voxel_size_m: Sequence[float], max_points_per_voxel: int,
                 max_voxels: int, strict_range: bool = False):
        super().__init__()
        self.strict_range = strict_range
        """Keep only points strictly inside the range on every face (mmdet3d's ``PointsRangeFilter``, applied before
        its voxeliser); otherwise the voxeliser's own rule, ``min <= p < max``."""
        if len(point_range_m) != 6 or len(voxel_size_m) != 3:
            raise ValueError("point_range_m needs 6 values and voxel_size_m 3")
        self.register_buffer("range_min", torch.tensor(point_range_m[:3], dtype=torch.float32), persistent=False)
        self.register_buffer("voxel_size", torch.tensor(voxel_size_m, dtype=torch.float32), persistent=False)
        self.register_buffer("range_max", torch.tensor(point_range_m[3:], dtype=torch.float32), persistent=False)
        extent = [(point_range_m[i + 3] - point_range_m[i]) / voxel_size_m[i] for i in range(3)]
        self.grid_xyz = tuple(round(e) for e in extent)  # cells along x, y, z
        if any(abs(e - round(e)) > 1e-4 for e in extent):
            raise ValueError(f"point range {point_range_m} is not a whole number of voxels {voxel_size_m}")
        self.max_points_per_voxel = max_points_per_voxel
        self.max_voxels = max_voxels

    @property
    def sparse_shape_zyx(self) -> list[int]:
        """The spconv spatial shape (z, y, x)."""
        x, y, z = self.grid_xyz
        return [z, y, x]

    def voxelize_one(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sample: (features (V, C), coords (V, 3) int32 as (z, y, x), num_points (V,))."""
        if points.ndim != 2 or points.shape[1] < 3:
            raise ValueError(f"points must have shape (N, >=3), got {tuple(points.shape)}")
        c = points.shape[1]
        idx_xyz = torch.floor((points[:, :3] - self.range_min) / self.voxel_size).long()  # (N, 3)
        grid = torch.tensor(self.grid_xyz, device=points.device)
        inside = ((idx_xyz >= 0) & (idx_xyz < grid)).all(dim=1)
        if self.strict_range:
            xyz = points[:, :3].to(self.range_min.dtype)
            inside &= ((xyz > self.range_min) & (xyz < self.range_max)).all(dim=1)
        pts, idx_xyz = points[inside], idx_xyz[inside]
        if len(pts) == 0:
            return points.new_zeros((0, c)), torch.zeros((0, 3), dtype=torch.int32, device=points.device), \
                torch.zeros(0, dtype=torch.long, device=points.device)
        gx, gy, _ = self.grid_xyz
        linear = (idx_xyz[:, 2] * gy + idx_xyz[:, 1]) * gx + idx_xyz[:, 0]
        # Voxel id = rank of the voxel's first point: unique() sorts by linear index, so re-rank by first index.
        uniq, inverse = torch.unique(linear, return_inverse=True)
        n = len(pts)
        order = torch.arange(n, device=pts.device)
        first = torch.full((len(uniq),), n, dtype=torch.long, device=pts.device).scatter_reduce(
            0, inverse, order, reduce="amin")
        rank_of_uniq = torch.empty_like(first)
        rank_of_uniq[torch.argsort(first)] = torch.arange(len(uniq), device=pts.device)
        voxel_id = rank_of_uniq[inverse]  # (n,) voxel number in first-appearance order
        # Position of each point within its voxel, in input order (a stable sort keeps it).
        sort_idx = torch.sort(voxel_id, stable=True).indices
        sorted_vid = voxel_id[sort_idx]
        counts = torch.bincount(sorted_vid, minlength=len(uniq))
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(voxel_id)
        slot[sort_idx] = torch.arange(n, device=pts.device) - starts[sorted_vid]
        keep = (slot < self.max_points_per_voxel) & (voxel_id < self.max_voxels)
        num_voxels = min(len(uniq), self.max_voxels)
        vid = voxel_id[keep]
        sums = pts.new_zeros((num_voxels, c)).index_add_(0, vid, pts[keep])
        num = torch.bincount(vid, minlength=num_voxels)
        feats = sums / num.unsqueeze(1).to(pts.dtype)
        coords_xyz = torch.zeros((num_voxels, 3), dtype=torch.long, device=pts.device)
        coords_xyz[vid] = idx_xyz[keep]
        return feats, coords_xyz.flip(1).int(), num

    def forward(self, points: Sequence[torch.Tensor]) -> VoxelBatch:
        feats, coords, nums = [], [], []
        for b, p in enumerate(points):
            f, c, n = self.voxelize_one(p)
            feats.append(f)
            coords.append(torch.cat([torch.full((len(c), 1), b, dtype=torch.int32, device=c.device), c], dim=1))
            nums.append(n)
        return VoxelBatch(features=torch.cat(feats), coords=torch.cat(coords), num_points=torch.cat(nums),
                          batch_size=len(points))
