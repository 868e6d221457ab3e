"""The typed batch a camera student trains on (stage two). Shapes are per batch of B samples with N cameras.

Frames: ``cam_from_lidar`` maps the un-augmented key lidar frame to each camera; ``aug_px_from_px`` maps original image
pixels to augmented input pixels (homogeneous 2D: [u', v', 1]^T = aug_px_from_px @ [u, v, 1]^T);
``aug_from_lidar`` maps the un-augmented lidar frame to the augmented BEV frame the student predicts in (4x4, a
similarity about z, the BEV data augmentation or BDA). Boxes, ``kp_student_xy`` and ``gt_boxes`` are in the augmented
BEV frame; ``kp_teacher_xy`` and the teacher map cells are in the teacher map's frame ``map_from_lidar`` (identity: a
canonical cache's un-augmented frame; a stored flip or draw; the BDA itself for the online teacher), so one keypoint
index names the same physical point in both maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

__all__ = ["CameraBatch", "TeacherTargets"]


@dataclass(frozen=True)
class TeacherTargets:
    """Distillation targets of a batch (from the cache, or from the online teacher)."""

    kp_teacher_xy: torch.Tensor  # (B, M, K, 2) float32 metric, the teacher map's frame (map_from_lidar)
    kp_student_xy: torch.Tensor  # (B, M, K, 2) float32 metric, augmented BEV frame (aug_from_lidar applied)
    box_mask: torch.Tensor  # (B, M) bool, False for padding
    map_cells: torch.Tensor | None  # (B, F) int64 flat cell index iy * W + ix, -1 for padding; None: dense map
    map_features: torch.Tensor | None
    """(B, F, C) float16/float32 sparse cells, or (B, C, H, W) dense teacher map; None: keypoints for the online
    teacher, which computes the map (:meth:`OnlineTeacher.targets <tigbev.engine.online_teacher.OnlineTeacher>`)."""
    map_from_lidar: torch.Tensor | None = None
    """(B, 4, 4) float32: the teacher map's frame from the un-augmented lidar frame; None: the identity."""

    def to(self, device: torch.device) -> TeacherTargets:
        return TeacherTargets(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                 for f in fields(self)})

    def dense_map(self, height: int, width: int) -> torch.Tensor:
        """(B, C, H, W) float32 teacher map, zeros where no cell is stored."""
        if self.map_features is None:
            raise ValueError("these teacher targets hold keypoints only: the online teacher computes the map")
        if self.map_cells is None:
            return self.map_features.float()
        b, _, c = self.map_features.shape
        out = self.map_features.new_zeros((b, c, height * width), dtype=torch.float32)
        for i in range(b):
            keep = self.map_cells[i] >= 0
            out[i][:, self.map_cells[i][keep]] = self.map_features[i][keep].float().T
        return out.reshape(b, c, height, width)

    def stored_mask(self, height: int, width: int) -> torch.Tensor:
        """(B, 1, H, W) float32: 1 where the teacher map holds a stored value (everywhere for a dense map)."""
        if self.map_features is None:
            raise ValueError("these teacher targets hold keypoints only: the online teacher computes the map")
        b = self.map_features.shape[0]
        if self.map_cells is None:
            return self.map_features.new_ones((b, 1, height, width), dtype=torch.float32)
        out = self.map_features.new_zeros((b, height * width), dtype=torch.float32)
        for i in range(b):
            cells = self.map_cells[i]
            out[i, cells[cells >= 0]] = 1.0
        return out.reshape(b, 1, height, width)


@dataclass(frozen=True)
class CameraBatch:
    tokens: list[str]
    images: torch.Tensor  # (B, N, 3, H, W) float32, normalised (ImageNet mean/std)
    intrinsics: torch.Tensor  # (B, N, 3, 3) original-image intrinsics
    cam_from_lidar: torch.Tensor  # (B, N, 4, 4)
    aug_px_from_px: torch.Tensor  # (B, N, 3, 3) original pixel -> augmented input pixel
    aug_from_lidar: torch.Tensor  # (B, 4, 4) un-augmented lidar -> augmented BEV frame
    gt_boxes: list[torch.Tensor]  # B x (M_i, 9) augmented BEV frame
    gt_labels: list[torch.Tensor]  # B x (M_i,) int64
    depth_m: torch.Tensor  # (B, N, h, w) nearest LiDAR depth per feature cell (0: none), h = ceil(H / stride)
    depth_box: torch.Tensor  # (B, N, h, w) int64 GT box index within the sample (-1: none)
    teacher: TeacherTargets | None = None
    lidar_points: list[torch.Tensor] | None = None
    """Online teacher only: B x (P_i, 5) float32 multi-sweep LiDAR (x, y, z m, intensity, time lag s) in the
    un-augmented key lidar frame, read by the DataLoader workers."""
    prev_images: torch.Tensor | None = None
    """Temporal students only: (B, T-1, N, 3, H, W) the earlier key frames' images, nearest first, through the
    current frame's image transforms (``aug_px_from_px``)."""
    prev_intrinsics: torch.Tensor | None = None  # (B, T-1, N, 3, 3)
    prev_cam_from_lidar: torch.Tensor | None = None
    """(B, T-1, N, 4, 4): each earlier camera from the *current* un-augmented key lidar frame (through the global
    frame, each sensor at its own time): the exact ego motion, so the earlier images lift into the current frame."""

    @property
    def frames(self) -> int:
        """Key frames in the batch: 1 plus the earlier ones."""
        return 1 if self.prev_images is None else 1 + self.prev_images.shape[1]

    def to(self, device: torch.device) -> CameraBatch:
        """Every tensor on ``device`` (to a GPU from pinned memory the copies run asynchronously, in stream order)."""
        device = torch.device(device)
        non_blocking = device.type == "cuda"  # never towards the CPU: the host could read before the copy lands
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CameraBatch:
        """Every tensor in page-locked memory: what ``DataLoader(pin_memory=True)`` calls in its pinning thread, so
        that the copy to the GPU overlaps the step."""
        return self._apply(lambda t: t.pin_memory())

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CameraBatch:
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = fn(v)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                v = [fn(t) for t in v]
            elif isinstance(v, TeacherTargets):
                v = TeacherTargets(**{g.name: None if getattr(v, g.name) is None else fn(getattr(v, g.name))
                                      for g in fields(v)})
            values[f.name] = v
        return CameraBatch(**values)
