"""Stage two: cache mode without the teacher, seeds sharing a cache, refusal of foreign caches, cache vs online
targets, resume, and DDP under torchrun."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tigbev.cache.store import CacheError, CacheReader
from tigbev.config import LossWeights, TrainStudentConfig
from tigbev.data.augment import BevAugmentPolicy
from tigbev.data.camera_dataset import CameraDetectionDataset, collate_camera
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import NuScenesReader
from tigbev.engine.online_teacher import OnlineTeacher
from tigbev.errors import TigbevError
from tigbev.stages import train_student
from tigbev.stages.train_student import DistillationModel

SPLIT = "synth_train"


def _cfg(root: Path, out: Path, cache: str | None, **kw) -> TrainStudentConfig:
    base = {"preset": "demo", "dataroot": root, "split": SPLIT, "out_dir": out, "cache": cache, "epochs": 1,
            "batch_size": 2, "workers": 0, "device": "cpu", "max_steps": 1}
    return TrainStudentConfig(**{**base, **kw})


def test_cache_mode_never_imports_the_teacher(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "spconv" or name.startswith("spconv.") or name.startswith("tigbev.models.teacher"):
                    raise ImportError(f"blocked import: {{name}}")
                return None
        sys.meta_path.insert(0, Block())
        from tigbev.config import TrainStudentConfig
        from tigbev.stages import train_student
        r = train_student.run(TrainStudentConfig(preset="demo", dataroot={str(synth_root)!r}, split="synth_train",
                              out_dir={str(tmp_path / "run")!r}, cache={synth_cache!r}, epochs=1, batch_size=2,
                              workers=0, device="cpu", max_steps=1), progress=False)
        assert r.steps == 1
        assert not any(m == "spconv" or m.startswith("tigbev.models.teacher") for m in sys.modules)
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_two_seeds_share_one_cache_and_resume(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    a = train_student.run(_cfg(synth_root, tmp_path / "a", synth_cache, seed=0), progress=False)
    b = train_student.run(_cfg(synth_root, tmp_path / "b", synth_cache, seed=1), progress=False)
    ca, cb = (torch.load(r.checkpoint, weights_only=True) for r in (a, b))
    assert ca["cache"] == cb["cache"] and ca["cache"]["url"] == synth_cache
    assert {"inter_keypoint", "inter_channel", "inner_depth", "depth", "heatmap", "bbox"} <= set(a.final_losses)
    key = "student.head.shared_conv.conv.weight"
    assert not torch.equal(ca["model"][key], cb["model"][key])
    resumed = train_student.run(_cfg(synth_root, tmp_path / "a", synth_cache, seed=0, max_steps=2, resume=True),
                                progress=False)
    assert resumed.steps == 2
    assert (tmp_path / "a" / "loss_curve.png").is_file()


def test_an_online_run_resumes_only_with_the_same_teacher_weights(synth_root: Path, demo_teacher_ckpt: Path,
                                                                  tmp_path: Path) -> None:
    """The online teacher's fingerprint is recorded; the same checkpoint path holding other weights is refused."""
    import shutil

    from tigbev.models.teacher.centerpoint import CenterPoint, teacher_preset
    from tigbev.models.teacher.checkpoint import save_checkpoint

    teacher = tmp_path / "teacher.pt"
    shutil.copy(demo_teacher_ckpt, teacher)
    online = {"teacher": "online", "teacher_checkpoint": teacher}
    r = train_student.run(_cfg(synth_root, tmp_path / "run", None, epochs=2, **online), progress=False)
    assert torch.load(r.checkpoint, weights_only=True)["cache"]["teacher"]
    torch.manual_seed(5)
    save_checkpoint(teacher, {"model": CenterPoint(teacher_preset("demo")).state_dict(),
                              "teacher_config": teacher_preset("demo").to_dict()})
    with pytest.raises(TigbevError, match="online teacher's weights"):
        train_student.run(_cfg(synth_root, tmp_path / "run", None, epochs=2, max_steps=2, resume=True, **online),
                          progress=False)


def test_a_cache_of_another_split_is_refused(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="split: cache has 'synth_train', dataset has 'synth_val'"):
        train_student.run(_cfg(synth_root, tmp_path / "x", synth_cache, split="synth_val"), progress=False)


def test_cache_targets_equal_online_targets(synth_root: Path, synth_cache: str, demo_teacher_ckpt: Path) -> None:
    """On an un-augmented batch the keypoints the loader lays for the online teacher equal the cached ones, and the
    distillation losses from the cache equal those from the live teacher."""
    reader = NuScenesReader(synth_root)
    cache = CacheReader(synth_cache)
    cfg = _cfg(synth_root, Path("unused"), synth_cache)
    from tigbev.models.student.student import student_preset

    scfg = student_preset("demo")
    grid = cache.manifest.grid
    ds = CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=cache, split=SPLIT,
                                input_hw=scfg.input_hw, feature_stride=16,
                                image_policy=ImageAugPolicy(input_hw=scfg.input_hw), bda_policy=None, train=False)
    batch = collate_camera([ds[0], ds[1]])
    torch.manual_seed(0)
    model = DistillationModel(scfg, cfg, grid, cache.manifest.features.channels).eval()
    online = OnlineTeacher(demo_teacher_ckpt, reader, torch.device("cpu"))
    kp_spec = cache.manifest.keypoints
    live = CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=None, split=SPLIT,
                                  input_hw=scfg.input_hw, feature_stride=16,
                                  image_policy=ImageAugPolicy(input_hw=scfg.input_hw), bda_policy=None, train=False,
                                  lidar_reader=online.reader, point_range_m=online.teacher.point_range_m,
                                  online_keypoints=(kp_spec.grid_size, kp_spec.enlarge_m))
    live_batch = collate_camera([live[0], live[1]])
    assert live_batch.teacher is not None and live_batch.teacher.map_features is None
    torch.testing.assert_close(live_batch.teacher.kp_teacher_xy, batch.teacher.kp_teacher_xy, rtol=0, atol=1e-5)
    with torch.no_grad():
        from_cache = model(batch, batch.teacher.dense_map(*grid.shape_hw))
        targets, fmap = online.targets(live_batch)
        from_online = model(dataclasses.replace(live_batch, teacher=targets), fmap)
    for k in ("inter_keypoint", "inter_channel"):
        assert from_cache[k] > 0
        assert float(from_cache[k]) == pytest.approx(float(from_online[k]), rel=2e-3), k


def test_augmented_keypoints_are_the_same_physical_points(synth_root: Path, synth_cache: str) -> None:
    reader = NuScenesReader(synth_root)
    cache = CacheReader(synth_cache)
    ds = CameraDetectionDataset(reader, reader.sample_tokens(SPLIT), cache=cache, split=SPLIT, input_hw=(128, 352),
                                feature_stride=16, image_policy=ImageAugPolicy(input_hw=(128, 352)),
                                bda_policy=BevAugmentPolicy(p_flip=1.0), seed=3, train=True)
    s = ds[1]
    aug_from_lidar = s.aug_from_lidar.double().numpy()
    np.testing.assert_allclose(s.kp_student_xy.double().numpy(),
                               s.kp_teacher_xy.double().numpy() @ aug_from_lidar[:2, :2].T, atol=1e-4)
    # The centre keypoint of each box's lattice lands on the augmented box centre.
    g = 24
    centre = (s.kp_student_xy[:, (g // 2) * g + g // 2] + s.kp_student_xy[:, (g // 2 - 1) * g + g // 2 - 1]) / 2
    np.testing.assert_allclose(centre.numpy(), s.boxes[:, :2].numpy(), atol=1e-3)


def test_torchrun_two_processes_train_with_ddp(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "tigbev.cli", "train-student", "--preset", "demo", "--dataroot", str(synth_root), "--split", SPLIT,
           "--out", str(out), "--cache", synth_cache, "--epochs", "1", "--batch-size", "1", "--workers", "0",
           "--device", "cpu", "--max-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (out / "last.pt").is_file()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2


def test_loss_weights_zero_is_the_baseline() -> None:
    w = LossWeights.baseline()
    assert not w.distills and w.depth > 0 and w.inner_depth == 0
    with pytest.raises(ValueError, match="teacher"):
        TrainStudentConfig(preset="demo", dataroot=".", split="s", out_dir="o", teacher="none")


def test_backbone_starts_from_local_imagenet_weights(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    from tigbev.models.student.resnet import ResNet, WeightsError
    from tigbev.models.student.student import student_preset

    scfg = student_preset("demo")
    torch.manual_seed(7)
    source = ResNet(scfg.backbone, width=scfg.backbone_width, out_layers=(3, 4))
    weights = {k: v for k, v in source.state_dict().items()}
    path = tmp_path / "resnet.pth"
    torch.save(weights, path)
    r = train_student.run(_cfg(synth_root, tmp_path / "run", synth_cache, backbone_weights=path, lr=1e-12,
                               weight_decay=0.0), progress=False)
    ckpt = torch.load(r.checkpoint, weights_only=True)["model"]
    for k, v in weights.items():
        if v.is_floating_point() and "running" not in k:
            torch.testing.assert_close(ckpt[f"student.backbone.{k}"], v, atol=1e-6, rtol=0)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="conv1.weight"):
        train_student.run(_cfg(synth_root, tmp_path / "run2", synth_cache, backbone_weights=bad), progress=False)


def test_online_teacher_uses_the_lidar_read_by_the_loader(synth_root: Path, demo_teacher_ckpt: Path) -> None:
    """The online teacher's points come with the batch (DataLoader workers); targets equal those of LiDAR read in
    the training process, and ``training_step`` trains on them."""
    from tigbev.models.student.student import student_preset

    reader = NuScenesReader(synth_root)
    online = OnlineTeacher(demo_teacher_ckpt, reader, torch.device("cpu"))
    scfg = student_preset("demo")
    kw = {"input_hw": scfg.input_hw, "feature_stride": 16, "image_policy": ImageAugPolicy(input_hw=scfg.input_hw),
          "bda_policy": BevAugmentPolicy(), "seed": 3, "train": True,
          "point_range_m": (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)}
    tokens = reader.sample_tokens(SPLIT)[:2]
    with_lidar = CameraDetectionDataset(reader, tokens, cache=None, lidar_reader=online.reader,
                                        online_keypoints=(6, 1.6), **kw)
    without = CameraDetectionDataset(reader, tokens, cache=None, online_keypoints=(6, 1.6), **kw)
    batch = collate_camera([with_lidar[0], with_lidar[1]])
    assert batch.lidar_points is not None
    plain = collate_camera([without[0], without[1]])
    assert plain.lidar_points is None
    t_loader, map_loader = online.targets(batch)
    t_process, map_process = online.targets(plain)
    torch.testing.assert_close(map_loader, map_process, rtol=0, atol=0)
    torch.testing.assert_close(t_loader.kp_teacher_xy, t_process.kp_teacher_xy, rtol=0, atol=0)
    assert t_loader.kp_teacher_xy.shape[2] == 36
    # The published way: the teacher's map is in the augmented frame, so both keypoint sets are the augmented ones
    # (laid on the un-augmented boxes, carried forward by the batch's BDA, never inverted), and the map is the
    # teacher's on the points moved by the BDA.
    torch.testing.assert_close(t_loader.kp_teacher_xy, t_loader.kp_student_xy, rtol=0, atol=0)
    torch.testing.assert_close(t_loader.map_from_lidar, batch.aug_from_lidar, rtol=0, atol=0)
    assert not torch.allclose(batch.aug_from_lidar, torch.eye(4).expand(2, 4, 4))
    for i in range(2):
        moved = batch.lidar_points[i].clone()
        m = batch.aug_from_lidar[i].double()[:3, :3]
        moved[:, :3] = (moved[:, :3].double() @ m.T).float()
        assert not torch.equal(moved[:, :3], batch.lidar_points[i][:, :3])
        torch.testing.assert_close(map_loader[i:i + 1], online.teacher.bev_map([moved]), rtol=0, atol=0)
    no_keypoints = CameraDetectionDataset(reader, tokens, cache=None, lidar_reader=online.reader, **kw)
    with pytest.raises(TigbevError, match="no keypoints"):
        online.targets(collate_camera([no_keypoints[0]]))

    torch.manual_seed(0)
    cfg = _cfg(synth_root, Path("unused"), None, teacher="online", teacher_checkpoint=demo_teacher_ckpt)
    model = DistillationModel(scfg, cfg, online.grid, online.channels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.distill.adapter.weight.detach().clone()
    teacher_before = batch.teacher
    result = train_student.training_step(
        model, opt, torch.amp.GradScaler("cuda", enabled=False), batch, online=online,
        teacher_hw=online.grid.shape_hw, device=torch.device("cpu"), use_amp=False, grad_clip=5.0)
    loss, losses, times = result.loss, result.losses, result.times
    assert torch.isfinite(loss) and losses["inter_channel"] > 0
    assert batch.teacher is teacher_before  # the step is pure: the online targets went into a copy of the batch
    # one place applies the weights: weighted = weight x unweighted, and the total is their sum
    assert set(result.unweighted) == set(losses)
    for k, v in result.unweighted.items():
        assert float(losses[k].detach()) == pytest.approx(model.weight_dict[k] * float(v.detach()), rel=1e-6), k
    assert float(loss.detach()) == pytest.approx(sum(float(v.detach()) for v in losses.values()), rel=1e-6)
    assert 0 < times.targets_s <= times.total_s
    assert not torch.equal(before, model.distill.adapter.weight)  # the optimiser stepped


def test_another_input_size_trains_from_the_same_cache_and_evaluates_at_its_size(
        synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    from tigbev.engine.scoring import load_student, predict_student

    out = tmp_path / "hw"
    r = train_student.run(_cfg(synth_root, out, synth_cache, input_hw=[96, 272]), progress=False)
    ckpt = torch.load(r.checkpoint, weights_only=True)
    assert tuple(ckpt["student_config"]["input_hw"]) == (96, 272)
    assert {"inter_keypoint", "depth", "heatmap"} <= set(r.final_losses)
    student = load_student(r.checkpoint, torch.device("cpu"))
    assert student.cfg.input_hw == (96, 272) and student.cfg.feature_hw == (6, 17)
    reader = NuScenesReader(synth_root)
    tokens = reader.sample_tokens(SPLIT)[:2]
    preds = predict_student(student, reader, tokens, torch.device("cpu"), 2, progress=False)
    assert sorted(preds) == sorted(tokens)
    # The preset's size is another run: resuming into it is refused, naming the field.
    with pytest.raises(TigbevError, match="input_hw"):
        train_student.run(_cfg(synth_root, out, synth_cache, max_steps=2, resume=True), progress=False)
    # A run saved before the option existed resumes when the option is left unset.
    old = tmp_path / "old"
    train_student.run(_cfg(synth_root, old, synth_cache), progress=False)
    saved = torch.load(old / "last.pt", weights_only=True)
    del saved["train_config"]["input_hw"]
    torch.save(saved, old / "last.pt")
    assert train_student.run(_cfg(synth_root, old, synth_cache, max_steps=2, resume=True), progress=False).steps == 2


@pytest.mark.parametrize("hw", [(8, 352), (128,), (128.0, 352)])
def test_an_input_size_below_the_stride_or_not_two_integers_is_refused(synth_root: Path, hw: tuple) -> None:
    with pytest.raises(ValueError, match="TrainStudentConfig.input_hw"):
        _cfg(synth_root, Path("unused"), None, teacher="none", weights=LossWeights.baseline(), input_hw=hw)


def test_a_fractional_epoch_budget_spans_its_steps(synth_root: Path, synth_cache: str, tmp_path: Path) -> None:
    """1.5 epochs of 3 samples at batch 1: the schedule spans 4.5 -> 4 steps (round half to even), the run stops
    there inside its second epoch, and the step decay sits at 19/24 and 23/24 of those steps."""
    cfg = _cfg(synth_root, tmp_path / "frac", synth_cache, epochs=1.5, batch_size=1, max_steps=None, lr=1e-3,
               warmup_steps=1)
    result = train_student.run(cfg, progress=False)
    assert result.steps == 4
    records = [json.loads(line) for line in (tmp_path / "frac" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r.get("kind") == "epoch"] == [0, 1]
    lrs = [r["lr"] for r in records if r.get("kind") == "step"]
    assert lrs[-1] == pytest.approx(1e-5)  # both decays (steps 3 and 4 of 4) have happened by the last step
