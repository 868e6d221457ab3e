"""The on-disk contract of the teacher cache: the one place that defines it. No torch import.

A cache is a zarr v3 group (a local path or an fsspec URL)::

    CACHE/zarr.json                       group; attributes["tigbev_cache"] = the manifest (below)
    CACHE/done                            (N,) uint8   per-sample done flags, one chunk per sample shard
    CACHE/bev                             (N, C, H, W) teacher BEV map, dense mode only; one zarr shard per
                                          sample shard, one chunk per sample
    CACHE/shards/<k:06d>/boxes            (M_k, 10) float32   x, y, z, l, w, h, yaw, vx, vy, label
    CACHE/shards/<k:06d>/keypoints        (M_k, K, 2) float32 metric (x, y) of each box's keypoints
    CACHE/shards/<k:06d>/depth            (P_k, 5) float32    u, v (original image pixels), depth (m),
                                          GT box index within the sample (-1: none), camera index
    CACHE/shards/<k:06d>/fg_cells         (F_k,) int32        flat index iy * W + ix of stored map cells
    CACHE/shards/<k:06d>/fg_features      (F_k, C) float16 | int8  teacher features of those cells
    CACHE/shards/<k:06d>/fg_scale         (S_k, C) float32    int8 only: per-sample, per-channel scale
    CACHE/index/<k:06d>.parquet           one row per sample of shard k (INDEX_COLUMNS)
    CACHE/index.parquet                   all rows, written when the cache is complete
    CACHE/writers/<writer id>.json        the lease of each running extraction (pid, host, shards, heartbeat)
    CACHE/configs/part-<i>-of-<n>.json    the resolved configuration of each extraction part (CONFIG_DIR)

(The Parquet files sit outside the zarr hierarchy; readers open zarr members by name and never list them.)

Everything is in the **un-augmented key lidar frame** of each sample; BEV maps are (C, H, W) with rows = y and
columns = x on ``manifest.grid`` (docs/COORDINATES.md). Samples are grouped in shards of ``shard_samples``
consecutive samples; a shard's data is written by exactly one writer, in one go, and its done flags are set only
after all its data is written, so a killed extraction resumes shard by shard and parallel writers never share a
chunk. A writer holds a lease on the shards it writes (``writers/``); a second writer of the same shards is refused
while the lease is live (its process alive, its heartbeat fresh). Every chunk carries a crc32c checksum, and every
chunk is stored, even one of fill values; arrays are filled with a value no real sample holds
(:func:`missing_value`: NaN, -1 for cell indices, -128 for int8 features), so a lost chunk can never read back as
plausible zeros.

Foreground mode stores, instead of the dense map, every cell that bilinear sampling at any keypoint touches (plus
the cells under each enlarged box), so keypoint features read back from the cache equal those sampled from the
dense map. int8 quantises each channel symmetrically with a per-sample scale (max |value| / 127).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Literal

from tigbev.geometry.bev import BevGrid

__all__ = [
    "BOX_COLUMNS",
    "ArraySpec",
    "BoxSpec",
    "DepthSpec",
    "KeypointSpec",
    "CACHE_ATTR",
    "DEPTH_COLUMNS",
    "FORMAT_VERSION",
    "INDEX_COLUMNS",
    "CacheFormatError",
    "DatasetFingerprint",
    "FeatureStorage",
    "CONFIG_DIR",
    "LEASE_DIR",
    "Manifest",
    "TeacherFingerprint",
    "missing_value",
    "shard_arrays",
    "shard_index_path",
    "shard_path",
    "tokens_sha256",
]

FORMAT_VERSION: Final[int] = 2
"""2: NaN / -1 / -128 fill values with every chunk stored, writer leases, content-based dataset fingerprint."""
CACHE_ATTR: Final[str] = "tigbev_cache"
BOX_COLUMNS: Final[tuple[str, ...]] = ("x_m", "y_m", "z_m", "l_m", "w_m", "h_m", "yaw_rad", "vx_mps", "vy_mps",
                                        "label")
DEPTH_COLUMNS: Final[tuple[str, ...]] = ("u_px", "v_px", "depth_m", "box_index", "camera_index")
# Columns of index.parquet and their Arrow types (as strings: this module imports no pyarrow either).
INDEX_COLUMNS: Final[dict[str, str]] = {
    "sample_idx": "int64",
    "token": "string",
    "scene": "string",
    "timestamp_us": "int64",
    "shard": "int64",
    "num_boxes": "int64",
    "box_offset": "int64",
    "num_depth": "int64",
    "depth_offset": "int64",
    "depth_per_camera": "list<int64>",
    "num_fg_cells": "int64",
    "fg_offset": "int64",
    "fg_scale_row": "int64",
}
RAGGED_ARRAYS: Final[tuple[str, ...]] = ("boxes", "keypoints", "depth", "fg_cells", "fg_features", "fg_scale")
LEASE_DIR: Final[str] = "writers"
CONFIG_DIR: Final[str] = "configs"
"""``CACHE/configs/part-<i>-of-<n>.json``: the resolved configuration of each extraction part (its command's options
with every default filled in, and the teacher's architecture), written when the part starts; never read back."""

FeatureMode = Literal["dense", "foreground"]
FeatureDtype = Literal["float16", "int8"]


class CacheFormatError(ValueError):
    """A cache that this version cannot read, or that does not match what the reader expects."""


def shard_path(shard: int) -> str:
    return f"shards/{shard:06d}"


def shard_index_path(shard: int) -> str:
    return f"index/{shard:06d}.parquet"


def tokens_sha256(tokens: Sequence[str]) -> str:
    """sha256 of the ordered sample tokens (one per line)."""
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def shard_arrays(features: FeatureStorage) -> tuple[str, ...]:
    """The ragged arrays every finished shard holds, for this feature storage."""
    names = ["boxes", "keypoints", "depth"]
    if features.mode == "foreground":
        names += ["fg_cells", "fg_features"] + (["fg_scale"] if features.dtype == "int8" else [])
    return tuple(names)


def missing_value(dtype: str) -> float | int:
    """The fill value of an array of ``dtype``: one that no written sample holds, so a read that returns it has hit
    a chunk that is not there. Floats: NaN; int32 (cell indices, >= 0): -1; int8 (quantised to [-127, 127]): -128;
    uint8 (done flags): 0, i.e. "not done"."""
    match dtype:
        case "float16" | "float32":
            return float("nan")
        case "int32":
            return -1
        case "int8":
            return -128
        case "uint8":
            return 0
    raise CacheFormatError(f"no fill value defined for dtype {dtype!r}")


def _check_keys(cls: type, d: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    missing = known - set(d)
    unknown = set(d) - known
    if missing or unknown:
        raise CacheFormatError(f"manifest {where}: missing {sorted(missing)}, unknown {sorted(unknown)}")


@dataclass(frozen=True, kw_only=True)
class TeacherFingerprint:
    """Which teacher produced the cache: its checkpoint's sha256 and its resolved config."""

    checkpoint_sha256: str
    config: dict[str, Any]

    @classmethod
    def parse(cls, d: dict[str, Any]) -> TeacherFingerprint:
        _check_keys(cls, d, "teacher")
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class DatasetFingerprint:
    """What the cache was computed from: version, split, the ordered sample tokens, the content of the table records
    that shape each sample's cached data, and the image sizes.

    ``records_sha256`` maps a table name (sample, sample_data, calibrated_sensor, ego_pose, sample_annotation) to the
    sha256 of the records the samples use, in sample order (tigbev.data.nuscenes_reader.NuScenesReader.fingerprint);
    ``image_sizes`` maps each camera channel to its distinct image sizes ("WxH"). Two fingerprints are equal only
    when a re-extraction would compute the same cache from the same teacher.
    """

    version: str
    split: str
    num_samples: int
    tokens_sha256: str
    records_sha256: dict[str, str]
    image_sizes: dict[str, list[str]]

    @classmethod
    def parse(cls, d: dict[str, Any]) -> DatasetFingerprint:
        _check_keys(cls, d, "dataset")
        return cls(**{**d, "records_sha256": dict(d["records_sha256"]),
                      "image_sizes": {k: list(v) for k, v in d["image_sizes"].items()}})

    def differences(self, other: DatasetFingerprint) -> list[str]:
        """What differs, ``self`` being the cache's and ``other`` the dataset's, one phrase per field."""
        out = []
        for name in ("version", "split", "num_samples", "tokens_sha256"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: cache has {a!r}, dataset has {b!r}")
        sizes = [f"{ch} cache {', '.join(self.image_sizes.get(ch, ['none']))} vs dataset "
                 f"{', '.join(other.image_sizes.get(ch, ['none']))}"
                 for ch in sorted(set(self.image_sizes) | set(other.image_sizes))
                 if self.image_sizes.get(ch) != other.image_sizes.get(ch)]
        if sizes:
            out.append("image sizes (px): " + "; ".join(sizes))
        tables = sorted(t for t in set(self.records_sha256) | set(other.records_sha256)
                        if self.records_sha256.get(t) != other.records_sha256.get(t))
        if tables:
            out.append(f"content of the {', '.join(tables)} records differs (the dataroot changed since extraction, "
                       "or it is another dataset)")
        return out


@dataclass(frozen=True, kw_only=True)
class FeatureStorage:
    """How the teacher map is stored."""

    mode: FeatureMode
    dtype: FeatureDtype
    channels: int
    margin_cells: int = 1
    """Foreground mode: extra cells stored around each enlarged box's footprint."""

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "foreground"):
            raise CacheFormatError(f"features.mode must be 'dense' or 'foreground', got {self.mode!r}")
        if self.dtype not in ("float16", "int8"):
            raise CacheFormatError(f"features.dtype must be 'float16' or 'int8', got {self.dtype!r}")
        if self.mode == "dense" and self.dtype != "float16":
            raise CacheFormatError("dense features are stored as float16 only")

    @classmethod
    def parse(cls, d: dict[str, Any]) -> FeatureStorage:
        _check_keys(cls, d, "features")
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class KeypointSpec:
    """Each stored box's keypoints (METHOD.md section 6): the box grown by ``enlarge_m`` on every side, then a
    ``grid_size x grid_size`` lattice over it, edges included (tigbev.geometry.keypoints)."""

    enlarge_m: float
    grid_size: int

    @property
    def per_box(self) -> int:
        return self.grid_size ** 2

    @classmethod
    def parse(cls, d: dict[str, Any]) -> KeypointSpec:
        _check_keys(cls, d, "keypoints")
        return cls(enlarge_m=float(d["enlarge_m"]), grid_size=int(d["grid_size"]))


@dataclass(frozen=True, kw_only=True)
class DepthSpec:
    """The LiDAR depth rows: which sweep, which cameras (a row's camera index names ``cameras[i]``), how near."""

    cameras: tuple[str, ...]
    min_depth_m: float
    source: str
    pixels: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> DepthSpec:
        _check_keys(cls, d, "depth")
        return cls(cameras=tuple(d["cameras"]), min_depth_m=float(d["min_depth_m"]), source=str(d["source"]),
                   pixels=str(d["pixels"]))


@dataclass(frozen=True, kw_only=True)
class BoxSpec:
    """Which GT boxes are stored (``filter``: a sentence) and in which frame."""

    filter: str
    frame: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> BoxSpec:
        _check_keys(cls, d, "boxes")
        return cls(**d)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the cache: what writer, reader, verify, info and dump agree on."""

    name: str
    row_shape: tuple[int, ...]
    """Shape of one row (the leading axis counts samples, boxes, points or cells)."""
    dtype: str
    dims: tuple[str, ...]
    """Names of all axes, the leading one first."""
    columns: tuple[str, ...] | None
    """Meaning of the last axis' entries, where they have names."""
    frame: str
    codec: Literal["ragged", "dense", "flags"]
    """Which codec pipeline stores it (``CODECS_DESCRIPTION`` in tigbev.cache.store)."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything a reader needs to trust and interpret a cache."""

    format_version: int
    teacher: TeacherFingerprint
    dataset: DatasetFingerprint
    grid: BevGrid
    """Teacher BEV grid: range, cell size; maps are (C, H=ny, W=nx)."""
    features: FeatureStorage
    keypoints: KeypointSpec
    depth: DepthSpec
    boxes: BoxSpec
    shard_samples: int
    codecs: dict[str, Any]
    provenance: dict[str, Any]
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def array(self, name: str) -> ArraySpec:
        """The spec of array ``name`` in this cache (row shapes follow the grid, channels and keypoint lattice)."""
        c, k = self.features.channels, self.keypoints.per_box
        lidar = self.boxes.frame
        specs = {
            "done": ArraySpec("done", (), "uint8", ("sample",), None, "", "flags"),
            "bev": ArraySpec("bev", (c, self.grid.ny, self.grid.nx), "float16", ("sample", "channel", "y", "x"),
                             None, lidar, "dense"),
            "boxes": ArraySpec("boxes", (len(BOX_COLUMNS),), "float32", ("box", "column"), BOX_COLUMNS, lidar,
                               "ragged"),
            "keypoints": ArraySpec("keypoints", (k, 2), "float32", ("box", "keypoint", "xy"), ("x_m", "y_m"), lidar,
                                   "ragged"),
            "depth": ArraySpec("depth", (len(DEPTH_COLUMNS),), "float32", ("point", "column"), DEPTH_COLUMNS,
                               f"camera image ({self.depth.pixels})", "ragged"),
            "fg_cells": ArraySpec("fg_cells", (), "int32", ("cell",), None, "flat index iy * W + ix of the grid",
                                  "ragged"),
            "fg_features": ArraySpec("fg_features", (c,), self.features.dtype, ("cell", "channel"), None, lidar,
                                     "ragged"),
            "fg_scale": ArraySpec("fg_scale", (c,), "float32", ("sample", "channel"), None, "", "ragged"),
        }
        if name not in specs:
            raise CacheFormatError(f"no array {name!r} in a tigbev cache")
        return specs[name]

    def row_spec(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape of one row, dtype) of array ``name``."""
        spec = self.array(name)
        return spec.row_shape, spec.dtype

    @property
    def num_shards(self) -> int:
        return -(-self.dataset.num_samples // self.shard_samples)

    def shard_of(self, sample_idx: int) -> int:
        return sample_idx // self.shard_samples

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_samples
        return range(start, min(start + self.shard_samples, self.dataset.num_samples))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def parse(cls, d: Any) -> Manifest:
        """Validate a manifest read from disk; unknown format versions are rejected with a clear message."""
        if not isinstance(d, dict):
            raise CacheFormatError("no tigbev cache manifest found (is this a tigbev cache?)")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheFormatError(f"cache format version {version!r} is not supported by this tigbev (reads version "
                                   f"{FORMAT_VERSION}); re-extract the cache or use a matching tigbev")
        _check_keys(cls, d, "top level")
        _check_keys(BevGrid, d["grid"], "grid")
        try:
            grid = BevGrid(**{k: float(v) for k, v in d["grid"].items()})
        except ValueError as exc:
            raise CacheFormatError(f"manifest grid: {exc}") from None
        return cls(
            format_version=version,
            teacher=TeacherFingerprint.parse(d["teacher"]),
            dataset=DatasetFingerprint.parse(d["dataset"]),
            grid=grid,
            features=FeatureStorage.parse(d["features"]),
            keypoints=KeypointSpec.parse(d["keypoints"]),
            depth=DepthSpec.parse(d["depth"]),
            boxes=BoxSpec.parse(d["boxes"]),
            shard_samples=int(d["shard_samples"]),
            codecs=dict(d["codecs"]),
            provenance=dict(d["provenance"]),
            complete=bool(d["complete"]),
            extra=dict(d["extra"]),
        )

    def compatibility_errors(self, *, dataset: DatasetFingerprint | None = None, grid: dict[str, float] | None = None,
                             teacher_sha256: str | None = None) -> list[str]:
        """What differs between this cache and what a consumer expects (empty: compatible)."""
        errors = []
        if dataset is not None:
            errors += [f"dataset {d}" for d in self.dataset.differences(dataset)]
        if grid is not None:
            mine = self.grid.to_dict()
            for k, v in grid.items():
                if abs(float(mine.get(k, float("nan"))) - float(v)) > 1e-6:
                    errors.append(f"grid {k}: cache has {mine.get(k)}, expected {v}")
        if teacher_sha256 is not None and teacher_sha256 != self.teacher.checkpoint_sha256:
            errors.append(f"teacher checkpoint sha256: cache has {self.teacher.checkpoint_sha256[:12]}..., expected "
                          f"{teacher_sha256[:12]}...")
        return errors
