"""Teacher-map variants of the cache: canonical, the four flips, and stored BDA draws, against the published
online teacher (the teacher run on the augmented points) on the same augmented samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tigbev.cache.schema import CacheFormatError, VariantSpec
from tigbev.cache.store import CacheError, CacheReader
from tigbev.cache.tools import cache_info
from tigbev.config import ExtractTeacherConfig
from tigbev.data.augment import FLIP_VARIANTS, BevAugmentPolicy, BevTransform, variant_transforms
from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.engine.online_teacher import OnlineTeacher
from tigbev.geometry.bev_sampling import sample_bev
from tigbev.stages import extract_teacher

SPLIT = "synth_train"
HW = (128, 352)
GRID = 6


def _extract(ckpt: Path, root: Path, out: Path, **kw) -> str:
    extract_teacher.run(ExtractTeacherConfig(teacher_checkpoint=ckpt, dataroot=root, split=SPLIT, out_dir=str(out),
                                             workers=0, device="cpu", shard_samples=2, batch_size=1,
                                             keypoint_grid=GRID, **kw), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def caches(demo_teacher_ckpt: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("variants")
    return {"canonical": _extract(demo_teacher_ckpt, synth_root, base / "canonical"),
            "flips": _extract(demo_teacher_ckpt, synth_root, base / "flips", variants="flips"),
            "draws": _extract(demo_teacher_ckpt, synth_root, base / "draws", variants="draws", draws=2)}


def _dataset(reader: NuScenesReader, cache: str | None, policy: BevAugmentPolicy | None, seed: int,
             online: OnlineTeacher | None = None) -> CameraDetectionDataset:
    kw = {"input_hw": HW, "feature_stride": 16, "image_policy": ImageAugPolicy(input_hw=HW), "bda_policy": policy,
          "seed": seed, "train": True, "split": SPLIT}
    if cache is None:
        assert online is not None
        return CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=None, lidar_reader=online.reader,
                                      online_keypoints=(GRID, 1.6), point_range_m=online.teacher.point_range_m, **kw)
    return CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=CacheReader(cache), **kw)


def _keypoint_features(targets, fmap: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher features (B, M*K, C) at the teacher keypoints of ``targets``, and which are real keypoints inside
    the map (padding boxes are not)."""
    b, m, k = targets.kp_teacher_xy.shape[:3]
    feats, inside = sample_bev(fmap.float(), targets.kp_teacher_xy.reshape(b, -1, 2), grid)
    return feats, inside & targets.box_mask[:, :, None].expand(b, m, k).reshape(b, -1)


def _relative_error(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return float((a[valid] - b[valid]).norm() / b[valid].norm())


def test_variant_spec_and_transforms_are_checked() -> None:
    with pytest.raises(CacheFormatError, match="'flips' stores 4"):
        VariantSpec(kind="flips", count=3)
    with pytest.raises(CacheFormatError, match="policy"):
        VariantSpec(kind="draws", count=3)
    with pytest.raises(CacheFormatError, match="kind must be"):
        VariantSpec(kind="mirror", count=1)  # type: ignore[arg-type]
    policy = BevAugmentPolicy()
    a = variant_transforms("draws", 4, policy=policy, seed=0, sample_idx=5)
    b = variant_transforms("draws", 4, policy=policy, seed=0, sample_idx=5)
    c = variant_transforms("draws", 4, policy=policy, seed=0, sample_idx=6)
    assert a == b and a != c and a[0].is_identity and len({t.rotation_rad for t in a[1:]}) == 3
    assert [t.matrix[0, 0] * t.matrix[1, 1] for t in FLIP_VARIANTS] == [1.0, -1.0, -1.0, 1.0]
    for t in (*a, *FLIP_VARIANTS, BevTransform(rotation_rad=3.0, scale=0.97, flip_y=True)):
        np.testing.assert_allclose(BevTransform.from_matrix(t.matrix).matrix, t.matrix, atol=1e-12)
    shear = np.eye(4)
    shear[0, 1] = 0.3
    with pytest.raises(ValueError, match="not a rotation"):
        BevTransform.from_matrix(shear)


def test_manifest_and_info_name_the_variants_and_their_bytes(caches: dict[str, str]) -> None:
    info = {k: cache_info(v) for k, v in caches.items()}
    assert info["canonical"]["variants"] == {"kind": "canonical", "count": 1}
    assert info["flips"]["variants"] == {"kind": "flips", "count": 4}
    assert info["draws"]["variants"] == {"kind": "draws", "count": 3}
    assert CacheReader(caches["draws"]).manifest.variants.policy == {
        "rotation_deg": 22.5, "scale_range": [0.95, 1.05], "p_flip": 0.5, "seed": 0}
    feats = {k: v["bytes_per_sample"]["features"] for k, v in info.items()}
    # Each flipped view stores the cells around its own (flipped) boxes: about as many as the canonical map.
    assert 3.5 < feats["flips"] / feats["canonical"] < 4.5
    assert 2.5 < feats["draws"] / feats["canonical"] < 3.5
    s = CacheReader(caches["flips"]).read(0)
    for stored, t in zip(s.maps, FLIP_VARIANTS):
        np.testing.assert_array_equal(stored.aug_from_lidar, t.matrix.astype(np.float32))


def test_a_different_variant_choice_does_not_resume_into_a_cache(demo_teacher_ckpt: Path, synth_root: Path,
                                                                 caches: dict[str, str]) -> None:
    with pytest.raises(CacheError, match="variants differs"):
        _extract(demo_teacher_ckpt, synth_root, Path(caches["canonical"]), variants="flips")


def test_flips_cache_is_the_online_teacher_under_any_flip(caches: dict[str, str], synth_root: Path,
                                                           demo_teacher_ckpt: Path) -> None:
    """Flips only (no rotation or scale): the flips cache gives the online teacher's keypoint features (fp16
    rounding), the canonical cache does not (a CNN teacher is not flip-equivariant)."""
    reader = NuScenesReader(synth_root)
    online = OnlineTeacher(demo_teacher_ckpt, reader, torch.device("cpu"))
    grid = online.grid
    flips_only = BevAugmentPolicy(rotation_deg=0.0, scale_range=(1.0, 1.0), p_flip=0.5)
    seen, errors = set(), {"flips": [], "canonical": []}
    for seed in range(4):
        live = _dataset(reader, None, flips_only, seed, online)
        batch = collate_camera([live[i] for i in range(len(live))])
        seen |= {(bool(m[0, 0] < 0), bool(m[1, 1] < 0)) for m in batch.aug_from_lidar}
        targets, fmap = online.targets(batch)
        want, valid = _keypoint_features(targets, fmap, grid)
        for mode in errors:
            cached = collate_camera([_dataset(reader, caches[mode], flips_only, seed)[i] for i in range(len(live))])
            torch.testing.assert_close(cached.aug_from_lidar, batch.aug_from_lidar, rtol=0, atol=0)
            torch.testing.assert_close(cached.teacher.kp_student_xy, targets.kp_student_xy, rtol=0, atol=1e-5)
            got, got_valid = _keypoint_features(cached.teacher, cached.teacher.dense_map(*grid.shape_hw), grid)
            ok = valid & got_valid
            assert ok.sum() > 0.5 * valid.sum()
            errors[mode].append(_relative_error(got, want, ok))
    assert len(seen) >= 3, seen  # the four flips (or three of them) were drawn
    assert max(errors["flips"]) < 2e-3, errors
    assert min(errors["canonical"]) > 10 * max(errors["flips"]), errors


def test_draws_cache_replaces_the_bda_by_a_stored_draw(caches: dict[str, str], synth_root: Path,
                                                       demo_teacher_ckpt: Path) -> None:
    reader = NuScenesReader(synth_root)
    cache = CacheReader(caches["draws"])
    online = OnlineTeacher(demo_teacher_ckpt, reader, torch.device("cpu"))
    grid = online.grid
    picked = set()
    for seed in range(3):
        ds = _dataset(reader, caches["draws"], BevAugmentPolicy(), seed)
        for epoch in range(2):
            ds.set_epoch(epoch)
            s = ds[1]
            stored = [np.asarray(m.aug_from_lidar) for m in cache.read(1).maps]
            k = next(i for i, m in enumerate(stored) if np.array_equal(m, s.aug_from_lidar.numpy()))
            assert k >= 1  # a stored draw, never the canonical map while augmenting
            picked.add(k)
            np.testing.assert_array_equal(s.map_from_lidar.numpy(), s.aug_from_lidar.numpy())
            torch.testing.assert_close(s.kp_teacher_xy, s.kp_student_xy, rtol=0, atol=0)
    assert picked == {1, 2}
    # The stored map is the teacher's view of that draw: the online teacher on the points moved by it.
    batch = collate_camera([s])
    targets, fmap = online.targets(batch)  # the batch's frame is the draw: the teacher runs on the moved points
    want, valid = _keypoint_features(targets, fmap, grid)
    got, got_valid = _keypoint_features(batch.teacher, batch.teacher.dense_map(*grid.shape_hw), grid)
    assert _relative_error(got, want, valid & got_valid) < 2e-3
    assert not math.isclose(float(s.aug_from_lidar[0, 0]), 1.0)
    # Without augmentation a draws cache trains on its canonical map.
    plain = CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=cache, split=SPLIT, input_hw=HW,
                                   feature_stride=16, image_policy=ImageAugPolicy(input_hw=HW), bda_policy=None,
                                   train=False)[1]
    np.testing.assert_array_equal(plain.map_from_lidar.numpy(), np.eye(4, dtype=np.float32))
