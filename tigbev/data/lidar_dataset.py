"""LiDAR-only samples for the teacher: multi-sweep points and GT boxes, with optional BEV augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from tigbev.data.augment import BevAugmentPolicy, BevTransform
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.data.targets import training_boxes

__all__ = ["LidarBatch", "LidarDetectionDataset", "LidarSample", "collate_lidar"]


@dataclass
class LidarSample:
    token: str
    points: torch.Tensor  # (N, 5) float32, augmented frame
    boxes: torch.Tensor  # (M, 9) float32, augmented frame
    labels: torch.Tensor  # (M,) int64 class index
    bda: BevTransform


@dataclass
class LidarBatch:
    tokens: list[str]
    points: list[torch.Tensor]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    bda: list[BevTransform]

    def to(self, device: torch.device) -> "LidarBatch":
        return LidarBatch(self.tokens, [p.to(device, non_blocking=True) for p in self.points],
                          [b.to(device) for b in self.boxes], [lb.to(device) for lb in self.labels], self.bda)


class LidarDetectionDataset(Dataset):
    """Samples of one split. ``augment`` draws a fresh BEV transform per access from ``seed`` and the index."""

    def __init__(self, reader: NuScenesReader, tokens: Sequence[str], point_range_m: Sequence[float], *,
                 augment: BevAugmentPolicy | None = None, seed: int = 0):
        self.reader = reader
        self.tokens = list(tokens)
        self.point_range_m = tuple(point_range_m)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation depends on (seed, epoch, index): reproducible, and different every epoch."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> LidarSample:
        frame = self.reader.load_sample(self.tokens[i])
        boxes, labels = training_boxes(frame, self.point_range_m)
        points = frame.lidar.points
        bda = BevTransform()
        if self.augment is not None:
            bda = self.augment.sample(np.random.default_rng([self.seed, self.epoch, i]))
            points = bda.apply_points(points)
            boxes = bda.apply_boxes(boxes)
        return LidarSample(token=frame.token, points=torch.from_numpy(np.ascontiguousarray(points, np.float32)),
                           boxes=torch.from_numpy(boxes.astype(np.float32)),
                           labels=torch.from_numpy(labels.astype(np.int64)), bda=bda)


def collate_lidar(samples: Sequence[LidarSample]) -> LidarBatch:
    return LidarBatch(tokens=[s.token for s in samples], points=[s.points for s in samples],
                      boxes=[s.boxes for s in samples], labels=[s.labels for s in samples],
                      bda=[s.bda for s in samples])
