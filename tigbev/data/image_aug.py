"""Camera image augmentation (BEVDet / BEVDepth style): a random policy returns a deterministic transform.

An :class:`ImageTransform` is one 2D similarity ``aug_from_orig`` (3x3, homogeneous pixels) made of, in order:
resize by ``scale``, crop the ``out_wh`` window whose top-left pixel centre is at ``crop_xy`` of the resized image,
optional horizontal flip, rotation about the output image centre. It is replayed on the image (resampling) and on
pixel coordinates (cached LiDAR depth points, projected boxes), so that both always agree.

Pixel convention (docs/COORDINATES.md): pixel centres at integer (u, v); a W x H image covers
``u in [-0.5, W - 0.5)``, ``v in [-0.5, H - 0.5)``. A resize by ``s`` therefore maps ``u -> s (u + 0.5) - 0.5``
(it scales pixel *edges* about the image corner), not ``u -> s u``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ImageAugPolicy", "ImageTransform"]


def _translation(tx: float, ty: float) -> NDArray[np.float64]:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _resize(scale: float) -> NDArray[np.float64]:
    """Resize in the pixel-centre convention: edges scale about the corner (-0.5, -0.5)."""
    return _translation(-0.5, -0.5) @ np.diag([scale, scale, 1.0]) @ _translation(0.5, 0.5)


@dataclass(frozen=True, kw_only=True)
class ImageTransform:
    """Resize, crop, flip, rotate: ``[u', v', 1]^T = matrix @ [u, v, 1]^T`` maps original to augmented pixels.

    ``crop_xy`` is the (x0, y0) position, in resized-image pixels, of the output's top-left pixel centre; it may be
    negative or run past the resized image, where the output is padded with zeros. ``rotation_deg`` > 0 turns the
    picture counter-clockwise as seen on screen (PIL's ``Image.rotate`` direction), about the output's centre.
    """

    scale: float = 1.0
    crop_xy: tuple[int, int] = (0, 0)
    out_wh: tuple[int, int]
    rotation_deg: float = 0.0
    flip: bool = False

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"ImageTransform.scale must be > 0, got {self.scale}")
        if len(self.out_wh) != 2 or min(self.out_wh) < 1:
            raise ValueError(f"ImageTransform.out_wh must be (W, H) >= 1, got {self.out_wh}")

    @property
    def matrix(self) -> NDArray[np.float64]:
        """``aug_from_orig`` (3, 3): original-image pixel -> augmented-image pixel."""
        w, h = self.out_wh
        m = _translation(-self.crop_xy[0], -self.crop_xy[1]) @ _resize(self.scale)
        if self.flip:
            m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m  # u -> (W - 1) - u
        if self.rotation_deg:
            a = math.radians(self.rotation_deg)
            c, s = math.cos(a), math.sin(a)
            rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # v points down: this is counter-clockwise
            centre = ((w - 1) / 2.0, (h - 1) / 2.0)
            m = _translation(*centre) @ rot @ _translation(-centre[0], -centre[1]) @ m
        return m

    @property
    def inverse_matrix(self) -> NDArray[np.float64]:
        """``orig_from_aug`` (3, 3)."""
        return np.linalg.inv(self.matrix)

    def apply_points(self, uv: ArrayLike) -> NDArray[np.float64]:
        """Original-image pixels (..., 2) -> augmented-image pixels (..., 2). Use :meth:`inside` to keep the visible."""
        return _apply(self.matrix, uv)

    def inverse_points(self, uv_aug: ArrayLike) -> NDArray[np.float64]:
        """Augmented-image pixels (..., 2) -> original-image pixels (..., 2)."""
        return _apply(self.inverse_matrix, uv_aug)

    def inside(self, uv_aug: ArrayLike) -> NDArray[np.bool_]:
        """Mask (...,) of augmented pixels that fall in the output image ``[-0.5, W - 0.5) x [-0.5, H - 0.5)``."""
        p = np.asarray(uv_aug, dtype=np.float64)
        w, h = self.out_wh
        with np.errstate(invalid="ignore"):
            return (p[..., 0] >= -0.5) & (p[..., 0] < w - 0.5) & (p[..., 1] >= -0.5) & (p[..., 1] < h - 0.5)

    def apply_image(self, image: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """(H, W, 3) uint8 -> (H_out, W_out, 3) uint8 by bilinear resampling; pixels from outside the input are 0.

        Downscaling by 2x or more first box-averages k x k pixel blocks (``Image.reduce``, k = floor(1 / scale)),
        which maps pixel edges exactly (``e -> e / k``) and keeps bilinear resampling from aliasing.
        """
        from PIL import Image

        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
        pil = Image.fromarray(img)
        m = self.matrix
        k = max(1, math.floor(1.0 / self.scale + 1e-9))
        if k > 1:
            pil = pil.reduce(k)
            m = m @ np.linalg.inv(_resize(1.0 / k))  # aug_from_reduced = aug_from_orig @ orig_from_reduced
        # PIL's affine works on pixel-edge coordinates (centre of pixel i at i + 0.5) and wants input_from_output.
        src_from_out = _translation(0.5, 0.5) @ np.linalg.inv(m) @ _translation(-0.5, -0.5)
        # PIL truncates interpolated values instead of rounding them: snap 1e-16 noise (cos 90 deg) so that flips,
        # crops and quarter turns copy pixels exactly. (Otherwise the truncation costs 0.5 grey level on average.)
        src_from_out = np.round(src_from_out, 9)
        out = pil.transform(tuple(self.out_wh), Image.Transform.AFFINE, data=tuple(src_from_out[:2].reshape(-1)),
                            resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
        return np.array(out, dtype=np.uint8)


def _apply(matrix: NDArray[np.float64], uv: ArrayLike) -> NDArray[np.float64]:
    p = np.asarray(uv, dtype=np.float64)
    if p.shape[-1] != 2:
        raise ValueError(f"pixel coordinates must have shape (..., 2), got {p.shape}")
    return p @ matrix[:2, :2].T + matrix[:2, 2]


@dataclass(frozen=True, kw_only=True)
class ImageAugPolicy:
    """Random image augmentation of METHOD.md section 3, for an input of ``input_hw`` = (H, W) pixels.

    The base scale is the smallest that makes the resized image cover the input (nuScenes 1600 x 900 -> 704 x 256:
    704 / 1600 = 0.44, BEVDet's "fit the width"). Training draws, in BEVDet's order:

    - scale = base + uniform(``resize_jitter``) (additive, as BEVDet's ``resize_lim``);
    - the crop keeps the bottom of the resized image (the road and the objects; the sky is cut from the top), and
      its left edge is uniform over the positions that stay within the resized image (or, for a resized image
      narrower than the input, that keep the image inside the input);
    - a horizontal flip with probability ``p_flip``;
    - a rotation uniform in +-``rotation_deg`` about the output centre.

    :meth:`eval_transform` (and :meth:`sample` of :meth:`evaluation`) is the deterministic counterpart: base scale,
    bottom crop, centred horizontally, no flip, no rotation.
    """

    input_hw: tuple[int, int]
    resize_jitter: tuple[float, float] = (-0.06, 0.11)
    rotation_deg: float = 5.4
    p_flip: float = 0.5
    random_crop: bool = True

    def __post_init__(self) -> None:
        if len(self.input_hw) != 2 or min(self.input_hw) < 1:
            raise ValueError(f"ImageAugPolicy.input_hw must be (H, W) >= 1, got {self.input_hw}")
        lo, hi = self.resize_jitter
        if not lo <= hi:
            raise ValueError(f"ImageAugPolicy.resize_jitter must be (low, high) with low <= high, got {(lo, hi)}")
        if not 0.0 <= self.p_flip <= 1.0:
            raise ValueError(f"ImageAugPolicy.p_flip must be in [0, 1], got {self.p_flip}")
        if self.rotation_deg < 0:
            raise ValueError(f"ImageAugPolicy.rotation_deg must be >= 0, got {self.rotation_deg}")

    @classmethod
    def evaluation(cls, input_hw: tuple[int, int]) -> "ImageAugPolicy":
        """The policy without randomness: every sample is :meth:`eval_transform`."""
        return cls(input_hw=tuple(input_hw), resize_jitter=(0.0, 0.0), rotation_deg=0.0, p_flip=0.0,
                   random_crop=False)

    def base_scale(self, image_wh: tuple[int, int]) -> float:
        out_h, out_w = self.input_hw
        return max(out_w / image_wh[0], out_h / image_wh[1])

    def eval_transform(self, image_wh: tuple[int, int]) -> ImageTransform:
        return self._transform(image_wh, self.base_scale(image_wh), None, False, 0.0)

    def sample(self, rng: np.random.Generator, image_wh: tuple[int, int]) -> ImageTransform:
        """One transform for an original image of ``image_wh`` = (W, H) pixels."""
        scale = self.base_scale(image_wh) + float(rng.uniform(*self.resize_jitter))
        if scale <= 0:
            raise ValueError(f"resize_jitter {self.resize_jitter} makes the scale {scale} <= 0 for {image_wh}")
        crop_u = float(rng.uniform()) if self.random_crop else None
        flip = bool(rng.random() < self.p_flip)
        rotation = float(rng.uniform(-self.rotation_deg, self.rotation_deg))
        return self._transform(image_wh, scale, crop_u, flip, rotation)

    def _transform(self, image_wh: tuple[int, int], scale: float, crop_u: float | None, flip: bool,
                   rotation_deg: float) -> ImageTransform:
        out_h, out_w = self.input_hw
        # Resized size in whole pixels (BEVDet's int()), robust to 256 / 900 * 900 = 255.99999...
        new_w, new_h = (math.floor(n * scale + 1e-6) for n in image_wh)
        y0 = new_h - out_h  # bottom rows kept; negative: zero padding above the image
        lo, hi = min(0, new_w - out_w), max(0, new_w - out_w)  # left edges that keep the crop within bounds
        x0 = (lo + hi) // 2 if crop_u is None else lo + min(int(crop_u * (hi - lo + 1)), hi - lo)
        return ImageTransform(scale=scale, crop_xy=(x0, y0), out_wh=(out_w, out_h), rotation_deg=rotation_deg,
                              flip=flip)
