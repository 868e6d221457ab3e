"""CenterHead (CenterPoint): class-group heatmaps plus box regression on a BEV map, for teacher and student alike.

Per task group (a few classes that share regression branches) the head predicts

- ``heatmap`` (B, n_cls, H, W): logits of object centres, trained with a Gaussian focal loss;
- ``reg`` (2): sub-cell offset of the centre from the cell's corner, in cells; ``height`` (1): centre z in metres;
  ``dim`` (3): log of (l, w, h); ``rot`` (2): (sin yaw, cos yaw); ``vel`` (2): (vx, vy) in m/s.

The 10 regression values in that order are what ``code_weights`` weight. The map is laid out as the BevGrid says
(rows = y, columns = x); decoded boxes are in the project layout (x, y, z, l, w, h, yaw, vx, vy) in the lidar frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tigbev.data.classes import DETECTION_CLASSES
from tigbev.geometry import BevGrid

__all__ = ["CenterHead", "CenterHeadConfig", "Detections", "HeadTargets", "NUSCENES_TASKS"]

# CenterPoint's nuScenes task groups and circle-NMS radii (metres; the published squared thresholds are
# 4, 12, 10, 1, 0.85 and 0.175 m^2).
NUSCENES_TASKS: tuple[tuple[str, ...], ...] = (
    ("car",),
    ("truck", "construction_vehicle"),
    ("bus", "trailer"),
    ("barrier",),
    ("motorcycle", "bicycle"),
    ("pedestrian", "traffic_cone"),
)
NUSCENES_NMS_RADII_M: tuple[float, ...] = tuple(math.sqrt(r) for r in (4.0, 12.0, 10.0, 1.0, 0.85, 0.175))
_REG_HEADS: tuple[tuple[str, int], ...] = (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2))
_HEATMAP_PRIOR_BIAS = -2.19  # sigmoid(-2.19) = 0.1: the focal-loss prior for rare positives


@dataclass(frozen=True, kw_only=True)
class CenterHeadConfig:
    """Shape, targets and decoding of a CenterHead."""

    in_channels: int
    """Channels of the BEV map the head reads."""
    grid: BevGrid
    """The metric grid of that map (its cell size is the head's output resolution)."""
    tasks: tuple[tuple[str, ...], ...] = NUSCENES_TASKS
    """Class groups sharing one set of regression branches."""
    share_channels: int = 64
    """Channels of the shared 3x3 convolution."""
    head_channels: int = 64
    """Channels of each branch's hidden 3x3 convolution."""
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    """Weights of the 10 regression values (offset 2, z, log size 3, sin/cos yaw, velocity 2)."""
    bbox_loss_weight: float = 0.25
    min_radius: int = 2
    """Smallest Gaussian radius (cells) drawn for a centre."""
    min_overlap: float = 0.1
    """IoU that a centre displaced by the Gaussian radius would still reach (CenterNet's radius rule)."""
    max_objects: int = 500
    """Regression targets per sample and task at most."""
    score_threshold: float = 0.1
    pre_max_size: int = 500
    """Top-k candidates per task before NMS (mmdetection3d's max_num)."""
    post_max_size: int = 83
    """Boxes per task kept after NMS."""
    nms_radii_m: tuple[float, ...] = NUSCENES_NMS_RADII_M
    """Circle-NMS radius per task (centre distance in metres)."""
    peak_filter: bool = True
    """Keep only 3x3 local maxima of the heatmap before top-k (CenterNet's NMS): a centre's neighbouring cells,
    which carry no trained regression, never become boxes even where the circle radius is below a cell."""
    post_center_range_m: tuple[float, ...] | None = None
    """Boxes whose centre (x, y, z) lies outside (x0, y0, z0, x1, y1, z1) are dropped before NMS (mmdet3d's
    ``post_center_range``, inclusive bounds); None: no such filter."""

    def __post_init__(self) -> None:
        if self.post_center_range_m is not None and len(self.post_center_range_m) != 6:
            raise ValueError("CenterHeadConfig.post_center_range_m needs (x0, y0, z0, x1, y1, z1)")
        flat = [c for t in self.tasks for c in t]
        unknown = [c for c in flat if c not in DETECTION_CLASSES]
        if unknown:
            raise ValueError(f"CenterHeadConfig.tasks: unknown classes {unknown}")
        if len(set(flat)) != len(flat):
            raise ValueError("CenterHeadConfig.tasks: a class appears in two task groups")
        if len(self.code_weights) != 10:
            raise ValueError(f"CenterHeadConfig.code_weights: need 10 values, got {len(self.code_weights)}")
        if len(self.nms_radii_m) != len(self.tasks):
            raise ValueError(f"CenterHeadConfig.nms_radii_m: need one radius per task ({len(self.tasks)})")


class ConvBnRelu(nn.Sequential):
    """3x3 conv (no bias) + BatchNorm + ReLU, named like mmcv's ConvModule (conv, bn) for checkpoint mapping."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.activate = nn.ReLU(inplace=True)


class SeparateHead(nn.Module):
    """One task group's branches: for each output a ConvBnRelu then a 3x3 conv to its channels."""

    def __init__(self, c_in: int, head_channels: int, num_classes: int):
        super().__init__()
        self.names = ("heatmap", *(n for n, _ in _REG_HEADS))
        for name, c_out in (("heatmap", num_classes), *_REG_HEADS):
            branch = nn.Sequential(ConvBnRelu(c_in, head_channels), nn.Conv2d(head_channels, c_out, 3, padding=1))
            setattr(self, name, branch)
        nn.init.constant_(self.heatmap[-1].bias, _HEATMAP_PRIOR_BIAS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(x) for name in self.names}


@dataclass
class HeadTargets:
    """Training targets of one task for a batch."""

    heatmap: torch.Tensor  # (B, n_cls, H, W) Gaussian peaks, 1 at centres
    boxes: torch.Tensor  # (B, M, 10) regression targets
    index: torch.Tensor  # (B, M) flat cell index y * W + x
    mask: torch.Tensor  # (B, M) 1 where a target exists


@dataclass
class Detections:
    """Decoded boxes of one sample, in the lidar frame (project layout)."""

    boxes: torch.Tensor  # (N, 9)
    scores: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) index into DETECTION_CLASSES
    extra: dict = field(default_factory=dict)


def gaussian_radius(height: float, width: float, min_overlap: float) -> float:
    """CenterNet's radius: the largest centre shift (cells) that keeps IoU >= min_overlap with the GT box."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap: torch.Tensor, cx: int, cy: int, radius: int) -> None:
    """Max-merge a 2D Gaussian (sigma = diameter / 6) centred on cell (cy, cx) into ``heatmap`` (H, W), in place."""
    diameter = 2 * radius + 1
    sigma = diameter / 6.0
    r = torch.arange(-radius, radius + 1, dtype=heatmap.dtype, device=heatmap.device)
    g = torch.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma * sigma))
    g[g < torch.finfo(g.dtype).eps * g.max()] = 0
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    region = heatmap[cy - top:cy + bottom, cx - left:cx + right]
    patch = g[radius - top:radius + bottom, radius - left:radius + right]
    torch.maximum(region, patch, out=region)


def _gaussian_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CornerNet/CenterNet focal loss (alpha 2, beta 4), summed and divided by the number of centres."""
    pred = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg_weight = (1 - target).pow(4)
    pos_loss = -torch.log(pred) * (1 - pred).pow(2) * pos
    neg_loss = -torch.log(1 - pred) * pred.pow(2) * neg_weight * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def circle_nms(xy: torch.Tensor, scores: torch.Tensor, radius_m: float, max_keep: int) -> torch.Tensor:
    """Greedy NMS on centre distance: indices (into xy) of kept boxes, best first."""
    order = torch.argsort(scores, descending=True)
    xy = xy[order]
    dist2 = torch.cdist(xy.double(), xy.double()).pow(2)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    close = (dist2 <= radius_m * radius_m).cpu()
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= max_keep:
            break
        suppressed |= close[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


class CenterHead(nn.Module):
    """BEV map (B, C, H, W) -> per-task predictions; targets, losses and decoding to boxes."""

    def __init__(self, cfg: CenterHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.shared_conv = ConvBnRelu(cfg.in_channels, cfg.share_channels)
        self.task_heads = nn.ModuleList(
            SeparateHead(cfg.share_channels, cfg.head_channels, len(t)) for t in cfg.tasks
        )
        self.register_buffer("code_weights", torch.tensor(cfg.code_weights), persistent=False)
        # Global class index of each task's classes.
        self.task_labels = [[DETECTION_CLASSES.index(c) for c in t] for t in cfg.tasks]

    def forward(self, bev: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        x = self.shared_conv(bev)
        return [head(x) for head in self.task_heads]

    # -------------------------------------------------------------------------------------------- targets
    def build_targets(self, gt_boxes: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor]
                      ) -> list[HeadTargets]:
        """Targets per task from per-sample GT boxes (N, 9) and labels (N,) (index into DETECTION_CLASSES)."""
        cfg, grid = self.cfg, self.cfg.grid
        h, w = grid.shape_hw
        device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
        b = len(gt_boxes)
        targets = []
        for task_idx, labels_of_task in enumerate(self.task_labels):
            heat = torch.zeros((b, len(labels_of_task), h, w), device=device)
            boxes = torch.zeros((b, cfg.max_objects, 10), device=device)
            index = torch.zeros((b, cfg.max_objects), dtype=torch.long, device=device)
            mask = torch.zeros((b, cfg.max_objects), device=device)
            for s in range(b):
                gb, gl = gt_boxes[s].detach().cpu().double(), gt_labels[s].detach().cpu()
                k = 0
                for i in range(len(gl)):
                    if int(gl[i]) not in labels_of_task or k >= cfg.max_objects:
                        continue
                    x, y, z, l, wd, hh, yaw = (float(v) for v in gb[i, :7])
                    cx, cy = (x - grid.x_min_m) / grid.cell_m, (y - grid.y_min_m) / grid.cell_m
                    ix, iy = int(math.floor(cx)), int(math.floor(cy))
                    if not (0 <= ix < w and 0 <= iy < h) or l <= 0 or wd <= 0:
                        continue
                    radius = max(cfg.min_radius, int(gaussian_radius(wd / grid.cell_m, l / grid.cell_m,
                                                                     cfg.min_overlap)))
                    draw_gaussian(heat[s, labels_of_task.index(int(gl[i]))], ix, iy, radius)
                    vx, vy = (float(v) if math.isfinite(float(v)) else 0.0 for v in gb[i, 7:9]) \
                        if gb.shape[1] >= 9 else (0.0, 0.0)
                    boxes[s, k] = torch.tensor([cx - ix, cy - iy, z, math.log(l), math.log(wd), math.log(hh),
                                                math.sin(yaw), math.cos(yaw), vx, vy])
                    index[s, k] = iy * w + ix
                    mask[s, k] = 1.0
                    k += 1
            targets.append(HeadTargets(heatmap=heat, boxes=boxes, index=index, mask=mask))
        return targets

    # -------------------------------------------------------------------------------------------- losses
    def loss(self, preds: list[dict[str, torch.Tensor]], targets: list[HeadTargets]) -> dict[str, torch.Tensor]:
        """``heatmap`` and ``bbox`` losses summed over tasks (bbox already weighted by bbox_loss_weight)."""
        heat_total, box_total = 0.0, 0.0
        for pred, tgt in zip(preds, targets, strict=True):
            heat_total = heat_total + _gaussian_focal_loss(pred["heatmap"], tgt.heatmap)
            reg = torch.cat([pred[n] for n, _ in _REG_HEADS], dim=1)  # (B, 10, H, W)
            b, c = reg.shape[:2]
            gathered = reg.flatten(2).gather(2, tgt.index.unsqueeze(1).expand(b, c, -1)).transpose(1, 2)  # (B,M,10)
            err = (gathered.float() - tgt.boxes).abs() * self.code_weights * tgt.mask.unsqueeze(-1)
            box_total = box_total + err.sum() / (tgt.mask.sum() + 1e-4) * self.cfg.bbox_loss_weight
        return {"heatmap": heat_total, "bbox": box_total}

    # -------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(self, preds: list[dict[str, torch.Tensor]]) -> list[Detections]:
        """Boxes per sample: top-k cells per task, score threshold, circle NMS per task."""
        cfg, grid = self.cfg, self.cfg.grid
        b = preds[0]["heatmap"].shape[0]
        per_sample: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(b)]
        for task_idx, pred in enumerate(preds):
            heat = torch.sigmoid(pred["heatmap"].float())  # (B, n_cls, H, W)
            if cfg.peak_filter:
                heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
            _, n_cls, h, w = heat.shape
            k = min(cfg.pre_max_size, n_cls * h * w)
            scores, flat = heat.reshape(b, -1).topk(k, dim=1)
            cls_local = torch.div(flat, h * w, rounding_mode="floor")
            cell = flat % (h * w)
            iy, ix = torch.div(cell, w, rounding_mode="floor"), cell % w
            reg = torch.cat([pred[n] for n, _ in _REG_HEADS], dim=1).float().flatten(2)  # (B, 10, H*W)
            vals = reg.gather(2, cell.unsqueeze(1).expand(b, 10, -1)).transpose(1, 2)  # (B, k, 10)
            x = grid.x_min_m + (ix + vals[..., 0]) * grid.cell_m
            y = grid.y_min_m + (iy + vals[..., 1]) * grid.cell_m
            lwh = vals[..., 3:6].clamp(max=5.0).exp()  # exp(5) = 148 m: a guard against overflow only
            yaw = torch.atan2(vals[..., 6], vals[..., 7])
            boxes = torch.cat([x[..., None], y[..., None], vals[..., 2:3], lwh, yaw[..., None], vals[..., 8:10]], -1)
            labels = torch.as_tensor(self.task_labels[task_idx], device=heat.device)[cls_local]
            keep_all = scores > cfg.score_threshold  # (B, k)
            if cfg.post_center_range_m is not None:
                lo, hi = boxes.new_tensor(cfg.post_center_range_m[:3]), boxes.new_tensor(cfg.post_center_range_m[3:])
                keep_all &= ((boxes[..., :3] >= lo) & (boxes[..., :3] <= hi)).all(dim=-1)
            for s in range(b):
                keep = keep_all[s]
                bx, sc, lb = boxes[s][keep], scores[s][keep], labels[s][keep]
                if len(sc):
                    kept = circle_nms(bx[:, :2], sc, cfg.nms_radii_m[task_idx], cfg.post_max_size)
                    bx, sc, lb = bx[kept], sc[kept], lb[kept]
                per_sample[s].append((bx, sc, lb))
        out = []
        for parts in per_sample:
            out.append(Detections(boxes=torch.cat([p[0] for p in parts]), scores=torch.cat([p[1] for p in parts]),
                                  labels=torch.cat([p[2] for p in parts])))
        return out


def numpy_detections(det: Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (N, 9) float64, scores (N,), labels (N,)) on the CPU."""
    return (det.boxes.detach().cpu().double().numpy(), det.scores.detach().cpu().double().numpy(),
            det.labels.detach().cpu().numpy().astype(np.int64))
