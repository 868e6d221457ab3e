"""BEV encoder (BEVDet's ResNetForBEVDet + FPN_LSS): residual stages at strides 2, 4, 8 of the BEV grid, then the
stride-8 map is upsampled onto the stride-2 map, fused, and brought back to the grid's own resolution.

Its output is the student's distilled map (``StudentOutput.bev_features``): nuscenes preset 256 ch on 128 x 128.
The last layer is a 1x1 conv without BN or ReLU, so the distilled features are not clipped at zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tigbev.models.student.neck import conv_bn_relu
from tigbev.models.student.resnet import BasicBlock, make_stage

__all__ = ["BevEncoder"]


class BevEncoder(nn.Module):
    """Pooled BEV context (B, C_in, H, W) -> (B, out_channels, H, W).

    ``stage_channels`` / ``stage_blocks``: one stride-2 residual stage each (BEVDet: 160, 320, 640 with 2 blocks).
    The FPN concatenates the first stage with the upsampled last one, mixes them with two 3x3 convs to
    ``fpn_channels``, upsamples x2 to the input resolution and ends with 3x3 (BN, ReLU) + 1x1 convs.
    """

    def __init__(self, in_channels: int, stage_channels: Sequence[int], stage_blocks: Sequence[int],
                 fpn_channels: int, out_channels: int):
        super().__init__()
        if len(stage_channels) < 2 or len(stage_channels) != len(stage_blocks):
            raise ValueError(f"BevEncoder needs >= 2 stages with one block count each, got {tuple(stage_channels)}"
                             f" and {tuple(stage_blocks)}")
        self.out_channels = out_channels
        c_in = in_channels
        stages = []
        for c, n_blocks in zip(stage_channels, stage_blocks, strict=True):
            stages.append(make_stage(BasicBlock, c_in, c, n_blocks, stride=2))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.fuse = nn.Sequential(conv_bn_relu(stage_channels[0] + stage_channels[-1], fpn_channels, 3),
                                  conv_bn_relu(fpn_channels, fpn_channels, 3))
        self.out = nn.Sequential(conv_bn_relu(fpn_channels, out_channels, 3), nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)  # strides 2, 4, 8, ... of the BEV grid
        first, last = feats[0], feats[-1]
        up = F.interpolate(last, size=first.shape[-2:], mode="bilinear", align_corners=False)
        y = self.fuse(torch.cat([first, up], dim=1))  # (B, fpn_channels, H/2, W/2)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.out(y)  # (B, out_channels, H, W)
