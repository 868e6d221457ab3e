"""The student's extra training losses: dense depth (BEVDepth), inner depth and inner-feature distillation (TiG-BEV).

METHOD.md sections 4-6 give the formulas. Every loss here

- computes in float32 with autocast switched off (inputs may be fp16 / bf16; Gram matrices and BCE need the range);
- returns *unweighted* values, except ``InnerFeatureDistillation``, whose forward returns its two terms already
  weighted (100 and 10 by default) and keeps the unweighted ones in ``last_unweighted``;
- returns an exact zero that is still connected to the graph when there is nothing to supervise (no LiDAR cell, no
  foreground cell, no box), so ``backward()`` and DDP work on any batch.

Pixel and BEV conventions are docs/COORDINATES.md's: pixel centres at integer (u, v), an image covers
``[-0.5, W - 0.5)``; BEV maps are ``(..., H, W) = (..., ny, nx)`` sampled with ``align_corners=False``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tigbev.data.targets import DepthBins
from tigbev.geometry import BevGrid
from tigbev.geometry.bev_sampling import sample_bev

__all__ = [
    "DenseDepthLoss",
    "DenseFeatureMSE",
    "InnerDepthLoss",
    "InnerFeatureDistillation",
    "inter_channel_loss",
    "inter_keypoint_loss",
]


@contextlib.contextmanager
def _float32(t: torch.Tensor) -> Iterator[None]:
    """Switch autocast off for ``t``'s device: inside it, bmm / linear / BCE stay in the float32 we cast to."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


# ----------------------------------------------------------------------------------------------------------------
# Depth losses
# ----------------------------------------------------------------------------------------------------------------


class DenseDepthLoss(nn.Module):
    """BEVDepth's depth loss: BCE between the per-cell softmax depth distribution and the one-hot GT bin.

    Inputs: ``depth_logits`` (B * N_cam, D, h, w), any float dtype; ``depth_m`` (B * N_cam, h, w) GT depth in metres,
    0 where no LiDAR point (e.g. from ``nearest_depth_map``). A cell is supervised iff its depth lies in
    ``[d_min, d_max)``; depths outside are dropped, never clamped into an edge bin.

    Reduction: the BCE summed over the D bins and over the supervised cells, divided by their count (BEVDepth's
    ``sum / max(1, n_fg)``), so the value is a per-cell sum over bins. Returns a float32 scalar, unweighted (BEVDepth
    weights it 3.0); 0 (connected to the graph) when no cell is supervised.
    """

    def __init__(self, bins: DepthBins):
        super().__init__()
        self.bins = bins

    def forward(self, depth_logits: torch.Tensor, depth_m: torch.Tensor) -> torch.Tensor:
        n, d, h, w = depth_logits.shape
        if d != self.bins.num or depth_m.shape != (n, h, w):
            raise ValueError(f"need depth_logits (M, {self.bins.num}, h, w) and depth_m (M, h, w), got "
                             f"{tuple(depth_logits.shape)} and {tuple(depth_m.shape)}")
        with _float32(depth_logits):
            k, valid = self.bins.index(depth_m)
            logits = depth_logits.float().permute(0, 2, 3, 1)[valid]  # (P, D): supervised cells only
            prob = logits.softmax(dim=-1)
            target = F.one_hot(k[valid], d).float()  # (P, D)
            # F.binary_cross_entropy clamps log at -100 and has a finite gradient at p = 0 or 1.
            bce = F.binary_cross_entropy(prob, target, reduction="sum")
            return bce / max(int(valid.sum()), 1)


class InnerDepthLoss(nn.Module):
    """TiG-BEV's inner-depth loss: relative depth inside each object, against a per-(image, box) reference cell.

    Inputs:
        depth_logits: (M, D, h, w), M camera images of the batch, any float dtype.
        bin_centers_m: (D,) bin centres in metres, uniformly spaced (``DepthBins.centers_m``).
        depth_m: (M, h, w) GT (nearest LiDAR point) depth in metres, 0 where none.
        box_index: (M, h, w) int index of the GT box holding that point, -1 for background. Indices are per sample;
            only equality within one image matters.

    Predicted depth per cell: ``d_hat = sum_k softmax(logits)_k * c_k``. Foreground cells P: ``box_index >= 0`` and,
    with ``in_range_only`` (default), GT depth inside the bins' range ``[c_0 - s/2, c_{D-1} + s/2)`` (s the spacing),
    the same cells the dense loss supervises: ``d_hat`` cannot leave ``[c_0, c_{D-1}]``, so a point beyond the range
    would pull the whole object's relative depths towards the edge. Out-of-range cells are neither foreground nor
    reference candidates. With ``in_range_only=False`` every cell with depth > 0 and a box counts.

    For each (image, box) pair the reference r is the cell with the smallest ``|d_hat - d|`` (first in row-major
    order on ties), and

        L = sum_{p in P} ((d_hat_p - sg(d_hat_r)) - (d_p - d_r))^2 / max(|P|, 1)

    in m^2, unweighted (TiG weight 1.0). The reference's own term is exactly 0 and so is its gradient; a pair with one
    cell contributes nothing; an object seen by two cameras is two pairs with two references.
    """

    def __init__(self, *, in_range_only: bool = True):
        super().__init__()
        self.in_range_only = in_range_only

    def forward(self, depth_logits: torch.Tensor, bin_centers_m: torch.Tensor, depth_m: torch.Tensor,
                box_index: torch.Tensor) -> torch.Tensor:
        m, d, h, w = depth_logits.shape
        if bin_centers_m.shape != (d,) or depth_m.shape != (m, h, w) or box_index.shape != (m, h, w):
            raise ValueError(f"need depth_logits (M, D, h, w), bin_centers_m (D,), depth_m and box_index (M, h, w); "
                             f"got {tuple(depth_logits.shape)}, {tuple(bin_centers_m.shape)}, "
                             f"{tuple(depth_m.shape)}, {tuple(box_index.shape)}")
        with _float32(depth_logits):
            centers = bin_centers_m.float().to(depth_logits.device)
            depth = depth_m.float()
            fg = (box_index >= 0) & (depth > 0) & torch.isfinite(depth)
            if self.in_range_only:
                if d < 2:
                    raise ValueError("InnerDepthLoss(in_range_only=True) needs at least 2 bins to know their spacing")
                half = 0.5 * (centers[1] - centers[0])
                fg &= (depth >= centers[0] - half) & (depth < centers[-1] + half)

            prob = depth_logits.float().softmax(dim=1)  # (M, D, h, w)
            d_hat_all = (prob * centers[None, :, None, None]).sum(dim=1)  # (M, h, w) expected depth, m
            cells = fg.flatten().nonzero().squeeze(1)  # (P,) flat indices into (M, h, w), row-major
            d_hat = d_hat_all.flatten()[cells]  # (P,)
            d_gt = depth.flatten()[cells]
            # One key per (image, box) pair; unique() turns it into a compact pair id.
            image = cells // (h * w)
            box = box_index.flatten()[cells].long()
            key = image * (int(box.max()) + 1 if len(box) else 1) + box
            _, pair = torch.unique(key, return_inverse=True)  # (P,) pair id in [0, n_pairs)
            n_pairs = int(pair.max()) + 1 if len(pair) else 0

            # Reference per pair: argmin |d_hat - d| as a segment argmin (amin of the error, then the first cell
            # that reaches it).
            err = (d_hat - d_gt).abs().detach()
            min_err = torch.full((n_pairs,), math.inf, device=err.device).scatter_reduce(0, pair, err, reduce="amin")
            order = torch.arange(len(cells), device=err.device)
            candidate = torch.where(err == min_err[pair], order, len(cells))
            ref = torch.full((n_pairs,), len(cells), dtype=torch.long, device=err.device)
            ref = ref.scatter_reduce(0, pair, candidate, reduce="amin")  # (n_pairs,) index into the P cells
            r = ref[pair]  # (P,) reference of each cell's pair

            residual = (d_hat - d_hat[r].detach()) - (d_gt - d_gt[r])
            return residual.square().sum() / max(len(cells), 1)


# ----------------------------------------------------------------------------------------------------------------
# Inner-feature BEV distillation
# ----------------------------------------------------------------------------------------------------------------


_NORM_EPS = 1e-12  # F.normalize's: a row's norm is clamped to at least this


def _gram_row_distances(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """(Nb, R, X) student and teacher rows -> (Nb, R): ``|| n(G_s)[i] - n(G_t)[i] ||^2`` per row, with
    ``G = f f^T`` and ``n`` the row L2 normalisation of ``F.normalize`` (norm clamped to at least 1e-12).

    Expanded as ``|a|^2 / m_a^2 + |b|^2 / m_b^2 - 2 a.b / (m_a m_b)`` (``m = max(|row|, eps)``), which equals the
    difference of the normalised matrices without building them: three reductions of (Nb, R, R) products instead
    of two normalisations, a difference and a square, forward and backward (the TiG step's largest extra cost).
    Identical inputs give exactly 0; all-zero rows give 0 against zero rows and 1 against non-zero ones.
    """
    g_s = torch.bmm(f_s, f_s.transpose(1, 2))
    g_t = torch.bmm(f_t, f_t.transpose(1, 2))
    sq_s = (g_s * g_s).sum(dim=-1)
    sq_t = (g_t * g_t).sum(dim=-1)
    cross = (g_s * g_t).sum(dim=-1)
    # Clamp the squared norm (not the norm): same value as max(|a|, eps) and a finite gradient at zero rows.
    m_s = sq_s.clamp(min=_NORM_EPS ** 2).sqrt()
    m_t = sq_t.clamp(min=_NORM_EPS ** 2).sqrt()
    return sq_s / (m_s * m_s) + sq_t / (m_t * m_t) - 2.0 * cross / (m_s * m_t)


def inter_keypoint_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-box inter-keypoint relation loss.

    ``student`` (Nb, K, Cs) and ``teacher`` (Nb, K, Ct) keypoint features, ``valid`` (Nb, K) bool. Per box,
    ``G = F^T F`` over its valid keypoints (K' x K', F = C x K'), rows L2-normalised, and the loss is the mean over
    the K' rows of ``sum_j (G_s[i, j] - G_t[i, j])^2``. Invalid keypoints are zeroed in both maps, which zeroes their
    rows and columns of G: the result equals the loss on the valid sub-lattice alone. Returns (Nb,) float32; a box
    with no valid keypoint gives 0.
    """
    mask = valid[..., None].float()
    per_row = _gram_row_distances(student.float() * mask, teacher.float() * mask)  # (Nb, K), 0 on invalid rows
    return per_row.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)


def inter_channel_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-box inter-channel relation loss.

    ``student`` and ``teacher`` (Nb, K, C) keypoint features with equal C (the student already through its adapter),
    ``valid`` (Nb, K) bool. Per box, ``G = F F^T`` (C x C, F = C x K' over the valid keypoints), rows L2-normalised,
    loss = mean over the C rows of ``sum_j (G_s[i, j] - G_t[i, j])^2``. Returns (Nb,) float32.
    """
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"inter-channel loss needs equal channels, got {student.shape[-1]} and {teacher.shape[-1]}")
    mask = valid[..., None].float()
    per_row = _gram_row_distances((student.float() * mask).transpose(1, 2), (teacher.float() * mask).transpose(1, 2))
    return per_row.mean(dim=-1)  # (Nb,): mean over the C rows


class InnerFeatureDistillation(nn.Module):
    """TiG-BEV's inner-feature BEV distillation: inter-keypoint and inter-channel relations inside each GT box.

    Constructed with the student map's grid and channels, the teacher's channels and (for a teacher map) its grid.
    Owns the inter-channel adapter, a 1x1 projection ``Linear(Cs, Ct)`` applied to the sampled student keypoint
    features (the same as a 1x1 conv on the map before sampling, away from the map border).

    Forward inputs:
        student_bev: (B, Cs, Hs, Ws) on ``student_grid``, any float dtype.
        keypoints_xy: (B, M_max, K, 2) metric keypoints in the student's (BEV-augmented) lidar frame.
        box_mask: (B, M_max) bool, False for padding boxes.
        teacher_bev + teacher_keypoints_xy: a teacher map (B, Ct, Ht, Wt) on ``teacher_grid`` and the same keypoints
            (B, M_max, K, 2) in the teacher's (un-augmented) frame; or
        teacher_keypoint_feats (+ optional teacher_keypoint_valid (B, M_max, K) bool): teacher features
            (B, M_max, K, Ct) already sampled at the keypoints.
        Exactly one teacher form must be given. The teacher is always detached.

    Masking: a keypoint is valid iff it lies inside the student map and inside the teacher map (or is flagged valid
    with the teacher features). Invalid keypoints are dropped from both similarity matrices (their features are
    zeroed, so each box's loss is exactly the loss on its valid keypoints, rows averaged over those); a box with
    fewer than ``min_valid_keypoints`` (2) valid keypoints is dropped. Both terms are then averaged over the kept
    boxes of the whole batch (each box weighs the same, as in the unmasked formula). No kept box -> 0.

    Returns ``{"inter_keypoint": w_kp * L_kp, "inter_channel": w_ch * L_ch}`` (float32 scalars, weighted, defaults
    100 and 10). The unweighted values of the last call are in ``self.last_unweighted`` (detached, same keys, plus
    ``"boxes"``: how many boxes were kept); ``unweighted(...)`` computes them with the graph.

    Memory: the keypoint Gram is (N_boxes, K, K) in float32, 1.3 MB per box at K = 576.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, student_grid: BevGrid,
                 teacher_grid: BevGrid | None = None, weight_keypoint: float = 100.0, weight_channel: float = 10.0,
                 min_valid_keypoints: int = 2):
        super().__init__()
        if min_valid_keypoints < 1:
            raise ValueError(f"min_valid_keypoints must be >= 1, got {min_valid_keypoints}")
        self.student_grid = student_grid
        self.teacher_grid = teacher_grid
        self.weight_keypoint = weight_keypoint
        self.weight_channel = weight_channel
        self.min_valid_keypoints = min_valid_keypoints
        self.adapter = nn.Linear(student_channels, teacher_channels)
        self.last_unweighted: dict[str, torch.Tensor] = {}

    def forward(self, student_bev: torch.Tensor, keypoints_xy: torch.Tensor, box_mask: torch.Tensor, *,
                teacher_bev: torch.Tensor | None = None, teacher_keypoints_xy: torch.Tensor | None = None,
                teacher_keypoint_feats: torch.Tensor | None = None,
                teacher_keypoint_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raw = self.unweighted(student_bev, keypoints_xy, box_mask, teacher_bev=teacher_bev,
                              teacher_keypoints_xy=teacher_keypoints_xy, teacher_keypoint_feats=teacher_keypoint_feats,
                              teacher_keypoint_valid=teacher_keypoint_valid)
        self.last_unweighted = {k: v.detach() for k, v in raw.items()}
        return {"inter_keypoint": self.weight_keypoint * raw["inter_keypoint"],
                "inter_channel": self.weight_channel * raw["inter_channel"]}

    def unweighted(self, student_bev: torch.Tensor, keypoints_xy: torch.Tensor, box_mask: torch.Tensor, *,
                   teacher_bev: torch.Tensor | None = None, teacher_keypoints_xy: torch.Tensor | None = None,
                   teacher_keypoint_feats: torch.Tensor | None = None,
                   teacher_keypoint_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"inter_keypoint", "inter_channel"}`` unweighted (float32 scalars with graph), plus ``"boxes"``."""
        b, m, k = keypoints_xy.shape[:3]
        if keypoints_xy.shape != (b, m, k, 2) or box_mask.shape != (b, m) or student_bev.ndim != 4 \
                or student_bev.shape[0] != b:
            raise ValueError(f"need student_bev (B, C, H, W), keypoints_xy (B, M, K, 2), box_mask (B, M); got "
                             f"{tuple(student_bev.shape)}, {tuple(keypoints_xy.shape)}, {tuple(box_mask.shape)}")
        _check_grid(student_bev, self.student_grid, "student_bev")
        with _float32(student_bev):
            f_s, valid = sample_bev(student_bev.float(), keypoints_xy.reshape(b, m * k, 2).float(),
                                    self.student_grid)  # (B, M*K, Cs), (B, M*K)
            f_s, valid = f_s.reshape(b, m, k, f_s.shape[-1]), valid.reshape(b, m, k)

            if (teacher_bev is None) == (teacher_keypoint_feats is None):
                raise ValueError("give exactly one of teacher_bev or teacher_keypoint_feats")
            if teacher_bev is not None:
                if self.teacher_grid is None:
                    raise ValueError("a teacher map needs InnerFeatureDistillation(teacher_grid=...)")
                if teacher_keypoints_xy is None or teacher_keypoints_xy.shape != keypoints_xy.shape:
                    raise ValueError("teacher_bev needs teacher_keypoints_xy (B, M, K, 2) in the teacher's frame")
                _check_grid(teacher_bev, self.teacher_grid, "teacher_bev")
                f_t, valid_t = sample_bev(teacher_bev.detach().float(),
                                          teacher_keypoints_xy.reshape(b, m * k, 2).float(), self.teacher_grid)
                f_t, valid_t = f_t.reshape(b, m, k, f_t.shape[-1]), valid_t.reshape(b, m, k)
            else:
                assert teacher_keypoint_feats is not None
                if teacher_keypoint_feats.shape[:3] != (b, m, k):
                    raise ValueError(f"teacher_keypoint_feats must be (B, M, K, Ct) = ({b}, {m}, {k}, Ct), got "
                                     f"{tuple(teacher_keypoint_feats.shape)}")
                f_t = teacher_keypoint_feats.detach().float()
                valid_t = torch.ones_like(valid) if teacher_keypoint_valid is None else teacher_keypoint_valid.bool()
            if f_t.shape[-1] != self.adapter.out_features:
                raise ValueError(f"teacher has {f_t.shape[-1]} channels, adapter gives {self.adapter.out_features}")

            valid = valid & valid_t  # (B, M, K)
            keep = box_mask.bool() & (valid.sum(dim=-1) >= self.min_valid_keypoints)  # (B, M)
            f_s, f_t, valid = f_s[keep], f_t[keep], valid[keep]  # (Nb, K, C) ...: boxes of the whole batch
            n_boxes = f_s.shape[0]
            l_kp = inter_keypoint_loss(f_s, f_t, valid).sum() / max(n_boxes, 1)
            l_ch = inter_channel_loss(self.adapter(f_s), f_t, valid).sum() / max(n_boxes, 1)
        return {"inter_keypoint": l_kp, "inter_channel": l_ch,
                "boxes": torch.tensor(float(n_boxes), device=l_kp.device)}


def _check_grid(bev: torch.Tensor, grid: BevGrid, name: str) -> None:
    if tuple(bev.shape[-2:]) != grid.shape_hw:
        raise ValueError(f"{name} is {tuple(bev.shape[-2:])} (H, W) but its grid is {grid.shape_hw}")


class DenseFeatureMSE(nn.Module):
    """Baseline dense BEV feature mimicking (not part of TiG-BEV): MSE between adapted student and teacher maps.

    ``student_bev`` (B, Cs, Hs, Ws) goes through a 1x1 conv adapter Cs -> Ct, then, if its size differs from the
    teacher's, is resampled bilinearly (``align_corners=False``) onto the teacher's cells; both maps must cover the
    same metric rectangle (checked when grids are given). ``teacher_bev`` (B, Ct, Ht, Wt) is detached.
    ``fg_mask`` (B, Ht, Wt) bool selects cells; None = every cell. Reduction: mean over channels and selected cells
    (sum / (n_cells * Ct)); 0 with graph when no cell is selected. Returns a float32 scalar, unweighted.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, student_grid: BevGrid | None = None,
                 teacher_grid: BevGrid | None = None):
        super().__init__()
        if student_grid is not None and teacher_grid is not None and not all(
                math.isclose(getattr(student_grid, f), getattr(teacher_grid, f), abs_tol=1e-6)
                for f in ("x_min_m", "x_max_m", "y_min_m", "y_max_m")):
            raise ValueError(f"student and teacher grids cover different ranges: {student_grid} vs {teacher_grid}")
        self.student_grid, self.teacher_grid = student_grid, teacher_grid
        self.adapter = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_bev: torch.Tensor, teacher_bev: torch.Tensor,
                fg_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.student_grid is not None:
            _check_grid(student_bev, self.student_grid, "student_bev")
        if self.teacher_grid is not None:
            _check_grid(teacher_bev, self.teacher_grid, "teacher_bev")
        b, ct, ht, wt = teacher_bev.shape
        if fg_mask is not None and fg_mask.shape != (b, ht, wt):
            raise ValueError(f"fg_mask must be (B, Ht, Wt) = ({b}, {ht}, {wt}), got {tuple(fg_mask.shape)}")
        with _float32(student_bev):
            s = self.adapter(student_bev.float())  # (B, Ct, Hs, Ws)
            if s.shape[-2:] != (ht, wt):
                s = F.interpolate(s, size=(ht, wt), mode="bilinear", align_corners=False)
            sq = (s - teacher_bev.detach().float()).square()  # (B, Ct, Ht, Wt)
            if fg_mask is None:
                return sq.mean()
            mask = fg_mask.bool()[:, None].expand_as(sq)
            return sq[mask].sum() / max(int(fg_mask.bool().sum()) * ct, 1)
