"""Training losses: depth GT, dense depth, inner depth, inner-feature distillation, dense feature MSE.

Empty inputs first, then hand-computable values, then the properties the method relies on (stop-gradient on the
reference, masking of keypoints outside a map, invariance to feature scale).
"""

from __future__ import annotations

import math

import pytest
import torch

from tigbev.data.targets import depth_bins, nearest_depth_map
from tigbev.geometry import BevGrid
from tigbev.geometry.bev_sampling import sample_bev
from tigbev.models.losses import (
    DenseDepthLoss,
    DenseFeatureMSE,
    InnerDepthLoss,
    InnerFeatureDistillation,
    inter_channel_loss,
    inter_keypoint_loss,
)

BINS = depth_bins(1.0, 9.0, 1.0)  # 8 bins, centres 1.5 .. 8.5
GRID_S = BevGrid.square(4.0, 1.0)  # 8 x 8 student cells
GRID_T = BevGrid.square(4.0, 2.0)  # 4 x 4 teacher cells over the same range


def onehot_logits(pred_m: torch.Tensor) -> torch.Tensor:
    """Logits (M, D, h, w) whose expected depth is exactly the bin centre ``pred_m`` (M, h, w) sits on."""
    centers = BINS.centers_m()
    k = (pred_m[..., None] - centers).abs().argmin(dim=-1)  # (M, h, w)
    assert torch.allclose(centers[k], pred_m), "test predictions must sit on bin centres"
    logits = torch.full((*pred_m.shape, BINS.num), -1e4)  # exp(-1e4) is 0 in float32: an exact one-hot
    logits.scatter_(-1, k[..., None], 0.0)
    return logits.permute(0, 3, 1, 2).contiguous()


# --- depth bins and the nearest-point depth map ------------------------------------------------------------------


def test_depth_bins() -> None:
    assert BINS.num == 8 and depth_bins(1.0, 60.0, 1.0).num == 59 and depth_bins(2.0, 58.0, 0.5).num == 112
    assert torch.equal(BINS.centers_m(), torch.arange(8) + 1.5)
    k, valid = BINS.index(torch.tensor([0.0, 0.99, 1.0, 1.99, 8.999, 9.0, 30.0, float("nan")]))
    assert valid.tolist() == [False, False, True, True, True, False, False, False]
    assert k[valid].tolist() == [0, 0, 7]
    with pytest.raises(ValueError, match="whole number"):
        depth_bins(1.0, 2.0, 0.3)


def test_nearest_depth_map_empty_and_borders() -> None:
    empty = torch.zeros(0)
    depth, box = nearest_depth_map(torch.zeros(0, 2), empty, empty.long(), (32, 48), 16)
    assert depth.shape == (2, 3) and not depth.any() and (box == -1).all()
    # Cell of a point = floor((u + 0.5) / stride): u = -0.5 is the first cell's edge, u = 15.5 starts the second;
    # u = W - 0.5 is outside the image, and so are zero depths.
    uv = torch.tensor([[-0.5, -0.5], [15.5, 0.0], [47.5, 0.0], [20.0, 31.4], [3.0, 3.0], [3.0, 4.0]])
    d = torch.tensor([5.0, 6.0, 7.0, 8.0, 4.0, 0.0])
    depth, box = nearest_depth_map(uv, d, torch.tensor([0, 1, 2, 3, -1, 5]), (32, 48), 16)
    assert depth.tolist() == [[4.0, 6.0, 0.0], [0.0, 8.0, 0.0]]
    assert box.tolist() == [[-1, 1, -1], [-1, 3, -1]]  # the nearest point (4 m) lies in no box
    # A size that does not divide: ceil, as a padded strided backbone gives.
    assert nearest_depth_map(uv, d, torch.zeros(6, dtype=torch.long), (33, 40), 16)[0].shape == (3, 3)


def test_nearest_depth_map_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    img_h, img_w, stride = 40, 56, 8
    n = 600
    uv = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w + 6.0, img_h + 6.0]) - 3.0
    depth = torch.randint(0, 12, (n,), generator=g).double()  # integers: many ties, some zero depths
    box = torch.randint(-1, 5, (n,), generator=g)
    got_d, got_b = nearest_depth_map(uv, depth, box, (img_h, img_w), stride)

    h, w = math.ceil(img_h / stride), math.ceil(img_w / stride)
    want_d, want_b = torch.zeros(h, w), torch.full((h, w), -1)
    best = {}
    for p in range(n):
        u, v, d = uv[p, 0].item(), uv[p, 1].item(), depth[p].item()
        if d <= 0 or not (-0.5 <= u < img_w - 0.5 and -0.5 <= v < img_h - 0.5):
            continue
        cell = (math.floor((v + 0.5) / stride), math.floor((u + 0.5) / stride))
        if cell not in best or d < best[cell][0]:  # strict: the first of equal depths stays
            best[cell] = (d, int(box[p]))
    for (r, c), (d, b) in best.items():
        want_d[r, c], want_b[r, c] = d, b
    assert torch.equal(got_d, want_d) and torch.equal(got_b, want_b)


# --- dense depth -------------------------------------------------------------------------------------------------


def test_dense_depth_empty_is_zero_with_graph() -> None:
    logits = torch.randn(2, BINS.num, 3, 4, requires_grad=True)
    depth = torch.zeros(2, 3, 4)
    depth[0, 0, 0] = 30.0  # beyond d_max: not a valid cell either
    loss = DenseDepthLoss(BINS)(logits, depth)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_dense_depth_values_and_range() -> None:
    two = depth_bins(1.0, 3.0, 1.0)
    loss_fn = DenseDepthLoss(two)
    # Uniform over 2 bins: each cell costs -log(0.5) for the hit bin and -log(1 - 0.5) for the other = 2 ln 2.
    depth = torch.tensor([[[1.0, 2.5]]])  # bins 0 and 1
    uniform = loss_fn(torch.zeros(1, 2, 1, 2), depth)
    assert uniform.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    perfect = torch.tensor([[20.0, -20.0], [-20.0, 20.0]])[None, :, None, :]  # (1, D, 1, 2): [bin, cell]
    assert loss_fn(perfect, depth).item() < 1e-6 < uniform.item()

    # Out of range is dropped, not clamped: a cell at 3.0 (= d_max) or 7 m changes nothing, even though its logits
    # would be penalised if it were clamped into bin 1; d = d_min is bin 0 and counts.
    logits = torch.randn(1, 2, 1, 4, generator=torch.Generator().manual_seed(1))
    base = loss_fn(logits[..., :2], depth)
    for far in (3.0, 7.0):
        assert loss_fn(logits, torch.tensor([[[1.0, 2.5, far, 0.0]]])).item() == pytest.approx(base.item())
    assert loss_fn(logits[..., :1], torch.tensor([[[1.0]]])).item() > 0


def test_dense_depth_half_precision_input() -> None:
    logits = torch.randn(2, BINS.num, 3, 4, generator=torch.Generator().manual_seed(2))
    depth = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(3)) * 10
    loss_fn = DenseDepthLoss(BINS)
    want = loss_fn(logits.half().float(), depth)
    got = loss_fn(logits.half(), depth.half())
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-2)


# --- inner depth -------------------------------------------------------------------------------------------------


def test_inner_depth_empty_is_zero_with_graph() -> None:
    logits = torch.randn(2, BINS.num, 3, 4, requires_grad=True)
    depth = torch.full((2, 3, 4), 5.0)
    loss = InnerDepthLoss()(logits, BINS.centers_m(), depth, torch.full((2, 3, 4), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_inner_depth_hand_value() -> None:
    # Box 0: GT 2.2, 3.0, 5.0 and predictions 2.5, 4.5, 6.5 -> errors 0.3, 1.5, 1.5, so the first cell is the
    # reference; relative predictions (0, 2, 4) vs relative GT (0, 0.8, 2.8) -> residuals 0, 1.2, 1.2.
    # Box 1: predictions = GT + 1.3 everywhere -> relative depth is right -> 0. Background cell: ignored.
    gt = torch.tensor([[[2.2, 3.0, 5.0, 4.0, 3.2, 6.2]]])
    pred = torch.tensor([[[2.5, 4.5, 6.5, 1.5, 4.5, 7.5]]])
    boxes = torch.tensor([[[0, 0, 0, -1, 1, 1]]])
    loss = InnerDepthLoss()(onehot_logits(pred), BINS.centers_m(), gt, boxes)
    assert loss.item() == pytest.approx(2 * 1.2 ** 2 / 5, rel=1e-5)
    # A constant offset over an object costs nothing.
    const = InnerDepthLoss()(onehot_logits(pred), BINS.centers_m(), gt, torch.tensor([[[-1, -1, -1, -1, 1, 1]]]))
    assert const.item() == pytest.approx(0.0, abs=1e-10)


def test_inner_depth_one_reference_per_image_and_box() -> None:
    # The same box seen by two cameras, with different constant offsets: two references -> 0 (one shared
    # reference would leave a 2 m step between the images). A one-cell pair contributes exactly 0.
    gt = torch.tensor([[[2.0, 3.0, 4.0]], [[5.0, 6.0, 7.0]], [[3.0, 8.5, 8.5]]])
    pred = torch.tensor([[[3.5, 4.5, 5.5]], [[4.5, 5.5, 6.5]], [[8.5, 8.5, 8.5]]])
    boxes = torch.tensor([[[0, 0, 0]], [[0, 0, 0]], [[2, -1, -1]]])
    assert InnerDepthLoss()(onehot_logits(pred), BINS.centers_m(), gt, boxes).item() == 0.0


def test_inner_depth_out_of_range_cells_are_not_foreground() -> None:
    gt = torch.tensor([[[2.2, 3.0, 5.0, 20.0]]])  # 20 m lies beyond the last bin (9 m)
    pred = torch.tensor([[[2.5, 4.5, 6.5, 8.5]]])
    logits = onehot_logits(pred)
    inner = InnerDepthLoss()(logits, BINS.centers_m(), gt, torch.tensor([[[0, 0, 0, 0]]]))
    without = InnerDepthLoss()(logits, BINS.centers_m(), gt, torch.tensor([[[0, 0, 0, -1]]]))
    assert inner.item() == pytest.approx(without.item()) == pytest.approx(2 * 1.2 ** 2 / 3, rel=1e-5)
    # Counting it would add ((8.5 - 2.5) - (20 - 2.2))^2 = 11.8^2 over 4 cells.
    counted = InnerDepthLoss(in_range_only=False)(logits, BINS.centers_m(), gt, torch.tensor([[[0, 0, 0, 0]]]))
    assert counted.item() == pytest.approx((2 * 1.2 ** 2 + 11.8 ** 2) / 4, rel=1e-5)


def test_inner_depth_reference_is_detached() -> None:
    g = torch.Generator().manual_seed(4)
    m, h, w = 2, 3, 4
    logits = torch.randn(m, BINS.num, h, w, generator=g, requires_grad=True)
    gt = 1.0 + 8.0 * torch.rand(m, h, w, generator=g)
    boxes = torch.randint(-1, 2, (m, h, w), generator=g)
    loss = InnerDepthLoss()(logits, BINS.centers_m(), gt, boxes)
    loss.backward()
    assert logits.grad is not None
    grad_norm = logits.grad.abs().sum(dim=1)  # (m, h, w)

    d_hat = (logits.detach().softmax(dim=1) * BINS.centers_m()[:, None, None]).sum(dim=1)
    err = (d_hat - gt).abs()
    refs = set()
    for i in range(m):
        for b in boxes[i].unique().tolist():
            if b >= 0:
                e = torch.where(boxes[i] == b, err[i], math.inf)
                refs.add((i, *divmod(int(e.argmin()), w)))
    assert len(refs) == 4  # two boxes in each image
    for i in range(m):
        for y in range(h):
            for x in range(w):
                if (i, y, x) in refs or boxes[i, y, x] < 0:
                    assert grad_norm[i, y, x] == 0.0  # exactly: no gradient reaches the reference
                else:
                    assert grad_norm[i, y, x] > 0.0


# --- inner-feature distillation ----------------------------------------------------------------------------------


def make_distill(cs: int = 3, ct: int = 5, **kw) -> InnerFeatureDistillation:
    torch.manual_seed(0)
    return InnerFeatureDistillation(cs, ct, student_grid=GRID_S, teacher_grid=GRID_T, **kw)


def random_inputs(b: int = 2, m: int = 3, k: int = 6, cs: int = 3, ct: int = 5, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, cs, *GRID_S.shape_hw, generator=g, requires_grad=True)
    teacher = torch.randn(b, ct, *GRID_T.shape_hw, generator=g)
    kp = (torch.rand(b, m, k, 2, generator=g) - 0.5) * 7.8  # inside [-3.9, 3.9]
    kp_t = (torch.rand(b, m, k, 2, generator=g) - 0.5) * 7.8  # the teacher's (un-augmented) frame
    return student, teacher, kp, kp_t, torch.ones(b, m, dtype=torch.bool)


def test_distill_no_boxes_gives_zeros() -> None:
    loss_fn = make_distill()
    student, teacher, kp, kp_t, mask = random_inputs()
    for kp_, kp_t_, mask_ in ((kp, kp_t, torch.zeros_like(mask)),  # every box is padding
                              (kp[:, :0], kp_t[:, :0], mask[:, :0])):  # M_max = 0
        out = loss_fn(student, kp_, mask_, teacher_bev=teacher, teacher_keypoints_xy=kp_t_)
        assert out["inter_keypoint"].item() == 0.0 and out["inter_channel"].item() == 0.0
        assert loss_fn.last_unweighted["boxes"].item() == 0
        student.grad = None
        loss_fn.zero_grad()
        sum(out.values()).backward()
        assert student.grad is not None and not student.grad.any()
        assert loss_fn.adapter.weight.grad is not None and torch.isfinite(loss_fn.adapter.weight.grad).all()


def test_relation_losses_hand_values() -> None:
    # Student keypoint features e0, e1: both Grams are the identity. Teacher features e0, e0.
    f_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (Nb=1, K=2, C=2)
    f_t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    # Keypoint Gram of the teacher [[1, 1], [1, 1]] -> rows (1, 1) / sqrt 2: each row differs by 2 - sqrt 2.
    assert inter_keypoint_loss(f_s, f_t, valid).item() == pytest.approx(2 - math.sqrt(2), rel=1e-6)
    # Channel Gram of the teacher [[2, 0], [0, 0]] -> rows (1, 0), (0, 0): row 1 differs by 1; mean over 2 rows.
    assert inter_channel_loss(f_s, f_t, valid).item() == pytest.approx(0.5, rel=1e-6)
    assert inter_keypoint_loss(f_s, f_s, valid).item() == 0.0 and inter_channel_loss(f_t, f_t, valid).item() == 0.0


def test_distill_identical_student_and_teacher_is_zero() -> None:
    loss_fn = InnerFeatureDistillation(4, 4, student_grid=GRID_S, teacher_grid=GRID_S)
    with torch.no_grad():
        loss_fn.adapter.weight.copy_(torch.eye(4))
        loss_fn.adapter.bias.zero_()
    student = torch.randn(2, 4, *GRID_S.shape_hw, generator=torch.Generator().manual_seed(6))
    _, _, kp, _, mask = random_inputs()
    out = loss_fn(student, kp, mask, teacher_bev=student.clone(), teacher_keypoints_xy=kp)
    assert out["inter_keypoint"].item() == pytest.approx(0.0, abs=1e-10)
    assert out["inter_channel"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss_fn.last_unweighted["boxes"].item() == 6


def test_distill_weights_scale_invariance_and_teacher_forms() -> None:
    loss_fn = make_distill()
    student, teacher, kp, kp_t, mask = random_inputs()
    out = loss_fn(student, kp, mask, teacher_bev=teacher, teacher_keypoints_xy=kp_t)
    raw = dict(loss_fn.last_unweighted)
    assert raw["inter_keypoint"] > 0 and raw["inter_channel"] > 0
    assert out["inter_keypoint"].item() == pytest.approx(100 * raw["inter_keypoint"].item(), rel=1e-6)
    assert out["inter_channel"].item() == pytest.approx(10 * raw["inter_channel"].item(), rel=1e-6)

    # Row-normalised Grams: scaling either map by a positive constant changes nothing.
    scaled = loss_fn.unweighted(2.5 * student, kp, mask, teacher_bev=0.3 * teacher, teacher_keypoints_xy=kp_t)
    assert scaled["inter_keypoint"].item() == pytest.approx(raw["inter_keypoint"].item(), rel=1e-5)

    # Teacher features sampled beforehand (the cache's form) give the same losses as the teacher map.
    feats_t, valid_t = sample_bev(teacher, kp_t.reshape(2, -1, 2), GRID_T)
    cached = loss_fn.unweighted(student, kp, mask, teacher_keypoint_feats=feats_t.reshape(2, 3, 6, 5),
                                teacher_keypoint_valid=valid_t.reshape(2, 3, 6))
    for key in ("inter_keypoint", "inter_channel"):
        assert cached[key].item() == pytest.approx(raw[key].item(), rel=1e-6)


def test_distill_gradients_reach_student_and_adapter_only() -> None:
    loss_fn = make_distill()
    student, teacher, kp, kp_t, mask = random_inputs()
    teacher.requires_grad_(True)
    out = loss_fn(student, kp, mask, teacher_bev=teacher, teacher_keypoints_xy=kp_t)
    sum(out.values()).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert loss_fn.adapter.weight.grad is not None and loss_fn.adapter.weight.grad.abs().sum() > 0
    feats = torch.randn(2, 3, 6, 5, requires_grad=True)
    sum(loss_fn(student, kp, mask, teacher_keypoint_feats=feats).values()).backward()
    assert feats.grad is None


def test_distill_keypoints_outside_a_map_are_masked() -> None:
    loss_fn = make_distill()
    student, teacher, kp, kp_t, _ = random_inputs(b=1, m=1, k=8)
    # Move the box so that 3 of its 8 keypoints leave the map (x >= 4 m) in both frames.
    shift = torch.zeros(1, 1, 8, 2)
    shift[..., :3, 0] = 10.0  # x in [6.1, 13.9]
    kp_off, kp_t_off = kp + shift, kp_t + shift
    mask = torch.ones(1, 1, dtype=torch.bool)
    got = loss_fn.unweighted(student, kp_off, mask, teacher_bev=teacher, teacher_keypoints_xy=kp_t_off)
    # Documented choice: the box's loss is the loss on its valid keypoints alone (rows averaged over those).
    want = loss_fn.unweighted(student, kp[:, :, 3:], mask, teacher_bev=teacher, teacher_keypoints_xy=kp_t[:, :, 3:])
    for key in ("inter_keypoint", "inter_channel"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5)
    (got["inter_keypoint"] + got["inter_channel"]).backward()  # zeroed Gram rows: finite gradients
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # Off the teacher map only (its frame is not the student's) masks the keypoint just the same.
    got_t = loss_fn.unweighted(student, kp, mask, teacher_bev=teacher, teacher_keypoints_xy=kp_t_off)
    want_t = loss_fn.unweighted(student, kp[:, :, 3:], mask, teacher_bev=teacher,
                                teacher_keypoints_xy=kp_t[:, :, 3:])
    assert got_t["inter_keypoint"].item() == pytest.approx(want_t["inter_keypoint"].item(), rel=1e-5)

    # A box with fewer than 2 valid keypoints is dropped, as if it were padding.
    student2, teacher2, kp2, kp_t2, mask2 = random_inputs(b=1, m=2, k=8)
    kp2[0, 1, 1:, 0] = 10.0
    kept = loss_fn.unweighted(student2, kp2, mask2, teacher_bev=teacher2, teacher_keypoints_xy=kp_t2)
    assert kept["boxes"].item() == 1
    only = loss_fn.unweighted(student2, kp2, torch.tensor([[True, False]]), teacher_bev=teacher2,
                              teacher_keypoints_xy=kp_t2)
    assert kept["inter_keypoint"].item() == only["inter_keypoint"].item()
    sum(kept[k] for k in ("inter_keypoint", "inter_channel")).backward()
    assert torch.isfinite(student2.grad).all()


def test_distill_is_float32_under_autocast() -> None:
    loss_fn = make_distill()
    student, teacher, kp, kp_t, mask = random_inputs()
    want = loss_fn.unweighted(student, kp, mask, teacher_bev=teacher, teacher_keypoints_xy=kp_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn.unweighted(student.bfloat16(), kp, mask, teacher_bev=teacher.bfloat16(),
                                 teacher_keypoints_xy=kp_t)
    assert got["inter_keypoint"].dtype == torch.float32
    assert got["inter_keypoint"].item() == pytest.approx(want["inter_keypoint"].item(), rel=0.05)


# --- dense feature MSE (baseline) --------------------------------------------------------------------------------


def test_dense_feature_mse() -> None:
    loss_fn = DenseFeatureMSE(3, 2, student_grid=GRID_S, teacher_grid=GRID_T)
    with torch.no_grad():
        loss_fn.adapter.weight.zero_()
        loss_fn.adapter.bias.copy_(torch.tensor([1.0, 3.0]))  # adapted student: constant (1, 3) everywhere
    student = torch.randn(1, 3, 8, 8, requires_grad=True)
    teacher = torch.zeros(1, 2, 4, 4)  # coarser: the student is resampled onto the teacher's cells
    assert loss_fn(student, teacher).item() == pytest.approx((1 + 9) / 2)
    teacher[0, :, 0, 0] = torch.tensor([1.0, 1.0])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    assert loss_fn(student, teacher, mask).item() == pytest.approx((0 + 4) / 2)
    empty = loss_fn(student, teacher, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert student.grad is not None
    with pytest.raises(ValueError, match="different ranges"):
        DenseFeatureMSE(3, 2, student_grid=GRID_S, teacher_grid=BevGrid.square(8.0, 2.0))


def _reference_row_distances(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """The relation term as written in METHOD.md: normalise each Gram row, subtract, square, sum over the row."""
    g_s = torch.nn.functional.normalize(f_s @ f_s.transpose(1, 2), dim=-1)
    g_t = torch.nn.functional.normalize(f_t @ f_t.transpose(1, 2), dim=-1)
    return (g_s - g_t).square().sum(dim=-1)


def test_relation_losses_equal_the_normalised_gram_formula_values_and_gradients() -> None:
    gen = torch.Generator().manual_seed(11)
    f_s = torch.randn(3, 7, 5, generator=gen)
    f_t = torch.randn(3, 7, 5, generator=gen)
    f_s[1, 2] = 0.0  # an all-zero student keypoint: a zero Gram row against a non-zero teacher row
    f_t[2, 4] = 0.0
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, 5:] = False
    a = f_s.clone().requires_grad_(True)
    b = f_s.clone().requires_grad_(True)
    got = inter_keypoint_loss(a, f_t, valid) + inter_channel_loss(a, f_t, valid)
    m = valid[..., None].float()
    want = _reference_row_distances(b * m, f_t * m).sum(-1) / valid.sum(-1) \
        + _reference_row_distances((b * m).transpose(1, 2), (f_t * m).transpose(1, 2)).mean(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
