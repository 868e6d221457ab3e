"""Fast unit tests of tigbev.geometry with hand-computable values (empty inputs first)."""

from __future__ import annotations

import numpy as np
import pytest
from pyquaternion import Quaternion

from tigbev.geometry import (
    BevGrid,
    box_corners,
    box_keypoints_xy,
    count_points_in_boxes,
    first_box_of_points,
    invert_pose,
    lwh_from_nuscenes_wlh,
    make_pose,
    matrix_from_quat_wxyz,
    nuscenes_wlh_from_lwh,
    points_in_boxes,
    project_points,
    project_to_image,
    quat_wxyz_from_matrix,
    quat_wxyz_from_yaw,
    rotate_vectors,
    transform_boxes,
    transform_points,
    wrap_angle,
    yaw_from_quat_wxyz,
    yaw_twist_of_pose,
)

PI = np.pi


def _random_quats(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _rz(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _tilted_pose(rng: np.random.Generator, max_tilt_rad: float = 0.3) -> np.ndarray:
    """Rz(yaw) @ (rotation about a random horizontal axis by up to max_tilt_rad), with a large translation."""
    axis_angle = rng.uniform(-PI, PI)
    tilt = rng.uniform(-max_tilt_rad, max_tilt_rad)
    swing = Quaternion(axis=[np.cos(axis_angle), np.sin(axis_angle), 0.0], angle=tilt).rotation_matrix
    return make_pose(_rz(rng.uniform(-PI, PI)) @ swing, rng.uniform(-500, 500, size=3))


# ----------------------------------------------------------------------------------------------------- frames
def test_transform_points_empty_keeps_columns():
    pose = make_pose(_rz(0.3), [1.0, 2.0, 3.0])
    assert transform_points(pose, np.zeros((0, 3))).shape == (0, 3)
    assert transform_points(pose, np.zeros((0, 5), dtype=np.float32)).shape == (0, 5)
    with pytest.raises(ValueError, match="points"):
        transform_points(pose, np.zeros((4, 2)))


def test_matrix_from_quat_matches_pyquaternion():
    quats = _random_quats(np.random.default_rng(0), 50)
    ours = matrix_from_quat_wxyz(quats)  # batched
    assert ours.shape == (50, 3, 3)
    for q, r in zip(quats, ours):
        np.testing.assert_allclose(r, Quaternion(q).rotation_matrix, atol=1e-12)
    # Denormalised quaternions (JSON rounding) are normalised first.
    np.testing.assert_allclose(matrix_from_quat_wxyz(3.0 * quats[0]), ours[0], atol=1e-12)


def test_matrix_from_quat_rejects_bad_input():
    with pytest.raises(ValueError, match="4 components"):
        matrix_from_quat_wxyz([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="zero norm"):
        matrix_from_quat_wxyz([0.0, 0.0, 0.0, 0.0])


def test_quat_from_matrix_round_trip_canonical_w_nonnegative():
    quats = _random_quats(np.random.default_rng(1), 200)
    for q in quats:
        back = quat_wxyz_from_matrix(Quaternion(q).rotation_matrix)
        assert back[0] >= 0
        np.testing.assert_allclose(back, q if q[0] >= 0 else -q, atol=1e-12)


@pytest.mark.parametrize("axis", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
def test_quat_from_matrix_half_turns(axis):
    # w == 0: every branch of Shepperd's method other than the trace branch.
    rot = Quaternion(axis=axis, angle=PI).rotation_matrix
    q = quat_wxyz_from_matrix(rot)
    np.testing.assert_allclose(abs(q[0]), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.abs(q[1:]), np.abs(axis) / np.linalg.norm(axis), atol=1e-12)
    np.testing.assert_allclose(matrix_from_quat_wxyz(q), rot, atol=1e-12)
    with pytest.raises(ValueError, match="3x3"):
        quat_wxyz_from_matrix(np.eye(4))


def test_quat_from_yaw_known_angles():
    s = np.sqrt(0.5)
    np.testing.assert_allclose(quat_wxyz_from_yaw(0.0), [1, 0, 0, 0], atol=1e-15)
    np.testing.assert_allclose(quat_wxyz_from_yaw(PI / 2), [s, 0, 0, s], atol=1e-15)
    np.testing.assert_allclose(quat_wxyz_from_yaw(-PI / 2), [s, 0, 0, -s], atol=1e-15)
    np.testing.assert_allclose(quat_wxyz_from_yaw(PI), [0, 0, 0, 1], atol=1e-15)
    yaws = np.linspace(-3.1, 3.1, 13)
    assert quat_wxyz_from_yaw(yaws).shape == (13, 4)
    np.testing.assert_allclose(yaw_from_quat_wxyz(quat_wxyz_from_yaw(yaws)), yaws, atol=1e-12)
    np.testing.assert_allclose(matrix_from_quat_wxyz(quat_wxyz_from_yaw(0.7)), _rz(0.7), atol=1e-15)


def test_make_pose_shapes():
    pose = make_pose(quat_wxyz_from_yaw(PI / 2), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(pose[:3, :3], _rz(PI / 2), atol=1e-15)
    np.testing.assert_array_equal(pose[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(pose[:3, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="rotation"):
        make_pose(np.eye(2), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="rotation"):
        make_pose(np.zeros(3), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="translation"):
        make_pose(np.eye(3), [0.0, 0.0])


def test_invert_pose_is_exact_inverse():
    rng = np.random.default_rng(2)
    poses = np.stack([_tilted_pose(rng, max_tilt_rad=PI) for _ in range(10)])
    inv = invert_pose(poses)
    np.testing.assert_allclose(inv @ poses, np.broadcast_to(np.eye(4), poses.shape), atol=1e-12)
    np.testing.assert_allclose(poses @ inv, np.broadcast_to(np.eye(4), poses.shape), atol=1e-12)
    np.testing.assert_allclose(inv[0], np.linalg.inv(poses[0]), atol=1e-9)


def test_transform_points_hand_case_carries_extra_columns():
    pose = make_pose(_rz(PI / 2), [1.0, 2.0, 3.0])  # x -> y, y -> -x, then translate
    pts = np.array([[1.0, 0.0, 0.0, 7.5, 0.1], [0.0, 1.0, 0.0, 8.5, 0.2], [0.0, 0.0, 1.0, 9.5, 0.3]], np.float32)
    out = transform_points(pose, pts)
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out[:, :3], [[1, 3, 3], [0, 2, 3], [1, 2, 4]], atol=1e-12)
    np.testing.assert_array_equal(out[:, 3:], pts[:, 3:].astype(np.float64))
    # Free vectors ignore the translation.
    np.testing.assert_allclose(rotate_vectors(pose, [[1.0, 0.0, 0.0]]), [[0, 1, 0]], atol=1e-12)


def test_yaw_twist_of_pure_z_rotation_is_yaw():
    for yaw in np.linspace(-3.1, 3.1, 11):
        np.testing.assert_allclose(yaw_twist_of_pose(make_pose(_rz(yaw), [5.0, -3.0, 1.0])), yaw, atol=1e-12)


def test_yaw_twist_of_swing_twist_composition_and_inverse():
    rng = np.random.default_rng(3)
    for _ in range(50):
        yaw = rng.uniform(-3.1, 3.1)
        a = rng.uniform(-PI, PI)
        swing = Quaternion(axis=[np.cos(a), np.sin(a), 0.0], angle=rng.uniform(-1.0, 1.0)).rotation_matrix
        pose = make_pose(_rz(yaw) @ swing, rng.uniform(-100, 100, size=3))
        twist = yaw_twist_of_pose(pose)
        np.testing.assert_allclose(twist, yaw, atol=1e-12)
        np.testing.assert_allclose(yaw_twist_of_pose(invert_pose(pose)), -twist, atol=1e-12)


# ----------------------------------------------------------------------------------------------------- angles
def test_wrap_angle_range_and_pi():
    np.testing.assert_array_equal(wrap_angle([PI, -PI, 3 * PI, -3 * PI]), [PI, PI, PI, PI])
    np.testing.assert_allclose(wrap_angle([0.0, 2 * PI, 0.5 + 4 * PI, -0.5 - 2 * PI]), [0, 0, 0.5, -0.5],
                               atol=1e-12)
    angles = np.random.default_rng(4).uniform(-50, 50, size=1000)
    wrapped = wrap_angle(angles)
    assert np.all(wrapped > -PI) and np.all(wrapped <= PI)
    np.testing.assert_allclose(np.cos(wrapped), np.cos(angles), atol=1e-12)
    np.testing.assert_allclose(np.sin(wrapped), np.sin(angles), atol=1e-12)
    assert wrap_angle(np.zeros(0)).shape == (0,)


# ----------------------------------------------------------------------------------------------------- boxes
def test_box_corners_empty_and_bad_shape():
    assert box_corners(np.zeros((0, 7))).shape == (0, 8, 3)
    with pytest.raises(ValueError, match="boxes"):
        box_corners(np.zeros((2, 6)))


def test_box_corners_axis_aligned():
    corners = box_corners([[1.0, 2.0, 3.0, 4.0, 2.0, 6.0, 0.0]])[0]  # l=4 (x), w=2 (y), h=6 (z)
    expected = [
        [-1, 3, 0], [3, 3, 0], [3, 1, 0], [-1, 1, 0],  # bottom 0-3
        [-1, 3, 6], [3, 3, 6], [3, 1, 6], [-1, 1, 6],  # top 4-7
    ]
    np.testing.assert_allclose(corners, expected, atol=1e-12)
    front = corners[[1, 2, 6, 5]]
    np.testing.assert_allclose(front[:, 0], 3.0)  # the front face is at +x for yaw 0
    assert np.all(corners[[0, 3, 4, 7], 0] < 3.0)


def test_box_corners_rotated_90_degrees():
    corners = box_corners([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, PI / 2]])[0]  # heading +y: local (x, y) -> (-y, x)
    expected = [
        [-1, -2, -1], [-1, 2, -1], [1, 2, -1], [1, -2, -1],
        [-1, -2, 1], [-1, 2, 1], [1, 2, 1], [1, -2, 1],
    ]
    np.testing.assert_allclose(corners, expected, atol=1e-12)
    np.testing.assert_allclose(corners[[1, 2, 6, 5], 1], 2.0, atol=1e-12)  # front face now at +y


def test_points_in_boxes_empty():
    boxes = np.array([[0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0]])
    assert points_in_boxes(np.zeros((0, 3)), boxes).shape == (0, 1)
    mask = points_in_boxes(np.zeros((3, 4)), np.zeros((0, 9)))
    assert mask.shape == (3, 0) and mask.dtype == bool
    np.testing.assert_array_equal(count_points_in_boxes(np.zeros((0, 3)), boxes), [0])
    with pytest.raises(ValueError, match="points"):
        points_in_boxes(np.zeros((3, 2)), boxes)


def test_points_in_boxes_hand_case_rotated():
    boxes = np.array([
        [0.0, 0.0, 0.0, 4.0, 2.0, 2.0, PI / 2],  # spans x in [-1, 1], y in [-2, 2], z in [-1, 1]
        [10.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0],  # axis aligned unit-ish cube around x = 10
    ])
    points = np.array([
        [0.0, 1.9, 0.0],  # inside box 0 (along its length)
        [1.5, 0.0, 0.0],  # outside box 0: would be inside if the box were not rotated
        [1.0, 0.0, 0.0],  # on a side face of box 0
        [0.0, 0.0, 1.0],  # on the top face of box 0
        [0.0, 0.0, 1.0001],  # just above box 0
        [0.0, -2.0001, 0.0],  # just behind box 0
        [10.5, -0.5, 0.5],  # inside box 1
        [11.0, 1.0, -1.0],  # on a corner of box 1
        [5.0, 0.0, 0.0],  # between the boxes
    ])
    expected = np.array([
        [1, 0], [0, 0], [1, 0], [1, 0], [0, 0], [0, 0], [0, 1], [0, 1], [0, 0],
    ], dtype=bool)
    np.testing.assert_array_equal(points_in_boxes(points, boxes), expected)
    np.testing.assert_array_equal(count_points_in_boxes(points, boxes), [3, 2])


def _naive_points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    out = np.zeros((len(points), len(boxes)), dtype=bool)
    for p, point in enumerate(points):
        for n, box in enumerate(boxes):
            local = _rz(box[6]).T @ (point[:3] - box[:3])
            out[p, n] = bool(np.all(np.abs(local) <= box[3:6] / 2))
    return out


def test_points_in_boxes_matches_naive_loop_and_chunking():
    rng = np.random.default_rng(5)
    boxes = np.concatenate(
        [rng.uniform([-6, -6, -1], [6, 6, 1], (7, 3)), rng.uniform(1, 6, (7, 3)), rng.uniform(-PI, PI, (7, 1))],
        axis=1,
    )
    points = np.concatenate([rng.uniform([-8, -8, -3], [8, 8, 3], (1000, 3)), rng.uniform(0, 1, (1000, 2))], axis=1)
    expected = _naive_points_in_boxes(points, boxes)
    assert 100 < expected.sum() < 0.5 * expected.size  # the random data exercises both outcomes
    np.testing.assert_array_equal(points_in_boxes(points, boxes), expected)
    for chunk in (1, 5, 17, 7 * 1000):
        np.testing.assert_array_equal(points_in_boxes(points, boxes, chunk=chunk), expected)
    np.testing.assert_array_equal(count_points_in_boxes(points, boxes), expected.sum(axis=0))


def test_transform_boxes_round_trip_tilted_pose():
    rng = np.random.default_rng(6)
    boxes = np.concatenate(
        [rng.uniform(-50, 50, (20, 3)), rng.uniform(0.5, 10, (20, 3)), rng.uniform(-3.1, 3.1, (20, 1)),
         rng.uniform(-10, 10, (20, 2))], axis=1
    )
    for _ in range(5):
        a_from_b = _tilted_pose(rng)
        boxes_a = transform_boxes(a_from_b, boxes)
        assert boxes_a.shape == (20, 9)
        np.testing.assert_array_equal(boxes_a[:, 3:6], boxes[:, 3:6])  # sizes never change
        # Speed over ground is kept; velocity turns by the same angle as the yaw.
        np.testing.assert_allclose(np.hypot(boxes_a[:, 7], boxes_a[:, 8]), np.hypot(boxes[:, 7], boxes[:, 8]))
        turn = wrap_angle(np.arctan2(boxes_a[:, 8], boxes_a[:, 7]) - np.arctan2(boxes[:, 8], boxes[:, 7]))
        np.testing.assert_allclose(wrap_angle(turn - (boxes_a[:, 6] - boxes[:, 6])), 0.0, atol=1e-9)
        back = transform_boxes(invert_pose(a_from_b), boxes_a)
        np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-9)
    # 7-column boxes stay 7 columns.
    assert transform_boxes(a_from_b, boxes[:, :7]).shape == (20, 7)
    assert transform_boxes(a_from_b, np.zeros((0, 9))).shape == (0, 9)


def test_transform_boxes_hand_case_velocity_rotates_with_yaw():
    pose = make_pose(_rz(PI / 2), [10.0, 0.0, 1.0])
    box = np.array([[1.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 3.0, 0.0]])
    out = transform_boxes(pose, box)
    np.testing.assert_allclose(out, [[10.0, 1.0, 1.0, 4.0, 2.0, 1.5, PI / 2, 0.0, 3.0]], atol=1e-12)
    # NaN velocities (unknown) stay NaN.
    nan_box = box.copy()
    nan_box[:, 7:] = np.nan
    assert np.isnan(transform_boxes(pose, nan_box)[:, 7:]).all()


def test_lwh_wlh_swap():
    np.testing.assert_array_equal(lwh_from_nuscenes_wlh([2.0, 4.0, 1.5]), [4.0, 2.0, 1.5])
    np.testing.assert_array_equal(nuscenes_wlh_from_lwh([4.0, 2.0, 1.5]), [2.0, 4.0, 1.5])
    sizes = np.arange(24.0).reshape(2, 4, 3)
    np.testing.assert_array_equal(nuscenes_wlh_from_lwh(lwh_from_nuscenes_wlh(sizes)), sizes)
    assert lwh_from_nuscenes_wlh(np.zeros((0, 3))).shape == (0, 3)


# ----------------------------------------------------------------------------------------------------- BEV grid
def _grid() -> BevGrid:
    return BevGrid(x_min_m=-10.0, x_max_m=20.0, y_min_m=-5.0, y_max_m=5.0, cell_m=0.5)


def test_bev_grid_shape_non_square():
    grid = _grid()
    assert (grid.nx, grid.ny) == (60, 20)
    assert grid.shape_hw == (20, 60)
    assert grid.cell_centers_xy().shape == (20, 60, 2)
    assert BevGrid.square(51.2, 0.8).shape_hw == (128, 128)
    assert grid.with_cell(2.5).shape_hw == (4, 12)


def test_bev_grid_cell_index_half_open_edges():
    grid = _grid()
    iy, ix, valid = grid.cell_index(np.zeros((0, 2)))
    assert iy.shape == ix.shape == valid.shape == (0,)
    xy = np.array([
        [-10.0, -5.0],  # lower-left corner: cell (0, 0)
        [-9.5, -4.5],  # the next edge belongs to the next cell
        [-9.5000001, -4.5000001],  # just below it: still cell (0, 0)
        [19.9999, 4.9999],  # last cell
        [20.0, 0.0],  # x_max is outside (half-open)
        [0.0, 5.0],  # y_max is outside
        [-10.1, -6.0],  # outside, clipped to 0
    ])
    iy, ix, valid = grid.cell_index(xy)
    np.testing.assert_array_equal(iy, [0, 1, 0, 19, 10, 19, 0])
    np.testing.assert_array_equal(ix, [0, 1, 0, 59, 59, 20, 0])
    np.testing.assert_array_equal(valid, [True, True, True, True, False, False, False])
    np.testing.assert_array_equal(grid.contains(xy), valid)


def test_bev_grid_cell_centers():
    grid = _grid()
    centers = grid.cell_centers_xy()
    np.testing.assert_allclose(centers[0, 0], [-9.75, -4.75])
    np.testing.assert_allclose(centers[3, 7], [-10 + 7.5 * 0.5, -5 + 3.5 * 0.5])
    np.testing.assert_allclose(centers[-1, -1], [19.75, 4.75])
    iy, ix, valid = grid.cell_index(centers)
    assert valid.all()
    np.testing.assert_array_equal(iy, np.broadcast_to(np.arange(20)[:, None], (20, 60)))
    np.testing.assert_array_equal(ix, np.broadcast_to(np.arange(60)[None, :], (20, 60)))


def test_bev_grid_normalized_matches_grid_sample():
    import torch
    import torch.nn.functional as F

    grid = _grid()
    np.testing.assert_allclose(grid.normalized([[-10.0, -5.0], [20.0, 5.0], [5.0, 0.0]]),
                               [[-1, -1], [1, 1], [0, 0]], atol=1e-15)
    ny, nx = grid.shape_hw
    index_map = torch.arange(ny * nx, dtype=torch.float64).reshape(1, 1, ny, nx)  # value = iy * nx + ix
    centers = grid.cell_centers_xy()
    coords = torch.from_numpy(grid.normalized(centers))[None]  # (1, H, W, 2)
    sampled = F.grid_sample(index_map, coords, mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(sampled, np.arange(ny * nx).reshape(ny, nx), atol=1e-9)
    # Arbitrary metric points: nearest sampling finds the cell that cell_index finds.
    xy = np.random.default_rng(7).uniform([-9.9, -4.9], [19.9, 4.9], size=(200, 2))
    iy, ix, _ = grid.cell_index(xy)
    near = F.grid_sample(index_map, torch.from_numpy(grid.normalized(xy))[None, None], mode="nearest",
                         align_corners=False)[0, 0, 0].numpy()
    np.testing.assert_array_equal(near, iy * nx + ix)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cell_m": 0.0}, "cell_m"),
        ({"cell_m": -1.0}, "cell_m"),
        ({"x_max_m": -10.0}, "x_max_m"),
        ({"y_max_m": -6.0}, "y_max_m"),
        ({"y_max_m": 5.2}, "y range"),
    ],
)
def test_bev_grid_validation_names_field(kwargs, field):
    base = {"x_min_m": -10.0, "x_max_m": 20.0, "y_min_m": -5.0, "y_max_m": 5.0, "cell_m": 0.5}
    with pytest.raises(ValueError, match=field):
        BevGrid(**{**base, **kwargs})


# ----------------------------------------------------------------------------------------------------- projection
K_SIMPLE = np.array([[100.0, 0.0, 50.0], [0.0, 200.0, 40.0], [0.0, 0.0, 1.0]])


def test_project_empty():
    uv, depth = project_points(np.zeros((0, 3)), K_SIMPLE)
    assert uv.shape == (0, 2) and depth.shape == (0,)
    proj = project_to_image(np.zeros((0, 4)), np.eye(4), K_SIMPLE, (100, 80))
    assert len(proj) == 0 and proj.uv.shape == (0, 2) and proj.index.dtype == np.int64
    with pytest.raises(ValueError, match="intrinsics"):
        project_points(np.zeros((1, 3)), np.eye(4))


def test_project_points_hand_case():
    uv, depth = project_points([[1.0, 2.0, 10.0], [0.0, 0.0, 5.0], [-1.0, -0.5, 2.0]], K_SIMPLE)
    np.testing.assert_allclose(uv, [[60.0, 80.0], [50.0, 40.0], [0.0, -10.0]], atol=1e-12)
    np.testing.assert_allclose(depth, [10.0, 5.0, 2.0])


def test_project_to_image_drops_behind_and_outside():
    # Camera 1 m behind the points' origin along z: cam = points + (0, 0, 1).
    cam_from_pts = make_pose(np.eye(3), [0.0, 0.0, 1.0])
    pts = np.array([
        [1.0, 2.0, 9.0],  # -> (60, 80), depth 10: kept
        [0.0, 0.0, -3.0],  # behind the camera (depth -2)
        [0.0, 0.0, -1.0],  # at the camera centre (depth 0)
        [10.0, 0.0, 9.0],  # u = 150: right of a 100 px wide image
        [0.0, 0.0, 4.0],  # -> (50, 40): kept
    ])
    proj = project_to_image(pts, cam_from_pts, K_SIMPLE, (100, 100))
    np.testing.assert_array_equal(proj.index, [0, 4])
    np.testing.assert_allclose(proj.uv, [[60.0, 80.0], [50.0, 40.0]], atol=1e-12)
    np.testing.assert_allclose(proj.depth_m, [10.0, 5.0])


def test_project_to_image_bounds_and_margin():
    # K = identity and depth 1: pixel coordinates equal (x, y) exactly. A 10 x 6 image covers [-0.5, 9.5) x [-0.5, 5.5).
    xs = np.array([-0.51, -0.5, 0.99, 1.0, 7.99, 8.0, 9.49, 9.5])
    pts = np.stack([xs, np.full_like(xs, 2.0), np.ones_like(xs)], axis=1)
    no_margin = project_to_image(pts, np.eye(4), np.eye(3), (10, 6))
    np.testing.assert_array_equal(no_margin.index, [1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(no_margin.uv[:, 0], xs[1:7])
    margin = project_to_image(pts, np.eye(4), np.eye(3), (10, 6), margin_px=1.5)  # u in [1, 8)
    np.testing.assert_array_equal(margin.index, [3, 4])
    ys = np.array([-0.5, 5.49, 5.5])
    pts_y = np.stack([np.zeros(3), ys, np.ones(3)], axis=1)
    np.testing.assert_array_equal(project_to_image(pts_y, np.eye(4), np.eye(3), (10, 6)).index, [0, 1])
    # min_depth_m is strict.
    assert len(project_to_image([[0.0, 0.0, 1.0]], np.eye(4), np.eye(3), (10, 6), min_depth_m=1.0)) == 0


# ----------------------------------------------------------------------------------------------------- keypoints
def test_keypoints_empty_and_bad_args():
    assert box_keypoints_xy(np.zeros((0, 7)), grid_size=3).shape == (0, 9, 2)
    assert box_keypoints_xy(np.zeros((0, 9))).shape == (0, 24 * 24, 2)
    box = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="grid_size"):
        box_keypoints_xy(box, grid_size=1)
    with pytest.raises(ValueError, match="enlarge_m"):
        box_keypoints_xy(box, enlarge_m=-0.1)
    with pytest.raises(ValueError, match="boxes"):
        box_keypoints_xy(np.zeros((1, 6)))


def test_keypoints_axis_aligned_order():
    box = np.array([[0.0, 0.0, 0.5, 4.0, 2.0, 1.0, 0.0]])  # l = 4 along x, w = 2 along y
    kp = box_keypoints_xy(box, enlarge_m=0.5, grid_size=3)[0]  # enlarged: 5 x 3
    expected = [
        [-2.5, -1.5], [-2.5, 0.0], [-2.5, 1.5],  # i = 0 (back), j = 0..2 (right to left)
        [0.0, -1.5], [0.0, 0.0], [0.0, 1.5],
        [2.5, -1.5], [2.5, 0.0], [2.5, 1.5],  # i = 2 (front)
    ]
    np.testing.assert_allclose(kp, expected, atol=1e-12)


def test_keypoints_default_grid_corners():
    g, e = 24, 1.6
    box = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.0, 0.0]])
    kp = box_keypoints_xy(box)
    assert kp.shape == (1, g * g, 2)
    hl, hw = 2.0 + e, 1.0 + e
    corners = kp[0, [0, g - 1, g * (g - 1), g * g - 1]]
    np.testing.assert_allclose(corners, [[-hl, -hw], [-hl, hw], [hl, -hw], [hl, hw]], atol=1e-12)
    np.testing.assert_allclose(kp[0, :, 0].min(), -hl)
    np.testing.assert_allclose(kp[0, :, 1].max(), hw)


def test_keypoints_rotate_with_box():
    local = box_keypoints_xy(np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.0, 0.0]]), enlarge_m=0.3, grid_size=4)[0]
    yaw, center = 0.8, np.array([10.0, -3.0])
    rotated = box_keypoints_xy(np.array([[10.0, -3.0, 7.0, 4.0, 2.0, 1.0, yaw]]), enlarge_m=0.3, grid_size=4)[0]
    np.testing.assert_allclose(rotated, local @ _rz(yaw)[:2, :2].T + center, atol=1e-12)
    # The front row (i = G - 1) points along the heading.
    front_mid = rotated[12:16].mean(axis=0) - center
    np.testing.assert_allclose(front_mid / np.linalg.norm(front_mid), [np.cos(yaw), np.sin(yaw)], atol=1e-12)


def test_first_box_of_points_equals_the_full_membership_test() -> None:
    rng = np.random.default_rng(3)
    pts = rng.uniform([-20, -20, -2], [20, 20, 2], size=(20000, 3)).astype(np.float32)
    boxes = np.column_stack([rng.uniform(-18, 18, (40, 2)), rng.uniform(-1, 1, 40), rng.uniform(0.5, 8, (40, 3)),
                             rng.uniform(-np.pi, np.pi, 40)])
    boxes[5, :7] = boxes[4, :7]  # an exact duplicate: its points belong to the first of the two
    boxes[7, :2] = boxes[6, :2] + 0.5  # overlapping boxes
    pts[:50, :2] = boxes[:50 // 5, :2].repeat(5, axis=0)  # points at box centres, some on top of each other
    inside = points_in_boxes(pts, boxes)
    want = np.where(inside.any(axis=1), inside.argmax(axis=1), -1)
    got = first_box_of_points(pts, boxes)
    np.testing.assert_array_equal(got, want)
    assert (got >= 0).sum() > 1000 and not (got == 5).any() and (got == 4).any()
    assert (first_box_of_points(pts, boxes[:0]) == -1).all() and first_box_of_points(pts[:0], boxes).shape == (0,)
