"""The voxelizer against a naive loop, with the mmcv hard-voxelisation semantics."""

from __future__ import annotations

import math

import numpy as np
import torch

from tigbev.models.teacher.voxelizer import Voxelizer


def naive_voxelize(points: np.ndarray, rng_min, voxel, grid, max_pts: int, max_vox: int):
    voxels: dict[tuple[int, int, int], list[np.ndarray]] = {}
    order: list[tuple[int, int, int]] = []
    for p in points:
        idx = tuple(int(math.floor((p[k] - rng_min[k]) / voxel[k])) for k in range(3))
        if not all(0 <= idx[k] < grid[k] for k in range(3)):
            continue
        if idx not in voxels:
            if len(order) >= max_vox:
                continue
            voxels[idx] = []
            order.append(idx)
        if len(voxels[idx]) < max_pts:
            voxels[idx].append(p)
    feats = np.array([np.mean(voxels[k], axis=0) for k in order]).reshape(-1, points.shape[1])
    coords = np.array([[k[2], k[1], k[0]] for k in order]).reshape(-1, 3)
    nums = np.array([len(voxels[k]) for k in order])
    return feats, coords, nums


def test_matches_naive_loop() -> None:
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-2.2, 2.2, (3000, 3)), rng.normal(size=(3000, 2))], axis=1).astype(np.float32)
    pts[:1500, :3] = np.round(pts[:1500, :3] * 2) / 2 + 0.01  # crowd some voxels beyond max_points
    vox = Voxelizer((-2.0, -2.0, -1.0, 2.0, 2.0, 1.0), (0.5, 0.5, 0.5), max_points_per_voxel=5, max_voxels=80)
    feats, coords, nums = vox.voxelize_one(torch.from_numpy(pts))
    ref_f, ref_c, ref_n = naive_voxelize(pts, (-2.0, -2.0, -1.0), (0.5, 0.5, 0.5), vox.grid_xyz, 5, 80)
    assert len(ref_c) == 80 and (ref_n == 5).any()  # both limits are exercised
    np.testing.assert_array_equal(coords.numpy(), ref_c)
    np.testing.assert_array_equal(nums.numpy(), ref_n)
    np.testing.assert_allclose(feats.numpy(), ref_f, rtol=1e-5, atol=1e-5)


def test_batch_coords_and_empty_input() -> None:
    vox = Voxelizer((0, 0, 0, 4, 4, 4), (1, 1, 1), max_points_per_voxel=3, max_voxels=100)
    a = torch.tensor([[0.5, 0.5, 0.5, 1.0], [3.5, 0.5, 0.5, 3.0], [9.0, 0, 0, 0]])  # the last is out of range
    empty = torch.zeros((0, 4))
    batch = vox([a, empty, a[:1]])
    assert batch.batch_size == 3
    assert batch.coords.tolist() == [[0, 0, 0, 0], [0, 0, 0, 3], [2, 0, 0, 0]]
    np.testing.assert_allclose(batch.features[:, 3].numpy(), [1.0, 3.0, 1.0])
    assert vox.sparse_shape_zyx == [4, 4, 4]


def test_deterministic() -> None:
    rng = np.random.default_rng(1)
    pts = torch.from_numpy(rng.uniform(-3, 3, (5000, 4)).astype(np.float32))
    vox = Voxelizer((-3, -3, -3, 3, 3, 3), (0.3, 0.3, 0.3), max_points_per_voxel=4, max_voxels=1000)
    a, b = vox.voxelize_one(pts), vox.voxelize_one(pts)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
