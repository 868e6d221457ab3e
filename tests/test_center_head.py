"""CenterHead: radius rule, Gaussian drawing, target encoding -> decoding round trip, NMS, losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tigbev.data.classes import DETECTION_CLASSES
from tigbev.geometry import BevGrid
from tigbev.models.heads import CenterHead, CenterHeadConfig, circle_nms, draw_gaussian, gaussian_radius

GRID = BevGrid.square(25.6, 0.4)  # 128 x 128


def make_head(**kw) -> CenterHead:
    torch.manual_seed(0)
    return CenterHead(CenterHeadConfig(in_channels=8, grid=GRID, share_channels=8, head_channels=8, **kw)).eval()


def test_gaussian_radius_and_drawing() -> None:
    # A 10 x 10-cell box: shifting the centre by the radius keeps IoU >= 0.1 (CenterNet's third case binds).
    r = gaussian_radius(10.0, 10.0, 0.1)
    assert 0 < r < 10
    heat = torch.zeros(9, 9)
    draw_gaussian(heat, 4, 4, 2)
    assert heat[4, 4] == 1.0 and heat.argmax() == 4 * 9 + 4
    assert heat[4, 6] == pytest.approx(math.exp(-4 / (2 * (5 / 6) ** 2)), rel=1e-6)
    assert heat[0, 0] == 0 and torch.equal(heat, heat.T)
    edge = torch.zeros(5, 5)
    draw_gaussian(edge, 0, 4, 3)  # clipped at the border
    assert edge[4, 0] == 1.0


def _boxes():
    # x, y, z, l, w, h, yaw, vx, vy; well separated so no two centres share a 3x3 neighbourhood.
    boxes = torch.tensor([
        [3.3, -7.1, -0.8, 4.6, 1.9, 1.7, 0.4, 2.0, -1.0],
        [-12.5, 9.9, -0.2, 6.9, 2.5, 2.8, -2.8, 0.0, 0.0],
        [15.1, 14.3, -1.1, 0.7, 0.6, 1.8, 1.5, 0.9, 0.3],
        [-4.0, -18.2, -1.2, 0.4, 0.4, 1.1, -0.3, 0.0, 0.0],
    ])
    labels = torch.tensor([DETECTION_CLASSES.index(c) for c in ("car", "truck", "pedestrian", "traffic_cone")])
    return boxes, labels


def _perfect_predictions(head: CenterHead, targets) -> list[dict[str, torch.Tensor]]:
    h, w = GRID.shape_hw
    preds = []
    for tgt in targets:
        p = {"heatmap": torch.logit(tgt.heatmap.clamp(1e-6, 1 - 1e-6))}
        reg = torch.zeros(tgt.heatmap.shape[0], 10, h * w)
        for b in range(tgt.heatmap.shape[0]):
            m = tgt.mask[b] > 0
            reg[b][:, tgt.index[b][m]] = tgt.boxes[b][m].T
        reg = reg.reshape(-1, 10, h, w)
        p.update(reg=reg[:, 0:2], height=reg[:, 2:3], dim=reg[:, 3:6], rot=reg[:, 6:8], vel=reg[:, 8:10])
        preds.append(p)
    return preds


def test_encode_decode_round_trip() -> None:
    head = make_head()
    boxes, labels = _boxes()
    targets = head.build_targets([boxes], [labels])
    assert sum(int(t.mask.sum()) for t in targets) == 4
    dets = head.decode(_perfect_predictions(head, targets))[0]
    assert len(dets.boxes) == 4
    order = [int(torch.argmin(torch.linalg.norm(dets.boxes[:, :2] - b[:2], dim=1))) for b in boxes]
    got = dets.boxes[order]
    np.testing.assert_allclose(got[:, :6].numpy(), boxes[:, :6].numpy(), atol=1e-4)
    dyaw = torch.atan2(torch.sin(got[:, 6] - boxes[:, 6]), torch.cos(got[:, 6] - boxes[:, 6]))
    assert dyaw.abs().max() < 1e-4
    np.testing.assert_allclose(got[:, 7:].numpy(), boxes[:, 7:].numpy(), atol=1e-5)
    assert dets.labels[order].tolist() == labels.tolist()
    assert (dets.scores > 0.99).all()


def test_empty_ground_truth_and_loss() -> None:
    head = make_head()
    x = torch.randn(2, 8, *GRID.shape_hw)
    preds = head(x)
    targets = head.build_targets([torch.zeros(0, 9), torch.zeros(0, 9)], [torch.zeros(0, dtype=torch.long)] * 2)
    assert all(t.heatmap.sum() == 0 and t.mask.sum() == 0 for t in targets)
    losses = head.loss(preds, targets)
    assert torch.isfinite(losses["heatmap"]) and losses["bbox"] == 0
    # Perfect predictions have a far lower loss than random ones.
    boxes, labels = _boxes()
    t1 = head.build_targets([boxes], [labels])
    perfect = head.loss(_perfect_predictions(head, t1), t1)
    noisy = head.loss(head(torch.randn(1, 8, *GRID.shape_hw)), t1)
    assert perfect["heatmap"] < 0.05 * noisy["heatmap"] and perfect["bbox"] < 1e-6 < noisy["bbox"]


def test_circle_nms() -> None:
    xy = torch.tensor([[0.0, 0.0], [0.5, 0.0], [3.0, 0.0], [3.2, 0.1]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.6])
    keep = circle_nms(xy, scores, 1.0, max_keep=10)
    assert keep.tolist() == [1, 3]
    assert circle_nms(xy, scores, 1.0, max_keep=1).tolist() == [1]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="tasks"):
        CenterHeadConfig(in_channels=4, grid=GRID, tasks=(("car",), ("car",)), nms_radii_m=(1.0, 1.0))
    with pytest.raises(ValueError, match="nms_radii_m"):
        CenterHeadConfig(in_channels=4, grid=GRID, tasks=(("car",),))
