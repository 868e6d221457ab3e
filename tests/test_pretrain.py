"""The renderer's per-pixel labels and the backbone pretraining stage built on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tigbev.config import PretrainBackboneConfig
from tigbev.data.camera_dataset import CameraDetectionDataset
from tigbev.data.classes import DETECTION_CLASSES
from tigbev.data.image_aug import ImageAugPolicy
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, NuScenesReader
from tigbev.data.synth.raycast import LABEL_GROUND, LABEL_OBJECT0, LABEL_SKY
from tigbev.data.synth.writer import render_label_path
from tigbev.geometry import first_box_of_points, project_to_image
from tigbev.models.student.resnet import load_torchvision_weights
from tigbev.models.student.student import CameraStudent, student_preset
from tigbev.stages import pretrain_backbone
from tigbev.stages.pretrain_backbone import RenderedImages

SPLIT = "synth_train"


def test_renderer_labels_agree_with_the_lidar(synth_root: Path) -> None:
    """LiDAR points projected into a camera land on pixels whose rendered depth is the point's depth and whose
    rendered class is the class of the box the point lies in (the camera fires a few ms after the LiDAR, so a
    moving object may be off by a few centimetres)."""
    reader = NuScenesReader(synth_root)
    frame = reader.load_sample(reader.sample_tokens(SPLIT)[1])
    key = frame.lidar.key_points
    box_of_point = first_box_of_points(key, frame.gt.boxes)
    depth_err, class_ok, class_n = [], 0, 0
    for cam in frame.cameras:
        sd = reader.nusc.get("sample_data", cam.sample_data_token)
        with np.load(synth_root / render_label_path(sd["filename"])) as d:
            depth, label, stride, offset = d["depth_m"], d["label"], int(d["stride"]), int(d["offset"])
        proj = project_to_image(key, cam.cam_from_lidar, cam.intrinsics, (cam.width, cam.height), min_depth_m=0.5)
        ju = np.rint((proj.uv[:, 0] - offset) / stride).astype(int)
        jv = np.rint((proj.uv[:, 1] - offset) / stride).astype(int)
        on_grid = (np.abs(ju * stride + offset - proj.uv[:, 0]) < 0.5) & (np.abs(jv * stride + offset - proj.uv[:, 1])
                                                                          < 0.5)
        on_grid &= (ju < depth.shape[1]) & (jv < depth.shape[0])
        ju, jv = ju[on_grid], jv[on_grid]
        rendered = depth[jv, ju].astype(np.float64)
        hit = np.isfinite(rendered)  # a LiDAR return is (almost) never on the sky: edges of moving objects aside
        assert hit.mean() > 0.97, hit.mean()
        depth_err.append((np.abs(rendered - proj.depth_m[on_grid]) / proj.depth_m[on_grid])[hit])
        boxes = box_of_point[proj.index[on_grid]]
        want = np.where(boxes >= 0, LABEL_OBJECT0 + frame.gt.labels[np.maximum(boxes, 0)], LABEL_GROUND)
        got = label[jv, ju]
        class_ok += int((got == want).sum())
        class_n += len(got)
    err = np.concatenate(depth_err)
    assert len(err) > 200 and np.median(err) < 0.01, np.median(err)
    assert class_ok / class_n > 0.9, class_ok / class_n
    assert LABEL_SKY == 0 and LABEL_OBJECT0 + len(DETECTION_CLASSES) == pretrain_backbone.NUM_CLASSES


def test_pretraining_targets_match_the_students_lidar_depth_targets(synth_root: Path) -> None:
    """Per stride-16 cell, the rendered depth bin equals (within a bin) the bin of the student's own LiDAR depth
    target for the same image and transform, so pretraining teaches the student's own task."""
    reader = NuScenesReader(synth_root)
    scfg = student_preset("demo")
    tokens = reader.sample_tokens(SPLIT)[:2]
    rendered = RenderedImages(reader, tokens, scfg, train=False)
    lidar = CameraDetectionDataset(reader, tokens, cache=None, input_hw=scfg.input_hw, feature_stride=16,
                                   image_policy=ImageAugPolicy(input_hw=scfg.input_hw), bda_policy=None,
                                   train=False, point_range_m=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))
    bins = scfg.depth_bins
    close, both = 0, 0
    for i in range(len(tokens)):
        sample = lidar[i]
        for c in range(len(CAMERA_CHANNELS)):
            image, depth_bin, cls = rendered[i * len(CAMERA_CHANNELS) + c]
            torch.testing.assert_close(image, sample.images[c])  # the same pixels, the same transform
            d = sample.depth_m[c]
            k, ok = bins.index(d)
            ok &= (d > 0) & (depth_bin >= 0)
            close += int(((k - depth_bin).abs() <= 1)[ok].sum())
            both += int(ok.sum())
            assert ((cls >= -1) & (cls < pretrain_backbone.NUM_CLASSES)).all()
    assert both > 100 and close / both > 0.8, (close, both)  # cells at object edges differ: LiDAR nearest vs centre


def test_pretrain_stage_writes_a_backbone_the_student_loads_and_resumes(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pretrain"
    cfg = PretrainBackboneConfig(preset="demo", dataroot=synth_root, split=SPLIT, out_dir=out, val_split="synth_val",
                                 epochs=2, batch_size=6, workers=0, device="cpu", max_steps=2)
    result = pretrain_backbone.run(cfg, progress=False)
    assert result.steps == 2 and set(result.metrics) == {"depth_bin_accuracy", "depth_abs_error_m",
                                                          "class_accuracy", "object_class_accuracy"}
    for name in ("backbone.pth", "last.pt", "eval.json", "metrics.jsonl", "loss_curve.png", "config.json"):
        assert (out / name).is_file(), name
    student = CameraStudent(student_preset("demo"))
    load_torchvision_weights(student.backbone, result.backbone)  # strict: every tensor fits
    state = torch.load(result.backbone, weights_only=True)
    torch.testing.assert_close(student.backbone.state_dict()["conv1.weight"], state["conv1.weight"])
    resumed = pretrain_backbone.run(PretrainBackboneConfig(**{**cfg.to_dict(), "max_steps": 3, "resume": True}),
                                    progress=False)
    assert resumed.steps == 3
    with pytest.raises(Exception, match="lr: checkpoint has"):
        pretrain_backbone.run(PretrainBackboneConfig(**{**cfg.to_dict(), "lr": 1e-3, "resume": True}),
                              progress=False)
