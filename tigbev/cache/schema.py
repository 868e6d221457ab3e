"""The on-disk contract of the teacher cache: the one place that defines it. No torch, no numpy.

A cache is a zarr v3 group (a local path or an fsspec URL)::

    CACHE/zarr.json                       group; attributes["tigbev_cache"] = the manifest (below)
    CACHE/done                            (N,) uint8   per-sample done flags, one chunk per sample shard
    CACHE/shards/<k:06d>/records          (B_k,) uint8 the shard's sample records, one after the other (RECORD
                                          layout below); inner chunks of ``records_chunk_bytes``, each with a
                                          crc32c, all in one zarr shard file (``records/c/0``)
    CACHE/index/<k:06d>.parquet           one row per sample of shard k (INDEX_COLUMNS): where its record lies
                                          and how many rows each of its sections holds
    CACHE/index.parquet                   all rows, written when the cache is complete
    CACHE/writers/<writer id>.json        the lease of each running extraction (pid, host, shards, heartbeat)
    CACHE/configs/part-<i>-of-<n>.json    the resolved configuration of each extraction part (CONFIG_DIR)

A complete cache's manifest also lists the sha256 and size of every file but the records' shard files (which carry
their own checksums), the configurations, the leases and the group's own ``zarr.json`` (``extra["files"]``,
:data:`FILES_KEY`), and the group's attributes hold the sha256 of the manifest itself (:data:`CHECKSUM_ATTR`,
:func:`manifest_digest`): a changed byte in any index, flag or metadata file, or in the manifest, is a fault.

(The Parquet files sit outside the zarr hierarchy; readers open zarr members by name and never list them.)

A sample's record is its sections, each starting at a multiple of ``SECTION_ALIGN`` bytes (:meth:`Manifest.sections`):
``boxes`` (M, 10) float32 and ``depth`` (P, 5) float32, then for each stored teacher-map variant (``variants``:
the canonical map, the four flipped views, or stored BDA draws) ``aug_from_lidar`` (1, 4, 4) float32 (the variant's
frame: identity for the canonical map), ``scale`` (1, C) float32 (per-channel scale), and ``cells`` (F,) int32 +
``features`` (F, C) (foreground mode) or ``features`` (1, C, H, W) (dense mode), float16 or int8. One sample is one
contiguous byte range, so a read is one ranged read of the shard file plus one checksum per inner chunk. Keypoints
are not stored: they follow from the boxes and the keypoint spec (:func:`tigbev.cache.record.box_keypoints`).

Everything is in the **un-augmented key lidar frame** of each sample (a variant's map in its ``aug_from_lidar``
frame); BEV maps are (C, H, W) with rows = y and columns = x on ``manifest.grid`` (docs/COORDINATES.md). Samples
are grouped in shards of ``shard_samples`` consecutive samples; a shard's data is written by exactly one writer,
in one go, and its done flags are set only after all its data is written, so a killed extraction resumes shard by
shard and parallel writers never share a chunk. A writer holds a lease on the shards it writes (``writers/``); a
second writer of the same shards is refused while the lease is live (its process alive, its heartbeat fresh).
Every inner chunk carries a crc32c checksum and every chunk is stored (the shard file's index, itself
checksummed, marks a lost one), so a lost or damaged chunk is an error that names the sample, never zeros.

Features are stored divided by a per-sample, per-channel scale (the channel's peak magnitude): float16 keeps the
same relative precision in every channel, even a near-zero one, and int8 rounds ``127 * value / scale``.
Foreground mode stores, instead of the dense map, every cell that bilinear sampling at any keypoint touches (plus a
margin, :func:`tigbev.cache.record.foreground_cells`), so keypoint features read back from the cache equal those
sampled from the dense map.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from functools import cached_property
from typing import Any, Final, Literal, get_args, get_origin, get_type_hints

from tigbev.geometry.bev import BevGrid

__all__ = [
    "BOX_COLUMNS",
    "CACHE_ATTR",
    "CHECKSUM_ATTR",
    "FILES_KEY",
    "CONFIG_DIR",
    "DEPTH_COLUMNS",
    "FORMAT_VERSION",
    "INDEX_COLUMNS",
    "LEASE_DIR",
    "RECORDS_ARRAY",
    "SECTION_ALIGN",
    "ArraySpec",
    "BoxSpec",
    "CacheFormatError",
    "DatasetFingerprint",
    "DepthSpec",
    "FeatureStorage",
    "KeypointSpec",
    "Manifest",
    "Section",
    "TeacherFingerprint",
    "VariantSpec",
    "checked_file",
    "manifest_digest",
    "record_size",
    "shard_index_path",
    "shard_path",
    "tokens_sha256",
]

FORMAT_VERSION: Final[int] = 3
"""3: one record per sample (one ranged read), keypoints derived from the boxes, per-channel-scaled features,
teacher-map variants. Versions and what changed: docs/CACHE.md."""
CACHE_ATTR: Final[str] = "tigbev_cache"
CHECKSUM_ATTR: Final[str] = "tigbev_cache_sha256"
"""The group attribute beside the manifest that holds :func:`manifest_digest` of it (complete caches)."""
FILES_KEY: Final[str] = "files"
"""``manifest.extra[FILES_KEY]``: ``{path relative to the cache: [bytes, sha256]}`` of a complete cache's index,
flag and metadata files (see the module's docstring)."""
BOX_COLUMNS: Final[tuple[str, ...]] = ("x_m", "y_m", "z_m", "l_m", "w_m", "h_m", "yaw_rad", "vx_mps", "vy_mps",
                                        "label")
DEPTH_COLUMNS: Final[tuple[str, ...]] = ("u_px", "v_px", "depth_m", "box_index", "camera_index")
RECORDS_ARRAY: Final[str] = "records"
SECTION_ALIGN: Final[int] = 16
"""Every section of a record starts at a multiple of this many bytes from the record's start."""
# Columns of index.parquet and their Arrow types (as strings: this module imports no pyarrow either).
INDEX_COLUMNS: Final[dict[str, str]] = {
    "sample_idx": "int64",
    "token": "string",
    "scene": "string",
    "timestamp_us": "int64",
    "shard": "int64",
    "record_offset": "int64",
    "record_bytes": "int64",
    "num_boxes": "int64",
    "num_depth": "int64",
    "depth_per_camera": "list<int64>",
    "num_cells": "list<int64>",
}
"""``record_offset`` / ``record_bytes``: the record's byte range in its shard's ``records`` array; ``num_cells``:
the map cells each variant stores (foreground mode; dense mode: H * W each)."""
LEASE_DIR: Final[str] = "writers"
CONFIG_DIR: Final[str] = "configs"
"""``CACHE/configs/part-<i>-of-<n>.json``: the resolved configuration of each extraction part (its command's options
with every default filled in, and the teacher's architecture), written when the part starts; never read back."""

FeatureMode = Literal["dense", "foreground"]
FeatureDtype = Literal["float16", "int8"]
VariantKind = Literal["canonical", "flips", "draws"]


class CacheFormatError(ValueError):
    """A cache that this version cannot read, or that does not match what the reader expects."""


def shard_path(shard: int) -> str:
    return f"shards/{shard:06d}"


def shard_index_path(shard: int) -> str:
    return f"index/{shard:06d}.parquet"


def tokens_sha256(tokens: Sequence[str]) -> str:
    """sha256 of the ordered sample tokens (one per line)."""
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def _check_keys(cls: type, d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise CacheFormatError(f"manifest {where}: expected an object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    missing = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - set(d)
    unknown = set(d) - known
    if missing or unknown:
        raise CacheFormatError(f"manifest {where}: missing {sorted(missing)}, unknown {sorted(unknown)}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """A JSON value as the field type ``tp`` says (numbers, strings, tuples, dicts of lists, nested records; Literal
    as is)."""
    origin = get_origin(tp)
    if is_dataclass(tp):
        return _parse(tp, value, where)
    if tp in (int, float, str, bool):
        return tp(value)
    if origin is tuple:
        return tuple(value)
    if origin is dict:
        inner = get_args(tp)[1] if get_args(tp) else Any
        return {k: list(v) if get_origin(inner) is list else v for k, v in dict(value).items()}
    return value


def _parse(cls: type, d: Any, where: str) -> Any:
    """A frozen record from its manifest entry: the keys checked (none missing, none unknown), each value converted
    to its field's type; the record's own ``__post_init__`` then validates the values."""
    _check_keys(cls, d, where)
    hints = get_type_hints(cls)
    try:
        return cls(**{k: _convert(hints[k], v, k) for k, v in d.items()})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CacheFormatError):
            raise
        raise CacheFormatError(f"manifest {where}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class TeacherFingerprint:
    """Which teacher produced the cache: its checkpoint's sha256 and its resolved config."""

    checkpoint_sha256: str
    config: dict[str, Any]


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
        if self.channels < 1 or self.margin_cells < 0:
            raise CacheFormatError(f"features: channels must be >= 1 and margin_cells >= 0, got {self.channels}, "
                                   f"{self.margin_cells}")


@dataclass(frozen=True, kw_only=True)
class KeypointSpec:
    """Each stored box's keypoints (METHOD.md section 6): the box grown by ``enlarge_m`` on every side, then a
    ``grid_size x grid_size`` lattice over it, edges included (tigbev.geometry.keypoints)."""

    enlarge_m: float
    grid_size: int

    @property
    def per_box(self) -> int:
        return self.grid_size ** 2


@dataclass(frozen=True, kw_only=True)
class DepthSpec:
    """The LiDAR depth rows: which sweep, which cameras (a row's camera index names ``cameras[i]``), how near."""

    cameras: tuple[str, ...]
    min_depth_m: float
    source: str
    pixels: str


@dataclass(frozen=True, kw_only=True)
class BoxSpec:
    """Which GT boxes are stored (``filter``: a sentence) and in which frame."""

    filter: str
    frame: str


@dataclass(frozen=True, kw_only=True)
class VariantSpec:
    """Which teacher maps each record stores: ``count`` views of the sample, each with its own frame
    (``aug_from_lidar``), chosen at extraction (tigbev.data.augment.variant_transforms):

    - ``canonical``: one map, of the un-augmented points (BEV augmentation is replayed on it);
    - ``flips``: four maps, of the points flipped in x / y (variant ``flip_x + 2 * flip_y``): flips exact;
    - ``draws``: the canonical map, then ``count - 1`` BDA draws of ``policy`` (rotation_deg, scale_range, p_flip,
      seed); training picks a stored draw, so the teacher's view is exact.
    """

    kind: VariantKind = "canonical"
    count: int = 1
    policy: dict[str, Any] = field(default_factory=dict)
    """``draws`` only: the BEV augmentation the draws come from, and their seed."""

    def __post_init__(self) -> None:
        want = {"canonical": 1, "flips": 4}.get(self.kind)
        if self.kind not in ("canonical", "flips", "draws"):
            raise CacheFormatError(f"variants: kind must be 'canonical', 'flips' or 'draws', got {self.kind!r}")
        if (want is not None and self.count != want) or self.count < 1 or (self.kind == "draws" and self.count < 2):
            raise CacheFormatError(f"variants: kind {self.kind!r} stores "
                                   f"{want if want is not None else '1 + K (K >= 1)'} map(s), got count {self.count}")
        missing = {"rotation_deg", "scale_range", "p_flip", "seed"} - set(self.policy)
        if self.kind == "draws" and missing:
            raise CacheFormatError(f"variants: kind 'draws' needs its policy's {sorted(missing)}")


@dataclass(frozen=True)
class ArraySpec:
    """One array of the cache, or one section of a sample record: what writer, reader, verify, info and dump agree
    on. A section of ``n`` rows has the shape ``(n, *row_shape)``."""

    name: str
    row_shape: tuple[int, ...]
    """Shape of one row (the leading axis counts samples, boxes, points, cells or, for one-row sections, 1)."""
    dtype: str
    dims: tuple[str, ...]
    """Names of all axes, the leading one first."""
    columns: tuple[str, ...] | None
    """Meaning of the last axis' entries, where they have names."""
    frame: str
    per_variant: bool = False
    """A section each teacher-map variant has (True), or one per record."""

    @property
    def row_size(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        return self.row_size * _ITEMSIZE[self.dtype]


_ITEMSIZE: Final[dict[str, int]] = {"uint8": 1, "int8": 1, "float16": 2, "int32": 4, "float32": 4}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // SECTION_ALIGN) * SECTION_ALIGN


def record_size(sections: Sequence[Section]) -> int:
    """Bytes of a record laid out as ``sections`` (:meth:`Manifest.sections`): its last section's end, aligned."""
    return _aligned(sections[-1].offset + sections[-1].nbytes)


@dataclass(frozen=True)
class Section:
    """Where one section of one sample's record lies: bytes ``offset .. offset + nbytes`` of the record."""

    spec: ArraySpec
    variant: int
    """Teacher-map variant (0 for the per-record sections ``boxes`` and ``depth``)."""
    rows: int
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.spec.row_shape)

    @property
    def nbytes(self) -> int:
        return self.rows * self.spec.row_bytes

    @property
    def count(self) -> int:
        """Number of elements."""
        return self.rows * self.spec.row_size

    @property
    def label(self) -> str:
        return self.spec.name if not self.spec.per_variant else f"{self.spec.name}[{self.variant}]"


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
    variants: VariantSpec
    shard_samples: int
    records_chunk_bytes: int
    """Inner chunk size of the ``records`` arrays (a read fetches the whole chunks its record overlaps)."""
    codecs: dict[str, Any]
    provenance: dict[str, Any]
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def array(self, name: str) -> ArraySpec:
        """The spec of array or record section ``name`` in this cache (row shapes follow the grid, the channels and
        the feature mode)."""
        specs = self._specs
        if name not in specs:
            raise CacheFormatError(f"no array or record section {name!r} in a tigbev cache of this storage")
        return specs[name]

    @cached_property
    def _specs(self) -> dict[str, ArraySpec]:
        c, lidar = self.features.channels, self.boxes.frame
        dense = self.features.mode == "dense"
        specs = {
            "done": ArraySpec("done", (), "uint8", ("sample",), None, ""),
            RECORDS_ARRAY: ArraySpec(RECORDS_ARRAY, (), "uint8", ("byte",), None, ""),
            "boxes": ArraySpec("boxes", (len(BOX_COLUMNS),), "float32", ("box", "column"), BOX_COLUMNS, lidar),
            "depth": ArraySpec("depth", (len(DEPTH_COLUMNS),), "float32", ("point", "column"), DEPTH_COLUMNS,
                               f"camera image ({self.depth.pixels})"),
            "aug_from_lidar": ArraySpec("aug_from_lidar", (4, 4), "float32", ("one", "row", "column"), None,
                                        f"{lidar} -> the variant's frame", per_variant=True),
            "scale": ArraySpec("scale", (c,), "float32", ("one", "channel"), None, "", per_variant=True),
            "cells": ArraySpec("cells", (), "int32", ("cell",), None, "flat index iy * W + ix of the grid",
                               per_variant=True),
            "features": ArraySpec("features", (c, self.grid.ny, self.grid.nx) if dense else (c,), self.features.dtype,
                                  ("one", "channel", "y", "x") if dense else ("cell", "channel"), None,
                                  "the variant's frame", per_variant=True),
        }
        if dense:
            del specs["cells"]
        return specs

    def sections(self, num_boxes: int, num_depth: int, num_cells: Sequence[int]) -> tuple[Section, ...]:
        """The sections of one sample's record, in order, with their byte offsets (each aligned to
        ``SECTION_ALIGN``). ``num_cells``: cells per variant (ignored in dense mode)."""
        if len(num_cells) != self.variants.count:
            raise CacheFormatError(f"a record holds {self.variants.count} map variant(s), got cell counts for "
                                   f"{len(num_cells)}")
        plan: list[tuple[str, int, int]] = [("boxes", 0, num_boxes), ("depth", 0, num_depth)]
        for v, cells in enumerate(num_cells):
            plan += [("aug_from_lidar", v, 1), ("scale", v, 1)]
            plan += [("features", v, 1)] if self.features.mode == "dense" else [("cells", v, cells),
                                                                               ("features", v, cells)]
        out, offset = [], 0
        for name, v, rows in plan:
            if rows < 0:
                raise CacheFormatError(f"record section {name}: negative row count {rows}")
            section = Section(self.array(name), v, rows, offset)
            out.append(section)
            offset = _aligned(offset + section.nbytes)
        return tuple(out)

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
            hint = (" (format 2 stored six zarr arrays per shard and the keypoints; format 3 stores one record per "
                    "sample)") if version == 2 else ""
            raise CacheFormatError(f"cache format version {version!r} is not supported by this tigbev (it reads "
                                   f"version {FORMAT_VERSION}){hint}; re-extract it with this tigbev's `tigbev "
                                   "extract-teacher` into a new --out, or read it with the tigbev that wrote it")
        return _parse(cls, d, "top level")

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


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, no spaces): what :data:`CHECKSUM_ATTR` holds."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checked_file(path: str) -> bool:
    """Whether a file of a complete cache (``path`` relative to it) is one that ``extra["files"]`` lists."""
    top = path.split("/", 1)[0]
    return not (path == "zarr.json" or top in (CONFIG_DIR, LEASE_DIR) or "/.tmp" in f"/{path}" or ".tmp-" in path
                or (top == "shards" and f"/{RECORDS_ARRAY}/c/" in path))
