"""Lift-Splat-Shoot view transform: per feature cell a depth distribution and context features, lifted along the
camera ray and summed onto the BEV grid.

Frustum (``frustum_points``), per camera, feature cell ``(i, j)`` at stride ``s`` and depth-bin centre ``d``:

- the cell covers input pixels ``u in [j*s - 0.5, (j+1)*s - 0.5)`` (docs/COORDINATES.md: pixel centres are integers;
  the same cell rule as ``nearest_depth_map``), so its centre is ``u = j*s + (s-1)/2``, ``v = i*s + (s-1)/2``;
- original pixel ``[u_o, v_o, 1] ~ inv(aug_px_from_px) @ [u, v, 1]`` (the input image is the augmented one);
- camera point ``d * inv(K) @ [u_o, v_o, 1]`` (K's last row is [0, 0, 1], so depth is the camera z, as the LiDAR
  depth targets);
- student-frame point ``aug_from_lidar @ inv(cam_from_lidar) @ [cam, 1]`` (the augmented BEV frame the head
  predicts in).

Depths are the bin centres ``d_min + (k + 0.5) * step`` (``DepthBins.centers_m``): a LiDAR depth in bin ``k`` trains
the bin whose centre it is lifted to, and the expected depth of the inner-depth loss uses the same centres.
(BEVDet / BEVDepth lift to the bin's lower edge, ``arange(d_min, d_max, step)``; half a step nearer.)

Splat (``pool_to_bev``): a point falls in cell ``(floor((y - y_min)/cell), floor((x - x_min)/cell))`` and counts
iff it lies inside the grid and ``z_min <= z < z_max`` (one height bin: the sum over the pillar); the rest are
dropped. The BEV feature of a cell is the sum over its points of ``depth_prob * context`` of the point's pixel,
done as one ``index_add_`` over flattened cell indices. Geometry runs in float64 without gradients (it depends
only on the calibration and augmentation matrices); the splat runs in float32 with autocast off. Memory: autograd
keeps the gathered context of the kept points, (P, C) float32 (demo: ~62k x 64, 16 MB; nuscenes batch 8: ~2M
points before the range cut x 80 ch, under 0.7 GB); a fused bev-pool kernel would avoid it.

Depth nets: ``bevdet`` is BEVDet's single 1x1 conv to D + C channels. ``bevdepth`` is BEVDepth's camera-aware
DepthNet (a 3x3 reduce conv, SE gates from an MLP over the 27-d camera vector on the depth and context branches,
residual blocks + 1x1 conv to D logits, 1x1 conv to C context), without its ASPP and deformable conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tigbev.data.targets import DepthBins
from tigbev.geometry import BevGrid
from tigbev.models.student.neck import conv_bn_relu
from tigbev.models.student.resnet import BasicBlock

__all__ = [
    "CAMERA_VECTOR_DIM",
    "CameraAwareDepthNet",
    "LssViewTransform",
    "PlainDepthNet",
    "ViewTransformOutput",
    "camera_vector",
    "feature_pixel_centers",
    "frustum_points",
    "pool_to_bev",
]

CAMERA_VECTOR_DIM = 27


def camera_vector(intrinsics: torch.Tensor, aug_px_from_px: torch.Tensor, aug_from_lidar: torch.Tensor,
                  cam_from_lidar: torch.Tensor) -> torch.Tensor:
    """BEVDepth's 27-d camera vector per image, (B, N, 27) float32, in this order:

    - 0-3: ``fx, fy, cx, cy`` of the original-image intrinsics ``K``;
    - 4-9: ``aug_px_from_px`` rows 0 and 1 (its 2x3 affine: ``a00, a01, t_u, a10, a11, t_v``; resize scale, rotation,
      flip and crop all show here);
    - 10-14: ``A[0, 0], A[0, 1], A[1, 0], A[1, 1], A[2, 2]`` of ``A = aug_from_lidar`` (rotation about z, scale and
      flips);
    - 15-26: the top 3x4 of ``lidar_from_cam = inv(cam_from_lidar)``, row-major (``r00 r01 r02 tx r10 ... tz``).
      BEVDepth uses sensor->ego; our reference frame is the key lidar frame, so it is camera->lidar here.

    Inputs: intrinsics (B, N, 3, 3), aug_px_from_px (B, N, 3, 3), aug_from_lidar (B, 4, 4), cam_from_lidar (B, N, 4, 4).
    """
    b, n = intrinsics.shape[:2]
    k = intrinsics.double()
    aug = aug_px_from_px.double()
    bd = aug_from_lidar.double()[:, None].expand(b, n, 4, 4)
    lidar_from_cam = torch.linalg.inv(cam_from_lidar.double())
    parts = [
        k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2],
        aug[..., 0, 0], aug[..., 0, 1], aug[..., 0, 2], aug[..., 1, 0], aug[..., 1, 1], aug[..., 1, 2],
        bd[..., 0, 0], bd[..., 0, 1], bd[..., 1, 0], bd[..., 1, 1], bd[..., 2, 2],
    ]
    vec = torch.cat([torch.stack(parts, dim=-1), lidar_from_cam[..., :3, :4].reshape(b, n, 12)], dim=-1)
    return vec.float()  # (B, N, 27)


def feature_pixel_centers(feature_hw: tuple[int, int], stride: int, device: torch.device | None = None
                          ) -> torch.Tensor:
    """Input-image pixel (u, v) of every feature cell centre, (h, w, 2) float64: ``j*s + (s-1)/2``."""
    h, w = feature_hw
    half = (stride - 1) / 2.0
    u = torch.arange(w, dtype=torch.float64, device=device) * stride + half
    v = torch.arange(h, dtype=torch.float64, device=device) * stride + half
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], dim=-1)


@torch.no_grad()
def frustum_points(intrinsics: torch.Tensor, cam_from_lidar: torch.Tensor, aug_px_from_px: torch.Tensor,
                   aug_from_lidar: torch.Tensor, feature_hw: tuple[int, int], stride: int,
                   depths_m: torch.Tensor) -> torch.Tensor:
    """Student-frame xyz (B, N, D, h, w, 3) float64 of every (depth bin, feature cell) of every camera.

    intrinsics, aug_px_from_px (B, N, 3, 3); cam_from_lidar (B, N, 4, 4); aug_from_lidar (B, 4, 4); depths_m (D,).
    """
    b, n = intrinsics.shape[:2]
    dev = intrinsics.device
    uv = feature_pixel_centers(feature_hw, stride, dev)  # (h, w, 2)
    pix = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)  # (h, w, 3) homogeneous, augmented image
    orig = torch.einsum("bnij,hwj->bnhwi", torch.linalg.inv(aug_px_from_px.double()), pix)  # (B, N, h, w, 3)
    orig = orig / orig[..., 2:3]  # a no-op for an affine aug_px_from_px; exact for a projective one
    rays = torch.einsum("bnij,bnhwj->bnhwi", torch.linalg.inv(intrinsics.double()), orig)  # camera rays, z = 1
    student_from_cam = aug_from_lidar.double()[:, None] @ torch.linalg.inv(cam_from_lidar.double())  # (B, N, 4, 4)
    rot, trans = student_from_cam[..., :3, :3], student_from_cam[..., :3, 3]
    dirs = torch.einsum("bnij,bnhwj->bnhwi", rot, rays)  # (B, N, h, w, 3): student-frame offset per metre of depth
    d = depths_m.double().to(dev).view(1, 1, -1, 1, 1, 1)
    return d * dirs[:, :, None] + trans[:, :, None, None, None, :]  # (B, N, D, h, w, 3)


def pool_to_bev(points: torch.Tensor, depth_prob: torch.Tensor, context: torch.Tensor, grid: BevGrid,
                z_range_m: tuple[float, float]) -> torch.Tensor:
    """Splat ``depth_prob x context`` at ``points`` onto ``grid``: (B, C, ny, nx) float32.

    points (B, N, D, h, w, 3) in the grid's frame; depth_prob (B*N, D, h, w); context (B*N, C, h, w). Points outside
    the grid or the half-open z range are dropped. One ``index_add_`` over all kept points; no loops.
    """
    b, n, d, h, w, _ = points.shape
    c = context.shape[1]
    if depth_prob.shape != (b * n, d, h, w) or context.shape != (b * n, c, h, w):
        raise ValueError(f"points {tuple(points.shape)} need depth_prob ({b * n}, {d}, {h}, {w}) and context "
                         f"({b * n}, C, {h}, {w}), got {tuple(depth_prob.shape)} and {tuple(context.shape)}")
    ny, nx = grid.shape_hw
    z_min, z_max = z_range_m
    with torch.no_grad():
        ix = torch.floor((points[..., 0] - grid.x_min_m) / grid.cell_m).long()
        iy = torch.floor((points[..., 1] - grid.y_min_m) / grid.cell_m).long()
        z = points[..., 2]
        keep = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (z >= z_min) & (z < z_max)  # (B, N, D, h, w)
        idx = keep.flatten().nonzero().squeeze(1)  # (P,) flat index in (B, N, D, h, w) order = depth_prob's order
        cam = torch.div(idx, d * h * w, rounding_mode="floor")  # b * N + n
        pixel = cam * (h * w) + idx % (h * w)  # row of context laid out (B*N, h, w)
        cell = torch.div(cam, n, rounding_mode="floor") * (ny * nx) + iy.flatten()[idx] * nx + ix.flatten()[idx]
    with torch.autocast(device_type=context.device.type, enabled=False):
        ctx = context.float().permute(0, 2, 3, 1).reshape(-1, c)  # (B*N*h*w, C)
        vals = ctx[pixel] * depth_prob.float().reshape(-1)[idx, None]  # (P, C)
        bev = vals.new_zeros((b * ny * nx, c)).index_add_(0, cell, vals)
    return bev.view(b, ny, nx, c).permute(0, 3, 1, 2).contiguous()  # (B, C, ny, nx)


class PlainDepthNet(nn.Module):
    """BEVDet: one 1x1 conv from the neck features to D depth logits and C context channels."""

    def __init__(self, in_channels: int, context_channels: int, depth_channels: int):
        super().__init__()
        self.depth_channels = depth_channels
        self.conv = nn.Conv2d(in_channels, depth_channels + context_channels, 1)

    def forward(self, x: torch.Tensor, cam_vec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(x)
        return out[:, :self.depth_channels], out[:, self.depth_channels:]


class _Mlp(nn.Sequential):
    def __init__(self, c_in: int, c_hidden: int, c_out: int):
        super().__init__(nn.Linear(c_in, c_hidden), nn.ReLU(inplace=True), nn.Linear(c_hidden, c_out))


class _SeGate(nn.Sequential):
    """Squeeze-excitation gate from a per-image embedding: (M, C) -> (M, C, 1, 1) in (0, 1)."""

    def __init__(self, channels: int):
        super().__init__(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels),
                         nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., None, None]


class CameraAwareDepthNet(nn.Module):
    """BEVDepth's DepthNet: features (M, C_in, h, w) and camera vectors (M, 27) -> (depth logits, context).

    The camera vector is normalised by a BatchNorm1d (its entries range from ~1 to ~1000 px), embedded by an MLP per
    branch, and turned into sigmoid SE gates on the reduced features before each branch. The BatchNorm1d sees one
    row per image, so training needs B * N >= 2 images per step (6 cameras always are).
    """

    def __init__(self, in_channels: int, mid_channels: int, context_channels: int, depth_channels: int,
                 depth_blocks: int):
        super().__init__()
        self.reduce_conv = conv_bn_relu(in_channels, mid_channels, 3)
        self.bn = nn.BatchNorm1d(CAMERA_VECTOR_DIM)
        self.depth_mlp = _Mlp(CAMERA_VECTOR_DIM, mid_channels, mid_channels)
        self.depth_se = _SeGate(mid_channels)
        self.context_mlp = _Mlp(CAMERA_VECTOR_DIM, mid_channels, mid_channels)
        self.context_se = _SeGate(mid_channels)
        self.context_conv = nn.Conv2d(mid_channels, context_channels, 1)
        self.depth_conv = nn.Sequential(*(BasicBlock(mid_channels, mid_channels) for _ in range(depth_blocks)),
                                        nn.Conv2d(mid_channels, depth_channels, 1))

    def forward(self, x: torch.Tensor, cam_vec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if cam_vec is None or cam_vec.shape != (x.shape[0], CAMERA_VECTOR_DIM):
            raise ValueError(f"CameraAwareDepthNet needs camera vectors ({x.shape[0]}, {CAMERA_VECTOR_DIM})")
        x = self.reduce_conv(x)  # (M, mid, h, w)
        v = self.bn(cam_vec.to(self.bn.weight.dtype))  # (M, 27) normalised; float32 even under autocast
        context = self.context_conv(x * self.context_se(self.context_mlp(v)))  # (M, C, h, w)
        depth = self.depth_conv(x * self.depth_se(self.depth_mlp(v)))  # (M, D, h, w)
        return depth, context


@dataclass
class ViewTransformOutput:
    bev: torch.Tensor  # (B, C, ny, nx) float32 pooled context on the student grid
    depth_logits: torch.Tensor  # (B*N, D, h, w)


class LssViewTransform(nn.Module):
    """Neck features (B*N, C_in, h, w) of B samples x N cameras -> BEV context map and depth logits."""

    def __init__(self, *, variant: Literal["bevdet", "bevdepth"], in_channels: int, context_channels: int,
                 bins: DepthBins, grid: BevGrid, z_range_m: tuple[float, float], stride: int,
                 mid_channels: int, depth_blocks: int):
        super().__init__()
        self.variant, self.bins, self.grid, self.z_range_m, self.stride = variant, bins, grid, z_range_m, stride
        match variant:
            case "bevdet":
                self.depth_net: nn.Module = PlainDepthNet(in_channels, context_channels, bins.num)
            case "bevdepth":
                self.depth_net = CameraAwareDepthNet(in_channels, mid_channels, context_channels, bins.num,
                                                     depth_blocks)
            case _:
                raise ValueError(f"unknown student variant {variant!r}; choose 'bevdet' or 'bevdepth'")
        self.register_buffer("depth_centers_m", bins.centers_m(), persistent=False)

    def forward(self, feats: torch.Tensor, *, intrinsics: torch.Tensor, cam_from_lidar: torch.Tensor,
                aug_px_from_px: torch.Tensor, aug_from_lidar: torch.Tensor, image_hw: tuple[int, int]
                ) -> ViewTransformOutput:
        b, n = intrinsics.shape[:2]
        h, w = feats.shape[-2:]
        if (h, w) != (math.ceil(image_hw[0] / self.stride), math.ceil(image_hw[1] / self.stride)):
            raise ValueError(f"features {h} x {w} are not stride {self.stride} of the {image_hw} input")
        cam_vec = None
        if self.variant == "bevdepth":
            cam_vec = camera_vector(intrinsics, aug_px_from_px, aug_from_lidar, cam_from_lidar)
            cam_vec = cam_vec.reshape(b * n, -1)  # (B*N, 27)
        depth_logits, context = self.depth_net(feats, cam_vec)  # (B*N, D, h, w), (B*N, C, h, w)
        points = frustum_points(intrinsics, cam_from_lidar, aug_px_from_px, aug_from_lidar, (h, w), self.stride,
                                self.depth_centers_m)  # (B, N, D, h, w, 3)
        depth_prob = depth_logits.float().softmax(dim=1)
        bev = pool_to_bev(points, depth_prob, context, self.grid, self.z_range_m)
        return ViewTransformOutput(bev=bev, depth_logits=depth_logits)
