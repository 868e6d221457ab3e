"""The published way to get distillation targets: the frozen LiDAR teacher run on every training batch.

Used by ``tigbev train-student --teacher online`` and the benchmarks that compare it with the cache. The teacher
and spconv are imported only when an :class:`OnlineTeacher` is built, so cache-mode training never loads them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tigbev.data.camera_batch import CameraBatch, TeacherTargets
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.errors import TigbevError

__all__ = ["OnlineTeacher"]


class OnlineTeacher:
    """The published way: the frozen teacher runs on each batch's LiDAR moved by the batch's BEV augmentation, so
    its map lives in the augmented frame the student predicts in (the frame the batch's targets name:
    ``TeacherTargets.map_from_lidar``, which the loader sets to the BDA).

    The points come with the batch (``CameraBatch.lidar_points``, read by the DataLoader workers when the dataset
    is given ``lidar_reader=online.reader``); a batch without them has its LiDAR read here, in the training process.
    """

    def __init__(self, checkpoint: Path | None, reader: NuScenesReader, device: torch.device,
                 factory: str | None = None):
        from tigbev.models.teacher.protocol import (  # imported only in online mode
            check_bev_map,
            load_bev_teacher,
            reader_options,
        )

        self._check_map = check_bev_map
        self.teacher = load_bev_teacher(checkpoint, device, factory)
        self.grid, self.channels = self.teacher.grid, self.teacher.channels
        self.reader = NuScenesReader(reader.dataroot, version=reader.version, **reader_options(self.teacher))
        self.device = device

    def targets(self, batch: CameraBatch) -> tuple[TeacherTargets, torch.Tensor]:
        """The teacher map of each sample, from its LiDAR moved into the frame of the batch's targets
        (``map_from_lidar``: the BDA for batches laid with ``CameraDetectionDataset(online_keypoints=...)``, the
        identity without augmentation or when None), with the batch's own keypoints in that frame. Returns the
        targets (the batch's keypoints with this map, dense) and the map (B, C, H, W)."""
        if batch.teacher is None:
            raise TigbevError(f"samples {batch.tokens} have no keypoints: the online teacher needs the loader's "
                              "(CameraDetectionDataset(online_keypoints=(grid_size, enlarge_m)))")
        frames = batch.teacher.map_from_lidar
        points = []
        for i, token in enumerate(batch.tokens):
            if batch.lidar_points is not None:
                p = batch.lidar_points[i].to(self.device)
            else:
                p = torch.from_numpy(self.reader.load_sample(token).lidar.points).to(self.device)
            points.append(p if frames is None else _move_points(p, frames[i].to(self.device)))
        fmap = self.teacher.bev_map(points).clone()  # (B, C, H, W), the map only, as an ordinary tensor
        self._check_map(self.teacher, fmap, len(points), f"samples {batch.tokens}")
        targets = dataclasses.replace(batch.teacher.to(self.device), map_cells=None, map_features=fmap)
        return targets, fmap


def _move_points(points: torch.Tensor, map_from_lidar: torch.Tensor) -> torch.Tensor:
    """Points (P, >= 3) with xyz through the 3x3 part of a similarity (float64 products, the dtype kept), the other
    columns unchanged; the identity returns the points themselves (bit for bit)."""
    m = map_from_lidar.double()[:3, :3]
    if torch.equal(m, torch.eye(3, dtype=m.dtype, device=m.device)):
        return points
    out = points.clone()
    out[:, :3] = (points[:, :3].double() @ m.T).to(points.dtype)
    return out
