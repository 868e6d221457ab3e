"""Temporal students (BEVDet4D / BEVDepth4D) and class-balanced sampling (CBGS).

The alignment is checked on hand-made ego motion: the earlier key frame's ego poses are rewritten in a copy of the
synthetic tables, and a static point seen by an earlier camera must be lifted to the point's place in the current
(augmented) frame. CBGS is checked against counts computed by hand.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion
from torch.utils.data import DistributedSampler

from tigbev.config import EvaluateConfig, TrainStudentConfig
from tigbev.data.augment import BevTransform
from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, NuScenesReader
from tigbev.data.sampling import ClassBalancedDataset, class_balanced_indices
from tigbev.geometry import NUSCENES_POINT_RANGE_M
from tigbev.models.student.lss import feature_pixel_centers, frustum_points
from tigbev.models.student.student import FEATURE_STRIDE, CameraStudent, student_preset
from tigbev.stages import evaluate, train_student

SPLIT = "synth_train"
HW = student_preset("demo").input_hw


def _pose(rec: dict) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Quaternion(rec["rotation"]).rotation_matrix
    out[:3, 3] = rec["translation"]
    return out


def _dataset(root: Path, frames: int, **kw) -> CameraDetectionDataset:
    reader = NuScenesReader(root)
    return CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=None, input_hw=HW,
                                  feature_stride=FEATURE_STRIDE, image_policy=ImageAugPolicy(input_hw=HW),
                                  bda_policy=None, train=False, point_range_m=NUSCENES_POINT_RANGE_M, frames=frames,
                                  **kw)


@pytest.fixture(scope="module")
def moved_root(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A copy of the synthetic dataroot whose first train sample has hand-made ego poses: every sensor of that key
    frame sees the world from ``global_from_ego = G @ motion``, ``G`` the second sample's LiDAR ego pose and
    ``motion`` a 20 deg turn and a (-6, 1.5) m shift, so the ego drives 6 m and turns between the two key frames."""
    root = tmp_path_factory.mktemp("moved") / "dataroot"
    shutil.copytree(synth_root, root)
    nusc = NuScenesReader(synth_root).nusc
    first, second = (nusc.get("sample", t) for t in NuScenesReader(synth_root).sample_tokens(SPLIT)[:2])
    lidar_cur = nusc.get("sample_data", second["data"]["LIDAR_TOP"])
    motion = np.eye(4)
    motion[:3, :3] = Quaternion(axis=[0, 0, 1], angle=math.radians(20)).rotation_matrix
    motion[:3, 3] = (-6.0, 1.5, 0.0)
    moved = _pose(nusc.get("ego_pose", lidar_cur["ego_pose_token"])) @ motion
    pose_tokens = {nusc.get("sample_data", sd)["ego_pose_token"] for sd in first["data"].values()}
    table = root / "v1.0-synth" / "ego_pose.json"
    poses = json.loads(table.read_text())
    for rec in poses:
        if rec["token"] in pose_tokens:
            rec["rotation"] = list(Quaternion(matrix=moved[:3, :3]).elements)
            rec["translation"] = moved[:3, 3].tolist()
    table.write_text(json.dumps(poses))
    return root, moved


def test_a_static_point_stays_in_place_under_ego_motion_and_bda(moved_root: tuple[Path, np.ndarray]) -> None:
    root, global_from_prev_ego = moved_root
    ds = _dataset(root, frames=2)
    s = ds[1]  # the second sample of the scene: its earlier frame is the moved one
    nusc = NuScenesReader(root).nusc  # the devkit's own view of the rewritten tables

    def sensor_pose(table: str, sd_token: str) -> np.ndarray:
        sd = nusc.get("sample_data", sd_token)
        return _pose(nusc.get(table, sd[f"{table}_token"]))

    cur = nusc.get("sample", s.token)
    prev = nusc.get("sample", cur["prev"])
    lidar = cur["data"]["LIDAR_TOP"]
    global_from_lidar = sensor_pose("ego_pose", lidar) @ sensor_pose("calibrated_sensor", lidar)
    bda = BevTransform(rotation_rad=math.radians(30), scale=1.05, flip_x=True)
    d = 12.0
    uv = feature_pixel_centers((HW[0] // FEATURE_STRIDE, HW[1] // FEATURE_STRIDE), FEATURE_STRIDE).numpy()
    row, col = 3, 10
    for ci, channel in enumerate(CAMERA_CHANNELS):
        cam = prev["data"][channel]
        k = np.asarray(nusc.get("calibrated_sensor",
                                nusc.get("sample_data", cam)["calibrated_sensor_token"])["camera_intrinsic"])
        # A static world point on the ray of one feature cell of the earlier camera, d metres deep.
        orig = np.linalg.inv(s.aug_px_from_px[ci].double().numpy()) @ np.array([*uv[row, col], 1.0])
        p_cam = d * np.linalg.inv(k) @ (orig / orig[2])
        assert np.allclose(sensor_pose("ego_pose", cam), global_from_prev_ego)  # the hand-made motion is read
        p_global = global_from_prev_ego @ sensor_pose("calibrated_sensor", cam) @ np.array([*p_cam, 1.0])
        expected = bda.matrix @ np.linalg.inv(global_from_lidar) @ p_global
        lifted = frustum_points(s.prev_intrinsics[0][None, ci:ci + 1], s.prev_cam_from_lidar[0][None, ci:ci + 1],
                                s.aug_px_from_px[None, ci:ci + 1], torch.from_numpy(bda.matrix)[None],
                                (HW[0] // FEATURE_STRIDE, HW[1] // FEATURE_STRIDE), FEATURE_STRIDE,
                                torch.tensor([d]))[0, 0, 0, row, col].numpy()
        np.testing.assert_allclose(lifted, expected[:3], atol=2e-3, err_msg=channel)
        # Without the ego motion (the earlier camera's own extrinsics taken as the current ones) it would be off.
        naive = frustum_points(s.intrinsics[None, ci:ci + 1], s.cam_from_lidar[None, ci:ci + 1],
                               s.aug_px_from_px[None, ci:ci + 1], torch.from_numpy(bda.matrix)[None],
                               (HW[0] // FEATURE_STRIDE, HW[1] // FEATURE_STRIDE), FEATURE_STRIDE,
                               torch.tensor([d]))[0, 0, 0, row, col].numpy()
        assert np.linalg.norm(naive - expected[:3]) > 2.0


def test_scene_start_repeats_the_current_frame(synth_root: Path) -> None:
    first = _dataset(synth_root, frames=2)[0]
    assert first.prev_images.shape == (1, *first.images.shape)
    assert torch.equal(first.prev_images[0], first.images)
    assert torch.equal(first.prev_cam_from_lidar[0], first.cam_from_lidar)
    ds3 = _dataset(synth_root, frames=3)
    second = ds3[1]  # one key frame before it in the scene: frame t-1 is the first sample, t-2 the current one
    assert torch.equal(second.prev_images[1], second.images)
    assert torch.equal(second.prev_images[0], ds3[0].images)
    assert not torch.equal(second.prev_images[0], second.images)


def test_a_temporal_student_learns_from_the_current_frame_only(synth_root: Path) -> None:
    ds = _dataset(synth_root, frames=2)
    batch = collate_camera([ds[1], ds[2]])
    assert batch.frames == 2 and batch.prev_images.shape[:3] == (2, 1, 6)
    torch.manual_seed(0)
    student = CameraStudent(student_preset("demo", frames=2))
    prev = batch.prev_images.clone().requires_grad_(True)
    cur = batch.images.clone().requires_grad_(True)
    out = student(type(batch)(**{**batch.__dict__, "images": cur, "prev_images": prev}))
    out.bev_features.sum().backward()
    assert cur.grad is not None and cur.grad.abs().sum() > 0
    assert prev.grad is None  # BEVDet4D: the earlier frames are seen without gradients
    assert out.depth_logits.shape[0] == 2 * 6  # depth supervision: the current frame's cameras only
    # The earlier frame matters: another earlier image changes the prediction.
    with torch.no_grad():
        a = student(batch).bev_features
        b = student(type(batch)(**{**batch.__dict__, "prev_images": torch.zeros_like(batch.prev_images)})).bev_features
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="2 key frame"):
        student(collate_camera([_dataset(synth_root, frames=1)[0]]))


def test_a_4d_student_trains_from_the_cache_and_its_checkpoint_evaluates(synth_root: Path, synth_cache: str,
                                                                          tmp_path: Path) -> None:
    cfg = TrainStudentConfig(preset="demo", dataroot=synth_root, split=SPLIT, out_dir=tmp_path / "run",
                             cache=synth_cache, epochs=1, batch_size=2, workers=0, device="cpu", max_steps=1,
                             frames=2)
    result = train_student.run(cfg, progress=False)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["student_config"]["frames"] == 2
    assert {"inter_keypoint", "inner_depth"} <= set(result.final_losses)
    m = evaluate.run(EvaluateConfig(checkpoint=result.checkpoint, dataroot=synth_root, split="synth_val",
                                    out_dir=tmp_path / "eval", device="cpu", bev_samples=0), progress=False).metrics
    assert 0.0 <= m["mAP"] <= 1.0 and 0.0 <= m["NDS"] <= 1.0


def test_cbgs_counts_match_a_hand_computation() -> None:
    # 10 samples: class 0 in all, class 1 in samples 0-1, class 2 in sample 0 only. D = 10 + 2 + 1 = 13 sample-class
    # pairs, 3 classes: each class gets int(13 / 3) = 4 draws from its own samples.
    classes = [frozenset({0, 1, 2}), frozenset({0, 1})] + [frozenset({0})] * 8
    idx = class_balanced_indices(classes, 3, seed=0)
    assert len(idx) == 12
    assert idx[:4].tolist() != [] and set(idx[4:8].tolist()) <= {0, 1} and idx[8:].tolist() == [0, 0, 0, 0]
    assert np.array_equal(idx, class_balanced_indices(classes, 3, seed=0))
    assert not np.array_equal(idx, class_balanced_indices(classes, 3, seed=1))
    # A class no sample holds contributes nothing (mmdet3d would divide by zero): frac stays 1 / 4.
    assert len(class_balanced_indices(classes, 4, seed=0)) == 3 * int(13 / 4)
    with pytest.raises(ValueError, match="sample 0 has class 5"):
        class_balanced_indices([frozenset({5})], 3, seed=0)


def test_cbgs_repeats_get_their_own_augmentation_and_shard_across_ranks(synth_root: Path) -> None:
    reader = NuScenesReader(synth_root)
    from tigbev.data.augment import BevAugmentPolicy

    ds = CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=None, input_hw=HW,
                                feature_stride=FEATURE_STRIDE, image_policy=ImageAugPolicy(input_hw=HW),
                                bda_policy=BevAugmentPolicy(), train=True, point_range_m=NUSCENES_POINT_RANGE_M)
    classes = [frozenset({0}), frozenset({0, 1}), frozenset({0})]
    balanced = ClassBalancedDataset(ds, classes, 2, seed=3)
    # D = 4 pairs, 2 classes: int(4 / 2) = 2 draws each; class 1's two draws are both sample 1.
    assert len(balanced) == 4 and balanced.indices[2:].tolist() == [1, 1]
    a, b = balanced[2], balanced[3]
    assert a.token == b.token and not torch.equal(a.aug_from_lidar, b.aug_from_lidar)
    shards = [list(DistributedSampler(balanced, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3]


def test_cbgs_and_frames_with_the_online_teacher(synth_root: Path, demo_teacher_ckpt: Path, tmp_path: Path) -> None:
    cfg = TrainStudentConfig(preset="demo", dataroot=synth_root, split=SPLIT, out_dir=tmp_path / "run",
                             teacher="online", teacher_checkpoint=demo_teacher_ckpt, epochs=1, batch_size=2,
                             workers=0, device="cpu", max_steps=1, frames=2, sampler="cbgs")
    result = train_student.run(cfg, progress=False)
    reader = NuScenesReader(synth_root)
    expected = class_balanced_indices([reader.sample_classes(t) for t in reader.sample_tokens(SPLIT)],
                                      10, seed=cfg.seed)
    assert result.epoch_size == len(expected) and "inter_keypoint" in result.final_losses
    sampling = json.loads((tmp_path / "run" / "config.json").read_text())["sampling"]
    assert sampling["sampler"] == "cbgs" and sampling["epoch_size"] == len(expected)
    assert sampling["dataset_size"] == 3
