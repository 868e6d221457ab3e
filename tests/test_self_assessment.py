"""Self-assessment cross-attention distillation (METHOD.md section 7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tigbev.config import SelfAssessmentConfig
from tigbev.models.self_assessment import SelfAssessmentDistill, attention_rebuild


def _unit_map(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random maps whose cells are unit vectors: T_i . T_i = 1 beats every T_i . T_j, so sharp attention is the
    identity."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, c, h, w, generator=g), dim=1)


def _v(x: torch.Tensor) -> float:
    return x.detach().item()


def _identity_projections(module: SelfAssessmentDistill) -> None:
    """Student projections that copy the student map (student channels == teacher channels)."""
    with torch.no_grad():
        for conv in (module.proj_q, module.proj_v):
            conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
            conv.bias.zero_()


@pytest.mark.parametrize("hw", [(16, 16), (13, 11)])
def test_matching_maps_and_sharp_attention_give_zero_loss(hw: tuple[int, int]) -> None:
    teacher = _unit_map(2, 64, *hw)
    module = SelfAssessmentDistill(SelfAssessmentConfig(temperature=0.01, heads=1, patch_hw=(8, 8), anchor_cells=4),
                                   student_channels=64, teacher_channels=64)
    _identity_projections(module)
    losses = module(teacher.clone(), teacher)
    assert set(losses) == {"self_assessment_seq", "self_assessment_anchor"}
    assert _v(losses["self_assessment_seq"]) < 1e-6
    # Pooled anchors are no longer unit vectors, but their self-similarity still dominates at this temperature.
    assert _v(losses["self_assessment_anchor"]) < 1e-4


def test_sharp_attention_is_identity_and_soft_attention_is_not() -> None:
    x = _unit_map(1, 32, 4, 4).flatten(2).transpose(1, 2)  # (1, 16, 32)
    _, sharp = attention_rebuild(x, x, x, None, heads=1, temperature=0.01)
    assert torch.allclose(sharp[0, 0], torch.eye(16), atol=1e-3)
    _, soft = attention_rebuild(x, x, x, None, heads=1, temperature=10.0)
    assert float((soft[0, 0] - torch.eye(16)).abs().max()) > 0.5
    assert torch.allclose(soft.sum(-1), torch.ones(1, 1, 16))


def test_a_different_student_gives_a_positive_loss_that_trains_the_projections() -> None:
    teacher = _unit_map(1, 32, 8, 8, seed=1)
    student = _unit_map(1, 16, 8, 8, seed=2)
    module = SelfAssessmentDistill(SelfAssessmentConfig(temperature=0.1, heads=2, patch_hw=(4, 4), anchor_cells=2),
                                   student_channels=16, teacher_channels=32)
    loss = sum(module(student, teacher).values())
    assert _v(loss) > 1e-3
    loss.backward()
    assert module.proj_q.weight.grad is not None and float(module.proj_q.weight.grad.abs().sum()) > 0
    assert module.proj_v.weight.grad is not None and float(module.proj_v.weight.grad.abs().sum()) > 0


def test_padding_never_counts_as_zero_features() -> None:
    """A 10 x 10 map in 8 x 8 patches: the result equals attention within each real (cropped) patch alone."""
    teacher = _unit_map(1, 8, 10, 10, seed=3)
    student = _unit_map(1, 8, 10, 10, seed=4)
    cfg = SelfAssessmentConfig(temperature=0.5, heads=2, patch_hw=(8, 8), anchor_cells=4, sequence_weight=1.0,
                               anchor_weight=1.0)
    module = SelfAssessmentDistill(cfg, student_channels=8, teacher_channels=8)
    _identity_projections(module)
    got = module(student, teacher)

    errs = []
    for r0, r1 in ((0, 8), (8, 10)):
        for c0, c1 in ((0, 8), (8, 10)):
            s = student[0, :, r0:r1, c0:c1].flatten(1).T[None]
            t = teacher[0, :, r0:r1, c0:c1].flatten(1).T[None]
            out, _ = attention_rebuild(s, t, s, None, heads=2, temperature=0.5)
            errs.append((out - t).square().mean(-1).flatten())
    expected_seq = torch.cat(errs).mean()
    assert torch.allclose(got["self_assessment_seq"], expected_seq, rtol=1e-5)

    anchors_s, anchors_t = [], []
    for r0, r1 in ((0, 4), (4, 8), (8, 10)):
        for c0, c1 in ((0, 4), (4, 8), (8, 10)):
            anchors_s.append(student[0, :, r0:r1, c0:c1].mean(dim=(1, 2)))
            anchors_t.append(teacher[0, :, r0:r1, c0:c1].mean(dim=(1, 2)))
    s_a, t_a = torch.stack(anchors_s)[None], torch.stack(anchors_t)[None]
    out, _ = attention_rebuild(s_a, t_a, s_a, None, heads=2, temperature=0.5)
    assert torch.allclose(got["self_assessment_anchor"], (out - t_a).square().mean(), rtol=1e-5)


def test_patch_groups_stack_patches_along_channels() -> None:
    """With two patches per group, every cell of a group sees the stacked channels of both patches: equal to
    attention over the concatenated sequence built by hand."""
    teacher = _unit_map(1, 4, 4, 8, seed=5)
    student = _unit_map(1, 4, 4, 8, seed=6)
    cfg = SelfAssessmentConfig(temperature=0.3, heads=2, patch_hw=(4, 4), patch_group=2, sequence_weight=1.0,
                               anchor_weight=0.0)
    module = SelfAssessmentDistill(cfg, student_channels=4, teacher_channels=4)
    _identity_projections(module)
    got = module(student, teacher)["self_assessment_seq"]

    def stacked(x: torch.Tensor) -> torch.Tensor:
        left, right = x[0, :, :, :4].flatten(1).T, x[0, :, :, 4:].flatten(1).T  # (16, C) each
        return torch.cat([left, right], dim=1)[None]  # (1, 16, 2C)

    s, t = stacked(student), stacked(teacher)
    out, _ = attention_rebuild(s, t, s, None, heads=2, temperature=0.3)
    assert torch.allclose(got, (out - t).square().mean(), rtol=1e-5)


def test_foreground_mask_restricts_the_loss() -> None:
    teacher = _unit_map(1, 8, 8, 8, seed=7)
    student = _unit_map(1, 8, 8, 8, seed=8)
    module = SelfAssessmentDistill(SelfAssessmentConfig(heads=1, patch_hw=(8, 8), anchor_cells=2),
                                   student_channels=8, teacher_channels=8)
    mask = torch.zeros(1, 1, 8, 8)
    assert _v(sum(module(student, teacher, mask).values())) == 0.0
    mask[..., 2:4, 2:4] = 1.0
    full = module(student, teacher)
    masked = module(student, teacher, mask)
    assert _v(masked["self_assessment_seq"]) > 0
    assert not torch.allclose(masked["self_assessment_seq"], full["self_assessment_seq"])


def test_teacher_projection_and_bad_shapes() -> None:
    module = SelfAssessmentDistill(SelfAssessmentConfig(teacher_projection=True), student_channels=8,
                                   teacher_channels=16)
    assert isinstance(module.proj_k, nn.Sequential)
    with pytest.raises(ValueError, match="share batch and grid"):
        module(torch.zeros(1, 8, 8, 8), torch.zeros(1, 16, 8, 9))
    with pytest.raises(ValueError, match="heads"):
        SelfAssessmentDistill(SelfAssessmentConfig(heads=3), student_channels=8, teacher_channels=16)
    with pytest.raises(ValueError, match="temperature"):
        SelfAssessmentConfig(temperature=0.0)
