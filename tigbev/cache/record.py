"""One sample's record in the teacher cache: what extraction packs and a reader unpacks (layout:
:meth:`tigbev.cache.schema.Manifest.sections`). numpy only.

The rules that give a record its content live here and nowhere else: which map cells are stored
(:func:`foreground_cells`), how features are quantised and restored (:func:`quantise`, :func:`dequantise`), how the
keypoints follow from the stored boxes (:func:`box_keypoints`) and how a dense map is rebuilt from stored cells
(:func:`dense_map`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from tigbev.cache.schema import CacheFormatError, KeypointSpec, Manifest, record_size
from tigbev.geometry.bev import BevGrid
from tigbev.geometry.keypoints import box_keypoints_xy

__all__ = ["CachedMap", "CachedSample", "MapVariant", "SampleRecord", "box_keypoints", "dense_map",
           "dequantise", "foreground_cells", "pack_record", "quantise", "unpack_record"]


def box_keypoints(boxes: NDArray[np.float32], spec: KeypointSpec) -> NDArray[np.float32]:
    """(M, K, 2) float32 metric keypoints of stored boxes ((M, >= 7) float32, the record's ``boxes`` section).

    Extraction lays the keypoints it selects map cells with through this function, on the float32 boxes it stores,
    so a reader derives exactly the keypoints the extraction used.
    """
    b = np.asarray(boxes, np.float32)
    return box_keypoints_xy(b.reshape(-1, b.shape[-1]), enlarge_m=spec.enlarge_m,
                            grid_size=spec.grid_size).astype(np.float32)


def foreground_cells(keypoints_xy: NDArray, grid: BevGrid, margin_cells: int) -> NDArray[np.int32]:
    """The stored-cell rule: flat indices (iy * W + ix) of every cell bilinear sampling at the keypoints reads
    (``align_corners=False``), dilated by ``margin_cells`` (4-neighbour)."""
    h, w = grid.shape_hw
    mask = np.zeros((h, w), dtype=bool)
    xy = np.asarray(keypoints_xy).reshape(-1, 2)
    if len(xy):
        # Cell centres sit at (i + 0.5) cells; bilinear sampling reads floor and floor + 1 of c - 0.5.
        cx = (xy[:, 0] - grid.x_min_m) / grid.cell_m - 0.5
        cy = (xy[:, 1] - grid.y_min_m) / grid.cell_m - 0.5
        x0, y0 = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
        for dx in (0, 1):
            for dy in (0, 1):
                ix, iy = x0 + dx, y0 + dy
                ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
                mask[iy[ok], ix[ok]] = True
    for _ in range(margin_cells):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return np.flatnonzero(mask.reshape(-1)).astype(np.int32)


def quantise(features: NDArray, dtype: str, channel_axis: int) -> tuple[NDArray, NDArray[np.float32]]:
    """Features (any float) -> (stored array of ``dtype``, per-channel scale (C,) float32).

    The scale is each channel's peak magnitude (1 for an all-zero channel); float16 stores ``value / scale`` (in
    [-1, 1], so a near-zero channel keeps float16's relative precision instead of flushing to zero), int8 stores
    ``round(127 * value / scale)``.
    """
    x = np.asarray(features, np.float32)
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    peak = np.abs(x).max(axis=axes) if x.size else np.zeros(x.shape[channel_axis], np.float32)
    scale = np.where(peak > 0, peak, 1.0).astype(np.float32)
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    unit = x / scale.reshape(shape)
    if dtype == "float16":
        return unit.astype(np.float16), scale
    if dtype == "int8":
        return np.clip(np.rint(unit * 127.0), -127, 127).astype(np.int8), scale
    raise CacheFormatError(f"no quantisation for dtype {dtype!r}")


def dequantise(stored: NDArray, scale: NDArray[np.float32], channel_axis: int,
               out_dtype: type = np.float32) -> NDArray:
    """The inverse of :func:`quantise` (up to its rounding), as ``out_dtype``."""
    shape = [1] * stored.ndim
    shape[channel_axis] = -1
    s = scale.reshape(shape) / (127.0 if stored.dtype == np.int8 else 1.0)
    return (stored.astype(np.float32) * s).astype(out_dtype, copy=False)


def dense_map(cells: NDArray | None, features: NDArray, grid: BevGrid) -> NDArray[np.float32]:
    """(C, H, W) float32 map from stored cells (F,) and their features (F, C), zeros where nothing is stored;
    ``cells=None`` (dense mode): ``features`` already is the (C, H, W) map."""
    if cells is None:
        return np.asarray(features, np.float32)
    h, w = grid.shape_hw
    out = np.zeros((features.shape[1], h * w), dtype=np.float32)
    out[:, cells] = np.asarray(features, np.float32).T
    return out.reshape(-1, h, w)


@dataclass(frozen=True)
class MapVariant:
    """One stored teacher map of a sample, as extraction hands it to the writer."""

    aug_from_lidar: NDArray[np.float32]  # (4, 4) the map's frame (identity: canonical)
    cells: NDArray[np.int32] | None  # (F,) foreground mode; None in dense mode
    features: NDArray  # (F, C) or (C, H, W), stored dtype
    scale: NDArray[np.float32]  # (C,)


@dataclass(frozen=True)
class SampleRecord:
    """What extraction writes for one sample (all in the un-augmented key lidar frame)."""

    sample_idx: int
    token: str
    scene: str
    timestamp_us: int
    boxes: NDArray[np.float32]  # (M, 10): box layout + label
    depth: NDArray[np.float32]  # (P, 5): u, v, depth, box index, camera index; sorted by camera
    depth_per_camera: list[int]
    variants: tuple[MapVariant, ...]

    @property
    def num_cells(self) -> list[int]:
        return [len(v.cells) if v.cells is not None else int(np.prod(v.features.shape[1:])) for v in self.variants]


def pack_record(manifest: Manifest, r: SampleRecord) -> bytes:
    """The record's bytes: every section at its offset, zero padding between them."""
    sections = manifest.sections(len(r.boxes), len(r.depth), r.num_cells)
    out = bytearray(record_size(sections))
    values = {("boxes", 0): r.boxes, ("depth", 0): r.depth}
    for v, var in enumerate(r.variants):
        values |= {("aug_from_lidar", v): var.aug_from_lidar, ("scale", v): var.scale, ("cells", v): var.cells,
                   ("features", v): var.features}
    for s in sections:
        data = np.ascontiguousarray(np.asarray(values[(s.spec.name, s.variant)]).astype(s.spec.dtype, copy=False))
        if data.size != s.count:
            raise CacheFormatError(f"sample {r.sample_idx} ({r.token}): section {s.label} holds shape {data.shape}, "
                                   f"the layout says {s.shape}")
        out[s.offset:s.offset + s.nbytes] = data.tobytes()
    return bytes(out)


@dataclass(frozen=True)
class CachedMap:
    """One stored teacher map of a sample, as read back (stored dtype; :meth:`features` restores the values)."""

    aug_from_lidar: NDArray[np.float32]  # (4, 4)
    cells: NDArray[np.int32] | None  # (F,); None in dense mode
    stored: NDArray  # (F, C) or (C, H, W) float16 | int8
    scale: NDArray[np.float32]  # (C,)

    def features(self, dtype: type = np.float32) -> NDArray:
        """The map's features, (F, C) or (C, H, W), restored from their stored form."""
        return dequantise(self.stored, self.scale, 1 if self.cells is not None else 0, dtype)


@dataclass(frozen=True)
class CachedSample:
    """One sample as read back: boxes and depth rows, the keypoint spec to derive the keypoints, and the stored
    teacher map variants (``maps[0]``: the canonical map)."""

    sample_idx: int
    token: str
    boxes: NDArray[np.float32]  # (M, 9)
    labels: NDArray[np.int64]  # (M,)
    depth: NDArray[np.float32]  # (P, 5)
    depth_per_camera: list[int]
    keypoint_spec: KeypointSpec
    maps: tuple[CachedMap, ...]

    @cached_property
    def keypoints(self) -> NDArray[np.float32]:
        """(M, K, 2) metric keypoints of the boxes, as extraction laid them (un-augmented frame)."""
        return box_keypoints(self.boxes, self.keypoint_spec)

    @property
    def map_cells(self) -> NDArray[np.int64] | None:
        """Stored cells of the canonical map (flat ``iy * W + ix``), None in dense mode."""
        cells = self.maps[0].cells
        return None if cells is None else cells.astype(np.int64)

    @cached_property
    def map_features(self) -> NDArray[np.float32]:
        """The canonical map's features, float32: (F, C) foreground or (C, H, W) dense."""
        return self.maps[0].features(np.float32)


def unpack_record(manifest: Manifest, buf: NDArray[np.uint8] | bytes, *, sample_idx: int, token: str, num_boxes: int,
                  num_depth: int, depth_per_camera: Sequence[int], num_cells: Sequence[int]) -> CachedSample:
    """A record's bytes -> :class:`CachedSample` (views into ``buf``, no copies, except the boxes' split)."""
    sections = manifest.sections(num_boxes, num_depth, num_cells)
    want = record_size(sections)
    if len(buf) != want:
        raise CacheFormatError(f"record of {len(buf)} bytes, the layout says {want}")
    arrays: dict[tuple[str, int], NDArray] = {}
    for s in sections:
        arrays[(s.spec.name, s.variant)] = np.frombuffer(buf, dtype=s.spec.dtype, count=s.count,
                                                         offset=s.offset).reshape(s.shape)
    boxes = arrays[("boxes", 0)]
    maps = tuple(CachedMap(aug_from_lidar=arrays[("aug_from_lidar", v)][0], cells=arrays.get(("cells", v)),
                           stored=arrays[("features", v)] if manifest.features.mode == "foreground"
                           else arrays[("features", v)][0],
                           scale=arrays[("scale", v)][0]) for v in range(manifest.variants.count))
    return CachedSample(sample_idx=sample_idx, token=token, boxes=boxes[:, :9].copy(),
                        labels=boxes[:, 9].astype(np.int64), depth=arrays[("depth", 0)],
                        depth_per_camera=list(depth_per_camera), keypoint_spec=manifest.keypoints, maps=maps)
