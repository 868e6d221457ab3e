"""ResNet image backbones (ResNet-18/34/50) with torchvision's parameter names, and a loader for its ImageNet weights.

Names are torchvision's ``resnet*`` names, key for key (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` / ``.1`` ...), so a torchvision state dict loads without a key map. There is no ``fc``
(the student needs feature maps, not logits), and layers deeper than the last requested output are not built.

``width`` scales every stage: layer ``k`` has ``width * 2**(k-1)`` planes (torchvision: 64), so a small CPU variant
keeps the ResNet-18 layout with fewer channels. Only ``width=64`` can load ImageNet weights.

Output strides: layer1 4, layer2 8, layer3 16, layer4 32 (stem conv stride 2, max-pool stride 2, then one
stride-2 block per later layer). Every strided op pads so an input side ``H`` gives ``ceil(H / stride)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from tigbev.checkpoint_file import CheckpointError, load_weights_only
from tigbev.errors import TigbevError

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNetName", "WeightsError", "load_torchvision_weights"]

ResNetName = Literal["resnet18", "resnet34", "resnet50"]


class WeightsError(TigbevError):
    """An ImageNet weight file that does not fit the backbone (missing, unexpected or mis-shaped tensors)."""


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's "ResNet v1.5"), 1x1 expand by 4, and a shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """torchvision's ``downsample``: a strided 1x1 conv + BN (keys ``downsample.0`` / ``.1``) where shapes change."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


def make_stage(block: type[BasicBlock | Bottleneck], in_channels: int, planes: int, blocks: int, stride: int
               ) -> nn.Sequential:
    """``blocks`` residual blocks; the first carries the stride and the channel change."""
    layers = [block(in_channels, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet_layout(name: ResNetName) -> tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]:
    """(block type, blocks per layer) of a torchvision ResNet."""
    match name:
        case "resnet18":
            return BasicBlock, (2, 2, 2, 2)
        case "resnet34":
            return BasicBlock, (3, 4, 6, 3)
        case "resnet50":
            return Bottleneck, (3, 4, 6, 3)
    raise ValueError(f"unknown ResNet {name!r}; choose 'resnet18', 'resnet34' or 'resnet50'")


class ResNet(nn.Module):
    """Images (B, 3, H, W) -> the feature maps of ``out_layers`` (1-based: layer ``k`` has stride ``2**(k+1)``)."""

    def __init__(self, name: ResNetName, *, width: int = 64, out_layers: Sequence[int] = (3, 4)):
        super().__init__()
        if not out_layers or sorted(set(out_layers)) != list(out_layers) or not set(out_layers) <= {1, 2, 3, 4}:
            raise ValueError(f"ResNet out_layers must be increasing layer numbers in 1..4, got {tuple(out_layers)}")
        if width < 1:
            raise ValueError(f"ResNet width must be >= 1, got {width}")
        block, blocks = resnet_layout(name)
        self.name, self.width, self.out_layers = name, width, tuple(out_layers)
        self.num_layers = max(out_layers)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = width
        self.layer_channels: list[int] = []
        for k in range(1, self.num_layers + 1):
            planes = width * 2 ** (k - 1)
            self.add_module(f"layer{k}", make_stage(block, c_in, planes, blocks[k - 1], 1 if k == 1 else 2))
            c_in = planes * block.expansion
            self.layer_channels.append(c_in)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a backbone trained from scratch starts where theirs does.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.layer_channels[k - 1] for k in self.out_layers)

    @property
    def out_strides(self) -> tuple[int, ...]:
        return tuple(2 ** (k + 1) for k in self.out_layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, width, H/4, W/4)
        outs = []
        for k in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{k}")(x)
            if k in self.out_layers:
                outs.append(x)
        return outs


def _skipped(key: str, num_layers: int) -> bool:
    """Keys of a torchvision file that have no counterpart by design: the classifier and layers not built."""
    if key.startswith("fc."):
        return True
    return any(key.startswith(f"layer{k}.") for k in range(num_layers + 1, 5))


def load_torchvision_weights(model: ResNet, path: str | os.PathLike[str]) -> None:
    """Load a torchvision-format ResNet state dict (e.g. ImageNet ``resnet50-*.pth``) from a local file into ``model``.

    Read with ``torch.load(weights_only=True)``. ``fc.*`` and the layers ``model`` does not build are ignored;
    ``num_batches_tracked`` may be absent (torchvision's older files lack it). Anything else missing, unexpected or
    of another shape raises ``WeightsError`` naming the keys; nothing is loaded then.
    """
    try:
        state = load_weights_only(path, what="backbone weight file")
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a torchvision state dict (a mapping of parameter names to tensors)")
    own = model.state_dict()
    given = {k: v for k, v in state.items() if not _skipped(k, model.num_layers)}
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in given.items() if k in own and v.shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors: {_some(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped tensors: {_some(shapes)}")
    if problems:
        raise WeightsError(f"{path} does not fit {model.name} (width {model.width}): " + "; ".join(problems))
    model.load_state_dict(given, strict=False)


def _some(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
