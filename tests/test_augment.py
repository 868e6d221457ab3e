"""BEV augmentation: matrices, inverses, and agreement between points and boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tigbev.data.augment import BevAugmentPolicy, BevTransform, similarity_apply_boxes, similarity_apply_points
from tigbev.geometry import points_in_boxes


def test_identity_changes_nothing() -> None:
    t = BevTransform()
    assert t.is_identity
    boxes = np.array([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.3, 1.0, -2.0]])
    np.testing.assert_allclose(t.apply_boxes(boxes), boxes)


def test_hand_cases() -> None:
    box = np.array([[10.0, 0.0, 1.0, 4.0, 2.0, 1.5, 0.0, 3.0, 0.0]])
    rot = BevTransform(rotation_rad=math.pi / 2).apply_boxes(box)[0]
    np.testing.assert_allclose(rot[[0, 1, 6, 7, 8]], [0.0, 10.0, math.pi / 2, 0.0, 3.0], atol=1e-12)
    # Flipping x mirrors a box heading +x (yaw 0) to heading -x (yaw pi); velocity flips with it.
    fx = BevTransform(flip_x=True).apply_boxes(box)[0]
    np.testing.assert_allclose(fx[[0, 6, 7]], [-10.0, math.pi, -3.0], atol=1e-12)
    # Flipping y mirrors yaw to -yaw.
    fy = BevTransform(flip_y=True).apply_boxes(np.array([[0, 5.0, 0, 1, 1, 1, 0.4]]))[0]
    np.testing.assert_allclose(fy[[1, 6]], [-5.0, -0.4], atol=1e-12)
    sc = BevTransform(scale=1.1).apply_boxes(box)[0]
    np.testing.assert_allclose(sc[:6], [11.0, 0.0, 1.1, 4.4, 2.2, 1.65])


def test_inverse_restores_points_and_boxes() -> None:
    rng = np.random.default_rng(0)
    policy = BevAugmentPolicy()
    pts = rng.normal(size=(50, 5)).astype(np.float32) * 10
    boxes = np.concatenate([rng.normal(size=(7, 3)) * 10, rng.uniform(0.5, 5, (7, 3)),
                            rng.uniform(-math.pi, math.pi, (7, 1)), rng.normal(size=(7, 2))], axis=1)
    for _ in range(20):
        t = policy.sample(rng)
        back = similarity_apply_points(t.inverse_matrix(), t.apply_points(pts))
        np.testing.assert_allclose(back, pts, atol=1e-4)
        back_boxes = similarity_apply_boxes(t.inverse_matrix(), t.apply_boxes(boxes))
        d = back_boxes - boxes
        d[:, 6] = np.angle(np.exp(1j * d[:, 6]))
        np.testing.assert_allclose(d, 0.0, atol=1e-9)
        assert pts.dtype == t.apply_points(pts).dtype


@pytest.mark.parametrize("seed", range(5))
def test_points_stay_in_their_boxes(seed: int) -> None:
    """The one property that matters: labels move exactly with the points they describe."""
    rng = np.random.default_rng(seed)
    boxes = np.concatenate([rng.uniform(-20, 20, (6, 2)), rng.uniform(-1, 1, (6, 1)), rng.uniform(1, 6, (6, 3)),
                            rng.uniform(-math.pi, math.pi, (6, 1))], axis=1)
    pts = rng.uniform(-25, 25, (4000, 3))
    pts[:, 2] = rng.uniform(-3, 3, 4000)
    before = points_in_boxes(pts, boxes)
    t = BevAugmentPolicy(p_flip=0.5).sample(rng)
    after = points_in_boxes(t.apply_points(pts), t.apply_boxes(boxes))
    assert before.sum() > 20
    np.testing.assert_array_equal(before, after)


def test_policy_is_deterministic_per_rng() -> None:
    a = BevAugmentPolicy().sample(np.random.default_rng([1, 2, 3]))
    b = BevAugmentPolicy().sample(np.random.default_rng([1, 2, 3]))
    assert a == b
    assert abs(math.degrees(a.rotation_rad)) <= 22.5 and 0.95 <= a.scale <= 1.05
