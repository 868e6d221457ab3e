"""The published way to get distillation targets: the frozen LiDAR teacher run on every training batch.

Used by ``tigbev train-student --teacher online`` and the benchmarks that compare it with the cache. The teacher
and spconv are imported only when an :class:`OnlineTeacher` is built, so cache-mode training never loads them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tigbev.data.augment import similarity_apply_boxes, similarity_apply_xy
from tigbev.data.camera_batch import CameraBatch, TeacherTargets
from tigbev.data.camera_dataset import pad_box_keypoints
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.geometry import KEYPOINT_ENLARGE_M, KEYPOINT_GRID, box_keypoints_xy

__all__ = ["OnlineTeacher"]


class OnlineTeacher:
    """The published way: the frozen teacher runs on each batch's LiDAR (un-augmented key lidar frame).

    The points come with the batch (``CameraBatch.lidar_points``, read by the DataLoader workers when the dataset
    is given ``lidar_reader=online.reader``); a batch without them has its LiDAR read here, in the training process.
    """

    def __init__(self, checkpoint: Path, reader: NuScenesReader, device: torch.device):
        from tigbev.models.teacher.checkpoint import (
            load_teacher,  # imported only in online mode
        )
        from tigbev.models.teacher.frozen import FrozenTeacher

        model, self.cfg, self.ckpt = load_teacher(checkpoint, device)
        self.teacher = FrozenTeacher(model)
        self.reader = NuScenesReader(reader.dataroot, version=reader.version, num_sweeps=self.cfg.num_sweeps)
        self.device = device

    def targets(self, batch: CameraBatch, grid_size: int = KEYPOINT_GRID, enlarge_m: float = KEYPOINT_ENLARGE_M
                ) -> tuple[TeacherTargets, torch.Tensor]:
        points, kp_t, kp_s = [], [], []
        for i, (token, boxes, aug_from_lidar) in enumerate(zip(batch.tokens, batch.gt_boxes, batch.aug_from_lidar)):
            if batch.lidar_points is not None:
                points.append(batch.lidar_points[i].to(self.device))
            else:
                points.append(torch.from_numpy(self.reader.load_sample(token).lidar.points).to(self.device))
            aug_from_lidar = aug_from_lidar.cpu().double().numpy()
            raw = similarity_apply_boxes(np.linalg.inv(aug_from_lidar), boxes.cpu().double().numpy())  # un-augmented
            kp = box_keypoints_xy(raw, enlarge_m=enlarge_m, grid_size=grid_size)
            kp_t.append(torch.from_numpy(kp).float())
            kp_s.append(torch.from_numpy(similarity_apply_xy(aug_from_lidar, kp)).float())
        kt, ks, mask = pad_box_keypoints(kp_t, kp_s)
        fmap = self.teacher.features_for_loss(points)  # (B, C, H, W), the map only, an ordinary tensor
        targets = TeacherTargets(kp_teacher_xy=kt, kp_student_xy=ks, box_mask=mask, map_cells=None,
                                 map_features=fmap).to(self.device)
        return targets, fmap
