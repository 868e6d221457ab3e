"""Camera-student data: image augmentation (hand-computable cases, image vs. matrix, inverses), the camera dataset
(augmented depth, boxes and keypoints agree with the raw LiDAR; cache vs. direct depth), cache compatibility,
collation with padding, and DataLoader workers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tigbev.cache.store import CacheError, CacheReader
from tigbev.config import ExtractTeacherConfig
from tigbev.data.augment import (
    BevAugmentPolicy,
    similarity_apply_boxes,
    similarity_apply_points,
)
from tigbev.data.camera_dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CameraDetectionDataset,
    CameraSample,
    collate_camera,
)
from tigbev.data.image_aug import ImageAugPolicy, ImageTransform
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, NuScenesReader
from tigbev.data.targets import training_boxes
from tigbev.geometry import BevGrid, points_in_boxes, project_to_image
from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
from tigbev.models.teacher.checkpoint import save_checkpoint
from tigbev.stages import extract_teacher

SPLIT = "synth_train"
HW = (96, 176)  # network input (H, W) from the synthetic 192 x 108 images: a real resize and crop
STRIDE = 8
MIN_DEPTH_M = 0.5  # ExtractTeacherConfig's default, used by the no-cache path to match the cache
TEACHER = teacher_preset("demo")


# --------------------------------------------------------------------------------------------------- image transform
def _blank(h: int = 60, w: int = 80) -> np.ndarray:
    return np.zeros((h, w, 3), np.uint8)


def test_matrix_on_hand_computable_pixels() -> None:
    # Resize x2: original pixel 0 covers [-0.5, 0.5), i.e. resized [-0.5, 1.5), whose centre is 0.5.
    np.testing.assert_allclose(ImageTransform(scale=2.0, out_wh=(10, 10)).apply_points([[0.0, 0.0], [2.0, 1.0]]),
                               [[0.5, 0.5], [4.5, 2.5]])
    np.testing.assert_allclose(ImageTransform(crop_xy=(3, 4), out_wh=(10, 10)).apply_points([3.0, 4.0]), [0, 0])
    np.testing.assert_allclose(ImageTransform(out_wh=(10, 6), flip=True).apply_points([[0.0, 2.0], [9.0, 5.0]]),
                               [[9.0, 2.0], [0.0, 5.0]])
    # +90 deg about the centre (5, 5) of an 11 x 11 output: counter-clockwise on screen, right of centre -> above.
    np.testing.assert_allclose(ImageTransform(out_wh=(11, 11), rotation_deg=90).apply_points([6.0, 5.0]), [5, 4],
                               atol=1e-12)
    img = np.random.default_rng(0).integers(0, 256, (11, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ImageTransform(out_wh=(11, 11), rotation_deg=90).apply_image(img), np.rot90(img))
    np.testing.assert_array_equal(ImageTransform(crop_xy=(2, 3), out_wh=(5, 4)).apply_image(img), img[3:7, 2:7])


def test_resampled_image_puts_a_pixel_where_the_matrix_says() -> None:
    rng = np.random.default_rng(1)
    checked = 0
    while checked < 40:
        # Upscaling, mild downscaling, and >= 2x downscaling (box reduction first).
        scale = float(rng.choice([rng.uniform(0.7, 1.8), rng.uniform(0.3, 0.5)]))
        t = ImageTransform(scale=scale, crop_xy=(int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), out_wh=(70, 50),
                           rotation_deg=float(rng.uniform(-10, 10)), flip=bool(rng.random() < 0.5))
        img = _blank()
        u0, v0 = int(rng.integers(8, 72)), int(rng.integers(8, 52))
        img[v0, u0] = 255
        want = t.apply_points([u0, v0])
        if not ((want > 3).all() and want[0] < 66 and want[1] < 46):
            continue
        before = img.copy()
        out = t.apply_image(img).astype(np.float64).sum(axis=2)
        np.testing.assert_array_equal(img, before)  # the input is not modified
        row, col = np.unravel_index(out.argmax(), out.shape)
        assert np.abs(np.array([col, row]) - want).max() <= 1.0, (t, want, (col, row))
        vv, uu = np.mgrid[: out.shape[0], : out.shape[1]]
        centroid = np.array([(out * uu).sum(), (out * vv).sum()]) / out.sum()
        assert np.abs(centroid - want).max() < 0.5, (t, want, centroid)
        checked += 1


def test_inverse_round_trip_and_double_flip() -> None:
    rng = np.random.default_rng(2)
    uv = rng.uniform(-50, 250, (100, 2))
    uv_before = uv.copy()
    t = ImageTransform(scale=0.7, crop_xy=(-3, 12), out_wh=(120, 80), rotation_deg=4.2, flip=True)
    np.testing.assert_allclose(t.inverse_points(t.apply_points(uv)), uv, atol=1e-9)
    np.testing.assert_allclose(t.matrix @ t.inverse_matrix, np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(uv, uv_before)
    flip = ImageTransform(out_wh=(80, 60), flip=True)
    np.testing.assert_allclose(flip.matrix @ flip.matrix, np.eye(3))
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(flip.apply_image(flip.apply_image(img)), img)
    np.testing.assert_array_equal(flip.apply_image(img), img[:, ::-1])
    np.testing.assert_array_equal(ImageTransform(out_wh=(80, 60)).apply_image(img), img)


def test_points_outside_the_output_are_masked() -> None:
    t = ImageTransform(crop_xy=(0, 10), out_wh=(20, 10))  # keeps rows 10..19
    uv = t.apply_points([[5.0, 9.0], [5.0, 10.0], [-0.5, 19.49], [19.5, 15.0], [-0.51, 15.0]])
    np.testing.assert_array_equal(t.inside(uv), [False, True, True, False, False])
    # Where the output is padding, the image is 0.
    img = np.full((20, 15, 3), 200, np.uint8)
    out = t.apply_image(img)
    assert (out[:, :15] == 200).all() and (out[:, 15:] == 0).all()


def test_policy_eval_transform_and_sampling_bounds() -> None:
    policy = ImageAugPolicy(input_hw=(256, 704))
    ev = policy.eval_transform((1600, 900))
    # 704 / 1600 = 0.44; resized 704 x 396; the bottom 256 rows are kept: crop y0 = 396 - 256 = 140.
    assert (ev.scale, ev.crop_xy, ev.out_wh, ev.flip, ev.rotation_deg) == (0.44, (0, 140), (704, 256), False, 0.0)
    np.testing.assert_allclose(ev.apply_points([[-0.5, 899.5]]), [[-0.5, 255.5]], atol=1e-9)  # bottom-left corner
    assert ImageAugPolicy.evaluation((256, 704)).sample(np.random.default_rng(0), (1600, 900)) == ev
    # Height-bound: 256 / 900 -> resized 455 x 256, centred crop x0 = (455 - 352) // 2 = 51.
    narrow = ImageAugPolicy(input_hw=(256, 352)).eval_transform((1600, 900))
    assert narrow.scale == pytest.approx(256 / 900) and narrow.crop_xy == (51, 0)
    rng = np.random.default_rng(3)
    samples = [policy.sample(rng, (1600, 900)) for _ in range(300)]
    scales = np.array([t.scale for t in samples])
    assert 0.38 <= scales.min() < 0.40 and 0.53 < scales.max() <= 0.55
    assert max(abs(t.rotation_deg) for t in samples) <= 5.4
    assert 0.4 < np.mean([t.flip for t in samples]) < 0.6
    for t in samples:
        new_w, new_h = math.floor(1600 * t.scale + 1e-6), math.floor(900 * t.scale + 1e-6)
        assert t.crop_xy[1] == new_h - 256  # bottom kept
        lo, hi = min(0, new_w - 704), max(0, new_w - 704)
        assert lo <= t.crop_xy[0] <= hi
    assert len({t.crop_xy[0] for t in samples}) > 50
    same = [policy.sample(np.random.default_rng(3), (1600, 900)) for _ in range(2)]
    assert same[0] == same[1] == samples[0]


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> CacheReader:
    """A foreground fp16 cache of the synthetic train split from a random-weight demo teacher."""
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("camteacher") / "last.pt"
    save_checkpoint(ckpt, {"model": CenterPoint(TEACHER).state_dict(), "teacher_config": TEACHER.to_dict()})
    out = tmp_path_factory.mktemp("camcache") / "cache"
    cfg = ExtractTeacherConfig(teacher_checkpoint=ckpt, dataroot=synth_root, split=SPLIT, out_dir=str(out),
                               shard_samples=2, batch_size=1, workers=0, device="cpu", min_depth_m=MIN_DEPTH_M)
    assert extract_teacher.run(cfg, progress=False).complete
    return CacheReader(str(out))


@pytest.fixture(scope="module")
def reader(synth_root: Path) -> NuScenesReader:
    return NuScenesReader(synth_root)  # key sweep only: the student needs no earlier sweeps


def _dataset(reader: NuScenesReader, cache: CacheReader | None, *, split: str = SPLIT, **kw) -> CameraDetectionDataset:
    hw = kw.pop("input_hw", HW)
    base = {"cache": cache, "input_hw": hw, "feature_stride": STRIDE, "image_policy": ImageAugPolicy(input_hw=hw),
            "bda_policy": BevAugmentPolicy(), "seed": 0, "train": True, "split": split,
            "cache_grid": TEACHER.bev_grid, "point_range_m": TEACHER.point_range_m, "min_depth_m": MIN_DEPTH_M}
    tokens = kw.pop("tokens", None) or reader.sample_tokens(split)
    return CameraDetectionDataset(reader, tokens, **{**base, **kw})


def _inside(points: np.ndarray, boxes: np.ndarray, margin_m: float) -> np.ndarray:
    """points_in_boxes with every box grown (margin > 0) or shrunk (margin < 0) by margin_m on each side."""
    b = np.asarray(boxes, np.float64).copy()
    b[:, 3:6] += 2 * margin_m
    return points_in_boxes(points, b)


# --------------------------------------------------------------------------------------------------- dataset
def test_augmented_depth_boxes_and_keypoints_land_on_the_same_physical_points(reader: NuScenesReader,
                                                                              cache: CacheReader) -> None:
    """Everything is re-derived from raw LiDAR and the batch's own matrices (aug_from_lidar, aug_px_from_px, K,
    cam_from_lidar)."""
    ds = _dataset(reader, cache, image_policy=ImageAugPolicy(input_hw=HW, p_flip=1.0),
                  bda_policy=BevAugmentPolicy(p_flip=1.0), seed=5)
    ds.set_epoch(3)
    idx = 1
    batch = collate_camera([ds[idx]])
    frame = reader.load_sample(ds.tokens[idx])
    stored = cache.read(cache.sample_idx(ds.tokens[idx]))
    aug_from_lidar = batch.aug_from_lidar[0].double().numpy()
    assert abs(math.degrees(math.atan2(abs(aug_from_lidar[1, 0]), abs(aug_from_lidar[0, 0])))) > 0.1  # a real rotation
    boxes_aug = batch.gt_boxes[0].double().numpy()
    np.testing.assert_allclose(boxes_aug, similarity_apply_boxes(aug_from_lidar, stored.boxes), atol=1e-4)
    np.testing.assert_array_equal(batch.gt_labels[0].numpy(), stored.labels)
    assert len(boxes_aug) >= 3

    points_aug = similarity_apply_points(aug_from_lidar, frame.lidar.key_points[:, :3].astype(np.float64))
    in_box = _inside(points_aug, boxes_aug, 0.01)  # (P, M) in the augmented frame
    surely_in = _inside(points_aug, boxes_aug, -0.01).any(axis=1)
    lidar_from_aug = np.linalg.inv(aug_from_lidar)
    fg_cells = 0
    for ci, channel in enumerate(CAMERA_CHANNELS):
        cam = frame.camera(channel)
        # augmented BEV frame -> augmented image pixels, composed from the batch's matrices only
        cam_from_aug = batch.cam_from_lidar[0, ci].double().numpy() @ lidar_from_aug
        proj = project_to_image(points_aug, cam_from_aug, batch.intrinsics[0, ci].double().numpy(),
                                (cam.width, cam.height), min_depth_m=MIN_DEPTH_M)
        a = batch.aug_px_from_px[0, ci].double().numpy()
        uv = proj.uv @ a[:2, :2].T + a[:2, 2]
        cell_f = (uv + 0.5) / STRIDE
        ok = ((uv >= -0.5) & (uv < np.array([HW[1], HW[0]]) - 0.5)).all(axis=1)
        ok &= (np.abs(cell_f - np.round(cell_f)) * STRIDE > 1e-3).all(axis=1)  # no float32 border ambiguity
        col, row = np.floor(cell_f[ok]).astype(int).T
        depth, src = proj.depth_m[ok], proj.index[ok]
        dmap, bmap = batch.depth_m[0, ci].numpy(), batch.depth_box[0, ci].numpy()
        # Nearest point per cell: no visible point is closer than its cell's target.
        assert (dmap[row, col] > 0).all() and (dmap[row, col] <= depth + 1e-4).all()
        # Every foreground target cell holds a point at that depth that lies in that (augmented) GT box.
        for r, c in zip(*np.nonzero(bmap >= 0)):
            here = (row == r) & (col == c) & (np.abs(depth - dmap[r, c]) < 1e-4)
            assert in_box[src[here], bmap[r, c]].any(), (channel, r, c)
            fg_cells += 1
        # And a point surely inside a box that is the nearest of its cell makes the cell foreground.
        nearest = np.abs(depth - dmap[row, col]) < 1e-6
        assert (bmap[row, col][nearest & surely_in[src]] >= 0).all()
    assert fg_cells >= 10

    # The image is the original resampled by aug_px_from_px: compare with a bilinear lookup at orig_from_aug.
    cam = frame.camera(CAMERA_CHANNELS[1])
    orig = cam.load_image().astype(np.float64)
    img = batch.images[0, 1].numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    vv, uu = np.mgrid[: HW[0], : HW[1]]
    px_from_aug_px = np.linalg.inv(batch.aug_px_from_px[0, 1].double().numpy())
    src_uv = np.stack([uu, vv], -1).reshape(-1, 2) @ px_from_aug_px[:2, :2].T
    src_uv += np.linalg.inv(batch.aug_px_from_px[0, 1].double().numpy())[:2, 2]
    inner = (src_uv >= 1).all(axis=1) & (src_uv[:, 0] < cam.width - 2) & (src_uv[:, 1] < cam.height - 2)
    x, y = src_uv[inner].T
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    want = ((1 - fx) * (1 - fy) * orig[y0, x0] + fx * (1 - fy) * orig[y0, x0 + 1] + (1 - fx) * fy * orig[y0 + 1, x0]
            + fx * fy * orig[y0 + 1, x0 + 1])
    got = img.reshape(-1, 3)[inner] * 255
    assert inner.mean() > 0.8 and np.abs(got - want).mean() < 1.0 and np.abs(got - want).max() < 4.0

    # Keypoints: one index, one physical point; student = aug_from_lidar(teacher), inside the augmented enlarged box.
    t = batch.teacher
    assert t is not None and t.box_mask.all()
    np.testing.assert_array_equal(t.kp_teacher_xy[0].numpy(), stored.keypoints)
    np.testing.assert_allclose(t.kp_student_xy[0].double().numpy(), stored.keypoints @ aug_from_lidar[:2, :2].T,
                               atol=1e-4)
    scale = math.sqrt(abs(np.linalg.det(aug_from_lidar[:2, :2])))
    for kp, boxes, grow in ((t.kp_student_xy[0].double().numpy(), boxes_aug, 1.6 * scale),
                            (stored.keypoints.astype(np.float64), stored.boxes, 1.6)):
        for m, box in enumerate(boxes):
            pts = np.column_stack([kp[m], np.full(len(kp[m]), box[2])])
            assert _inside(pts, box[None], grow + 1e-3).all()
            assert not _inside(pts, box[None], grow - 1e-2).all()  # the lattice reaches the enlarged edges
    # The teacher map in the batch is the cache's.
    g = TEACHER.bev_grid
    np.testing.assert_array_equal(t.dense_map(g.ny, g.nx)[0].numpy(), cache.dense_map(stored).astype(np.float16))


def test_without_augmentation_cached_depth_equals_depth_from_lidar(reader: NuScenesReader,
                                                                   cache: CacheReader) -> None:
    full = (108, 192)  # the synthetic image size: the eval transform is the identity
    kw = {"train": False, "image_policy": ImageAugPolicy.evaluation(full), "bda_policy": None, "input_hw": full}
    with_cache, direct = _dataset(reader, cache, **kw), _dataset(reader, None, **kw)
    idx = 2
    a, b = with_cache[idx], direct[idx]
    frame = reader.load_sample(with_cache.tokens[idx])
    np.testing.assert_array_equal(a.aug_px_from_px.numpy(), np.broadcast_to(np.eye(3), (6, 3, 3)))
    np.testing.assert_array_equal(a.aug_from_lidar.numpy(), np.eye(4))
    boxes, _ = training_boxes(frame, TEACHER.point_range_m)
    np.testing.assert_allclose(a.boxes.numpy(), boxes, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(b.boxes.numpy(), boxes, rtol=1e-6, atol=1e-5)
    inside = points_in_boxes(frame.lidar.key_points, boxes)
    box_of_point = np.where(inside.any(axis=1), inside.argmax(axis=1), -1)
    fg_cells = 0
    for ci, channel in enumerate(CAMERA_CHANNELS):
        cam = frame.camera(channel)
        # Hand-rolled nearest point per 8 x 8 cell, straight from the LiDAR sweep.
        proj = project_to_image(frame.lidar.key_points, cam.cam_from_lidar, cam.intrinsics, (cam.width, cam.height),
                                min_depth_m=MIN_DEPTH_M)
        want_d = np.zeros((math.ceil(full[0] / STRIDE), math.ceil(full[1] / STRIDE)))
        want_b = np.full(want_d.shape, -1)
        col, row = np.floor((proj.uv + 0.5) / STRIDE).astype(int).T
        for p in np.argsort(proj.depth_m, kind="stable")[::-1]:  # farthest first: the nearest writes last
            want_d[row[p], col[p]] = proj.depth_m[p]
            want_b[row[p], col[p]] = box_of_point[proj.index[p]]
        np.testing.assert_allclose(a.depth_m[ci].numpy(), want_d, rtol=1e-6)
        assert (a.depth_box[ci].numpy() == want_b).mean() > 0.995  # float32 (u, v) in the cache: rare border moves
        fg_cells += int((want_b >= 0).sum())
    assert fg_cells >= 10
    np.testing.assert_array_equal(a.depth_m.numpy(), b.depth_m.numpy())
    np.testing.assert_array_equal(a.depth_box.numpy(), b.depth_box.numpy())
    np.testing.assert_array_equal(a.images.numpy(), b.images.numpy())
    # The same holds through a real (deterministic) resize and crop: both paths replay one transform.
    kw = {"train": False, "image_policy": ImageAugPolicy.evaluation(HW), "bda_policy": None}
    a, b = _dataset(reader, cache, **kw)[0], _dataset(reader, None, **kw)[0]
    np.testing.assert_array_equal(a.depth_m.numpy(), b.depth_m.numpy())
    np.testing.assert_array_equal(a.depth_box.numpy(), b.depth_box.numpy())


def test_a_cache_of_another_split_or_grid_is_refused(reader: NuScenesReader, cache: CacheReader) -> None:
    with pytest.raises(CacheError, match="split: cache has 'synth_train', dataset has 'synth_val'"):
        _dataset(reader, cache, split="synth_val")
    with pytest.raises(CacheError, match="grid x_min_m: cache has -51.2, expected -40.0"):
        _dataset(reader, cache, cache_grid=BevGrid.square(40.0, 1.6))
    assert len(_dataset(reader, cache, cache_grid=BevGrid.square(51.2, 0.8))) == 3  # another cell size: sampled
    with pytest.raises(CacheError, match="num_samples: cache has 3, dataset has 2"):
        _dataset(reader, cache, tokens=reader.sample_tokens(SPLIT)[:2])
    with pytest.raises(ValueError, match="split name is required"):
        _dataset(reader, cache, split=None, tokens=reader.sample_tokens(SPLIT))
    with pytest.raises(ValueError, match="input_hw"):
        _dataset(reader, cache, image_policy=ImageAugPolicy(input_hw=(64, 64)))


def test_augmentation_depends_on_seed_epoch_and_index_only(reader: NuScenesReader, cache: CacheReader) -> None:
    ds = _dataset(reader, cache, seed=1)
    whs = [(192, 108)] * 6
    first = ds.transforms(0, whs)
    assert ds.transforms(0, whs) == first and ds.transforms(1, whs) != first
    assert len(set(first[0])) == 6  # each camera its own draw
    ds.set_epoch(1)
    assert ds.transforms(0, whs) != first
    ds.set_epoch(0)
    no_bda = _dataset(reader, cache, seed=1, bda_policy=None).transforms(0, whs)
    assert no_bda[0] == first[0] and no_bda[1].is_identity  # switching BDA off keeps the image augmentation


# --------------------------------------------------------------------------------------------------- collate
def _item(token: str, m: int, *, cells: int | None, k: int = 4, c: int = 3) -> CameraSample:
    n, h, w = 6, 16, 24
    fill = float(len(token))
    return CameraSample(
        token=token, images=torch.full((n, 3, h, w), fill), intrinsics=torch.eye(3).expand(n, 3, 3),
        cam_from_lidar=torch.eye(4).expand(n, 4, 4), aug_px_from_px=torch.eye(3).expand(n, 3, 3),
        aug_from_lidar=torch.eye(4),
        boxes=torch.ones((m, 9)), labels=torch.arange(m), depth_m=torch.zeros((n, 2, 3)),
        depth_box=torch.full((n, 2, 3), -1),
        kp_teacher_xy=torch.full((m, k, 2), fill), kp_student_xy=torch.full((m, k, 2), -fill),
        map_cells=None if cells is None else torch.arange(cells) * 2,
        map_features=(torch.full((c, 4, 5), fill) if cells is None else torch.full((cells, c), fill)).half())


def test_collate_pads_boxes_and_cells() -> None:
    batch = collate_camera([_item("ab", 2, cells=5), _item("abc", 0, cells=3), _item("abcd", 1, cells=0)])
    t = batch.teacher
    assert batch.tokens == ["ab", "abc", "abcd"] and batch.images.shape == (3, 6, 3, 16, 24)
    assert [len(b) for b in batch.gt_boxes] == [2, 0, 1] and batch.gt_boxes[1].shape == (0, 9)
    assert t.kp_teacher_xy.shape == (3, 2, 4, 2) and t.kp_student_xy.shape == (3, 2, 4, 2)
    np.testing.assert_array_equal(t.box_mask.numpy(), [[True, True], [False, False], [True, False]])
    assert (t.kp_teacher_xy[0] == 2).all() and (t.kp_teacher_xy[1] == 0).all() and (t.kp_student_xy[2, 0] == -4).all()
    assert (t.kp_teacher_xy[2, 1] == 0).all()
    np.testing.assert_array_equal(t.map_cells.numpy(), [[0, 2, 4, 6, 8], [0, 2, 4, -1, -1], [-1] * 5])
    assert t.map_features.shape == (3, 5, 3) and t.map_features.dtype == torch.float16
    assert (t.map_features[1, 3:] == 0).all() and (t.map_features[1, :3] == 3).all()
    dense = t.dense_map(2, 5)  # cells 0..8 of a 2 x 5 map
    assert dense.shape == (3, 3, 2, 5) and dense[1].reshape(3, -1)[:, [0, 2, 4]].eq(3).all()
    assert dense[1].sum() == 3 * 3 * 3 and dense[2].abs().sum() == 0

    dense_batch = collate_camera([_item("ab", 1, cells=None), _item("abc", 0, cells=None)]).teacher
    assert dense_batch.map_cells is None and dense_batch.map_features.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(dense_batch.box_mask.numpy(), [[True], [False]])
    empty = collate_camera([_item("a", 0, cells=0), _item("b", 0, cells=0)]).teacher
    assert empty.kp_teacher_xy.shape == (2, 0, 4, 2) and empty.map_cells.shape == (2, 0)
    with pytest.raises(ValueError, match="dense and foreground"):
        collate_camera([_item("ab", 1, cells=None), _item("abc", 1, cells=2)])


def test_moving_a_batch_keeps_every_field() -> None:
    """``to`` (and ``pin_memory``, which shares its field walk) returns every field: tensors, lists of tensors, the
    teacher targets and the optional temporal and LiDAR fields, values unchanged."""
    batch = collate_camera([_item("ab", 2, cells=5), _item("abc", 1, cells=3)])
    batch = dataclasses.replace(batch, prev_images=batch.images[:, None] + 1, prev_intrinsics=batch.intrinsics[:, None],
                                prev_cam_from_lidar=batch.cam_from_lidar[:, None],
                                lidar_points=[torch.ones(4, 5), torch.zeros(2, 5)])
    moved = batch.to(torch.device("cpu"))
    for f in dataclasses.fields(batch):
        a, b = getattr(batch, f.name), getattr(moved, f.name)
        if f.name == "teacher":
            for g in dataclasses.fields(a):
                x, y = getattr(a, g.name), getattr(b, g.name)
                assert (x is None and y is None) or torch.equal(x, y), g.name
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), f.name
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        else:
            assert a == b, f.name
    assert moved.frames == 2


def test_a_real_batch_with_a_sample_without_boxes(reader: NuScenesReader) -> None:
    with_boxes = _dataset(reader, None)
    far_away = _dataset(reader, None, point_range_m=(500.0, 500.0, -5.0, 510.0, 510.0, 3.0))
    empty = far_away[0]
    assert empty.boxes.shape == (0, 9) and (empty.depth_box == -1).all() and (empty.depth_m > 0).any()
    batch = collate_camera([with_boxes[0], empty])
    assert batch.teacher is None and batch.gt_boxes[1].shape == (0, 9) and len(batch.gt_boxes[0]) > 0
    assert batch.images.shape == (2, 6, 3, *HW) and batch.images.dtype == torch.float32
    assert batch.depth_m.shape == (2, 6, HW[0] // STRIDE, HW[1] // STRIDE) and batch.depth_box.dtype == torch.int64


def test_dataloader_worker_reopens_the_cache(reader: NuScenesReader, cache: CacheReader) -> None:
    ds = _dataset(reader, cache, seed=4)
    ds.set_epoch(2)
    cache.read(0)  # the parent has the store open; a pickled copy leaves it behind and the worker opens its own
    assert cache.__dict__["_group"] is not None and cache.__getstate__()["_group"] is None
    # spawn (macOS' and Windows' default) pickles the dataset into the worker: the path where reopening matters.
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_camera, multiprocessing_context="spawn")
    batches = list(loader)
    assert [len(b.tokens) for b in batches] == [2, 1]
    assert [t for b in batches for t in b.tokens] == ds.tokens
    local = collate_camera([ds[0], ds[1]])  # same (seed, epoch, index): same augmentation as in the worker
    for name in ("images", "aug_px_from_px", "aug_from_lidar", "depth_m", "depth_box"):
        torch.testing.assert_close(getattr(batches[0], name), getattr(local, name), rtol=0, atol=0)
    torch.testing.assert_close(batches[0].teacher.kp_student_xy, local.teacher.kp_student_xy, rtol=0, atol=0)
    torch.testing.assert_close(batches[0].teacher.map_features, local.teacher.map_features, rtol=0, atol=0)


def test_online_teacher_lidar_is_read_by_the_dataset(reader: NuScenesReader, synth_root: Path) -> None:
    """With ``lidar_reader`` every sample carries the teacher's multi-sweep points (un-augmented key frame), read in
    the DataLoader worker; the rest of the sample is what the no-cache dataset gives."""
    teacher_reader = NuScenesReader(synth_root, num_sweeps=TEACHER.num_sweeps)
    plain = _dataset(reader, None)
    online = _dataset(reader, None, lidar_reader=teacher_reader)
    token = plain.tokens[1]
    want = teacher_reader.load_sample(token).lidar
    got = online[1]
    assert plain[1].lidar_points is None
    assert got.lidar_points is not None and got.lidar_points.dtype == torch.float32
    np.testing.assert_array_equal(got.lidar_points.numpy(), want.points)  # BDA never touches the teacher's points
    assert len(want.points) > want.num_key_points  # earlier sweeps are there, so this is not the key sweep alone
    # the key sweep alone still makes the depth
    for name in ("images", "boxes", "depth_m", "depth_box", "aug_from_lidar"):
        torch.testing.assert_close(getattr(got, name), getattr(plain[1], name), rtol=0, atol=0)
    loader = DataLoader(online, batch_size=2, num_workers=1, collate_fn=collate_camera)
    batch = next(iter(loader))
    assert batch.lidar_points is not None and len(batch.lidar_points) == 2
    np.testing.assert_array_equal(batch.lidar_points[1].numpy(), want.points)
    assert collate_camera([plain[0]]).lidar_points is None
    with pytest.raises(ValueError, match="teacher LiDAR"):
        collate_camera([plain[0], online[1]])

