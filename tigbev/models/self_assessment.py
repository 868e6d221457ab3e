"""Self-assessment cross-attention distillation on BEV maps (METHOD.md section 7, after TaT, Lin et al. CVPR 2022).

The student must rebuild the teacher's map by attending over its own features: queries and values are 1x1
projections of the student map into the teacher's channels, keys are the teacher map (as is, or through a 1x1
conv + BatchNorm), ``A = softmax(Q K^T / temperature)`` over teacher positions, ``O = A V`` and the loss is the mean
squared error between ``O`` and the teacher map. The ideal attention is the identity: every position is rebuilt from
itself. Two levels:

- **sequence-level**: the maps are cut into patches of ``patch_hw`` cells; ``patch_group`` neighbouring patches are
  stacked along channels and attention runs among the cells of each group;
- **anchor-point**: both maps are average-pooled with kernel = stride = ``anchor_cells`` and attention runs across all
  anchors of the map.

Maps whose size does not divide into patches / anchor regions are padded; padded cells are masked out of the keys
and of the loss (never read as zero features). An optional foreground mask restricts which query cells count in the
loss (the keys stay the whole patch). Both maps are (B, C, H, W) on the same grid (the caller resamples the teacher
map to the student's cells).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tigbev.config import SelfAssessmentConfig

__all__ = ["SelfAssessmentDistill", "attention_rebuild"]


def attention_rebuild(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None,
                      heads: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention of sequences (G, L, C) -> (output (G, L, C), attention (G, heads, L, L)).

    ``key_valid`` (G, L) bool masks keys out (padding); a row without any valid key yields zeros. C must divide
    into ``heads``.
    """
    g, n, c = q.shape
    if c % heads:
        raise ValueError(f"attention channels {c} do not split into {heads} heads")
    d = c // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(g, n, heads, d).transpose(1, 2)  # (G, h, L, d)

    logits = split(q) @ split(k).transpose(-1, -2) / temperature  # (G, h, L, L)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked rows: softmax of -inf gives NaN
    out = (attn @ split(v)).transpose(1, 2).reshape(g, n, c)
    return out, attn


def _pad_to(x: torch.Tensor, mult_h: int, mult_w: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % mult_w, 0, (-h) % mult_h))


def _patch_sequences(x: torch.Tensor, ph: int, pw: int, group: int) -> torch.Tensor:
    """(B, C, H, W) with H, W multiples of the patch -> (B * groups, ph * pw, group * C); the patch count is padded
    with empty patches up to a multiple of ``group``."""
    b, c, h, w = x.shape
    seq = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1)  # (B, nh, nw, ph, pw, C)
    seq = seq.reshape(b, (h // ph) * (w // pw), ph * pw, c)
    extra = (-seq.shape[1]) % group
    if extra:
        seq = torch.cat([seq, seq.new_zeros(b, extra, ph * pw, c)], dim=1)
    n = seq.shape[1] // group
    seq = seq.reshape(b, n, group, ph * pw, c).permute(0, 1, 3, 2, 4)  # (B, n, L, group, C)
    return seq.reshape(b * n, ph * pw, group * c)


class SelfAssessmentDistill(nn.Module):
    """``forward(student_map, teacher_map, fg_mask=None)`` -> dict with ``self_assessment_seq`` and
    ``self_assessment_anchor``, each multiplied by its level weight (the family weight is the caller's:
    ``LossWeights.self_assessment``)."""

    def __init__(self, cfg: SelfAssessmentConfig, student_channels: int, teacher_channels: int):
        super().__init__()
        if (teacher_channels * cfg.patch_group) % cfg.heads or teacher_channels % cfg.heads:
            raise ValueError(f"teacher channels {teacher_channels} do not split into {cfg.heads} heads")
        self.cfg = cfg
        self.proj_q = nn.Conv2d(student_channels, teacher_channels, 1)
        self.proj_v = nn.Conv2d(student_channels, teacher_channels, 1)
        self.proj_k: nn.Module = nn.Sequential(nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
                                               nn.BatchNorm2d(teacher_channels)) \
            if cfg.teacher_projection else nn.Identity()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                fg_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} must share "
                             "batch and grid (resample the teacher map to the student's cells first)")
        teacher = teacher.detach()
        q, v, k = self.proj_q(student), self.proj_v(student), self.proj_k(teacher)
        weight = student.new_ones(student.shape[0], 1, *student.shape[-2:])
        if fg_mask is not None:
            weight = weight * fg_mask.to(weight.dtype).reshape(weight.shape)
        cfg = self.cfg
        return {
            "self_assessment_seq": cfg.sequence_weight * self._sequence(q, k, v, teacher, weight),
            "self_assessment_anchor": cfg.anchor_weight * self._anchor(q, k, v, teacher, weight),
        }

    def _sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
        ph, pw = self.cfg.patch_hw
        ph, pw = min(ph, q.shape[-2]), min(pw, q.shape[-1])
        group = self.cfg.patch_group
        valid = _pad_to(torch.ones_like(weight), ph, pw)
        q_s, k_s, v_s, t_s, valid_s, w_s = (_patch_sequences(_pad_to(x, ph, pw), ph, pw, group)
                                            for x in (q, k, v, t, valid, weight))
        # A cell is a valid key when any of its stacked patches is real (padded patches are zero and masked out).
        out, _ = attention_rebuild(q_s, k_s, v_s, valid_s.amax(dim=-1) > 0, self.cfg.heads, self.cfg.temperature)
        c = t.shape[1]
        err = (out - t_s).square().reshape(*out.shape[:2], group, c).mean(dim=-1)  # (G, L, group)
        return _weighted_mean(err, w_s)

    def _anchor(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        a = self.cfg.anchor_cells
        b = q.shape[0]
        valid = _pad_to(torch.ones_like(weight), a, a)
        counts = F.avg_pool2d(valid, a)  # fraction of real cells per anchor region

        def pool(x: torch.Tensor) -> torch.Tensor:
            pooled = F.avg_pool2d(_pad_to(x, a, a), a) / counts.clamp_min(1e-6)  # mean over real cells only
            return pooled.flatten(2).transpose(1, 2)  # (B, anchors, C)

        q_a, k_a, v_a, t_a = (pool(x) for x in (q, k, v, t))
        w_a = pool(weight)  # share of counted (foreground) cells in each region
        out, _ = attention_rebuild(q_a, k_a, v_a, (counts.flatten(2).transpose(1, 2) > 0).reshape(b, -1),
                                   self.cfg.heads, self.cfg.temperature)
        return _weighted_mean((out - t_a).square().mean(dim=-1, keepdim=True), w_a)


def _weighted_mean(err: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``err`` over positions with weight > 0 (weighted); 0 (with gradient) when nothing counts."""
    weight = weight.reshape(err.shape) if weight.numel() == err.numel() else weight.expand_as(err)
    total = weight.sum()
    if total <= 0:
        return err.sum() * 0.0
    return (err * weight).sum() / total

