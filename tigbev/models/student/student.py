"""The camera student (BEVDet / BEVDepth): ResNet -> stride-16 neck -> LSS view transform -> BEV encoder -> CenterHead.

``CameraStudent.forward(batch)`` takes a ``CameraBatch`` (B samples x N cameras; with ``StudentConfig.frames`` > 1
also the earlier key frames' images, BEVDet4D) and returns ``StudentOutput``:
``bev_features`` (B, bev_channels, ny, nx) on ``StudentConfig.bev_grid`` in the augmented BEV frame (the map TiG-BEV
distils), ``depth_logits`` (B*N, D, h, w) at stride 16 (h = ceil(H / 16)), the grid the depth targets use, and the
CenterHead's per-task predictions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tigbev.data.camera_batch import CameraBatch
from tigbev.data.targets import DepthBins
from tigbev.geometry import BevGrid
from tigbev.models.heads import (
    NUSCENES_NMS_RADII_M,
    NUSCENES_TASKS,
    CenterHead,
    CenterHeadConfig,
)
from tigbev.models.student.bev_encoder import BevEncoder
from tigbev.models.student.lss import LssViewTransform
from tigbev.models.student.neck import ImageNeck
from tigbev.models.student.resnet import ResNet, ResNetName

__all__ = ["FEATURE_STRIDE", "CameraStudent", "StudentConfig", "StudentOutput", "student_preset"]

FEATURE_STRIDE = 16
"""Image pixels per depth / context cell: the neck fuses ResNet layer3 (stride 16) with layer4 (stride 32)."""

StudentVariant = Literal["bevdet", "bevdepth"]


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """Architecture of the camera student. Defaults are the nuscenes preset (METHOD.md section 3)."""

    variant: StudentVariant = "bevdepth"
    """``bevdet``: a plain 1x1 depth/context conv; ``bevdepth``: the camera-aware DepthNet (27-d camera vector)."""
    input_hw: tuple[int, int] = (256, 704)
    """(H, W) of the augmented input images in pixels."""
    backbone: ResNetName = "resnet50"
    backbone_width: int = 64
    """Planes of ResNet layer1 (torchvision: 64; layer k has width * 2**(k-1)). Only 64 loads ImageNet weights."""
    neck_channels: int = 512
    """Channels of the fused stride-16 image features."""
    context_channels: int = 80
    """Context channels lifted per depth bin (and so channels of the pooled BEV map)."""
    depth_min_m: float = 1.0
    depth_max_m: float = 60.0
    depth_step_m: float = 1.0
    """Depth bins ``[depth_min_m, depth_max_m)`` in steps of ``depth_step_m`` (TiG: 59 bins; BEVDepth: 2, 58, 0.5)."""
    depth_mid_channels: int = 512
    """Channels inside the camera-aware depth net (``bevdepth`` only)."""
    depth_blocks: int = 3
    """Residual blocks in the depth branch of the camera-aware depth net (``bevdepth`` only)."""
    x_min_m: float = -51.2
    x_max_m: float = 51.2
    y_min_m: float = -51.2
    y_max_m: float = 51.2
    cell_m: float = 0.8
    """The BEV grid (``bev_grid``), in the augmented lidar frame."""
    z_min_m: float = -5.0
    z_max_m: float = 3.0
    """Height range summed into the single BEV z bin (the teacher's point range; lidar z = 0 at the sensor)."""
    bev_stage_channels: tuple[int, ...] = (160, 320, 640)
    """BEV encoder stages (stride 2 each): BEVDepth's 2x, 4x, 8x the 80 context channels."""
    bev_stage_blocks: tuple[int, ...] = (2, 2, 2)
    bev_fpn_channels: int = 512
    """Channels of the BEV FPN's fusion convs (BEVDet: 2 x the output channels)."""
    bev_channels: int = 256
    """Channels of ``bev_features``, the distilled map, and of the head's input."""
    tasks: tuple[tuple[str, ...], ...] = NUSCENES_TASKS
    nms_radii_m: tuple[float, ...] = NUSCENES_NMS_RADII_M
    head_share_channels: int = 64
    head_channels: int = 64
    frames: int = 1
    """Key frames per sample (BEVDet4D / BEVDepth4D: 2): the earlier frames' images go through the same image
    branch without gradients, lift straight into the current frame (their extrinsics are from the current lidar
    frame), and their BEV context maps are concatenated to the current one before the BEV encoder."""

    def __post_init__(self) -> None:
        if self.variant not in ("bevdet", "bevdepth"):
            raise ValueError(f"StudentConfig.variant must be 'bevdet' or 'bevdepth', got {self.variant!r}")
        if self.backbone not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"StudentConfig.backbone must be resnet18, resnet34 or resnet50, got {self.backbone!r}")
        if len(self.input_hw) != 2 or min(self.input_hw) < FEATURE_STRIDE:
            raise ValueError(f"StudentConfig.input_hw must be (H, W) of at least {FEATURE_STRIDE} px each, got "
                             f"{self.input_hw}")
        for name in ("backbone_width", "neck_channels", "context_channels", "depth_mid_channels", "bev_fpn_channels",
                     "bev_channels", "head_share_channels", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"StudentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.frames < 1:
            raise ValueError(f"StudentConfig.frames must be >= 1 (the current key frame), got {self.frames}")
        if self.depth_blocks < 0:
            raise ValueError(f"StudentConfig.depth_blocks must be >= 0, got {self.depth_blocks}")
        if not self.z_max_m > self.z_min_m:
            raise ValueError(f"StudentConfig.z_max_m ({self.z_max_m}) must exceed z_min_m ({self.z_min_m})")
        if len(self.bev_stage_channels) < 2 or len(self.bev_stage_blocks) != len(self.bev_stage_channels):
            raise ValueError("StudentConfig.bev_stage_channels needs >= 2 stages and bev_stage_blocks one count each")
        if len(self.nms_radii_m) != len(self.tasks):
            raise ValueError(f"StudentConfig.nms_radii_m needs one radius per task ({len(self.tasks)})")
        # Build once so a bad range names its field here, not at model construction.
        _ = self.depth_bins, self.bev_grid

    @property
    def depth_bins(self) -> DepthBins:
        return DepthBins(d_min_m=self.depth_min_m, d_max_m=self.depth_max_m, step_m=self.depth_step_m)

    @property
    def bev_grid(self) -> BevGrid:
        return BevGrid(x_min_m=self.x_min_m, x_max_m=self.x_max_m, y_min_m=self.y_min_m, y_max_m=self.y_max_m,
                       cell_m=self.cell_m)

    @property
    def feature_hw(self) -> tuple[int, int]:
        """(h, w) of the depth and context maps: ceil of the input size over the stride of 16."""
        return math.ceil(self.input_hw[0] / FEATURE_STRIDE), math.ceil(self.input_hw[1] / FEATURE_STRIDE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentConfig":
        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list | tuple) else v

        return cls(**{k: tup(v) for k, v in d.items()})


def student_preset(name: Literal["demo", "nuscenes"], variant: StudentVariant = "bevdepth", frames: int = 1
                   ) -> StudentConfig:
    """``nuscenes``: TiG-BEV-R50 (METHOD.md section 3): 6 x 256 x 704 images, ResNet-50, 512-ch stride-16 neck,
    59 depth bins of 1 m, 80 context channels, 128 x 128 BEV at 0.8 m, 256-ch BEV features.

    ``demo``: the same design sized for 2 CPU cores: 128 x 352 input (the synthetic 480 x 270 images resized by
    0.733 to 352 x 198 and cropped to the bottom 128 rows), a ResNet-18 at half width (32 planes in layer1), 64 context
    channels, the same 59 depth bins, and the demo teacher's grid (64 x 64 cells of 1.6 m) so student and teacher
    maps align cell for cell.
    """
    match name:
        case "nuscenes":
            return StudentConfig(variant=variant, frames=frames)
        case "demo":
            return StudentConfig(
                variant=variant, input_hw=(128, 352), backbone="resnet18", backbone_width=32, neck_channels=128,
                context_channels=64, depth_mid_channels=64, depth_blocks=1, cell_m=1.6,
                bev_stage_channels=(64, 128, 256), bev_stage_blocks=(1, 1, 1), bev_fpn_channels=128,
                bev_channels=128, head_share_channels=32, head_channels=16, frames=frames,
            )
    raise ValueError(f"unknown student preset {name!r}; choose 'demo' or 'nuscenes'")


@dataclass
class StudentOutput:
    bev_features: torch.Tensor  # (B, bev_channels, ny, nx) the distilled map, augmented BEV frame
    depth_logits: torch.Tensor  # (B*N, D, h, w) per feature cell, softmax over D gives the depth distribution
    preds: list[dict[str, torch.Tensor]]  # CenterHead outputs per task group


class CameraStudent(nn.Module):
    """Multi-camera BEV detector. ``forward(batch)`` -> ``StudentOutput``; ``self.head`` is the shared CenterHead."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(cfg.backbone, width=cfg.backbone_width, out_layers=(3, 4))  # strides 16, 32
        self.neck = ImageNeck(self.backbone.out_channels, cfg.neck_channels)
        self.view_transform = LssViewTransform(
            variant=cfg.variant, in_channels=cfg.neck_channels, context_channels=cfg.context_channels,
            bins=cfg.depth_bins, grid=cfg.bev_grid, z_range_m=(cfg.z_min_m, cfg.z_max_m), stride=FEATURE_STRIDE,
            mid_channels=cfg.depth_mid_channels, depth_blocks=cfg.depth_blocks,
        )
        self.bev_encoder = BevEncoder(cfg.context_channels * cfg.frames, cfg.bev_stage_channels, cfg.bev_stage_blocks,
                                      cfg.bev_fpn_channels, cfg.bev_channels)
        self.head = CenterHead(CenterHeadConfig(
            in_channels=cfg.bev_channels, grid=cfg.bev_grid, tasks=cfg.tasks, nms_radii_m=cfg.nms_radii_m,
            share_channels=cfg.head_share_channels, head_channels=cfg.head_channels,
        ))

    @property
    def depth_bins(self) -> DepthBins:
        return self.cfg.depth_bins

    def forward(self, batch: CameraBatch) -> StudentOutput:
        images = batch.images
        if images.ndim != 5 or images.shape[2] != 3 or tuple(images.shape[-2:]) != self.cfg.input_hw:
            raise ValueError(f"CameraStudent expects images (B, N, 3, {self.cfg.input_hw[0]}, {self.cfg.input_hw[1]})"
                             f", got {tuple(images.shape)}")
        b, n = images.shape[:2]
        for name, shape in (("intrinsics", (b, n, 3, 3)), ("cam_from_lidar", (b, n, 4, 4)),
                            ("aug_px_from_px", (b, n, 3, 3)), ("aug_from_lidar", (b, 4, 4))):
            if tuple(getattr(batch, name).shape) != shape:
                raise ValueError(f"CameraBatch.{name} must be {shape}, got {tuple(getattr(batch, name).shape)}")
        if batch.frames != self.cfg.frames:
            raise ValueError(f"CameraStudent has {self.cfg.frames} key frame(s) per sample, the batch "
                             f"{batch.frames} (CameraDetectionDataset(frames=...) must match StudentConfig.frames)")
        vt = self._lift(images, batch.intrinsics, batch.cam_from_lidar, batch)
        bev = [vt.bev]
        if self.cfg.frames > 1:
            # BEVDet4D: the earlier frames are seen, not learned from (no gradients), and lie in the current frame.
            with torch.no_grad():
                for t in range(self.cfg.frames - 1):
                    bev.append(self._lift(batch.prev_images[:, t], batch.prev_intrinsics[:, t],
                                          batch.prev_cam_from_lidar[:, t], batch).bev)
        bev_features = self.bev_encoder(torch.cat(bev, dim=1))  # (B, bev_channels, ny, nx)
        return StudentOutput(bev_features=bev_features, depth_logits=vt.depth_logits, preds=self.head(bev_features))

    def _lift(self, images: torch.Tensor, intrinsics: torch.Tensor, cam_from_lidar: torch.Tensor,
              batch: CameraBatch) -> Any:
        """One key frame's images (B, N, 3, H, W) -> its BEV context map in the batch's augmented frame."""
        feats = self.neck(self.backbone(images.flatten(0, 1)))  # (B*N, neck_channels, h, w)
        return self.view_transform(feats, intrinsics=intrinsics, cam_from_lidar=cam_from_lidar,
                                   aug_px_from_px=batch.aug_px_from_px, aug_from_lidar=batch.aug_from_lidar,
                                   image_hw=self.cfg.input_hw)
