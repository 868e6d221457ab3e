"""Reading and writing the teacher cache (layout and meaning: tigbev/cache_schema.py). numpy, zarr, pyarrow only.

The one shim for the zarr v3 API: store opening (local path or fsspec URL), array creation with codecs, and
checksum errors turned into errors that name the sample and the array.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tigbev.cache_schema import (
    CACHE_ATTR,
    INDEX_COLUMNS,
    CacheFormatError,
    DatasetFingerprint,
    Manifest,
    shard_index_path,
    shard_path,
)
from tigbev.errors import TigbevError

__all__ = ["CacheError", "CacheReader", "CacheWriter", "CachedSample", "SampleRecord", "fs_and_path", "read_parquet_rows",
           "tokens_sha256"]

_RAGGED_CHUNK_BYTES = 256 * 1024  # inner chunk size of ragged arrays: a sample reads a few chunks, not a shard


class CacheError(TigbevError):
    """A cache that is missing, incomplete, corrupt, or does not match what is asked of it."""


def tokens_sha256(tokens: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def _codecs(kind: str) -> list[Any]:
    """Compression + checksum chain: zstd inside blosc with byte shuffle for numbers, crc32c last (verified on read)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "bitshuffle" if kind == "int8" else "shuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


CODECS_DESCRIPTION = {"compressor": "blosc(zstd, clevel 5, byte shuffle; bit shuffle for int8)", "checksum": "crc32c",
                      "zarr_format": 3, "ragged_inner_chunk_bytes": _RAGGED_CHUNK_BYTES}


def _open_store(url: str, mode: str):
    """A zarr store for a local path or an fsspec URL (s3://, gs://, memory://, ...)."""
    import zarr

    if "://" in url and not url.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(url, read_only=mode == "r")
    path = url.removeprefix("file://")
    return zarr.storage.LocalStore(path, read_only=mode == "r")


def fs_and_path(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _write_parquet(url: str, rows: list[dict[str, Any]]) -> None:
    """Write index rows as Parquet, atomically (temporary name, then move)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"int64": pa.int64(), "string": pa.string(), "list<int64>": pa.list_(pa.int64())}
    schema = pa.schema([(name, types[t]) for name, t in INDEX_COLUMNS.items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    fs, path = fs_and_path(url)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    tmp = path + ".tmp"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, path)


def read_parquet_rows(url: str) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise CacheError(f"cache index {url} is missing")
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pydict()


@dataclass
class SampleRecord:
    """What extraction writes for one sample (all in the un-augmented key lidar frame)."""

    sample_idx: int
    token: str
    scene: str
    timestamp_us: int
    boxes: NDArray[np.float32]  # (M, 10): box layout + label
    keypoints: NDArray[np.float32]  # (M, K, 2)
    depth: NDArray[np.float32]  # (P, 5): u, v, depth, box index, camera index; sorted by camera
    depth_per_camera: list[int]
    fg_cells: NDArray[np.int32]  # (F,) foreground mode
    fg_features: NDArray  # (F, C) float16 or int8
    fg_scale: NDArray[np.float32] | None  # (C,) int8 only
    bev: NDArray[np.float16] | None  # (C, H, W) dense mode


@dataclass
class CachedSample:
    """One sample as read back. ``map_cells``/``map_features`` hold the stored teacher map cells (dense mode: all).

    Use :meth:`CacheReader.dense_map` to rebuild a (C, H, W) float32 map with zeros where nothing is stored.
    """

    sample_idx: int
    token: str
    boxes: NDArray[np.float32]  # (M, 9)
    labels: NDArray[np.int64]  # (M,)
    keypoints: NDArray[np.float32]  # (M, K, 2)
    depth: NDArray[np.float32]  # (P, 5)
    depth_per_camera: list[int]
    map_cells: NDArray[np.int64] | None  # (F,) flat cell indices, None in dense mode
    map_features: NDArray[np.float32]  # (F, C) foreground, or (C, H, W) dense, float32


def _ragged_chunk_rows(row_shape: tuple[int, ...], dtype: np.dtype) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return max(1, _RAGGED_CHUNK_BYTES // row_bytes)


class CacheWriter:
    """Creates a cache (or opens an existing one with the same manifest) and writes whole sample shards."""

    def __init__(self, url: str, manifest: Manifest):
        import zarr

        self.url = url.rstrip("/")
        self.manifest = manifest
        store = _open_store(self.url, "w")
        try:
            group = zarr.open_group(store=store, mode="r+")
            existing = Manifest.parse(group.attrs.get(CACHE_ATTR))
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            group, existing = None, None
        if existing is not None:
            problems = _resume_mismatches(existing, manifest)
            if problems:
                raise CacheError(f"{self.url} holds a different cache ({'; '.join(problems)}); choose another output "
                                 f"or delete it")
            self.manifest = existing
            self.group = group
        else:
            self.group = zarr.open_group(store=store, mode="a", zarr_format=3)
            self._create_fixed_arrays()
            self.group.attrs[CACHE_ATTR] = manifest.to_dict()
        self._lock = threading.Lock()

    def _create_fixed_arrays(self) -> None:
        m = self.manifest
        n, s = m.dataset.num_samples, m.shard_samples
        import zarr
        from zarr.codecs import Crc32cCodec

        # Several parts may start at once: whoever creates an array first wins, the others reuse it. Never
        # overwrite here, or a late starter would wipe the done flags of an early one.
        specs: list[tuple[str, dict[str, Any]]] = [
            ("done", {"shape": (n,), "chunks": (s,), "dtype": "uint8", "compressors": [Crc32cCodec()]})]
        if m.features.mode == "dense":
            nx = round((m.grid["x_max_m"] - m.grid["x_min_m"]) / m.grid["cell_m"])
            ny = round((m.grid["y_max_m"] - m.grid["y_min_m"]) / m.grid["cell_m"])
            c = m.features.channels
            specs.append(("bev", {"shape": (n, c, ny, nx), "chunks": (1, c, ny, nx), "shards": (s, c, ny, nx),
                                  "dtype": "float16", "compressors": _codecs("float16")}))
        for name, spec in specs:
            try:
                self.group.create_array(name, fill_value=0, overwrite=False, **spec)
            except zarr.errors.ContainsArrayError:
                pass

    def done_flags(self) -> NDArray[np.bool_]:
        return np.asarray(self.group["done"][:]).astype(bool)

    def write_shard(self, shard: int, records: Sequence[SampleRecord]) -> None:
        """Write one whole shard: ragged arrays, dense rows, the shard's index; then (only then) its done flags."""
        m = self.manifest
        expected = list(m.shard_range(shard))
        if [r.sample_idx for r in records] != expected:
            raise CacheError(f"shard {shard} must hold samples {expected[0]}..{expected[-1]} in order")
        g = self.group.require_group(shard_path(shard))
        rows, offsets = [], {"box": 0, "depth": 0, "fg": 0}
        for j, r in enumerate(records):
            rows.append({
                "sample_idx": r.sample_idx, "token": r.token, "scene": r.scene, "timestamp_us": r.timestamp_us,
                "shard": shard, "num_boxes": len(r.boxes), "box_offset": offsets["box"], "num_depth": len(r.depth),
                "depth_offset": offsets["depth"], "depth_per_camera": list(r.depth_per_camera),
                "num_fg_cells": len(r.fg_cells), "fg_offset": offsets["fg"], "fg_scale_row": j,
            })
            offsets["box"] += len(r.boxes)
            offsets["depth"] += len(r.depth)
            offsets["fg"] += len(r.fg_cells)
        c = m.features.channels
        k = m.keypoints["grid_size"] ** 2
        feat_dtype = np.dtype(m.features.dtype)
        arrays = {
            "boxes": np.concatenate([r.boxes for r in records]).astype(np.float32).reshape(-1, 10),
            "keypoints": np.concatenate([r.keypoints for r in records]).astype(np.float32).reshape(-1, k, 2),
            "depth": np.concatenate([r.depth for r in records]).astype(np.float32).reshape(-1, 5),
        }
        if m.features.mode == "foreground":
            arrays["fg_cells"] = np.concatenate([r.fg_cells for r in records]).astype(np.int32)
            arrays["fg_features"] = np.concatenate([r.fg_features for r in records]).astype(feat_dtype).reshape(-1, c)
            if m.features.dtype == "int8":
                arrays["fg_scale"] = np.stack([r.fg_scale for r in records]).astype(np.float32)
        for name, data in arrays.items():
            rows_per_chunk = _ragged_chunk_rows(data.shape[1:], data.dtype)
            shard_rows = max(rows_per_chunk, -(-len(data) // rows_per_chunk) * rows_per_chunk)
            arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(rows_per_chunk, *data.shape[1:]),
                                 shards=(shard_rows, *data.shape[1:]), fill_value=0,
                                 compressors=_codecs(str(data.dtype)), overwrite=True)
            if len(data):
                arr[...] = data
        if m.features.mode == "dense":
            self.group["bev"][expected[0]:expected[-1] + 1] = np.stack([r.bev for r in records])
        _write_parquet(f"{self.url}/{shard_index_path(shard)}", rows)
        with self._lock:
            self.group["done"][expected[0]:expected[-1] + 1] = 1

    def finalize(self) -> bool:
        """When every sample is done: write the consolidated index and mark the manifest complete."""
        if not self.done_flags().all():
            return False
        rows: list[dict[str, Any]] = []
        for shard in range(self.manifest.num_shards):
            part = read_parquet_rows(f"{self.url}/{shard_index_path(shard)}")
            rows += [dict(zip(part, vals)) for vals in zip(*part.values())]
        _write_parquet(f"{self.url}/index.parquet", rows)
        manifest = self.manifest.to_dict()
        manifest["complete"] = True
        self.group.attrs[CACHE_ATTR] = manifest
        self.manifest = Manifest.parse(manifest)
        return True


def _resume_mismatches(existing: Manifest, wanted: Manifest) -> list[str]:
    """An existing cache may be resumed only if everything that shapes its content is the same."""
    a, b = existing.to_dict(), wanted.to_dict()
    keys = ("teacher", "dataset", "grid", "features", "keypoints", "depth", "boxes", "shard_samples")
    return [f"{k} differs" for k in keys if a[k] != b[k]]


class CacheReader:
    """Random access to a finished cache. Opens the store lazily, so each DataLoader worker opens its own."""

    def __init__(self, url: str, *, require_complete: bool = True):
        self.url = str(url).rstrip("/")
        self.require_complete = require_complete
        self._arrays: dict[tuple[int, str], Any] = {}
        _ = self.manifest  # fail early on a missing or foreign cache

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the store themselves
        state = self.__dict__.copy()
        state["_arrays"] = {}
        state.pop("group", None)
        return state

    @cached_property
    def group(self):
        import zarr

        try:
            return zarr.open_group(store=_open_store(self.url, "r"), mode="r")
        except (FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
            raise CacheError(f"no cache at {self.url}") from exc
        except Exception as exc:  # zarr raises several types for a folder that is not a group
            raise CacheError(f"{self.url} is not a readable zarr cache: {exc}") from exc

    @cached_property
    def manifest(self) -> Manifest:
        try:
            m = Manifest.parse(self.group.attrs.get(CACHE_ATTR))
        except CacheFormatError as exc:
            raise CacheError(f"{self.url}: {exc}") from exc
        if self.require_complete and not m.complete:
            raise CacheError(f"cache {self.url} is incomplete ({int(np.asarray(self.group['done'][:]).sum())} of "
                             f"{m.dataset.num_samples} samples done); rerun extract-teacher to finish it")
        return m

    @cached_property
    def index(self) -> dict[str, list[Any]]:
        return read_parquet_rows(f"{self.url}/index.parquet")

    @cached_property
    def _token_to_idx(self) -> dict[str, int]:
        return {t: i for i, t in zip(self.index["sample_idx"], self.index["token"])}

    def __len__(self) -> int:
        return self.manifest.dataset.num_samples

    @property
    def tokens(self) -> list[str]:
        return list(self.index["token"])

    def sample_idx(self, token: str) -> int:
        try:
            return self._token_to_idx[token]
        except KeyError:
            raise CacheError(f"sample {token} is not in cache {self.url}") from None

    def check_compatible(self, *, version: str, split: str, tokens: Sequence[str], grid: dict[str, float] | None = None
                         ) -> None:
        """Raise a CacheError that says what differs when the cache does not belong to this dataset split/grid."""
        expected = DatasetFingerprint(version=version, split=split, num_samples=len(tokens),
                                      tokens_sha256=tokens_sha256(tokens))
        errors = self.manifest.compatibility_errors(dataset=expected, grid=grid)
        if errors:
            raise CacheError(f"cache {self.url} does not match: " + "; ".join(errors))

    def _array(self, shard: int, name: str):
        key = (shard, name)
        if key not in self._arrays:
            self._arrays[key] = self.group[f"{shard_path(shard)}/{name}"]
        return self._arrays[key]

    def _read(self, sample_idx: int, shard: int, name: str, start: int, count: int) -> NDArray:
        try:
            return np.asarray(self._array(shard, name)[start:start + count])
        except Exception as exc:  # a checksum mismatch is a ValueError, a lost chunk a KeyError/FileNotFoundError
            token = self.index["token"][sample_idx]
            raise CacheError(f"cache {self.url}: sample {sample_idx} ({token}), array {name}: unreadable ({exc})") \
                from exc

    def read(self, sample_idx: int) -> CachedSample:
        m = self.manifest
        if not 0 <= sample_idx < len(self):
            raise CacheError(f"sample index {sample_idx} out of range for cache {self.url} ({len(self)} samples)")
        row = {k: v[sample_idx] for k, v in self.index.items()}
        if row["sample_idx"] != sample_idx:
            raise CacheError(f"cache {self.url}: index row {sample_idx} holds sample {row['sample_idx']}")
        shard = row["shard"]
        boxes = self._read(sample_idx, shard, "boxes", row["box_offset"], row["num_boxes"])
        keypoints = self._read(sample_idx, shard, "keypoints", row["box_offset"], row["num_boxes"])
        depth = self._read(sample_idx, shard, "depth", row["depth_offset"], row["num_depth"])
        if m.features.mode == "dense":
            try:
                feats = np.asarray(self.group["bev"][sample_idx]).astype(np.float32)
            except Exception as exc:
                raise CacheError(f"cache {self.url}: sample {sample_idx} ({row['token']}), array bev: unreadable "
                                 f"({exc})") from exc
            cells = None
        else:
            cells = self._read(sample_idx, shard, "fg_cells", row["fg_offset"], row["num_fg_cells"]).astype(np.int64)
            feats = self._read(sample_idx, shard, "fg_features", row["fg_offset"], row["num_fg_cells"])
            if m.features.dtype == "int8":
                scale = self._read(sample_idx, shard, "fg_scale", row["fg_scale_row"], 1)[0]
                feats = feats.astype(np.float32) * scale[None, :]
            else:
                feats = feats.astype(np.float32)
        return CachedSample(
            sample_idx=sample_idx, token=row["token"], boxes=boxes[:, :9].copy(),
            labels=boxes[:, 9].astype(np.int64), keypoints=keypoints, depth=depth,
            depth_per_camera=list(row["depth_per_camera"]), map_cells=cells, map_features=feats,
        )

    def dense_map(self, sample: CachedSample) -> NDArray[np.float32]:
        """(C, H, W) teacher map of a sample; in foreground mode zeros where no cell is stored."""
        if sample.map_cells is None:
            return sample.map_features
        g = self.manifest.grid
        nx = round((g["x_max_m"] - g["x_min_m"]) / g["cell_m"])
        ny = round((g["y_max_m"] - g["y_min_m"]) / g["cell_m"])
        c = self.manifest.features.channels
        out = np.zeros((c, ny * nx), dtype=np.float32)
        out[:, sample.map_cells] = sample.map_features.T
        return out.reshape(c, ny, nx)

