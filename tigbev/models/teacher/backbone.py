"""CenterPoint's LiDAR backbone: sparse 3D encoder (spconv), height compression, SECOND 2D backbone, SECOND-FPN.

Module and parameter names mirror mmdetection3d's SparseEncoder / SECOND / SECONDFPN so that its checkpoints map
onto these modules key for key (tigbev/models/teacher/mmdet3d_weights.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tigbev.models.spconv_compat import SparseConvTensor, spconv, to_dense

__all__ = ["SecondBackbone", "SecondFpn", "SparseEncoder"]

# BatchNorm settings of the published CenterPoint (mmdetection3d: eps 1e-3, momentum 0.01).
_BN3D = {"eps": 1e-3, "momentum": 0.01}


def _sparse_block(c_in: int, c_out: int, kernel: int | tuple[int, ...], *, stride: int | tuple[int, ...] = 1,
                  padding: int | tuple[int, ...] = 0, indice_key: str, subm: bool) -> spconv.SparseSequential:
    conv_cls = spconv.SubMConv3d if subm else spconv.SparseConv3d
    kwargs = {} if subm else {"stride": stride}
    return spconv.SparseSequential(
        conv_cls(c_in, c_out, kernel, padding=padding, bias=False, indice_key=indice_key, **kwargs),
        nn.BatchNorm1d(c_out, **_BN3D),
        nn.ReLU(inplace=True),
    )


class SparseBasicBlock(spconv.SparseModule):
    """Residual block of two 3x3x3 submanifold convolutions (sparsity pattern unchanged)."""

    def __init__(self, channels: int, indice_key: str):
        super().__init__()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn1 = nn.BatchNorm1d(channels, **_BN3D)
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn2 = nn.BatchNorm1d(channels, **_BN3D)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        identity = x.features
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.relu(self.bn2(out.features) + identity))
        return out


class SparseEncoder(nn.Module):
    """Voxel features -> dense BEV features (B, C_out * D_out, H, W).

    Stage ``i`` runs ``len(encoder_channels[i]) - 1`` residual blocks, then (except the last stage) a stride-2
    sparse convolution; ``conv_out`` then halves the height once more with a (3, 1, 1) kernel, and the remaining
    height cells are folded into channels (height compression). nuscenes preset: 41 x 1024 x 1024 voxels ->
    128 ch x 2 height cells x 128 x 128 = 256-ch BEV at stride 8.
    """

    def __init__(self, in_channels: int, sparse_shape_zyx: Sequence[int], base_channels: int,
                 encoder_channels: Sequence[Sequence[int]], encoder_paddings: Sequence[Sequence[int | Sequence[int]]],
                 output_channels: int):
        super().__init__()
        self.sparse_shape = list(sparse_shape_zyx)
        self.conv_input = _sparse_block(in_channels, base_channels, 3, padding=1, indice_key="subm1", subm=True)
        layers = []
        c_in = base_channels
        for i, blocks in enumerate(encoder_channels):
            stage = []
            for j, c_out in enumerate(blocks):
                last_stage = i == len(encoder_channels) - 1
                if j == len(blocks) - 1 and not last_stage:
                    pad = encoder_paddings[i][j]
                    stage.append(_sparse_block(c_in, c_out, 3, stride=2, padding=tuple(pad) if isinstance(pad, Sequence)
                                               else pad, indice_key=f"spconv{i + 1}", subm=False))
                else:
                    stage.append(SparseBasicBlock(c_out, indice_key=f"subm{i + 1}"))
                c_in = c_out
            layers.append(spconv.SparseSequential(*stage))
        self.encoder_layers = spconv.SparseSequential(*layers)
        self.conv_out = _sparse_block(c_in, output_channels, (3, 1, 1), stride=(2, 1, 1), padding=0,
                                      indice_key="spconv_down2", subm=False)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int) -> torch.Tensor:
        x = SparseConvTensor(features, coords, self.sparse_shape, batch_size)
        x = self.conv_input(x)
        x = self.encoder_layers(x)
        x = self.conv_out(x)
        dense = to_dense(x)  # (B, C, D, H, W)
        b, c, d, h, w = dense.shape
        return dense.reshape(b, c * d, h, w)  # height folded into channels


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out, **_BN3D), nn.ReLU(inplace=True)]


class SecondBackbone(nn.Module):
    """SECOND's 2D backbone: stages of 3x3 convolutions, each starting with a (possibly strided) conv."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], layer_nums: Sequence[int],
                 layer_strides: Sequence[int]):
        super().__init__()
        blocks = []
        c_in = in_channels
        for c_out, n, s in zip(out_channels, layer_nums, layer_strides, strict=True):
            layers = _conv_bn_relu(c_in, c_out, s)
            for _ in range(n):
                layers += _conv_bn_relu(c_out, c_out)
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


class SecondFpn(nn.Module):
    """Brings every backbone stage to one stride (transposed conv, or 1x1 conv at stride 1) and concatenates."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], upsample_strides: Sequence[int]):
        super().__init__()
        deblocks = []
        for c_in, c_out, s in zip(in_channels, out_channels, upsample_strides, strict=True):
            up = (nn.ConvTranspose2d(c_in, c_out, s, stride=s, bias=False) if s > 1
                  else nn.Conv2d(c_in, c_out, 1, bias=False))
            deblocks.append(nn.Sequential(up, nn.BatchNorm2d(c_out, **_BN3D), nn.ReLU(inplace=True)))
        self.deblocks = nn.ModuleList(deblocks)
        self.out_channels = sum(out_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([d(f) for d, f in zip(self.deblocks, feats, strict=True)], dim=1)
