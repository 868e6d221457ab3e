"""BEV data augmentation (BDA): a random policy that returns a deterministic transform, replayable on anything.

A :class:`BevTransform` is one 4x4 matrix ``aug_from_lidar`` made of a rotation about z, a uniform scale and
optional flips of x and y. It maps points, boxes (centres, sizes, yaw, velocity), keypoints and BEV maps from the
un-augmented lidar frame into the augmented one, so that LiDAR, labels and cached teacher targets always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tigbev.geometry import BOX_DIM_VEL, wrap_angle

__all__ = ["FLIP_VARIANTS", "BevAugmentPolicy", "BevTransform", "choose_variant", "similarity_apply_boxes",
           "similarity_apply_points", "similarity_apply_xy", "variant_transforms"]


@dataclass(frozen=True)
class BevTransform:
    """``aug_from_lidar``: p_aug = S * F * R(yaw) * p (flips F = diag(fx, fy, 1), uniform scale S)."""

    rotation_rad: float = 0.0
    scale: float = 1.0
    flip_x: bool = False  # x -> -x
    flip_y: bool = False  # y -> -y

    @property
    def matrix(self) -> NDArray[np.float64]:
        c, s = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        flip = np.diag([-1.0 if self.flip_x else 1.0, -1.0 if self.flip_y else 1.0, 1.0])
        m = np.eye(4)
        m[:3, :3] = self.scale * flip @ rot
        return m

    @property
    def is_identity(self) -> bool:
        return self.rotation_rad == 0.0 and self.scale == 1.0 and not self.flip_x and not self.flip_y

    def apply_points(self, points: ArrayLike) -> NDArray:
        """Points (N, >=3): xyz transformed, other columns unchanged; dtype kept."""
        return similarity_apply_points(self.matrix, points)

    def apply_xy(self, xy: ArrayLike) -> NDArray[np.float64]:
        """Metric BEV points (..., 2), e.g. keypoints."""
        return similarity_apply_xy(self.matrix, xy)

    def apply_boxes(self, boxes: ArrayLike) -> NDArray[np.float64]:
        """Boxes (N, 7 or 9) into the augmented frame."""
        return similarity_apply_boxes(self.matrix, boxes)

    def inverse_matrix(self) -> NDArray[np.float64]:
        """``lidar_from_aug``; pass it to ``similarity_apply_*`` to undo the transform."""
        return np.linalg.inv(self.matrix)

    @classmethod
    def from_matrix(cls, matrix: ArrayLike, *, atol: float = 1e-5) -> BevTransform:
        """The transform of a stored ``aug_from_lidar`` (4x4): scale from the determinant, a flip of x where the
        determinant is negative, the rotation from what is left. A flip of both axes reads back as a rotation by
        pi (the same matrix). A matrix that is not such a similarity about z is refused."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"aug_from_lidar must be 4x4, got shape {m.shape}")
        a = m[:2, :2]
        det = float(np.linalg.det(a))
        scale = math.sqrt(abs(det))
        flip_x = det < 0
        rot = np.diag([-1.0 if flip_x else 1.0, 1.0]) @ a / max(scale, 1e-12)
        out = cls(rotation_rad=math.atan2(rot[1, 0], rot[0, 0]), scale=scale, flip_x=flip_x)
        if not np.allclose(out.matrix, m, atol=atol * max(1.0, scale)):
            raise ValueError(f"aug_from_lidar is not a rotation about z with a uniform scale and flips: {m.tolist()}")
        return out


def similarity_apply_points(matrix: ArrayLike, points: ArrayLike) -> NDArray:
    """Points (N, >=3) through the 3x3 part of a similarity ``matrix``; other columns and the dtype are kept."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points)
    out = p.copy()
    out[:, :3] = (p[:, :3].astype(np.float64) @ m[:3, :3].T).astype(p.dtype)
    return out


def similarity_apply_xy(matrix: ArrayLike, xy: ArrayLike) -> NDArray[np.float64]:
    """Metric BEV points (..., 2), e.g. keypoints, through the 2x2 part of a similarity ``matrix``: float64."""
    return np.asarray(xy, dtype=np.float64) @ np.asarray(matrix, dtype=np.float64)[:2, :2].T


def similarity_apply_boxes(matrix: ArrayLike, boxes: ArrayLike) -> NDArray[np.float64]:
    """Boxes (N, 7 or 9) through a similarity about z (rotation, uniform scale, flips): centres and velocities
    through the matrix, sizes times the scale, yaw along the transformed heading (a flip mirrors it)."""
    m = np.asarray(matrix, dtype=np.float64)[:3, :3]
    b = np.asarray(boxes, dtype=np.float64)
    scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    out = b.copy()
    out[:, :3] = b[:, :3] @ m.T
    out[:, 3:6] = b[:, 3:6] * scale
    heading = np.stack([np.cos(b[:, 6]), np.sin(b[:, 6])], axis=1) @ m[:2, :2].T
    out[:, 6] = wrap_angle(np.arctan2(heading[:, 1], heading[:, 0]))
    if b.shape[1] >= BOX_DIM_VEL:
        out[:, 7:9] = b[:, 7:9] @ m[:2, :2].T
    return out


@dataclass(frozen=True, kw_only=True)
class BevAugmentPolicy:
    """Random BDA: rotation uniform in +-rotation_deg, scale uniform in scale_range, each flip with p_flip."""

    rotation_deg: float = 22.5
    scale_range: tuple[float, float] = (0.95, 1.05)
    p_flip: float = 0.5

    def sample(self, rng: np.random.Generator) -> BevTransform:
        return BevTransform(
            rotation_rad=math.radians(float(rng.uniform(-self.rotation_deg, self.rotation_deg))),
            scale=float(rng.uniform(*self.scale_range)),
            flip_x=bool(rng.random() < self.p_flip),
            flip_y=bool(rng.random() < self.p_flip),
        )


FLIP_VARIANTS: tuple[BevTransform, ...] = (BevTransform(), BevTransform(flip_x=True), BevTransform(flip_y=True),
                                           BevTransform(flip_x=True, flip_y=True))
"""The stored maps of a ``flips`` cache, in order: variant ``flip_x + 2 * flip_y``."""


def variant_transforms(kind: str, count: int, *, policy: BevAugmentPolicy, seed: int,
                       sample_idx: int) -> list[BevTransform]:
    """The frames of the teacher maps a cache stores for one sample (the cache's ``variants``):

    - ``canonical``: the un-augmented points only (BDA is replayed on the map by warping and keypoint mapping);
    - ``flips``: the four x / y flips (:data:`FLIP_VARIANTS`): any flip is exact, rotation and scale are replayed;
    - ``draws``: the canonical map, then ``count - 1`` BDA draws of ``policy``, drawn from ``(seed, sample_idx)``
      so a resumed or parallel extraction stores the same draws (training picks one per sample and step: exact).
    """
    if kind == "canonical":
        return [BevTransform()]
    if kind == "flips":
        return list(FLIP_VARIANTS)
    if kind == "draws":
        rng = np.random.default_rng(np.random.SeedSequence([seed, sample_idx]))
        return [BevTransform()] + [policy.sample(rng) for _ in range(count - 1)]
    raise ValueError(f"unknown cache variant kind {kind!r}; choose 'canonical', 'flips' or 'draws'")


def choose_variant(kind: str, matrices: list[NDArray], bda: BevTransform | None, rng: np.random.Generator
                   ) -> tuple[int, BevTransform]:
    """Which stored map a training sample uses, and the sample's BDA with it.

    ``matrices``: each stored map's ``aug_from_lidar``; ``bda``: the transform the loader drew (None: no BEV
    augmentation, the identity). ``canonical``: map 0, the drawn BDA. ``flips``: the map of the drawn flips, the drawn BDA.
    ``draws``: without augmentation the canonical map 0; with it one stored draw (uniform, from ``rng``) and its
    transform replaces the drawn one, so the teacher's view is exactly the student's.
    """
    if bda is None:
        return 0, BevTransform()
    if kind == "canonical":
        return 0, bda
    if kind == "flips":
        k = int(bda.flip_x) + 2 * int(bda.flip_y)
        if not np.allclose(np.asarray(matrices[k], np.float64), FLIP_VARIANTS[k].matrix, atol=1e-6):
            raise ValueError(f"stored map {k} of a flips cache is not {FLIP_VARIANTS[k]}")
        return k, bda
    if kind == "draws":
        k = 1 + int(rng.integers(len(matrices) - 1))
        return k, BevTransform.from_matrix(matrices[k])
    raise ValueError(f"unknown cache variant kind {kind!r}")
