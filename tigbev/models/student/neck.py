"""Image neck: the backbone's stride-16 and stride-32 maps fused into one stride-16 map (BEVDet's FPN_LSS design).

The stride-32 map is upsampled bilinearly to the stride-16 map's size (``size=``, so odd feature sizes such as
ceil(H / 32) * 2 != ceil(H / 16) still line up), concatenated, and mixed by a 1x1 and a 3x3 conv (BN + ReLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageNeck", "conv_bn_relu"]


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ImageNeck(nn.Module):
    """(stride-16 map (M, C16, h, w), stride-32 map (M, C32, h', w')) -> (M, out_channels, h, w)."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.fuse = nn.Sequential(conv_bn_relu(sum(in_channels), out_channels, 1),
                                  conv_bn_relu(out_channels, out_channels, 3))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        fine, coarse = feats
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([fine, up], dim=1))  # (M, out_channels, h, w)
