"""CenterPoint, the LiDAR teacher: voxelizer -> sparse encoder -> SECOND -> SECOND-FPN -> CenterHead.

The SECOND-FPN output, ``TeacherOutput.bev_features`` (B, C, H, W) on ``TeacherConfig.bev_grid``, is the map the
camera student distils (nuscenes preset: 512 ch, 128 x 128, 0.8 m cells).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tigbev.geometry import NUSCENES_POINT_RANGE_M, BevGrid
from tigbev.models.heads import (
    NUSCENES_NMS_RADII_M,
    NUSCENES_TASKS,
    CenterHead,
    CenterHeadConfig,
)
from tigbev.models.spconv_compat import set_conv_algo

MMDET3D_POST_CENTER_RANGE_M: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
"""``post_center_range`` of mmdetection3d's centerpoint_01voxel_second_secfpn nuScenes config."""
from tigbev.models.teacher.backbone import SecondBackbone, SecondFpn, SparseEncoder
from tigbev.models.teacher.voxelizer import Voxelizer

__all__ = ["CenterPoint", "TeacherConfig", "TeacherOutput", "teacher_preset"]


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """Architecture of the CenterPoint teacher."""

    point_range_m: tuple[float, float, float, float, float, float] = NUSCENES_POINT_RANGE_M
    """(x_min, y_min, z_min, x_max, y_max, z_max) in the lidar frame."""
    voxel_size_m: tuple[float, float, float] = (0.1, 0.1, 0.2)
    max_points_per_voxel: int = 10
    max_voxels: int = 120_000
    num_sweeps: int = 10
    """LiDAR sweeps per sample, the key sweep included (time lag is the 5th point feature)."""
    point_features: int = 5
    """x, y, z, intensity, time lag."""
    base_channels: int = 16
    encoder_channels: tuple[tuple[int, ...], ...] = ((16, 16, 32), (32, 32, 64), (64, 64, 128), (128, 128))
    encoder_paddings: tuple[tuple[Any, ...], ...] = ((0, 0, 1), (0, 0, 1), (0, 0, (0, 1, 1)), (0, 0))
    encoder_out_channels: int = 128
    second_channels: tuple[int, ...] = (128, 256)
    second_layers: tuple[int, ...] = (5, 5)
    second_strides: tuple[int, ...] = (1, 2)
    fpn_channels: tuple[int, ...] = (256, 256)
    fpn_strides: tuple[int, ...] = (1, 2)
    tasks: tuple[tuple[str, ...], ...] = NUSCENES_TASKS
    nms_radii_m: tuple[float, ...] = NUSCENES_NMS_RADII_M
    head_share_channels: int = 64
    head_channels: int = 64
    # How points are loaded and boxes decoded. The nuscenes preset takes mmdetection3d's published test
    # configuration of this model (what imported weights were evaluated with); the defaults keep tigbev's own.
    peak_filter: bool = True
    """3x3 max-pool peak filter on the heatmap before top-k (mmdet3d's ``max_pool_nms``; off in its nuScenes test
    config, which uses circle NMS only)."""
    post_center_range_m: tuple[float, ...] | None = None
    """Drop decoded boxes whose centre lies outside (x0, y0, z0, x1, y1, z1) (mmdet3d's ``post_center_range``)."""
    strict_range: bool = False
    """Keep only points strictly inside ``point_range_m`` (mmdet3d's ``PointsRangeFilter``)."""
    sweeps_remove_close_m: float = 0.0
    """Drop earlier-sweep points with |x| and |y| both below this, in the sweep's own frame (mmdet3d's
    ``remove_close``, radius 1.0); 0: keep them."""
    pad_empty_sweeps: bool = False
    """A sample without earlier sweeps (a scene's first) gets its key sweep repeated ``num_sweeps - 1`` times with
    time lag 0 (mmdet3d's ``pad_empty_sweeps``)."""

    def __post_init__(self) -> None:
        if self.num_sweeps < 1:
            raise ValueError(f"TeacherConfig.num_sweeps must be >= 1, got {self.num_sweeps}")
        if len(self.second_channels) != len(self.fpn_channels):
            raise ValueError("TeacherConfig.fpn_channels needs one entry per SECOND stage")
        # The BEV stride must land the map on whole cells.
        _ = self.bev_grid

    @property
    def stride(self) -> int:
        """Downsampling from voxels to the BEV map: 2 per strided sparse stage, times SECOND / FPN net stride."""
        # The FPN brings every SECOND stage to the first stage's stride.
        return 2 ** (len(self.encoder_channels) - 1) * self.second_strides[0]

    @property
    def bev_grid(self) -> BevGrid:
        """Grid of ``bev_features``: the point range at voxel size x stride (0.1 m x 8 = 0.8 m for nuscenes)."""
        x0, y0, _, x1, y1, _ = self.point_range_m
        return BevGrid(x_min_m=x0, x_max_m=x1, y_min_m=y0, y_max_m=y1, cell_m=self.voxel_size_m[0] * self.stride)

    @property
    def bev_channels(self) -> int:
        return sum(self.fpn_channels)

    def reader_options(self) -> dict[str, Any]:
        """How this teacher's points are read: ``NuScenesReader(dataroot, **cfg.reader_options())``."""
        return {"num_sweeps": self.num_sweeps, "remove_close_m": self.sweeps_remove_close_m,
                "pad_empty_sweeps": self.pad_empty_sweeps}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherConfig":
        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list | tuple) else v

        return cls(**{k: tup(v) for k, v in d.items()})


def teacher_preset(name: str) -> TeacherConfig:
    """``nuscenes``: CenterPoint 0.1 m voxels, SECOND, SECFPN (METHOD.md section 2). ``demo``: the same design,
    sized for CPU training (0.2 m voxels, 3 sweeps, a leaner sparse encoder, fewer channels; 256-ch 64 x 64 map
    at 1.6 m)."""
    match name:
        case "nuscenes":
            return TeacherConfig(peak_filter=False, post_center_range_m=MMDET3D_POST_CENTER_RANGE_M,
                                 strict_range=True, sweeps_remove_close_m=1.0, pad_empty_sweeps=True)
        case "demo":
            return TeacherConfig(
                voxel_size_m=(0.2, 0.2, 0.2), max_voxels=60_000, num_sweeps=3,
                # One strided sparse conv per stage and a single residual block at the end: on the CPU, spconv's
                # submanifold convolutions dominate the step, and the synthetic world needs no deeper encoder.
                encoder_channels=((32,), (64,), (64,), (64,)), encoder_paddings=((1,), (1,), ((0, 1, 1),), (0,)),
                encoder_out_channels=64, second_channels=(64, 128), second_layers=(3, 3), second_strides=(1, 2),
                fpn_channels=(128, 128), fpn_strides=(1, 2), head_share_channels=32, head_channels=16,
            )
    raise ValueError(f"unknown teacher preset {name!r}; choose 'demo' or 'nuscenes'")


@dataclass
class TeacherOutput:
    """``bev_features``: the distilled map (B, C, H, W) on ``TeacherConfig.bev_grid``; ``preds``: head outputs."""

    bev_features: torch.Tensor
    preds: list[dict[str, torch.Tensor]]


class CenterPoint(nn.Module):
    """The LiDAR detector. ``forward(points)`` takes one (N, 5) tensor per sample, in the key lidar frame."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.voxelizer = Voxelizer(cfg.point_range_m, cfg.voxel_size_m, cfg.max_points_per_voxel, cfg.max_voxels,
                                   strict_range=cfg.strict_range)
        z_cells = self.voxelizer.sparse_shape_zyx[0] + 1  # mmdetection3d pads z by one cell (41 for 8 m / 0.2 m)
        self.sparse_shape = [z_cells, *self.voxelizer.sparse_shape_zyx[1:]]
        self.middle_encoder = SparseEncoder(cfg.point_features, self.sparse_shape, cfg.base_channels,
                                            cfg.encoder_channels, cfg.encoder_paddings, cfg.encoder_out_channels)
        z_out = self._encoder_height_cells()
        self.backbone = SecondBackbone(cfg.encoder_out_channels * z_out, cfg.second_channels, cfg.second_layers,
                                       cfg.second_strides)
        self.neck = SecondFpn(cfg.second_channels, cfg.fpn_channels, cfg.fpn_strides)
        self.head = CenterHead(CenterHeadConfig(
            in_channels=self.neck.out_channels, grid=cfg.bev_grid, tasks=cfg.tasks, nms_radii_m=cfg.nms_radii_m,
            share_channels=cfg.head_share_channels, head_channels=cfg.head_channels, peak_filter=cfg.peak_filter,
            post_center_range_m=cfg.post_center_range_m,
        ))

    def _encoder_height_cells(self) -> int:
        z = self.sparse_shape[0]
        for i, blocks in enumerate(self.cfg.encoder_channels[:-1]):
            pad = self.cfg.encoder_paddings[i][len(blocks) - 1]
            pz = pad[0] if isinstance(pad, tuple | list) else pad
            z = (z + 2 * pz - 3) // 2 + 1
        return (z - 3) // 2 + 1  # conv_out: kernel 3, stride 2 in z, no padding

    def to(self, *args: Any, **kwargs: Any) -> "CenterPoint":  # type: ignore[override]
        moved = super().to(*args, **kwargs)
        set_conv_algo(moved, next(moved.parameters()).device)
        return moved

    def bev_map(self, points: list[torch.Tensor]) -> torch.Tensor:
        """The BEV feature map the head reads (and students distil), (B, C, H, W): everything but the head."""
        vox = self.voxelizer(points)
        bev = self.middle_encoder(vox.features, vox.coords, vox.batch_size)  # (B, C*D, H/8, W/8)
        return self.neck(self.backbone(bev))

    def forward(self, points: list[torch.Tensor]) -> TeacherOutput:
        bev_features = self.bev_map(points)
        return TeacherOutput(bev_features=bev_features, preds=self.head(bev_features))
