"""The synthetic world: loads in nuscenes-devkit, evaluates perfectly against itself, and is physically consistent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tigbev.cli import app
from tigbev.config import SynthConfig
from tigbev.data.classes import CLASS_ATTRIBUTES, DETECTION_CLASSES
from tigbev.data.nuscenes_reader import CAMERA_CHANNELS, NuScenesReader
from tigbev.data.results import evaluate_detection, gt_as_detection_records, write_results
from tigbev.data.synth.writer import SYNTH_VERSION, write_synthetic_dataset
from tigbev.errors import DatasetError
from tigbev.geometry import count_points_in_boxes, points_in_boxes, project_to_image, transform_points

TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")


def test_writes_all_tables_and_splits(synth_root: Path) -> None:
    for name in TABLES:
        assert (synth_root / SYNTH_VERSION / f"{name}.json").is_file(), name
    splits = json.loads((synth_root / SYNTH_VERSION / "splits.json").read_text())
    assert splits == {"synth_train": ["scene-0000"], "synth_val": ["scene-0001"]}
    assert len(list((synth_root / "maps").glob("*.png"))) == 1
    assert not list(synth_root.parent.glob(".dataroot.partial-*")), "the staging folder must be gone"


def test_devkit_loads_and_reader_reads(synth_reader: NuScenesReader) -> None:
    assert synth_reader.split_names() == ["synth_train", "synth_val"]
    tokens = synth_reader.sample_tokens("synth_train")
    assert len(tokens) == 3
    frame = synth_reader.load_sample(tokens[1])
    assert [c.channel for c in frame.cameras] == list(CAMERA_CHANNELS)
    assert frame.cameras[0].load_image().shape == (108, 192, 3)
    # Key sweep + 1 sweep between key frames + the previous key frame = 3 sweeps, with their time lags.
    lags = np.unique(frame.lidar.points[:, 4])
    np.testing.assert_allclose(lags, [0.0, 0.25, 0.5], atol=1e-6)
    assert frame.lidar.num_key_points == int((frame.lidar.points[:, 4] == 0).sum())
    # Every detection class appears in a scene, with a valid attribute.
    assert set(frame.gt.labels.tolist()) == set(range(len(DETECTION_CLASSES)))
    for label, attribute in zip(frame.gt.labels, frame.gt.attribute_names):
        allowed = CLASS_ATTRIBUTES[DETECTION_CLASSES[label]]
        assert attribute in allowed if allowed else attribute == ""


def test_gt_as_predictions_scores_perfectly(synth_reader: NuScenesReader, tmp_path: Path) -> None:
    results = {t: gt_as_detection_records(synth_reader.load_sample(t)) for t in synth_reader.sample_tokens("synth_val")}
    path = write_results(tmp_path / "results.json", results, use_camera=False, use_lidar=True)
    metrics = evaluate_detection(synth_reader.nusc, path, "synth_val", tmp_path / "eval")
    assert metrics["mean_ap"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["nd_score"] == pytest.approx(1.0, abs=1e-6)
    for name, err in metrics["tp_errors"].items():
        assert err == pytest.approx(0.0, abs=1e-6), name


def test_annotations_match_the_simulated_sweep(synth_reader: NuScenesReader) -> None:
    nusc = synth_reader.nusc
    for token in synth_reader.sample_tokens("synth_val"):
        frame = synth_reader.load_sample(token)
        # num_lidar_pts was counted from the key sweep: recount in the lidar frame and, independently, with the
        # devkit's own points_in_box in the global frame.
        np.testing.assert_array_equal(count_points_in_boxes(frame.lidar.key_points, frame.gt.boxes),
                                      frame.gt.num_lidar_pts)
        from nuscenes.utils.geometry_utils import points_in_box

        pts_global = transform_points(frame.global_from_lidar, frame.lidar.key_points[:, :3]).T
        for ann, expected in list(zip(frame.gt.annotation_tokens, frame.gt.num_lidar_pts))[:10]:
            assert int(points_in_box(nusc.get_box(ann), pts_global).sum()) == expected
        # Velocities exist for every box (annotations are linked) and agree with the motion between samples.
        assert np.isfinite(frame.gt.boxes[:, 7:9]).all()
        moving = np.array([a in ("vehicle.moving", "pedestrian.moving") for a in frame.gt.attribute_names])
        speed = np.linalg.norm(frame.gt.boxes[:, 7:9], axis=1)
        assert (speed[moving] > 0.5).all() and (speed[~moving & (frame.gt.labels != 7) & (frame.gt.labels != 6)]
                                                < 1e-6).all()


def test_lidar_sees_objects_where_cameras_see_them(synth_reader: NuScenesReader) -> None:
    """Cross-modal consistency: LiDAR returns inside boxes project onto object pixels, not sky or road."""
    frame = synth_reader.load_sample(synth_reader.sample_tokens("synth_val")[0])
    pts = frame.lidar.key_points
    # Returns inside boxes (boxes start 2 cm above the ground, so no road return counts).
    on_object = points_in_boxes(pts, frame.gt.boxes).any(axis=1)
    agree, total = 0, 0
    for cam in frame.cameras:
        img = cam.load_image().astype(np.float64) / 255.0
        proj = project_to_image(pts[on_object], cam.cam_from_lidar, cam.intrinsics, (cam.width, cam.height),
                                min_depth_m=1.0)
        if len(proj) == 0:
            continue
        u, v = np.round(proj.uv).astype(int).T
        rgb = img[v, u]
        sky = (rgb[:, 2] > rgb[:, 0] + 0.05) & (rgb.mean(axis=1) > 0.6)
        agree += int((~sky).sum())
        total += len(proj)
    assert total > 200
    assert agree / total > 0.9


def test_deterministic_per_seed(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".json", ".bin") and p.name != "synth_config.json":
                h.update(p.relative_to(root).as_posix().encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    kw = dict(scenes=2, samples_per_scene=2, image_width=64, image_height=36, lidar_azimuth_steps=180,
              sweeps_per_sample=0, seed=3)
    a = write_synthetic_dataset(SynthConfig(out_dir=tmp_path / "a", workers=1, **kw), progress=False)
    b = write_synthetic_dataset(SynthConfig(out_dir=tmp_path / "b", workers=2, **kw), progress=False)
    c = write_synthetic_dataset(SynthConfig(out_dir=tmp_path / "c", workers=1, **{**kw, "seed": 4}), progress=False)
    assert digest(a.dataroot) == digest(b.dataroot)
    assert digest(a.dataroot) != digest(c.dataroot)


def test_refuses_non_empty_output_and_keeps_it(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="taken"):
        write_synthetic_dataset(SynthConfig(out_dir=out, scenes=1, samples_per_scene=2), progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_config_validation_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="samples_per_scene"):
        SynthConfig(out_dir=tmp_path, samples_per_scene=1)
    with pytest.raises(ValueError, match="val_scenes"):
        SynthConfig(out_dir=tmp_path, scenes=2, val_scenes=3)


def test_cli_synth(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", str(out), "--scenes", "1", "--samples-per-scene", "2", "--image-width",
                                 "64", "--image-height", "36", "--lidar-azimuth-steps", "180", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 samples" in result.output
    assert NuScenesReader(out).sample_tokens("synth_val")
    bad = runner.invoke(app, ["synth", str(out)])
    assert bad.exit_code == 2
    assert str(out) in bad.output
