"""The nuscenes teacher preset decodes and loads points as mmdetection3d's published test configuration of
centerpoint_01voxel_second_secfpn_circlenms (what the imported weights were evaluated with): no max-pool peak filter
(``max_pool_nms=False``), the ``post_center_range`` filter, ``remove_close`` on earlier sweeps, the key sweep
repeated when a sample has none (``pad_empty_sweeps``), and the strict ``PointsRangeFilter``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from tigbev.data.nuscenes_reader import NuScenesReader, read_pcd_bin
from tigbev.models.heads import CenterHead, CenterHeadConfig
from tigbev.models.teacher.centerpoint import MMDET3D_POST_CENTER_RANGE_M, teacher_preset
from tigbev.models.teacher.voxelizer import Voxelizer
from tigbev.geometry import BevGrid


def test_the_nuscenes_preset_is_the_published_test_configuration() -> None:
    cfg = teacher_preset("nuscenes")
    assert not cfg.peak_filter and cfg.post_center_range_m == (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    assert cfg.strict_range and cfg.sweeps_remove_close_m == 1.0 and cfg.pad_empty_sweeps
    assert cfg.reader_options() == {"num_sweeps": 10, "remove_close_m": 1.0, "pad_empty_sweeps": True}
    demo = teacher_preset("demo")  # tigbev's own teacher keeps its own decoding
    assert demo.peak_filter and demo.post_center_range_m is None and not demo.pad_empty_sweeps


def _one_peak_preds(grid: BevGrid, z: float) -> list[dict[str, torch.Tensor]]:
    """One task, a 2-cell plateau of high scores at two neighbouring cells, the box centre height ``z``."""
    h, w = grid.shape_hw
    heat = torch.full((1, 1, h, w), -10.0)
    heat[0, 0, 10, 10] = 5.0
    heat[0, 0, 10, 11] = 4.0  # a neighbour: suppressed by the peak filter, kept without it (far for circle NMS)
    reg = torch.zeros(1, 10, h, w)
    reg[:, 2] = z
    reg[:, 6:8] = torch.tensor([0.0, 1.0])[:, None, None]
    return [{"heatmap": heat, "reg": reg[:, 0:2], "height": reg[:, 2:3], "dim": reg[:, 3:6], "rot": reg[:, 6:8],
             "vel": reg[:, 8:10]}]


def test_decoding_without_peak_filter_and_with_the_post_center_range() -> None:
    grid = BevGrid.square(25.6, 0.8)
    kw = {"in_channels": 4, "grid": grid, "tasks": (("car",),), "nms_radii_m": (0.5,), "share_channels": 4,
          "head_channels": 4}
    peak = CenterHead(CenterHeadConfig(**kw)).decode(_one_peak_preds(grid, 0.0))[0]
    plain = CenterHead(CenterHeadConfig(**kw, peak_filter=False)).decode(_one_peak_preds(grid, 0.0))[0]
    assert len(peak.boxes) == 1 and len(plain.boxes) == 2
    ranged = CenterHead(CenterHeadConfig(**kw, peak_filter=False, post_center_range_m=MMDET3D_POST_CENTER_RANGE_M))
    assert len(ranged.decode(_one_peak_preds(grid, 0.0))[0].boxes) == 2
    assert len(ranged.decode(_one_peak_preds(grid, 12.0))[0].boxes) == 0  # centres above z = 10 m are dropped


def test_the_strict_range_filter_drops_points_on_the_lower_faces() -> None:
    rng = (-4.0, -4.0, -2.0, 4.0, 4.0, 2.0)
    pts = torch.tensor([[-4.0, 0.0, 0.0, 1.0, 0.0], [0.0, -4.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    loose = Voxelizer(rng, (0.5, 0.5, 0.5), 10, 100).voxelize_one(pts)[0]
    strict = Voxelizer(rng, (0.5, 0.5, 0.5), 10, 100, strict_range=True).voxelize_one(pts)[0]
    assert len(loose) == 3 and len(strict) == 1


def test_sweeps_lose_close_points_and_a_scene_start_is_padded(synth_root: Path, tmp_path: Path) -> None:
    # A copy of the synthetic tables whose first sample's LiDAR sweep has no earlier sweep (as at a real scene start).
    root = tmp_path / "dataroot"
    shutil.copytree(synth_root, root)
    first, second = NuScenesReader(synth_root).sample_tokens("synth_train")[:2]
    key_sd = NuScenesReader(synth_root).nusc.get("sample", first)["data"]["LIDAR_TOP"]
    table = root / "v1.0-synth" / "sample_data.json"
    rows = json.loads(table.read_text())
    for r in rows:
        if r["token"] == key_sd:
            r["prev"] = ""
        if r["next"] == key_sd:
            r["next"] = ""
    table.write_text(json.dumps(rows))
    plain = NuScenesReader(root, num_sweeps=3)
    r = 4.0  # mmdet3d's radius is 1 m; the synthetic LiDAR sees no point that close, so a larger one is tested
    mm = NuScenesReader(root, num_sweeps=3, remove_close_m=r, pad_empty_sweeps=True)
    # No earlier sweep: plain reads the key sweep alone, mmdet3d's loading repeats it (close points removed).
    a, b = plain.load_sample(first).lidar, mm.load_sample(first).lidar
    key = a.key_points
    assert len(a.points) == len(key) and b.num_key_points == len(key)
    close = (np.abs(key[:, 0]) < r) & (np.abs(key[:, 1]) < r)
    assert close.any()
    np.testing.assert_array_equal(b.points[: len(key)], key)  # the key sweep itself is not filtered
    np.testing.assert_array_equal(b.points[len(key):], np.concatenate([key[~close]] * 2))
    assert (b.points[:, 4] == 0).all()
    # A sample with earlier sweeps: they lose the points close to their own sensor, nothing is padded.
    c, d = plain.load_sample(second).lidar, mm.load_sample(second).lidar
    assert len(c.sweep_paths) == len(d.sweep_paths) == 3
    drop = sum(int(((np.abs(raw[:, 0]) < r) & (np.abs(raw[:, 1]) < r)).sum())
               for raw in map(read_pcd_bin, c.sweep_paths[1:]))
    assert drop > 0 and len(c.points) - len(d.points) == drop
