"""The online teacher and the cache train the same student when the cache holds exactly the teacher views the
online run takes: equal named losses step by step and equal keypoint sets.

Two cases, both with image augmentation on and one seed:
- BDA on: a ``draws`` cache whose single stored draw of sample ``i`` is the BDA that the online run draws for ``i``
  in epoch 0 (the same generator: ``CameraDetectionDataset.transforms``);
- the identity BDA: the canonical cache.
If the online path's keypoints, frames or draws change, or the two runs start from other weights, these fail.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tigbev.cache.store import CacheReader
from tigbev.config import ExtractTeacherConfig, TrainStudentConfig
from tigbev.data.augment import BevAugmentPolicy, BevTransform
from tigbev.data.camera_dataset import CameraDetectionDataset
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.stages import extract_teacher, train_student

SPLIT = "synth_train"
STEPS = 5
GRID = 6  # keypoints per box side: small, the formulas are the same
INPUT_HW = (64, 176)  # a small network input: the paths compared are the same at any size
IDENTITY_BDA = BevAugmentPolicy(rotation_deg=0.0, scale_range=(1.0, 1.0), p_flip=0.0)
# Named losses agree to the cache's scaled-float16 storage of the map. AdamW's first steps move each weight by about
# the learning rate whatever its gradient's size, so at a training learning rate storage-sized differences in the
# gradients grow into percent-sized differences in the losses within three steps; at 1e-5 they stay storage-sized,
# and any difference of sample, draw, keypoints, boxes or initial weights still changes the losses by far more.
RTOL = 2e-3


def _student_cfg(root: Path, out: Path, *, cache: str | None, teacher_ckpt: Path | None) -> TrainStudentConfig:
    return TrainStudentConfig(
        preset="demo", dataroot=root, split=SPLIT, out_dir=out, cache=cache,
        teacher="online" if cache is None else "cache", teacher_checkpoint=teacher_ckpt, keypoint_grid=GRID,
        epochs=1, batch_size=1, workers=0, device="cpu", max_steps=STEPS, augment=True, seed=3, lr=1e-5,
        warmup_steps=1, input_hw=INPUT_HW)


def _online_dataset(root: Path, cfg: TrainStudentConfig, policy: BevAugmentPolicy) -> CameraDetectionDataset:
    """The dataset the online run builds (same seed and policies), to read its draws and keypoints."""
    hw = INPUT_HW
    reader = NuScenesReader(root)
    return CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=None, split=SPLIT, input_hw=hw,
                                  feature_stride=16, image_policy=ImageAugPolicy(input_hw=hw), bda_policy=policy,
                                  seed=cfg.seed, train=True, point_range_m=train_student._POINT_RANGE,
                                  online_keypoints=(GRID, 1.6))


def _extract(root: Path, ckpt: Path, out: Path, *, draws: list[BevTransform] | None,
             monkeypatch: pytest.MonkeyPatch) -> str:
    if draws is not None:
        # The stored draw of sample i is the online run's epoch-0 BDA of sample i.
        monkeypatch.setattr(extract_teacher, "variant_transforms",
                            lambda kind, count, *, policy, seed, sample_idx: [BevTransform(), draws[sample_idx]])
    extract_teacher.run(ExtractTeacherConfig(
        teacher_checkpoint=ckpt, dataroot=root, split=SPLIT, out_dir=str(out), workers=0, device="cpu",
        shard_samples=2, batch_size=1, keypoint_grid=GRID, variants="draws" if draws is not None else "canonical",
        draws=1), progress=False)
    return str(out)


def _step_losses(run_dir: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["unweighted"] for r in records if r.get("kind") == "step"}
    return [{**losses, "step": step} for step, losses in sorted(by_step.items())]


def _compare_runs(online_dir: Path, cache_dir: Path) -> None:
    online, cached = _step_losses(online_dir), _step_losses(cache_dir)
    assert [r["step"] for r in online] == [r["step"] for r in cached] and len(online) >= STEPS
    for a, b in zip(online, cached):
        assert set(a) == set(b)
        assert {"inter_keypoint", "inter_channel", "inner_depth", "depth", "heatmap", "bbox"} <= set(a)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=1e-6), f"step {a['step']}: {k} online {a[k]} cache {b[k]}"


def _compare_keypoints(online_ds: CameraDetectionDataset, cache_ds: CameraDetectionDataset) -> None:
    """Which boxes get keypoints, how many and in which order: the same in both paths, in both frames."""
    for i in range(len(online_ds)):
        a, b = online_ds[i], cache_ds[i]
        assert a.token == b.token
        assert a.kp_student_xy is not None and b.kp_student_xy is not None
        assert a.kp_student_xy.shape == b.kp_student_xy.shape, f"sample {i}: box count differs"
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.kp_student_xy, b.kp_student_xy, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.kp_teacher_xy, b.kp_teacher_xy, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.aug_from_lidar, b.aug_from_lidar, rtol=0, atol=1e-6)


def _cache_dataset(root: Path, cache: str, cfg: TrainStudentConfig, policy: BevAugmentPolicy
                   ) -> CameraDetectionDataset:
    hw = INPUT_HW
    reader = NuScenesReader(root)
    reader_cache = CacheReader(cache)
    return CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=reader_cache, split=SPLIT,
                                  input_hw=hw, feature_stride=16, image_policy=ImageAugPolicy(input_hw=hw),
                                  bda_policy=policy, seed=cfg.seed, train=True,
                                  min_depth_m=reader_cache.manifest.depth.min_depth_m)


@pytest.fixture(scope="module")
def root6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six train samples (two scenes of three), so the five steps of batch 1 lie in one epoch: one draw each."""
    from tigbev.config import SynthConfig
    from tigbev.data.synth.writer import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth6") / "dataroot"
    write_synthetic_dataset(SynthConfig(out_dir=out, scenes=3, samples_per_scene=3, val_scenes=1, seed=11,
                                        image_width=192, image_height=108, lidar_azimuth_steps=360,
                                        sweeps_per_sample=1, workers=1), progress=False)
    return out


@pytest.fixture
def log_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's losses in metrics.jsonl, and the online teacher's map rounded to the cache's float16, so the
    two runs see bit-equal targets where their paths agree and small differences cannot grow over the steps."""
    from tigbev.engine.online_teacher import OnlineTeacher

    monkeypatch.setattr(train_student, "_LOG_EVERY", 1)
    targets = OnlineTeacher.targets

    def float16_targets(self: OnlineTeacher, batch):  # type: ignore[no-untyped-def]
        t, fmap = targets(self, batch)
        fmap = fmap.half().float()
        return dataclasses.replace(t, map_features=fmap), fmap

    monkeypatch.setattr(OnlineTeacher, "targets", float16_targets)


def test_online_teacher_equals_a_cache_of_its_own_draws(root6: Path, demo_teacher_ckpt: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         log_every_step: None) -> None:
    online_cfg = _student_cfg(root6, tmp_path / "online", cache=None, teacher_ckpt=demo_teacher_ckpt)
    online_ds = _online_dataset(root6, online_cfg, BevAugmentPolicy())
    draws = [online_ds.transforms(i, [(c.width, c.height) for c in online_ds.reader.load_cameras(
        online_ds.reader.nusc.get("sample", t), online_ds.reader.nusc.get("sample", t)["data"]["LIDAR_TOP"])])[1]
        for i, t in enumerate(online_ds.tokens)]
    assert any(not d.is_identity for d in draws)
    cache = _extract(root6, demo_teacher_ckpt, tmp_path / "cache-draws", draws=draws, monkeypatch=monkeypatch)
    cache_cfg = _student_cfg(root6, tmp_path / "cached", cache=cache, teacher_ckpt=None)
    _compare_keypoints(online_ds, _cache_dataset(root6, cache, cache_cfg, BevAugmentPolicy()))
    train_student.run(online_cfg, progress=False)
    train_student.run(cache_cfg, progress=False)
    _compare_runs(tmp_path / "online", tmp_path / "cached")


def test_online_teacher_equals_the_canonical_cache_at_the_identity_bda(
        root6: Path, demo_teacher_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        log_every_step: None) -> None:
    monkeypatch.setattr(train_student, "BevAugmentPolicy", lambda: IDENTITY_BDA)
    online_cfg = _student_cfg(root6, tmp_path / "online", cache=None, teacher_ckpt=demo_teacher_ckpt)
    cache = _extract(root6, demo_teacher_ckpt, tmp_path / "cache", draws=None, monkeypatch=monkeypatch)
    cache_cfg = _student_cfg(root6, tmp_path / "cached", cache=cache, teacher_ckpt=None)
    _compare_keypoints(_online_dataset(root6, online_cfg, IDENTITY_BDA),
                       _cache_dataset(root6, cache, cache_cfg, IDENTITY_BDA))
    train_student.run(online_cfg, progress=False)
    train_student.run(cache_cfg, progress=False)
    _compare_runs(tmp_path / "online", tmp_path / "cached")
