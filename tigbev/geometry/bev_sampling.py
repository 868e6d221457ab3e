"""Bilinear sampling of BEV maps at metric points: one definition shared by extraction, losses and tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tigbev.geometry import BevGrid

__all__ = ["sample_bev"]


def sample_bev(bev: torch.Tensor, xy: torch.Tensor, grid: BevGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of maps (B, C, H, W) at metric points (B, N, 2) -> ((B, N, C), valid (B, N) bool).

    Cell centres carry the cell's value (``align_corners=False``), so maps of different resolution over the same
    range are read at the same physical points. Points outside the grid's rectangle are marked invalid (their
    features are whatever zero padding gives, and must be masked by the caller).
    """
    if bev.ndim != 4 or xy.ndim != 3 or xy.shape[-1] != 2 or xy.shape[0] != bev.shape[0]:
        raise ValueError(f"need bev (B, C, H, W) and xy (B, N, 2), got {tuple(bev.shape)} and {tuple(xy.shape)}")
    gx = 2.0 * (xy[..., 0] - grid.x_min_m) / (grid.x_max_m - grid.x_min_m) - 1.0
    gy = 2.0 * (xy[..., 1] - grid.y_min_m) / (grid.y_max_m - grid.y_min_m) - 1.0
    coords = torch.stack([gx, gy], dim=-1).unsqueeze(1).to(bev.dtype)  # (B, 1, N, 2); x indexes W, y indexes H
    feats = F.grid_sample(bev, coords, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, 1, N)
    valid = (xy[..., 0] >= grid.x_min_m) & (xy[..., 0] < grid.x_max_m) & (xy[..., 1] >= grid.y_min_m) \
        & (xy[..., 1] < grid.y_max_m)
    return feats[:, :, 0].transpose(1, 2), valid
