"""Camera student: ResNet names and weight loading, frustum geometry, LSS splat, camera vector, presets, training step.

Geometry cases are hand-computable: a camera at the lidar origin looking along lidar +y (lidar x right, y forward,
z up; camera x right, y down, z forward), so camera (x, y, z) = lidar (x, -z, y).
"""

from __future__ import annotations

import math

import pytest
import torch

from tigbev.data.camera_batch import CameraBatch
from tigbev.data.classes import DETECTION_CLASSES
from tigbev.geometry import BevGrid
from tigbev.models.losses import DenseDepthLoss
from tigbev.models.student import (
    CameraStudent,
    ResNet,
    StudentConfig,
    WeightsError,
    load_torchvision_weights,
    student_preset,
)
from tigbev.models.student.lss import (
    CAMERA_VECTOR_DIM,
    camera_vector,
    feature_pixel_centers,
    frustum_points,
    pool_to_bev,
)

GRID = BevGrid.square(51.2, 1.6)  # 64 x 64, the demo grid
# K of a 96 x 64 (W x H) image: feature map 4 x 6 at stride 16.
K_SMALL = torch.tensor([[100.0, 0.0, 50.0], [0.0, 100.0, 30.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
FORWARD_CAM = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)


def cam_from_lidar_at(yaw_rad: float, offset_m: float = 0.5, height_m: float = 0.0) -> torch.Tensor:
    """A camera looking along lidar direction (cos yaw, sin yaw, 0), ``offset_m`` out from the origin."""
    forward = torch.tensor([math.cos(yaw_rad), math.sin(yaw_rad), 0.0], dtype=torch.float64)
    right = torch.tensor([math.sin(yaw_rad), -math.cos(yaw_rad), 0.0], dtype=torch.float64)
    down = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    lidar_from_cam = torch.eye(4, dtype=torch.float64)
    lidar_from_cam[:3, 0], lidar_from_cam[:3, 1], lidar_from_cam[:3, 2] = right, down, forward
    lidar_from_cam[:3, 3] = offset_m * forward + torch.tensor([0.0, 0.0, height_m], dtype=torch.float64)
    return torch.linalg.inv(lidar_from_cam)


def six_camera_batch(cfg: StudentConfig, b: int = 1, seed: int = 0) -> CameraBatch:
    """B samples of a 6-camera ring, 480 x 270 originals resized and bottom-cropped to the preset's input."""
    g = torch.Generator().manual_seed(seed)
    n = 6
    h, w = cfg.input_hw
    s = w / 480
    k = torch.tensor([[300.0, 0, 240], [0, 300, 135], [0, 0, 1]])
    aug = torch.tensor([[s, 0, 0], [0, s, -(270 * s - h)], [0, 0, 1]])
    rig = torch.stack([cam_from_lidar_at(math.pi / 2 + 2 * math.pi * i / n, height_m=0.2) for i in range(n)]).float()
    fh, fw = cfg.feature_hw
    return CameraBatch(
        tokens=[f"s{i}" for i in range(b)], images=torch.randn(b, n, 3, h, w, generator=g),
        intrinsics=k.expand(b, n, 3, 3).clone(), cam_from_lidar=rig.expand(b, n, 4, 4).clone(),
        aug_px_from_px=aug.expand(b, n, 3, 3).clone(), aug_from_lidar=torch.eye(4).expand(b, 4, 4).clone(),
        gt_boxes=[torch.tensor([[3.0, 12.0, -0.9, 4.5, 1.9, 1.6, 0.3, 1.0, 0.0]])] * b,
        gt_labels=[torch.tensor([DETECTION_CLASSES.index("car")])] * b,
        depth_m=torch.rand(b, n, fh, fw, generator=g) * 70, depth_box=torch.full((b, n, fh, fw), -1),
    )


# ------------------------------------------------------------------------------------------------------ ResNet


def test_resnet_matches_torchvision_layout() -> None:
    # torchvision's parameter counts without fc (resnet18 11,689,512 / resnet34 21,797,672 / resnet50 25,557,032
    # minus the 1000-way classifier) and state-dict sizes (122 / 218 / 320 entries with fc.weight and fc.bias).
    fc = {"resnet18": 512 * 1000 + 1000, "resnet34": 512 * 1000 + 1000, "resnet50": 2048 * 1000 + 1000}
    total = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
    entries = {"resnet18": 122, "resnet34": 218, "resnet50": 320}
    for name in ("resnet18", "resnet34", "resnet50"):
        net = ResNet(name, out_layers=(1, 2, 3, 4))
        assert sum(p.numel() for p in net.parameters()) == total[name] - fc[name], name
        keys = net.state_dict().keys()
        assert len(keys) + 2 == entries[name], name
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.num_batches_tracked", "layer4.2.bn3.bias"} <= set(keys)  # resnet50's
    assert "layer3.5.downsample.0.weight" not in keys  # only a layer's first block has a shortcut conv


def test_resnet_strides_and_small_variant() -> None:
    net = ResNet("resnet18", width=8, out_layers=(1, 2, 3, 4))
    outs = net(torch.randn(2, 3, 70, 100))  # odd sizes: every stride rounds up
    assert [tuple(o.shape) for o in outs] == [(2, 8, 18, 25), (2, 16, 9, 13), (2, 32, 5, 7), (2, 64, 3, 4)]
    assert net.out_strides == (4, 8, 16, 32) and net.out_channels == (8, 16, 32, 64)
    short = ResNet("resnet50", width=4, out_layers=(2, 3))
    assert not hasattr(short, "layer4") and short.out_channels == (32, 64)
    with pytest.raises(ValueError, match="out_layers"):
        ResNet("resnet18", out_layers=(4, 3))


def test_load_torchvision_weights_round_trip_and_errors(tmp_path) -> None:
    torch.manual_seed(0)
    src = ResNet("resnet18", width=8, out_layers=(1, 2, 3, 4))
    for m in src.modules():  # non-trivial BN statistics so the round trip checks buffers too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    # torchvision format: its names, a classifier, no num_batches_tracked (as in its older ImageNet files).
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 64), torch.randn(1000)
    path = tmp_path / "resnet18-tv.pth"
    torch.save(state, path)

    dst = ResNet("resnet18", width=8, out_layers=(3, 4))
    load_torchvision_weights(dst, path)
    for k, v in dst.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, state[k]), k
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(dst.eval()(x)[1], src.eval()(x)[3])
    load_torchvision_weights(ResNet("resnet18", width=8, out_layers=(2, 3)), path)  # layer4 ignored: not built

    del state["layer2.0.downsample.0.weight"]
    torch.save(state, path)
    fresh = ResNet("resnet18", width=8)
    before = fresh.conv1.weight.clone()
    with pytest.raises(WeightsError, match=r"missing 1 tensors: layer2\.0\.downsample\.0\.weight"):
        load_torchvision_weights(fresh, path)
    assert torch.equal(fresh.conv1.weight, before)  # nothing loaded on error
    with pytest.raises(WeightsError, match=r"mis-shaped tensors: conv1\.weight: file \(8, 3, 7, 7\)"):
        load_torchvision_weights(ResNet("resnet18", width=16), path)
    torch.save({**state, "layer2.0.downsample.0.weight": torch.zeros(16, 8, 1, 1), "head.w": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"unexpected 1 tensors: head\.w"):
        load_torchvision_weights(ResNet("resnet18", width=8), path)
    with pytest.raises(WeightsError, match="not found"):
        load_torchvision_weights(dst, tmp_path / "absent.pth")


# ------------------------------------------------------------------------------------------------------ frustum


def _identity_mats(cam_from_lidar: torch.Tensor, k: torch.Tensor = K_SMALL):
    return (k[None, None], cam_from_lidar[None, None], torch.eye(3, dtype=torch.float64)[None, None],
            torch.eye(4, dtype=torch.float64)[None])


def test_feature_cell_centres() -> None:
    uv = feature_pixel_centers((4, 6), 16)
    # Cell (i, j) covers [16 j - 0.5, 16 (j + 1) - 0.5): centre 16 j + 7.5.
    assert uv[1, 2].tolist() == [39.5, 23.5] and uv[0, 0].tolist() == [7.5, 7.5]


def test_frustum_point_by_hand() -> None:
    # Cell (1, 2) of a 96 x 64 image: pixel (39.5, 23.5); at 10.5 m, camera x = 10.5 (39.5 - 50) / 100 = -1.1025,
    # camera y = 10.5 (23.5 - 30) / 100 = -0.6825 -> lidar (x, y, z) = (-1.1025, 10.5, 0.6825).
    k, cfl, aug, aug_from_lidar = _identity_mats(FORWARD_CAM)
    pts = frustum_points(k, cfl, aug, aug_from_lidar, (4, 6), 16, torch.tensor([1.5, 10.5]))
    assert pts.shape == (1, 1, 2, 4, 6, 3)
    torch.testing.assert_close(pts[0, 0, 1, 1, 2], torch.tensor([-1.1025, 10.5, 0.6825], dtype=torch.float64))


def test_frustum_round_trip_through_all_matrices() -> None:
    """Any cell at any depth projects back (inverse aug_from_lidar, cam_from_lidar, K, aug_px_from_px) onto its own
    pixel centre."""
    cfl = cam_from_lidar_at(0.7, offset_m=1.3, height_m=0.4)
    c, s = 0.62 * math.cos(0.09), 0.62 * math.sin(0.09)
    aug_px_from_px = torch.tensor([[-c, s, 120.0], [s, c, -40.0], [0, 0, 1]], dtype=torch.float64)  # flip, rotate, crop
    aug_from_lidar = torch.eye(4, dtype=torch.float64)
    r, sc = math.radians(20.0), 1.05
    aug_from_lidar[:3, :3] = sc * torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)) @ torch.tensor(
        [[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]], dtype=torch.float64)
    depths = torch.tensor([2.5, 17.5, 59.5])
    pts = frustum_points(K_SMALL[None, None], cfl[None, None], aug_px_from_px[None, None], aug_from_lidar[None], (4, 6),
                         16, depths)
    homog = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1)[0, 0]  # (D, h, w, 4)
    cam = homog @ (cfl @ torch.linalg.inv(aug_from_lidar)).T
    torch.testing.assert_close(cam[..., 2], depths.double()[:, None, None].expand(3, 4, 6))
    pix = (cam[..., :3] / cam[..., 2:3]) @ (aug_px_from_px @ K_SMALL).T
    torch.testing.assert_close(pix[..., :2], feature_pixel_centers((4, 6), 16).expand(3, 4, 6, 2))


# ------------------------------------------------------------------------------------------------------ splat


def _one_feature_bev(aug_from_lidar: torch.Tensor, z_range=(-5.0, 3.0)) -> torch.Tensor:
    """Context 1.0 in channel 1 at cell (1, 2) only, depth one-hot on the 10.5 m bin everywhere."""
    k, cfl, aug, _ = _identity_mats(FORWARD_CAM)
    depths = torch.arange(59) + 1.5  # the TiG bins [1, 60)
    pts = frustum_points(k, cfl, aug, aug_from_lidar[None], (4, 6), 16, depths)
    prob = torch.zeros(1, 59, 4, 6)
    prob[:, 9] = 1.0  # bin 9: centre 10.5 m
    ctx = torch.zeros(1, 3, 4, 6)
    ctx[0, 1, 1, 2] = 1.0
    return pool_to_bev(pts, prob, ctx, GRID, z_range)


def test_single_feature_lands_in_hand_computed_cell() -> None:
    # Lidar point (-1.1025, 10.5, 0.6825): ix = floor((-1.1025 + 51.2) / 1.6) = 31, iy = floor(61.7 / 1.6) = 38.
    eye = torch.eye(4, dtype=torch.float64)
    bev = _one_feature_bev(eye)
    assert bev.shape == (1, 3, 64, 64)
    assert bev[0, 1, 38, 31] == 1.0 and bev.sum() == 1.0
    flip_x = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))  # x = +1.1025: ix = 32
    assert _one_feature_bev(flip_x)[0, 1, 38, 32] == 1.0
    rot90 = torch.tensor([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    # (x, y) -> (-y, x) = (-10.5, -1.1025): ix = floor(40.7 / 1.6) = 25, iy = floor(50.0975 / 1.6) = 31.
    assert _one_feature_bev(rot90)[0, 1, 31, 25] == 1.0
    assert _one_feature_bev(eye, z_range=(-5.0, 0.5)).sum() == 0.0  # z = 0.6825 is above the pillar: dropped


def test_horizontal_flip_of_image_gives_the_same_bev() -> None:
    """Mirrored features + a flip aug_px_from_px (u' = W - 1 - u) see the same rays: the pooled map is unchanged."""
    torch.manual_seed(0)
    k, cfl, eye3, aug_from_lidar = _identity_mats(cam_from_lidar_at(1.2, height_m=1.0))
    flip = torch.tensor([[-1.0, 0, 95.0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)[None, None]  # W = 96
    depths = torch.arange(59) + 1.5
    prob = torch.randn(1, 59, 4, 6).softmax(1)
    ctx = torch.randn(1, 5, 4, 6)
    plain = pool_to_bev(frustum_points(k, cfl, eye3, aug_from_lidar, (4, 6), 16, depths), prob, ctx, GRID, (-5.0, 3.0))
    mirrored = pool_to_bev(frustum_points(k, cfl, flip, aug_from_lidar, (4, 6), 16, depths), prob.flip(-1),
                           ctx.flip(-1), GRID, (-5.0, 3.0))
    assert plain.abs().sum() > 0
    torch.testing.assert_close(mirrored, plain)


def test_vectorised_pooling_equals_naive_loop() -> None:
    g = torch.Generator().manual_seed(3)
    b, n, d, h, w, c = 2, 2, 3, 2, 3, 4
    grid = BevGrid.square(2.0, 1.0)  # 4 x 4
    pts = (torch.rand(b, n, d, h, w, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([6.0, 6.0, 3.0],
                                                                                               dtype=torch.float64)
    prob = torch.rand(b * n, d, h, w, generator=g)
    ctx = torch.randn(b * n, c, h, w, generator=g)
    expected = torch.zeros(b, c, 4, 4)
    for bi in range(b):
        for ni in range(n):
            for di in range(d):
                for i in range(h):
                    for j in range(w):
                        x, y, z = pts[bi, ni, di, i, j].tolist()
                        ix, iy = math.floor(x + 2.0), math.floor(y + 2.0)
                        if 0 <= ix < 4 and 0 <= iy < 4 and -1.0 <= z < 1.0:
                            expected[bi, :, iy, ix] += prob[bi * n + ni, di, i, j] * ctx[bi * n + ni, :, i, j]
    got = pool_to_bev(pts, prob, ctx, grid, (-1.0, 1.0))
    assert 0 < (expected != 0).any(1).sum() < b * 16  # some cells hit, some points dropped
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------------------ camera vector


def test_camera_vector_entries() -> None:
    k = torch.tensor([[300.0, 0, 240], [0, 310, 135], [0, 0, 1]]).expand(1, 2, 3, 3).clone()
    cfl = torch.stack([cam_from_lidar_at(0.0, offset_m=1.0), cam_from_lidar_at(1.0)]).float()[None]
    aug = torch.tensor([[0.5, 0.1, 3.0], [-0.1, 0.5, -7.0], [0, 0, 1]]).expand(1, 2, 3, 3)
    aug_from_lidar = torch.diag(torch.tensor([-1.05, 1.05, 1.05, 1.0]))[None]
    vec = camera_vector(k, aug, aug_from_lidar, cfl)
    assert vec.shape == (1, 2, CAMERA_VECTOR_DIM) == (1, 2, 27)
    assert vec[0, 0, :15].tolist() == pytest.approx([300, 310, 240, 135, 0.5, 0.1, 3, -0.1, 0.5, -7,
                                                     -1.05, 0, 0, 1.05, 1.05])
    lidar_from_cam = torch.linalg.inv(cfl[0, 0])
    torch.testing.assert_close(vec[0, 0, 15:], lidar_from_cam[:3, :4].reshape(12))
    assert vec[0, 0, 18].item() == pytest.approx(1.0)  # camera 0 sits 1 m along lidar +x
    k2 = k.clone()
    k2[0, 1, 0, 0] = 350.0
    changed = camera_vector(k2, aug, aug_from_lidar, cfl) != vec
    assert changed[0, 1, 0] and changed.sum() == 1


# ------------------------------------------------------------------------------------------------------ presets


def test_presets() -> None:
    nus = student_preset("nuscenes")
    assert (nus.input_hw, nus.feature_hw, nus.depth_bins.num, nus.bev_grid.shape_hw) == ((256, 704), (16, 44), 59,
                                                                                          (128, 128))
    assert (nus.backbone, nus.neck_channels, nus.context_channels, nus.bev_channels) == ("resnet50", 512, 80, 256)
    demo = student_preset("demo", "bevdet")
    assert demo.variant == "bevdet" and demo.bev_grid.is_close(BevGrid.square(51.2, 1.6))  # = demo teacher grid
    assert StudentConfig(depth_min_m=2.0, depth_max_m=58.0, depth_step_m=0.5).depth_bins.num == 112  # BEVDepth
    assert StudentConfig.from_dict(demo.to_dict()) == demo
    with pytest.raises(ValueError, match="StudentConfig.variant"):
        StudentConfig(variant="bevformer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="StudentConfig.z_max_m"):
        StudentConfig(z_min_m=3.0, z_max_m=-5.0)
    with pytest.raises(ValueError, match="whole number"):
        StudentConfig(cell_m=0.7)
    with pytest.raises(ValueError, match="unknown student preset"):
        student_preset("large")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def demo_model_and_batch() -> tuple[CameraStudent, CameraBatch]:
    torch.manual_seed(0)
    cfg = student_preset("demo", "bevdepth")
    return CameraStudent(cfg), six_camera_batch(cfg)


def test_demo_stage_shapes(demo_model_and_batch) -> None:
    model, batch = demo_model_and_batch
    cfg = model.cfg
    assert cfg.input_hw == (128, 352) and cfg.feature_hw == (8, 22)
    with torch.no_grad():
        feats = model.backbone(batch.images.flatten(0, 1))
        assert [tuple(f.shape) for f in feats] == [(6, 128, 8, 22), (6, 256, 4, 11)]
        neck = model.neck(feats)
        assert neck.shape == (6, 128, 8, 22)
        vt = model.view_transform(neck, intrinsics=batch.intrinsics, cam_from_lidar=batch.cam_from_lidar,
                                  aug_px_from_px=batch.aug_px_from_px, aug_from_lidar=batch.aug_from_lidar,
                                  image_hw=cfg.input_hw)
        assert vt.bev.shape == (1, 64, 64, 64) and vt.depth_logits.shape == (6, 59, 8, 22)
        assert (vt.bev.abs().sum(1) > 0).float().mean() > 0.5  # the six cameras cover most of the grid
        out = model(batch)
    assert out.bev_features.shape == (1, 128, 64, 64) and out.depth_logits.shape == (6, 59, 8, 22)
    assert len(out.preds) == len(cfg.tasks)
    for task, pred in zip(cfg.tasks, out.preds, strict=True):
        assert {k: tuple(v.shape[1:]) for k, v in pred.items()} == {
            "heatmap": (len(task), 64, 64), "reg": (2, 64, 64), "height": (1, 64, 64), "dim": (3, 64, 64),
            "rot": (2, 64, 64), "vel": (2, 64, 64)}
    with pytest.raises(ValueError, match="expects images"):
        model(CameraBatch(**{**batch.__dict__, "images": batch.images[..., :64, :]}))


@pytest.mark.parametrize("variant", ["bevdet", "bevdepth"])
def test_demo_training_step_has_finite_gradients(variant: str) -> None:
    torch.manual_seed(1)
    model = CameraStudent(student_preset("demo", variant)).train()
    batch = six_camera_batch(model.cfg, seed=1)
    out = model(batch)
    head_losses = model.head.loss(out.preds, model.head.build_targets(batch.gt_boxes, batch.gt_labels))
    # The detection loss alone must reach the depth net: the splat is differentiable in the depth distribution.
    sum(head_losses.values()).backward(retain_graph=True)
    depth_net = model.view_transform.depth_net
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in depth_net.parameters())
    depth_loss = DenseDepthLoss(model.depth_bins)(out.depth_logits, batch.depth_m.flatten(0, 1))
    depth_loss.backward()
    for name, module in (("depth net", depth_net), ("head", model.head), ("backbone", model.backbone)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
